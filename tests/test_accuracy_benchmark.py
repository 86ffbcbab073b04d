"""Tests for ``benchmarks/accuracy.py`` and the function it shares with the main job, ``run_transfer``.

The end-to-end test runs the benchmark's code path on fake, class-dependent Fashion-MNIST IDX files
(a few hundred examples, 2 epochs, 1 pretraining epoch) with the cache in ``tmp_path``, so it
touches neither the real data nor the user's cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shlex
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import lightning_sparta.demo
from lightning_sparta.demo import TransferConfig, run_transfer
from lightning_sparta.demo import data as demo_data

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 1200, 200  # 600 / 100 examples per five-class split


def _load(path: Path, name: str) -> ModuleType:
    """Import a script by path (``benchmarks``/``examples`` are not packages; opacus ships packages so named)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load(ROOT / "benchmarks" / "accuracy.py", "accuracy_benchmark_under_test")


def _idx_bytes(array: torch.Tensor) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.contiguous().numpy().tobytes()


def _write_fake(directory: Path) -> Path:
    """Flat IDX files of 28×28 images: noise plus a bright 6×6 block whose position encodes the label."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        g = torch.Generator().manual_seed(seed)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        images = torch.randint(0, 96, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, label in enumerate(labels.tolist()):
            row, col = 2 + 12 * (label // 5), 2 + 5 * (label % 5)
            images[i, row : row + 6, col : col + 4] = 255
        (directory / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(images))
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    return directory


@pytest.fixture
def fake_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake data in ``tmp_path``, an empty cache there, and no system data directory."""
    monkeypatch.setenv("LIGHTNING_SPARTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_data, "SYSTEM_DATA_DIRS", (str(tmp_path / "system"),))
    return _write_fake(tmp_path / "fmnist")


# ---------------------------------------------------------------------------------------- run_transfer
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trainable_fraction": 1.5}, "`trainable_fraction`"),
        ({"trainable_fraction": 0}, "`trainable_fraction`"),
        ({"epsilon": -1.0}, "`epsilon`"),
        ({"delta": 1.0}, "`delta`"),
        ({"epochs": 2, "mask_epoch": 2}, "`mask_epoch`"),
        ({"selector": "nope"}, "`selector`"),
        ({"selector": "oracle"}, "`allow_non_private=True`"),
        ({"batch_size": 600, "train_subset": 500}, "`batch_size`"),
        ({"physical_batch_size": 0}, "`physical_batch_size`"),
        ({"seed": -1}, "`seed`"),
        ({"warmup": "half"}, "`warmup`"),
        ({"logger": "yes"}, "`logger`"),
    ],
)
def test_transfer_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TransferConfig(**kwargs)


def test_run_transfer_rejects_bad_config_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("run_transfer went on with a bad config")

    monkeypatch.setattr("lightning_sparta.demo.transfer.pretrain_public", fail)
    config = TransferConfig()
    config.mask_epoch = 8  # a field changed after construction is checked again
    with pytest.raises(ValueError, match=r"`mask_epoch` must be an integer in \[0, epochs\) = \[0, 8\), got 8"):
        run_transfer(config)
    config = TransferConfig()
    config.trainable_fraction = 2.0
    with pytest.raises(ValueError, match="`trainable_fraction`"):
        run_transfer(config)
    with pytest.raises(TypeError, match="`config` must be a TransferConfig"):
        run_transfer({"epsilon": 2.0})  # type: ignore[arg-type]


def test_main_job_front_end_defaults_are_the_config_defaults() -> None:
    example = _load(ROOT / "examples" / "fashion_mnist_sparta.py", "fashion_mnist_sparta_under_test")
    assert example.config_from_args(example.parse_args([])) == TransferConfig.preset("efficientnet_lite0")
    assert example.config_from_args(example.parse_args(["--model", "gn_cnn"])) == TransferConfig()
    config = example.config_from_args(
        example.parse_args(["--epsilon", "4", "--selector", "magnitude", "--no-progress-bar", "--train-subset", "900"])
    )
    assert (config.epsilon, config.selector, config.progress_bar, config.train_subset) == (4.0, "magnitude", False, 900)
    with pytest.raises(SystemExit):  # a bad option is a command-line error, not a traceback
        example.main(["--mask-epoch", "9"])


# ---------------------------------------------------------------------------------------- the benchmark
def test_benchmark_plan_and_arguments(bench: ModuleType) -> None:
    full = bench.parse_args([])
    runs = bench.plan(full)
    # 8 methods × 3 seeds, then sparta and magnitude at 4 more fractions × 3 seeds (0.2 is reused).
    assert len(runs) == 8 * 3 + 2 * 4 * 3
    assert len({r["key"] for r in runs}) == len(runs)
    assert full.out_prefix.endswith("accuracy_cpu")
    quick = bench.parse_args(["--quick"])
    assert quick.out_prefix.endswith("accuracy_quick")
    assert len(full.seeds) >= 3  # the method table needs at least 3 seeds
    assert len(quick.seeds) < len(full.seeds)
    assert quick.train_subset < full.train_subset
    assert quick.epochs <= full.epochs
    assert len(bench.plan(quick)) < len(runs)
    # Schedules: the SPARTA schedule for the scored/random masks, epoch 0 for fixed sets and MP.
    assert [bench.method_mask_epoch(m, 2) for m in bench.METHODS] == [2, 0, 0, 0, 0, 2, 2, 2]
    bad_command_lines = (
        ["--methods", "sparta,nope"],
        ["--fractions", "0.2,1.5"],
        ["--seeds", "0,0"],
        ["--epochs", "2", "--mask-epoch", "2"],
        ["--epochs", "3", "--mask-epoch", "2"],  # SPARTA's mask would be scored in the last epoch, never trained
        ["--sweep-methods", "all"],  # a fixed set has no fraction
        ["--train-subset", "400"],  # fewer examples than the batch size (500)
    )
    for bad in bad_command_lines:
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    bench.parse_args(["--methods", "all,bitfit", "--fractions", "", "--epochs", "3", "--mask-epoch", "2"])


def test_benchmark_end_to_end(
    bench: ModuleType, fake_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "out" / "accuracy_test"
    argv = [
        "--methods", "sparta,oracle", "--seeds", "0", "--epochs", "2", "--mask-epoch", "0",
        "--train-subset", "300", "--batch-size", "60", "--physical-batch-size", "60",
        "--pretrain-epochs", "1", "--fraction", "0.2", "--fractions", "0.5",
        "--data-dir", str(fake_data), "--out-prefix", str(prefix),
    ]  # fmt: skip
    bench.main(argv)

    payload = json.loads(prefix.with_suffix(".json").read_text())
    runs = {r["key"]: r for r in payload["runs"]}
    assert set(runs) == {"sparta|0.2|0", "oracle|0.2|0", "sparta|0.5|0", "magnitude|0.5|0"}
    for key, run in runs.items():
        assert "error" not in run, (key, run.get("error"))
        assert 0.0 <= run["test_acc"] <= 1.0
        assert run["train_size"] == 300
        assert run["test_size"] == 100
        assert run["steps"] == 2 * run["steps_per_epoch"] == 2 * 5  # 300 / 60 Poisson steps per epoch
        assert math.isfinite(run["epsilon_dp_sgd"])
        assert 1.9 <= run["epsilon_dp_sgd"] <= 2.0
    for key in ("sparta|0.2|0", "sparta|0.5|0", "magnitude|0.5|0"):
        assert runs[key]["private"] is True
        assert runs[key]["non_private_method"] is False
        assert 1.9 <= runs[key]["epsilon"] <= 2.0  # calibrated to the target, never above it
    oracle = runs["oracle|0.2|0"]
    assert oracle["epsilon"] == "inf"
    assert oracle["private"] is False
    assert oracle["non_private_method"] is True
    assert oracle["privacy"].startswith("NON-PRIVATE")
    assert payload["non_private_methods"] == ["oracle"]
    assert "non-private" in oracle["non_private_reason"]
    # Same σ for every method (same T, q and ε); more rows kept means more trainable parameters.
    assert len({run["noise_multiplier"] for run in runs.values()}) == 1
    assert runs["sparta|0.2|0"]["trainable_params"] < runs["sparta|0.5|0"]["trainable_params"]
    assert runs["sparta|0.5|0"]["trainable_param_fraction"] < 1.0
    assert (runs["sparta|0.2|0"]["mask_epoch"], runs["magnitude|0.5|0"]["mask_epoch"]) == (0, 0)
    assert payload["settings"]["train_subset"] == 300
    assert payload["machine"]["cpu"]

    text = prefix.with_suffix(".md").read_text()
    assert "oracle (NON-PRIVATE)" in text
    assert "**NON-PRIVATE**" in text
    assert f"{100 * runs['sparta|0.2|0']['test_acc']:.2f} (1 seed)" in text
    assert f"| {runs['sparta|0.2|0']['epsilon']:.3f} |" in text
    assert "Machine: CPU " in text
    assert "--methods sparta,oracle" in text
    assert "| magnitude | 0.5 |" in text
    png = prefix.with_name(prefix.name + "_vs_fraction.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000
    assert f"]({png.name})" in text

    # --resume runs nothing that is already there (a call to run_transfer would be recorded as an error).
    def fail(*args, **kwargs):
        raise AssertionError("--resume ran a run that was already in the JSON")

    monkeypatch.setattr(lightning_sparta.demo, "run_transfer", fail)
    again = bench.main([*argv, "--resume"])
    assert [r["key"] for r in again["runs"]] == [r["key"] for r in payload["runs"]]
    assert all("error" not in r for r in again["runs"])
    assert again["command"] == payload["command"]
    assert again["updated"] == payload["updated"]  # nothing ran: only the report was rebuilt
    assert again["resumed_with"] == []
    with pytest.raises(SystemExit):  # other settings: refuse to mix them with the stored runs
        bench.main([*argv, "--resume", "--epsilon", "4"])


def test_benchmark_report_statistics_and_failures(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tables from known per-run results (a stand-in for run_transfer): means, stds, ε, failures."""
    seen: list[TransferConfig] = []

    def fake_run_transfer(config: TransferConfig) -> dict:
        seen.append(config)
        if config.selector == "last":
            raise RuntimeError("boom")
        oracle = config.selector == "oracle"
        return {
            "test_acc": 0.5 + 0.1 * config.seed + (0.01 if config.trainable_fraction == 0.5 else 0.0),
            "test_loss": 1.0,
            "epsilon": math.inf if oracle else 1.99 + 0.001 * config.seed,
            "epsilon_dp_sgd": 1.99,
            "delta": config.delta,
            "private": not oracle,
            "non_private_reason": "oracle mask" if oracle else None,
            "noise_multiplier": 1.5,
            "sample_rate": 0.05,
            "steps": 160,
            "steps_per_epoch": 20,
            "train_size": config.train_subset,
            "test_size": 5000,
            "trainable_params": 1000,
            "total_params": 4000,
            "trainable_param_fraction": 0.25,
            "wall_time_s": 10.0 + config.seed,
            "fit_time_s": 9.0,
            "log_dir": None,
            "global_rank": 0,
        }

    monkeypatch.setattr(lightning_sparta.demo, "run_transfer", fake_run_transfer)
    monkeypatch.setattr(lightning_sparta.demo, "pretrain_public", lambda *args, **kwargs: tmp_path / "weights.pt")
    prefix = tmp_path / "acc"
    level = logging.getLogger("lightning.pytorch").level
    argv = ["--methods", "sparta,last,magnitude,oracle", "--seeds", "0,1,2", "--fractions", "0.5"]
    argv += ["--out-prefix", str(prefix)]
    payload = bench.main(argv)
    # 4 methods × 3 seeds, then sparta and magnitude at 0.5 × 3 seeds; every config as the schedules say.
    assert len(seen) == len(payload["runs"]) == 4 * 3 + 2 * 3
    by_selector = {c.selector: c for c in seen}
    assert (by_selector["sparta"].mask_epoch, by_selector["oracle"].mask_epoch) == (2, 2)
    assert (by_selector["magnitude"].mask_epoch, by_selector["last"].mask_epoch) == (0, 0)
    assert by_selector["oracle"].allow_non_private is True
    assert by_selector["sparta"].allow_non_private is False
    assert {(c.epochs, c.train_subset, c.epsilon, c.batch_size, c.lr) for c in seen} == {(8, 10000, 2.0, 500, 0.1)}
    assert {c.pretrain_seed for c in seen} == {0}

    text = prefix.with_suffix(".md").read_text()
    sparta_row = next(line for line in text.splitlines() if line.startswith("| sparta |"))
    assert "| 60.00 ± 10.00 | 3 | 1.992 |" in sparta_row  # accuracies 0.5, 0.6, 0.7; ε the largest of the seeds
    assert "1,000 (25.0%) | 11 |" in sparta_row  # mean wall time 10, 11, 12 s
    oracle_row = next(line for line in text.splitlines() if line.startswith("| oracle (NON-PRIVATE) |"))
    assert "∞, **NON-PRIVATE** mask (DP-SGD steps alone: 1.990)" in oracle_row
    assert "failed: RuntimeError: boom" in next(line for line in text.splitlines() if line.startswith("| last |"))
    assert "| sparta | 0.5 | 61.00 ± 10.00 | 3 | 25.0% |" in text
    assert "## Failed runs" in text
    stored = json.loads(prefix.with_suffix(".json").read_text())
    assert sum("error" in r for r in stored["runs"]) == 3
    assert prefix.with_name("acc_vs_fraction.png").is_file()
    assert logging.getLogger("lightning.pytorch").level == level  # the quiet mode does not outlive main()

    # --resume runs what is missing and what failed, nothing else.
    stored["runs"] = [r for r in stored["runs"] if r["key"] != "sparta|0.5|1"]
    prefix.with_suffix(".json").write_text(json.dumps(stored))
    before = len(seen)
    again = bench.main([*argv, "--resume"])
    assert sorted((c.selector, c.seed) for c in seen[before:]) == [("last", 0), ("last", 1), ("last", 2), ("sparta", 1)]
    assert seen[-1].trainable_fraction == 0.5
    assert len(again["runs"]) == len(payload["runs"])
    assert again["command"] == payload["command"]
    assert again["resumed_with"] == [shlex.join(["python", "benchmarks/accuracy.py", *argv, "--resume"])]
    assert "; resumed with `python benchmarks/accuracy.py" in prefix.with_suffix(".md").read_text()
