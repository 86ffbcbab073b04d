"""Accounting against independent references, never against the accountant classes' own output.

* RDP: Opacus' low-level analysis (``compute_rdp`` + ``get_privacy_spent``), itself checked against
  the closed form of the Gaussian mechanism's RDP at ``q = 1``.
* GDP: the CLT closed form ``μ = q·sqrt(T·(e^{1/σ²} − 1))`` and the μ-GDP privacy profile, solved
  with scipy's ``brentq``.
* PRV: a privacy-loss-distribution (PLD) computation written here (discretised privacy loss of the
  Poisson subsampled Gaussian, composed by FFT), checked against the exact Gaussian mechanism at
  ``q = 1``; plus the ordering ``gdp ≤ prv ≤ rdp`` where the CLT is known to underestimate.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import optimize, signal
from scipy.stats import norm

from lightning_sparta.privacy.accountant import (
    ACCOUNTANT_NAMES,
    calibrate_noise_multiplier,
    create_accountant,
    epsilon_for,
    validate_delta,
    warn_if_delta_too_large,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:GDP accounting is experimental:UserWarning"),
    # Opacus' PRV evaluates log(1 - q) = log(0) at q = 1 before masking it out.
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]

DELTA = 1e-5
# The RDP orders of Opacus' RDP accountant, written out here: 1.1, 1.2, ..., 10.9 and 12, ..., 63.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

History = list[tuple[float, float, int]]


# ------------------------------------------------------------------------------------------ references
def rdp_by_hand(history: History, delta: float) -> float:
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=ORDERS) for s, q, n in history)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def gaussian_profile(eps: float, mu: float) -> float:
    """δ(ε) of μ-GDP (Dong, Roth & Su 2019): Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


def gdp_by_hand(sigma: float, q: float, steps: int, delta: float) -> float:
    mu = q * math.sqrt(steps * (math.exp(sigma**-2) - 1))
    return optimize.brentq(lambda eps: gaussian_profile(eps, mu) - delta, 0.0, 500.0, xtol=1e-12)


def exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Gaussian mechanisms without subsampling: exactly (sqrt(steps)/σ)-GDP."""
    mu = math.sqrt(steps) / sigma
    return optimize.brentq(lambda eps: gaussian_profile(eps, mu) - delta, 0.0, 500.0, xtol=1e-12)


def _loss_pmf(sigma: float, q: float, h: float, n: int) -> tuple[np.ndarray, float]:
    """Privacy loss L = log(P/Q)(x), x ~ P, of P = (1−q)N(0,σ²) + qN(1,σ²) vs Q = N(0,σ²).

    Returned as masses on the grid ``k·h``, ``|k| ≤ n`` (each bin's mass at its centre), and the
    mass above the grid. L(x) = log(1 − q + q·exp((2x − 1)/(2σ²))) increases with x, so its CDF is
    that of x at L's inverse. This "remove" direction dominates the "add" one for this mechanism.
    """
    edges = (np.arange(-n, n + 2) - 0.5) * h
    lowest = math.log1p(-q) if q < 1 else -math.inf
    inside = edges > lowest
    t = np.where(inside, edges, 0.0)
    x = sigma**2 * np.log((np.expm1(t) + q) / q) + 0.5
    cdf = np.where(inside, (1 - q) * norm.cdf(x / sigma) + q * norm.cdf((x - 1) / sigma), 0.0)
    return np.diff(cdf), 1.0 - cdf[-1]


def _convolve(a: np.ndarray, a_inf: float, b: np.ndarray, b_inf: float) -> tuple[np.ndarray, float]:
    """Distribution of the sum, kept on the same grid; mass beyond the top becomes infinite loss."""
    n = (len(a) - 1) // 2
    c = np.clip(signal.fftconvolve(a, b), 0.0, None)  # grid −2n..2n
    # mass below −n·h is dropped: it adds nothing to δ(ε) for ε ≥ 0
    return c[n : 3 * n + 1], 1 - (1 - a_inf) * (1 - b_inf) + c[3 * n + 1 :].sum()


def pld_epsilon(history: History, delta: float, h: float = 2e-4, width: float = 12.0) -> float:
    """ε of the composition, from δ(ε) = P(L = ∞) + E[(1 − e^{ε − L})₊] of the composed loss."""
    n = int(width / h)
    total, total_inf = None, 0.0
    for sigma, q, steps in history:
        base, base_inf = _loss_pmf(sigma, q, h, n)
        while steps:  # binary exponentiation of the convolution
            if steps & 1:
                total, total_inf = (base, base_inf) if total is None else _convolve(total, total_inf, base, base_inf)
            steps >>= 1
            if steps:
                base, base_inf = _convolve(base, base_inf, base, base_inf)
    grid = np.arange(-n, n + 1) * h

    def excess(eps: float) -> float:
        above = grid > eps
        return total_inf + float(np.sum(total[above] * -np.expm1(eps - grid[above]))) - delta

    return optimize.brentq(excess, 0.0, width, xtol=1e-9)


# ------------------------------------------------------------------------------------------ histories
SMALL_Q = {
    "q0.01_T1000": [(1.0, 0.01, 1000)],
    "q0.05_T200": [(0.8, 0.05, 200)],
}
HETEROGENEOUS = {"two_phases": [(2.0, 0.1, 50), (0.9, 0.02, 300)]}
FULL_BATCH = {"q1_T10": [(3.0, 1.0, 10)]}
HISTORIES = {**SMALL_Q, **HETEROGENEOUS, **FULL_BATCH}
HOMOGENEOUS = {**SMALL_Q, **FULL_BATCH}


# ------------------------------------------------------------------------------------------ references checked
@pytest.mark.parametrize(("sigma", "steps"), [(3.0, 10), (1.5, 4)])
def test_references_agree_on_the_gaussian_mechanism(sigma: float, steps: int) -> None:
    """At q = 1 the RDP is exactly T·α/(2σ²) and the PLD reference is the exact Gaussian profile."""
    orders = np.array(ORDERS)
    np.testing.assert_allclose(
        compute_rdp(q=1.0, noise_multiplier=sigma, steps=steps, orders=ORDERS), steps * orders / (2 * sigma**2)
    )
    assert pld_epsilon([(sigma, 1.0, steps)], DELTA) == pytest.approx(
        exact_gaussian_epsilon(sigma, steps, DELTA), abs=2e-3
    )


def test_rdp_conversion_by_closed_form() -> None:
    """At q = 1, ε = min over α of T·α/(2σ²) + log((α−1)/α) − (log δ + log α)/(α − 1) (Balle et al. 2020)."""
    sigma, steps = 2.0, 20
    a = np.array(ORDERS)
    expected = np.min(steps * a / (2 * sigma**2) + np.log((a - 1) / a) - (np.log(DELTA) + np.log(a)) / (a - 1))
    assert epsilon_for([(sigma, 1.0, steps)], DELTA, "rdp") == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------------ epsilon_for
@pytest.mark.parametrize("history", list(HISTORIES.values()), ids=list(HISTORIES))
def test_rdp_matches_hand_computation(history: History) -> None:
    assert epsilon_for(history, DELTA, "rdp") == pytest.approx(rdp_by_hand(history, DELTA), rel=1e-9)


@pytest.mark.parametrize("history", list(HOMOGENEOUS.values()), ids=list(HOMOGENEOUS))
def test_gdp_matches_closed_form(history: History) -> None:
    ((sigma, q, steps),) = history
    assert epsilon_for(history, DELTA, "gdp") == pytest.approx(gdp_by_hand(sigma, q, steps, DELTA), rel=1e-6)


@pytest.mark.parametrize("history", list(HISTORIES.values()), ids=list(HISTORIES))
def test_prv_matches_privacy_loss_distribution(history: History) -> None:
    """PRV reports an upper bound with ε error 0.01: it lies in [exact, exact + 0.03], below RDP.

    For small q the CLT underestimates (Gopi et al. 2021), so there gdp ≤ prv ≤ rdp as well.
    """
    prv = epsilon_for(history, DELTA, "prv")
    reference = pld_epsilon(history, DELTA)
    assert reference - 2e-3 <= prv <= reference + 0.03
    assert prv < rdp_by_hand(history, DELTA)
    if history in SMALL_Q.values():
        ((sigma, q, steps),) = history
        assert gdp_by_hand(sigma, q, steps, DELTA) < prv
    accountant = PRVAccountant()
    accountant.history = list(history)
    assert prv == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-9)


@pytest.mark.parametrize("accountant", ACCOUNTANT_NAMES)
def test_split_history_equals_merged_history(accountant: str) -> None:
    """Composition does not care how the steps are grouped: [(σ,q,400),(σ,q,600)] = [(σ,q,1000)].

    (Opacus' Gaussian accountant reads only the last history entry; epsilon_for must not.)
    """
    whole = epsilon_for([(1.0, 0.01, 1000)], DELTA, accountant)
    split = epsilon_for([(1.0, 0.01, 400), (0.5, 0.2, 0), (1.0, 0.01, 600)], DELTA, accountant)
    assert split == pytest.approx(whole, rel=1e-6)
    assert epsilon_for([(1.0, 0.01, 400)], DELTA, accountant) < whole


def test_gdp_refuses_heterogeneous_history() -> None:
    with pytest.raises(ValueError, match="'gdp' accountant only composes steps with one"):
        epsilon_for(HETEROGENEOUS["two_phases"], DELTA, "gdp")


@pytest.mark.parametrize("accountant", ACCOUNTANT_NAMES)
@pytest.mark.parametrize("history", [[], [(1.0, 0.01, 0)], [(0.0, 0.5, 0)]], ids=["empty", "zero_steps", "no_step"])
def test_no_step_costs_nothing(accountant: str, history: History) -> None:
    assert epsilon_for(history, DELTA, accountant) == 0.0


@pytest.mark.parametrize(
    ("accountant", "history"),
    [(name, [(0.0, 0.01, 1)]) for name in ACCOUNTANT_NAMES]
    + [(name, [(1.0, 0.01, 10), (0.0, 0.01, 1)]) for name in ACCOUNTANT_NAMES],
)
def test_noiseless_step_is_infinite(accountant: str, history: History) -> None:
    assert epsilon_for(history, DELTA, accountant) == math.inf


def test_gdp_extremes() -> None:
    """Outside Opacus' [0, 500] root bracket: ε = 0 when δ(0) ≤ δ already, ∞ when ε > 500."""
    mu = 0.01 * math.sqrt(1000 * math.expm1(1e5**-2))
    assert gaussian_profile(0.0, mu) <= DELTA
    assert epsilon_for([(1e5, 0.01, 1000)], DELTA, "gdp") == 0.0
    assert epsilon_for([(1.0, 0.5, 10_000)], DELTA, "gdp") == math.inf


def test_unknown_accountant_in_epsilon_for() -> None:
    with pytest.raises(ValueError, match="`accountant` must be one of"):
        epsilon_for([(1.0, 0.01, 10)], DELTA, "moments")


# ------------------------------------------------------------------------------------------ calibration
CALIBRATIONS = {  # (target ε, δ, q, steps)
    "eps1_q0.01_T1000": (1.0, 1e-5, 0.01, 1000),
    "eps4_q0.05_T100": (4.0, 1e-6, 0.05, 100),
}


def _by_hand(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    if accountant == "rdp":
        return rdp_by_hand([(sigma, q, steps)], delta)
    if accountant == "gdp":
        return gdp_by_hand(sigma, q, steps, delta)
    return epsilon_for([(sigma, q, steps)], delta, "prv")


@pytest.mark.parametrize(
    ("accountant", "target", "delta", "q", "steps"),
    [
        pytest.param(accountant, *calibration, id=f"{accountant}-{name}")
        for name, calibration in CALIBRATIONS.items()
        for accountant in ACCOUNTANT_NAMES
        if accountant != "prv" or name == "eps4_q0.05_T100"  # PRV is slow: one case
    ],
)
def test_calibrated_sigma_lands_just_below_target(accountant: str, target: float, delta: float, q: float, steps: int):
    tolerance = 0.01
    sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant, tolerance=tolerance)
    eps = _by_hand(accountant, sigma, q, steps, delta)
    assert target - tolerance <= eps <= target
    if accountant == "prv":  # the true ε (PLD) is below PRV's upper bound, by at most ~0.03
        assert target - tolerance - 0.03 <= pld_epsilon([(sigma, q, steps)], delta) <= target


def test_calibration_tolerance_is_respected() -> None:
    sigma = calibrate_noise_multiplier(1.0, 1e-5, 0.01, 1000, "rdp", tolerance=0.2)
    assert 0.8 <= rdp_by_hand([(sigma, 0.01, 1000)], 1e-5) <= 1.0


def test_calibration_large_epsilon_at_sigma_one_for_gdp() -> None:
    """σ = 1 gives ε > 500 here (Opacus' gdp root search fails there); calibration must go on doubling σ."""
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 0.5, 10_000, "gdp")
    assert 8.0 - 0.01 <= gdp_by_hand(sigma, 0.5, 10_000, 1e-5) <= 8.0


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
@pytest.mark.parametrize(("accountant", "target"), [("rdp", 0.05), ("prv", 0.005)])
def test_unreachable_budget_raises(accountant: str, target: float) -> None:
    """RDP with orders ≤ 63 cannot certify ε < ~0.1 at δ = 1e-5; PRV reports at least its ε error 0.01."""
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(target, 1e-5, 0.01, 10, accountant)


@pytest.mark.parametrize("steps", [0, -3])
def test_calibration_needs_steps(steps: int) -> None:
    with pytest.raises(ValueError, match="`steps` must be positive"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, steps, "rdp")


@pytest.mark.parametrize("target", [0.0, -1.0])
def test_calibration_needs_positive_target(target: float) -> None:
    with pytest.raises(ValueError, match="`target_epsilon` must be positive"):
        calibrate_noise_multiplier(target, 1e-5, 0.01, 100, "gdp")


# ------------------------------------------------------------------------------------------ small helpers
@pytest.mark.parametrize(("name", "cls"), [("prv", PRVAccountant), ("rdp", RDPAccountant), ("gdp", GaussianAccountant)])
def test_create_accountant(name: str, cls: type) -> None:
    accountant = create_accountant(name)
    assert type(accountant) is cls
    assert accountant.history == []
    assert accountant.mechanism() == name


def test_accountant_names() -> None:
    assert sorted(ACCOUNTANT_NAMES) == ["gdp", "prv", "rdp"]


def test_create_unknown_accountant_lists_names() -> None:
    with pytest.raises(ValueError, match=r"one of \['gdp', 'prv', 'rdp'\], got 'nope'"):
        create_accountant("nope")


@pytest.mark.parametrize("bad", [0, 1, -1, 2, 0.0, 1.0, float("nan"), "x", True, None])
@pytest.mark.parametrize("name", ["target_delta", "delta"])
def test_validate_delta_rejects(bad: object, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}` must be a number in \\(0, 1\\)"):
        validate_delta(bad, name)


def test_validate_delta_default_name_and_value() -> None:
    with pytest.raises(ValueError, match="`target_delta`"):
        validate_delta(1.5)
    assert validate_delta(1e-5) == 1e-5
    assert isinstance(validate_delta(np.float64(1e-5)), float)


@pytest.mark.parametrize(("delta", "n"), [(1e-2, 100), (0.5, 100), (1e-3, 10_000)])
def test_warns_when_delta_at_least_one_over_n(delta: float, n: int) -> None:
    if delta < 1 / n:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_if_delta_too_large(delta, n)
    else:
        with pytest.warns(UserWarning, match="not smaller than 1/n"):
            warn_if_delta_too_large(delta, n)


def test_no_warning_for_unknown_dataset_size() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_delta_too_large(0.5, 0)


def test_calibration_with_a_history_bounds_the_total():
    """With steps already spent, σ is the smallest (to the tolerance) whose new steps keep the *total* at or
    below the target; a history that has spent the target is refused whatever σ."""
    from lightning_sparta.privacy.accountant import BudgetSpentError

    history = [(1.5, 0.02, 300)]
    spent = epsilon_for(history, 1e-5, "rdp")
    assert 0.5 < spent < 2.0
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 0.02, 500, "rdp", tolerance=0.01, history=history)
    total = epsilon_for([*history, (sigma, 0.02, 500)], 1e-5, "rdp")
    assert 2.0 - 0.01 <= total <= 2.0
    assert epsilon_for([*history, (sigma * 0.99, 0.02, 500)], 1e-5, "rdp") > 2.0  # the smallest such σ
    assert sigma > calibrate_noise_multiplier(2.0, 1e-5, 0.02, 500, "rdp", tolerance=0.01)
    with pytest.raises(BudgetSpentError, match=r"target_epsilon=0.5 is spent: the 300 steps already accounted"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.02, 500, "rdp", history=history)
