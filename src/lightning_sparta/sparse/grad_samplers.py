"""Per-sample gradient samplers registered with Opacus for the sparse layers and timm's layers.

Opacus looks samplers up by exact module type and otherwise falls back to functorch (slow, and
for the row-sparse layers it would miss the O(k) structure). Importing this module registers:

* :class:`~lightning_sparta.sparse.layers.RowSparseLinear`, ``RowSparseConv2d``: O(k) cost, the
  dense ``[B, out, in]`` per-sample gradient is never formed (for a grouped or depthwise conv, each
  selected filter is correlated with its own group's input channels only).
* ``MaskedLinear``, ``MaskedConv2d``: dense-cost per-sample gradient, then a gather of the masked
  entries (unstructured masks have no cheaper exact form).
* ``timm.layers.Conv2dSame`` (dense, e.g. while scoring a ``tf_*`` EfficientNet): Opacus' conv
  sampler recognises only the exact ``nn.Conv2d`` type and would otherwise fall back to functorch.
* ``nn.Conv2d`` itself, replacing Opacus' sampler: a grouped or depthwise conv costs ``1/groups`` of
  Opacus' block-diagonal form, and ``padding_mode``/string padding are applied as the layer applies them.
* ``timm.layers.LayerNorm``, ``LayerNorm2d``, ``LayerScale``, ``LayerScale2d`` and torchvision's
  ConvNeXt ``LayerNorm2d``: subclasses or custom modules that Opacus' exact-type lookup misses.
* timm's weight-standardised convs ``StdConv2d``, ``ScaledStdConv2d`` and their ``*Same`` variants
  (BiT ResNet-v2, NF-Nets): the per-sample gradient of the standardised filter, taken back through
  the standardisation in closed form.

Every sampler follows Opacus' signature: ``activations[0]`` is the layer input and ``backprops``
the per-sample gradient of the loss with respect to the output, both batch-first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from timm.layers import (
    Conv2dSame,
    LayerNorm,
    LayerNorm2d,
    LayerScale,
    LayerScale2d,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)
from timm.layers.padding import pad_same
from torch import nn
from torchvision.models.convnext import LayerNorm2d as TorchvisionLayerNorm2d

from lightning_sparta.sparse.layers import (
    MaskedConv2d,
    MaskedLinear,
    RowSparseConv2d,
    RowSparseLinear,
    select_channels,
)

__all__ = [
    "compute_conv2d_grad_sample",
    "compute_conv2d_same_grad_sample",
    "compute_layer_scale2d_grad_sample",
    "compute_layer_scale_grad_sample",
    "compute_masked_conv2d_grad_sample",
    "compute_masked_linear_grad_sample",
    "compute_row_sparse_conv2d_grad_sample",
    "compute_row_sparse_linear_grad_sample",
    "compute_std_conv2d_grad_sample",
    "compute_timm_layer_norm2d_grad_sample",
    "weight_standardisation",
]

Grads = dict[nn.Parameter, torch.Tensor]


def _bias_grads(layer: nn.Module, backprops: torch.Tensor, channels_last: bool) -> Grads:
    """Per-sample bias gradient ``[B, out]``: backprops summed over all but batch and channels."""
    if layer.bias is None or not layer.bias.requires_grad:
        return {}
    return {layer.bias: torch.einsum("n...k->nk" if channels_last else "nk...->nk", backprops)}


def _unfold(layer: nn.Conv2d | RowSparseConv2d | MaskedConv2d, x: torch.Tensor) -> torch.Tensor:
    """Im2col patches ``[B, C_in*kH*kW, L]`` matching the layer's weight layout (channel-major)."""
    return F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)


def _dense_conv_weight_grads(layer: nn.Conv2d | MaskedConv2d, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient ``[B, out, C_in/groups · kH · kW]`` of a (grouped) conv weight.

    Each group's output channels are correlated with that group's input patches only, so a grouped
    conv costs ``1/groups`` of the equivalent dense correlation (no block-diagonal extraction).
    ``x`` is the input as the conv sees it (already padded for 'same' convs).
    """
    groups, n = layer.groups, len(x)
    patches = _unfold(layer, x)  # [B, C_in*kH*kW, L], the channels of group g are block g
    length = patches.shape[-1]
    per_group_out = backprops.reshape(n, groups, -1, length)  # [B, g, out/g, L]
    grads = torch.einsum("ngol,ngcl->ngoc", per_group_out, patches.view(n, groups, -1, length))
    return grads.reshape(n, backprops.shape[1], -1)


@register_grad_sampler(RowSparseLinear)
def compute_row_sparse_linear_grad_sample(
    layer: RowSparseLinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """Per-sample gradients ``[B, k, in]`` of ``weight_rows`` and ``[B, out]`` of ``bias``.

    Args:
        layer: The layer.
        activations: ``[input]``, input of shape ``[B, ..., in]``.
        backprops: Gradient of the loss with respect to the output, ``[B, ..., out]``.

    Returns:
        Per-sample gradient of each trainable parameter.
    """
    x = activations[0].to(backprops.dtype)
    grads = _bias_grads(layer, backprops, channels_last=True)
    if layer.weight_rows.requires_grad:
        grads[layer.weight_rows] = torch.einsum("n...k,n...i->nki", select_channels(backprops, -1, layer.rows), x)
    return grads


@register_grad_sampler(RowSparseConv2d)
def compute_row_sparse_conv2d_grad_sample(
    layer: RowSparseConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """Per-sample gradients ``[B, k, C_in/groups, kH, kW]`` of ``weight_rows`` and ``[B, out]`` of ``bias``.

    Args:
        layer: The layer.
        activations: ``[input]``, input of shape ``[B, C_in, H, W]``.
        backprops: Gradient of the loss with respect to the output, ``[B, out, H', W']``.

    Returns:
        Per-sample gradient of each trainable parameter.
    """
    x = layer._prepare_input(activations[0].to(backprops.dtype))
    grads = _bias_grads(layer, backprops, channels_last=False)
    if layer.weight_rows.requires_grad:
        n, k = len(x), layer.num_rows
        selected = select_channels(backprops, 1, layer.rows).flatten(2)  # [B, k, L]
        if layer.groups == 1:  # every filter reads every input channel
            weight_grads = torch.einsum("nkl,ncl->nkc", selected, _unfold(layer, x))
        else:  # filter j reads only its group's channels: patches of the gathered input, block j
            patches = _unfold(layer, layer._row_inputs(x))  # [B, k*C_in/g*kH*kW, L]
            weight_grads = torch.einsum("nkl,nkcl->nkc", selected, patches.view(n, k, -1, patches.shape[-1]))
        grads[layer.weight_rows] = weight_grads.reshape(n, *layer.weight_rows.shape)
    return grads


@register_grad_sampler(MaskedLinear)
def compute_masked_linear_grad_sample(
    layer: MaskedLinear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """Per-sample gradients ``[B, nnz]`` of ``weight_values`` and ``[B, out]`` of ``bias``.

    Forms the dense ``[B, out, in]`` per-sample gradient, then gathers the masked entries.

    Args:
        layer: The layer.
        activations: ``[input]``, input of shape ``[B, ..., in]``.
        backprops: Gradient of the loss with respect to the output, ``[B, ..., out]``.

    Returns:
        Per-sample gradient of each trainable parameter.
    """
    x = activations[0].to(backprops.dtype)
    grads = _bias_grads(layer, backprops, channels_last=True)
    if layer.weight_values.requires_grad:
        dense = torch.einsum("n...o,n...i->noi", backprops, x)
        grads[layer.weight_values] = dense.flatten(1).index_select(1, layer.indices)
    return grads


@register_grad_sampler(MaskedConv2d)
def compute_masked_conv2d_grad_sample(
    layer: MaskedConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """Per-sample gradients ``[B, nnz]`` of ``weight_values`` and ``[B, out]`` of ``bias``.

    Forms the dense ``[B, out, C_in/groups*kH*kW]`` per-sample gradient, then gathers the masked entries.

    Args:
        layer: The layer.
        activations: ``[input]``, input of shape ``[B, C_in, H, W]``.
        backprops: Gradient of the loss with respect to the output, ``[B, out, H', W']``.

    Returns:
        Per-sample gradient of each trainable parameter.
    """
    x = layer._prepare_input(activations[0].to(backprops.dtype))
    grads = _bias_grads(layer, backprops, channels_last=False)
    if layer.weight_values.requires_grad:
        dense = _dense_conv_weight_grads(layer, x, backprops)
        grads[layer.weight_values] = dense.flatten(1).index_select(1, layer.indices)
    return grads


@register_grad_sampler(Conv2dSame)
def compute_conv2d_same_grad_sample(
    layer: Conv2dSame, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """Per-sample gradients ``[B, out, C_in/groups, kH, kW]`` of ``weight`` and ``[B, out]`` of ``bias``.

    timm's ``Conv2dSame`` pads its input with ``pad_same`` (from the input's own size) and then runs
    the conv without padding; the same padding is applied to the recorded input here.

    Args:
        layer: The layer (its ``forward`` must be ``Conv2dSame``'s own).
        activations: ``[input]``, input of shape ``[B, C_in, H, W]``.
        backprops: Gradient of the loss with respect to the output, ``[B, out, H', W']``.

    Returns:
        Per-sample gradient of each trainable parameter.

    Raises:
        ValueError: If ``layer`` is a subclass with another ``forward``.
    """
    if type(layer).forward is not Conv2dSame.forward:
        raise ValueError(f"{type(layer).__name__} overrides Conv2dSame.forward; register its own grad sampler")
    x = pad_same(activations[0].to(backprops.dtype), layer.kernel_size, layer.stride, layer.dilation)
    grads = _bias_grads(layer, backprops, channels_last=False)
    if layer.weight.requires_grad:
        grads[layer.weight] = _dense_conv_weight_grads(layer, x, backprops).view(len(x), *layer.weight.shape)
    return grads


def _explicitly_padded(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input exactly as ``nn.Conv2d.forward`` convolves it with zero padding removed from the conv.

    Handles ``padding="same"``/``"valid"`` and every ``padding_mode`` ("reflect", "replicate",
    "circular" pad the input before the conv; Opacus' conv sampler ignores ``padding_mode``).
    """
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return x
        pads = []  # F.pad order: last dimension first
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    return F.pad(x, layer._reversed_padding_repeated_twice) if any(layer.padding) else x


class _Unpadded:
    """The geometry of a conv with its padding applied to the input beforehand (for :func:`_unfold`)."""

    def __init__(self, layer: nn.Conv2d) -> None:
        self.kernel_size, self.dilation, self.stride = layer.kernel_size, layer.dilation, layer.stride
        self.padding, self.groups = 0, layer.groups


@register_grad_sampler(nn.Conv2d)
def compute_conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> Grads:
    """Per-sample gradients ``[B, out, C_in/groups, kH, kW]`` of a dense ``nn.Conv2d`` and ``[B, out]`` of its bias.

    Replaces Opacus' conv sampler for ``nn.Conv2d``: that one correlates every output channel with
    every input channel and keeps the block diagonal, ``groups`` times the work and memory a grouped
    conv needs (a depthwise conv of 1,152 channels: 1,152 times), and it ignores ``padding_mode``.
    Here each group's outputs meet only their group's input patches, and the input is padded exactly
    as the layer pads it.

    Args:
        layer: The layer.
        activations: ``[input]``, input of shape ``[B, C_in, H, W]``.
        backprops: Gradient of the loss with respect to the output, ``[B, out, H', W']``.

    Returns:
        Per-sample gradient of each trainable parameter.
    """
    x = _explicitly_padded(layer, activations[0].to(backprops.dtype))
    grads = _bias_grads(layer, backprops, channels_last=False)
    if layer.weight.requires_grad:
        weights = _dense_conv_weight_grads(_Unpadded(layer), x, backprops)  # type: ignore[arg-type]
        grads[layer.weight] = weights.view(len(x), *layer.weight.shape)
    return grads


def weight_standardisation(layer: nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x̂, 1/s, a)`` of a timm weight-standardised conv, in ``dtype``.

    ``x̂`` ``[out, fan-in]``: each filter minus its mean, over ``s`` ``[out]``, the square root of its
    biased variance plus ``eps``; ``a`` ``[out]``: what the conv multiplies ``x̂`` by (``gain · scale``
    for the scaled convs, 1 otherwise). The conv's weight is ``a_o x̂_o``.
    """
    flat = layer.weight.detach().reshape(layer.out_channels, -1).to(dtype)
    inv_std = torch.rsqrt(flat.var(1, unbiased=False) + layer.eps)
    x_hat = (flat - flat.mean(1, keepdim=True)) * inv_std[:, None]
    gain = getattr(layer, "gain", None)
    a = (gain.detach().to(dtype) * layer.scale).reshape(-1) if gain is not None else torch.ones_like(inv_std)
    return x_hat, inv_std, a


@register_grad_sampler([StdConv2d, ScaledStdConv2d, StdConv2dSame, ScaledStdConv2dSame])
def compute_std_conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> Grads:
    """Per-sample gradients of timm's weight-standardised convs (``weight``, ``bias`` and ``gain``).

    The conv runs with ``Ŵ_o = a_o (W_o - mean(W_o)) / s_o`` for each filter ``o`` (``s_o`` the square
    root of its biased variance plus ``eps``; ``a_o = gain_o · scale`` for the scaled convs, 1 otherwise).
    With ``G`` the per-sample gradient of ``Ŵ`` (a conv's, :func:`_dense_conv_weight_grads`) and
    ``x̂_o = (W_o - mean(W_o)) / s_o``, the filter's own normalisation backward gives, per sample,
    ``∂W_o = (a_o G_o - mean(a_o G_o) - x̂_o · mean(a_o G_o ⊙ x̂_o)) / s_o`` and ``∂gain_o = scale · Σ G_o ⊙ x̂_o``.

    Args:
        layer: A ``StdConv2d``, ``ScaledStdConv2d`` or ``*Same`` variant (their own ``forward``).
        activations: ``[input]``, input of shape ``[B, C_in, H, W]``.
        backprops: Gradient of the loss with respect to the output, ``[B, out, H', W']``.

    Returns:
        Per-sample gradient of each trainable parameter.
    """
    x = activations[0].to(backprops.dtype)
    if getattr(layer, "same_pad", False):
        x = pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
    x = _explicitly_padded(layer, x)
    grads = _bias_grads(layer, backprops, channels_last=False)
    gain = getattr(layer, "gain", None)
    train_gain = gain is not None and gain.requires_grad
    if not (layer.weight.requires_grad or train_gain):
        return grads
    n = len(x)
    standardised = _dense_conv_weight_grads(_Unpadded(layer), x, backprops)  # type: ignore[arg-type]  # [B, out, fan-in]
    x_hat, inv_std, a = weight_standardisation(layer, standardised.dtype)
    along = (standardised * x_hat).mean(-1, keepdim=True)  # [B, out, 1]: mean of G_o ⊙ x̂_o
    if train_gain:
        grads[gain] = (along * (x_hat.shape[1] * layer.scale)).view(n, *gain.shape)
    if layer.weight.requires_grad:
        dy = standardised * a[:, None]
        weight = (dy - dy.mean(-1, keepdim=True) - x_hat * (along * a[:, None])) * inv_std[:, None]
        grads[layer.weight] = weight.view(n, *layer.weight.shape)
    return grads


# timm's LayerNorm is F.layer_norm over the last dims, exactly what Opacus' nn.LayerNorm sampler assumes.
register_grad_sampler(LayerNorm)(compute_layer_norm_grad_sample)


@register_grad_sampler([LayerNorm2d, TorchvisionLayerNorm2d])
def compute_timm_layer_norm2d_grad_sample(
    layer: LayerNorm2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """Per-sample gradients ``[B, C]`` of a channel LayerNorm on NCHW input (timm's and torchvision's).

    Args:
        layer: The layer.
        activations: ``[input]``, input of shape ``[B, C, H, W]``.
        backprops: Gradient of the loss with respect to the output, ``[B, C, H, W]``.

    Returns:
        Per-sample gradient of each trainable parameter.
    """
    channels_last = [activations[0].permute(0, 2, 3, 1)]
    return compute_layer_norm_grad_sample(layer, channels_last, backprops.permute(0, 2, 3, 1))


def _check_not_inplace(layer: LayerScale | LayerScale2d) -> None:
    if layer.inplace:
        raise ValueError(
            f"{type(layer).__name__}(inplace=True) overwrites its input, which the per-sample gradient "
            "of gamma needs; build the model with inplace=False (timm: init_values without inplace)"
        )


@register_grad_sampler(LayerScale)
def compute_layer_scale_grad_sample(
    layer: LayerScale, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """Per-sample gradient ``[B, dim]`` of ``gamma`` for ``y = x * gamma`` (channels last).

    Args:
        layer: The layer, with ``inplace=False``.
        activations: ``[input]``, input of shape ``[B, ..., dim]``.
        backprops: Gradient of the loss with respect to the output, ``[B, ..., dim]``.

    Returns:
        Per-sample gradient of ``gamma`` if it is trainable.

    Raises:
        ValueError: If ``layer.inplace`` is True (the recorded input is already overwritten).
    """
    _check_not_inplace(layer)
    if not layer.gamma.requires_grad:
        return {}
    return {layer.gamma: torch.einsum("n...d,n...d->nd", activations[0].to(backprops.dtype), backprops)}


@register_grad_sampler(LayerScale2d)
def compute_layer_scale2d_grad_sample(
    layer: LayerScale2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> Grads:
    """Per-sample gradient ``[B, C]`` of ``gamma`` for ``y = x * gamma`` on NCHW input.

    Args:
        layer: The layer, with ``inplace=False``.
        activations: ``[input]``, input of shape ``[B, C, H, W]``.
        backprops: Gradient of the loss with respect to the output, ``[B, C, H, W]``.

    Returns:
        Per-sample gradient of ``gamma`` if it is trainable.

    Raises:
        ValueError: If ``layer.inplace`` is True (the recorded input is already overwritten).
    """
    _check_not_inplace(layer)
    if not layer.gamma.requires_grad:
        return {}
    return {layer.gamma: torch.einsum("nc...,nc...->nc", activations[0].to(backprops.dtype), backprops)}
