"""Known values, cross-library agreement, brute-force checks and properties of shared.privacy.accounting."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, stats

from fedsocial.shared.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ALPHAS,
    PrivacyAccountant,
    PrivacyConfigError,
    calibrate_noise_multiplier,
    check_delta,
    compute_epsilon,
    compute_epsilon_dp_accounting,
    compute_epsilons_dp_accounting,
    compute_epsilons_pld,
    compute_rdp_curve,
    compute_round_epsilon,
    epsilon_from_rdp,
    would_exceed,
)

OPACUS_KNOWN = [(1.5, 0.04, 2250)]  # Opacus's documented example: delta 1e-5
SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def brute_force_rdp(q: float, sigma: float, alpha: float) -> float:
    """RDP of one Poisson-sampled Gaussian step by numerical integration (Mironov, Talwar, Zhang 2019):
    (1/(alpha-1)) log E_{z~N(0,sigma^2)} [((1-q) + q exp((2z-1)/(2 sigma^2)))^alpha]."""

    def integrand(z: float) -> float:
        log_mix = np.logaddexp(np.log1p(-q), np.log(q) + (2 * z - 1) / (2 * sigma**2))
        return float(np.exp(stats.norm.logpdf(z, 0, sigma) + alpha * log_mix))

    value, _ = integrate.quad(integrand, -30 * sigma, 30 * sigma + alpha, limit=1000, epsabs=0,
                              epsrel=1e-13, points=[0.0, 0.5, 1.0])
    return math.log(value) / (alpha - 1)


def analytic_gaussian_epsilon(mu_sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity 1 and noise sigma (Balle & Wang 2018, Thm 8)."""

    def delta_of(eps: float) -> float:
        s = mu_sigma
        return float(stats.norm.cdf(-s * eps + 1 / (2 * s)) - math.exp(eps) * stats.norm.cdf(-s * eps - 1 / (2 * s)))

    return float(optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 500.0, xtol=1e-12))


# ---------------------------------------------------------------- known values


def test_opacus_known_value_rdp() -> None:
    # Prepare / Execute
    eps = compute_epsilon(OPACUS_KNOWN, 1e-5, "rdp")
    # Assert: Opacus's tutorial value, to 1e-9
    assert eps == pytest.approx(7.32911117143, abs=1e-9)


def test_opacus_known_value_prv() -> None:
    eps = compute_epsilon(OPACUS_KNOWN, 1e-5, "prv")
    # PRV is numerical (eps_error 0.01; we return the upper end of its band): pin loosely, and it must
    # be tighter than RDP for this history.
    assert eps == pytest.approx(6.7774, abs=1e-2)
    assert eps < compute_epsilon(OPACUS_KNOWN, 1e-5, "rdp")


def test_registry_and_unknown_accountant() -> None:
    assert set(ACCOUNTANTS) == {"rdp", "prv", "rdp_int"}
    with pytest.raises(PrivacyConfigError, match="accountant"):
        compute_epsilon(OPACUS_KNOWN, 1e-5, "gdp")


def test_rdp_int_is_rdp_at_the_integer_orders_and_never_below_it() -> None:
    # Prepare: one step at q = 1 (the distributed mechanism's event) and a subsampled history
    from fedsocial.shared.privacy.accounting import INTEGER_ALPHAS

    full, sampled = [(4.035, 1.0, 40)], [(2.2, 0.25, 160)]
    # Execute
    eps_full = compute_epsilon(full, 1e-5, "rdp_int")
    by_hand = min(40 * a / (2 * 4.035 ** 2) + math.log((a - 1) / a) - (math.log(1e-5) + math.log(a)) / (a - 1)
                  for a in INTEGER_ALPHAS)
    # Assert: Balle et al.'s conversion of alpha T / (2 sigma^2) at the integer orders, by hand
    assert tuple(float(a) for a in [*range(2, 11), *range(12, 64)]) == INTEGER_ALPHAS  # Opacus has no 11
    assert eps_full == pytest.approx(by_hand, rel=1e-9)
    for history in (full, sampled):  # fewer orders: the same bound or a looser one
        assert compute_epsilon(history, 1e-5, "rdp_int") >= compute_epsilon(history, 1e-5, "rdp") * (1 - 1e-12)


# ---------------------------------------------------------------- cross-checks


# Agreement tolerance between Opacus and dp_accounting (default grids). The two libraries use the
# same RDP -> (eps, delta) conversion and the same closed form at integer orders, but differ in
# (a) their order grids (dp_accounting adds 11 and 128..1024, which can only lower its epsilon) and
# (b) the series at fractional orders, where dp_accounting truncates at 1000 terms and drops an
# order that does not converge (so it is conservative). Over this practical grid (epsilon 0.3..20) the
# measured worst relative difference was 6.8e-3 (sigma 1, q 0.2, 100 steps); 2% leaves headroom
# without hiding a real bug (a wrong q or sigma moves epsilon by far more).
AGREEMENT_RTOL = 0.02


# The grid {0.8, 1, 1.5, 3} x {0.01, 0.04, 0.2} x {10, 100, 1000} without the points whose epsilon
# falls outside [0.3, 20], the range the tolerance is stated for (the test asserts the range too).
OUT_OF_RANGE = {(0.8, 0.2, 100), (0.8, 0.2, 1000), (1.0, 0.2, 1000), (1.5, 0.2, 1000), (3.0, 0.01, 10),
                (3.0, 0.01, 100), (3.0, 0.04, 10)}
AGREEMENT_GRID = [g for g in itertools.product([0.8, 1.0, 1.5, 3.0], [0.01, 0.04, 0.2], [10, 100, 1000])
                  if g not in OUT_OF_RANGE]


@pytest.mark.parametrize(("sigma", "q", "steps"), AGREEMENT_GRID)
def test_opacus_and_dp_accounting_agree(sigma: float, q: float, steps: int) -> None:
    history = [(sigma, q, steps)]
    opacus_eps = compute_epsilon(history, 1e-5, "rdp")
    google_eps = compute_epsilon_dp_accounting(history, 1e-5)
    assert 0.3 <= opacus_eps <= 20
    assert google_eps == pytest.approx(opacus_eps, rel=AGREEMENT_RTOL)
    assert google_eps >= opacus_eps * (1 - 1e-6)  # dp_accounting is the conservative side here


def test_independent_recomputations_are_cumulative_and_match_known_values() -> None:
    # Prepare: the known history split into three rounds
    rounds = [(1.5, 0.04, 750)] * 3
    # Execute
    rdp = compute_epsilons_dp_accounting(rounds, 1e-5)
    pld = compute_epsilons_pld(rounds, 1e-5)
    # Assert: cumulative (one value per round, increasing) and the last equals the whole history's
    assert rdp == sorted(rdp) and pld == sorted(pld) and len(rdp) == len(pld) == 3
    assert rdp[-1] == pytest.approx(compute_epsilon_dp_accounting(OPACUS_KNOWN, 1e-5), rel=1e-12)
    assert rdp[-1] == pytest.approx(7.32911117143, rel=1e-3)  # dp_accounting vs Opacus's known RDP value
    assert pld[-1] == pytest.approx(6.7774, abs=1e-2)  # PLD (dp_accounting) vs Opacus's known PRV value
    assert pld[0] == pytest.approx(compute_epsilon(rounds[:1], 1e-5, "prv"), abs=2e-2)


@pytest.mark.parametrize(("sigma", "q"), [(0.7, 0.01), (1.0, 0.04), (3.0, 0.5), (8.0, 0.001)])
def test_integer_orders_agree_exactly_across_libraries(sigma: float, q: float) -> None:
    # At integer orders both libraries evaluate the same finite binomial sum: agreement to 1e-9
    # relative isolates the grid/series differences of the test above.
    orders = [float(a) for a in range(2, 64)]
    opacus_eps = epsilon_from_rdp(compute_rdp_curve([(sigma, q, 50)], orders), 1e-5, orders)
    google_eps = compute_epsilon_dp_accounting([(sigma, q, 50)], 1e-5, orders=orders)
    assert google_eps == pytest.approx(opacus_eps, rel=1e-9)


@pytest.mark.parametrize(("q", "sigma", "alpha"),
                         [(0.04, 1.0, 1.1), (0.04, 1.5, 3.9), (0.5, 3.0, 1.5), (0.2, 0.7, 3.3), (0.01, 0.7, 2.5)])
def test_rdp_matches_numerical_integration(q: float, sigma: float, alpha: float) -> None:
    # Prepare: one step at one (fractional) order
    curve = compute_rdp_curve([(sigma, q, 1)], [alpha])
    # Assert: the accountant of record equals the defining integral
    assert curve[0] == pytest.approx(brute_force_rdp(q, sigma, alpha), rel=1e-7)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # Opacus PRV at q=1
@pytest.mark.parametrize("sigma", [0.8, 2.0, 5.0])
def test_full_batch_is_the_gaussian_mechanism(sigma: float) -> None:
    # q = 1: no amplification; RDP of the Gaussian mechanism is alpha / (2 sigma^2) per step.
    steps = 7
    curve = compute_rdp_curve([(sigma, 1.0, steps)])
    closed_form = np.array([steps * a / (2 * sigma**2) for a in DEFAULT_ALPHAS])
    np.testing.assert_allclose(curve, closed_form, rtol=1e-12)
    # T Gaussian steps compose to one Gaussian with sigma / sqrt(T): its exact epsilon lower-bounds RDP's
    # and PRV (numerical, eps_error 0.01) reproduces it.
    exact = analytic_gaussian_epsilon(sigma / math.sqrt(steps), 1e-5)
    assert compute_epsilon([(sigma, 1.0, steps)], 1e-5, "rdp") >= exact
    assert compute_epsilon([(sigma, 1.0, steps)], 1e-5, "prv") == pytest.approx(exact, abs=0.03)


def test_composition_splits_and_merges() -> None:
    split = [(1.1, 0.05, 30), (1.1, 0.05, 70)]
    merged = [(1.1, 0.05, 100)]
    assert compute_epsilon(split, 1e-5) == pytest.approx(compute_epsilon(merged, 1e-5), rel=1e-12)
    np.testing.assert_allclose(compute_rdp_curve(split), compute_rdp_curve(merged), rtol=1e-12)


# ---------------------------------------------------------------- properties

SIGMAS = st.floats(min_value=0.7, max_value=5.0)
RATES = st.floats(min_value=0.005, max_value=0.25)  # Opacus's series is slow at large q


@SLOW
@given(sigma=SIGMAS, q=RATES, a=st.integers(1, 300), b=st.integers(1, 300))
def test_composition_property(sigma: float, q: float, a: int, b: int) -> None:
    assert compute_epsilon([(sigma, q, a), (sigma, q, b)], 1e-5) == pytest.approx(
        compute_epsilon([(sigma, q, a + b)], 1e-5), rel=1e-10
    )


@SLOW
@given(sigma=SIGMAS, q=RATES, steps=st.integers(1, 500), extra=st.integers(1, 500))
def test_epsilon_monotone_in_steps(sigma: float, q: float, steps: int, extra: int) -> None:
    assert compute_epsilon([(sigma, q, steps + extra)], 1e-5) >= compute_epsilon([(sigma, q, steps)], 1e-5)


@SLOW
@given(sigma=SIGMAS, factor=st.floats(min_value=1.01, max_value=3.0), q=RATES, steps=st.integers(1, 500))
def test_epsilon_decreasing_in_sigma(sigma: float, factor: float, q: float, steps: int) -> None:
    assert compute_epsilon([(sigma * factor, q, steps)], 1e-5) <= compute_epsilon([(sigma, q, steps)], 1e-5)


# Each calibration is ~15 RDP evaluations; Opacus's series is slowest at large q, so q stays <= 0.25.
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_epsilon=st.floats(min_value=0.5, max_value=10.0),
    q=st.floats(min_value=0.01, max_value=0.25),
    steps_per_round=st.integers(5, 100),
    rounds=st.integers(1, 10),
)
def test_calibration_never_overshoots_and_is_tight(
    max_epsilon: float, q: float, steps_per_round: int, rounds: int
) -> None:
    # Execute
    sigma = calibrate_noise_multiplier(max_epsilon, 1e-5, q, steps_per_round, rounds)
    total = [(sigma, q, steps_per_round * rounds)]
    eps = compute_epsilon(total, 1e-5)
    # Assert: at or under the cap, within 2% of it, and a slightly smaller sigma (by the tolerance) exceeds it
    assert eps <= max_epsilon
    assert eps >= 0.98 * max_epsilon
    assert compute_epsilon([(sigma * (1 - 1e-3), q, steps_per_round * rounds)], 1e-5) > max_epsilon


def test_calibration_per_round_history_matches() -> None:
    # The guarantee is about the history a client will actually record: one event per round.
    sigma = calibrate_noise_multiplier(4.0, 1e-5, 0.1, 20, 6)
    per_round = [(sigma, 0.1, 20)] * 6
    assert compute_epsilon(per_round, 1e-5) <= 4.0
    assert not would_exceed(per_round[:5], per_round[5], 1e-5, 4.0)


# ---------------------------------------------------------------- budget helpers and state


def test_round_epsilon_and_would_exceed() -> None:
    history = [(1.0, 0.1, 50)] * 3
    nxt = (1.0, 0.1, 50)
    after = compute_round_epsilon(history, nxt, 1e-5)
    assert after == pytest.approx(compute_epsilon([(1.0, 0.1, 200)], 1e-5), rel=1e-12)
    assert after > compute_epsilon(history, 1e-5)
    assert would_exceed(history, nxt, 1e-5, max_epsilon=after * 0.999)
    assert not would_exceed(history, nxt, 1e-5, max_epsilon=after * 1.001)


@pytest.mark.parametrize(("delta", "population", "ok"),
                         [(1e-5, 1000, True), (1e-3, 999, True), (1e-3, 1000, False), (0.5, 10, False),
                          (0.0, 10, False), (1e-5, 0, False)])
def test_check_delta(delta: float, population: int, ok: bool) -> None:
    if ok:
        check_delta(delta, population)
    else:
        with pytest.raises(PrivacyConfigError):
            check_delta(delta, population)


@pytest.mark.parametrize("event", [(-1.0, 0.1, 5), (1.0, 0.0, 5), (1.0, 1.5, 5), (1.0, 0.1, -1),
                                   (1.0, 0.1, 2.5), (float("nan"), 0.1, 5), (1.0, 0.1)])
def test_bad_events_are_refused(event: tuple) -> None:
    with pytest.raises(PrivacyConfigError):
        compute_epsilon([event], 1e-5)


def test_stateful_accountant_round_trip() -> None:
    # Prepare: Opacus-style per-step updates merge into one event per (sigma, q)
    acc = PrivacyAccountant("rdp")
    for _ in range(40):
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    acc.step(noise_multiplier=2.0, sample_rate=0.04, steps=10)
    assert acc.history == [(1.5, 0.04, 40), (2.0, 0.04, 10)]
    assert acc.total_steps() == 50
    # Execute: persist and restore
    restored = PrivacyAccountant("prv")
    restored.load_state_dict(acc.state_dict())
    # Assert
    assert restored.mechanism == "rdp" and restored.history == acc.history
    assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5) == compute_epsilon(acc.history, 1e-5)
    assert PrivacyAccountant().get_epsilon(1e-5) == 0.0


def test_rdp_accounting_does_not_import_the_opacus_package() -> None:
    # Prepare: a fresh interpreter (this one may have imported Opacus already)
    import subprocess
    import sys

    code = ("import sys; from fedsocial.shared.privacy.accounting import compute_epsilon, calibrate_noise_multiplier; "
            "e = compute_epsilon([(1.5, 0.04, 2250)], 1e-5, 'rdp'); "
            "s = calibrate_noise_multiplier(8.0, 1e-5, 0.25, 8, 20); "
            "print(repr(e), s > 0, 'opacus' in sys.modules, 'torch' in sys.modules)")
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    # Assert: Opacus's own analysis (the known value to the last digit), without its package or torch
    eps, calibrated, opacus_loaded, torch_loaded = out.split()
    assert float(eps) == pytest.approx(7.32911117143, abs=1e-9)
    assert (calibrated, opacus_loaded, torch_loaded) == ("True", "False", "False")


def test_prv_accounting_does_not_import_the_opacus_package() -> None:
    # Prepare: a fresh interpreter
    import subprocess
    import sys

    code = ("import sys; from fedsocial.shared.privacy.accounting import compute_epsilon; "
            "e = compute_epsilon([(1.1, 0.05, 20), (0.9, 0.1, 5)], 1e-4, 'prv'); "
            "print(repr(e), 'opacus' in sys.modules, 'torch' in sys.modules)")
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    # Assert: a finite epsilon, without Opacus's package (whose __init__ imports torch and its compiler)
    eps, opacus_loaded, torch_loaded = out.split()
    assert 0 < float(eps) < 10 and (opacus_loaded, torch_loaded) == ("False", "False")


def test_standalone_prv_accountant_is_opacus_own() -> None:
    # Prepare
    import inspect

    from opacus.accountants import PRVAccountant

    from fedsocial.shared.privacy.accounting import compute_epsilon_prv, opacus_prv_accountant

    standalone = opacus_prv_accountant()
    # Execute / Assert: the same source file, and bit-identical epsilons on homogeneous and mixed histories
    assert inspect.getsourcefile(standalone) == inspect.getsourcefile(PRVAccountant) and standalone is not PRVAccountant
    for history in ([(1.1, 0.05, 40)], [(2.2, 0.25, 160)], [(0.8, 0.01, 1000), (1.5, 0.2, 30)]):
        opacus = PRVAccountant()
        opacus.history = list(history)
        assert compute_epsilon_prv(history, 1e-5) == float(opacus.get_epsilon(delta=1e-5, eps_error=0.01))


def test_a_full_batch_release_is_accounted_by_prv_without_a_numpy_warning() -> None:
    # Prepare: a sample-rate-1 event (the DP selection, a full-batch step) next to a subsampled history; was:
    # Opacus's log(1 - q) at q = 1 printed "divide by zero encountered in log" in every partner's log
    import warnings

    from opacus.accountants import PRVAccountant

    history = [(2.2, 0.25, 160), (8.0, 1.0, 1)]
    opacus = PRVAccountant()
    opacus.history = list(history)
    with np.errstate(divide="ignore"):
        expected = float(opacus.get_epsilon(delta=1e-5, eps_error=0.01))
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        eps = compute_epsilon(history, 1e-5, "prv")
    # Assert: Opacus's own value, silently
    assert eps == expected and math.isfinite(eps)


def test_standalone_rdp_analysis_is_opacus_own() -> None:
    # Prepare
    from opacus.accountants.analysis import rdp as opacus_rdp

    from fedsocial.shared.privacy.accounting import opacus_rdp_analysis

    standalone = opacus_rdp_analysis()
    # Execute / Assert: the same source file, and bit-identical results on fractional and integer orders
    assert standalone.__file__ == opacus_rdp.__file__ and standalone is not opacus_rdp
    for q, sigma in ((0.01, 1.1), (0.25, 0.7), (1.0, 2.0)):
        a = standalone.compute_rdp(q=q, noise_multiplier=sigma, steps=3, orders=list(DEFAULT_ALPHAS))
        b = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=3, orders=list(DEFAULT_ALPHAS))
        assert np.array_equal(a, b)
