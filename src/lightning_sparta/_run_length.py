"""The length of a Lightning run, which ``target_epsilon`` calibration needs before the first step.

Lightning replaces an unset ``max_epochs`` by 1000 (when ``max_steps`` is unset too) before the
strategy sees the Trainer's settings, so ``max_epochs=1000`` chosen by the user and "no limit" look the
same. :func:`note_max_epochs` records which it was at the one point where they still differ (when
``Trainer.fit`` hands the module to the strategy); :func:`planned_steps` then counts the steps.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl

# Lightning fills in max_epochs=1000 when neither max_epochs nor max_steps is given.
LIGHTNING_DEFAULT_MAX_EPOCHS = 1000
# Set on the Trainer when `fit` starts: whether the user left max_epochs unset.
_MAX_EPOCHS_UNSET = "_lightning_sparta_max_epochs_unset"


def note_max_epochs(trainer: pl.Trainer) -> None:
    """Record on ``trainer`` whether the user left ``max_epochs`` unset (call from inside ``Trainer.fit``)."""
    max_epochs = trainer.fit_loop.max_epochs
    if max_epochs is None:
        trainer.__dict__[_MAX_EPOCHS_UNSET] = True
    elif max_epochs != LIGHTNING_DEFAULT_MAX_EPOCHS or not trainer.__dict__.get(_MAX_EPOCHS_UNSET):
        trainer.__dict__[_MAX_EPOCHS_UNSET] = False  # set by the user (a refit keeps "unset")


def planned_steps(trainer: pl.Trainer, done_epochs: int = 0, done_steps: int = 0) -> int:
    """The number of optimizer steps ``trainer`` will take: the smaller of its epoch and step limits.

    ``done_epochs``/``done_steps``: what the trainer's loops already ran (a second ``fit`` with the same
    Trainer continues them: a raised ``max_epochs`` trains only the new epochs); the result is what is left.

    Raises:
        ValueError: when the run has no limit, its limit cannot be told from Lightning's default, or its
            training loader has no length.
    """
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    per_epoch = trainer.num_training_batches
    # None when fit was not entered through Trainer.fit (then 1000 with max_steps=-1 is ambiguous)
    unset = trainer.__dict__.get(_MAX_EPOCHS_UNSET)
    if max_epochs == LIGHTNING_DEFAULT_MAX_EPOCHS and max_steps == -1 and unset is None:
        raise ValueError(
            f"`target_epsilon` needs the length of the run, and max_epochs={max_epochs} is also what Lightning "
            "puts in when neither max_epochs nor max_steps is set, so DPStrategy cannot tell whether you chose "
            "it. Set `Trainer(max_steps=...)` too, or give `noise_multiplier` instead of `target_epsilon`."
        )
    unbounded = max_epochs in (None, -1) or (
        max_epochs == LIGHTNING_DEFAULT_MAX_EPOCHS and max_steps == -1 and bool(unset)
    )
    if unbounded and max_steps == -1:
        raise ValueError(
            "`target_epsilon` needs the length of the run to calibrate σ: set `Trainer(max_epochs=...)` "
            f"or `Trainer(max_steps=...)` (found max_epochs={max_epochs}, max_steps={max_steps}; Lightning "
            f"uses {LIGHTNING_DEFAULT_MAX_EPOCHS} when neither is set)."
        )
    if not math.isfinite(per_epoch):
        raise ValueError("`target_epsilon` needs a training loader of known length.")
    epoch_steps = None if unbounded else (max_epochs - done_epochs) * int(per_epoch)
    step_limit = max_steps - done_steps if max_steps != -1 else None
    candidates = [s for s in (epoch_steps, step_limit) if s is not None]
    return max(0, min(candidates))


def lift_unmet_minimums(trainer: pl.Trainer) -> tuple[list[str], tuple[int | None, int | None] | None]:
    """Make Lightning honour ``should_stop`` although ``min_epochs``/``min_steps`` are not met.

    Lightning's loops (``FitLoop.done``, ``_TrainingEpochLoop.done``) only stop on ``should_stop`` when
    ``epoch_progress.current.processed >= min_epochs`` and ``global_step >= min_steps``; both limits are
    read from the loops at every check, so clearing them lets the very next check stop the run.

    Returns:
        The unmet minimums as text, and their values to restore at teardown (``None`` if none was unmet).
    """
    fit_loop = trainer.fit_loop
    min_epochs, min_steps = fit_loop.min_epochs, fit_loop.epoch_loop.min_steps
    unmet = []
    if min_epochs and fit_loop.epoch_progress.current.processed < min_epochs:
        unmet.append(f"`min_epochs={min_epochs}`")
    if min_steps and fit_loop.epoch_loop.global_step < min_steps:
        unmet.append(f"`min_steps={min_steps}`")
    if not unmet:
        return [], None
    fit_loop.min_epochs = None
    fit_loop.epoch_loop.min_steps = None
    return unmet, (min_epochs, min_steps)


def restore_minimums(trainer: pl.Trainer, saved: tuple[int | None, int | None]) -> None:
    """Give ``trainer`` back the ``(min_epochs, min_steps)`` that :func:`lift_unmet_minimums` returned."""
    trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = saved
