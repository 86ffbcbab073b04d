"""Swap dense ``nn.Linear``/``nn.Conv2d`` layers of a model for sparse ones and back, in place."""

from __future__ import annotations

import torch
from torch import nn

from lightning_sparta.sparse.layers import MaskedConv2d, MaskedLinear, RowSparseConv2d, RowSparseLinear

__all__ = ["SPARSE_LAYER_TYPES", "densify_", "sparse_modules", "sparsify_"]

SPARSE_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    RowSparseLinear,
    RowSparseConv2d,
    MaskedLinear,
    MaskedConv2d,
)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def _sparse_from(name: str, layer: nn.Module, selection: torch.Tensor) -> nn.Module:
    if isinstance(layer, nn.Linear):
        row_type, masked_type = RowSparseLinear, MaskedLinear
    elif isinstance(layer, nn.Conv2d):
        row_type, masked_type = RowSparseConv2d, MaskedConv2d
    else:
        raise ValueError(f"masks[{name!r}] must name an nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    if not isinstance(selection, torch.Tensor):
        raise ValueError(
            f"masks[{name!r}] must be a 1-D integer tensor of rows or a bool mask tensor, "
            f"got {type(selection).__name__}"
        )
    if selection.dtype == torch.bool:
        return masked_type.from_dense(layer, selection)
    return row_type.from_dense(layer, selection)


def sparsify_(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Replace the named dense layers of ``model`` by sparse layers, in place.

    All replacements are built and validated before the model is modified, so an error leaves the
    model untouched.

    Args:
        model: The model to modify.
        masks: Qualified module name (as in ``named_modules``) to selection: a 1-D integer tensor of
            row indices gives a :class:`RowSparseLinear`/:class:`RowSparseConv2d`; a bool tensor
            of the weight's shape gives a :class:`MaskedLinear`/:class:`MaskedConv2d`. Convs may be
            grouped or depthwise, or timm's ``Conv2dSame`` (its 'same' padding is kept).

    Returns:
        The new modules by name.

    Raises:
        ValueError: If a name is not a submodule of ``model``, names a module other than
            ``nn.Linear``/``nn.Conv2d`` (or one held by an ``nn.MultiheadAttention``, which reads
            the weight directly, or a subclass with its own ``forward`` such as timm's ``StdConv2d``:
            :class:`~lightning_sparta.sparse.layers.UnsupportedForwardError`), or its selection is invalid.
    """
    new_modules = {}
    for name, selection in masks.items():
        try:
            layer = model.get_submodule(name) if name else None
        except AttributeError:
            layer = None
        if layer is None:
            raise ValueError(f"masks names {name!r}, which is not a submodule of the model")
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"masks[{name!r}] is held by an nn.MultiheadAttention, which uses its weight directly "
                "rather than calling it; it cannot be sparsified"
            )
        new_modules[name] = _sparse_from(name, layer, selection)
    for name, new in new_modules.items():
        _replace(model, name, new)
    return new_modules


def sparse_modules(model: nn.Module) -> dict[str, nn.Module]:
    """List the sparse layers of ``model``.

    Args:
        model: The model to inspect.

    Returns:
        Each module of a type in :data:`SPARSE_LAYER_TYPES`, by qualified name.
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, SPARSE_LAYER_TYPES)}


def densify_(model: nn.Module) -> int:
    """Replace every sparse layer of ``model`` by its dense equivalent (``to_dense()``), in place.

    Args:
        model: The model to modify.

    Returns:
        The number of layers replaced.

    Raises:
        ValueError: If ``model`` itself is a sparse layer (it cannot replace itself; call
            ``model.to_dense()``).
    """
    found = sparse_modules(model)
    if "" in found:
        raise ValueError(f"model must contain the sparse layers, got a {type(model).__name__} itself")
    for name, module in found.items():
        _replace(model, name, module.to_dense())
    return len(found)
