"""The distributed Skellam mechanism's math (shared/privacy/distributed.py): known values, the theorem
cross-checked against exact Renyi divergences, the rounding sensitivity by brute force, the shares'
closure under addition, and the modular code through Flower's own SecAgg+ quantisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from fedsocial.shared.privacy import distributed as dn

ORDERS = list(range(2, 64))


def exact_renyi(alpha: int, variance: float, shift: int) -> float:
    """D_alpha(Sk || Sk + shift) of the 1-D symmetric Skellam of ``variance``, summed over its support."""
    half = variance / 2.0
    k = np.arange(-int(60 + 40 * math.sqrt(variance)) - shift, int(60 + 40 * math.sqrt(variance)) + shift + 1)
    log_p = stats.skellam(half, half).logpmf(k)
    log_q = stats.skellam(half, half).logpmf(k - shift)
    ok = np.isfinite(log_p) & np.isfinite(log_q)
    return float(logsumexp(alpha * log_p[ok] + (1 - alpha) * log_q[ok]) / (alpha - 1))


def test_skellam_rdp_known_value() -> None:
    # Prepare: alpha 2, l1 3, l2 2, mu 10: 2 * 4 / 20 + min((3 * 4 + 18) / 400, 9 / 20)
    # Execute
    got = dn.compute_skellam_rdp([2], 3.0, 2.0, 10.0)
    # Assert
    assert got[0] == pytest.approx(0.4 + 0.075, rel=1e-12)


@pytest.mark.parametrize("variance", [2.0, 6.0, 25.0, 120.0])
@pytest.mark.parametrize("shift", [1, 2, 4])
def test_skellam_rdp_bounds_the_exact_divergence(variance: float, shift: int) -> None:
    # Prepare: a 1-D query of sensitivity ``shift`` (l1 = l2 = shift)
    orders = [2, 3, 5, 8, 13, 21]
    # Execute
    bound = dn.compute_skellam_rdp(orders, float(shift), float(shift), variance)
    exact = [exact_renyi(a, variance, shift) for a in orders]
    # Assert: the theorem holds, and the Gaussian term alone does not always (the extra term is needed)
    assert all(e <= b * (1 + 1e-9) for e, b in zip(exact, bound, strict=True)), (exact, list(bound))
    assert all(e > 0 for e in exact)


def test_skellam_rdp_is_tight_at_large_variance() -> None:
    # Prepare: at a large variance the Skellam is close to a Gaussian, and the bound to the divergence
    orders = [2, 4, 8]
    # Execute
    exact = [exact_renyi(a, 400.0, 3) for a in orders]
    bound = dn.compute_skellam_rdp(orders, 3.0, 3.0, 400.0)
    # Assert: within 1 % (a bound off by a constant factor, e.g. alpha l2^2 / mu, would fail)
    assert all(b * 0.99 <= e <= b for e, b in zip(exact, bound, strict=True)), (exact, list(bound))


@pytest.mark.parametrize("l1,l2,variance", [(3.0, 2.0, 10.0), (1e8, 7e4, 3e11), (50.0, 5.0, 40.0)])
def test_gaussian_equivalent_bounds_the_theorem_at_every_integer_order(l1: float, l2: float,
                                                                        variance: float) -> None:
    # Prepare
    orders = list(range(2, 1025))
    # Execute
    s = dn.compute_gaussian_equivalent(l1, l2, variance)
    skellam = dn.compute_skellam_rdp(orders, l1, l2, variance)
    # Assert
    assert np.all(np.asarray(orders) / (2 * s * s) >= skellam)


@pytest.mark.parametrize("sigma", [0.7, 4.035, 31.8])
def test_skellam_variance_inverts_the_gaussian_equivalent(sigma: float) -> None:
    # Prepare: LastFM's shared tables, C 0.1 on a grid of 2**16 steps
    l1, l2 = dn.compute_rounded_sensitivity(0.1, dn.compute_grid_step(0.1, 16), 2_253_000)
    # Execute
    mu = dn.compute_skellam_variance(sigma, l1, l2)
    # Assert: at least the asked-for noise, and no more than a relative 1e-9 above it
    s = dn.compute_gaussian_equivalent(l1, l2, mu)
    assert sigma <= s <= sigma * (1 + 1e-9)
    assert mu == pytest.approx((sigma * l2) ** 2, rel=1e-6)  # the Gaussian term dominates at this size


def test_rounded_sensitivity_known_value() -> None:
    # Prepare: C 1, gamma 1/4, dim 9: a clipped difference spans 4 steps, rounding adds sqrt(9) and 9
    # Execute
    l1, l2 = dn.compute_rounded_sensitivity(1.0, 0.25, 9)
    # Assert
    assert (l1, l2) == (21.0, 7.0)


def test_rounded_sensitivity_brute_force() -> None:
    # Prepare: random sums and neighbours one clipped user away, many with coordinates at half steps
    rng = np.random.default_rng(0)
    c, gamma, dim = 1.0, 1.0 / 8, 6
    l1, l2 = dn.compute_rounded_sensitivity(c, gamma, dim)
    worst1 = worst2 = 0.0
    for trial in range(20_000):
        base = rng.normal(0, 3, dim)
        if trial % 2:
            base = (np.floor(base / gamma) + 0.5 - 1e-9) * gamma  # every coordinate about to round up
        user = rng.normal(0, 1, dim)
        user *= min(1.0, c / np.linalg.norm(user)) * rng.uniform(0.5, 1.0)
        # Execute
        diff = dn.compute_rounded(base + user, gamma) - dn.compute_rounded(base, gamma)
        worst1 = max(worst1, float(np.abs(diff).sum()))
        worst2 = max(worst2, float(np.linalg.norm(diff)))
    # Assert: never above the bound, and rounding does add to the clipped C / gamma = 8
    assert worst2 <= l2 and worst1 <= l1
    assert worst2 > c / gamma


def test_shares_of_t_partners_sum_to_the_total_variance() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    mu, t = 5.0e4, 4
    share = dn.compute_share_variance(mu, t)
    # Execute
    total = sum(dn.compute_skellam_share((400_000,), share, rng) for _ in range(t))
    # Assert: integers, centred, of variance mu (Skellam is closed under addition)
    assert total.dtype == np.int64
    assert abs(float(total.mean())) < 5 * math.sqrt(mu / 400_000)
    assert float(total.var()) == pytest.approx(mu, rel=0.01)


def test_encoded_shares_sum_to_the_sum_modulo_the_grid() -> None:
    # Prepare: five partners' integer vectors, some large enough that the encoded values wrap
    rng = np.random.default_rng(2)
    n = 5
    bits = dn.compute_sum_bits(n)
    values = [rng.integers(-(2 ** 40), 2 ** 40, size=1000) for _ in range(n)]
    small = [rng.integers(-(2 ** 24), 2 ** 24, size=1000) for _ in range(n)]
    # Execute
    wrapped = dn.compute_decoded_sum(sum(dn.compute_encoded(v, bits) for v in values), n, bits)
    exact = dn.compute_decoded_sum(sum(dn.compute_encoded(v, bits) for v in small), n, bits)
    # Assert: a function of the true sum alone, and the sum itself where it fits
    half = 1 << (bits - 1)
    assert np.array_equal(wrapped, np.mod(sum(values) + half, 1 << bits) - half)
    assert np.array_equal(exact, sum(small))
    assert bits == 29 and n * 2 ** bits < 2 ** 32


def test_flower_quantisation_maps_encoded_shares_onto_themselves() -> None:
    # Prepare: the SecAgg+ settings server/secagg.py uses for distributed noise
    from flwr.common.secure_aggregation.quantization import quantize

    bits = dn.compute_sum_bits(5)
    half = 1 << (bits - 1)
    rng = np.random.default_rng(3)
    encoded = dn.compute_encoded(rng.integers(-(2 ** 35), 2 ** 35, size=5000), bits)
    # Execute
    (q,) = quantize([encoded], float(half), 1 << bits)
    # Assert: no clipping, no stochastic rounding: the integer itself, shifted into [0, 2**bits)
    assert np.array_equal(q.astype(np.int64), encoded.astype(np.int64) + half)


def test_orders_must_be_integers() -> None:
    with pytest.raises(dn.DistributedNoiseError, match="integer orders"):
        dn.compute_skellam_rdp([1.5], 1.0, 1.0, 10.0)


def test_honest_sums_stay_within_the_bound_and_a_poisoned_share_does_not() -> None:
    # Prepare: three partners' shares of 40 users each on 2,000 coordinates, all gradients aligned
    rng = np.random.default_rng(4)
    c, dim, n, users = 0.5, 2000, 3, 120
    plan = dn.compute_share_plan(1.0, c, 10, dim, n, n)
    direction = np.ones(dim) / math.sqrt(dim)
    honest = sum(dn.compute_rounded(users // n * c * direction, plan.grid_step)
                 + dn.compute_skellam_share((dim,), plan.share_variance, rng) for _ in range(n))
    poisoned = honest.copy()
    poisoned[0] += 2 ** 27  # one partner's share with one huge coordinate
    # Execute
    bound = dn.compute_sum_bound(users, n, c, plan.grid_step, dim, plan.share_variance)
    # Assert
    assert np.linalg.norm(honest) <= bound < np.linalg.norm(poisoned)
