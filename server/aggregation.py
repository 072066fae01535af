"""Pure server-side math: reply validation, weighted FedAvg of updates, optional server noise.

The partners send clipped *updates* (delta of the shared parameters against the global they received),
never their new parameters, so the server's step is ``global + weighted_mean(updates) (+ noise)``
(FedAvg, McMahan et al. 2017, with the DP-FedAvg noise of McMahan et al. 2018 as an option).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParamSpec:
    """One shared parameter as the server expects it on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


def compute_specs(names: Sequence[str], arrays: Sequence[np.ndarray]) -> list[ParamSpec]:
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} parameter names for {len(arrays)} arrays")
    return [ParamSpec(n, tuple(int(s) for s in a.shape), str(a.dtype)) for n, a in zip(names, arrays, strict=True)]


def compute_update_norm(update: Sequence[np.ndarray]) -> float:
    """Global L2 norm over all arrays, accumulated in float64."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update)))


def validate_update(
    arrays: Sequence[np.ndarray],
    names: Sequence[str],
    expected: Sequence[ParamSpec],
    *,
    clipping_norm: float,
    norm_tolerance: float,
    expected_round: int,
    reply_round: object,
    num_examples: int = 0,
) -> str | None:
    """Why a partner's reply must be dropped, or None when it is acceptable.

    Checks, in order: the echoed round, the parameter names (none missing, none unexpected, same
    order), the number of arrays, each array's shape, dtype and finiteness, the example count, and the
    update's global L2 norm against ``clipping_norm * (1 + norm_tolerance)``.
    """
    if isinstance(reply_round, bool) or not isinstance(reply_round, int) or reply_round != expected_round:
        return f"wrong round: reply is for round {reply_round!r}, the server is in round {expected_round}"
    want = [s.name for s in expected]
    if list(names) != want:
        unexpected = sorted(set(names) - set(want))
        missing = sorted(set(want) - set(names))
        if unexpected or missing:
            return f"parameter names differ: unexpected {unexpected}, missing {missing}"
        return "parameter names are in a different order than expected"
    if len(arrays) != len(expected):
        return f"{len(arrays)} arrays for {len(expected)} expected parameters"
    for arr, spec in zip(arrays, expected, strict=True):
        if tuple(arr.shape) != spec.shape:
            return f"{spec.name}: shape {tuple(arr.shape)}, expected {spec.shape}"
        if str(arr.dtype) != spec.dtype:
            return f"{spec.name}: dtype {arr.dtype}, expected {spec.dtype}"
        if not np.all(np.isfinite(arr)):
            return f"{spec.name}: non-finite values"
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        return f"num_examples must be an integer >= 0, got {num_examples!r}"
    norm = compute_update_norm(arrays)
    bound = clipping_norm * (1.0 + norm_tolerance)
    if norm > bound:
        return f"update norm {norm:.6g} exceeds clipping_norm {clipping_norm:g} (x (1 + {norm_tolerance:g}))"
    return None


def compute_weights(num_users: Sequence[int], weight_cap: int) -> np.ndarray:
    """Aggregation weights: the partners' user counts, capped at ``weight_cap`` when it is > 0."""
    w = np.asarray(num_users, dtype=np.float64)
    return np.minimum(w, float(weight_cap)) if weight_cap > 0 else w


def compute_weight_bounds(declared: Mapping[str, int], weight_cap: int, cap_ratio: float) -> dict[str, float]:
    """Each partner's largest aggregation weight, from the user counts declared at registration.

    A declared count is capped at ``weight_cap`` (when > 0) and at ``cap_ratio`` times the median
    declared count (when > 0): a partner cannot take the aggregate by declaring (or replying) a huge
    count; its share of the mean is at most ``cap_ratio / (cap_ratio + n - 1)`` against ``n - 1``
    partners of median size. Bounding a client's weight is DP-FedAvg's ``min(n_k / w_hat, 1)``
    (McMahan et al. 2018, "Learning differentially private recurrent language models", Sec. 2).
    """
    if not declared:
        return {}
    caps = [float(weight_cap)] if weight_cap > 0 else []
    if cap_ratio > 0:
        caps.append(cap_ratio * float(np.median(list(declared.values()))))
    return {pid: float(min([float(n), *caps])) for pid, n in declared.items()}


def compute_weighted_average(updates: Sequence[Sequence[np.ndarray]], weights: np.ndarray) -> list[np.ndarray]:
    """sum_k w_k u_k / sum_k w_k per array (float64); all zeros when the total weight is 0."""
    if len(updates) != len(weights) or not updates:
        raise ValueError(f"{len(updates)} updates for {len(weights)} weights")
    total = float(np.sum(weights))
    out = [np.zeros(a.shape, dtype=np.float64) for a in updates[0]]
    if total <= 0:
        return out
    for upd, w in zip(updates, weights, strict=True):
        for acc, a in zip(out, upd, strict=True):
            acc += (float(w) / total) * a.astype(np.float64)
    return out


def compute_server_noise_std(noise_multiplier: float, clipping_norm: float, n_partners: int) -> float:
    """Standard deviation sigma * C / n of the Gaussian noise on the averaged update (DP-FedAvg, uniform weights)."""
    return 0.0 if n_partners <= 0 else noise_multiplier * clipping_norm / n_partners


def compute_noised(update: Sequence[np.ndarray], std: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``update`` plus i.i.d. N(0, std^2) noise per coordinate (no-op when std is 0)."""
    if std <= 0:
        return [np.asarray(a, dtype=np.float64) for a in update]
    return [np.asarray(a, dtype=np.float64) + rng.normal(0.0, std, size=a.shape) for a in update]


def compute_applied(global_params: Sequence[np.ndarray], update: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The new global parameters ``global + update``, in the globals' dtypes."""
    return [(g.astype(np.float64) + u).astype(g.dtype) for g, u in zip(global_params, update, strict=True)]


def compute_weighted_metrics(
    metrics: Sequence[Mapping[str, float]], counts: Sequence[int], keys: Sequence[str]
) -> dict[str, float]:
    """Mean of each metric over partners weighted by their evaluated users (= the mean over all test users)."""
    total = float(sum(counts))
    if total <= 0:
        return {}
    return {k: float(sum(m[k] * c for m, c in zip(metrics, counts, strict=True)) / total) for k in keys}


def compute_is_eval_round(round_: int, num_rounds: int, eval_every: int) -> bool:
    """Whether the federated evaluation runs after ``round_``: every ``eval_every`` rounds and the last."""
    return round_ % eval_every == 0 or round_ >= num_rounds
