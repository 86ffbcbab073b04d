"""BatchNorm with frozen statistics, and closed-form per-sample gradients of normalisation layers.

Why BatchNorm can be private. In training mode a BatchNorm layer normalises every sample with the
mean and variance of the whole batch, so one sample's output (and gradient) depends on the others
and per-sample clipping bounds nothing. With *frozen statistics* it always normalises with its
running mean and variance, exactly as in ``eval()``, and never updates them: the layer is then a fixed
per-channel affine map of each sample, ``y = (x - μ) / sqrt(σ² + eps) · weight + bias``, and DP-SGD
applies as to any other layer. Its affine ``weight``/``bias`` stay trainable, with exact per-sample
gradients ``Σ_spatial g · x̂`` and ``Σ_spatial g``. This is the natural mode for fine-tuning an
ImageNet-pretrained network, whose running statistics come from public data.

:func:`freeze_batchnorm` applies this to a model without changing its code, its modules or its
state-dict keys: a forward pre-hook sets the layer's ``training`` flag to ``False`` for the duration of
its own forward call and a forward hook restores it, so Lightning's ``model.train()`` at every epoch
changes nothing, and ``num_batches_tracked`` never moves. The returned handle undoes it.

Importing this module registers with Opacus (exact-type lookup) closed-form grad samplers for:

* ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and timm's ``BatchNormAct2d``/``SyncBatchNormAct``
  (frozen statistics only: a layer in training mode that is not frozen is refused);
* timm's ``GroupNorm``, ``GroupNorm1``, ``GroupNormAct``, ``GroupNorm1Act`` (subclasses of
  ``nn.GroupNorm``), ``LayerNormAct`` and ``LayerNormAct2d`` (subclasses of ``nn.LayerNorm``), which
  would otherwise fall back to functorch.

timm's ``*Act`` layers apply drop and activation after the affine map; they are declared with
:func:`~lightning_sparta.privacy.per_sample.register_sampler_output`, so the per-sample engine hands
their samplers the gradient at the input of ``drop`` (the affine output), whatever the activation is.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from lightning_sparta.privacy.per_sample import register_path_note, register_sampler_output

Grads = dict[nn.Parameter, torch.Tensor]

FROZEN_STATS_NOTE = "BN frozen stats"

_FROZEN: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_SAVED_MODES: weakref.WeakKeyDictionary[nn.Module, list[bool]] = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------ freezing
def _batch_statistics_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [_BatchNorm]
    try:  # timm's EvoNorm B layers divide by the batch variance in training mode, the running one in eval
        from timm.layers import EvoNorm2dB0, EvoNorm2dB1, EvoNorm2dB2

        types += [EvoNorm2dB0, EvoNorm2dB1, EvoNorm2dB2]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


BATCH_STATISTICS_TYPES = _batch_statistics_types()
"""Layers that normalise with statistics of the batch in training mode and running ones in ``eval()``:
``nn.BatchNorm*d``/``nn.SyncBatchNorm`` (timm's ``BatchNormAct2d`` included) and timm's ``EvoNorm2dB0``,
``EvoNorm2dB1``, ``EvoNorm2dB2``."""


def has_running_statistics(module: nn.Module) -> bool:
    """Whether ``module`` tracks running statistics, so that it can normalise without the batch."""
    if not isinstance(module, _BatchNorm):  # EvoNorm B: a running variance only
        return getattr(module, "running_var", None) is not None
    return bool(module.track_running_stats) and module.running_mean is not None and module.running_var is not None


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer frozen by :func:`freeze_batchnorm`."""
    return module in _FROZEN


def _enter_eval(module: nn.Module, _args: Any) -> None:
    _SAVED_MODES.setdefault(module, []).append(module.training)
    module.training = False


def _restore_mode(module: nn.Module, _args: Any, _output: Any) -> None:
    modes = _SAVED_MODES.get(module)
    if modes:
        module.training = modes.pop()


class FrozenBatchNorm:
    """Handle of :func:`freeze_batchnorm`: the frozen layers, and :meth:`remove` to undo the freezing."""

    def __init__(self, modules: dict[str, nn.Module], handles: list[RemovableHandle]) -> None:
        self.modules = modules
        self._handles = handles

    def remove(self) -> None:
        """Restore ordinary BatchNorm behaviour (batch statistics in training mode). Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self.modules.values():
            _FROZEN.discard(module)
            _SAVED_MODES.pop(module, None)
        self.modules = {}

    def __repr__(self) -> str:
        return f"FrozenBatchNorm({list(self.modules)})"


def freeze_batchnorm(model: nn.Module) -> FrozenBatchNorm:
    """Make every BatchNorm layer of ``model`` normalise with its running statistics, in any mode.

    Each ``nn.BatchNorm*d``/``nn.SyncBatchNorm`` (timm's ``BatchNormAct2d`` included), and each of timm's
    ``EvoNorm2dB0``/``B1``/``B2`` (:data:`BATCH_STATISTICS_TYPES`), then behaves as in ``eval()`` even
    while ``model`` is in ``train()``: its running statistics and ``num_batches_tracked`` are never
    updated, and each sample is normalised independently of the batch. The affine
    parameters keep their ``requires_grad``. Modules, ``training`` flags and state-dict keys are
    unchanged; layers already frozen are left to their first handle.

    Args:
        model: the model (or a single BatchNorm layer).

    Returns:
        A handle whose ``remove()`` undoes the freezing.

    Raises:
        ValueError: a BatchNorm layer has no running statistics (``track_running_stats=False``) and
            could only normalise with batch statistics.

    Example:
        >>> bn = nn.BatchNorm1d(3).train()
        >>> frozen = freeze_batchnorm(bn)
        >>> _ = bn(torch.randn(4, 3))
        >>> int(bn.num_batches_tracked), bn.training
        (0, True)
        >>> frozen.remove()
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BATCH_STATISTICS_TYPES)}
    without = [name or "<root>" for name, m in layers.items() if not has_running_statistics(m)]
    if without:
        raise ValueError(
            f"BatchNorm layers without running statistics cannot be frozen (they normalise with batch "
            f"statistics, which mixes the samples of a batch): {without}."
        )
    frozen: dict[str, nn.Module] = {}
    handles: list[RemovableHandle] = []
    for name, module in layers.items():
        if is_frozen(module):
            continue
        # prepend: leave the layer in eval mode before any other pre-hook, and restore its flag before any
        # other forward hook, so that those (the per-sample engine's) see the model's real mode
        handles.append(module.register_forward_pre_hook(_enter_eval, prepend=True))
        handles.append(module.register_forward_hook(_restore_mode, prepend=True, always_call=True))
        _FROZEN.add(module)
        frozen[name] = module
    return FrozenBatchNorm(frozen, handles)


def _note(module: nn.Module) -> str | None:
    return FROZEN_STATS_NOTE if is_frozen(module) else None


register_path_note(_note)


# ------------------------------------------------------------------------------------------ samplers
def _normalised_with_running_stats(layer: _BatchNorm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = layer.running_mean.to(dtype).view(shape)
    inv_std = torch.rsqrt(layer.running_var.to(dtype) + layer.eps).view(shape)
    return (x.to(dtype) - mean) * inv_std


def compute_frozen_batchnorm_grad_sample(
    layer: _BatchNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """Per-sample gradients ``[B, C]`` of a BatchNorm layer's ``weight`` and ``bias``, frozen statistics.

    Args:
        layer: a BatchNorm layer frozen by :func:`freeze_batchnorm` (or evaluated in ``eval()``).
        activations: ``[input]``, input of shape ``[B, C, *]``.
        backprops: gradient of the loss with respect to the affine output, ``[B, C, *]``.

    Returns:
        Per-sample gradient of each trainable affine parameter.

    Raises:
        RuntimeError: the layer is in training mode without frozen statistics: it normalised with
            batch statistics, and its per-sample gradients are not defined.
    """
    if layer.training and not is_frozen(layer):
        raise RuntimeError(
            f"{type(layer).__name__} ran in training mode with batch statistics, which mix the samples of a "
            "batch: per-sample gradients are undefined. Freeze its statistics with "
            "`lightning_sparta.privacy.batchnorm.freeze_batchnorm(model)` (DPStrategy does so by default)."
        )
    grads: Grads = {}
    if layer.weight is not None and layer.weight.requires_grad:
        dtype = torch.promote_types(backprops.dtype, layer.weight.dtype)  # bf16 backprops: sum in fp32
        x_hat = _normalised_with_running_stats(layer, activations[0], dtype)
        grads[layer.weight] = torch.einsum("nc...,nc...->nc", backprops.to(dtype), x_hat)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = torch.einsum("nc...->nc", backprops)
    return grads


def compute_layer_norm2d_act_grad_sample(
    layer: nn.LayerNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """timm's ``LayerNormAct2d``: a LayerNorm over the channels of ``[B, C, H, W]``."""
    return compute_layer_norm_grad_sample(
        layer, [activations[0].permute(0, 2, 3, 1)], backprops.permute(0, 2, 3, 1).to(activations[0].dtype)
    )


def _register() -> None:
    register_grad_sampler([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm])(
        compute_frozen_batchnorm_grad_sample
    )
    try:
        from timm.layers import GroupNorm, GroupNorm1, GroupNorm1Act, GroupNormAct
        from timm.layers.norm_act import BatchNormAct2d, LayerNormAct, LayerNormAct2d, SyncBatchNormAct
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine usable without it
        return
    register_grad_sampler([BatchNormAct2d, SyncBatchNormAct])(compute_frozen_batchnorm_grad_sample)
    register_grad_sampler([GroupNorm, GroupNorm1, GroupNormAct, GroupNorm1Act])(compute_group_norm_grad_sample)
    register_grad_sampler(LayerNormAct)(compute_layer_norm_grad_sample)
    register_grad_sampler(LayerNormAct2d)(compute_layer_norm2d_act_grad_sample)
    for act_type in (BatchNormAct2d, SyncBatchNormAct, GroupNormAct, GroupNorm1Act, LayerNormAct, LayerNormAct2d):
        register_sampler_output(act_type, ("drop", "act"))


_register()

__all__ = [
    "FROZEN_STATS_NOTE",
    "FrozenBatchNorm",
    "compute_frozen_batchnorm_grad_sample",
    "compute_layer_norm2d_act_grad_sample",
    "freeze_batchnorm",
    "has_running_statistics",
    "is_frozen",
]
