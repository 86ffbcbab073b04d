"""Tests for the offline demo: Fashion-MNIST splits on fake IDX files, models, classifier, pretraining."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sparta.demo import (
    ClassifierModule,
    FashionMNISTTransfer,
    GroupNormCNN,
    WarmupCosineSchedule,
    create_model,
    load_pretrained,
    pretrain_public,
)
from lightning_sparta.demo import data as demo_data

N_TRAIN, N_TEST = 400, 100  # 200 / 50 examples per five-class split


def _idx_bytes(array: torch.Tensor) -> bytes:
    """Serialise a uint8 tensor in the IDX format (magic 0x08 = unsigned byte, big-endian sizes)."""
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.contiguous().numpy().tobytes()


def _fake_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images whose first pixel encodes the original label (10 * label) and second the index."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 10).to(torch.uint8)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    images[:, 0, 0] = labels * 10
    images[:, 0, 1] = torch.arange(n) % 256
    images[:, 0, 2] = torch.arange(n) // 256
    return images, labels


def _write_fake(directory: Path, gz: bool = True, layout: str = "flat") -> Path:
    target = directory / "FashionMNIST" / "raw" if layout == "torchvision" else directory
    target.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        images, labels = _fake_split(n, seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            payload = _idx_bytes(array)
            if gz:
                with gzip.open(target / f"{name}.gz", "wb") as f:
                    f.write(payload)
            else:
                (target / name).write_bytes(payload)
    return directory


def _original_labels(dataset: torch.utils.data.TensorDataset) -> torch.Tensor:
    pixel = dataset.tensors[0][:, 0, 0, 0] * demo_data.FASHION_MNIST_STD + demo_data.FASHION_MNIST_MEAN
    return torch.round(pixel * 255 / 10).long()


def _indices(dataset: torch.utils.data.TensorDataset) -> torch.Tensor:
    pixels = torch.round(
        (dataset.tensors[0][:, 0, 0, 1:3] * demo_data.FASHION_MNIST_STD + demo_data.FASHION_MNIST_MEAN) * 255
    ).long()
    return pixels[:, 0] + 256 * pixels[:, 1]


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache and no system data directory, so only what a test writes is found."""
    monkeypatch.setenv("LIGHTNING_SPARTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_data, "SYSTEM_DATA_DIRS", (str(tmp_path / "system"),))
    return tmp_path


@pytest.fixture
def fake_dir(isolated: Path) -> Path:
    return _write_fake(isolated / "fmnist")


def _setup(**kwargs) -> FashionMNISTTransfer:
    dm = FashionMNISTTransfer(download=False, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(("split", "offset"), [("public", 0), ("private", 5)])
def test_split_relabelling_and_sizes(fake_dir: Path, split: str, offset: int) -> None:
    dm = _setup(data_dir=str(fake_dir), split=split)
    assert dm.num_classes == 5
    # 200 training examples of the split: validation is capped at a fifth of them.
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (160, 40, 50)
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        labels = dataset.tensors[1]
        assert labels.dtype == torch.long
        assert set(labels.tolist()) <= set(range(5))
        torch.testing.assert_close(_original_labels(dataset), labels + offset, rtol=0, atol=0)
    # Train and validation are disjoint and together cover the split.
    train_idx, val_idx = set(_indices(dm.train_set).tolist()), set(_indices(dm.val_set).tolist())
    assert not train_idx & val_idx
    assert len(train_idx | val_idx) == 200


def test_normalisation_and_shapes(fake_dir: Path) -> None:
    dm = _setup(data_dir=str(fake_dir), split="public")
    images = dm.train_set.tensors[0]
    assert images.shape == (160, 1, 28, 28)
    assert images.dtype == torch.float32
    raw, labels = _fake_split(N_TRAIN, seed=0)
    index = int(_indices(dm.train_set)[0])
    expected = (raw[index].float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(images[0, 0], expected)
    assert int(dm.train_set.tensors[1][0]) == int(labels[index])


def test_resize(fake_dir: Path) -> None:
    dm = _setup(data_dir=str(fake_dir), split="private", image_size=32)
    assert dm.train_set.tensors[0].shape[1:] == (1, 32, 32)
    assert dm.test_set.tensors[0].shape[1:] == (1, 32, 32)
    assert dm.dims == (1, 32, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 32, 32)
    assert len(x) == len(y)


def test_val_split_and_subset_are_deterministic(fake_dir: Path) -> None:
    first, second = (
        _setup(data_dir=str(fake_dir), split="public"),
        _setup(data_dir=str(fake_dir), split="public"),
    )
    assert torch.equal(_indices(first.val_set), _indices(second.val_set))
    assert torch.equal(_indices(first.train_set), _indices(second.train_set))

    sub_a = _setup(data_dir=str(fake_dir), split="public", train_subset=50)
    sub_b = _setup(data_dir=str(fake_dir), split="public", train_subset=50)
    assert (len(sub_a.train_set), len(sub_a.val_set)) == (50, 5)
    assert torch.equal(_indices(sub_a.train_set), _indices(sub_b.train_set))
    assert torch.equal(_indices(sub_a.val_set), _indices(sub_b.val_set))
    assert not set(_indices(sub_a.train_set).tolist()) & set(_indices(sub_a.val_set).tolist())


def test_dataloaders(fake_dir: Path) -> None:
    dm = _setup(data_dir=str(fake_dir), split="private", batch_size=64)
    train = dm.train_dataloader()
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert not train.drop_last
    assert sum(len(y) for _, y in train) == 160
    val = dm.val_dataloader()
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    assert isinstance(dm.test_dataloader().sampler, torch.utils.data.SequentialSampler)


@pytest.mark.parametrize(
    ("gz", "layout", "where"),
    [(False, "torchvision", "data_dir"), (False, "flat", "data_dir"), (True, "flat", "system")],
)
def test_file_lookup_layouts(isolated: Path, monkeypatch: pytest.MonkeyPatch, gz: bool, layout: str, where: str):
    if where == "system":
        _write_fake(isolated / "system", gz=gz, layout=layout)
        dm = _setup(split="public")
    else:
        _write_fake(isolated / "mine", gz=gz, layout=layout)
        dm = _setup(data_dir=str(isolated / "mine"), split="public")
    assert len(dm.test_set) == 50
    if layout == "torchvision":
        assert dm.resolve_root() == isolated / "mine"
    else:  # Flat files are exposed to torchvision through a folder in the cache.
        assert dm.resolve_root().is_relative_to(isolated / "cache" / "fashion-mnist")


def test_missing_files_error(isolated: Path) -> None:
    dm = FashionMNISTTransfer(data_dir=str(isolated / "nowhere"), split="public", download=False)
    with (
        pytest.warns(UserWarning, match="holds no Fashion-MNIST IDX files"),
        pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*cache.*system.*apt-get install dataset-fashion-mnist"),
    ):
        dm.prepare_data()


def test_data_dir_without_files_falls_back(isolated: Path) -> None:
    _write_fake(isolated / "system")
    with pytest.warns(UserWarning, match="`data_dir`=.*empty.*looking elsewhere"):
        dm = _setup(data_dir=str(isolated / "empty"), split="private")
    assert len(dm.test_set) == 50


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "secret"}, "`split` must be one of"),
        ({"batch_size": 0}, "`batch_size`"),
        ({"train_subset": 0}, "`train_subset`"),
        ({"image_size": 0}, "`image_size`"),
    ],
)
def test_datamodule_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FashionMNISTTransfer(**kwargs)


@pytest.mark.parametrize(("name", "image_size"), [("gn_cnn", 28), ("gn_cnn", 32), ("vit_tiny", 28), ("vit_tiny", 32)])
def test_create_model_shapes(name: str, image_size: int) -> None:
    model = create_model(name, num_classes=5, image_size=image_size)
    assert model(torch.randn(2, 1, image_size, image_size)).shape == (2, 5)
    assert isinstance(model.get_classifier(), nn.Linear)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    assert model(torch.randn(1, 1, image_size, image_size)).shape == (1, 3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_gn_cnn_size() -> None:
    model = GroupNormCNN(num_classes=5)
    assert 40_000 < sum(p.numel() for p in model.parameters()) < 100_000
    assert {type(m) for m in model.modules()} <= {
        GroupNormCNN,
        nn.Sequential,
        nn.Conv2d,
        nn.GroupNorm,
        nn.ReLU,
        nn.MaxPool2d,
        nn.Linear,
    }


def test_create_model_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"Unknown model `name`='resnet'.*'gn_cnn', 'vit_tiny'"):
        create_model("resnet", num_classes=5)


def test_warmup_cosine_schedule() -> None:
    schedule = WarmupCosineSchedule(warmup_steps=4, total_steps=14)
    factors = [schedule(s) for s in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert factors[9] == pytest.approx(0.5)
    assert factors[14:] == [0.0, 0.0]
    assert WarmupCosineSchedule(0, 10, cosine=False)(7) == 1.0


class _Fixed(L.LightningDataModule):
    def __init__(self, n: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dataset = torch.utils.data.TensorDataset(
            torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 5, (n,), generator=g)
        )
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size)

    test_dataloader = val_dataloader


def _trainer(**kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("batch_size", [4, 1])
def test_classifier_module_fit_step(batch_size: int) -> None:
    module = ClassifierModule(GroupNormCNN(num_classes=5))
    assert module.num_classes == 5  # inferred from the head
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _trainer(fast_dev_run=True)
    trainer.fit(module, datamodule=_Fixed(batch_size=batch_size))
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))
    trainer.test(module, datamodule=_Fixed(batch_size=batch_size), verbose=False)
    assert {"test_loss", "test_acc"} <= set(trainer.callback_metrics)


def test_classifier_optimizer_holds_frozen_parameters_and_schedule() -> None:
    model = GroupNormCNN(num_classes=5)
    for p in model.features.parameters():
        p.requires_grad_(False)
    module = ClassifierModule(model, num_classes=5, lr=0.1, warmup_epochs=1.0)
    trainer = _trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(module, datamodule=_Fixed(n=8, batch_size=4))  # 2 steps per epoch, 4 in all
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.parameters()}
    schedule = trainer.lr_scheduler_configs[0]
    assert schedule.interval == "step"
    # Warm-up over 2 steps (one epoch), cosine over the remaining 2: after the 4th step the factor is 0.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert schedule.scheduler.lr_lambdas[0].warmup_steps == 2
    assert schedule.scheduler.lr_lambdas[0].total_steps == 4


def test_classifier_module_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`num_classes` is None and cannot be inferred"):
        ClassifierModule(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"`lr` must be >= 0, got -1"):
        ClassifierModule(GroupNormCNN(5), lr=-1)


def test_pretrain_caches_and_loads(fake_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "models"
    path = pretrain_public("gn_cnn", data_dir=str(fake_dir), epochs=1, cache_dir=str(cache), seed=3)
    assert path == cache / "pretrained" / "gn_cnn_28_e1_s3.pt"
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    mtime = path.stat().st_mtime_ns
    again = pretrain_public("gn_cnn", data_dir=str(tmp_path / "absent"), epochs=1, cache_dir=str(cache), seed=3)
    assert again == path
    assert path.stat().st_mtime_ns == mtime

    model = load_pretrained("gn_cnn", num_classes=3, path=path)
    saved = torch.load(path, weights_only=True)
    torch.testing.assert_close(model.features[0].weight, saved["features.0.weight"])
    assert model.get_classifier().out_features == 3
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)

    with pytest.raises(FileNotFoundError, match=r"`path`=.*missing\.pt"):
        load_pretrained("gn_cnn", num_classes=3, path=tmp_path / "missing.pt")


def test_augmented_views_are_shifted_and_flipped_copies():
    """`AugmentedViews` serves K views of one image: each a shift of at most S/8 (edges replicated) of the image
    or of its mirror, drawn afresh; the label is kept."""
    from torch.utils.data import TensorDataset

    from lightning_sparta.demo.data import AugmentedViews

    torch.manual_seed(0)
    image = torch.arange(64, dtype=torch.float32).view(1, 8, 8) + 1
    views, label = AugmentedViews(TensorDataset(image[None], torch.tensor([4])), views=16)[0]
    assert views.shape == (16, 1, 8, 8)
    assert int(label) == 4
    padded = {"plain": torch.nn.functional.pad(image, (1, 1, 1, 1), mode="replicate")}
    padded["mirror"] = torch.nn.functional.pad(image.flip(-1), (1, 1, 1, 1), mode="replicate")
    crops = [p[..., i : i + 8, j : j + 8] for p in padded.values() for i in range(3) for j in range(3)]
    for view in views:
        assert any(torch.equal(view, crop) for crop in crops)
    assert len({tuple(v.flatten().tolist()) for v in views}) > 1
    with pytest.raises(ValueError, match="`views` must be a positive integer"):
        AugmentedViews(TensorDataset(image[None], torch.tensor([4])), views=0)
