"""Refuse models whose layers break the per-sample independence that DP-SGD relies on."""

from __future__ import annotations

from torch import nn


class IncompatibleModelError(ValueError):
    """A model contains layers that DP-SGD cannot make private."""


def incompatible_layers(model: nn.Module) -> dict[str, str]:
    """Layers of ``model`` that mix samples of a batch, with the reason and the fix.

    BatchNorm in training mode normalises each sample with statistics of the whole batch, so one
    sample's output (and gradient) depends on the others and per-sample clipping bounds nothing.
    This holds whether or not the BatchNorm parameters are trainable.

    Example:
        >>> incompatible_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        {'1': 'BatchNorm2d'}
    """
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }


def validate_model(model: nn.Module) -> None:
    """Raise :class:`IncompatibleModelError` naming every layer that DP-SGD cannot make private."""
    bad = incompatible_layers(model)
    if bad:
        listed = ", ".join(f"{name or '<root>'} ({kind})" for name, kind in bad.items())
        raise IncompatibleModelError(
            f"BatchNorm is not compatible with differential privacy (it mixes the samples of a batch): "
            f"{listed}. Replace it with GroupNorm, e.g. `opacus.validators.ModuleValidator.fix(model)` "
            "(which starts the new GroupNorm layers from fresh weights: the BatchNorm's pretrained "
            "affine parameters and running statistics are lost), or use a model pretrained with "
            "GroupNorm such as timm's `resnet50_gn`."
        )


__all__ = ["IncompatibleModelError", "incompatible_layers", "validate_model"]
