"""Smoke tests of the paper's example program (examples/cifar_deit_sparta.py) and its configuration surface.

The real entry point runs with the real YAML configuration, offline and on CPU: the overrides swap the
pretrained DeiT for a small random ViT (32×32 inputs, 8×8 patches, 2 blocks) and CIFAR for generated
images, and shorten the run to 3 epochs with the mask chosen at epoch 1.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from lightning_sparta import DPStrategy, SpartaMaskCallback
from lightning_sparta.demo.cifar import CIFARDataModule, TimmClassifier, make_synthetic_images
from lightning_sparta.sparse import MaskedConv2d, MaskedLinear, RowSparseConv2d, RowSparseLinear

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cifar_deit_sparta.py"
CONFIG = ROOT / "examples" / "configs" / "cifar10_deit_tiny.yaml"
CONFIG_100 = ROOT / "examples" / "configs" / "cifar100_deit_small.yaml"

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
N_TRAIN, BATCH, EPOCHS = 64, 16, 3  # q = 1/4: 4 Poisson steps per epoch, 12 in all


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args`` is given while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """The example program, loaded from its file (``examples`` is not a package: opacus ships one)."""
    spec = importlib.util.spec_from_file_location("cifar_deit_sparta_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(log_dir: Path, *extra: str) -> list[str]:
    """The YAML config plus the overrides of an offline CPU smoke run, then ``extra``."""
    return [
        "--config",
        str(CONFIG),
        "--model.model_name=vit_tiny_patch16_224",
        "--model.pretrained=false",
        f"--model.model_kwargs={TINY_VIT}",
        "--data.synthetic=true",
        f"--data.synthetic_size={N_TRAIN}",
        "--data.synthetic_test_size=32",
        f"--data.batch_size={BATCH}",
        "--data.eval_batch_size=32",
        "--data.num_workers=0",
        f"--trainer.max_epochs={EPOCHS}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        "--trainer.strategy.init_args.physical_batch_size=8",
        "--privacy.log_every_n_steps=1000",  # ε at epoch ends only: each PRV evaluation costs ~0.5 s of CPU
        "--sparta.mask_epoch=1",
        *extra,
    ]


def initial_model(num_classes: int = 10) -> TimmClassifier:
    """The module as the CLI creates it before training (``seed_everything: 0`` of the config)."""
    L.seed_everything(0)
    return TimmClassifier("vit_tiny_patch16_224", num_classes=num_classes, pretrained=False, model_kwargs=TINY_VIT)


def test_sparta_run_with_yaml_and_overrides(example: ModuleType, tmp_path: Path, capsys: Any) -> None:
    """The paper's method end to end: warm-up, private scoring at T0 = 1, row-sparse training, test, ε."""
    result = example.main(tiny_args(tmp_path, "--trainer.strategy.init_args.target_epsilon", "8"))
    trainer, model, callback = result["trainer"], result["model"], result["callback"]
    strategy = trainer.strategy

    # The YAML's strategy with the command-line override; the paper's other settings kept.
    assert isinstance(strategy, DPStrategy)
    assert strategy.target_epsilon == 8.0
    assert strategy.target_delta == 1e-5
    assert strategy.max_grad_norm == 1.0
    assert strategy.accountant_name == "prv"
    assert strategy.physical_batch_size == 8
    assert (model.lr, model.momentum, model.warmup_epochs) == (0.01, 0.9, 1.0)
    assert isinstance(callback, SpartaMaskCallback)
    assert (callback.selector.name, callback.trainable_fraction, callback.mask_epoch) == ("sparta", 0.2, 1)

    # ε is reported, private, at most the target and close to it (σ is calibrated for all 12 steps).
    assert strategy.steps == EPOCHS * N_TRAIN // BATCH
    assert result["private"] is True
    assert 8.0 * 0.98 <= result["epsilon"] <= 8.0
    assert result["epsilon"] == pytest.approx(strategy.epsilon())
    assert 0.0 <= result["test_acc"] <= 1.0
    assert math.isfinite(result["train_loss"])
    assert result["train_loss"] > 0
    out = capsys.readouterr().out
    assert f"ε = {result['epsilon']:.3f} at δ = 1e-05" in out
    assert "selector='sparta'" in out

    # The mask was chosen at T0 from a private scoring epoch: every scored layer is row-sparse.
    assert callback.phase == "masked"
    assert callback.scores is not None
    assert callback.mask
    assert set(callback.mask) == set(callback.scored_layers)
    assert "model.head" not in callback.mask
    for name, rows in callback.mask.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, (RowSparseLinear, RowSparseConv2d)), name
        assert rows.numel() == math.ceil(0.2 * layer.weight.shape[0]), name

    # What trained: the head and the selected rows moved; unselected rows and frozen embeddings did not.
    before = initial_model().state_dict()
    after = model.state_dict()
    assert torch.equal(after["model.pos_embed"], before["model.pos_embed"])
    assert torch.equal(after["model.cls_token"], before["model.cls_token"])
    assert not torch.allclose(after["model.head.weight"], before["model.head.weight"])
    name = "model.blocks.0.mlp.fc1"
    rows = callback.mask[name]
    frozen = torch.ones(after[f"{name}.weight"].shape[0], dtype=torch.bool)
    frozen[rows] = False
    assert torch.equal(after[f"{name}.weight"][frozen], before[f"{name}.weight"][frozen])
    assert not torch.allclose(after[f"{name}.weight"][rows], before[f"{name}.weight"][rows])

    # TensorBoard logs, the saved mask and the resolved configuration are in the run's folder.
    log_dir = Path(trainer.log_dir)
    assert log_dir.is_relative_to(tmp_path)
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert torch.load(log_dir / "sparta_mask.pt")["selector"] == "sparta"
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["init_args"]["target_epsilon"] == 8.0


def test_other_method_dataset_and_epsilon_from_command_line(example: ModuleType, tmp_path: Path) -> None:
    """MP (magnitude) from the start, CIFAR-100 (the head follows), ε = 4 with the short override syntax, RDP."""
    result = example.main(
        tiny_args(
            tmp_path,
            "--sparta.selector=magnitude",
            "--sparta.mask_epoch=0",
            "--sparta.trainable_fraction=0.5",
            "--data.dataset=cifar100",
            "--trainer.strategy.target_epsilon=4",  # without `init_args.`: jsonargparse accepts both
            "--trainer.strategy.init_args.accountant=rdp",
            "--trainer.strategy.init_args.physical_batch_size=null",  # one pass per logical batch
            "--trainer.max_epochs=2",
        )
    )
    trainer, model, callback = result["trainer"], result["model"], result["callback"]
    assert trainer.strategy.target_epsilon == 4.0
    assert trainer.strategy.accountant_name == "rdp"
    assert 4.0 * 0.98 <= result["epsilon"] <= 4.0
    assert model.model.get_classifier().out_features == 100
    assert result["datamodule"].num_classes == 100
    assert callback.selector.name == "magnitude"
    assert callback.scores is None  # data-free: no scoring epoch
    assert trainer.strategy.physical_batch_size is None
    assert trainer.strategy.steps == 2 * N_TRAIN // BATCH
    before = initial_model(num_classes=100).state_dict()
    for name, mask in callback.mask.items():  # MP: an element mask, half of every layer's entries
        layer = model.get_submodule(name)
        assert isinstance(layer, (MaskedLinear, MaskedConv2d)), name
        assert mask.dtype == torch.bool, name
        assert mask.shape == layer.weight.shape, name
        assert int(mask.sum()) == math.ceil(0.5 * mask.numel()), name
        # ... the entries of largest pretrained magnitude (here: the initial random weights).
        magnitude = before[f"{name}.weight"].abs()
        assert magnitude[mask].min() >= magnitude[~mask].max(), name


@pytest.mark.slow
def test_ddp_two_processes_with_micro_batches(tmp_path: Path) -> None:
    """``--trainer.devices 2`` (DDP over gloo) with micro-batches: ranks run different numbers of micro-batches.

    A collective inside ``training_step`` (e.g. ``self.log(..., sync_dist=True)``) deadlocks here; the
    subprocess has a timeout so that a hang fails the test.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    args = tiny_args(tmp_path, "--trainer.devices=2", "--trainer.strategy.init_args.physical_batch_size=3")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,  # its own process group: the second rank is killed with it on a hang
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"DDP run hung (deadlock between ranks?):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    line = next(line for line in stdout.splitlines() if "test accuracy" in line)
    epsilon = float(line.split("ε = ")[1].split()[0])
    assert 2.0 * 0.98 <= epsilon <= 2.0  # the YAML's ε = 2: not overridden here
    assert "12 private steps" in line
    assert stdout.count("test accuracy") == 1  # printed by rank 0 only


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparta.selector=oracle"], "allow_non_private=True"),
        (["--sparta.selector=nope"], "registered selectors"),
        (["--sparta.trainable_fraction=1.5"], "`trainable_fraction`"),
        (["--sparta.mask_epoch=3"], "`mask_epoch` must be below"),
        (["--trainer.strategy=auto"], "`trainer.strategy` must be lightning_sparta.DPStrategy"),
        (["--trainer.strategy.init_args.target_epsilon=-1"], "`target_epsilon`"),
        (["--trainer.strategy.init_args.noise_multiplier=1.0"], "exactly one of `noise_multiplier`"),
        (["--model.model_name=not_a_timm_model"], "`model_name`"),
        (["--model.model_kwargs={num_classes: 3}"], "`model_kwargs`"),
        (["--data.val_size=60"], "`val_size`"),
    ],
)
def test_bad_configuration_names_the_argument(
    example: ModuleType, tmp_path: Path, extra: list[str], message: str
) -> None:
    """Every bad value fails before any training step, with an error that names the argument."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        example.main(tiny_args(tmp_path, *extra))


def test_parse_errors_exit_with_the_key(example: ModuleType, tmp_path: Path, capsys: Any) -> None:
    """Type errors in the configuration are jsonargparse errors naming the key (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        example.main(tiny_args(tmp_path, "--data.dataset=cifar1000"))
    assert exit_info.value.code == 2
    assert 'key "data.dataset"' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example.main(tiny_args(tmp_path, "--model.num_classes=7"))  # follows data.dataset: not an option
    assert "model.num_classes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "dataset", "model"), [(CONFIG, "cifar10", "deit_tiny"), (CONFIG_100, "cifar100", "deit_small")]
)
def test_configs_hold_the_paper_setting(
    example: ModuleType, capsys: Any, config: Path, dataset: str, model: str
) -> None:
    """The YAML files parse under the real CLI and hold Section 6's setting; overrides show in the result."""
    with pytest.raises(SystemExit) as exit_info:
        example.main(
            [
                "--config",
                str(config),
                "--trainer.devices=4",
                "--trainer.strategy.init_args.target_epsilon=4",
                "--sparta.selector=random",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    trainer, strategy = printed["trainer"], printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_sparta.DPStrategy"
    assert strategy["init_args"]["target_epsilon"] == 4.0  # overridden (the file says 2.0)
    assert yaml.safe_load(config.read_text())["trainer"]["strategy"]["init_args"]["target_epsilon"] == 2.0
    assert (strategy["init_args"]["target_delta"], strategy["init_args"]["max_grad_norm"]) == (1e-5, 1.0)
    assert strategy["init_args"]["accountant"] == "prv"
    assert (int(trainer["devices"]), trainer["max_epochs"]) == (4, 50)
    assert trainer["logger"]["class_path"].endswith("TensorBoardLogger")
    assert printed["model"]["model_name"].startswith(model)
    assert printed["model"]["pretrained"] is True
    assert (printed["model"]["lr"], printed["model"]["momentum"], printed["model"]["weight_decay"]) == (0.01, 0.9, 0.0)
    assert printed["model"]["warmup_epochs"] == 1.0
    assert printed["model"]["cosine"] is True
    assert (printed["data"]["dataset"], printed["data"]["batch_size"]) == (dataset, 500)
    assert printed["sparta"] == {**printed["sparta"], "selector": "random", "mask_epoch": 10, "trainable_fraction": 0.2}
    assert printed["sparta"]["warmup"] == "bitfit"


def test_datamodule_resizes_and_normalises(tmp_path: Path) -> None:
    """The transforms of the real data path on generated images: resize, scale to [0, 1], normalise."""
    data = CIFARDataModule(
        synthetic=True,
        synthetic_size=20,
        synthetic_test_size=10,
        batch_size=5,
        image_size=48,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        val_size=4,
        num_workers=0,
    )
    data.prepare_data()
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (16, 4, 10)
    x, y = data.train_set[0]
    assert x.shape == (3, 48, 48)
    assert x.dtype == torch.float32
    assert isinstance(y, int)
    assert float(x.min()) >= -2.0
    assert float(x.max()) <= 2.0
    raw, raw_labels = make_synthetic_images(20, 10, seed=0)  # what the data module generated (seed 0)
    index = int((raw == data.train_set.images[0]).flatten(1).all(1).nonzero()[0])
    assert y == int(raw_labels[index])
    # Resizing keeps each channel's mean; normalisation is (u / 255 - mean) / std.
    expected = (raw[index].float() / 255 - 0.5) / 0.25
    assert torch.allclose(x.mean((1, 2)), expected.mean((1, 2)), atol=0.05)
    images = torch.stack([data.test_set[i][0] for i in range(10)])
    assert images.std() > 0.1  # real content, not a constant
    assert len(data.val_dataloader()) == 1  # 4 held-out images, batches of 5
    assert len(CIFARDataModule(synthetic=True).val_dataloader()) == 0  # val_size=0: no validation

    # The model's data config sets the size and statistics unless given; no config: ImageNet defaults.
    config = {"input_size": (3, 40, 40), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bilinear"}
    linked = CIFARDataModule(model_data_config=config, synthetic=True)
    assert (linked.image_size, linked.mean, linked.std, linked.interpolation) == (
        40,
        (0.1, 0.2, 0.3),
        (0.4, 0.5, 0.6),
        "bilinear",
    )
    default = CIFARDataModule()
    assert (default.image_size, default.interpolation) == (224, "bicubic")

    missing = CIFARDataModule(data_dir=str(tmp_path / "nothing"), download=False)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        missing.prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"dataset": "mnist"}, "dataset"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": 2.5}, "eval_batch_size"),
        ({"image_size": 0}, "image_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"val_size": -1}, "val_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"synthetic": "yes"}, "synthetic"),
        ({"synthetic_size": 0}, "synthetic_size"),
        ({"model_data_config": {"input_size": (1, 32, 32)}}, "model_data_config"),
        ({"model_data_config": [224]}, "model_data_config"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    """Each bad argument of CIFARDataModule raises a ValueError naming it."""
    with pytest.raises(ValueError, match=f"`{name}"):
        CIFARDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"model_name": ""}, "model_name"),
        ({"model_name": "deit_tiny_patch16_2244"}, "model_name"),
        ({"num_classes": 0}, "num_classes"),
        ({"pretrained": "no"}, "pretrained"),
        ({"model_kwargs": {"pretrained": True}}, "model_kwargs"),
        ({"model_kwargs": {"depth": 1, "embed_dim": 10}}, "model_kwargs"),  # 10 not divisible by 3 heads
        ({"lr": float("nan")}, "lr"),
        ({"momentum": -0.5}, "momentum"),
        ({"warmup_epochs": -1.0}, "warmup_epochs"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"cosine": "yes"}, "cosine"),
    ],
)
def test_timm_classifier_rejects_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    """Each bad argument of TimmClassifier raises a ValueError naming it (no weights are downloaded)."""
    with pytest.raises(ValueError, match=f"`{name}"):
        TimmClassifier(**{"model_name": "vit_tiny_patch16_224", "pretrained": False, **kwargs})


# ------------------------------------------------------------------------------------------ issue 11: the CLI
def test_help_is_readable(example: ModuleType, capsys: Any) -> None:
    """--help was 2,048 lines (1,394 of them `--sparta.head` listing nn.Module subclasses), with Sphinx markup."""
    with pytest.raises(SystemExit):
        example.main(["--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 800
    head = text[text.index("  --sparta.head") :].split("\n  --")[0]
    assert len(head.splitlines()) <= 4  # a string name, not a list of every nn.Module subclass
    assert "ReLU" not in head
    for markup in (":class:", ":func:", ":meth:", "``"):
        assert markup not in text


def test_strategy_defaults_to_dp(example: ModuleType, tmp_path: Path) -> None:
    """Without `trainer.strategy` in the configuration the CLI uses DPStrategy (ε = 2), not Lightning's 'auto'."""
    args = [a for a in tiny_args(tmp_path) if a not in ("--config", str(CONFIG))]
    args = [a for a in args if not a.startswith("--trainer.strategy.init_args.physical_batch_size")]
    args += ["--trainer.max_epochs=2", "--data.dataset=cifar10", "--model.lr=0.01"]
    args = [a for a in args if not a.startswith("--trainer.logger")]
    result = example.main([*args, f"--trainer.default_root_dir={tmp_path}"])
    strategy = result["trainer"].strategy
    assert isinstance(strategy, DPStrategy)
    assert strategy.target_epsilon == 2.0
    assert result["epsilon"] <= 2.0
