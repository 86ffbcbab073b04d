"""The ImageNet BatchNorm example's code path, offline: a random-init timm ResNet-50 on a few tiny images."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_imagenet_batchnorm_example_runs_on_resnet50(tmp_path: Path) -> None:
    pytest.importorskip("lightning_sparta.privacy.batchnorm", reason="needs DPStrategy's frozen BatchNorm")
    example = _load_example("imagenet_batchnorm")
    argv = ["--model", "resnet50", "--no-pretrained", "--fake-data", "8", "--num-classes", "3", "--image-size", "32"]
    argv += ["--epochs", "2", "--mask-epoch", "1", "--batch-size", "4", "--physical-batch-size", "4"]
    argv += ["--accelerator", "cpu", "--output", str(tmp_path)]
    result = example.main(argv)
    assert 0.0 <= result["val_acc"] <= 1.0
    assert 0 < result["epsilon"] <= 2.0 + 1e-6
    assert math.isfinite(result["epsilon"])
    assert list(tmp_path.glob("imagenet_batchnorm_resnet50/version_0/events.out.tfevents.*"))


def test_imagenet_batchnorm_example_needs_data() -> None:
    example = _load_example("imagenet_batchnorm")
    with pytest.raises(SystemExit, match="--data-dir"):
        example.main(["--no-pretrained", "--model", "resnet18", "--accelerator", "cpu"])
