"""Refuse models whose layers break the per-sample independence that DP-SGD relies on."""

from __future__ import annotations

from typing import Literal

from torch import nn
from torch.nn.parameter import is_lazy

from lightning_sparta._logging import shorten
from lightning_sparta.privacy.batchnorm import (
    BATCH_STATISTICS_TYPES,
    FrozenBatchNorm,
    freeze_batchnorm,
    has_running_statistics,
)

BatchNormMode = Literal["freeze", "refuse"]
BATCHNORM_MODES: tuple[str, ...] = ("freeze", "refuse")


class IncompatibleModelError(ValueError):
    """A model contains layers that DP-SGD cannot make private."""


def _check_mode(batchnorm: str) -> None:
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"`batchnorm` must be one of {list(BATCHNORM_MODES)}, got {batchnorm!r}.")


def incompatible_layers(model: nn.Module, batchnorm: BatchNormMode = "refuse") -> dict[str, str]:
    """Layers of ``model`` that mix samples of a batch, with their type.

    BatchNorm in training mode normalises each sample with statistics of the whole batch, so one
    sample's output (and gradient) depends on the others and per-sample clipping bounds nothing.
    This holds whether or not the BatchNorm parameters are trainable. With ``batchnorm="freeze"``,
    BatchNorm layers that have running statistics are compatible (see :func:`prepare_model`): only
    those without (``track_running_stats=False``) are listed.

    Example:
        >>> incompatible_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        {'1': 'BatchNorm2d'}
        >>> incompatible_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), batchnorm="freeze")
        {}
    """
    _check_mode(batchnorm)
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, BATCH_STATISTICS_TYPES) and (batchnorm == "refuse" or not has_running_statistics(module))
    }


def renormalising_embeddings(model: nn.Module) -> list[str]:
    """``nn.Embedding``/``nn.EmbeddingBag`` layers of ``model`` built with ``max_norm``.

    Their forward renormalises the rows it looks up, in place: after training, which rows moved tells
    which indices the private batches held, whether or not the weight is trainable.

    Example:
        >>> renormalising_embeddings(nn.ModuleDict({"a": nn.Embedding(9, 2, max_norm=1.0), "b": nn.Embedding(9, 2)}))
        ['a']
    """
    kinds = (nn.Embedding, nn.EmbeddingBag)
    return [name for name, m in model.named_modules() if isinstance(m, kinds) and m.max_norm is not None]


def validate_model(model: nn.Module, batchnorm: BatchNormMode = "refuse") -> None:
    """Raise :class:`IncompatibleModelError` naming every layer that DP-SGD cannot make private.

    Args:
        model: the model.
        batchnorm: ``"refuse"`` refuses every BatchNorm layer; ``"freeze"`` accepts those whose running
            statistics can be frozen (:func:`prepare_model` freezes them).
    """
    lazy = [
        f"{name or '<root>'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if any(is_lazy(t) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
    ]
    if lazy:
        raise IncompatibleModelError(
            f"Layers whose parameters are not initialised yet (lazy modules): {shorten(lazy)}. Their shapes would "
            "be set by the first forward pass, inside the first private step, after the per-sample gradient hooks "
            "and the optimizer were set up. Run the model once on a dummy batch of the right shape (at the end of "
            "`__init__`, or in `setup()`) before `fit`; that pass sees no private data."
        )
    renormalising = renormalising_embeddings(model)
    if renormalising:
        raise IncompatibleModelError(
            f"Embedding layers with `max_norm` renormalise the rows they look up, in place, during the forward "
            f"pass: {shorten(renormalising)}. The weights after training would show which indices the private "
            "batches held, even for a frozen layer, with no noise. Build them with `max_norm=None` and, if you "
            "need the bound, rescale the looked-up vectors in your forward instead (out of place)."
        )
    tracking = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats
    ]
    if tracking:
        raise IncompatibleModelError(
            f"InstanceNorm with `track_running_stats=True` updates running statistics from every training batch, "
            f"which would be released without noise: {shorten(tracking)}. Build it with "
            "`track_running_stats=False` (the default): its per-sample normalisation is private."
        )
    bad = incompatible_layers(model, batchnorm)
    if not bad:
        return
    listed = shorten([f"{name or '<root>'} ({kind})" for name, kind in bad.items()])  # 65 on one line was unreadable
    fix = (
        "Replace it with GroupNorm, e.g. `opacus.validators.ModuleValidator.fix(model)` (which starts the new "
        "GroupNorm layers from fresh weights: the BatchNorm's pretrained affine parameters and running "
        "statistics are lost), or use a model pretrained with GroupNorm such as timm's `resnet50_gn`."
    )
    if batchnorm == "refuse":
        raise IncompatibleModelError(
            f"BatchNorm is not compatible with differential privacy (it mixes the samples of a batch): {listed}. "
            f"Use `DPStrategy(batchnorm='freeze')` to normalise with the frozen running statistics instead "
            f"(private; the affine parameters stay trainable), or {fix[0].lower() + fix[1:]}"
        )
    raise IncompatibleModelError(
        f"BatchNorm without running statistics (`track_running_stats=False`) always normalises with batch "
        f"statistics, which mix the samples of a batch, so it cannot be frozen: {listed}. {fix}"
    )


def prepare_model(model: nn.Module, batchnorm: BatchNormMode = "freeze") -> FrozenBatchNorm | None:
    """Validate ``model`` and make its BatchNorm layers private by freezing their statistics.

    With ``batchnorm="freeze"`` every BatchNorm layer normalises with its running statistics (as in
    ``eval()``) even in training mode, and never updates them; see
    :func:`~lightning_sparta.privacy.batchnorm.freeze_batchnorm`. With ``"refuse"`` a model with
    BatchNorm raises, as :func:`validate_model` does.

    Returns:
        The freezing handle (call ``remove()`` to undo), or ``None`` with ``batchnorm="refuse"``.

    Raises:
        IncompatibleModelError: naming the layers that cannot be made private.
    """
    validate_model(model, batchnorm)
    return freeze_batchnorm(model) if batchnorm == "freeze" else None


__all__ = [
    "BATCHNORM_MODES",
    "BatchNormMode",
    "IncompatibleModelError",
    "incompatible_layers",
    "prepare_model",
    "renormalising_embeddings",
    "validate_model",
]
