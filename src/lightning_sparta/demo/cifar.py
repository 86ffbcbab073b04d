"""CIFAR-10/100 through torchvision and timm classifiers: the pieces of the paper's main experiment.

Section 6 of the SPARTA paper (Makni et al., KDD '25) fine-tunes ImageNet-pretrained DeiT models on
CIFAR-10 and CIFAR-100 with a fresh classifier head. This module holds the two reusable pieces of that
setting, used by ``examples/cifar_deit_sparta.py``:

* :class:`CIFARDataModule`: CIFAR-10/100 downloaded by torchvision, images resized to the model's
  input size and normalised with the model's pretrained statistics; or, with ``synthetic=True``, small
  generated images with class-dependent content (offline smoke runs and tests) that go through the
  same transforms.
* :class:`TimmClassifier`: :class:`~lightning_sparta.demo.ClassifierModule` (cross-entropy, SGD with
  momentum, linear warm-up + cosine schedule) around a timm model built from its name, so that a
  LightningCLI configures it from YAML or the command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import timm
import torch
from lightning.pytorch.utilities import rank_zero_info
from timm.data import resolve_model_data_config
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.transforms import InterpolationMode, v2

from lightning_sparta.demo.data import default_cache_dir
from lightning_sparta.demo.models import ClassifierModule

__all__ = [
    "CIFAR_NUM_CLASSES",
    "CIFARDataModule",
    "ImageTensorDataset",
    "TimmClassifier",
    "cifar_num_classes",
    "make_synthetic_images",
]

#: Number of classes of each supported data set.
CIFAR_NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100}
_CIFAR_CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}
_NATIVE_SIZE = 32  # CIFAR images are 32×32 RGB
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RESERVED_MODEL_KWARGS = ("model_name", "pretrained", "num_classes")


def cifar_num_classes(dataset: str) -> int:
    """Number of classes of ``"cifar10"`` or ``"cifar100"``.

    Args:
        dataset: The data set's name.

    Returns:
        10 or 100.

    Raises:
        ValueError: For another name.

    Example:
        >>> cifar_num_classes("cifar100")
        100
    """
    if dataset not in CIFAR_NUM_CLASSES:
        raise ValueError(f"`dataset` must be one of {sorted(CIFAR_NUM_CLASSES)}, got {dataset!r}.")
    return CIFAR_NUM_CLASSES[dataset]


def make_synthetic_images(
    num_samples: int, num_classes: int, image_size: int = _NATIVE_SIZE, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated RGB images whose content depends on the label: a stand-in for CIFAR without download.

    Each class has a fixed random low-resolution colour template (4×4, upsampled); an image is its
    class template plus per-pixel noise, so a classifier can learn the task. Labels cycle through
    the classes, so every class is present as soon as ``num_samples >= num_classes``.

    Args:
        num_samples: Number of images.
        num_classes: Number of classes.
        image_size: Side of the square images (CIFAR's 32 by default).
        seed: Seed of the templates and of the noise.

    Returns:
        ``uint8`` images ``[num_samples, 3, image_size, image_size]`` and ``int64`` labels ``[num_samples]``.

    Raises:
        ValueError: If an argument is not a positive integer (``seed``: non-negative).

    Example:
        >>> images, labels = make_synthetic_images(6, 3, image_size=8)
        >>> images.shape, images.dtype, labels.tolist()
        (torch.Size([6, 3, 8, 8]), torch.uint8, [0, 1, 2, 0, 1, 2])
    """
    _check_int("num_samples", num_samples, minimum=1)
    _check_int("num_classes", num_classes, minimum=1)
    _check_int("image_size", image_size, minimum=1)
    _check_int("seed", seed, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, 4, 4, generator=generator)
    templates = torch.nn.functional.interpolate(templates, size=(image_size, image_size), mode="nearest")
    labels = torch.arange(num_samples) % num_classes
    noise = torch.rand(num_samples, 3, image_size, image_size, generator=generator)
    images = 0.7 * templates[labels] + 0.3 * noise
    return (images * 255).round().clamp_(0, 255).to(torch.uint8), labels


class ImageTensorDataset(Dataset):
    """A map-style data set over in-memory ``uint8`` images ``[N, C, H, W]``, transformed per item.

    Args:
        images: ``uint8`` tensor ``[N, C, H, W]``.
        labels: Integer labels ``[N]``.
        transform: Applied to each ``[C, H, W]`` image (e.g. resize and normalise); identity when None.

    Raises:
        ValueError: If the shapes or dtypes do not match.

    Example:
        >>> dataset = ImageTensorDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
        >>> len(dataset), dataset[1][0].shape, dataset[1][1]
        (2, torch.Size([3, 4, 4]), 1)
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"`images` must be a uint8 tensor [N, C, H, W], got {images.dtype} of shape {tuple(images.shape)}."
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"`labels` must have shape [{images.shape[0]}] (one per image), got {tuple(labels.shape)}."
            )
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10 or CIFAR-100 for fine-tuning a pretrained model: resized and normalised for that model.

    The training split (50 000 images, less ``val_size`` held out for validation with a fixed seed) is
    the private data; the test split (10 000 images) is used by ``trainer.test``. The 32×32 images are
    resized to ``image_size`` (with ``interpolation``) and normalised with ``mean``/``std``; each of
    these left at ``None`` is taken from ``model_data_config`` (timm's
    :func:`~timm.data.resolve_model_data_config` of the model, which the example's LightningCLI links
    from :attr:`TimmClassifier.data_config`), and without one from ImageNet's defaults (224, bicubic,
    ImageNet mean and std). No augmentation.

    The data is downloaded by torchvision into ``data_dir`` (in :meth:`prepare_data`, on one process
    per node). ``synthetic=True`` replaces it with :func:`make_synthetic_images` (``synthetic_size``
    training and ``synthetic_test_size`` test images of 32×32, with the data set's number of classes),
    which goes through the same transforms and loaders: for smoke runs without internet.

    With :class:`~lightning_sparta.DPStrategy`, ``batch_size`` is the *expected* size of a Poisson
    logical batch (the sampling rate is ``batch_size / len(train set)``; the strategy rebuilds the
    training loader); ``eval_batch_size`` is the batch of the validation and test loaders.

    Args:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        data_dir: Download folder; :func:`~lightning_sparta.demo.default_cache_dir` ``/cifar`` when None.
        batch_size: Training batch size (the expected logical batch under DP).
        eval_batch_size: Batch size of the validation and test loaders.
        image_size: Side of the square model input; from ``model_data_config`` (or 224) when None.
        mean: Per-channel normalisation mean; from ``model_data_config`` (or ImageNet's) when None.
        std: Per-channel normalisation std; from ``model_data_config`` (or ImageNet's) when None.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``; from ``model_data_config``
            (or bicubic) when None.
        model_data_config: A timm data config (keys ``input_size``, ``mean``, ``std``,
            ``interpolation``), e.g. ``timm.data.resolve_model_data_config(model)``.
        val_size: Number of training images held out for validation (0: no validation).
        num_workers: Dataloader worker processes.
        download: Whether torchvision may download the data when it is missing.
        synthetic: Use generated images instead of CIFAR (offline).
        synthetic_size: Number of generated training images (``synthetic=True``).
        synthetic_test_size: Number of generated test images (``synthetic=True``).
        seed: Seed of the validation split and of the generated images.

    Raises:
        ValueError: For a bad argument (the message names it); at :meth:`setup` if ``val_size`` leaves
            fewer training images than ``batch_size``.
        FileNotFoundError: At :meth:`prepare_data` if the data is missing and ``download=False``.

    Example:
        >>> data = CIFARDataModule(synthetic=True, synthetic_size=40, synthetic_test_size=10, image_size=16,
        ...                        batch_size=8, eval_batch_size=5, num_workers=0)
        >>> data.prepare_data(); data.setup("fit")
        >>> x, y = next(iter(data.test_dataloader()))
        >>> data.num_classes, len(data.train_set), x.shape, x.dtype
        (10, 40, torch.Size([5, 3, 16, 16]), torch.float32)
    """

    def __init__(
        self,
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        data_dir: str | None = None,
        batch_size: int = 500,
        eval_batch_size: int = 500,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: Literal["bicubic", "bilinear", "nearest"] | None = None,
        model_data_config: dict[str, Any] | None = None,
        val_size: int = 0,
        num_workers: int = 4,
        download: bool = True,
        synthetic: bool = False,
        synthetic_size: int = 1000,
        synthetic_test_size: int = 200,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_classes = cifar_num_classes(dataset)
        if data_dir is not None and not isinstance(data_dir, (str, Path)):
            raise ValueError(f"`data_dir` must be a path or None, got {data_dir!r}.")
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("eval_batch_size", eval_batch_size, minimum=1)
        _check_int("val_size", val_size, minimum=0)
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("synthetic_size", synthetic_size, minimum=1)
        _check_int("synthetic_test_size", synthetic_test_size, minimum=1)
        _check_int("seed", seed, minimum=0)
        for name, flag in (("download", download), ("synthetic", synthetic)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be a bool, got {flag!r}.")
        config = _check_data_config(model_data_config)
        if image_size is None:
            image_size = int(config.get("input_size", (3, 224, 224))[-1])
        _check_int("image_size", image_size, minimum=1)
        self.image_size: int = image_size
        self.mean = _check_channels("mean", mean if mean is not None else config.get("mean", _IMAGENET_MEAN))
        self.std = _check_channels("std", std if std is not None else config.get("std", _IMAGENET_STD), positive=True)
        if interpolation is None:
            interpolation = config.get("interpolation") or "bicubic"
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"`interpolation` must be one of {list(_INTERPOLATIONS)} or None, got {interpolation!r}.")
        self.interpolation: str = interpolation
        self.dataset = dataset
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir() / "cifar"
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.download = download
        self.synthetic = synthetic
        self.synthetic_size = synthetic_size
        self.synthetic_test_size = synthetic_test_size
        self.seed = seed
        self.train_set: ImageTensorDataset | None = None
        self.val_set: ImageTensorDataset | None = None
        self.test_set: ImageTensorDataset | None = None

    @property
    def transform(self) -> v2.Compose:
        """The per-image transform: ``uint8 [3, 32, 32]`` to normalised ``float32 [3, S, S]``."""
        steps: list[Any] = []
        if self.image_size != _NATIVE_SIZE:
            mode = InterpolationMode(self.interpolation)
            steps.append(v2.Resize((self.image_size, self.image_size), interpolation=mode, antialias=True))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        return v2.Compose(steps)

    def prepare_data(self) -> None:
        """Download the data set with torchvision when it is missing (nothing to do when synthetic)."""
        if self.synthetic:
            return
        dataset_class = _CIFAR_CLASSES[self.dataset]
        for train in (True, False):
            try:
                dataset_class(str(self.data_dir), train=train, download=self.download)
            except RuntimeError as err:
                raise FileNotFoundError(
                    f"{self.dataset} not found in `data_dir`={str(self.data_dir)!r} (download={self.download}): "
                    f"{err} HINT: allow `download=True` with internet access, or use `synthetic=True` for an "
                    "offline smoke run."
                ) from err

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.synthetic:
            size = self.synthetic_size if train else self.synthetic_test_size
            return make_synthetic_images(size, self.num_classes, _NATIVE_SIZE, seed=self.seed + (0 if train else 1))
        dataset = _CIFAR_CLASSES[self.dataset](str(self.data_dir), train=train, download=False)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # [N, 32, 32, 3] -> [N, 3, 32, 32]
        return images, torch.as_tensor(dataset.targets, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits into memory (once, for every stage).

        Args:
            stage: Lightning stage; ignored, everything is loaded at the first call.

        Raises:
            ValueError: If ``val_size`` leaves fewer training images than ``batch_size``.
        """
        if self.train_set is not None:
            return
        images, labels = self._load(train=True)
        if len(labels) - self.val_size < self.batch_size:
            raise ValueError(
                f"`val_size`={self.val_size} leaves {len(labels) - self.val_size} of the {len(labels)} training "
                f"images, fewer than `batch_size`={self.batch_size}."
            )
        transform = self.transform
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :].sort().values
        self.train_set = ImageTensorDataset(images[train_idx], labels[train_idx], transform)
        self.val_set = ImageTensorDataset(images[val_idx], labels[val_idx], transform) if self.val_size else None
        self.test_set = ImageTensorDataset(*self._load(train=False), transform=transform)
        source = "synthetic images" if self.synthetic else f"{self.dataset} from {self.data_dir}"
        rank_zero_info(
            f"CIFARDataModule: {source}, {self.num_classes} classes: train {len(self.train_set)}, val "
            f"{self.val_size}, test {len(self.test_set)}; images resized to {self.image_size}×{self.image_size} "
            f"({self.interpolation}), mean {self.mean}, std {self.std}."
        )

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("CIFARDataModule: call `setup()` before asking for a dataloader.")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``batch_size`` (replaced by Poisson sampling under DPStrategy)."""
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches from the held-out training images; none (``[]``) when ``val_size=0``."""
        if self.val_size == 0:
            return []
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the test split in a fixed order."""
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)


class TimmClassifier(ClassifierModule):
    """:class:`~lightning_sparta.demo.ClassifierModule` around a timm model created from its name.

    The model is ``timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes,
    **model_kwargs)``: pretrained weights (downloaded by timm) with a freshly initialised classifier head
    of ``num_classes`` outputs, as in the paper's transfer experiments. Training is the parent's:
    cross-entropy, SGD with momentum over every parameter and a per-step linear warm-up of
    ``warmup_epochs`` followed by a cosine decay to 0.

    Models with BatchNorm are refused by :class:`~lightning_sparta.DPStrategy` when fitting starts (use
    ViT/DeiT or GroupNorm models); distilled DeiTs (two heads) are refused by
    :class:`~lightning_sparta.SpartaMaskCallback`, which needs a single ``get_classifier()`` module.

    Args:
        model_name: A timm model name (``timm.list_models()``), e.g. ``"deit_tiny_patch16_224"``, optionally
            with a pretrained tag (``"deit_small_patch16_224.fb_in1k"``).
        num_classes: Number of classes of the new head.
        pretrained: Load timm's pretrained weights (needs internet or timm's cache).
        model_kwargs: Extra keyword arguments of ``timm.create_model`` (e.g. ``{"img_size": 32,
            "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}`` for a small random ViT);
            must not contain ``model_name``, ``pretrained`` or ``num_classes``.
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_epochs: Length of the linear warm-up in epochs (may be fractional; 0 for none).
        cosine: Whether to decay the learning rate to 0 with a cosine after the warm-up.

    Raises:
        ValueError: For a bad argument (the message names it), or if timm cannot create the model.

    Example:
        >>> module = TimmClassifier("vit_tiny_patch16_224", num_classes=3, pretrained=False,
        ...                         model_kwargs={"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 48})
        >>> module(torch.zeros(2, 3, 16, 16)).shape, module.data_config["input_size"]
        (torch.Size([2, 3]), (3, 16, 16))
    """

    def __init__(
        self,
        model_name: str = "deit_tiny_patch16_224",
        num_classes: int = 10,
        pretrained: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_epochs: float = 1.0,
        cosine: bool = True,
    ) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"`model_name` must be a timm model name, got {model_name!r}.")
        if not timm.is_model(model_name):
            hint = timm.list_models(f"*{model_name.split('.')[0][:8]}*")[:10]
            raise ValueError(
                f"`model_name`={model_name!r} is not a timm model"
                + (f"; similar names: {hint}." if hint else ".")
                + " See `timm.list_models()`."
            )
        _check_int("num_classes", num_classes, minimum=1)
        if not isinstance(pretrained, bool):
            raise ValueError(f"`pretrained` must be a bool, got {pretrained!r}.")
        model_kwargs = dict(model_kwargs or {})
        if not all(isinstance(key, str) for key in model_kwargs):
            raise ValueError(f"`model_kwargs` must map argument names to values, got {model_kwargs!r}.")
        reserved = sorted(set(model_kwargs) & set(_RESERVED_MODEL_KWARGS))
        if reserved:
            raise ValueError(
                f"`model_kwargs` must not contain {reserved}: they are arguments of TimmClassifier itself "
                f"(`model_name`, `pretrained`, `num_classes`)."
            )
        # Checked before timm downloads and builds the model (the parent checks them again).
        for name, value in (
            ("lr", lr),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("warmup_epochs", warmup_epochs),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if not isinstance(cosine, bool):
            raise ValueError(f"`cosine` must be a bool, got {cosine!r}.")
        try:
            model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
        except (TypeError, ValueError, AssertionError) as err:
            raise ValueError(
                f"timm could not create `model_name`={model_name!r} with `model_kwargs`={model_kwargs}: {err}"
            ) from err
        super().__init__(
            model,
            num_classes=num_classes,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            cosine=cosine,
        )
        self.model_name = model_name

    @property
    def data_config(self) -> dict[str, Any]:
        """The model's input configuration: timm's ``resolve_model_data_config`` with the real input size.

        timm reports the pretrained configuration's input size (e.g. 224) even when ``img_size`` was
        overridden in ``model_kwargs``; the size of a ViT's patch embedding is used instead when the
        model has one.
        """
        config = dict(resolve_model_data_config(self.model))
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if isinstance(img_size, Sequence) and len(img_size) == 2 and img_size[0] == img_size[1]:
            config["input_size"] = (config["input_size"][0], int(img_size[0]), int(img_size[1]))
        return config


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")


def _check_channels(name: str, value: Any, positive: bool = False) -> tuple[float, float, float]:
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )
    if not ok or (positive and any(v <= 0 for v in value)):
        kind = "three positive numbers" if positive else "three finite numbers"
        raise ValueError(f"`{name}` must be {kind} (one per RGB channel) or None, got {value!r}.")
    return (float(value[0]), float(value[1]), float(value[2]))


def _check_data_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"`model_data_config` must be a timm data config dict or None, got {config!r}.")
    input_size = config.get("input_size")
    if input_size is not None and (
        not isinstance(input_size, Sequence)
        or len(input_size) != 3
        or input_size[1] != input_size[2]
        or isinstance(input_size[-1], bool)
        or not isinstance(input_size[-1], int)
    ):
        raise ValueError(
            f"`model_data_config['input_size']` must be (channels, side, side) of a square input, got {input_size!r}."
        )
    if input_size is not None and input_size[0] != 3:
        raise ValueError(f"`model_data_config['input_size']` must have 3 (RGB) channels for CIFAR, got {input_size!r}.")
    return config
