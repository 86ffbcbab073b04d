"""DPStrategy inside a real Trainer: the update of eq. (1), noise, accounting, resume, bad input."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from opacus.accountants import GaussianAccountant, PRVAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_sparta import DPStrategy, PrivacyBudgetCallback
from lightning_sparta.privacy.guards import check_precision
from lightning_sparta.privacy.sampler import DPDataLoader
from lightning_sparta.privacy.validation import IncompatibleModelError


def _data(n: int = 24, d: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))


class TinyModule(L.LightningModule):
    """A small classifier; ``reduction`` chooses how training_step reduces the loss."""

    def __init__(
        self,
        dataset: TensorDataset | None = None,
        batch_size: int = 24,
        reduction: str = "mean",
        lr: float = 1.0,
        momentum: float = 0.0,
        zero_loss: bool = False,
        width: int = 8,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3))
        self.dataset = dataset if dataset is not None else _data()
        self.batch_size, self.reduction, self.lr, self.momentum = batch_size, reduction, lr, momentum
        self.zero_loss = zero_loss
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.detach().clone())
        if self.reduction == "none":
            return F.cross_entropy(self(x), y, reduction="none")
        loss = F.cross_entropy(self(x), y, reduction=self.reduction)
        return loss * 0.0 if self.zero_loss else loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=8)


def _trainer(strategy: DPStrategy, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "max_epochs": 1,
    }
    return L.Trainer(strategy=strategy, **{**defaults, **kwargs})


def _clipped_sum_reference(
    module: TinyModule, x: torch.Tensor, y: torch.Tensor, clip: float
) -> dict[str, torch.Tensor]:
    """Σ_i clip(g_i) with g_i from torch.func, clipped over all parameters jointly."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(module, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.reshape(len(x), -1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", factor, g) for k, g in per_sample.items()}


@pytest.mark.parametrize("clipping", ["per_sample", "ghost", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("physical_batch_size", [None, 5])
def test_one_step_equals_clipped_sum_over_expected_batch_size(reduction, physical_batch_size, clipping):
    """σ = 0, q = 1: the update is -lr · Σ_i clip(g_i) / (q·n), for any loss reduction and micro-batching."""
    L.seed_everything(0)
    module = TinyModule(reduction=reduction, batch_size=24)  # batch_size == n, so q = 1: every sample, every step
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    x, y = module.dataset.tensors
    expected = _clipped_sum_reference(module, x, y, clip=0.05)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(
            noise_multiplier=0.0,
            max_grad_norm=0.05,
            loss_reduction="sum" if reduction == "sum" else "mean",
            physical_batch_size=physical_batch_size,
            clipping=clipping,
        )
    _trainer(strategy, max_steps=1).fit(module)
    assert strategy.sample_rate == 1.0
    for name, p in module.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name] / 24, atol=1e-6, rtol=1e-4)


def test_noise_std_matches_formula():
    """Zero gradients: the update is pure noise of std lr·σ·C/(q·n); 5050 coordinates, tolerance 6%.

    The relative standard error of a sample std over N = 5050 draws is 1/sqrt(2N) ≈ 1%.
    """
    L.seed_everything(1)
    module = TinyModule(zero_loss=True, batch_size=12, width=600, lr=0.5)
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    strategy = DPStrategy(noise_multiplier=2.0, max_grad_norm=0.3)
    _trainer(strategy, max_steps=1).fit(module)
    update = torch.cat([p.detach().flatten() for p in module.parameters()]) - before
    expected = 0.5 * 2.0 * 0.3 / (12 / 24 * 24)
    assert abs(update.std().item() / expected - 1) < 0.06
    assert abs(update.mean().item()) < 4 * expected / math.sqrt(update.numel())


def _hand_epsilon(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    if accountant == "rdp":
        orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
        eps, _ = get_privacy_spent(
            orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), delta=delta
        )
        return float(eps)
    acc = {"prv": PRVAccountant, "gdp": GaussianAccountant}[accountant]()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


class _ShrinkingModule(TinyModule):
    """A training set reloaded every epoch with fewer samples (120, 80, then 40): q grows from 10/120 to 10/40."""

    def __init__(self) -> None:
        super().__init__(dataset=_data(n=120), batch_size=10)

    def train_dataloader(self):
        n = 120 - 40 * self.current_epoch
        x, y = self.dataset.tensors
        return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=self.batch_size, shuffle=True)


def test_target_epsilon_holds_when_a_reloaded_training_set_changes_the_sample_rate():
    """σ calibrated at fit start for q = 1/12 and 36 steps; the reloads raise q to 1/8 and 1/4. Without a new
    calibration the run ended at ε = 2.86 for target_epsilon = 2. ε of the history is recomputed by hand
    with Opacus' RDP functions, composing the three rates."""
    L.seed_everything(0)
    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    with pytest.warns(UserWarning, match=r"holds 80 samples instead of 120 .* calibrated again"):
        _trainer(strategy, max_epochs=3, reload_dataloaders_every_n_epochs=1).fit(_ShrinkingModule())
    history = strategy.accountant.history
    assert [q for _, q, _ in history] == [10 / 120, 10 / 80, 10 / 40]
    assert [steps for _, _, steps in history] == [12, 8, 4]
    assert history[0][0] < history[1][0] < history[2][0]  # more noise for the steps at higher rates
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders) for sigma, q, steps in history)
    by_hand = float(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-3)[0])
    assert 2.0 - strategy.epsilon_tolerance <= by_hand <= 2.0
    assert strategy.epsilon() == pytest.approx(by_hand, rel=1e-9)


class _ExtendRun(L.Callback):
    """At the end of the second epoch, raises `max_epochs` from 3 to 5 (or `max_steps` from 12 to 20), after
    σ was calibrated for 12 steps."""

    def __init__(self, limit: str = "max_epochs") -> None:
        self.limit = limit

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 1 and self.limit == "max_epochs":
            trainer.fit_loop.max_epochs = 5
        elif trainer.current_epoch == 1:
            trainer.fit_loop.epoch_loop.max_steps = 20


@pytest.mark.parametrize(("limit", "min_epochs"), [("max_epochs", None), ("max_epochs", 5), ("max_steps", None)])
def test_target_epsilon_stops_a_run_whose_limits_grew_during_the_fit(limit, min_epochs):
    """σ is calibrated for 12 steps (3 epochs of 4); a callback asks for 5 epochs, or 20 steps. Before, the
    run took 20 steps and ended at ε = 2.58 for target_epsilon = 2. It now stops after the 12 steps of its
    plan, even with `min_epochs=5` (given back afterwards), and ε is checked by hand."""
    L.seed_everything(0)
    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    limits = {"max_epochs": 3} if limit == "max_epochs" else {"max_epochs": -1, "max_steps": 12}
    trainer = _trainer(strategy, **limits, min_epochs=min_epochs, callbacks=[_ExtendRun(limit)])
    with pytest.warns(UserWarning, match=r"stopped after step 12 at ε = .* would exceed target_epsilon=2"):
        trainer.fit(TinyModule(batch_size=6))
    assert strategy.steps == 12
    sigma = strategy.noise_multiplier
    assert _hand_epsilon("rdp", sigma, 0.25, 12, 1e-3) <= 2.0 < _hand_epsilon("rdp", sigma, 0.25, 13, 1e-3)
    assert trainer.fit_loop.min_epochs == (min_epochs or 0)  # Lightning keeps an unset one as 0


def test_a_run_that_ends_as_planned_does_not_warn_about_its_target():
    L.seed_everything(0)
    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DPStrategy: stopped")
        _trainer(strategy, max_epochs=3).fit(TinyModule(batch_size=6))
    assert strategy.steps == 12


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_epsilon_after_run_matches_accountant_by_hand(accountant):
    L.seed_everything(2)
    module = TinyModule(batch_size=6)  # q = 6/24, 4 steps per epoch
    strategy = DPStrategy(noise_multiplier=1.3, max_grad_norm=1.0, accountant=accountant, target_delta=1e-3)
    _trainer(strategy, max_epochs=3).fit(module)
    assert strategy.steps == 12
    expected = _hand_epsilon(accountant, 1.3, 0.25, 12, 1e-3)
    assert strategy.epsilon() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_target_epsilon_is_reached_after_exactly_the_run(accountant):
    L.seed_everything(3)
    module = TinyModule(batch_size=6)
    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-3, accountant=accountant, epsilon_tolerance=0.01)
    _trainer(strategy, max_epochs=2).fit(module)
    assert strategy.noise_multiplier is not None
    assert 2.0 - 0.011 <= strategy.epsilon() <= 2.0
    assert strategy.epsilon() == pytest.approx(
        _hand_epsilon(accountant, strategy.noise_multiplier, 0.25, 8, 1e-3), rel=1e-3
    )


def test_target_epsilon_counts_max_steps():
    module = TinyModule(batch_size=6)
    strategy = DPStrategy(target_epsilon=1.0, target_delta=1e-3, accountant="rdp")
    _trainer(strategy, max_epochs=5, max_steps=6).fit(module)
    assert strategy.steps == 6
    assert 0.98 <= strategy.epsilon() <= 1.0


def test_empty_batches_are_noise_only_steps():
    """q·n = 0.5: many empty batches; every one of them is a step (accounted, noised)."""
    L.seed_everything(4)
    module = TinyModule(batch_size=1, dataset=_data(n=2))  # q = 1/2 → P(empty) = 1/4 per step
    strategy = DPStrategy(noise_multiplier=1.0)
    _trainer(strategy, max_epochs=20).fit(module)
    assert strategy.steps == 40
    assert len(module.seen) < 40  # the module never saw the empty batches


def test_validation_runs_without_dp_machinery():
    module = TinyModule(batch_size=6)
    strategy = DPStrategy(noise_multiplier=1.0)
    trainer = _trainer(strategy, limit_val_batches=None, max_epochs=1)
    trainer.fit(module)
    assert isinstance(trainer.train_dataloader, DPDataLoader)
    assert not isinstance(trainer.val_dataloaders, DPDataLoader)
    trainer.validate(module, verbose=False)
    assert all(getattr(p, "grad_sample", None) is None for p in module.parameters())
    assert strategy.steps == 4  # validation took no private step


def test_fresh_batches_each_epoch_and_reproducible_under_seed():
    def run(seed: int) -> list[torch.Tensor]:
        L.seed_everything(seed)
        module = TinyModule(batch_size=6)
        _trainer(DPStrategy(noise_multiplier=1.0), max_epochs=2).fit(module)
        return module.seen

    a, b, c = run(5), run(5), run(6)
    assert len(a) == len(b)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a[:4], a[4:], strict=True))  # epoch 1 differs from epoch 0
    assert not all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(a, c, strict=False))


def test_bf16_mixed_trains():
    module = TinyModule(batch_size=6)
    strategy = DPStrategy(noise_multiplier=1.0)
    _trainer(strategy, precision="bf16-mixed").fit(module)
    assert strategy.steps == 4


@pytest.mark.parametrize(
    ("every", "resume_step"),
    [(5, 5), (4, 4), (4, 8)],
    ids=["mid-epoch", "last-batch-of-epoch-0", "last-batch-of-epoch-1"],
)
def test_resume_from_mid_run_checkpoint_gives_same_epsilon_and_weights(tmp_path, every, resume_step):
    # 4 steps per epoch: a checkpoint at step 4 or 8 is written in on_train_batch_end of an epoch's last
    # batch, which Lightning resumes at the start of the next epoch.
    def run(ckpt_path=None, every=None, max_epochs=3):
        L.seed_everything(7)
        module = TinyModule(batch_size=6, momentum=0.9, lr=0.1)
        strategy = DPStrategy(target_epsilon=3.0, target_delta=1e-3, seed=11)
        callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1)] if every else []
        trainer = _trainer(strategy, max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=bool(every))
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, strategy

    full, full_strategy = run(every=every)
    mid = sorted(tmp_path.glob(f"*step={resume_step}.ckpt"))
    assert mid, list(tmp_path.iterdir())
    resumed, resumed_strategy = run(ckpt_path=mid[0])
    assert resumed_strategy.steps == full_strategy.steps == 12
    assert resumed_strategy.noise_multiplier == full_strategy.noise_multiplier
    assert resumed_strategy.epsilon() == pytest.approx(full_strategy.epsilon(), rel=1e-9)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name, atol=1e-6, rtol=1e-5)


def test_budget_callback_stops_before_exceeding_and_logs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = TinyModule(batch_size=6)
    strategy = DPStrategy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp")
    cb = PrivacyBudgetCallback(stop_at_epsilon=2.0, log_every_n_steps=1)
    trainer = _trainer(strategy, max_epochs=50, callbacks=[cb], logger=CSVLogger(tmp_path))
    trainer.fit(module)
    assert cb.stopped_early
    assert strategy.epsilon() <= 2.0 < strategy.epsilon_after(1)
    assert strategy.steps > 0
    assert _hand_epsilon("rdp", 1.0, 0.25, strategy.steps + 1, 1e-3) > 2.0
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "epsilon" in logged
    assert "privacy/noise_multiplier" in logged
    assert "Privacy summary" in cb.summary(strategy)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of `noise_multiplier` and `target_epsilon`"),
        ({"noise_multiplier": 1.0, "target_epsilon": 1.0}, "exactly one"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "target_delta": 0.0}, "target_delta"),
        ({"noise_multiplier": 1.0, "target_delta": 1.0}, "target_delta"),
        ({"noise_multiplier": 1.0, "accountant": "moments"}, "accountant"),
        ({"noise_multiplier": 1.0, "physical_batch_size": 0}, "physical_batch_size"),
        ({"noise_multiplier": 1.0, "loss_reduction": "none"}, "loss_reduction"),
        ({"noise_multiplier": 1.0, "clipping": "bogus"}, r"`clipping` must be one of .*got 'bogus'"),
        ({"noise_multiplier": 1.0, "tune_malloc": "yes"}, r"`tune_malloc` must be True or False, got 'yes'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPStrategy(**kwargs)


def test_delta_not_smaller_than_one_over_n_warns():
    with pytest.warns(UserWarning, match="1/n"):
        _trainer(DPStrategy(noise_multiplier=1.0, target_delta=0.1)).fit(TinyModule(batch_size=6))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_target_epsilon_without_run_length():
    trainer = _trainer(DPStrategy(target_epsilon=1.0), max_epochs=None)
    with pytest.raises(ValueError, match="max_epochs"):
        trainer.fit(TinyModule(batch_size=6))


class _Manual(TinyModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class _TwoOptimizers(TinyModule):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


class _BatchNorm(TinyModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3))


class _Lazy(TinyModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 3))


class _Iterable(IterableDataset):
    def __iter__(self):
        yield from zip(torch.randn(4, 6), torch.zeros(4, dtype=torch.long), strict=True)


class _IterableData(TinyModule):
    def train_dataloader(self):
        return DataLoader(_Iterable(), batch_size=2)


class _NoData(TinyModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), batch_size=2)


@pytest.mark.parametrize(
    ("module_cls", "trainer_kwargs", "error", "match"),
    [
        (_Manual, {}, ValueError, "automatic optimization"),
        (_TwoOptimizers, {}, Exception, "optimizer"),
        (_BatchNorm, {}, IncompatibleModelError, r"net\.1 \(BatchNorm1d\).*GroupNorm"),
        (_Lazy, {}, IncompatibleModelError, r"net\.0 \(LazyLinear\).*dummy batch"),
        (_IterableData, {}, TypeError, "IterableDataset"),
        (_NoData, {}, ValueError, "empty"),
        (TinyModule, {"accumulate_grad_batches": 2}, ValueError, "physical_batch_size"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_refused_configurations(module_cls, trainer_kwargs, error, match):
    trainer, module = _trainer(DPStrategy(noise_multiplier=1.0), **trainer_kwargs), module_cls()
    with pytest.raises(error, match=match):
        trainer.fit(module)


def test_float16_mixed_precision_is_refused():
    """On CPU Lightning turns 16-mixed into bf16-mixed, so the GradScaler case is checked on the plugin itself."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cuda", enabled=False))
    with pytest.raises(ValueError, match=r"precision='16-mixed'.*GradScaler"):
        check_precision("16-mixed", plugin)
    with pytest.raises(ValueError, match="precision='16-true'"):
        check_precision("16-true", object())
    check_precision("bf16-mixed", MixedPrecision("bf16-mixed", "cpu"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_parameter_used_outside_its_module_is_refused():
    class Temperature(TinyModule):
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.ones(()))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x) / self.temperature, y)

    trainer, module = _trainer(DPStrategy(noise_multiplier=1.0)), Temperature()
    with pytest.raises(RuntimeError, match=r"temperature.*add up"):
        trainer.fit(module)


class _EvalBackbone(TinyModule):
    """Puts trainable layers in eval() (the usual way to switch off dropout or freeze statistics in a
    backbone), from the first epoch or from the second one."""

    def __init__(self, from_epoch: int):
        super().__init__(batch_size=24)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))
        self.from_epoch = from_epoch

    def on_train_epoch_start(self):
        if self.current_epoch >= self.from_epoch:
            self.net[:3].eval()


class _ClippedSumReference(L.Callback):
    """At the start of the last epoch: the parameters and Σ_i clip(g_i) of the whole dataset, from torch.func."""

    def __init__(self, clip: float):
        self.clip, self.params, self.sums = clip, {}, {}

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch != trainer.max_epochs - 1:
            return
        module.net[:3].eval()  # as the module's own hook will (callbacks run first)
        x, y = module.dataset.tensors
        self.params = {k: v.detach().clone() for k, v in module.named_parameters()}

        def loss_one(p, xi, yi):
            return F.cross_entropy(functional_call(module, p, (xi[None],)), yi[None])

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(self.params, x, y)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
        factors = (self.clip / (norms + 1e-6)).clamp(max=1.0)
        self.sums = {k: torch.einsum("i,i...->...", factors, g) for k, g in per_sample.items()}


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
@pytest.mark.parametrize("from_epoch", [0, 1])
def test_layers_in_eval_mode_train_with_their_per_sample_gradients(clipping, from_epoch):
    """Hooks skipped modules in eval(): from the first step such a model was refused by the sum check as if
    its parameters were used outside their modules; switched during the run, those parameters silently
    stopped training (their clipped sums were empty). σ = 0, q = 1, SGD lr = 1: the last step's update is
    Σ_i clip(g_i)/n with g_i from torch.func on the model in its modes at that step."""
    module = _EvalBackbone(from_epoch)
    reference = _ClippedSumReference(clip=0.05)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, clipping=clipping)
    _trainer(strategy, max_epochs=from_epoch + 1, callbacks=[reference]).fit(module)
    assert strategy.sample_rate == 1.0
    n = len(module.dataset)
    for name, p in module.named_parameters():
        expected = reference.params[name] - reference.sums[name] / n
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=name)


def test_one_process_keeps_the_users_thread_count(monkeypatch):
    """No launcher for one process: Lightning's would call torch.set_num_threads(cpu_count) when
    OMP_NUM_THREADS is unset, overriding what the user chose (and skewing CPU benchmarks)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        strategy = DPStrategy(noise_multiplier=1.0)
        trainer = _trainer(strategy)
        assert trainer.strategy.launcher is None
        trainer.fit(TinyModule(batch_size=6))
        assert strategy.steps == 4
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resuming_a_longer_run_stops_at_the_target_epsilon(tmp_path):
    """σ comes from the checkpoint; a resumed run with more epochs silently overshot the target, then (until
    2026-12-04) overshot it with a warning. It now warns and stops after the last step within the target."""

    def run(max_epochs, ckpt_path=None):
        strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-3, seed=3, accountant="rdp")
        callbacks = [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)]
        trainer = _trainer(strategy, max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(TinyModule(batch_size=6), ckpt_path=ckpt_path)
        return strategy

    first = run(max_epochs=2)
    assert first.epsilon() == pytest.approx(2.0, rel=0.02)
    checkpoint = tmp_path / "epoch=0-step=4.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=r"(?!DPStrategy: σ = )")  # only ours turns into an error
        same = run(max_epochs=2, ckpt_path=checkpoint)  # the original plan: no warning
    assert same.epsilon() == pytest.approx(first.epsilon(), rel=1e-9)
    longer_eps = first.epsilon_after(4)  # two epochs of 4 steps done, one more planned
    with pytest.warns(UserWarning, match=rf"would end at ε = {longer_eps:.3f} > target_epsilon=2, so it stops after"):
        longer = run(max_epochs=3, ckpt_path=checkpoint)
    sigma = longer.noise_multiplier
    assert longer.steps >= 8  # the original plan fits
    assert (
        _hand_epsilon("rdp", sigma, 0.25, longer.steps, 1e-3)
        <= 2.0
        < _hand_epsilon("rdp", sigma, 0.25, longer.steps + 1, 1e-3)
    )


_OTHER_SHAPES = {
    "conv_transpose": (2, 4, 4),
    "conv1d": (2, 16),
    "conv3d": (2, 3, 3, 3),
    "prelu": (32,),
    "bilinear": (32,),
}


class _OtherLayers(TinyModule):
    """Layers outside the vision zoos: transposed, 1-D and 3-D convolutions, PReLU, Bilinear."""

    def __init__(self, kind: str) -> None:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(8, *_OTHER_SHAPES[kind], generator=g), torch.randint(0, 3, (8,), generator=g))
        super().__init__(dataset=data, batch_size=8)
        torch.manual_seed(0)
        self.kind = kind
        self.net = {
            "conv_transpose": lambda: nn.Sequential(
                nn.ConvTranspose2d(2, 3, 3, stride=2), nn.Flatten(), nn.Linear(243, 3)
            ),
            "conv1d": lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(42, 3)),
            "conv3d": lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.Flatten(), nn.Linear(24, 3)),
            "prelu": lambda: nn.Sequential(nn.Linear(32, 8), nn.PReLU(8), nn.Linear(8, 3)),
            "bilinear": lambda: nn.Bilinear(16, 16, 3),
        }[kind]()

    def forward(self, x):
        return self.net(x[:, :16], x[:, 16:]) if self.kind == "bilinear" else self.net(x)


@pytest.mark.parametrize("clipping", ["per_sample", "auto"])
@pytest.mark.parametrize("kind", list(_OTHER_SHAPES))
def test_other_layer_types_step_equals_clipped_sum(kind, clipping):
    """σ = 0, q = 1: one step on each layer type equals Σ_i clip(g_i)/n from `torch.func`, whichever path
    (a grad sampler, a ghost form, the per-sample replay) the layer takes."""
    L.seed_everything(0)
    module = _OtherLayers(kind)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    x, y = module.dataset.tensors
    expected = _clipped_sum_reference(module, x, y, clip=0.05)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, clipping=clipping)
    _trainer(strategy, max_steps=1).fit(module)
    for name, p in module.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name] / 8, atol=1e-6, rtol=1e-4, msg=name)


class _Checkpointed(TinyModule):
    """A block run under `torch.utils.checkpoint` (its forward, and the hooks, run twice); ``pre`` decides
    whether the block's input needs a gradient, ``checkpointed=False`` runs it plainly (for the reference)."""

    def __init__(self, use_reentrant: bool, pre: bool = True) -> None:
        super().__init__(batch_size=24)
        torch.manual_seed(0)
        self.pre = nn.Linear(6, 6) if pre else nn.Identity()
        self.block = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.use_reentrant, self.checkpointed = use_reentrant, True
        del self.net

    def forward(self, x):
        x = self.pre(x)
        if self.checkpointed:
            x = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant)
        else:
            x = self.block(x)
        return self.head(x)


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_step_equals_clipped_sum(use_reentrant, clipping):
    """Activation checkpointing (timm's `set_grad_checkpointing`) reruns a block's forward in the backward
    pass. σ = 0, q = 1: one step equals Σ_i clip(g_i)/n from `torch.func` on the same model run plainly,
    and no parameter is reported as left without a gradient."""
    L.seed_everything(0)
    module = _Checkpointed(use_reentrant)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    x, y = module.dataset.tensors
    module.checkpointed = False  # torch.func cannot differentiate through a checkpoint
    expected = _clipped_sum_reference(module, x, y, clip=0.05)
    module.checkpointed = True
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, clipping=clipping)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*got no gradient")
        _trainer(strategy, max_steps=1).fit(module)
    for name, p in module.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name] / 24, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("clipping", ["per_sample", "ghost"])
@pytest.mark.parametrize("case", ["unused_head", "reentrant_checkpoint_on_the_data"])
def test_trainable_parameters_without_a_gradient_are_named(case, clipping):
    """A trainable parameter the loss does not reach gets noise alone at every step (the noise must not
    depend on which parameters a batch reaches). Non-private training would leave it as it is, so the
    first step names it: an unused head, or a block behind a reentrant checkpoint whose input is the data
    (PyTorch then computes no gradient inside it)."""
    L.seed_everything(0)
    if case == "unused_head":
        module = TinyModule(batch_size=24)
        module.aux = nn.Linear(8, 2)
        unused = ["aux.weight", "aux.bias"]
    else:
        module = _Checkpointed(use_reentrant=True, pre=False)
        unused = ["block.0.weight", "block.0.bias", "block.1.weight", "block.1.bias"]
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, clipping=clipping), max_steps=1).fit(module)
    said = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
    assert len(said) == 1, said
    assert f"{len(unused)} trainable parameter(s)" in said[0]
    for name in unused:
        assert f"`{name}`" in said[0]
        assert not torch.equal(before[name], dict(module.named_parameters())[name]), name  # noise alone
