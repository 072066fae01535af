"""Pure server-side math: reply validation, weighted FedAvg of updates, optional server noise.

The partners send clipped *updates* (delta of the shared parameters against the global they received),
never their new parameters, so the server's step is ``global + weighted_mean(updates) (+ noise)``
(FedAvg, McMahan et al. 2017, with the DP-FedAvg noise of McMahan et al. 2018 as an option).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedsocial.shared import protocol


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


def compute_npy_header(raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | str:
    """(shape, Fortran order, dtype, data offset) of serialised ``.npy`` bytes, or why they are none.

    Only the header is read: nothing is unpickled or copied.
    """
    buf = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            return f"unsupported array format version {version}"
    except ValueError as exc:  # not an .npy array: bad magic, bad header, truncated
        return f"not a serialised array ({exc})"
    return tuple(int(n) for n in shape), bool(fortran), dtype, buf.tell()


def compute_decoded_update(tensors: object, expected: Sequence[ParamSpec]) -> list[np.ndarray] | str:
    """A reply's serialised arrays (``.npy`` bytes, as Flower's ``Parameters`` carry them) read against the
    arrays the server expects, or why they cannot be.

    Each array's header is read first and must name the expected shape and dtype, and the bytes after it
    must be exactly that array's: nothing is unpickled (an object array is refused by its dtype), and a
    reply claiming another shape is refused before any of its data is read or copied.
    """
    if not isinstance(tensors, (list, tuple)):
        return f"expected a list of serialised arrays, got {type(tensors).__name__}"
    if len(tensors) != len(expected):
        return f"{len(tensors)} arrays for {len(expected)} expected parameters"
    out = []
    for raw, spec in zip(tensors, expected, strict=True):
        if not isinstance(raw, bytes):
            return f"{spec.name}: expected serialised array bytes, got {type(raw).__name__}"
        header = compute_npy_header(raw)
        if isinstance(header, str):
            return f"{spec.name}: {header}"
        shape, fortran, dtype, offset = header
        if shape != spec.shape:
            return f"{spec.name}: shape {shape}, expected {spec.shape}"
        if dtype != np.dtype(spec.dtype):
            return f"{spec.name}: dtype {dtype}, expected {spec.dtype}"
        size = math.prod(spec.shape)
        if len(raw) - offset != size * dtype.itemsize:
            return f"{spec.name}: {len(raw) - offset} data bytes, expected {size * dtype.itemsize}"
        arr = np.frombuffer(raw, dtype=dtype, count=size, offset=offset)
        out.append(arr.reshape(spec.shape, order="F" if fortran else "C"))
    return out


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


def compute_privacy_bounds(declared: Mapping[str, object], max_epsilon: float, target_delta: float
                           ) -> tuple[float, float]:
    """The (epsilon, delta) a partner's releases must stay within: the run's ``privacy.max_epsilon`` and
    ``privacy.target_delta``, or the tighter ones the partner declared at registration (0 or absent: none
    declared). A declaration never loosens the run's."""
    caps = [float(max_epsilon)]
    deltas = [float(target_delta)]
    for key, out in (("max_epsilon", caps), ("target_delta", deltas)):
        value = declared.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            out.append(float(value))
    return min(caps), min(deltas)


def validate_privacy_claims(report: protocol.FitReport, *, privacy_enabled: bool, max_epsilon: float,
                            target_delta: float, update_norm: float) -> str | None:
    """Why a DP run must not take a reply's update on its privacy accounting, or None when it may.

    Under DP every contributing update is a release the partner's ledger charged: a non-zero update
    without its accounting (the ledger head the audit checks) would leave a partner the signed records
    say never trained, and one whose own accounting passes the partner's cap or delta breaks the
    budget it declared. Refused, as any bad reply, before it reaches the average.
    """
    if not privacy_enabled or report.budget_exhausted:
        return None
    acc = report.accounting
    if acc is None:
        if update_norm == 0.0:
            return None  # nothing learnt, nothing released (a model without trainable shared parameters)
        return "an update without the privacy accounting of its release (privacy is on): not charged in any ledger"
    if acc.epsilon > max_epsilon * (1.0 + 1e-9):
        return f"epsilon {acc.epsilon:g} after this release exceeds the cap {max_epsilon:g}"
    if acc.delta > target_delta * (1.0 + 1e-9):
        return f"delta {acc.delta:g} exceeds target_delta {target_delta:g}"
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


def compute_server_noise_rng(noise_key: bytes, round_: int) -> np.random.Generator:
    """The generator of round ``round_``'s server-side noise, keyed by the server's secret ``noise_key``.

    Noise seeded from the shared config could be regenerated and subtracted by anyone holding it (Abadi et al.
    2016 assume noise nobody can replay); one stream per round makes a re-run of a round draw the same noise,
    so a crash and resume never releases the same aggregate under two independent draws."""
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(noise_key, "big"), spawn_key=(0x5E, round_)))


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


def compute_adam_step(params: Sequence[np.ndarray], grads: Sequence[np.ndarray], m: Sequence[np.ndarray],
                      v: Sequence[np.ndarray], step: int, lr: float, weight_decay: float = 0.0,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
                      ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """One AdamW step on the server (Kingma and Ba 2015; decoupled decay, Loshchilov and Hutter 2019), the
    rule the partners' trainer uses: returns (update, m, v), ``step`` counted from 1. Distributed noise
    (shared/privacy/distributed.py) releases one noisy mean gradient a round; this is its optimizer, a
    post-processing of the releases only."""
    b1, b2 = betas
    c1, c2 = 1.0 - b1 ** step, 1.0 - b2 ** step
    updates, ms, vs = [], [], []
    for p, g, m_i, v_i in zip(params, grads, m, v, strict=True):
        g64 = np.asarray(g, dtype=np.float64)
        m_new = b1 * np.asarray(m_i, dtype=np.float64) + (1.0 - b1) * g64
        v_new = b2 * np.asarray(v_i, dtype=np.float64) + (1.0 - b2) * g64 * g64
        step_dir = (m_new / c1) / (np.sqrt(v_new / c2) + eps)
        updates.append(-lr * (step_dir + weight_decay * np.asarray(p, dtype=np.float64)))
        ms.append(m_new)
        vs.append(v_new)
    return updates, ms, vs
