"""Privacy guarantees of the callbacks that a Trainer setting or a custom selector must not weaken.

* ``PrivacyBudgetCallback(stop_at_epsilon=...)`` wins over ``Trainer(min_epochs=..., min_steps=...)``
  (issue 8, defect 4): a minimum that the budget cannot afford is refused when fitting starts, and a
  stop at run time is honoured even while a minimum is not met.
* A selector's privacy follows from what its scoring does (issue 8, defect 7): unclipped, noiseless
  scoring is refused without ``allow_non_private`` and reports ε = ∞ with it.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_sparta import DPStrategy, PrivacyBudgetCallback, SpartaMaskCallback
from lightning_sparta.privacy import epsilon_for
from lightning_sparta.sparse.selectors import MaskSelector, get_selector, top_rows
from test_sparta import _fit
from test_strategy import TinyModule, _data, _trainer

# TinyModule: 24 samples, batch 6 -> q = 1/4, four Poisson steps per epoch. With σ = 1, δ = 1e-3 and the
# RDP accountant, ε stays within 6.0 for exactly 17 steps (4.25 epochs).
BUDGET, BUDGET_STEPS, PER_EPOCH = 6.0, 17, 4


def _budget_fit(callbacks=(), **trainer_kwargs):
    module = TinyModule(batch_size=6)
    strategy = DPStrategy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp", seed=1)
    budget = PrivacyBudgetCallback(stop_at_epsilon=BUDGET)
    trainer = _trainer(strategy, callbacks=[budget, *callbacks], **{"max_epochs": 10, **trainer_kwargs})
    trainer.fit(module)
    return strategy, budget, trainer


def test_budget_arithmetic_of_these_tests():
    def eps(steps: int) -> float:
        return epsilon_for([(1.0, 0.25, steps)], 1e-3, "rdp")

    assert eps(BUDGET_STEPS) <= BUDGET < eps(BUDGET_STEPS + 1)


# ------------------------------------------------------------------------------------ defect 4: minimums
@pytest.mark.parametrize(
    ("minimum", "needed"),
    [({"min_epochs": 8}, 8 * PER_EPOCH), ({"min_steps": 30}, 30)],
)
def test_minimum_beyond_budget_is_refused_when_fitting_starts(minimum, needed):
    """min_epochs/min_steps that need more steps than stop_at_epsilon allows: ValueError, no step taken."""
    ((setting, value),) = minimum.items()
    with pytest.raises(ValueError, match=rf"`stop_at_epsilon={BUDGET}`") as info:
        _budget_fit(**minimum)
    message = str(info.value)
    assert f"`{setting}={value}`" in message
    assert f"{needed} private steps" in message
    assert f"allows {BUDGET_STEPS}" in message


@pytest.mark.parametrize("minimum", [{"min_epochs": 4}, {"min_steps": BUDGET_STEPS}])
def test_minimum_within_budget_runs_and_stops_at_the_budget(minimum):
    strategy, budget, _ = _budget_fit(**minimum)
    assert budget.stopped_early
    assert strategy.steps == BUDGET_STEPS
    assert strategy.epsilon() <= BUDGET < strategy.epsilon_after(1)


class RaiseMinimum(Callback):
    """At epoch 1, raises a Trainer minimum beyond the budget (after the check at fit start); with
    ``early_stop`` also asks the Trainer to stop, as ``EarlyStopping`` would (ignored: minimum unmet)."""

    def __init__(self, setting: str, value: int, early_stop: bool) -> None:
        self.setting, self.value, self.early_stop = setting, value, early_stop

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            if self.setting == "min_epochs":
                trainer.fit_loop.min_epochs = self.value
            else:
                trainer.fit_loop.epoch_loop.min_steps = self.value
            trainer.should_stop = trainer.should_stop or self.early_stop


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize(("setting", "value"), [("min_epochs", 10), ("min_steps", 40)])
def test_budget_stop_wins_over_an_unmet_minimum_at_run_time(setting, value, early_stop):
    """Lightning ignores `should_stop` until the minimums are met; the budget must stop the run anyway."""
    raise_minimum = RaiseMinimum(setting, value, early_stop)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy, budget, trainer = _budget_fit(callbacks=[raise_minimum], **{setting: 1})
    assert strategy.epsilon() <= BUDGET
    assert strategy.steps == BUDGET_STEPS
    assert budget.stopped_early
    assert any(re.search(rf"`{setting}={value}`.*not met", str(w.message)) for w in caught)
    # the Trainer's own setting is given back after fitting
    current = trainer.fit_loop.min_epochs if setting == "min_epochs" else trainer.fit_loop.epoch_loop.min_steps
    assert current == value


# ------------------------------------------------------------------------------------ defect 7: selectors
class TrueAbsRows(MaskSelector):
    """A custom selector on true (unclipped, noiseless) |g|, leaving ``private`` at its default."""

    name = "true_abs_rows"
    needs_scoring = True
    scoring = "true_abs"
    granularity = "row"

    def select_layer(self, weight: Tensor, score: Tensor | None, fraction: float, generator) -> Tensor:
        assert score is not None
        return top_rows(score, fraction)


class ClippedRows(TrueAbsRows):
    name = "clipped_rows"
    scoring = "abs_clipped"


def test_privacy_follows_scoring():
    assert TrueAbsRows().private is False
    assert ClippedRows().private is True
    assert {name: get_selector(name).private for name in ("sparta", "dp_gradient", "oracle", "magnitude", "all")} == {
        "sparta": True,
        "dp_gradient": True,
        "oracle": False,
        "magnitude": True,
        "all": True,
    }
    with pytest.raises(AttributeError):
        TrueAbsRows().private = True  # type: ignore[misc]


def test_private_that_contradicts_scoring_is_refused():
    with pytest.raises(TypeError, match=r"private = True.*scoring = 'true_abs'"):

        class Liar(TrueAbsRows):  # claims privacy for noiseless scores
            private = True

    with pytest.raises(TypeError, match=r"private = False.*scoring = 'abs_clipped'"):

        class Modest(ClippedRows):
            private = False

    with pytest.raises(TypeError, match="scoring"):

        class Unknown(ClippedRows):
            scoring = "abs"  # type: ignore[assignment]

    class Consistent(TrueAbsRows):  # agreeing with its scoring is accepted
        private = False

    assert Consistent().private is False


def test_non_private_scoring_is_refused_without_opt_in():
    with pytest.raises(ValueError, match="allow_non_private=True"):
        SpartaMaskCallback(mask_epoch=1, selector=TrueAbsRows())


def test_non_private_scoring_reports_infinite_epsilon(tmp_path):
    with pytest.warns(UserWarning, match="NOT differentially private"):
        _, callback, trainer, _, _ = _fit(
            tmp_path, TrueAbsRows(), mask_epoch=1, max_epochs=3, callback_kwargs={"allow_non_private": True}
        )
    strategy = trainer.strategy
    assert callback.phase == "masked"
    assert not strategy.is_private
    assert strategy.epsilon() == math.inf
    assert "true_abs_rows" in strategy.non_private_reason
    saved = torch.load(tmp_path / "sparta_mask.pt")
    assert saved["private"] is False


# ------------------------------------------------------------------------------------ issue 11: ε where users look
def test_epsilon_in_callback_metrics_and_bar_is_current_at_fit_end(tmp_path):
    """callback_metrics['privacy/epsilon'] equals strategy.epsilon() at fit end; ModelCheckpoint can monitor it;
    the bar shows ε in a run shorter than log_every_n_steps (12 steps < 50)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-3, seed=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="privacy/epsilon", mode="max", save_top_k=1)
    trainer = _trainer(
        strategy,
        max_epochs=3,
        callbacks=[PrivacyBudgetCallback(), checkpoint],
        enable_checkpointing=True,
        log_every_n_steps=50,
    )
    trainer.fit(TinyModule(batch_size=6))
    assert strategy.steps == 12
    metrics = trainer.callback_metrics
    assert float(metrics["privacy/epsilon"]) == strategy.epsilon()
    assert float(metrics["privacy/steps"]) == 12
    assert float(metrics["privacy/delta"]) == 1e-3
    assert float(metrics["privacy/noise_multiplier"]) == strategy.noise_multiplier
    assert "ε" not in metrics  # the short alias lives in the bar only
    assert "epsilon" not in metrics
    assert trainer.progress_bar_metrics["ε"] == strategy.epsilon()
    assert float(checkpoint.best_model_score) == pytest.approx(strategy.epsilon())  # monitored at the last epoch


def test_epsilon_is_current_when_validation_decides(tmp_path):
    """With validation, ModelCheckpoint/EarlyStopping run after it: ε must already cover the epoch's steps."""
    from lightning.pytorch.callbacks import Callback as _Callback

    seen = []

    class Probe(_Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.append((float(trainer.callback_metrics["privacy/epsilon"]), trainer.strategy.epsilon()))

    strategy = DPStrategy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp", seed=0)
    trainer = _trainer(strategy, max_epochs=2, callbacks=[PrivacyBudgetCallback(), Probe()], limit_val_batches=1)
    trainer.fit(TinyModule(batch_size=6))
    assert len(seen) == 2
    for logged, exact in seen:
        assert logged == exact


class _ShrinkingAfterFirstEpoch(TinyModule):
    """120 samples in the first epoch, 20 in every reloaded one after: q goes from 10/120 to 1/2."""

    def __init__(self) -> None:
        super().__init__(dataset=_data(n=120), batch_size=10)

    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        n = 120 if self.current_epoch == 0 else 20
        x, y = self.dataset.tensors
        return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=self.batch_size, shuffle=True)


def test_stop_at_epsilon_holds_when_a_reloaded_training_set_raises_the_sample_rate():
    """The number of steps the budget allows was counted once, at q = 1/12, and kept: after the reload to
    q = 1/2 the run went on to ε = 15.3 for stop_at_epsilon = 3. It is counted again when q (or σ)
    changes; ε of the history and of one more step at the new rate are recomputed by hand (RDP)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    torch.manual_seed(0)
    strategy = DPStrategy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp")
    callback = PrivacyBudgetCallback(stop_at_epsilon=3.0)
    with pytest.warns(UserWarning, match="stopping before step"):
        _trainer(strategy, max_epochs=30, reload_dataloaders_every_n_epochs=1, callbacks=[callback]).fit(
            _ShrinkingAfterFirstEpoch()
        )
    assert callback.stopped_early
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

    def by_hand(history) -> float:
        rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders) for sigma, q, steps in history)
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-3)[0])

    history = strategy.accountant.history
    assert by_hand(history) <= 3.0 < by_hand([*history, (1.0, 0.5, 1)])
