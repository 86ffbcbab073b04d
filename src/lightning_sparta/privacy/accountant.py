"""Privacy accounting: accountant creation, ε queries and σ calibration.

Every private step of this package (a DP-SGD update, or one batch of SPARTA's scoring epoch) is a
sampled Gaussian mechanism with sampling rate ``q`` and noise multiplier ``σ``; the accountant
composes them. We reuse Opacus' accountants (PRV of Gopi et al. 2021, RDP of Mironov 2017, and the
Gaussian-DP CLT approximation) and keep their history format: a list of ``(σ, q, steps)`` tuples.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Iterable
from typing import Literal, get_args

import torch
from opacus.accountants import GaussianAccountant, IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import gdp as gdp_analysis

from lightning_sparta._logging import warn

AccountantName = Literal["prv", "rdp", "gdp"]

_ACCOUNTANTS: dict[str, type[IAccountant]] = {
    "prv": PRVAccountant,
    "rdp": RDPAccountant,
    "gdp": GaussianAccountant,
}

# Opacus' own search bound for σ; a budget that needs more noise than this is unreachable in practice.
_MAX_SIGMA = 1e6


class BudgetSpentError(ValueError):
    """``target_epsilon`` is already spent by the steps accounted before this run."""


#: The largest ``target_epsilon`` accepted: e^100 ≈ 2.7e43 bounds nothing in practice, and the accountants
#: become slow (PRV: tens of seconds per ε) and then overflow float64 as σ → 0.
MAX_TARGET_EPSILON = 100.0
# An ε this close to log(max float64) = 709.78 is an overflow artefact, not a bound.
_OVERFLOW_EPSILON = 700.0


def create_accountant(name: str) -> IAccountant:
    """Create an empty accountant by name.

    Args:
        name: one of ``"prv"``, ``"rdp"`` or ``"gdp"``.

    Returns:
        A fresh Opacus accountant.

    Raises:
        ValueError: if ``name`` is not a registered accountant.

    Example:
        >>> create_accountant("rdp").mechanism()
        'rdp'
    """
    if name not in _ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {sorted(_ACCOUNTANTS)}, got {name!r}.")
    return _ACCOUNTANTS[name]()


def epsilon_for(history: list[tuple[float, float, int]], delta: float, accountant: str = "prv") -> float:
    """ε after the composition of the sampled Gaussian mechanisms in ``history``.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` tuples, the format of Opacus' accountants.
        delta: the δ at which ε is reported.
        accountant: the accountant's name.

    Returns:
        ε, ``0.0`` for an empty history and ``inf`` when any step had no noise.

    Raises:
        ValueError: for ``"gdp"`` with more than one distinct ``(σ, q)``: Opacus' Gaussian accountant
            only composes identical steps.

    Example:
        >>> round(epsilon_for([(1.0, 0.01, 1000)], delta=1e-5, accountant="rdp"), 3)
        2.101
    """
    # Entries with the same (σ, q) are merged (composition is commutative): Opacus' Gaussian
    # accountant reads only the last entry of its history, so [(σ, q, a), (σ, q, b)] must become
    # [(σ, q, a + b)] to be accounted at all.
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if n > 0:
            merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(n)
    return _epsilon_of_merged(tuple((s, q, n) for (s, q), n in merged.items()), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon_of_merged(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """ε of a merged history, cached: asking twice for the same history (the epoch end, validation, the
    summary, ``ModelCheckpoint``) costs one accountant evaluation (0.1-2 s of CPU for PRV)."""
    if not history:
        return 0.0
    if any(s == 0.0 for s, _, _ in history):
        return math.inf
    acc = create_accountant(accountant)
    if accountant == "gdp":
        if len(history) > 1:
            raise ValueError(
                f"The 'gdp' accountant only composes steps with one (σ, q), got {history}; use 'prv' or 'rdp'."
            )
        ((sigma, q, steps),) = history
        mu = gdp_analysis.compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=q)
        # Opacus solves δ(ε) = δ on ε ∈ [0, 500] and fails outside: ε = 0 already meets δ (huge σ),
        # or ε > 500 (e.g. q = 0.5 for 10⁴ steps at σ = 1, where calibration must keep doubling σ).
        if gdp_analysis.delta_eps_mu(eps=0.0, mu=mu) <= delta:
            return 0.0
        if gdp_analysis.delta_eps_mu(eps=500.0, mu=mu) > delta:
            return math.inf
    acc.history = list(history)
    with warnings.catch_warnings():
        # σ ≪ 1 makes the privacy-loss distributions overflow float64 (e^ε beyond 1.8e308): dozens of
        # RuntimeWarnings and a meaningless ε near log(max float) = 709.8. Report that as inf, quietly.
        warnings.simplefilter("ignore", RuntimeWarning)
        epsilon = float(acc.get_epsilon(delta=delta))
    return math.inf if not epsilon < _OVERFLOW_EPSILON else epsilon


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    tolerance: float = 0.01,
    history: Iterable[tuple[float, float, int]] = (),
) -> float:
    """The smallest σ (to ``tolerance`` in ε) such that ``steps`` steps at rate ``q`` cost at most ε.

    Bisection on σ, with ε evaluated by the same accountant that will account the run, so the
    calibrated run never ends above ``target_epsilon``.

    Args:
        target_epsilon: the ε to reach after exactly ``steps`` private steps.
        delta: the δ of the guarantee.
        sample_rate: Poisson sampling rate ``q``.
        steps: number of private steps the run will take (training and scoring steps alike).
        accountant: the accountant's name.
        tolerance: how far below ``target_epsilon`` the result may land.
        history: ``(σ, q, steps)`` already spent (an earlier fit, a ``privacy_state``): the ``steps`` new
            steps compose with it, and ``target_epsilon`` bounds the total.

    Returns:
        The noise multiplier σ.

    Raises:
        ValueError: if the budget cannot be reached with any σ below 1e6.

    Example:
        >>> sigma = calibrate_noise_multiplier(2.0, 1e-5, sample_rate=0.01, steps=1000, accountant="rdp")
        >>> epsilon_for([(sigma, 0.01, 1000)], 1e-5, "rdp") <= 2.0
        True
    """
    if steps <= 0:
        raise ValueError(f"`steps` must be positive to calibrate σ, got {steps}.")
    validate_target_epsilon(target_epsilon)
    history = [tuple(h) for h in history]
    spent = epsilon_for(history, delta, accountant) if history else 0.0
    if spent >= target_epsilon:
        raise BudgetSpentError(
            f"target_epsilon={target_epsilon:g} is spent: the {sum(h[2] for h in history)} steps already "
            f"accounted reach ε = {spent:.4f} at δ = {delta:g}, and {steps} more steps would exceed it whatever "
            "σ. Raise `target_epsilon` to the total you accept, or set `noise_multiplier` to continue with a "
            "chosen σ (ε is accounted either way)."
        )

    def eps(sigma: float) -> float:
        return epsilon_for([*history, (sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2.0 * high
        if high > _MAX_SIGMA:
            raise ValueError(
                f"target_epsilon={target_epsilon} with target_delta={delta} is unreachable for "
                f"{steps} steps at sample rate {sample_rate:.4g}: even σ={_MAX_SIGMA:g} exceeds it."
            )
    eps_high = eps(high)
    while target_epsilon - eps_high > tolerance and high - low > 1e-6:
        mid = 0.5 * (low + high)
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


def validate_target_epsilon(target_epsilon: float) -> float:
    """Check that ``0 < target_epsilon <= MAX_TARGET_EPSILON`` and return it as a float."""
    ok = isinstance(target_epsilon, (int, float)) and not isinstance(target_epsilon, bool)
    if not ok or not 0.0 < target_epsilon < math.inf:
        raise ValueError(f"`target_epsilon` must be positive (a finite number > 0), got {target_epsilon!r}.")
    if target_epsilon > MAX_TARGET_EPSILON:
        raise ValueError(
            f"`target_epsilon={target_epsilon:g}` is above {MAX_TARGET_EPSILON:g}: such an ε bounds nothing in "
            f"practice (e^{MAX_TARGET_EPSILON:g} ≈ {math.exp(MAX_TARGET_EPSILON):.1e}), and calibrating σ for it "
            "takes minutes before the accountants overflow. For a (nearly) non-private baseline give "
            "`noise_multiplier` directly (e.g. 0.3), or `noise_multiplier=0` for none, and read ε off the summary."
        )
    return float(target_epsilon)


def validate_epsilon_tolerance(tolerance: float | None, target_epsilon: float | None) -> float:
    """The calibration tolerance: ``min(0.01, target_epsilon / 100)`` by default, else ``< target_epsilon / 10``.

    Calibration may land up to ``tolerance`` below ``target_epsilon``; a loose tolerance would let the run
    add more noise than the budget needs (e.g. tolerance 5 with target 2 ended at ε = 1.086).
    """
    if tolerance is None:
        return 0.01 if target_epsilon is None else min(0.01, target_epsilon / 100)
    ok = isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and math.isfinite(tolerance)
    if not ok or tolerance <= 0:
        raise ValueError(f"`epsilon_tolerance` must be a finite number > 0 or None, got {tolerance!r}.")
    if target_epsilon is not None and tolerance >= 0.1 * target_epsilon:
        raise ValueError(
            f"`epsilon_tolerance={tolerance:g}` must be smaller than 10% of target_epsilon={target_epsilon:g} "
            f"(< {0.1 * target_epsilon:g}): calibration may land that far below the target, spending less of "
            "the budget than asked (more noise). Leave it at None (min(0.01, target_epsilon/100))."
        )
    return float(tolerance)


def validate_delta(delta: float, name: str = "target_delta") -> float:
    """Check that δ lies in (0, 1) and return it as a float."""
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0.0 < delta < 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1), got {delta!r}.")
    return float(delta)


def warn_if_delta_too_large(delta: float, num_samples: int) -> None:
    """Warn when δ ≥ 1/n: such a δ allows mechanisms that publish a whole record."""
    if num_samples > 0 and delta >= 1.0 / num_samples:
        # Attributed to the user's `trainer.fit(...)` line with a fresh registry: with `stacklevel` it pointed
        # into strategy.py, where Python's default filter shows a message once per location, so a second run
        # in the same process (a notebook cell run again) showed nothing.
        warn(
            f"target_delta={delta:g} is not smaller than 1/n = 1/{num_samples}: a guarantee with "
            "δ ≥ 1/n is weak (it allows releasing a record outright). Use δ ≪ 1/n, e.g. 1/(10·n).",
            UserWarning,
        )


ACCOUNTANT_NAMES: tuple[str, ...] = get_args(AccountantName)


def is_prefix(earlier: list[tuple[float, float, int]], history: list[tuple[float, float, int]]) -> bool:
    """Whether the ``(σ, q, steps)`` history ``earlier`` is where ``history`` stood some steps ago.

    Both are run-length encoded as Opacus keeps them (consecutive steps with the same ``(σ, q)`` in one
    entry), so every entry of ``earlier`` but its last must equal ``history``'s, and its last may hold
    fewer steps.

    Example:
        >>> is_prefix([(1.0, 0.1, 3)], [(1.0, 0.1, 5), (2.0, 0.1, 1)]), is_prefix([(2.0, 0.1, 3)], [(1.0, 0.1, 5)])
        (True, False)
    """
    earlier = [tuple(h) for h in earlier if int(h[2]) > 0]
    if len(earlier) > len(history):
        return False
    for k, (sigma, q, steps) in enumerate(earlier):
        sigma_k, q_k, steps_k = history[k]
        if (float(sigma), float(q)) != (float(sigma_k), float(q_k)):
            return False
        if int(steps) != int(steps_k) and (k < len(earlier) - 1 or int(steps) > int(steps_k)):
            return False
    return True


def read_privacy_state(
    state: object, accountant: str, checkpoint_key: str
) -> tuple[list[tuple[float, float, int]], str | None]:
    """The ``(σ, q, steps)`` history and the non-private reason of a saved privacy state.

    Args:
        state: a dict with keys ``accountant`` and ``history`` (``DPStrategy.privacy_state()``), or the path
            of a ``torch.save`` file holding one, or of a Lightning checkpoint that holds one under
            ``checkpoint_key``.
        accountant: the accountant of the run that continues the history.
        checkpoint_key: where a Lightning checkpoint keeps the state.

    Raises:
        ValueError: if ``state`` holds no accountant history, or was accounted with another accountant
            (histories of different accountants do not compose).
    """
    if isinstance(state, (str, os.PathLike)):
        loaded = torch.load(os.fspath(state), map_location="cpu", weights_only=False)
        state = loaded.get(checkpoint_key, loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict) or "history" not in state or "accountant" not in state:
        raise ValueError(
            "`privacy_state` must be a dict from `DPStrategy.privacy_state()` (keys 'accountant', 'history'), "
            f"or the path of a file or checkpoint holding one; got {type(state).__name__}."
        )
    if state["accountant"] != accountant:
        raise ValueError(
            f"`privacy_state` was accounted with accountant={state['accountant']!r}, this strategy uses "
            f"{accountant!r}: histories of different accountants do not compose. Use "
            f"DPStrategy(accountant={state['accountant']!r})."
        )
    history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
    return history, state.get("non_private_reason") or None


__all__ = [
    "ACCOUNTANT_NAMES",
    "MAX_TARGET_EPSILON",
    "AccountantName",
    "BudgetSpentError",
    "calibrate_noise_multiplier",
    "create_accountant",
    "epsilon_for",
    "read_privacy_state",
    "validate_delta",
    "validate_epsilon_tolerance",
    "validate_target_epsilon",
    "warn_if_delta_too_large",
]
