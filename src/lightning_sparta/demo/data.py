"""Fashion-MNIST as a "public" (classes 0-4), a "private" (classes 5-9) or a 10-class task, offline-first.

The files are read through :class:`torchvision.datasets.FashionMNIST`, which expects the uncompressed
IDX files under ``<root>/FashionMNIST/raw/``. :class:`FashionMNISTTransfer` finds them locally (a
user directory, the package cache, Debian's ``dataset-fashion-mnist``), builds that layout in the cache
when the files lie flat or gzipped, and only downloads as a last resort.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import FashionMNIST

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYSTEM_DATA_DIRS",
    "AugmentedViews",
    "FashionMNISTTransfer",
    "ReplicatedChannels",
    "default_cache_dir",
]

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
#: Per-channel RGB mean and standard deviation of ImageNet (inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Directories searched for flat (optionally gzipped) IDX files after ``data_dir`` and the cache.
SYSTEM_DATA_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)

_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_SPLIT_CLASSES = {"public": (0, 1, 2, 3, 4), "private": (5, 6, 7, 8, 9), "all": tuple(range(10))}
_NORMALIZATIONS = ("fashion_mnist", "imagenet")
_SPLIT_SEED = 20240607
_DEFAULT_VAL_SIZE = 5000


def default_cache_dir() -> Path:
    """Return the package's cache directory.

    ``$LIGHTNING_SPARTA_CACHE`` if set, else ``$XDG_CACHE_HOME/lightning_sparta`` (``~/.cache`` when
    ``XDG_CACHE_HOME`` is unset). Data lives in its ``fashion-mnist`` sub-folder, pretrained weights in
    ``pretrained``.

    Returns:
        The cache directory (not created).
    """
    env = os.environ.get("LIGHTNING_SPARTA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lightning_sparta"


def _torchvision_layout_complete(root: Path) -> bool:
    raw = root / "FashionMNIST" / "raw"
    return all((raw / name).is_file() for name in _RAW_FILES)


def _flat_sources(directory: Path) -> dict[str, Path] | None:
    """Map each raw file name to ``directory/<name>`` or ``directory/<name>.gz``; None if one is missing."""
    found: dict[str, Path] = {}
    for name in _RAW_FILES:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            return None
    return found


def _materialise(sources: dict[str, Path], root: Path) -> None:
    """Build ``root/FashionMNIST/raw`` from flat files: symlink plain ones, decompress gzipped ones.

    Each file is written atomically (temporary file + ``os.replace``) and rebuilt when its source is newer.
    """
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        dst = raw / name
        if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", dir=raw)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if src.suffix == ".gz":
                with gzip.open(src, "rb") as fin, tmp.open("wb") as fout:
                    shutil.copyfileobj(fin, fout, length=1 << 20)
            else:
                tmp.unlink()
                try:
                    tmp.symlink_to(src.resolve())
                except OSError:
                    shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()


def _linked_root(cache: Path, source_dir: Path) -> Path:
    """Per-source folder in the cache where the torchvision layout of ``source_dir`` is built."""
    digest = hashlib.sha1(str(source_dir.resolve()).encode()).hexdigest()[:12]
    return cache / "linked" / digest


def _to_unit(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Turn ``uint8 [N, H, W]`` images into ``float32 [N, 1, S, S]`` in [0, 1], resizing bilinearly if needed."""
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x


def _normalise(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Turn ``uint8 [N, H, W]`` images into normalised ``float32 [N, 1, S, S]``, resizing if needed."""
    return _to_unit(images, image_size).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)


class ReplicatedChannels(Dataset):
    """Grey images ``[N, 1, S, S]`` in [0, 1], served as ``[C, S, S]`` normalised per channel (e.g. ImageNet's).

    The grey channel is replicated ``len(mean)`` times and normalised item by item, so the images are held
    once, in one channel. ``images``, ``labels``, ``mean`` and ``std`` are public attributes.

    Example:
        >>> ds = ReplicatedChannels(torch.full((2, 1, 4, 4), 0.5), torch.tensor([3, 7]), (0.5, 0.0), (0.5, 0.25))
        >>> x, y = ds[1]
        >>> x.shape, x[:, 0, 0].tolist(), int(y)
        (torch.Size([2, 4, 4]), [0.0, 2.0], 7)
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"`images` must have shape [N, 1, S, S], got {tuple(images.shape)}.")
        if len(images) != len(labels):
            raise ValueError(f"`images` ({len(images)}) and `labels` ({len(labels)}) differ in length.")
        if len(mean) != len(std):
            raise ValueError(f"`mean` and `std` must have one entry per channel, got {mean} and {std}.")
        self.images = images
        self.labels = labels
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._mean = torch.tensor(mean, dtype=images.dtype).view(-1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(std, dtype=images.dtype).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.images[index] - self._mean) * self._inv_std, self.labels[index]


class AugmentedViews(Dataset):
    """``views`` randomly augmented copies of every image, stacked: ``([views, C, S, S], label)``.

    Each view is shifted by up to ``S // 8`` pixels in each direction (edges replicated) and flipped
    horizontally with probability 1/2, drawn from torch's generator, for
    ``DPStrategy(augmentation_multiplicity=views)``.

    Example:
        >>> ds = AugmentedViews(TensorDataset(torch.ones(2, 1, 8, 8), torch.tensor([3, 7])), views=4)
        >>> x, y = ds[1]
        >>> tuple(x.shape), int(y)
        ((4, 1, 8, 8), 7)
    """

    def __init__(self, dataset: Dataset, views: int) -> None:
        if not isinstance(views, int) or isinstance(views, bool) or views < 1:
            raise ValueError(f"`views` must be a positive integer, got {views!r}.")
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.dataset[index]
        size = image.shape[-1]
        pad = max(1, size // 8)
        padded = F.pad(image, (pad, pad, pad, pad), mode="replicate")  # the border's colour, not the mean's
        views = []
        for _ in range(self.views):
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            view = padded[..., top : top + size, left : left + size]
            views.append(view.flip(-1) if torch.rand(()) < 0.5 else view)
        return torch.stack(views), label


class FashionMNISTTransfer(L.LightningDataModule):
    """Fashion-MNIST as a public pretraining task, a private fine-tuning task, or all ten classes.

    ``split="public"`` keeps classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat) with their labels;
    ``split="private"`` keeps classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) relabelled to 0-4;
    ``split="all"`` keeps the ten classes (``num_classes`` is 5 or 10 accordingly).
    Test data is the official test split; a validation split is held out from the training split with a
    fixed seed: 5000 examples, or 10% of ``train_subset`` when a subset is used (in both cases at most a
    fifth of the available training examples).

    With ``channels=1`` (and ``normalization="fashion_mnist"``) images are normalised with the Fashion-MNIST
    mean and standard deviation and held in memory as ``TensorDataset`` s of shape ``[N, 1, S, S]``. With
    ``channels=3`` (the input of ImageNet models) the grey image is replicated to RGB and normalised per
    channel (``normalization="imagenet"``: ImageNet's mean and standard deviation) item by item, from one
    stored channel (:class:`ReplicatedChannels`).

    The files are looked for in this order: ``data_dir`` (either the torchvision layout
    ``FashionMNIST/raw/`` or flat, optionally gzipped, IDX files), the cache
    (:func:`default_cache_dir` ``/fashion-mnist``), Debian's ``dataset-fashion-mnist`` location
    (:data:`SYSTEM_DATA_DIRS`); flat files are exposed to torchvision through a folder in the cache.
    If nothing is found and ``download=True``, torchvision downloads into the cache.

    Args:
        data_dir: Optional folder with the Fashion-MNIST IDX files.
        split: ``"public"`` (classes 0-4), ``"private"`` (classes 5-9, relabelled 0-4) or ``"all"``.
        batch_size: Batch size of all dataloaders.
        num_workers: Dataloader worker processes.
        train_subset: Optional cap on the number of training examples, chosen deterministically.
        download: Whether to download the data when no local copy is found.
        image_size: Side of the (square) images; other than 28 resizes bilinearly (e.g. 32 for ViTs).
        channels: ``1`` (grey) or ``3`` (grey replicated to RGB).
        normalization: ``"fashion_mnist"`` (its mean and std, every channel) or ``"imagenet"`` (ImageNet's
            per-channel RGB mean and std; needs ``channels=3``).
        views: Training samples served as this many augmented views each (:class:`AugmentedViews`), for
            ``DPStrategy(augmentation_multiplicity=views)``; ``1``: the images as they are.

    Raises:
        ValueError: On an unknown ``split`` or ``normalization``, a non-positive ``batch_size``,
            ``train_subset`` or ``image_size``, a negative ``num_workers``, ``channels`` other than 1 or 3,
            or ImageNet normalisation of grey images.
    """

    num_classes: int = 5

    def __init__(
        self,
        data_dir: str | None = None,
        split: Literal["public", "private"] = "private",
        batch_size: int = 256,
        num_workers: int = 0,
        train_subset: int | None = None,
        download: bool = True,
        image_size: int = 28,
        channels: int = 1,
        normalization: Literal["fashion_mnist", "imagenet"] = "fashion_mnist",
        views: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(views, int) or isinstance(views, bool) or views < 1:
            raise ValueError(f"`views` must be a positive integer, got {views!r}.")
        if split not in _SPLIT_CLASSES:
            raise ValueError(f"`split` must be one of {sorted(_SPLIT_CLASSES)}, got {split!r}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}.")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"`train_subset` must be None or a positive integer, got {train_subset!r}.")
        if image_size < 1:
            raise ValueError(f"`image_size` must be a positive integer, got {image_size!r}.")
        if channels not in (1, 3):
            raise ValueError(f"`channels` must be 1 or 3, got {channels!r}.")
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {list(_NORMALIZATIONS)}, got {normalization!r}.")
        if normalization == "imagenet" and channels != 3:
            raise ValueError("`normalization='imagenet'` normalises RGB images: it needs `channels=3`.")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.split = split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_subset = train_subset
        self.download = download
        self.image_size = image_size
        self.channels = channels
        self.normalization = normalization
        self.views = views
        self.num_classes = len(_SPLIT_CLASSES[split])
        self.classes: list[str] = [FashionMNIST.classes[c] for c in _SPLIT_CLASSES[split]]
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._root: Path | None = None

    @property
    def dims(self) -> tuple[int, int, int]:
        """Shape of one image: ``(channels, image_size, image_size)``."""
        return (self.channels, self.image_size, self.image_size)

    def resolve_root(self) -> Path:
        """Find (and if needed lay out or download) a root folder for ``torchvision.datasets.FashionMNIST``.

        Returns:
            A folder containing ``FashionMNIST/raw/`` with the four uncompressed IDX files.

        Raises:
            FileNotFoundError: If the files are found nowhere and downloading is disabled or fails.
        """
        if self._root is not None and _torchvision_layout_complete(self._root):
            return self._root
        cache = default_cache_dir() / "fashion-mnist"
        looked: list[str] = []

        candidates: list[Path] = []
        if self.data_dir is not None:
            candidates.append(Path(self.data_dir).expanduser())
        candidates.append(cache)
        candidates.extend(Path(d) for d in SYSTEM_DATA_DIRS)
        for i, directory in enumerate(candidates):
            if i == 1 and self.data_dir is not None:
                rank_zero_warn(f"`data_dir`={self.data_dir!r} holds no Fashion-MNIST IDX files; looking elsewhere.")
            looked.append(f"{directory / 'FashionMNIST' / 'raw'} (torchvision layout)")
            if _torchvision_layout_complete(directory):
                self._root = directory
                return directory
            looked.append(f"{directory} (flat IDX files, optionally .gz)")
            sources = _flat_sources(directory)
            if sources is not None:
                root = _linked_root(cache, directory)
                rank_zero_info(f"Fashion-MNIST: using the IDX files in {directory} (through {root}).")
                _materialise(sources, root)
                self._root = root
                return root

        download_error = "download=False"
        if self.download:
            rank_zero_info(f"Fashion-MNIST not found locally; downloading into {cache}.")
            try:
                FashionMNIST(str(cache), train=True, download=True)
                FashionMNIST(str(cache), train=False, download=True)
            except (RuntimeError, OSError) as err:
                download_error = f"download into {cache} failed: {type(err).__name__}: {err}"
            else:
                self._root = cache
                return cache
        places = "\n".join(f"  - {p}" for p in looked)
        raise FileNotFoundError(
            f"Fashion-MNIST files {list(_RAW_FILES)} not found (data_dir={self.data_dir!r}). Looked in:\n"
            f"{places}\nand did not download ({download_error}).\n"
            "HINT: install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), pass "
            "`data_dir`/`--data-dir` pointing to a folder with the IDX files, or allow `download=True` "
            "with internet access."
        )

    def prepare_data(self) -> None:
        """Locate, lay out or download the files (called by Lightning on one process per node)."""
        self.resolve_root()

    def _load_split(self, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's ``uint8 [N, 28, 28]`` images and relabelled labels."""
        dataset = FashionMNIST(str(root), train=train, download=False)
        images, labels = dataset.data, dataset.targets.long()
        classes = torch.tensor(_SPLIT_CLASSES[self.split])
        keep = torch.isin(labels, classes)
        return images[keep], labels[keep] - int(classes.min())

    def _dataset(self, images: torch.Tensor, labels: torch.Tensor) -> Dataset:
        """Resize and normalise ``uint8`` images into the dataset served to the model."""
        if self.channels == 1:
            return TensorDataset(_normalise(images, self.image_size), labels)
        if self.normalization == "imagenet":
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = (FASHION_MNIST_MEAN,) * 3, (FASHION_MNIST_STD,) * 3
        return ReplicatedChannels(_to_unit(images, self.image_size), labels, mean, std)

    def _val_size(self, pool: int) -> int:
        wanted = _DEFAULT_VAL_SIZE if self.train_subset is None else max(1, -(-self.train_subset // 10))
        return max(1, min(wanted, pool // 5))

    def setup(self, stage: str | None = None) -> None:
        """Load the split into memory once (all stages at the first call).

        Args:
            stage: Lightning stage; ignored, everything is loaded at once.
        """
        if self.train_set is not None:
            return
        root = self.resolve_root()
        images, labels = self._load_split(root, train=True)
        generator = torch.Generator().manual_seed(_SPLIT_SEED)
        perm = torch.randperm(len(labels), generator=generator)
        n_val = self._val_size(len(labels))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        # Resize only what is kept (a 10-class training split at 64 px would take 1 GB as floats).
        self.train_set = self._dataset(images[train_idx], labels[train_idx])
        if self.views > 1:  # DPStrategy(augmentation_multiplicity=views) clips each image over its views
            self.train_set = AugmentedViews(self.train_set, self.views)
        self.val_set = self._dataset(images[val_idx], labels[val_idx])
        self.test_set = self._dataset(*self._load_split(root, train=False))
        rank_zero_info(
            f"Fashion-MNIST {self.split} split ({', '.join(self.classes)}): train {len(self.train_set)}, "
            f"val {len(self.val_set)}, test {len(self.test_set)} images of shape {self.dims}."
        )

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("FashionMNISTTransfer: call `setup()` before asking for a dataloader.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (last batch kept)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (official test split) in a fixed order."""
        return self._loader(self.test_set, shuffle=False)
