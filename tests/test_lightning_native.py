"""Issue 11: a Lightning-native experience.

Calibration banners that say what the plan reaches, bounded tolerances and targets, the δ ≥ 1/n warning
that user filters cannot hide, Trainer flags (explicit ``max_epochs=1000``, ``fast_dev_run``), continuing
an accountant history across strategies, and readable console output.
"""

from __future__ import annotations

import logging
import re
import time
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_sparta import DPStrategy, PrivacyBudgetCallback
from lightning_sparta.privacy.accountant import MAX_TARGET_EPSILON, epsilon_for
from test_strategy import TinyModule, _trainer


class _Records(logging.Handler):
    """Collects the messages of the `lightning_sparta` logger (whatever its handlers and propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def package_log():
    logger = logging.getLogger("lightning_sparta")
    handler = _Records()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------------------------------ 2: banners
def test_banner_prints_the_epsilon_the_plan_reaches(package_log):
    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-3, epsilon_tolerance=0.15, seed=0)
    _trainer(strategy, max_epochs=2).fit(TinyModule(batch_size=6))
    (banner,) = [m for m in package_log.messages if "calibrated for target_epsilon" in m]
    reached = float(re.search(r"reach ε = ([0-9.]+)", banner).group(1))
    assert reached == pytest.approx(strategy.epsilon(), abs=1e-4)  # what the run ended at, not the target
    assert 2.0 - 0.15 <= strategy.epsilon() <= 2.0


@pytest.mark.parametrize(("tolerance", "target"), [(5.0, 2.0), (0.2, 2.0), (0.0, 2.0), (float("nan"), 2.0)])
def test_epsilon_tolerance_is_bounded(tolerance, target):
    with pytest.raises(ValueError, match="`epsilon_tolerance"):
        DPStrategy(target_epsilon=target, epsilon_tolerance=tolerance)


def test_default_tolerance_scales_with_small_targets():
    assert DPStrategy(target_epsilon=0.1).epsilon_tolerance == pytest.approx(0.001)
    assert DPStrategy(target_epsilon=8.0).epsilon_tolerance == 0.01


@pytest.mark.parametrize("target", [1000.0, MAX_TARGET_EPSILON * 1.01])
def test_absurd_target_epsilon_is_refused_at_once(target):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"`target_epsilon=.*noise_multiplier"):
        DPStrategy(target_epsilon=target)
    assert time.perf_counter() - start < 1.0


def test_delta_warning_points_at_the_users_line_and_survives_filters_on_lightning():
    """δ ≥ 1/n must warn. It used to be attributed to `lightning_sparta.strategy`, so the common
    `warnings.filterwarnings("ignore", module="lightning")` (a regex: it matches `lightning_sparta...` too)
    silenced it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="lightning")
        _trainer(DPStrategy(noise_multiplier=1.0, target_delta=0.5)).fit(TinyModule(batch_size=6))
    (warning,) = [w for w in caught if "1/n" in str(w.message)]
    assert warning.filename == __file__


# ------------------------------------------------------------------------------------------ 3: Trainer flags
class _StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_explicit_max_epochs_1000_is_not_taken_for_unset(package_log):
    strategy = DPStrategy(target_epsilon=8.0, target_delta=1e-3, accountant="rdp", seed=0)
    trainer = _trainer(strategy, max_epochs=1000, callbacks=[_StopAfterFirstEpoch()])
    trainer.fit(TinyModule(batch_size=6))
    (banner,) = [m for m in package_log.messages if "calibrated for target_epsilon" in m]
    assert "4000 steps" in banner  # 1000 epochs of 4 Poisson steps


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unset_max_epochs_is_still_refused():
    trainer = _trainer(DPStrategy(target_epsilon=1.0), max_epochs=None)
    with pytest.raises(ValueError, match="max_epochs"):
        trainer.fit(TinyModule(batch_size=6))


def test_fast_dev_run_accounts_what_runs():
    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-3, seed=0)
    trainer = _trainer(strategy, fast_dev_run=True, max_epochs=None, callbacks=[PrivacyBudgetCallback()])
    trainer.fit(TinyModule(batch_size=6))
    assert strategy.steps == 1
    assert strategy.epsilon() <= 2.0
    assert float(trainer.callback_metrics["privacy/epsilon"]) == strategy.epsilon()


# ------------------------------------------------------------------------------------------ 3: privacy_state
def test_privacy_state_continues_the_history_across_strategies(tmp_path):
    first = DPStrategy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp", seed=0)
    _trainer(first, max_epochs=1).fit(TinyModule(batch_size=6))
    torch.save(first.privacy_state(), tmp_path / "privacy.pt")
    second = DPStrategy(
        noise_multiplier=1.0, target_delta=1e-3, accountant="rdp", privacy_state=tmp_path / "privacy.pt"
    )
    assert second.steps == first.steps == 4
    _trainer(second, max_epochs=1).fit(TinyModule(batch_size=6))
    assert second.steps == 8
    assert second.epsilon() == pytest.approx(epsilon_for([(1.0, 0.25, 8)], 1e-3, "rdp"))
    assert second.epsilon() < 2 * first.epsilon()  # composition is tighter than adding the two ε values


def test_privacy_state_refuses_another_accountant():
    state = DPStrategy(noise_multiplier=1.0, accountant="rdp").privacy_state()
    with pytest.raises(ValueError, match="accountant='rdp'"):
        DPStrategy(noise_multiplier=1.0, accountant="prv", privacy_state=state)


def test_privacy_state_from_a_checkpoint(tmp_path):
    strategy = DPStrategy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp", seed=0)
    trainer = _trainer(strategy, max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(TinyModule(batch_size=6))
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    again = DPStrategy(noise_multiplier=2.0, accountant="rdp", privacy_state=checkpoint)
    assert again.accountant.history == [(1.0, 0.25, 4)]


def test_a_run_continuing_a_privacy_state_resumes_from_its_checkpoint(tmp_path):
    """Run B continues run A's history (`privacy_state=`) and is interrupted; a new process resumes B's
    checkpoint with the same `privacy_state`: B's history extends the loaded one, so it is adopted."""
    first = DPStrategy(noise_multiplier=1.0, accountant="rdp", seed=0)
    _trainer(first, max_epochs=1).fit(TinyModule(batch_size=6))
    second = DPStrategy(noise_multiplier=2.0, accountant="rdp", seed=1, privacy_state=first.privacy_state())
    trainer = _trainer(second, max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(TinyModule(batch_size=6))
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    resumed = DPStrategy(noise_multiplier=2.0, accountant="rdp", privacy_state=first.privacy_state())
    _trainer(resumed, max_epochs=2).fit(TinyModule(batch_size=6), ckpt_path=checkpoint)
    assert resumed.accountant.history == [(1.0, 0.25, 4), (2.0, 0.25, 8)]


# ------------------------------------------------------------------------------------------ 4: output
def test_console_shows_a_compact_path_summary_and_debug_the_table(package_log, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    trainer = _trainer(DPStrategy(noise_multiplier=1.0, seed=0), logger=CSVLogger(tmp_path))
    trainer.fit(TinyModule(batch_size=6))
    (summary,) = [m for m in package_log.messages if m.startswith("DPStrategy per-sample gradients")]
    assert "ghost" in summary  # clipping="auto", the default: Linear layers keep their (input, output gradient)
    assert "Linear 2" in summary
    table = (tmp_path / "lightning_logs" / "version_0" / "per_sample_paths.txt").read_text()
    assert "net.0" in table
    assert "net.2" in table


# ------------------------------------------------------------------------------------------ SpartaMaskCallback
def _sparta_trainer(tmp_path, callback, **kwargs):
    from test_sparta import SparseModule  # noqa: F401  (the module used below)

    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    import lightning as L

    return L.Trainer(strategy=DPStrategy(noise_multiplier=1.0, seed=3), callbacks=[callback], **{**defaults, **kwargs})


def test_fast_dev_run_skips_the_sparta_schedule_with_a_notice(tmp_path, package_log):
    from lightning_sparta import SpartaMaskCallback
    from test_sparta import SparseModule

    callback = SpartaMaskCallback(mask_epoch=5)
    trainer = _sparta_trainer(tmp_path, callback, fast_dev_run=True, max_epochs=None)
    trainer.fit(SparseModule())
    assert trainer.strategy.steps == 1
    assert callback.phase is None
    assert callback.mask is None
    assert any("fast_dev_run" in m and "skipped" in m for m in package_log.messages)


def test_second_fit_with_a_new_callback_on_a_sparse_model_says_what_to_do(tmp_path):
    from lightning_sparta import SpartaMaskCallback
    from test_sparta import SparseModule

    module = SparseModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sparta_trainer(tmp_path, SpartaMaskCallback(mask_epoch=0, selector="magnitude")).fit(module)
    with pytest.raises(ValueError, match="already holds 2 sparse layer") as info:
        _sparta_trainer(tmp_path, SpartaMaskCallback(mask_epoch=0, selector="magnitude")).fit(module)
    assert "densify_" in str(info.value)
    assert "ckpt_path" in str(info.value)


def test_scoring_first_epoch_with_a_scheduler_does_not_warn_about_lr_scheduler_order(tmp_path):
    from lightning_sparta import SpartaMaskCallback
    from test_sparta import SparseModule

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sparta_trainer(tmp_path, SpartaMaskCallback(mask_epoch=0)).fit(SparseModule())
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_mask_file_goes_to_default_root_dir_without_logger(tmp_path, monkeypatch):
    from lightning_sparta import SpartaMaskCallback
    from test_sparta import SparseModule

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "root"
    _sparta_trainer(root, SpartaMaskCallback(mask_epoch=0, selector="magnitude")).fit(SparseModule())
    assert (root / "sparta_mask.pt").exists()
    assert not list(cwd.iterdir())


def test_compact_mask_summary_and_pictures(tmp_path, package_log):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_sparta import SpartaMaskCallback
    from test_sparta import SparseModule

    logger = TensorBoardLogger(tmp_path, name="tb")
    _sparta_trainer(tmp_path, SpartaMaskCallback(mask_epoch=0, trainable_fraction=0.3), logger=logger).fit(
        SparseModule()
    )
    (summary,) = [m for m in package_log.messages if m.startswith("SpartaMaskCallback: 'sparta' mask")]
    assert len(summary.splitlines()) <= 3
    assert "2 scored layers" in summary
    table = (tmp_path / "tb" / "version_0" / "sparta_mask_table.txt").read_text()
    assert "net.conv" in table
    assert "net.fc" in table
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "sparta/kept_fraction" in events.Tags()["images"]  # the bar chart
    image = events.Images("sparta/mask/net.fc")[0]  # Linear(96 -> 10): a [10, 96] weight
    assert image.width == 384
    assert 24 <= image.height <= 48  # aspect ratio kept (10:96), never squashed to a few pixels


class _Backbone(TinyModule):
    """A backbone and a head, for Lightning's `BackboneFinetuning` (it freezes `self.backbone` at first)."""

    def __init__(self) -> None:
        super().__init__(batch_size=24)  # batch_size == n: q = 1, every sample in every step
        del self.net
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.5)


def _clipped_sum_over(module, names, x, y, clip):
    """Σ_i clip(g_i) / n with g_i from `torch.func` over the parameters ``names`` (clipped jointly)."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss_one(trained, xi, yi):
        return F.cross_entropy(functional_call(module, {**params, **trained}, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))({k: params[k] for k in names}, x, y)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", factor, g) / len(x) for k, g in per_sample.items()}


def test_backbone_finetuning_clips_the_unfrozen_backbone_with_the_head():
    """`BackboneFinetuning` freezes the backbone, then unfreezes it and adds a param group at an epoch
    boundary: from that step on the backbone's per-sample gradients are clipped jointly with the head's
    (σ = 0, q = 1: each step's gradient equals the `torch.func` clipped sum over the trainable set)."""
    L.seed_everything(0)
    module = _Backbone()
    x, y = module.dataset.tensors
    expected, seen = [], []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
            expected.append(_clipped_sum_over(pl_module, names, x, y, clip=0.05))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad})

    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    _trainer(strategy, max_epochs=2, callbacks=[finetuning, Watch()]).fit(module)
    assert [sorted(s) for s in seen] == [["head.bias", "head.weight"], sorted(n for n, _ in module.named_parameters())]
    for got, want in zip(seen, expected, strict=True):
        assert sorted(got) == sorted(want)
        for name in got:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
