"""A check that each sample's gradient depends on that sample alone.

Clipping bounds what one sample contributes only if sample ``i``'s gradient is a function of sample
``i``. Code that mixes the samples of a batch breaks this without any error: a loss normalised by a
batch statistic, in-batch negatives (``z @ z.T``), a layer that centres over the batch
(``x - x.mean(0)``), MixUp written by hand. The strategy refuses the mixers it knows (BatchNorm in
train mode, timm's and torchvision's MixUp/CutMix) but cannot see hand-written ones during training.

:func:`check_sample_independence` finds them on one batch, outside training: it runs ``training_step``
three times: on the batch, on the batch with its last sample replaced by a copy of its first, and on the
batch with its first sample replaced by a copy of its last, and compares the per-sample gradients of the
samples not replaced, which must not move. It finds any coupling that involves the first or the last
sample (a batch statistic, a pairing such as ``x.flip(0)``, an anchor taken from the first sample), not
one among the others only. Every random generator (torch's, CUDA's, ``random``'s and NumPy's) is
restored between the runs, so dropout and random augmentation inside ``training_step`` draw the same
values every time.

Under Poisson sampling a neighbouring data set also changes the batch size, so the check then leaves the
last sample out: a loss or an adversarial step divided by the batch size (a mean-reduced inner loss)
moves every other sample's gradient. A smaller batch draws other random numbers, so this part runs with
every module in eval mode (dropout and stochastic depth off), and is skipped with a warning when
``training_step`` still draws random numbers of its own. Run the check in a test or a notebook on a
batch of real shape.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_sparta.privacy.per_sample import PerSampleGradients, has_grad_sample, sum_of_losses
from lightning_sparta.privacy.sampler import batch_size_of, map_batch, seed_every_generator
from lightning_sparta.privacy.sampler import restored_randomness as _same_randomness


class SampleCouplingError(ValueError):
    """Raised by :func:`check_sample_independence` when a sample's gradient depends on another sample."""


def _replaced(batch: Any, size: int, target: int, source: int) -> Any:
    """``batch`` with sample ``target`` replaced by a copy of sample ``source``."""

    def replace(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != size:
            return t
        t = t.clone()
        t[target] = t[source]
        return t

    return map_batch(batch, replace)


def _removed_last(batch: Any, size: int) -> Any:
    return map_batch(batch, lambda t: t[: size - 1] if t.shape[0] == size else t)


def _per_sample_norms(module: nn.Module, hooks: PerSampleGradients, batch: Any, size: int) -> torch.Tensor:
    for hook in ("on_before_batch_transfer", "on_after_batch_transfer"):  # a LightningModule's batch hooks
        if hasattr(module, hook):
            batch = getattr(module, hook)(batch, 0)
    with hooks.capturing():
        output = module.training_step(batch, 0)
        loss, _, hooks.loss_scale = sum_of_losses(output, size, "mean")
        loss.backward()
    for p in hooks.parameters:
        if has_grad_sample(p) and p.grad_sample.shape[0] != size:
            name, rows = hooks.parameter_names.get(p, "?"), p.grad_sample.shape[0]
            hooks.clear()
            raise ValueError(
                f"Per-sample gradients of `{name}` have {rows} rows for a batch of {size}: the "
                "model folds the batch into another dimension, or runs this layer once for the whole batch, so "
                "its samples cannot be compared (DPStrategy refuses such a model too)."
            )
    # each sample's gradient norm per parameter tensor: [B, tensors], without keeping B copies of the model
    norms = torch.stack(
        [p.grad_sample.detach().reshape(size, -1).double().norm(dim=1) for p in hooks.parameters if has_grad_sample(p)],
        dim=1,
    )
    hooks.clear()
    for p in hooks.parameters:
        p.grad = None
    return norms


def check_sample_independence(module: nn.Module, batch: Any, tolerance: float = 1e-4) -> float:
    """Raise if a sample's gradient in ``module.training_step`` depends on other samples of ``batch``.

    ``training_step(batch, 0)``, after the module's ``on_before_batch_transfer`` and
    ``on_after_batch_transfer`` (where GPU augmentation often runs), runs three times in train mode
    (BatchNorm layers in eval mode, as :class:`~lightning_sparta.DPStrategy` freezes them): on ``batch``,
    on ``batch`` with its last sample replaced by its first, and on ``batch`` with its first sample
    replaced by its last, with every random generator restored in between. The per-sample gradients of
    the samples not replaced are compared with the first run's by their norms per parameter tensor (so
    memory stays that of one DP step). The module's parameters, gradients and modes are left as they were;
    what ``training_step`` itself does (logging, counters) happens three times. Then, with every module in
    eval mode, it runs on ``batch`` (twice, the second time with the generators seeded otherwise, to see
    whether ``training_step`` draws random numbers of its own) and, if it does not, on ``batch`` without
    its last sample, and compares the other samples: a dependence on the batch size.

    Args:
        module: a LightningModule (anything with ``training_step(batch, batch_idx)`` returning a loss
            that is the mean of per-sample losses, their sum or one loss per sample).
        batch: one training batch of at least 2 samples, batch dimension first.
        tolerance: the largest relative change allowed in a sample's gradient norms, one per parameter
            tensor: ``‖n_i - n'_i‖ / ‖n_i‖`` (float rounding is far below the default).

    Returns:
        The largest relative change found.

    Raises:
        SampleCouplingError: naming the sample, the change, what was done to the batch and the usual
            causes.
        ValueError: for a batch of fewer than 2 samples or a non-positive ``tolerance``, or a model whose
            per-sample gradients do not have one row per sample (a batch folded into another dimension).

    Example:
        >>> import torch.nn.functional as F
        >>> class Centring(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 2)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return F.cross_entropy(self.fc(x - x.mean(0)), y)  # centres over the batch
        >>> batch = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> try:
        ...     check_sample_independence(Centring(), batch)
        ... except SampleCouplingError as error:
        ...     print("coupled" if "samples are coupled" in str(error) else error)
        coupled
    """
    if not (isinstance(tolerance, float | int) and not isinstance(tolerance, bool) and tolerance > 0):
        raise ValueError(f"`tolerance` must be a positive number, got {tolerance!r}.")
    size = batch_size_of(batch)
    if size < 2:
        raise ValueError(f"`batch` must hold at least 2 samples, one to replace and one to compare, got {size}.")
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("`module` has no trainable parameter: there is no per-sample gradient to compare.")
    modes = {m: m.training for m in module.modules()}
    grads = {p: p.grad for p in module.parameters()}
    hooks = PerSampleGradients()
    try:
        module.train()
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        hooks.attach(module)
        with _same_randomness():
            reference = _per_sample_norms(module, hooks, batch, size)
        runs = []  # (what was done, the samples compared, their per-sample gradient norms then, and before)
        for target, source in ((size - 1, 0), (0, size - 1)):  # the last sample replaced, then the first
            with _same_randomness():
                norms = _per_sample_norms(module, hooks, _replaced(batch, size, target, source), size)
            kept = [i for i in range(size) if i != target]
            runs.append((f"sample {target} of the batch was replaced", kept, norms[kept], reference))
        # The last sample left out, which changes the batch size as Poisson sampling does. A smaller batch
        # draws other random numbers, so this comparison runs with every module in eval mode (dropout and
        # stochastic depth off), and only if `training_step` is then deterministic.
        for m in module.modules():
            m.eval()
        with _same_randomness():
            full = _per_sample_norms(module, hooks, batch, size)
        with _same_randomness():
            seed_every_generator(2**31 - 1)
            random_step = not torch.allclose(_per_sample_norms(module, hooks, batch, size), full, rtol=tolerance)
        if random_step:
            warnings.warn(
                "check_sample_independence: `training_step` draws random numbers of its own (an augmentation?), "
                "so leaving a sample out could not be compared, and a dependence on the batch size (a loss "
                "or an adversarial step divided by it) was not looked for.",
                UserWarning,
                stacklevel=2,
            )
        else:
            with _same_randomness():
                norms = _per_sample_norms(module, hooks, _removed_last(batch, size), size - 1)
            runs.append((f"sample {size - 1} was left out of the batch", list(range(size - 1)), norms, full))
    finally:
        hooks.detach()
        for m, training in modes.items():
            m.train(training)
        for p, g in grads.items():
            p.grad = g
            if hasattr(p, "grad_sample"):
                p.grad_sample = None
    largest = 0.0
    for what, kept, after, before in runs:
        norms = before.norm(dim=1)
        scale = norms.clamp(min=1e-6 * float(norms.max()) + 1e-30)
        change = (after - before[kept]).norm(dim=1) / scale[kept]
        worst = int(change.argmax())
        largest = max(largest, float(change[worst]))
        if float(change[worst]) > tolerance:
            raise _coupled(kept[worst], float(change[worst]), what)
    return largest


def _coupled(sample: int, change: float, what: str) -> SampleCouplingError:
    return SampleCouplingError(
        f"Sample {sample}'s gradient changed by {change:.2g} (relative) when {what}: the samples are coupled, "
        "and clipping does not bound what one sample contributes. Look for a loss normalised by a batch "
        "statistic or by the batch size (a mean-reduced inner loss of an adversarial step), in-batch "
        "negatives, a layer that reduces over the batch dimension or hand-written mixing; each sample's loss "
        "must depend on that sample alone."
    )


__all__ = ["SampleCouplingError", "check_sample_independence"]
