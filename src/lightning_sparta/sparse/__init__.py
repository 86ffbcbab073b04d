"""Sparse fine-tuning layers, their Opacus per-sample gradient samplers and model swap helpers.

Importing this package registers the grad samplers with Opacus.
"""

from lightning_sparta.sparse import grad_samplers  # noqa: F401  (registers the samplers)
from lightning_sparta.sparse.layers import MaskedConv2d, MaskedLinear, RowSparseConv2d, RowSparseLinear
from lightning_sparta.sparse.swap import SPARSE_LAYER_TYPES, densify_, sparse_modules, sparsify_

__all__ = [
    "SPARSE_LAYER_TYPES",
    "MaskedConv2d",
    "MaskedLinear",
    "RowSparseConv2d",
    "RowSparseLinear",
    "densify_",
    "sparse_modules",
    "sparsify_",
]

# Mask selectors (sparse/selectors.py), appended by the selector work.
from lightning_sparta.sparse.selectors import (
    MaskSelector,
    get_selector,
    register_selector,
    registered_selectors,
)

__all__ += ["MaskSelector", "get_selector", "register_selector", "registered_selectors"]
