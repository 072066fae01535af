"""SecAgg+ settings derived from the federation's config, validated before any round starts.

Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the client; Bell et
al. 2020, building on Bonawitz et al. 2017) makes each partner send ``r * x`` with ``r = w / max_weight``,
its coordinates clipped to ``[-clipping_range, clipping_range]`` and stochastically quantised to
integers in ``[0, quantization_range]``, masked modulo ``modulus_range``. The server learns only the
sum. Three settings must therefore match the rest of the pipeline:

- ``clipping_range``: a partner's update is clipped to L2 norm ``federation.clipping_norm`` and
  ``|x_j| <= ||x||_2``, so every coordinate lies in ``[-clipping_norm, clipping_norm]`` and
  ``r <= 1`` keeps it there: ``clipping_range = clipping_norm`` never clips a valid update.
- ``max_weight``: the aggregation weights are the partners' user counts, capped at
  ``federation.weight_cap``; ``r`` must not exceed 1 (Flower warns of overflow), so
  ``max_weight >= max(weights)``, and as small as that for precision.
- ``quantization_range``: the masked sum of ``n`` partners' values lies in ``[0, n * Q]`` and must
  not wrap modulo ``modulus_range``; the quantisation error must stay below ``secagg.precision``.

Inconsistent settings raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedsocial.shared.config import Config, ConfigError

MODULUS_RANGE = 2**32  # Flower's default and its maximum (masks are uint32)


def compute_max_weight(cfg: Config, weights: Sequence[float] | None = None) -> float:
    """The largest aggregation weight any partner can have: the capped user counts' maximum.

    ``weights`` are the partners' user counts when known; otherwise ``federation.weight_cap`` bounds
    every weight, and for synthetic data no partner has more than ``data.n_users`` users.
    """
    cap = cfg.federation.weight_cap
    if weights is not None:
        if not weights or min(weights) <= 0:
            raise ConfigError(f"secagg.max_weight: aggregation weights must be positive, got {list(weights)}")
        return float(max(min(w, cap) if cap > 0 else w for w in weights))
    if cap > 0:
        return float(cap)
    if cfg.data.format == "synthetic":
        return float(cfg.data.n_users)
    raise ConfigError("secagg.max_weight: cannot be derived without the partners' user counts; "
                      "set federation.weight_cap or secagg.max_weight")


def compute_worst_mean_weight(cfg: Config, weights: Sequence[float]) -> float:
    """The smallest mean capped weight of a quorum: the ``federation.min_partners`` lightest partners."""
    cap = cfg.federation.weight_cap
    capped = sorted(min(w, cap) if cap > 0 else w for w in weights)
    k = max(1, min(cfg.federation.min_partners, len(capped)))
    return float(sum(capped[:k]) / k)


def compute_quantization_error(clipping_range: float, clipping_norm: float, quantization_range: int,
                               max_weight: float, mean_weight: float) -> float:
    """Worst-case per-coordinate error of the SecAgg+ weighted mean, from quantisation alone.

    Each of the ``n`` partners' values ``r_i x_ij`` (``r_i = w_i / max_weight``) is rounded
    stochastically with an error below one step ``2 R / Q``; the weight ``r_i`` itself is rounded to
    ``q_i / Q`` (error <= ``1 / (2 Q)``, times ``|x_ij| <= C``). The server divides the sum by
    ``sum_i r_i = n * mean_weight / max_weight``, so the error is at most
    ``(2 R + C / 2) * max_weight / (Q * mean_weight)``.
    """
    return (2.0 * clipping_range + 0.5 * clipping_norm) * max_weight / (quantization_range * mean_weight)


def derive_secagg_settings(cfg: Config, weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``SecAggPlusWorkflow`` consistent with ``cfg`` (and the weights, if known).

    Without ``weights`` the precision check assumes equal weights (a necessary condition); with the
    partners' user counts it uses the lightest quorum. Returns ``num_shares``,
    ``reconstruction_threshold``, ``max_weight``, ``clipping_range``, ``quantization_range`` and
    ``modulus_range``. Raises :class:`ConfigError` naming the key of the first inconsistent setting.
    """
    sa, fed = cfg.secagg, cfg.federation
    _check_shares(sa.num_shares, sa.reconstruction_threshold, fed.partners, fed.min_partners)

    clipping_range = sa.clipping_range or fed.clipping_norm
    if clipping_range < fed.clipping_norm:
        raise ConfigError(f"secagg.clipping_range: {clipping_range:g} is below federation.clipping_norm "
                          f"{fed.clipping_norm:g}; coordinates of valid updates would be clipped")

    needed = compute_max_weight(cfg, weights)
    max_weight = sa.max_weight or needed
    if max_weight < needed:
        raise ConfigError(f"secagg.max_weight: {max_weight:g} is below the largest aggregation weight "
                          f"{needed:g} (user counts capped by federation.weight_cap); the sum would overflow")

    q = sa.quantization_range
    if fed.partners * q >= MODULUS_RANGE:
        raise ConfigError(f"secagg.quantization_range: {q} x {fed.partners} partners must stay below the "
                          f"modulus 2**32, else the masked sum wraps around")
    mean_weight = compute_worst_mean_weight(cfg, weights) if weights is not None else max_weight
    error = compute_quantization_error(clipping_range, fed.clipping_norm, q, max_weight, mean_weight)
    if error > sa.precision * fed.clipping_norm:
        raise ConfigError(f"secagg.quantization_range: {q} gives a quantisation error up to {error:.3g} per "
                          f"coordinate, above secagg.precision x clipping_norm = "
                          f"{sa.precision * fed.clipping_norm:.3g}; raise it, or lower secagg.max_weight")
    return {
        "num_shares": sa.num_shares,
        "reconstruction_threshold": sa.reconstruction_threshold,
        "max_weight": max_weight,
        "clipping_range": clipping_range,
        "quantization_range": q,
        "modulus_range": MODULUS_RANGE,
    }


def _check_shares(num_shares: int, threshold: int, partners: int, min_partners: int) -> None:
    """The share settings Flower accepts, that resist an active server, and that survive the quorum."""
    if num_shares < 3:  # Flower refuses an integer num_shares <= 2
        raise ConfigError(f"secagg.num_shares: must be >= 3 (Flower's SecAgg+), got {num_shares}")
    if num_shares > partners:
        raise ConfigError(f"secagg.num_shares: {num_shares} exceeds federation.partners {partners}")
    if threshold >= num_shares:  # Flower: reconstruction_threshold < num_shares
        raise ConfigError(f"secagg.reconstruction_threshold: must be below secagg.num_shares {num_shares}, "
                          f"got {threshold}")
    if 2 * threshold <= num_shares:
        # A server that lies about who dropped out could collect both kinds of shares from a
        # neighbourhood unless more than half are needed (Bonawitz et al. 2017, section 6).
        raise ConfigError(f"secagg.reconstruction_threshold: must exceed half of secagg.num_shares "
                          f"({num_shares}), got {threshold}")
    dropouts = partners - min_partners
    if num_shares - dropouts < threshold:
        raise ConfigError(f"secagg.reconstruction_threshold: {threshold} shares cannot be recovered when "
                          f"{dropouts} of {partners} partners drop out (federation.min_partners "
                          f"{min_partners}); lower it or raise secagg.num_shares")
