"""Sparse fine-tuning layers that train a subset of a frozen dense weight.

Two families, both holding the full pretrained weight as a frozen buffer ``weight_old`` and the
dense ``bias`` Parameter of the layer they replace:

* Row-stacked (SPARTA, section 7): :class:`RowSparseLinear`, :class:`RowSparseConv2d` train a
  ``[k, ...]`` Parameter ``weight_rows`` holding the current values of k selected output rows
  (a row is one output neuron of a Linear, one output filter of a Conv2d: ``[C_in/groups, kH, kW]``
  for a grouped or depthwise conv). Per-sample gradients and DP noise cost O(k) instead of O(out).
* Element-masked (unstructured masks): :class:`MaskedLinear`, :class:`MaskedConv2d` train a
  ``[nnz]`` Parameter ``weight_values`` holding the current values of the masked entries.

State dicts always hold the merged dense ``weight`` (+ ``bias``), like the plain layer: a
checkpoint of a sparse model loads into the dense model and back. The selected rows or entries are
not part of the state dict; re-create the sparse layer with the same selection before loading.

The Conv2d layers accept any ``groups`` (grouped and depthwise convs) and timm's ``Conv2dSame``
(TensorFlow 'same' padding computed from each input's size, as in timm's ``tf_*`` models): the
sparse layer pads its input the same way, and ``to_dense`` gives back a ``Conv2dSame``. Other
subclasses that override ``forward`` (timm's ``StdConv2d``, ...) compute a different function and
are refused with :class:`UnsupportedForwardError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

__all__ = [
    "MaskedConv2d",
    "MaskedLinear",
    "RowSparseConv2d",
    "RowSparseLinear",
    "UnsupportedForwardError",
    "check_dense",
    "select_channels",
]


def select_channels(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, index)``, computed on a ``[before, channels, after]`` view of ``t``.

    The same values; on CPU, ``index_select`` over the last dimension of a 3-D tensor (a Linear's
    ``[B, T, out]`` output gradient) runs a slow per-element loop, 4-8x slower than over the middle
    dimension of this view, and a conv's ``[B, C, H, W]`` is up to 3x slower too.
    """
    dim = dim % t.dim()
    shape = t.shape
    flat = t.reshape(shape[:dim].numel(), shape[dim], -1).index_select(1, index)
    return flat.view(*shape[:dim], index.numel(), *shape[dim + 1 :])


class UnsupportedForwardError(ValueError):
    """The layer is a subclass whose own ``forward`` the sparse layers do not reproduce.

    Such a layer (timm's ``StdConv2d``, ``ScaledStdConv2d``, ...) computes something other than the
    plain op on its weight; replacing it by a sparse layer would silently change the model.
    """


def _same_padding_forward(layer: nn.Module) -> bool:
    """Whether ``layer`` runs timm's ``Conv2dSame`` forward (input padded from its own size, then conv)."""
    return isinstance(layer, Conv2dSame) and type(layer).forward is Conv2dSame.forward


def check_dense(layer: nn.Module, dense_type: type[nn.Module]) -> None:
    """Raise ``ValueError`` unless ``layer`` is a ``dense_type`` whose forward the sparse layers reproduce.

    Args:
        layer: The dense layer.
        dense_type: ``nn.Linear`` or ``nn.Conv2d``.

    Raises:
        UnsupportedForwardError: If ``layer`` is a subclass with a ``forward`` of its own (other than
            timm's ``Conv2dSame``, which the sparse convs reproduce).
        ValueError: If ``layer`` is not a ``dense_type``.
    """
    if not isinstance(layer, dense_type):
        raise ValueError(f"layer must be an nn.{dense_type.__name__}, got {type(layer).__name__}")
    if type(layer).forward is not dense_type.forward and not _same_padding_forward(layer):
        raise UnsupportedForwardError(
            f"layer must be an nn.{dense_type.__name__} or a subclass that keeps its forward"
            f"{' (or timm.layers.Conv2dSame)' if dense_type is nn.Conv2d else ''}, got {type(layer).__name__}, "
            "whose own forward computes a different function"
        )


def _validated_rows(rows: Any, num_rows: int, device: torch.device) -> torch.Tensor:
    """Check a row selection and return it as a sorted LongTensor on ``device``."""
    if not isinstance(rows, torch.Tensor):
        raise ValueError(f"rows must be a 1-D integer torch.Tensor, got {type(rows).__name__}")
    if rows.dim() != 1 or rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
        raise ValueError(f"rows must be a 1-D integer tensor, got dtype {rows.dtype} and shape {tuple(rows.shape)}")
    if rows.numel() == 0:
        raise ValueError("rows must select at least one row, got an empty tensor")
    rows = rows.to(device=device, dtype=torch.long).sort().values
    if rows[0] < 0 or rows[-1] >= num_rows:
        raise ValueError(f"rows must lie in [0, {num_rows}), got values from {rows[0].item()} to {rows[-1].item()}")
    repeated = rows[1:][rows[1:] == rows[:-1]]
    if repeated.numel():
        raise ValueError(f"rows must be unique, got {repeated[0].item()} more than once")
    return rows


def _validated_mask(mask: Any, weight: torch.Tensor) -> torch.Tensor:
    """Check an element mask and return the sorted flat indices of its True entries."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
        found = (
            f"{mask.dtype} tensor of shape {tuple(mask.shape)}"
            if isinstance(mask, torch.Tensor)
            else type(mask).__name__
        )
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, got {found}")
    indices = mask.to(weight.device).flatten().nonzero().squeeze(1)
    if indices.numel() == 0:
        raise ValueError("mask must select at least one entry, got an all-False mask")
    return indices


class _SparseLayer(nn.Module):
    """Shared state: frozen ``weight_old`` buffer, reused ``bias`` and dense state-dict handling.

    Subclasses combine a geometry mixin (``_LinearOps``/``_Conv2dOps``: the dense op and shapes)
    with a selection base (``_RowSparse``/``_Masked``: the trainable part and the forward).
    """

    _dense_type: type[nn.Module]
    _index_name: str  # the attribute holding the trainable entries' indices ("rows" or "indices")
    weight_old: torch.Tensor
    bias: nn.Parameter | None

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._read_geometry(layer)
        self.register_buffer("weight_old", layer.weight.detach().clone(), persistent=False)
        self.register_parameter("bias", layer.bias)

    @property
    def index(self) -> torch.Tensor:
        """The indices of the trainable entries (``rows`` or ``indices``): structure, not state.

        They are a plain attribute that moves with the module (``.to``, ``.cuda``), not a buffer:
        whatever treats buffers as state to update would corrupt them. An ``AveragedModel`` (Lightning's
        ``EMAWeightAveraging``/``WeightAveraging``) averages integer buffers in floating point and
        truncates (with ``decay=0.9``, a quarter of 5,000 row indices came back one lower), then copies
        them into the model being trained.
        """
        return getattr(self, self._index_name)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _SparseLayer:
        super()._apply(fn, recurse)
        setattr(self, self._index_name, fn(self.index))  # fn casts floating-point tensors only
        return self

    # Implemented by the geometry mixins.
    def _read_geometry(self, layer: nn.Module) -> None:
        pass

    @property
    def _export_type(self) -> type[nn.Module]:
        """The dense class that ``to_dense`` builds."""
        return self._dense_type

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the op sees it (padded, for timm's 'same' convs)."""
        return x

    def _dense_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _rows_op(self, x: torch.Tensor, weight_rows: torch.Tensor, bias_rows: torch.Tensor | None) -> torch.Tensor:
        """Output channels ``rows`` only, from the stacked rows (``x`` already prepared)."""
        raise NotImplementedError

    def _dense_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    # Implemented by the selection bases.
    def _merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _reset_trainable(self) -> None:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The merged dense weight (a detached copy, for inspection; it carries no gradient)."""
        return self._merged_weight().detach()

    def to_dense(self) -> nn.Module:
        """Build the equivalent dense layer.

        Returns:
            A new dense layer on the same device and dtype whose weight is a fresh trainable
            Parameter with the merged values (exact copy) and whose bias is this layer's ``bias``
            Parameter object.
        """
        dense = self._export_type(**self._dense_kwargs(), bias=self.bias is not None, device="meta")
        dense.weight = nn.Parameter(self._merged_weight().detach().clone())
        if self.bias is not None:
            dense.bias = self.bias
        return dense

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self._merged_weight().detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        targets = {name: t for name, t in (("weight", self.weight_old), ("bias", self.bias)) if t is not None}
        for name, target in targets.items():
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {found} from checkpoint, "
                    f"the shape in current model is {tuple(target.shape)}."
                )
                continue
            with torch.no_grad():
                target.copy_(value)
                if name == "weight":
                    self._reset_trainable()
        if strict:
            unexpected_keys.extend(
                key
                for key in state_dict
                if key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0] not in targets
            )


class _LinearOps:
    """Geometry of ``nn.Linear``: weight ``[out, in]``, output channels in the last dim."""

    _dense_type = nn.Linear
    _channel_dim = -1
    weight_old: torch.Tensor

    @property
    def in_features(self) -> int:
        """Size of each input sample."""
        return self.weight_old.shape[1]

    @property
    def out_features(self) -> int:
        """Size of each output sample."""
        return self.weight_old.shape[0]

    def _dense_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _rows_op(self, x: torch.Tensor, weight_rows: torch.Tensor, bias_rows: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight_rows, bias_rows)

    def _dense_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def _geometry_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _Conv2dOps:
    """Geometry of ``nn.Conv2d`` (any groups, zero padding): weight ``[out, in/groups, kH, kW]``, NCHW.

    ``same_pad``: the layer was timm's ``Conv2dSame``; each input is first padded with
    ``timm.layers.padding.pad_same`` (TF 'same', from the input's own size) and the conv pads nothing.
    """

    _dense_type = nn.Conv2d
    _channel_dim = 1
    weight_old: torch.Tensor
    rows: torch.Tensor
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    same_pad: bool

    def _read_geometry(self, layer: nn.Conv2d) -> None:
        self.groups = layer.groups
        self.same_pad = _same_padding_forward(layer)
        if self.same_pad and tuple(layer.padding) != (0, 0):
            raise ValueError(f"a timm Conv2dSame must have padding=(0, 0) (it pads in forward), got {layer.padding}")
        if layer.padding_mode != "zeros":
            raise ValueError(f"layer.padding_mode must be 'zeros', got {layer.padding_mode!r}")
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        padding = layer.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
            if any(total % 2 for total in totals):
                raise ValueError(
                    "layer.padding='same' must pad symmetrically (even dilation*(kernel_size-1)), "
                    f"got kernel_size={layer.kernel_size}, dilation={layer.dilation}"
                )
            padding = tuple(total // 2 for total in totals)
        self.padding = tuple(padding)

    @property
    def in_channels(self) -> int:
        """Number of input channels."""
        return self.weight_old.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        """Number of output channels (filters)."""
        return self.weight_old.shape[0]

    @property
    def _export_type(self) -> type[nn.Module]:
        return Conv2dSame if self.same_pad else nn.Conv2d

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return pad_same(x, self.kernel_size, self.stride, self.dilation) if self.same_pad else x

    def _dense_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _row_input_channels(self) -> torch.Tensor:
        """Input channels read by each selected filter, concatenated: ``[k · C_in/groups]``.

        Filter ``o`` of a grouped conv reads only the input channels of its group ``o // (out/groups)``.
        """
        per_group = self.weight_old.shape[1]
        group = torch.div(self.rows, self.out_channels // self.groups, rounding_mode="floor")
        offsets = torch.arange(per_group, device=self.rows.device)
        return (group[:, None] * per_group + offsets).flatten()

    def _row_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the (prepared) input that the selected filters read.

        ``x`` itself for ``groups=1``; else ``[B, k · C_in/groups, H, W]``, the input channels of each
        selected filter's group in row order (a group's channels repeat for each of its selected filters),
        so that a conv with ``groups=k`` gives the k selected outputs at O(k) cost.
        """
        return x if self.groups == 1 else x.index_select(1, self._row_input_channels())

    def _rows_op(self, x: torch.Tensor, weight_rows: torch.Tensor, bias_rows: torch.Tensor | None) -> torch.Tensor:
        groups = 1 if self.groups == 1 else weight_rows.shape[0]
        return F.conv2d(self._row_inputs(x), weight_rows, bias_rows, self.stride, self.padding, self.dilation, groups)

    def _dense_kwargs(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }

    def _geometry_repr(self) -> str:
        extra = (f", groups={self.groups}" if self.groups != 1 else "") + (", same_pad=True" if self.same_pad else "")
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}{extra}"
        )


class _RowSparse(_SparseLayer):
    """Trains the k selected rows as a stacked ``weight_rows`` Parameter of shape ``[k, ...]``."""

    _index_name = "rows"
    rows: torch.Tensor

    def __init__(self, layer: nn.Module, rows: torch.Tensor) -> None:
        check_dense(layer, self._dense_type)
        rows = _validated_rows(rows, layer.weight.shape[0], layer.weight.device)
        super().__init__(layer)
        self.rows = rows  # not a buffer: see `index`
        self.weight_rows = nn.Parameter(self.weight_old.index_select(0, rows))

    @property
    def num_rows(self) -> int:
        """Number k of trainable rows."""
        return self.rows.numel()

    def _merged_weight(self) -> torch.Tensor:
        return self.weight_old.index_copy(0, self.rows, self.weight_rows)

    def _reset_trainable(self) -> None:
        self.weight_rows.copy_(self.weight_old.index_select(0, self.rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One dense op with the merged weight; autograd computes the k rows' weight gradient only.

        The output is ``op(x, W)`` with ``W`` the frozen weight and the k trainable rows written over
        it, but ``W`` is built from the rows *detached*: backward computes the input gradient (one dense
        op) and no ``[out, ...]`` weight gradient. The rows' gradient comes from a term that is exactly
        zero in value, ``op_rows(x, R - R.detach())`` added to the k output channels, whose gradient
        with respect to ``R`` is the k rows' weight gradient (O(k)); the term is skipped when ``R``
        needs no gradient (inference, or a clipping engine that computes that gradient itself). A
        selected filter of a grouped conv reads only its group's input channels. Cost: forward
        ``1 + k/out`` dense ops, backward ``1 + k/out`` (instead of ``1 + k/out`` and ``2 + k/out``).
        """
        x = self._prepare_input(x)
        rows = self.weight_rows
        out = self._dense_op(x, self.weight_old.index_copy(0, self.rows, rows.detach()), self.bias)
        if rows.requires_grad and torch.is_grad_enabled():
            zero = self._rows_op(x.detach(), rows - rows.detach(), None)
            out = out.index_add_(self._channel_dim, self.rows, zero)
        return out

    def extra_repr(self) -> str:
        rows = f"rows={self.num_rows}/{self.weight_old.shape[0]}"
        return f"{self._geometry_repr()}, {rows}, bias={self.bias is not None}"


class _Masked(_SparseLayer):
    """Trains the masked entries as a flat ``weight_values`` Parameter of shape ``[nnz]``."""

    _index_name = "indices"
    indices: torch.Tensor

    def __init__(self, layer: nn.Module, mask: torch.Tensor) -> None:
        check_dense(layer, self._dense_type)
        indices = _validated_mask(mask, layer.weight)
        super().__init__(layer)
        self.indices = indices  # not a buffer: see `index`
        self.weight_values = nn.Parameter(self.weight_old.flatten().index_select(0, indices))

    @property
    def nnz(self) -> int:
        """Number of trainable weight entries."""
        return self.indices.numel()

    def _merged_weight(self) -> torch.Tensor:
        return self.weight_old.flatten().index_copy(0, self.indices, self.weight_values).view_as(self.weight_old)

    def _reset_trainable(self) -> None:
        self.weight_values.copy_(self.weight_old.flatten().index_select(0, self.indices))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the dense op with the merged weight (the gradient of ``weight_values`` is dense-cost)."""
        return self._dense_op(self._prepare_input(x), self._merged_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, nnz={self.nnz}/{self.weight_old.numel()}, bias={self.bias is not None}"


class RowSparseLinear(_LinearOps, _RowSparse):
    """``nn.Linear`` whose trainable weight is a stack of k selected output rows.

    Attributes:
        weight_old: Frozen full weight ``[out, in]`` (non-persistent buffer).
        rows: Selected row indices, sorted and unique (non-persistent buffer).
        weight_rows: Trainable current values of the selected rows, ``[k, in]``.
        bias: The dense layer's bias Parameter (same object), or None.
    """

    @classmethod
    def from_dense(cls, layer: nn.Linear, rows: torch.Tensor) -> RowSparseLinear:
        """Build a row-sparse copy of ``layer`` that trains only ``rows``.

        Args:
            layer: The dense layer; its weight is copied into ``weight_old`` and its bias
                Parameter is reused.
            rows: 1-D integer tensor of distinct output-neuron indices in ``[0, out_features)``,
                in any order.

        Returns:
            The row-sparse layer on the layer's device and dtype, equal to ``layer`` in output.

        Raises:
            ValueError: If ``layer`` is not an ``nn.Linear`` or ``rows`` is not a non-empty 1-D
                integer tensor of distinct in-range indices.

        Example:
            >>> dense = nn.Linear(4, 3)
            >>> sparse = RowSparseLinear.from_dense(dense, torch.tensor([2, 0]))
            >>> sparse.rows, tuple(sparse.weight_rows.shape), sparse.bias is dense.bias
            (tensor([0, 2]), (2, 4), True)
            >>> tuple(sparse(torch.randn(5, 4)).shape), sorted(sparse.state_dict())
            ((5, 3), ['bias', 'weight'])
        """
        return cls(layer, rows)


class RowSparseConv2d(_Conv2dOps, _RowSparse):
    """``nn.Conv2d`` whose trainable weight is a stack of k selected output filters.

    Grouped and depthwise convs (``groups > 1``) are supported: a selected filter reads only the
    input channels of its group, so forward, backward and per-sample gradients cost O(k). timm's
    ``Conv2dSame`` keeps its input-dependent 'same' padding (``same_pad``).

    Attributes:
        weight_old: Frozen full weight ``[out, in/groups, kH, kW]`` (non-persistent buffer).
        rows: Selected filter indices, sorted and unique (non-persistent buffer).
        weight_rows: Trainable current values of the selected filters, ``[k, in/groups, kH, kW]``.
        bias: The dense layer's bias Parameter (same object), or None.
    """

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, rows: torch.Tensor) -> RowSparseConv2d:
        """Build a row-sparse copy of ``layer`` that trains only the filters ``rows``.

        Args:
            layer: The dense layer (``nn.Conv2d`` with any groups and padding_mode='zeros', or timm's
                ``Conv2dSame``); its weight is copied into ``weight_old`` and its bias Parameter is reused.
            rows: 1-D integer tensor of distinct filter indices in ``[0, out_channels)``.

        Returns:
            The row-sparse layer on the layer's device and dtype, equal to ``layer`` in output.

        Raises:
            ValueError: If ``layer`` is not a supported ``nn.Conv2d`` or ``rows`` is invalid
                (:class:`UnsupportedForwardError` for a subclass with its own ``forward``).

        Example:
            >>> depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            >>> sparse = RowSparseConv2d.from_dense(depthwise, torch.tensor([3, 1]))
            >>> tuple(sparse.weight_rows.shape), sparse.groups
            ((2, 1, 3, 3), 4)
        """
        return cls(layer, rows)


class MaskedLinear(_LinearOps, _Masked):
    """``nn.Linear`` whose trainable weight is an arbitrary subset of entries.

    Attributes:
        weight_old: Frozen full weight ``[out, in]`` (non-persistent buffer).
        indices: Sorted flat indices of the trainable entries (non-persistent buffer).
        weight_values: Trainable current values of those entries, ``[nnz]``.
        bias: The dense layer's bias Parameter (same object), or None.
    """

    @classmethod
    def from_dense(cls, layer: nn.Linear, mask: torch.Tensor) -> MaskedLinear:
        """Build a masked copy of ``layer`` that trains only the entries where ``mask`` is True.

        Args:
            layer: The dense layer; its weight is copied and its bias Parameter reused.
            mask: Bool tensor of the weight's shape with at least one True entry.

        Returns:
            The masked layer on the layer's device and dtype, equal to ``layer`` in output.

        Raises:
            ValueError: If ``layer`` is not an ``nn.Linear`` or ``mask`` is invalid.
        """
        return cls(layer, mask)


class MaskedConv2d(_Conv2dOps, _Masked):
    """``nn.Conv2d`` (any groups, or timm's ``Conv2dSame``) whose trainable weight is a subset of entries.

    Attributes:
        weight_old: Frozen full weight ``[out, in/groups, kH, kW]`` (non-persistent buffer).
        indices: Sorted flat indices of the trainable entries (non-persistent buffer).
        weight_values: Trainable current values of those entries, ``[nnz]``.
        bias: The dense layer's bias Parameter (same object), or None.
    """

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, mask: torch.Tensor) -> MaskedConv2d:
        """Build a masked copy of ``layer`` that trains only the entries where ``mask`` is True.

        Args:
            layer: The dense layer (``nn.Conv2d`` with any groups and padding_mode='zeros', or timm's
                ``Conv2dSame``); its weight is copied and its bias Parameter reused.
            mask: Bool tensor of the weight's shape with at least one True entry.

        Returns:
            The masked layer on the layer's device and dtype, equal to ``layer`` in output.

        Raises:
            ValueError: If ``layer`` is not a supported ``nn.Conv2d`` or ``mask`` is invalid.
        """
        return cls(layer, mask)
