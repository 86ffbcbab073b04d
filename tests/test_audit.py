"""Privacy auditing in one run (issue 13): the bound against the theorem computed by hand, and the audit in real runs.

The bound (Steinke, Nasr & Jagielski 2023, main theorem): ``v`` correct guesses out of ``r`` has p-value
``f(v) + 2mδ·max_i (f(v-i) - f(v))/i`` with ``f(u) = P[Binomial(r, e^ε/(1+e^ε)) >= u]``; the ε lower bound
is the largest ε still rejected at level 1 - confidence. The reference values here are computed with
``math`` only (binomial sums by ``math.comb``, bisection), independently of the scipy code under test.

The runs: a σ = 0 run must give a bound above the ε of a private configuration (a regression that drops
the noise fails here), and private runs must stay below their ε, with DPStrategy alone, with
SpartaMaskCallback, and in 2-process DDP.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparta import DPStrategy, SpartaMaskCallback
from lightning_sparta.audit import (
    CanaryDataset,
    PrivacyAuditCallback,
    count_correct_guesses,
    epsilon_lower_bound,
    p_value,
)
from lightning_sparta.privacy import epsilon_for

WORKER = Path(__file__).with_name("audit_ddp_worker.py")


# ------------------------------------------------------------------------------------ reference (math only)
def _tail(r: int, v: int, prob: float) -> float:
    """P[Binomial(r, prob) >= v] by direct summation."""
    return sum(math.comb(r, k) * prob**k * (1 - prob) ** (r - k) for k in range(max(v, 0), r + 1))


def _reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    prob = math.exp(eps) / (1 + math.exp(eps))
    f = _tail(r, v, prob)
    correction = max((_tail(r, v - i, prob) - f) / i for i in range(1, m + 1))  # every i of the theorem
    return min(1.0, f + 2 * m * delta * correction)


def _reference_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """Bisection on ε (the p-value is increasing in ε for these cases)."""
    if _reference_p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    low, high = 0.0, 30.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _reference_p_value(m, r, v, mid, delta) <= beta else (low, mid)
    return low


# ------------------------------------------------------------------------------------ the bound
def test_all_correct_pure_dp_is_a_closed_form():
    """δ = 0, v = r: P[W >= r] = p^r <= β  <=>  ε <= log(p/(1-p)) with p = β^(1/r)."""
    for r, beta in ((10, 0.05), (100, 0.05), (500, 0.01)):
        p = beta ** (1 / r)
        exact = math.log(p / (1 - p))
        bound = epsilon_lower_bound(r, r, delta=0.0, confidence=1 - beta, resolution=1e-3)
        assert exact - 1e-3 <= bound <= exact, (r, bound, exact)
    assert epsilon_lower_bound(10, 10, confidence=0.95) == pytest.approx(1.051, abs=1e-9)  # logit(0.05^0.1) = 1.0519


@pytest.mark.parametrize(("m", "r", "v", "delta"), [(60, 40, 36, 0.0), (200, 100, 80, 0.0), (50, 30, 28, 1e-3)])
def test_bound_matches_the_theorem_computed_by_hand(m, r, v, delta):
    exact = _reference_bound(m, r, v, delta, beta=0.05)
    bound = epsilon_lower_bound(r, v, delta=delta, confidence=0.95, num_canaries=m, resolution=1e-3)
    assert exact - 1e-3 - 1e-9 <= bound <= exact + 1e-9, (bound, exact)
    assert exact > 0.5  # the cases are significant, so the comparison is not 0 == 0


def test_p_value_of_a_small_case_by_hand():
    """r = v = m = 2: f(2) = p², the δ term is 2·2·δ·max(P[W=1]/1, P[W∈{0,1}]/2)."""
    eps, delta = 1.0, 0.01
    p = math.exp(eps) / (1 + math.exp(eps))
    by_hand = p**2 + 4 * delta * max(2 * p * (1 - p), (1 - p**2) / 2)
    assert p_value(2, 2, epsilon=eps, delta=delta, num_canaries=2) == pytest.approx(by_hand, rel=1e-12)
    for m, r, v, d in ((10, 8, 7, 1e-2), (30, 20, 11, 0.0), (30, 20, 20, 1e-3)):
        assert p_value(r, v, 0.7, d, num_canaries=m) == pytest.approx(_reference_p_value(m, r, v, 0.7, d), rel=1e-9)


def test_bound_is_monotone():
    r = 100
    by_correct = [epsilon_lower_bound(r, v, delta=1e-5, num_canaries=400) for v in range(50, r + 1, 5)]
    assert by_correct == sorted(by_correct)
    assert by_correct[-1] > by_correct[0]
    by_delta = [epsilon_lower_bound(r, 95, delta=d, num_canaries=400) for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert by_delta == sorted(by_delta, reverse=True)
    assert by_delta[0] > by_delta[-1]
    by_confidence = [epsilon_lower_bound(r, 95, confidence=c) for c in (0.5, 0.9, 0.95, 0.99)]
    assert by_confidence == sorted(by_confidence, reverse=True)
    assert by_confidence[0] > by_confidence[-1]
    by_canaries = [epsilon_lower_bound(r, 95, delta=1e-4, num_canaries=m) for m in (100, 1000, 5000)]
    assert by_canaries == sorted(by_canaries, reverse=True)
    by_guesses = [epsilon_lower_bound(r, r, confidence=0.95) for r in (10, 50, 200, 1000)]
    assert by_guesses == sorted(by_guesses)
    assert by_guesses[0] < by_guesses[-1]


def test_bound_edge_cases():
    assert epsilon_lower_bound(0, 0) == 0.0
    assert epsilon_lower_bound(10, 0) == 0.0
    assert epsilon_lower_bound(1, 1) == 0.0  # one right guess is never significant at 95%: P = p >= 1/2
    assert epsilon_lower_bound(100, 50) == 0.0
    assert epsilon_lower_bound(100, 60) > 0.0  # P[Bin(100, 1/2) >= 60] = 0.028: significant at ε = 0 already
    with pytest.raises(ValueError, match="num_correct"):
        epsilon_lower_bound(5, 6)
    with pytest.raises(ValueError, match="num_canaries"):
        epsilon_lower_bound(5, 5, delta=1e-5)
    with pytest.raises(ValueError, match="num_canaries"):
        epsilon_lower_bound(5, 5, delta=1e-5, num_canaries=4)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(5, 5, confidence=1.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound(5, 5, delta=-1.0, num_canaries=5)
    with pytest.raises(ValueError, match="num_guesses"):
        epsilon_lower_bound(-1, 0)


def test_bound_is_sound_on_randomized_response():
    """An ε-DP mechanism (randomised response on each inclusion bit): the 95% bound exceeds ε in <= ~5% of runs."""
    eps, r, trials = 1.0, 200, 300
    rng = np.random.default_rng(0)
    prob = math.exp(eps) / (1 + math.exp(eps))
    correct = rng.binomial(r, prob, size=trials)  # each guess is right with probability e^ε/(1+e^ε)
    exceed = sum(epsilon_lower_bound(r, int(v), confidence=0.95, resolution=1e-2) > eps for v in correct)
    assert exceed / trials <= 0.09  # expected <= 5%; binomial std of the rate is 1.3%
    assert np.median([epsilon_lower_bound(r, int(v), resolution=1e-2) for v in correct[:20]]) > 0.3  # not vacuous


def test_guesses_take_the_extremes_and_break_ties_at_random():
    scores = [5.0, 0.0, 0.0, 0.0, 0.0, 4.0]
    included = [True, False, True, False, False, True]
    assert count_correct_guesses(scores, included, k_plus=2, k_minus=0) == (2, 2)
    # four tied zeros (one included): the 2 "out" guesses are drawn among them, not by index order
    outcomes = {count_correct_guesses(scores, included, 0, 2, tie_break_seed=s)[1] for s in range(30)}
    assert outcomes == {1, 2}
    with pytest.raises(ValueError, match="exceeds"):
        count_correct_guesses(scores, included, 4, 3)


# ------------------------------------------------------------------------------------ the audit in a run
N, BATCH, CLASSES, EPOCHS = 64, 16, 3, 8  # q = 1/4, 32 steps


class Module(L.LightningModule):
    def __init__(self, dataset) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, CLASSES))
        self.dataset = dataset

    def forward(self, x):
        return self.net(x)

    def get_classifier(self) -> nn.Module:
        return self.net[2]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=BATCH)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, CLASSES, (N,), generator=g))


def _audit(
    sigma: float,
    canaries: int = 400,
    sparta: bool = False,
    reuse_noise: bool = False,
    included: bool | None = None,
    **audit_kwargs,
):
    L.seed_everything(0)
    audit = PrivacyAuditCallback(gradient_canaries=canaries, seed=1, **audit_kwargs)
    if included is not None:
        audit.gradient_included[:] = included
    data = audit.wrap_dataset(_data(), num_classes=CLASSES) if audit.input_canaries else _data()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="noise_multiplier=0")
        strategy = DPStrategy(noise_multiplier=sigma, max_grad_norm=1.0, seed=2, accountant="rdp")
    if reuse_noise:  # the bug to catch: the same noise vector at every step
        # the strategy's draws land in one buffer it rewrites every step: keep a copy of the first
        fresh, drawn = strategy._standard_noise, {}
        strategy._standard_noise = lambda numel, device: drawn.setdefault(numel, fresh(numel, device).clone())
    callbacks = [audit, *([SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.5)] if sparta else [])]
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="noise_multiplier=0|.*exceeds the accountant")
        trainer.fit(Module(data))
    return audit, strategy


# A private configuration of this task: σ = 3 over the same 32 steps at q = 1/4.
PRIVATE_SIGMA = 3.0


def test_audit_of_a_run_without_noise_exceeds_a_private_epsilon():
    """σ = 0: every guess is right and the bound is far above what σ = 3 would give: losing the noise fails here."""
    private_epsilon = epsilon_for([(PRIVATE_SIGMA, BATCH / N, EPOCHS * N // BATCH)], 1e-5, "rdp")
    audit, _strategy = _audit(0.0)
    best = audit.best("gradient")
    assert best is not None
    assert best.num_correct == best.num_guesses == 200
    assert best.epsilon_lower_bound > private_epsilon + 1.5, (best, private_epsilon)
    assert math.isinf(best.epsilon_accountant)
    assert best.consistent
    metrics = audit.metrics()
    assert metrics["audit/gradient_epsilon_lower_bound"] == best.epsilon_lower_bound
    assert "NOT PRIVATE" in audit.summary()


@pytest.mark.parametrize("sigma", [1.0, PRIVATE_SIGMA])
def test_audit_of_a_private_run_stays_below_its_epsilon(sigma):
    audit, strategy = _audit(sigma)
    epsilon = strategy.epsilon()
    assert len(audit.results) == 2  # both white-box scores, each at 97.5%
    for result in audit.results:
        assert result.confidence == pytest.approx(0.975)
        assert result.epsilon_lower_bound <= epsilon, result
        assert result.epsilon_accountant == epsilon
    assert audit.observed_steps == EPOCHS * N // BATCH
    assert f"ε = {epsilon:.3f}" in audit.summary()


def test_audit_catches_noise_reused_across_steps():
    """The increments score sees that the noise does not change between steps; the total update cannot."""
    audit, strategy = _audit(PRIVATE_SIGMA, reuse_noise=True)
    by_score = {r.kind: r for r in audit.results}
    assert by_score["gradient/increments"].epsilon_lower_bound > strategy.epsilon()
    assert not audit.best("gradient").consistent


@pytest.mark.parametrize("included", [True, False])
def test_canaries_enter_the_update_before_the_noise(included):
    """σ = 0: an included canary's observed contribution is k·C (it entered k of 32 steps, k ~ Bin(32, 1/4));
    an excluded one's is 0. The observation is the private gradient times q·n minus the clipped data sum."""
    audit, _strategy = _audit(0.0, canaries=3, included=included)
    scores = audit.gradient_scores_of("update")
    if included:
        assert np.allclose(scores, np.round(scores), atol=1e-3)
        assert (scores >= 1).all()
        assert (scores <= 20).all()
    else:
        assert np.abs(scores).max() < 1e-3


def test_audit_with_sparta_and_input_canaries():
    audit, _strategy = _audit(1.0, canaries=200, sparta=True, input_canaries=10)
    kinds = {r.kind for r in audit.results}
    assert kinds == {"gradient/update", "gradient/increments", "input"}
    assert all(r.consistent for r in audit.results)
    # SPARTA's scoring epoch (4 steps) has no update: only DP-SGD steps are observed
    assert audit.observed_steps == (EPOCHS - 1) * N // BATCH
    assert audit.best("input").num_canaries == 10


def test_wrap_dataset_removes_excluded_canaries():
    audit = PrivacyAuditCallback(gradient_canaries=0, input_canaries=20, seed=4)
    base = TensorDataset(torch.arange(100.0), torch.arange(100) % 5)
    data = audit.wrap_dataset(base, num_classes=5)
    assert isinstance(data, CanaryDataset)
    assert len(data) == 100 - 20 + int(audit.input_included.sum())
    xs = [int(data[i][0]) for i in range(len(data))]
    for j, index in enumerate(data.canary_indices):
        assert xs.count(int(index)) == int(audit.input_included[j])  # included once (mislabelled), else absent
        assert int(data.canary(j)[1]) != int(index) % 5
    again = PrivacyAuditCallback(gradient_canaries=0, input_canaries=20, seed=4).wrap_dataset(base, num_classes=5)
    assert [int(again[i][0]) for i in range(len(again))] == xs  # deterministic: DDP ranks agree


def test_misconfiguration_is_refused():
    with pytest.raises(ValueError, match="nothing to audit"):
        PrivacyAuditCallback(gradient_canaries=0)
    with pytest.raises(ValueError, match="gradient_scores"):
        PrivacyAuditCallback(gradient_scores=("loss",))
    with pytest.raises(ValueError, match="guess_fraction"):
        PrivacyAuditCallback(guess_fraction=0.0)
    with pytest.raises(ValueError, match="distinct coordinates"):
        _audit(1.0, canaries=10_000)
    audit = PrivacyAuditCallback(gradient_canaries=0, input_canaries=4)
    trainer = L.Trainer(
        strategy=DPStrategy(noise_multiplier=1.0, seed=0),
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[audit],
    )
    with pytest.raises(ValueError, match="wrap_dataset"):
        trainer.fit(Module(_data()))


def test_clipped_sum_hook_can_be_removed():
    strategy = DPStrategy(noise_multiplier=1.0)
    remove = strategy.add_clipped_sum_hook(lambda params, sums: None)
    assert len(strategy._clipped_sum_hooks) == 1
    remove()
    remove()
    assert strategy._clipped_sum_hooks == []


def test_state_dict_round_trip():
    audit, _ = _audit(1.0, canaries=50)
    state = audit.state_dict()
    fresh = PrivacyAuditCallback(gradient_canaries=50, seed=1)
    fresh.load_state_dict(state)
    assert np.array_equal(fresh.gradient_scores_of("update"), audit.gradient_scores_of("update"))
    assert fresh.observed_steps == audit.observed_steps
    assert fresh.coordinates.keys() == audit.coordinates.keys()
    with pytest.raises(ValueError, match="seed"):
        PrivacyAuditCallback(gradient_canaries=50, seed=2).load_state_dict(state)


# ------------------------------------------------------------------------------------ DDP
def _run_ddp(tmp_path: Path, mode: str) -> list[dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero", "sparta"])
def test_audit_in_two_process_ddp(tmp_path, mode):
    """Canaries are added once (rank 0), the data sums of both ranks are subtracted, both ranks report the same."""
    r0, r1 = _run_ddp(tmp_path, mode)
    assert r0["world_size"] == 2
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["results"] == r1["results"]
    assert np.array_equal(r0["update"], r1["update"])
    best = max((r for r in r0["results"] if r.kind.startswith("gradient")), key=lambda r: r.epsilon_lower_bound)
    if mode == "zero":
        # no noise: included canaries score k·C (k >= 1 times entered), excluded ones exactly 0 up to rounding
        excluded = r0["update"][~r0["included"]]
        assert np.abs(excluded).max() < 1e-3
        assert best.num_correct == best.num_guesses
        assert best.epsilon_lower_bound > 2.5
    else:
        assert best.epsilon_lower_bound <= r0["epsilon"]
        assert r0["observed_steps"] == 7 * 4  # the scoring epoch has no update
