"""Non-private pretraining on the public Fashion-MNIST classes, cached on disk (stands in for downloads)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_sparta.demo.data import FashionMNISTTransfer, default_cache_dir
from lightning_sparta.demo.models import ClassifierModule, create_model

__all__ = ["PUBLIC_NUM_CLASSES", "load_pretrained", "pretrain_public", "pretrained_path"]

#: Number of classes of the public pretraining task (Fashion-MNIST classes 0-4).
PUBLIC_NUM_CLASSES = 5


def pretrained_path(
    model_name: str,
    epochs: int,
    image_size: int = 28,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where :func:`pretrain_public` stores (or finds) a pretrained ``state_dict``.

    Args:
        model_name: Name given to :func:`~lightning_sparta.demo.models.create_model`.
        epochs: Number of pretraining epochs.
        image_size: Side of the input images.
        seed: Pretraining seed.
        cache_dir: Base cache folder; :func:`~lightning_sparta.demo.data.default_cache_dir` when None.

    Returns:
        ``<cache_dir>/pretrained/<model_name>_<image_size>_e<epochs>_s<seed>.pt``.

    Example:
        >>> pretrained_path("gn_cnn", epochs=3, cache_dir="/tmp/c").as_posix()
        '/tmp/c/pretrained/gn_cnn_28_e3_s0.pt'
    """
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / "pretrained" / f"{model_name}_{image_size}_e{epochs}_s{seed}.pt"


def pretrain_public(
    model_name: str = "gn_cnn",
    data_dir: str | None = None,
    epochs: int = 3,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = 28,
    seed: int = 0,
    accelerator: str = "cpu",
) -> Path:
    """Pretrain a model without privacy on the public split (classes 0-4) and cache its weights.

    Trains ``create_model(model_name, 5, image_size)`` with :class:`ClassifierModule` (SGD, lr 0.05,
    momentum 0.9, cosine schedule; a short warm-up for ViTs) on one device, evaluates it on the public
    test split, and saves the model's ``state_dict()`` atomically. If the file exists already it is
    returned without training. Call it from a single process (before launching DDP) or let every process
    compute the same file: the write is atomic.

    Args:
        model_name: Name given to :func:`~lightning_sparta.demo.models.create_model`.
        data_dir: Optional folder with the Fashion-MNIST files (see
            :class:`~lightning_sparta.demo.data.FashionMNISTTransfer`).
        epochs: Number of pretraining epochs.
        cache_dir: Base cache folder; :func:`~lightning_sparta.demo.data.default_cache_dir` when None.
        image_size: Side of the input images.
        seed: Seed for initialisation and shuffling.
        accelerator: Lightning accelerator for the pretraining run.

    Returns:
        Path of the saved ``state_dict`` (see :func:`pretrained_path`).

    Raises:
        ValueError: If ``epochs`` is not positive or ``model_name`` is unknown.
        FileNotFoundError: If the Fashion-MNIST files cannot be found or downloaded.
    """
    if epochs < 1:
        raise ValueError(f"`epochs` must be a positive integer, got {epochs!r}.")
    path = pretrained_path(model_name, epochs, image_size=image_size, seed=seed, cache_dir=cache_dir)
    if path.is_file():
        rank_zero_info(f"Pretrained {model_name!r} weights found in the cache: {path} (not retraining).")
        return path

    L.seed_everything(seed, verbose=False)
    model = create_model(model_name, PUBLIC_NUM_CLASSES, image_size=image_size)
    is_vit = model_name.startswith("vit")
    module = ClassifierModule(
        model,
        num_classes=PUBLIC_NUM_CLASSES,
        lr=0.01 if is_vit else 0.05,
        weight_decay=5e-5,
        warmup_epochs=min(0.5, epochs / 4) if is_vit else 0.0,
    )
    datamodule = FashionMNISTTransfer(data_dir=data_dir, split="public", image_size=image_size, batch_size=128)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    test_acc = results[0].get("test_acc", float("nan")) if results else float("nan")
    rank_zero_info(
        f"Pretrained {model_name!r} on public Fashion-MNIST for {epochs} epoch(s) in {elapsed:.1f}s; "
        f"public test accuracy {test_acc:.4f}."
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    rank_zero_info(f"Saved pretrained weights to {path}.")
    return path


def load_pretrained(model_name: str, num_classes: int, path: str | os.PathLike, image_size: int = 28) -> nn.Module:
    """Create a model, load public pretrained weights and give it a fresh head for the private task.

    Args:
        model_name: Name given to :func:`~lightning_sparta.demo.models.create_model`.
        num_classes: Number of classes of the new (freshly initialised) head.
        path: A ``state_dict`` saved by :func:`pretrain_public`.
        image_size: Side of the input images (must match the pretraining run for ViTs).

    Returns:
        The model with pretrained features and a new ``num_classes``-way classifier.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`path`={str(path)!r} is not a file. HINT: create it with `pretrain_public({model_name!r})`."
        )
    model = create_model(model_name, PUBLIC_NUM_CLASSES, image_size=image_size)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict)
    model.reset_classifier(num_classes)
    return model
