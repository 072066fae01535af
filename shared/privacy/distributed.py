"""Distributed noise under secure aggregation: the Skellam mechanism on a rounded gradient sum.

One federated round is one full-batch DP-GD step over the union of the partners' users. Each partner
clips every user's gradient to ``max_grad_norm`` (C), sums them, rounds the sum onto the integer grid
of step ``gamma = C / 2**grid_bits``, adds an integer share of Skellam noise and sends the result
masked under SecAgg+ (modulo ``2**bits``). The server learns only the sum over partners, which is the
rounded clipped sum plus one Skellam variable per coordinate: the sum of independent Skellam variables
is Skellam, so the shares of ``t`` partners of variance ``mu / t`` give exactly the variance ``mu``
(Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private Federated Learning",
NeurIPS 2021). Nothing is rounded inside the secure sum: the shares are integers, and SecAgg+'s own
quantisation maps them onto themselves (server/secagg.py).

Assumptions, stated wherever the guarantee is: the secure sum hides every share, and at least ``t``
partners whose shares are in a released sum neither collude with the server nor drop out after
sending (the server refuses to aggregate fewer than ``t``). A colluder knows its own share, so the
noise that protects a user is that of the honest contributors. Two sums holding one share would
release their difference with a fraction of the noise, so a share enters one secure sum only: a partner
asked again for a round it released declines it (client/partner.py), and the round is lost, never
released twice.

Pure functions; :mod:`shared.privacy.accounting` composes the result (``rdp_int``: RDP at integer
orders, where the Skellam bound is proved).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SUM_BITS_MAX = 32  # SecAgg+'s modulus is 2**32 (Flower's maximum; masks are uint32)
# Shared parameters that are not trained but set from a partner's own DP release (the popularity prior,
# shared/privacy/popularity.py): a partner sends value x its users on VALUE_GRID, no noise (the value is
# already a charged release, and every later round's value is the public global one), and the server
# sets the users-weighted mean; they are not in the Skellam mechanism's dimension.
VALUE_PARAMS = ("item_pop",)
VALUE_GRID = 2.0 ** -4


class DistributedNoiseError(ValueError):
    """Settings under which the distributed mechanism's guarantee or its arithmetic would not hold."""


def compute_grid_step(max_grad_norm: float, grid_bits: int) -> float:
    """gamma = C / 2**grid_bits: a clipped user gradient spans 2**grid_bits grid steps."""
    if not max_grad_norm > 0 or not 1 <= grid_bits <= 40:
        raise DistributedNoiseError(f"grid step needs max_grad_norm > 0 and 1 <= grid_bits <= 40, "
                                    f"got {max_grad_norm!r}, {grid_bits!r}")
    return float(max_grad_norm) / float(2 ** int(grid_bits))


def compute_rounded_sensitivity(max_grad_norm: float, grid_step: float, dim: int) -> tuple[float, float]:
    """(L1, L2) sensitivity of ``rint(sum / gamma)`` when one user is added or removed.

    The clipped sum moves by at most C in L2; rounding moves each of the ``dim`` coordinates of either
    sum by at most 1/2, so the rounded sums differ by at most C / gamma + sqrt(dim) in L2 and by
    sqrt(dim) C / gamma + dim in L1 (triangle inequality; Kairouz, Liu and Steinke 2021, Sect. 4,
    bound the same error for randomised rounding).
    """
    if dim < 1 or not grid_step > 0:
        raise DistributedNoiseError(f"sensitivity needs dim >= 1 and grid_step > 0, got {dim}, {grid_step}")
    scaled = float(max_grad_norm) / float(grid_step)
    return math.sqrt(dim) * scaled + dim, scaled + math.sqrt(dim)


def compute_skellam_rdp(orders: Sequence[int], l1: float, l2: float, variance: float) -> np.ndarray:
    """RDP of the multi-dimensional Skellam mechanism at integer orders alpha > 1.

    Agarwal, Kairouz and Liu 2021, Theorem 3.5 (noise of variance ``variance`` per coordinate,
    integer-valued query of sensitivities ``l1``, ``l2``):
    eps(alpha) <= alpha l2^2 / (2 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu)).
    """
    a = np.asarray([_integer_order(x) for x in orders], dtype=float)
    mu = float(variance)
    if not mu > 0:
        raise DistributedNoiseError(f"Skellam variance must be > 0, got {variance!r}")
    extra = np.minimum(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu))
    return np.asarray(a * l2 ** 2 / (2 * mu) + extra)


def compute_gaussian_equivalent(l1: float, l2: float, variance: float) -> float:
    """The noise multiplier s of a Gaussian (sensitivity 1) whose RDP alpha / (2 s^2) bounds the Skellam
    mechanism's at every integer order alpha > 1 (the ledger records s; the accountant composes it).

    From Theorem 3.5, using 2 alpha - 1 < 2 alpha and 1 < alpha: eps(alpha) < alpha (l2^2 / (2 mu) +
    (l2^2 + 3 l1) / (2 mu^2)), i.e. 1 / s^2 = l2^2 / mu + (l2^2 + 3 l1) / mu^2.
    """
    mu = float(variance)
    if not mu > 0:
        raise DistributedNoiseError(f"Skellam variance must be > 0, got {variance!r}")
    return 1.0 / math.sqrt(l2 ** 2 / mu + (l2 ** 2 + 3 * l1) / mu ** 2)


def compute_skellam_variance(noise_multiplier: float, l1: float, l2: float) -> float:
    """The smallest total variance mu whose Gaussian equivalent is at least ``noise_multiplier``.

    Solves (l2^2 + 3 l1) x^2 + l2^2 x = 1 / s^2 for x = 1 / mu (the positive root), then rounds mu up
    by a relative 1e-12 so that floating point cannot leave it below the bound.
    """
    if not noise_multiplier > 0:
        raise DistributedNoiseError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    a, b, c = l2 ** 2 + 3 * l1, l2 ** 2, 1.0 / noise_multiplier ** 2
    x = 2 * c / (b + math.sqrt(b * b + 4 * a * c))  # the positive root, without cancellation
    mu = (1.0 / x) * (1 + 1e-12)
    while compute_gaussian_equivalent(l1, l2, mu) < noise_multiplier:
        mu *= 1 + 1e-12
    return mu


def compute_assumed_contributors(min_partners: int, reconstruction_threshold: int) -> int:
    """t: the fewest shares a released sum holds. The server unmasks no sum of fewer masked shares
    (server/secagg.py) and aggregates none below the quorum ``federation.min_partners``."""
    return max(2, int(min_partners), int(reconstruction_threshold))


def compute_share_variance(variance: float, contributors: int) -> float:
    """Each partner's share of the total variance: mu / t, so that any t honest shares sum to mu."""
    if contributors < 1:
        raise DistributedNoiseError(f"contributors must be >= 1, got {contributors}")
    return float(variance) / int(contributors)


def compute_skellam_share(shape: tuple[int, ...], variance: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise of ``variance`` per coordinate: Poisson(v / 2) - Poisson(v / 2), int64."""
    lam = float(variance) / 2.0
    if not lam > 0:
        raise DistributedNoiseError(f"Skellam variance must be > 0, got {variance!r}")
    return rng.poisson(lam, size=shape).astype(np.int64) - rng.poisson(lam, size=shape).astype(np.int64)


def compute_rounded(values: np.ndarray, grid_step: float) -> np.ndarray:
    """rint(values / gamma) as int64 (deterministic rounding: its error is in the sensitivity)."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) / grid_step)
    if not np.all(np.isfinite(scaled)) or np.any(np.abs(scaled) >= 2.0 ** 62):
        raise DistributedNoiseError("the rounded sum is not finite or does not fit int64")
    return scaled.astype(np.int64)


def compute_sum_bits(contributors: int) -> int:
    """Bits m of the modular sum: SecAgg+ adds the ``n`` shares in [0, 2**m) and their weights 2**m
    modulo 2**32, so n * 2**m < 2**32 (Flower's ``factor_combine``)."""
    if contributors < 1:
        raise DistributedNoiseError(f"contributors must be >= 1, got {contributors}")
    return SUM_BITS_MAX - math.ceil(math.log2(contributors + 1))


def compute_encoded(values: np.ndarray, bits: int) -> np.ndarray:
    """``values mod 2**bits`` shifted to [-2**(bits-1), 2**(bits-1)), as float64 (exact integers).

    The modular sum of encoded shares is the sum of the values modulo 2**bits: a function of the sum
    alone, whatever wraps around."""
    half = 1 << (bits - 1)
    return (np.mod(np.asarray(values, dtype=np.int64), 1 << bits) - half).astype(np.float64)


def compute_decoded_sum(encoded_sum: np.ndarray, contributors: int, bits: int) -> np.ndarray:
    """The centered integer sum in [-2**(bits-1), 2**(bits-1)) from the sum of ``contributors``
    encoded shares (each shifted by -2**(bits-1))."""
    half = 1 << (bits - 1)
    raw = np.rint(np.asarray(encoded_sum, dtype=np.float64)).astype(np.int64) + contributors * half
    return np.mod(raw + half, 1 << bits) - half


def _integer_order(x: float) -> int:
    if float(x) != int(x) or int(x) < 2:
        raise DistributedNoiseError(f"the Skellam bound holds at integer orders > 1, got {x!r}")
    return int(x)


@dataclass(frozen=True)
class SharePlan:
    """One round's distributed mechanism, derived from the calibrated Gaussian-equivalent noise."""

    noise_multiplier: float  # the Gaussian equivalent the ledger records (sample rate 1, one step)
    grid_step: float
    l1_sensitivity: float
    l2_sensitivity: float
    variance: float  # of the total noise per coordinate, given ``contributors`` honest shares
    share_variance: float  # each partner's share
    contributors: int  # t: the fewest honest shares any released sum holds (the stated assumption)
    sum_bits: int  # the modular sum's width

    def to_record(self) -> dict[str, float | int | str]:
        """The ledger entry's description of the mechanism (the audit re-derives it)."""
        return {"mechanism": "skellam", "grid_step": self.grid_step, "l1_sensitivity": self.l1_sensitivity,
                "l2_sensitivity": self.l2_sensitivity, "skellam_variance": self.variance,
                "share_variance": self.share_variance, "contributors": self.contributors, "sum_bits": self.sum_bits}


def compute_share_plan(noise_multiplier: float, max_grad_norm: float, grid_bits: int, dim: int,
                       contributors: int, partners: int) -> SharePlan:
    """The grid, sensitivities and Skellam variances for a round whose Gaussian equivalent is at least
    ``noise_multiplier`` when ``contributors`` of ``partners`` honest partners' shares are summed."""
    if not 1 <= contributors <= partners:
        raise DistributedNoiseError(f"contributors must be in [1, partners = {partners}], got {contributors}")
    step = compute_grid_step(max_grad_norm, grid_bits)
    l1, l2 = compute_rounded_sensitivity(max_grad_norm, step, dim)
    mu = compute_skellam_variance(noise_multiplier, l1, l2)
    return SharePlan(float(noise_multiplier), step, l1, l2, mu, compute_share_variance(mu, contributors),
                     int(contributors), compute_sum_bits(partners))


def compute_record_problems(record: Mapping[str, Any], noise_multiplier: float, max_grad_norm: float,
                            dim: int) -> list[str]:
    """What in a ledger entry's Skellam description does not support the noise multiplier it records:
    the sensitivities of its grid and of the model's ``dim`` coordinates, and the Gaussian equivalent of
    ``contributors`` x ``share_variance`` (the noise the honest shares sum to)."""
    try:
        step = float(record["grid_step"])
        share, t = float(record["share_variance"]), int(record["contributors"])
        l1, l2 = compute_rounded_sensitivity(max_grad_norm, step, dim)
        s = compute_gaussian_equivalent(l1, l2, share * t)
    except (KeyError, TypeError, ValueError) as exc:
        return [f"the Skellam description is incomplete or malformed ({exc})"]
    out = []
    if not (math.isclose(float(record.get("l2_sensitivity", -1)), l2, rel_tol=1e-9)
            and math.isclose(float(record.get("l1_sensitivity", -1)), l1, rel_tol=1e-9)):
        out.append(f"recorded sensitivities are not those of grid step {step:g} over {dim} coordinates "
                   f"(L1 {l1:.6g}, L2 {l2:.6g})")
    if s < noise_multiplier * (1 - 1e-9):
        out.append(f"{t} shares of variance {share:.6g} give a Gaussian equivalent of {s:.6g}, below the recorded "
                   f"noise_multiplier {noise_multiplier:.6g}")
    return out


def compute_sum_bound(users: int, contributors: int, max_grad_norm: float, grid_step: float, dim: int,
                      share_variance: float) -> float:
    """A bound no honest sum's L2 norm (in grid units) exceeds but with negligible probability: every user's
    clipped gradient aligned (users C / gamma), every partner's rounding at its worst (n sqrt(d) / 2), and
    the noise at twice its expected norm sqrt(d n v) (a chi-square over d coordinates, d >> 1, is within a
    few percent of its mean). A larger decoded sum is a hostile or broken share, not a gradient."""
    noise = 2.0 * math.sqrt(dim * contributors * share_variance) + 64.0 * math.sqrt(contributors * share_variance)
    return users * max_grad_norm / grid_step + contributors * math.sqrt(dim) / 2.0 + noise


def compute_secagg_share_settings(partners: int, num_shares: int, reconstruction_threshold: int
                                  ) -> dict[str, float | int]:
    """SecAgg+ settings under which its quantisation maps the encoded shares onto themselves: weight 1 of
    max_weight 1, clipping_range 2**(m-1) and quantization_range 2**m (one step per integer), so the unmasked
    sum is the shares' sum modulo 2**m (Flower's ``quantize`` and ``factor_combine``). The server runs the
    workflow with them and a partner refuses any other (client/flower.py)."""
    bits = compute_sum_bits(partners)
    if num_shares > 1 << (SUM_BITS_MAX - bits):
        raise DistributedNoiseError(f"secagg.num_shares: at most {1 << (SUM_BITS_MAX - bits)} with "
                                    f"privacy.distributed_noise and {partners} partners (Flower: num_shares <= "
                                    "modulus / quantization range)")
    return {"num_shares": int(num_shares), "reconstruction_threshold": int(reconstruction_threshold),
            "max_weight": 1.0, "clipping_range": float(1 << (bits - 1)), "quantization_range": 1 << bits,
            "modulus_range": 1 << SUM_BITS_MAX}
