"""Checks that refuse a Trainer set-up or an optimizer step that DP-SGD could not make private.

Each check raises with a message that names the setting and what to do instead; :class:`DPStrategy`
calls them when fitting starts and at every step.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_sparta._logging import rank_zero_user_warn, shorten

SUPPORTED_PRECISION = ("32-true", "64-true", "bf16-mixed", "bf16-true")


def check_trainer(trainer: pl.Trainer, module: pl.LightningModule, plugin: object) -> None:
    """Refuse manual optimization, gradient accumulation, loss-scaled precisions and batch mixing.

    Raises:
        ValueError: naming the Trainer or module setting.
    """
    if not module.automatic_optimization:
        raise ValueError(
            "DPStrategy needs automatic optimization (`automatic_optimization=True`): with manual "
            "optimization the strategy cannot clip per-sample gradients before your optimizer steps."
        )
    check_no_accumulation(trainer)
    check_precision(str(trainer.precision), plugin)
    check_no_batch_mixing(module)


def _is_compiled(module: nn.Module) -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by any torch.compile call
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def warn_if_compiled(module: pl.LightningModule) -> None:
    """Say that ``torch.compile`` brings nothing under the strategy, before Dynamo's own warnings do.

    The update is the eager one (``tests/test_compile.py``), but Dynamo traces the strategy's forward
    hooks, which swap ghost layers' parameters for detached ones at every call, and the Poisson batch
    size changes from step to step: the compiled frames recompile until Dynamo's limit, then run eagerly.
    """
    compiled = [name or "the LightningModule" for name, m in module.named_modules() if _is_compiled(m)]
    if getattr(module, "_compiler_ctx", None) is not None:
        compiled.insert(0, "the LightningModule")
    if compiled:
        rank_zero_user_warn(
            f"DPStrategy: compiled with `torch.compile`: {shorten(compiled)}. The clipped update is the same as "
            "without it, but no faster: the strategy's hooks swap parameters at every call and Poisson batch "
            "sizes vary, so Dynamo recompiles until `torch._dynamo.config.recompile_limit` and then runs "
            "eagerly. Train the uncompiled model."
        )


def check_no_accumulation(trainer: pl.Trainer) -> None:
    """Refuse Lightning's gradient accumulation, at fit start and at every step (callbacks may set it).

    Raises:
        ValueError: naming ``accumulate_grad_batches`` and ``physical_batch_size``.
    """
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"`accumulate_grad_batches={trainer.accumulate_grad_batches}` is not supported by DPStrategy: "
            "Lightning divides the loss before backward, which rescales per-sample gradients before "
            "clipping, and each DP step releases one Poisson batch, so the batches before the last of a "
            "window would be dropped. Use `DPStrategy(physical_batch_size=...)` to split large logical batches."
        )


def _batchnorm_layers(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_callbacks(callbacks: Iterable[pl.Callback], module: nn.Module) -> None:
    """Refuse Lightning callbacks that train on private data outside what DPStrategy accounts.

    - ``LearningRateFinder`` (``Tuner.lr_find``) picks the rate from the training loss of private batches,
      which is not noised, and then restores the checkpoint taken before its steps, accountant included.
    - ``BatchSizeFinder`` (``Tuner.scale_batch_size``) trains on private data to find the largest batch that
      fits, then restores the same way; with DP-SGD the batch size sets the sampling rate, hence ε.
    - ``GradientAccumulationScheduler`` sets ``accumulate_grad_batches`` during the run.
    - ``StochasticWeightAveraging`` on a model with BatchNorm recomputes the running statistics in an
      extra epoch over the training data.
    - ``ModelPruning`` reparametrises weights during the run (``weight = weight_orig * weight_mask``),
      which no per-sample gradient path follows.

    Raises:
        ValueError: naming the callback and what to do instead.
    """
    from lightning.pytorch.callbacks import (
        BatchSizeFinder,
        GradientAccumulationScheduler,
        LearningRateFinder,
        ModelPruning,
        StochasticWeightAveraging,
    )

    for callback in callbacks:
        name = type(callback).__name__
        if isinstance(callback, LearningRateFinder):
            raise ValueError(
                f"DPStrategy: {name} (`Tuner.lr_find`) is not supported. It chooses the learning rate from "
                "the training losses of private batches, which are not noised, so the choice itself is not "
                "private; and it restores the checkpoint taken before its steps, which would erase them "
                "from the privacy accounting. Choose the learning rate on public data (a non-private Trainer "
                "on a public dataset) or account for the search as part of the private run."
            )
        if isinstance(callback, BatchSizeFinder):
            raise ValueError(
                f"DPStrategy: {name} (`Tuner.scale_batch_size`) is not supported. It trains on private data "
                "and then restores the weights and the accountant from before those steps, and with DP-SGD "
                "the batch size is not a memory setting: it sets the sampling rate, hence ε. Keep the "
                "DataLoader's batch size (the expected logical batch) and bound memory with "
                "`DPStrategy(physical_batch_size=...)`."
            )
        if isinstance(callback, GradientAccumulationScheduler):
            raise ValueError(
                f"DPStrategy: {name} is not supported: it sets `accumulate_grad_batches` during the run, "
                "which would rescale per-sample gradients before clipping and drop the clipped sums of all "
                "but the last batch of each window. Use `DPStrategy(physical_batch_size=...)` to split "
                "large logical batches."
            )
        if isinstance(callback, ModelPruning):
            raise ValueError(
                f"DPStrategy: {name} is not supported: at each pruning it replaces the pruned weights by "
                "`<name>_orig * <name>_mask`, computed before every forward, and the trainable `<name>_orig` "
                "has no per-sample gradient path (the next step would be refused). Prune after training (the "
                "weights are private, so pruning them is post-processing), or train a private sparse subset "
                "of rows with SpartaMaskCallback."
            )
        batchnorm = _batchnorm_layers(module) if isinstance(callback, StochasticWeightAveraging) else []
        if batchnorm:
            raise ValueError(
                f"DPStrategy: {name} is not supported on a model with BatchNorm ({shorten(batchnorm)}): "
                "it resets the running statistics and recomputes them in an extra epoch over the training "
                "data, which would release statistics of private data without noise (DPStrategy keeps "
                "BatchNorm frozen, so they would stay reset instead, silently breaking the model), and that "
                "epoch's steps are not in the plan ε was set for. Lightning's `WeightAveraging` (the equal "
                "average, as SWA) or `EMAWeightAveraging` average the frozen statistics with the weights instead."
            )


_SAME_SIZE_INTEGER = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (a NaN equals itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = _SAME_SIZE_INTEGER.get(a.element_size())
    return torch.equal(a.view(bits), b.view(bits)) if bits is not None else torch.equal(a, b)


def _checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One integer per tensor: the wrapping sum of its bits read as 32-bit integers (64-bit for float64).

    Any single changed element changes it. Summing int32 into int32 runs at memory speed (accumulating
    into int64 is twenty times slower on CPU).
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    device = tensors[0].device
    sums = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.element_size() == 8:
            total = flat.view(torch.int64).sum(dtype=torch.int64)
        else:
            if flat.element_size() != 4:  # bf16/fp16: pairs of elements as one int32 (pad an odd one)
                flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)]).view(torch.int16)
            total = flat.view(torch.int32).sum(dtype=torch.int32).to(torch.int64)
        sums.append(total.to(device, non_blocking=True))
    return torch.stack(sums)


class StateWatch:
    """The floating-point parameters and buffers of a module as a DP step starts, to refuse changes to them.

    From the start of ``training_step`` to the step's release, after the backward pass, nothing may change
    them: the optimizer moves the parameters afterwards, from the private gradient. A change in between (a
    weight rescaled from the batch in the forward pass, statistics kept in a buffer, an optimizer stepped in
    a gradient hook with autograd's raw gradient) is a function of the private batch released without
    noise. Known layers are handled by type (BatchNorm frozen, InstanceNorm with running statistics and
    ``Embedding(max_norm=...)`` refused by name); this catches the others.

    Every step compares identities and version counters, and a checksum of every tensor's bits (one pass
    over the weights, one device sync per check), which sees changes made through ``.data`` (autograd's
    version counter does not count them). With ``values=True`` (the first step after attaching) it also
    keeps a copy of every tensor, and changed tensors are restored before the refusal. Integer buffers
    (step counters) are not watched.
    """

    def __init__(self, module: nn.Module, values: bool) -> None:
        self.module = module
        self._kept = {
            kind: {
                name: (t, t._version, t.detach().clone() if values else None)
                for name, t in named
                if t.is_floating_point()
            }
            for kind, named in (("parameters", module.named_parameters()), ("buffers", module.named_buffers()))
        }
        self._order = [(kind, name) for kind, kept in self._kept.items() for name in kept]
        self._sums = None if values else _checksums(self._watched())
        self._sum_changed: set[tuple[str, str]] = set()

    def _watched(self) -> list[torch.Tensor]:
        return [self._kept[kind][name][0] for kind, name in self._order]

    def _now(self, kind: str) -> dict[str, torch.Tensor]:
        return dict(self.module.named_parameters() if kind == "parameters" else self.module.named_buffers())

    def changed(self, kind: str) -> list[str]:
        """Names of the watched ``"parameters"`` or ``"buffers"`` replaced or changed since the watch began."""
        now = self._now(kind)
        changed = []
        for name, (t, version, value) in self._kept[kind].items():
            replaced = name in now and now[name] is not t
            if (
                replaced
                or t._version != version
                or (value is not None and not _same_values(t.detach(), value))
                or (kind, name) in self._sum_changed
            ):
                changed.append(name)
        return changed

    def _undo(self, kind: str, names: list[str]) -> list[str]:
        """Put back the tensors of ``names`` and their values; returns those whose values are lost.

        A replaced tensor gets its original object back, which still holds the values from before the
        step unless it was changed in place too. A tensor changed in place with no copy kept (after the
        first step) cannot be restored: it is filled with NaN, so that no checkpoint written on the
        refusal (``OnExceptionCheckpoint``) holds the change.
        """
        lost = []
        with torch.no_grad():
            for name in names:
                t, version, value = self._kept[kind][name]
                prefix, _, leaf = name.rpartition(".")
                getattr(self.module.get_submodule(prefix), f"_{kind}")[leaf] = t
                if value is not None:
                    t.copy_(value)
                elif t._version != version or (kind, name) in self._sum_changed:
                    t.fill_(float("nan"))
                    lost.append(name)
        return lost

    def refuse_changes(self, during: str, checksum: bool = False) -> None:
        """Raise if a watched tensor changed, after undoing the change (see :meth:`_undo`).

        Args:
            during: where the change happened, for the message (``"`training_step`"``, ``"the backward pass"``).
            checksum: also compare the checksums (a pass over the weights; the strategy asks for it once per
                step, at the release). A change only they see was made through ``.data`` somewhere in the step.

        Raises:
            RuntimeError: naming the parameters and buffers.
        """
        if checksum and self._sums is not None:
            sums = _checksums(self._watched())
            if not torch.equal(sums, self._sums):
                differ = (sums != self._sums).nonzero().flatten().tolist()
                self._sum_changed = {self._order[i] for i in differ}
        changed = {kind: self.changed(kind) for kind in ("parameters", "buffers")}
        if not any(changed.values()):
            return
        if self._sum_changed and not any(
            self._kept[kind][name][0]._version != self._kept[kind][name][1] for kind, name in self._sum_changed
        ):
            during = "the step (in `training_step` or the backward pass, through `.data`)"
        lost = [name for kind, names in changed.items() for name in self._undo(kind, names)]
        what = " and ".join(f"the {kind} {shorten(names)}" for kind, names in changed.items() if names)
        raise RuntimeError(
            f"DPStrategy: {what} changed during {during}, before the step's release: the change is a function "
            "of the private batch released without noise (a layer that rescales its weights or keeps statistics "
            "of its inputs, an optimizer stepped in a gradient hook). Freeze such statistics (eval mode, or the "
            "layer's own option); move an update that does not depend on the data out of `training_step` (e.g. "
            "to `on_train_batch_end`); only the Trainer's optimizer may update parameters, from the private "
            "gradient. "
            + (
                f"No copy of {shorten(lost)} is kept after the first step, so they are filled with NaN: no "
                "checkpoint written on this error holds the change. Reload your last checkpoint."
                if lost
                else "They are restored to their values before the step."
            )
        )


def private_monitors(trainer: pl.Trainer) -> dict[str, list[str]]:
    """Decisions taken from metrics that ``training_step`` logged on private batches: metric → deciders.

    A callback or scheduler with a ``monitor`` (``EarlyStopping``, ``ModelCheckpoint``,
    ``ReduceLROnPlateau``) acts on the logged value, which is computed without noise: when training
    stops, which checkpoint is kept or the learning rate then depends on the private data outside the
    guarantee. Read after the first ``training_step`` of a fit (what it logged is known by then).
    """
    logged = {
        value.meta.name for value in getattr(trainer, "_results", {}).values() if value.meta.fx == "training_step"
    }
    names = {variant for name in logged for variant in (name, f"{name}_step", f"{name}_epoch")}
    deciders: list[tuple[str, str]] = [
        (getattr(callback, "monitor", None), type(callback).__name__) for callback in trainer.callbacks
    ]
    deciders += [
        (config.monitor, type(config.scheduler).__name__)
        for config in trainer.lr_scheduler_configs
        if config.reduce_on_plateau
    ]
    found: dict[str, list[str]] = {}
    for monitor, who in deciders:
        if isinstance(monitor, str) and monitor in names:
            found.setdefault(monitor, []).append(who)
    return found


def warn_private_monitors(trainer: pl.Trainer) -> None:
    """Warn (once per fit, rank 0) about :func:`private_monitors`."""
    found = private_monitors(trainer)
    if not found:
        return
    listed = "; ".join(f"{', '.join(who)} on {metric!r}" for metric, who in found.items())
    rank_zero_user_warn(
        f"DPStrategy: {listed}: `training_step` logs this on private batches, without noise, so when training "
        "stops, which checkpoint is kept or the learning rate depends on the private data outside the (ε, δ) "
        "guarantee. Monitor a metric of public data, or 'privacy/epsilon'."
    )


def _batch_mixing_types() -> tuple[type, ...]:
    """MixUp/CutMix implementations of the libraries this package works with (those installed)."""
    found: list[type] = []
    try:
        from timm.data.mixup import Mixup  # FastCollateMixup is a subclass

        found.append(Mixup)
    except ImportError:  # pragma: no cover
        pass
    try:
        from torchvision.transforms.v2 import CutMix, MixUp

        found += [CutMix, MixUp]
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


_LEAVES = (str, bytes, int, float, bool, type(None), type, types.ModuleType, torch.Tensor)
_LIST_LIMIT = 64  # a recipe holds its mixer near the top, not deep in a list of samples


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _batch_mixers(obj: Any, where: str, kinds: tuple[type, ...], seen: set[int], depth: int = 0) -> list[str]:
    """``"`where` (class)"`` for every MixUp/CutMix reachable from ``obj``.

    Looks through every submodule of a module, and from there (a few levels deep) through attributes,
    lists, tuples and dicts, ``functools.partial``, bound methods and plain functions (the variables
    a lambda closes over and the globals it names): the ways a recipe holds its mixing transform.
    """
    if depth > 4 or id(obj) in seen or isinstance(obj, _LEAVES):
        return []
    seen.add(id(obj))
    if isinstance(obj, kinds):
        return [f"`{where or '<root>'}` ({type(obj).__module__}.{type(obj).__qualname__})"]
    children: list[tuple[str, Any]] = []
    if isinstance(obj, nn.Module):  # submodules at any depth, each one's own attributes from depth + 1
        found: list[str] = []
        for name, sub in obj.named_modules():
            if sub is not obj:
                found += _batch_mixers(sub, _join(where, name), kinds, seen, depth)
        children = [(_join(where, k), v) for k, v in vars(obj).items() if not k.startswith("_")]
        return found + [m for name, child in children for m in _batch_mixers(child, name, kinds, seen, depth + 1)]
    if isinstance(obj, (list, tuple)):
        children = [(f"{where}[{i}]", item) for i, item in enumerate(obj[:_LIST_LIMIT])]
    elif isinstance(obj, dict):
        children = [(f"{where}[{key!r}]", item) for key, item in list(obj.items())[:_LIST_LIMIT]]
    elif isinstance(obj, functools.partial):
        children = [(where, obj.func), *((where, a) for a in obj.args), *((where, v) for v in obj.keywords.values())]
    elif isinstance(obj, types.MethodType):
        children = [(where, obj.__func__), (where, obj.__self__)]
    elif isinstance(obj, types.FunctionType):
        cells = [cell.cell_contents for cell in obj.__closure__ or () if _filled(cell)]
        named = [obj.__globals__[n] for n in obj.__code__.co_names if n in obj.__globals__]
        children = [(where, value) for value in (*cells, *named)]
    elif hasattr(obj, "__dict__"):  # a callable class, a composed transform (its `transforms` list), ...
        children = [(_join(where, k), v) for k, v in vars(obj).items() if not k.startswith("_")]
    return [m for name, child in children for m in _batch_mixers(child, name, kinds, seen, depth + 1)]


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell (a variable not assigned yet)
        return False
    return True


def check_no_batch_mixing(module: nn.Module | None = None, collate_fn: Any = None) -> None:
    """Refuse MixUp/CutMix held by the LightningModule or used by the training loader's ``collate_fn``.

    These mix the samples of a batch: the input clipped as sample i's is ``λ x_i + (1 - λ) x_j``
    with sample j's label mixed in too, so clipping no longer bounds what one sample contributes to
    an update and the accounted ε does not hold. timm's ``Mixup``/``FastCollateMixup`` and
    torchvision's ``v2.MixUp``/``v2.CutMix`` are recognised in any submodule, in its attributes and
    composed transforms, and in the ``collate_fn`` (a callable object, a partial, or a function and
    what it refers to). Mixing written by hand cannot be seen; see the README's list of what the
    strategy cannot see.

    Raises:
        ValueError: naming each mixing transform and where it was found.
    """
    kinds = _batch_mixing_types()
    if not kinds:  # pragma: no cover
        return
    seen: set[int] = set()
    found = _batch_mixers(module, "", kinds, seen) if module is not None else []
    if collate_fn is not None:
        found += _batch_mixers(collate_fn, "collate_fn", kinds, seen)
    if found:
        raise ValueError(
            f"DPStrategy: MixUp/CutMix mixes the samples of a batch, found {shorten(found)}. The gradient clipped "
            "as one sample's would carry other samples' inputs and labels, so clipping would not bound what one sample "
            "contributes and the (ε, δ) guarantee would not hold. Remove it (from the LightningModule and from "
            "the training DataLoader's `collate_fn`) and augment each sample on its own, in the Dataset's transform."
        )


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


def check_optimizer(optimizer: Optimizer) -> None:
    """Refuse an optimizer whose ``step`` needs a closure (``LBFGS``): it evaluates it several times a step.

    Each evaluation would be another gradient of the same private batch, while DP-SGD releases one noisy
    gradient per step; the strategy runs the closure once, before the optimizer steps.

    Raises:
        ValueError: naming the optimizer.
    """
    step = getattr(type(optimizer), "step", None)
    try:
        closure = inspect.signature(step).parameters.get("closure") if step is not None else None
    except (TypeError, ValueError):  # a builtin without a signature
        closure = None
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"DPStrategy: `{type(optimizer).__name__}.step` needs a closure, which it evaluates several times per "
            "step (a line search): each evaluation would be another gradient of the same private batch, and "
            "DP-SGD releases one noisy gradient per step. Use a first-order optimizer (SGD, Adam, AdamW, ...)."
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
    "check_callbacks",
    "check_no_accumulation",
    "check_no_batch_mixing",
    "check_one_training_loader",
    "check_precision",
    "check_trainer",
    "refuse_unclipped_gradients",
]
