"""Checks that refuse a Trainer set-up or an optimizer step that DP-SGD could not make private.

Each check raises with a message that names the setting and what to do instead; :class:`DPStrategy`
calls them when fitting starts and at every step.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_sparta._logging import shorten

SUPPORTED_PRECISION = ("32-true", "64-true", "bf16-mixed", "bf16-true")


def check_trainer(trainer: pl.Trainer, module: pl.LightningModule, plugin: object) -> None:
    """Refuse manual optimization, gradient accumulation and loss-scaled precisions.

    Raises:
        ValueError: naming the Trainer or module setting.
    """
    if not module.automatic_optimization:
        raise ValueError(
            "DPStrategy needs automatic optimization (`automatic_optimization=True`): with manual "
            "optimization the strategy cannot clip per-sample gradients before your optimizer steps."
        )
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"`accumulate_grad_batches={trainer.accumulate_grad_batches}` is not supported by DPStrategy: "
            "Lightning divides the loss before backward, which rescales per-sample gradients before "
            "clipping. Use `DPStrategy(physical_batch_size=...)` to split large logical batches."
        )
    check_precision(str(trainer.precision), plugin)


def check_precision(precision: str, plugin: object) -> None:
    """Refuse precisions whose loss scaling would corrupt the per-sample gradients.

    Raises:
        ValueError: for ``16-mixed``/``16-true`` or any plugin with a ``GradScaler``.
    """
    if getattr(plugin, "scaler", None) is not None:
        precision = "16-mixed"  # a GradScaler scales the loss, hence every per-sample gradient
    if precision not in SUPPORTED_PRECISION:
        hint = (
            " The GradScaler of '16-mixed' unscales `p.grad` but not the per-sample gradients, so "
            "clipping would use scaled norms."
            if precision.startswith("16")
            else ""
        )
        raise ValueError(
            f"`precision={precision!r}` is not supported by DPStrategy; use one of "
            f"{list(SUPPORTED_PRECISION)} ('bf16-mixed' for mixed precision).{hint}"
        )


def check_one_training_loader(loaders: object) -> None:
    """Refuse several training loaders: each would be sampled at its own rate.

    Raises:
        ValueError: saying how many loaders were found and how to combine them.
    """
    if not isinstance(loaders, DataLoader):
        count = len(loaders) if isinstance(loaders, (list, tuple, dict)) else "several"
        raise ValueError(
            f"DPStrategy needs exactly one training DataLoader, `train_dataloader` returned {count} "
            f"({type(loaders).__name__}): each would be sampled at its own rate and Lightning cycles the "
            "shorter ones, so the accounted ε would be wrong. Concatenate the datasets into one "
            "(torch.utils.data.ConcatDataset) and return a single DataLoader."
        )


def refuse_unclipped_gradients(optimizer: Optimizer, hooked: Iterable[nn.Parameter], module: nn.Module) -> None:
    """Refuse the step when a parameter the optimizer holds got a gradient the engine did not clip.

    Only parameters hooked at the start of ``training_step`` receive clipped, noised gradients.
    Any other parameter with a ``.grad`` (one the module does not register, or one unfrozen inside
    ``training_step``) would be stepped with its exact batch gradient: no clipping, no noise.
    Refusing, rather than dropping the gradient, keeps the user's intent visible: such a
    parameter must be registered in a module and made trainable before the step starts. Every
    gradient of the optimizer's parameters is cleared before raising.

    Raises:
        RuntimeError: naming the parameters.
    """
    hooked_ids = {id(p) for p in hooked}
    raw = [
        (g, i, p)
        for g, group in enumerate(optimizer.param_groups)
        for i, p in enumerate(group["params"])
        if p.grad is not None and id(p) not in hooked_ids
    ]
    if not raw:
        return
    names = {id(p): n for n, p in module.named_parameters()}  # only to word the error
    culprits = [
        names.get(id(p), f"param_groups[{g}]['params'][{i}] (shape {list(p.shape)}, not registered in the module)")
        for g, i, p in raw
    ]
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None  # never leave a raw gradient behind for a later step
    listed = shorten([f"`{n}`" for n in culprits])
    raise RuntimeError(
        f"DPStrategy: {listed} received a gradient that was not clipped or noised, so the "
        "optimizer would apply the exact batch gradient. Parameters are made private only if they are "
        "registered in the LightningModule (as attributes of modules, not in plain lists or dicts) "
        "and trainable when `training_step` starts: change `requires_grad` in a callback hook such "
        "as `on_train_batch_start`, not inside `training_step`."
    )


__all__ = [
    "SUPPORTED_PRECISION",
    "check_one_training_loader",
    "check_precision",
    "check_trainer",
    "refuse_unclipped_gradients",
]
