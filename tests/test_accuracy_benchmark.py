"""Tests for ``benchmarks/accuracy.py`` and the function it shares with the main job, ``run_transfer``.

The benchmark's logic (arguments, method → config/callback options, the learning-rate search, the tables)
runs against a stand-in for ``run_transfer``; one end-to-end test runs the real code path on fake,
class-dependent Fashion-MNIST IDX files (a few hundred examples, the small ``gn_cnn`` model, 2 epochs) with
the cache in ``tmp_path``, so it touches neither the real data nor the user's cache.
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
        ({"clipping": "fast"}, "`clipping`"),
        ({"test_subset": 0}, "`test_subset`"),
        ({"scoring_epochs": 4, "mask_epoch": 2}, "`scoring_epochs`"),
        ({"scoring_epochs": 0}, "`scoring_epochs`"),
        ({"selector": "all", "train_while_scoring": True}, "`train_while_scoring`"),
        ({"selector": "magnitude", "scoring_epochs": 2}, "`train_while_scoring`/`scoring_epochs`"),
        ({"train_while_scoring": 1}, "`train_while_scoring`"),
        ({"logger": "yes"}, "`logger`"),
        ({"ema_decay": 1.0}, "`ema_decay`"),
        ({"ema_decay": 0}, "`ema_decay`"),
        ({"ema_decay": True}, "`ema_decay`"),
        ({"augmentation_multiplicity": 0}, "`augmentation_multiplicity`"),
        ({"augmentation_multiplicity": 2.0}, "`augmentation_multiplicity`"),
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
def test_benchmark_arguments(bench: ModuleType) -> None:
    full = bench.parse_args([])
    assert full.model == "efficientnet_lite0"
    assert full.out_prefix.endswith("accuracy_effnet")
    assert full.methods == [
        "sparta",
        "sparta_tws",
        "sparta_tws_k",
        "all",
        "magnitude",
        "bitfit",
        "layers",
        "random",
    ]  # no "last": on EfficientNet-Lite0 it trains exactly bitfit's set (convs have no biases)
    assert len(full.seeds) >= 3
    assert len(full.lrs) == 3
    assert (full.epochs, full.mask_epoch) == (5, 1)  # the paper's T0/T = 1/5
    assert (full.epsilon, full.delta) == (2.0, 1e-5)
    # The search: every method × rate at the first seed; the table: every method × seed (seed 0 reused).
    assert len(bench.tuning_plan(full)) == 8 * 3
    assert len(bench.table_plan(full, bench.choose_lrs([], full))) == 8 * 3
    quick = bench.parse_args(["--quick"])
    assert quick.out_prefix.endswith("accuracy_effnet_quick")
    assert len(quick.lrs) == 1
    assert bench.tuning_plan(quick) == []
    assert quick.epochs * quick.train_subset < full.epochs * full.train_subset
    assert bench.parse_args(["--levers"]).out_prefix.endswith("accuracy_effnet_levers")
    assert bench.parse_args(["--lr", "0.05"]).lrs == [0.05]
    gn = bench.parse_args(["--model", "gn_cnn"])  # the old benchmark keeps its names and single rate
    assert (gn.out_prefix.endswith("accuracy_cpu"), gn.lrs, gn.image_size) == (True, [0.1], 28)
    assert bench.parse_args(["--model", "gn_cnn", "--quick"]).out_prefix.endswith("accuracy_quick")
    bad_command_lines = (
        ["--methods", "sparta,nope"],
        ["--model", "resnet"],
        ["--fractions", "0.2,1.5"],
        ["--seeds", "0,0"],
        ["--lrs", "0.1,0.1"],
        ["--lrs", "0.1", "--lr", "0.1"],
        ["--epochs", "2", "--mask-epoch", "2"],
        ["--epochs", "3", "--mask-epoch", "2"],  # SPARTA's mask would be scored in the last epoch, never trained
        ["--sweep-methods", "all", "--fractions", "0.5"],  # a fixed set has no fraction
        ["--train-subset", "100"],  # fewer examples than the batch size
        ["--low-epsilon", "-1"],
        ["--low-epsilon-methods", "nope"],
    )
    for bad in bad_command_lines:
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_method_options_and_configs(bench: ModuleType) -> None:
    """Each method's config: selector, schedule and the SpartaMaskCallback options; every one validates."""
    args = bench.parse_args(["--lr", "0.03", "--epochs", "10", "--mask-epoch", "2"])
    expected = {
        "sparta": ("sparta", 2, False, 1),
        "sparta_tws": ("sparta", 2, True, 1),
        "sparta_tws_k": ("sparta", 2, True, 3),
        "all": ("all", 0, False, 1),
        "magnitude": ("magnitude", 0, False, 1),
        "bitfit": ("bitfit", 0, False, 1),
        "last": ("last", 0, False, 1),
        "layers": ("layers", 0, False, 1),
        "random": ("random", 2, False, 1),
        "dp_gradient": ("dp_gradient", 2, False, 1),
        "oracle": ("oracle", 2, False, 1),
    }
    assert set(expected) == set(bench.METHODS)
    for method, (selector, t0, tws, k) in expected.items():
        run = bench._run(method, 0.2, 1, 0.03, 2.0, "table")
        config = bench.transfer_config(args, run, "/tmp/unused")
        got = (config.selector, config.mask_epoch, config.train_while_scoring, config.scoring_epochs)
        assert got == (selector, t0, tws, k), method
        assert (config.model, config.image_size, config.epochs, config.lr, config.seed) == (
            "efficientnet_lite0", 32, 10, 0.03, 1)  # fmt: skip
        assert (config.logger, config.checkpoint, config.validate) == (False, False, False)
        assert (config.clipping, config.test_subset) == ("auto", 2000)
        assert config.allow_non_private is (method == "oracle")
    lever = {name: bench.lever_options(name, 2, 0.2) for name in bench.LEVERS}
    assert lever["baseline"] == {**bench.method_options("sparta", 2), "warmup": "bitfit", "trainable_fraction": 0.2}
    assert lever["warmup=full"]["warmup"] == "full"
    assert lever["fraction=0.5"]["trainable_fraction"] == 0.5
    assert (lever["scoring_epochs=T0+1"]["scoring_epochs"], lever["scoring_epochs=T0+1"]["train_while_scoring"]) == (
        3, True)  # fmt: skip
    levers = [name for name in bench.LEVERS if name != "mask_epoch=2"]  # T0 = 2 is the baseline here
    assert [run["lever"] for run in bench.levers_plan(args, 0.03)] == levers * len(args.seeds)
    for name, run in zip(levers * len(args.seeds), bench.levers_plan(args, 0.03), strict=True):
        config = bench.transfer_config(args, run, "/tmp/unused")
        assert {k: getattr(config, k) for k in lever[name]} == lever[name]


def _fake_result(config: TransferConfig) -> dict:
    """What run_transfer returns, from a made-up accuracy: best at lr 0.03, ``all`` ahead, seeds apart."""
    oracle = config.selector == "oracle"
    acc = 0.7 - 4 * abs(config.lr - 0.03) + 0.01 * config.seed + (0.05 if config.selector == "all" else 0.0)
    acc += 0.02 * config.train_while_scoring + 0.01 * (config.scoring_epochs > 1) - 0.1 * (config.epsilon < 2)
    return {
        "test_acc": acc,
        "val_acc": acc + 0.001 if config.validate else None,
        "test_loss": 1.0,
        "epsilon": math.inf if oracle else config.epsilon - 0.002,
        "epsilon_dp_sgd": config.epsilon - 0.002,
        "delta": config.delta,
        "private": not oracle,
        "non_private_reason": "oracle mask" if oracle else None,
        "noise_multiplier": 1.5,
        "sample_rate": 0.1,
        "steps": 100,
        "steps_per_epoch": 10,
        "train_size": config.train_subset,
        "test_size": 10000,
        "trainable_params": 1000 if config.selector != "all" else 4000,
        "total_params": 4000,
        "trainable_param_fraction": 0.25 if config.selector != "all" else 1.0,
        "wall_time_s": 10.0 + config.seed,
        "fit_time_s": 9.0,
        "log_dir": None,
        "global_rank": 0,
    }


def test_benchmark_search_table_and_report(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search picks each method's best validation rate; the table reuses the search's seed-0 run."""
    seen: list[TransferConfig] = []

    def fake_run_transfer(config: TransferConfig) -> dict:
        seen.append(config)
        if config.selector == "last":
            raise RuntimeError("boom")
        return _fake_result(config)

    monkeypatch.setattr(lightning_sparta.demo, "run_transfer", fake_run_transfer)
    prefix = tmp_path / "acc"
    level = logging.getLogger("lightning.pytorch").level
    argv = ["--methods", "sparta,sparta_tws_k,all,last", "--lrs", "0.01,0.03,0.1", "--seeds", "0,1,2"]
    argv += ["--low-epsilon", "1", "--out-prefix", str(prefix)]
    payload = bench.main(argv)
    search = [c for c in seen if c.validate]
    assert len(search) == 4 * 3
    assert {c.seed for c in search} == {0}
    # The best validation rate per method; last's search runs all failed: the grid's middle value.
    assert payload["chosen_lrs"] == {"sparta": 0.03, "sparta_tws_k": 0.03, "all": 0.03, "last": 0.03}
    table = [c for c in seen if not c.validate and c.epsilon == 2.0]
    # Seeds 1 and 2 only: seed 0 is the search's run at the chosen rate (sparta_tws_k has selector sparta).
    assert sorted((c.selector, c.seed) for c in table) == [
        ("all", 1), ("all", 2), ("last", 1), ("last", 2), ("sparta", 1), ("sparta", 1), ("sparta", 2), ("sparta", 2)
    ]  # fmt: skip
    assert {(c.epochs, c.train_subset, c.batch_size, c.image_size) for c in seen} == {(5, 1000, 125, 32)}
    low = [c for c in seen if c.epsilon == 1.0]
    assert payload["low_epsilon_methods"] == ["all", "sparta_tws_k", "sparta"]  # the 3 best private methods
    assert len(low) == 3 * 3
    assert {c.lr for c in low} == {0.03}

    text = prefix.with_suffix(".md").read_text()
    assert "**The privacy cost of this selection is not accounted**" in text
    assert "NOT accounted" in payload["lr_selection"]
    row = next(line for line in text.splitlines() if line.startswith("| all | all weights"))
    assert "| 0.03 | 76.00 ± 1.00 | 3 | 1.998 |" in row, row  # 0.75, 0.76, 0.77; ε the largest over seeds
    assert "4,000 (100.0%) | 11 |" in row
    assert "failed: RuntimeError: boom" in next(line for line in text.splitlines() if line.startswith("| last | head"))
    assert "## Learning-rate search" in text
    assert "**70.1 (test 70.0)**" in text
    assert "## Test accuracy at ε = 1" in text
    assert "## Failed runs" in text
    assert prefix.with_name("acc_vs_fraction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert logging.getLogger("lightning.pytorch").level == level  # the quiet mode does not outlive main()

    # --resume runs what is missing and what failed, nothing else.
    stored = json.loads(prefix.with_suffix(".json").read_text())
    stored["runs"] = [r for r in stored["runs"] if r["key"] != "all|-|lr=0.03|eps=2|seed=2"]
    prefix.with_suffix(".json").write_text(json.dumps(stored))
    before = len(seen)
    again = bench.main([*argv, "--resume"])
    assert sorted((c.selector, c.seed, c.validate) for c in seen[before:]) == [
        ("all", 2, False), ("last", 0, True), ("last", 0, True), ("last", 0, True),
        ("last", 1, False), ("last", 2, False),
    ]  # fmt: skip
    assert again["command"] == payload["command"]
    assert again["resumed_with"] == [shlex.join(["python", "benchmarks/accuracy.py", *argv, "--resume"])]
    with pytest.raises(SystemExit):  # other settings: refuse to mix them with the stored runs
        bench.main([*argv, "--resume", "--epochs", "10", "--mask-epoch", "2"])


def test_benchmark_levers(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[TransferConfig] = []
    monkeypatch.setattr(lightning_sparta.demo, "run_transfer", lambda c: seen.append(c) or _fake_result(c))
    prefix = tmp_path / "acc_levers"
    payload = bench.main(["--levers", "--seeds", "0,1", "--out-prefix", str(prefix)])
    assert len(seen) == (len(bench.LEVERS) - 1) * 2  # mask_epoch=1 is the baseline (T0 = 1)
    assert payload["levers_lr"] == 0.03
    assert "middle" in payload["levers_lr_source"]
    text = prefix.with_suffix(".md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| train_while_scoring |"))
    assert "| 72.50 ± 0.71 | 2 | +2.00 |" in row
    # --report-only rebuilds the report from the JSON and runs nothing.
    prefix.with_suffix(".md").unlink()
    monkeypatch.setattr(lightning_sparta.demo, "run_transfer", lambda c: pytest.fail("--report-only ran something"))
    rebuilt = bench.main(["--levers", "--seeds", "0,1", "--out-prefix", str(prefix), "--report-only"])
    assert len(rebuilt["runs"]) == (len(bench.LEVERS) - 1) * 2
    assert "| mask_epoch=1 |" not in text
    assert "| mask_epoch=2 |" in text
    assert prefix.with_suffix(".md").read_text() == text
    assert "| mask_epoch=0 |" in text
    assert "| fraction=0.05 |" in text


def test_benchmark_end_to_end(bench: ModuleType, fake_data: Path, tmp_path: Path) -> None:
    """The real code path on fake data and the small model: the new SpartaMaskCallback options arrive."""
    prefix = tmp_path / "out" / "accuracy_test"
    argv = [
        "--model", "gn_cnn", "--methods", "sparta_tws_k,layers", "--seeds", "0", "--epochs", "3",
        "--mask-epoch", "1", "--lrs", "0.05,0.1", "--train-subset", "300", "--batch-size", "60",
        "--physical-batch-size", "60", "--pretrain-epochs", "1", "--fractions", "",
        "--data-dir", str(fake_data), "--out-prefix", str(prefix),
    ]  # fmt: skip
    payload = bench.main(argv)
    runs = payload["runs"]
    assert len(runs) == 4  # 2 methods × 2 rates at seed 0, the table reuses the chosen ones
    for run in runs:
        assert "error" not in run, (run["key"], run.get("error"))
        assert 0.0 <= run["val_acc"] <= 1.0
        assert 0.0 <= run["test_acc"] <= 1.0
        assert run["train_size"] == 300
        assert run["steps"] == 3 * run["steps_per_epoch"]
        assert 1.9 <= run["epsilon"] <= 2.0
    assert len({run["noise_multiplier"] for run in runs}) == 1
    text = prefix.with_suffix(".md").read_text()
    assert "| sparta_tws_k |" in text
    assert "| layers |" in text
