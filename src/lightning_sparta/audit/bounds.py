"""Empirical ε lower bounds from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

The audit game of "Privacy Auditing with One (1) Training Run" (arXiv:2305.08846): ``m`` canaries,
each included in the training data independently with probability 1/2 (``S ∈ {-1, +1}^m``). After
training the auditor guesses ``T ∈ {-1, 0, +1}^m`` from the run's output alone: ``+1`` (member) for
the ``k+`` canaries it is most confident about, ``-1`` for the ``k-`` least confident ones, ``0``
(abstain) for the rest; ``r = k+ + k-`` guesses, ``v`` of them correct.

**What is implemented: the paper's main theorem for (ε, δ)-DP** (Theorem 3 of arXiv v1, "Main Result";
its δ = 0 case is the stochastic dominance of Theorem 2). If the training run is (ε, δ)-DP with respect
to each canary's inclusion and the guesses use at most ``r`` non-zero entries, then for every ``v``

.. math::

    P\\Big[\\sum_i \\max\\{0, T_i S_i\\} \\ge v\\Big] \\;\\le\\; f(v) + 2m\\delta \\max_{1\\le i\\le m}
    \\frac{f(v-i) - f(v)}{i},
    \\qquad f(u) = P[W \\ge u],\\; W \\sim \\mathrm{Binomial}\\big(r, \\tfrac{e^\\varepsilon}{1+e^\\varepsilon}\\big).

The right-hand side is the p-value of ``v`` correct guesses under the null hypothesis "the run is
(ε, δ)-DP" (:func:`p_value`). For ``i > v``, ``f(v - i) = 1`` and ``(1 - f(v))/i`` decreases, so the
maximum is over ``i = 1..v``, where ``f(v-i) - f(v) = P[v-i ≤ W ≤ v-1]``. This is the computation of the
paper's Algorithm 2 (appendix), written here from the theorem.

**The lower bound** (:func:`epsilon_lower_bound`) at confidence ``1 - β`` is the largest ε of a grid
``0 = ε_0 < ε_1 < …`` such that the null is rejected (p-value ≤ β) at every grid point up to it. It is
sound without assuming that the p-value is monotone in ε: if the run were (ε*, δ)-DP with
ε* < the reported bound, it would also be (g, δ)-DP for the first grid point ``g ≥ ε*``, and the test at
``g`` rejects with probability at most β. The grid step is ``resolution``, so the bound is rounded *down*
to it.

A lower bound says: with probability ≥ 1 - β over the canaries' inclusion (and the run's randomness),
the run is **not** (ε, δ)-DP for any ε below it. It does not show that the run is private: an honest
DP-SGD run audited in one run gives a bound far below its ε (the test has little power), so a small
bound is no evidence of correctness, only a large one is evidence of a bug.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["AuditResult", "count_correct_guesses", "epsilon_lower_bound", "p_value"]


def _check_counts(num_guesses: int, num_correct: int, num_canaries: int | None) -> None:
    for name, value in (("num_guesses", num_guesses), ("num_correct", num_correct)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    if num_correct > num_guesses:
        raise ValueError(f"`num_correct` ({num_correct}) cannot exceed `num_guesses` ({num_guesses}).")
    if num_canaries is not None and (
        isinstance(num_canaries, bool) or not isinstance(num_canaries, (int, np.integer)) or num_canaries < num_guesses
    ):
        raise ValueError(f"`num_canaries` must be an integer >= num_guesses ({num_guesses}), got {num_canaries!r}.")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
        raise ValueError(f"`delta` must be a number in [0, 1), got {delta!r}.")


def _p_values(num_canaries: int, num_guesses: int, num_correct: int, epsilons: np.ndarray, delta: float) -> np.ndarray:
    """:func:`p_value` for an array of ε (vectorised; no argument checks)."""
    r, v = int(num_guesses), int(num_correct)
    prob = 1.0 / (1.0 + np.exp(-np.asarray(epsilons, dtype=np.float64)))  # e^ε / (1 + e^ε)
    tail = stats.binom.sf(v - 1, r, prob)  # f(v) = P[W >= v]
    if delta == 0 or v == 0:
        return np.minimum(tail, 1.0)
    # P[v-i <= W <= v-1] for i = 1..v: cumulative sums of the pmf at v-1, v-2, ..., 0
    below = stats.binom.pmf(np.arange(v - 1, -1, -1)[None, :], r, prob[:, None])
    window = np.cumsum(below, axis=1) / np.arange(1, v + 1)[None, :]
    return np.minimum(tail + 2.0 * num_canaries * delta * window.max(axis=1), 1.0)


def p_value(
    num_guesses: int, num_correct: int, epsilon: float, delta: float = 0.0, num_canaries: int | None = None
) -> float:
    """Probability of at least ``num_correct`` correct guesses out of ``num_guesses`` for an (ε, δ)-DP run.

    The right-hand side of the main theorem (see the module docstring), capped at 1.

    Args:
        num_guesses: ``r``, guesses made (abstentions excluded).
        num_correct: ``v``, correct guesses.
        epsilon: ε of the null hypothesis (≥ 0).
        delta: δ of the null hypothesis.
        num_canaries: ``m``, canaries in the game (needed when ``delta > 0``).

    Returns:
        The p-value.

    Example:
        >>> round(p_value(10, 10, epsilon=0.0), 6)  # ten fair coins all right: 2^-10
        0.000977
    """
    _check_counts(num_guesses, num_correct, num_canaries)
    _check_delta(delta)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
        raise ValueError(f"`epsilon` must be a number >= 0, got {epsilon!r}.")
    if delta > 0 and num_canaries is None:
        raise ValueError("`num_canaries` is needed when `delta` > 0 (the δ term is 2·m·δ·...).")
    return float(_p_values(num_canaries or num_guesses, num_guesses, num_correct, np.array([epsilon]), delta)[0])


def epsilon_lower_bound(
    num_guesses: int,
    num_correct: int,
    delta: float = 0.0,
    confidence: float = 0.95,
    num_canaries: int | None = None,
    resolution: float = 1e-3,
) -> float:
    """The empirical ε lower bound at ``delta`` and ``confidence`` from ``num_correct`` of ``num_guesses``.

    The largest ε of the grid ``0, resolution, 2·resolution, …`` such that :func:`p_value` ≤ 1 - confidence
    at every grid point from 0 to it; ``0.0`` when even ε = 0 is not rejected (no evidence of leakage).
    See the module docstring for the theorem and why the grid makes the bound sound.

    Args:
        num_guesses: ``r``, guesses made (abstentions excluded).
        num_correct: ``v``, correct guesses.
        delta: δ at which ε is bounded (the run's δ to compare with its accountant's ε).
        confidence: ``1 - β``, the probability that the bound holds.
        num_canaries: ``m``, canaries in the game (needed when ``delta > 0``; ``2mδ`` is the δ term).
        resolution: grid step in ε; the bound is rounded down to it.

    Returns:
        The lower bound on ε (≥ 0).

    Raises:
        ValueError: for a bad argument, naming it.

    Example:
        >>> epsilon_lower_bound(100, 100, confidence=0.95)  # 100 of 100 right, pure DP: logit(0.05^(1/100)) = 3.4930
        3.492
        >>> epsilon_lower_bound(100, 55, confidence=0.95)  # 55 of 100: not significant even for ε = 0
        0.0
    """
    _check_counts(num_guesses, num_correct, num_canaries)
    _check_delta(delta)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be a number in (0, 1), got {confidence!r}.")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float)) or not resolution > 0:
        raise ValueError(f"`resolution` must be a number > 0, got {resolution!r}.")
    if delta > 0 and num_canaries is None:
        raise ValueError("`num_canaries` is needed when `delta` > 0 (the δ term is 2·m·δ·...).")
    m = num_canaries if num_canaries is not None else num_guesses
    beta = 1.0 - confidence
    if num_guesses == 0:
        return 0.0
    # No ε beyond logit(β^(1/r)) is rejected: f(v) >= P[W = r] = p^r > β there.
    top = beta ** (1.0 / num_guesses)
    eps_max = math.log(top / (1.0 - top)) if top < 1.0 else 50.0
    grid = np.arange(0.0, eps_max + 2 * resolution, resolution)
    best = -1
    for start in range(0, len(grid), 512):
        chunk = grid[start : start + 512]
        rejected = _p_values(m, num_guesses, num_correct, chunk, float(delta)) <= beta
        if rejected.all():
            best = start + len(chunk) - 1
            continue
        best = start + int(np.argmin(rejected)) - 1
        break
    return 0.0 if best < 0 else round(float(grid[best]), 12)


def count_correct_guesses(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    k_plus: int,
    k_minus: int,
    tie_break_seed: int = 0,
) -> tuple[int, int]:
    """Guess "member" for the ``k_plus`` highest scores and "not a member" for the ``k_minus`` lowest.

    Ties are broken by a random permutation drawn from ``tie_break_seed`` (independent of the
    canaries' inclusion, as the theorem requires of the guesses).

    Returns:
        ``(r, v)``: guesses made and correct guesses.

    Example:
        >>> count_correct_guesses([0.9, 0.1, 0.8, 0.2], [True, False, False, False], k_plus=1, k_minus=2)
        (3, 3)
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"`scores` and `included` must be 1-D of one length, got {scores.shape} and {included.shape}.")
    for name, k in (("k_plus", k_plus), ("k_minus", k_minus)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {k!r}.")
    if k_plus + k_minus > len(scores):
        raise ValueError(f"k_plus + k_minus = {k_plus + k_minus} exceeds the number of canaries {len(scores)}.")
    if np.isnan(scores).any():
        raise ValueError("`scores` contains NaN.")
    permutation = np.random.default_rng(tie_break_seed).permutation(len(scores))
    order = permutation[np.argsort(scores[permutation], kind="stable")]  # ascending, ties in random order
    guessed_out = order[:k_minus]
    guessed_in = order[len(order) - k_plus :] if k_plus else order[:0]
    correct = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    return k_plus + k_minus, correct


@dataclass(frozen=True)
class AuditResult:
    """One audit: its canaries, guesses, and the ε lower bound next to the accountant's ε.

    Attributes:
        kind: the canaries (``"gradient"`` or ``"input"``) and score used.
        num_canaries: ``m``.
        num_guesses: ``r = k+ + k-``.
        num_correct: ``v``.
        delta: δ of the bound.
        confidence: ``1 - β`` of this bound (after any Bonferroni correction).
        epsilon_lower_bound: the empirical lower bound.
        epsilon_accountant: the run's ε at ``delta`` (``inf`` for a non-private run).
    """

    kind: str
    num_canaries: int
    num_guesses: int
    num_correct: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    epsilon_accountant: float

    @property
    def consistent(self) -> bool:
        """True when the lower bound does not exceed the accountant's ε (no evidence of a privacy bug)."""
        return self.epsilon_lower_bound <= self.epsilon_accountant
