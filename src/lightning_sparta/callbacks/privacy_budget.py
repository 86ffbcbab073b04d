"""Log the privacy budget spent as training goes, and stop before a budget is exceeded."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_sparta._logging import get_logger, info, rank_zero_user_warn
from lightning_sparta._run_length import lift_unmet_minimums, restore_minimums
from lightning_sparta.privacy.accountant import validate_delta
from lightning_sparta.strategy import DPStrategy

#: Key of ε in the loggers and ``trainer.callback_metrics`` (monitor it with ModelCheckpoint/EarlyStopping).
EPSILON_KEY = "privacy/epsilon"
#: The short alias of ε in the progress bar (the bar only).
BAR_KEY = "ε"
# Step-level ε evaluations are skipped while they would take more than this fraction of the training time.
_MAX_OVERHEAD = 0.05
_log = get_logger("privacy")


class PrivacyBudgetCallback(Callback):
    """Logs ε (with δ, σ, q and the step count) to every logger, the progress bar and ``callback_metrics``.

    ε is computed by the strategy's accountant over every private step so far (training steps and
    SPARTA's scoring steps alike). Where the values go, all under one key namespace:

    * loggers: ``privacy/epsilon``, ``privacy/delta``, ``privacy/noise_multiplier``,
      ``privacy/sample_rate`` and ``privacy/steps`` every ``log_every_n_steps`` optimizer steps and at
      every epoch end;
    * ``trainer.callback_metrics``: the same keys, current at every training and validation epoch end
      and at the end of fitting, so ``ModelCheckpoint(monitor="privacy/epsilon")`` and
      ``EarlyStopping(monitor="privacy/epsilon", ...)`` can use them;
    * the progress bar: ``ε`` only (the short alias exists in the bar alone), the same exact value.

    Every value is the accountant's own ε, never an estimate, cached by history (asking again for the
    same steps, e.g. at the epoch end, after validation and in the summary, is free). Opacus' PRV
    accountant costs 0.1-2 s of CPU per evaluation (more for longer runs), so the step-level evaluation
    is also skipped while it would take more than 5% of the time spent training since the previous
    one: live logging then never costs more than about 5% of the run, and the epoch-end and final
    values are exact whatever happens in between.

    With ``stop_at_epsilon`` the callback stops training *before* the
    step that would take ε above the budget: it checks the ε the next step would give, not the ε of
    the last one. At the end of fitting rank 0 prints a short privacy summary.

    The budget wins over ``Trainer(min_epochs=..., min_steps=...)``: Lightning ignores a stop request
    until those minimums are met, so

    * when fitting starts (once σ is known) a minimum that needs more private steps than
      ``stop_at_epsilon`` allows is refused with a ``ValueError``, before any step of this fit;
    * should a minimum still be unmet when the budget is reached (e.g. it was raised during the run),
      the callback lowers the Trainer's minimums for the rest of the fit, with a warning, so that the run
      stops anyway. They are given back when fitting ends.

    Hence, with ``stop_at_epsilon``, ε at the end of fitting never exceeds the budget (for a run
    whose σ and sampling rate do not change while it trains).

    Args:
        delta: δ at which ε is reported; the strategy's ``target_delta`` by default.
        stop_at_epsilon: stop before exceeding this ε; ``None`` never stops.
        log_every_n_steps: log the exact ε to the loggers every N optimizer steps; the Trainer's
            ``log_every_n_steps`` by default. ε is also logged at every epoch end, and the progress bar is
            refreshed after every step whatever N is.

    Raises:
        ValueError: for a bad argument; when fitting starts, if ``min_epochs``/``min_steps`` of the
            Trainer need more private steps than ``stop_at_epsilon`` allows.
        TypeError: at ``setup`` if the Trainer does not use :class:`DPStrategy`.

    Example:
        >>> PrivacyBudgetCallback(stop_at_epsilon=8.0).stop_at_epsilon
        8.0
    """

    def __init__(
        self,
        delta: float | None = None,
        stop_at_epsilon: float | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.delta = None if delta is None else validate_delta(delta, "delta")
        if stop_at_epsilon is not None and (
            isinstance(stop_at_epsilon, bool)
            or not isinstance(stop_at_epsilon, (int, float))
            or not stop_at_epsilon > 0
        ):
            raise ValueError(f"`stop_at_epsilon` must be a number > 0 or None, got {stop_at_epsilon!r}.")
        if log_every_n_steps is not None and (
            not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 1
        ):
            raise ValueError(f"`log_every_n_steps` must be a positive integer or None, got {log_every_n_steps!r}.")
        self.stop_at_epsilon = None if stop_at_epsilon is None else float(stop_at_epsilon)
        self.log_every_n_steps = log_every_n_steps
        self.stopped_early = False
        self._allowed_steps: int | None = None
        self._allowed_for: tuple[float | None, float | None] | None = None  # the (σ, q) the count was made for
        self._minimums_checked = False
        self._saved_minimums: tuple[int | None, int | None] | None = None  # (min_epochs, min_steps) lowered
        self._last_cost = 0.0  # seconds the last ε evaluation that missed the cache took
        self._last_publish: float | None = None  # time.perf_counter() after it; None: not yet in this fit

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy, DPStrategy):
            raise TypeError(
                f"PrivacyBudgetCallback needs `Trainer(strategy=DPStrategy(...))`, found "
                f"{type(trainer.strategy).__name__}."
            )

    def metrics(self, strategy: DPStrategy) -> dict[str, float]:
        """The privacy metrics logged at each point: ε, δ, σ, q and the number of private steps.

        ε is the accountant's exact value (cached by history: a second call for the same steps is free).
        """
        delta = self.delta if self.delta is not None else strategy.target_delta
        return {
            EPSILON_KEY: strategy.epsilon(self.delta),
            "privacy/delta": delta,
            "privacy/noise_multiplier": float(strategy.noise_multiplier or 0.0),
            "privacy/sample_rate": float(strategy.sample_rate or 0.0),
            "privacy/steps": float(strategy.steps),
        }

    def _publish(self, trainer: pl.Trainer, to_loggers: bool) -> dict[str, float]:
        """Compute the exact metrics, put them in ``callback_metrics`` and the bar, and optionally log them."""
        strategy: DPStrategy = trainer.strategy
        start = time.perf_counter()
        metrics = self.metrics(strategy)
        cost = time.perf_counter() - start
        if cost > 1e-3:  # not a cache hit: the cost of the next evaluation
            self._last_cost = cost
        self._last_publish = time.perf_counter()
        # Written directly (not with `LightningModule.log`) so that they are current in every hook, on_fit_end
        # included, and reach the loggers only once per point.
        callback_metrics = trainer.callback_metrics
        for key, value in metrics.items():
            callback_metrics[key] = torch.tensor(value, dtype=torch.float64)
        trainer.progress_bar_metrics[BAR_KEY] = metrics[EPSILON_KEY]
        if to_loggers and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return metrics

    def _log(self, trainer: pl.Trainer) -> dict[str, float]:
        return self._publish(trainer, to_loggers=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._allowed_steps = None  # σ is resolved after the callbacks' on_train_start
        self._allowed_for = None
        self._minimums_checked = False
        self.stopped_early = False
        self._last_cost, self._last_publish = 0.0, None

    def _stop_if_next_step_exceeds(self, trainer: pl.Trainer) -> None:
        """Ask the Trainer to stop before the next step when that step would exceed the budget.

        Lightning checks ``should_stop`` before fetching each batch, so setting it after a step (or
        at an epoch's start) prevents the next step from running at all, once the Trainer's minimums
        no longer hold it back (:meth:`_lift_unmet_minimums`). The check runs even when ``should_stop``
        is already set (e.g. by ``EarlyStopping``): Lightning may still be running to meet a minimum.
        """
        if self.stop_at_epsilon is None:
            return
        strategy: DPStrategy = trainer.strategy
        if strategy.steps + 1 <= self._budget_steps(strategy):
            return
        if not self.stopped_early:
            self.stopped_early = True
            rank_zero_user_warn(
                f"PrivacyBudgetCallback: stopping before step {strategy.steps + 1}: it would bring ε to "
                f"{strategy.epsilon_after(1, self.delta):.3f} > stop_at_epsilon={self.stop_at_epsilon} "
                f"(ε so far: {strategy.epsilon(self.delta):.3f})."
            )
        trainer.should_stop = True
        self._lift_unmet_minimums(trainer)

    def _lift_unmet_minimums(self, trainer: pl.Trainer) -> None:
        """Let the stop through ``min_epochs``/``min_steps`` (restored in :meth:`teardown`)."""
        unmet, saved = lift_unmet_minimums(trainer)
        if not unmet:
            return
        if self._saved_minimums is None:
            self._saved_minimums = saved
        rank_zero_user_warn(
            f"PrivacyBudgetCallback: the Trainer's {' and '.join(unmet)} not met, but stop_at_epsilon="
            f"{self.stop_at_epsilon} takes precedence: training stops now."
        )

    def _check_minimums(self, trainer: pl.Trainer) -> None:
        """Refuse ``min_epochs``/``min_steps`` that need more private steps than the budget allows.

        Every training batch is one private step (a DP-SGD step or a SPARTA scoring step), and every
        optimizer step is one, so ``min_epochs`` forces ``min_epochs · num_training_batches`` private
        steps in all and ``min_steps`` at least ``min_steps``, both capped by ``max_epochs``/``max_steps``
        (Lightning's maximums win over its minimums). Called once per fit, at the first epoch start,
        when σ is known and before the fit takes a step.
        """
        self._minimums_checked = True
        fit_loop = trainer.fit_loop
        min_epochs, min_steps = fit_loop.min_epochs or 0, fit_loop.epoch_loop.min_steps or 0
        if self.stop_at_epsilon is None or (min_epochs <= 0 and min_steps <= 0):
            return
        per_epoch = trainer.num_training_batches
        cap = math.inf  # Lightning's maximums win over its minimums
        if trainer.max_steps not in (None, -1):
            cap = trainer.max_steps
        if trainer.max_epochs not in (None, -1) and math.isfinite(per_epoch):
            cap = min(cap, trainer.max_epochs * int(per_epoch))
        forced: list[tuple[int, str]] = []
        if min_epochs > 0 and math.isfinite(per_epoch):
            forced.append((min_epochs * int(per_epoch), f"`min_epochs={min_epochs}` ({int(per_epoch)} steps an epoch)"))
        if min_steps > 0:
            forced.append((min_steps, f"`min_steps={min_steps}`"))
        if not forced:
            return
        needed, source = max(forced)
        if needed > cap:
            needed, source = int(cap), f"{source}, capped by `max_epochs`/`max_steps`,"
        strategy: DPStrategy = trainer.strategy
        allowed = self._budget_steps(strategy)
        if needed <= allowed:
            return
        over = strategy.epsilon_after(allowed + 1 - strategy.steps, self.delta)
        raise ValueError(
            f"PrivacyBudgetCallback: `stop_at_epsilon={self.stop_at_epsilon}` allows {allowed} private steps in all "
            f"(σ = {strategy.noise_multiplier}, q = {strategy.sample_rate:.5g}, {strategy.steps} already taken; "
            f"ε after {allowed + 1} steps: {over:.3f}), but the Trainer's {source} needs {needed} private steps. The "
            "budget cannot be kept with these minimums: lower `min_epochs`/`min_steps` or raise `stop_at_epsilon`."
        )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._minimums_checked:
            self._check_minimums(trainer)
        self._stop_if_next_step_exceeds(trainer)

    def _budget_steps(self, strategy: DPStrategy) -> int:
        """Total number of private steps whose ε stays within ``stop_at_epsilon`` (bisection, cached).

        The count assumes the next steps at the current σ and sampling rate: it is computed again when
        either changes (a reloaded training set of another size, σ calibrated again).
        """
        plan = (strategy.noise_multiplier, strategy.sample_rate)
        if self._allowed_steps is not None and self._allowed_for == plan:
            return self._allowed_steps
        assert self.stop_at_epsilon is not None
        self._allowed_for = plan
        done = strategy.steps
        if strategy.epsilon_after(1, self.delta) > self.stop_at_epsilon:
            self._allowed_steps = done
            return done
        low, high = 1, 2
        while strategy.epsilon_after(high, self.delta) <= self.stop_at_epsilon:
            low, high = high, 2 * high
            if high > 10**9:
                break
        while high - low > 1:
            mid = (low + high) // 2
            if strategy.epsilon_after(mid, self.delta) <= self.stop_at_epsilon:
                low = mid
            else:
                high = mid
        self._allowed_steps = done + low
        return self._allowed_steps

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if self._last_publish is None:  # the first step of a fit: ε in the bar at once, even for short runs
            self._publish(trainer, to_loggers=trainer.global_step % every == 0)
        elif trainer.global_step % every == 0:
            # Skip (all ranks alike) while the accountant would exceed _MAX_OVERHEAD of the training time.
            since = time.perf_counter() - self._last_publish
            affordable = self._last_cost <= _MAX_OVERHEAD * since
            if trainer.world_size > 1:
                affordable = bool(trainer.strategy.broadcast(affordable))
            if affordable:
                self._publish(trainer, to_loggers=True)
        self._stop_if_next_step_exceeds(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint/EarlyStopping run after validation when there is one: give them the current ε.
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._publish(trainer, to_loggers=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(trainer, to_loggers=False)  # a run stopped mid-epoch (max_steps, budget) included

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(trainer, to_loggers=False)
        info(_log, self.summary(trainer.strategy))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saved_minimums is not None:  # give the Trainer back the minimums lowered to stop in budget
            restore_minimums(trainer, self._saved_minimums)
            self._saved_minimums = None

    def summary(self, strategy: DPStrategy) -> str:
        """A short human-readable account of the privacy spent."""
        m = self.metrics(strategy)
        eps = m[EPSILON_KEY]
        lines = [
            "Privacy summary",
            f"  ε = {eps:.3f} at δ = {m['privacy/delta']:g} ({strategy.accountant_name} accountant)"
            if math.isfinite(eps)
            else f"  ε = inf: NOT PRIVATE ({strategy.non_private_reason})",
            f"  σ = {m['privacy/noise_multiplier']:.4f}, C = {strategy.max_grad_norm:g}, "
            f"q = {m['privacy/sample_rate']:.5f}, steps = {int(m['privacy/steps'])}",
        ]
        if self.stopped_early:
            lines.append(f"  stopped early to stay within stop_at_epsilon = {self.stop_at_epsilon}")
        return "\n".join(lines)


__all__ = ["BAR_KEY", "EPSILON_KEY", "PrivacyBudgetCallback"]
