"""The vectorised RDP series that guides noise calibration: against Opacus, closed forms and numerical
integration, and the calibration it guides held to Opacus's own numbers whatever the guide says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from fedsocial.shared.privacy import accounting, fast_rdp
from fedsocial.shared.privacy.accounting import (
    DEFAULT_ALPHAS,
    PrivacyConfigError,
    calibrate_noise_multiplier,
    compute_epsilon,
    opacus_rdp_analysis,
)
from fedsocial.shared.privacy.fast_rdp import compute_rdp_sgm

ORDERS = np.asarray(DEFAULT_ALPHAS, dtype=float)


def _opacus_curve(q: float, sigma: float) -> np.ndarray:
    return np.asarray(opacus_rdp_analysis().compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS)))


def _exact_search(max_epsilon: float, delta: float, q: float, steps: int, prefix: tuple = ()) -> float:
    """The calibration's search run on Opacus's function alone (what calibrate did before the guide)."""
    def eps(sigma: float) -> float:
        return compute_epsilon([*prefix, (sigma, q, steps)], delta, "rdp")

    return accounting._bisect_noise(eps, max_epsilon, 1e-3, 1e4)[1]


@pytest.mark.parametrize("q", [0.003, 0.05, 1 / 3, 0.5])
@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.0, 8.0])
def test_series_equals_opacus_at_every_default_order(q: float, sigma: float) -> None:
    # Prepare / Execute
    fast, ok = compute_rdp_sgm(q, sigma, ORDERS)
    # Assert
    assert ok.all()
    np.testing.assert_allclose(fast, _opacus_curve(q, sigma), rtol=1e-7, atol=1e-13)  # log(1 + tiny): ulps of 1


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.25, 0.8), (0.5, 2.0)])
def test_integer_orders_have_their_closed_form(q: float, sigma: float) -> None:
    # Prepare: A_2 = 1 + q^2 (e^{1/s^2} - 1); A_3 from its four binomial terms (Mironov et al. 2019, 3.3)
    a2 = 1 + q**2 * (math.exp(1 / sigma**2) - 1)
    a3 = ((1 - q) ** 3 + 3 * q * (1 - q) ** 2 + 3 * q**2 * (1 - q) * math.exp(1 / sigma**2)
          + q**3 * math.exp(3 / sigma**2))
    # Execute
    rdp, ok = compute_rdp_sgm(q, sigma, np.array([2.0, 3.0]))
    # Assert
    assert ok.all()
    np.testing.assert_allclose(rdp, [math.log(a2), math.log(a3) / 2], rtol=1e-12)


@pytest.mark.parametrize("q, sigma, alpha", [(0.1, 1.0, 1.5), (0.3, 0.9, 2.7), (0.02, 0.7, 6.3), (0.5, 1.5, 10.9)])
def test_fractional_orders_equal_the_integral_they_expand(q: float, sigma: float, alpha: float) -> None:
    # Prepare: A_alpha = E_{z ~ N(0, s^2)} [((1 - q) + q e^{(2z - 1) / (2 s^2)})^alpha], by quadrature
    def integrand(z: float) -> float:
        density = math.exp(-z * z / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
        return density * ((1 - q) + q * math.exp((2 * z - 1) / (2 * sigma**2))) ** alpha

    a_alpha = integrate.quad(integrand, -40 * sigma, 40 * sigma, limit=400, epsabs=0, epsrel=1e-12)[0]
    # Execute
    rdp, ok = compute_rdp_sgm(q, sigma, np.array([alpha]))
    # Assert
    assert ok.all()
    assert rdp[0] == pytest.approx(math.log(a_alpha) / (alpha - 1), rel=1e-8)


def test_special_cases_are_opacus_s() -> None:
    orders = np.array([1.5, 2.0, np.inf])
    assert compute_rdp_sgm(0.0, 1.0, orders)[0].tolist() == [0.0, 0.0, 0.0]
    assert compute_rdp_sgm(0.1, 0.0, orders)[0].tolist() == [math.inf] * 3
    assert compute_rdp_sgm(1.0, 2.0, orders)[0].tolist() == [1.5 / 8, 2.0 / 8, math.inf]
    assert compute_rdp_sgm(0.1, 1.0, orders)[0][2] == math.inf


def test_a_series_longer_than_the_cap_is_left_to_opacus() -> None:
    # Execute: a cap of 10 terms cannot reach Opacus's stopping rule
    log_a, ok = fast_rdp.compute_log_a_frac(0.3, 1.0, np.array([1.5, 4.5]), block=4, max_terms=8)
    # Assert
    assert not ok.any() and np.isnan(log_a).all()


@pytest.mark.parametrize("cap, delta, q, steps, prefix", [
    (8.0, 1e-5, 0.25, 160, ()),
    (1.0, 1e-5, 1 / 3, 40, ()),
    (2.0, 1e-5, 0.25, 160, ((3.0, 1.0, 1),)),  # with the popularity release before training
    (50.0, 1e-4, 0.5, 4, ()),
])
def test_calibration_gives_the_result_of_the_search_on_opacus_alone(cap: float, delta: float, q: float, steps: int,
                                                                   prefix: tuple) -> None:
    # Execute
    sigma = calibrate_noise_multiplier(cap, delta, q, steps, 1, prefix=prefix)
    # Assert: the same sigma, and Opacus's invariant eps(sigma) <= cap < eps(sigma (1 - tolerance))
    assert sigma == _exact_search(cap, delta, q, steps, prefix)
    assert compute_epsilon([*prefix, (sigma, q, steps)], delta) <= cap
    assert compute_epsilon([*prefix, (sigma * (1 - 1e-3), q, steps)], delta) > cap


@pytest.mark.parametrize("bias", [0.5, 2.0, 1.0 + 1e-4])
def test_a_wrong_guide_never_changes_the_calibrated_noise(monkeypatch: pytest.MonkeyPatch, bias: float) -> None:
    # Prepare: a guide whose RDP is off by a factor: its search ends on a sigma that is not Opacus's
    true_series = fast_rdp.compute_rdp_sgm

    def biased(q: float, sigma: float, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        curve, ok = true_series(q, sigma, orders)
        return curve * bias, ok

    monkeypatch.setattr(fast_rdp, "compute_rdp_sgm", biased)
    # Execute
    sigma = calibrate_noise_multiplier(4.0, 1e-5, 0.1, 20, 6)
    # Assert: the search was repeated on Opacus's numbers
    assert sigma == _exact_search(4.0, 1e-5, 0.1, 120)


def test_a_guide_that_finds_the_cap_unreachable_is_not_believed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a guide that says no noise is ever enough
    monkeypatch.setattr(fast_rdp, "compute_rdp_sgm",
                        lambda q, sigma, orders: (np.full(len(orders), 1e9), np.ones(len(orders), bool)))
    # Execute / Assert: the cap is reachable by Opacus's numbers, and calibration finds it
    assert calibrate_noise_multiplier(4.0, 1e-5, 0.1, 20, 6) == _exact_search(4.0, 1e-5, 0.1, 120)
    # and a truly unreachable one is still refused
    with pytest.raises(PrivacyConfigError, match="unreachable"):
        calibrate_noise_multiplier(1e-6, 1e-5, 1.0, 10_000, 1, max_noise_multiplier=16.0)


def test_calibration_evaluates_opacus_at_two_noise_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: count the (sigma, q) at which Opacus's series is evaluated
    seen: list[tuple[float, float]] = []
    real = accounting._rdp_one_step.__wrapped__

    def counting(sigma: float, q: float, alphas: tuple[float, ...]) -> np.ndarray:
        seen.append((sigma, q))
        return real(sigma, q, alphas)

    monkeypatch.setattr(accounting, "_rdp_one_step", counting)
    # Execute
    calibrate_noise_multiplier(8.0, 1e-5, 0.3, 8, 20)
    # Assert: eps(hi) and eps(lo), against about fifteen evaluations in a search on Opacus alone
    assert len(seen) == 2
