"""What a partner sends: the update of the shared parameters, clipped to an L2 bound before it leaves.

Clipping the whole update (all shared arrays together, one global L2 norm) to ``clipping_norm`` bounds
each partner's influence on the average; it is what makes the optional server-side Gaussian noise a
partner-level DP mechanism (McMahan et al. 2018, "Learning differentially private recurrent language
models", Algorithm 1: per-client clipping of the model delta) and what lets SecAgg+ quantise the
update into a known range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class UpdateError(ValueError):
    """The arrays of an update do not line up with the parameters they update."""


def compute_update_norm(update: Sequence[np.ndarray]) -> float:
    """The global L2 norm over all arrays (float64 accumulation, so float32 inputs do not overflow)."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update)))


def compute_update(new: Sequence[np.ndarray], old: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``new - old`` per array, in float64; shapes must match pairwise."""
    if len(new) != len(old):
        raise UpdateError(f"update has {len(new)} arrays, the global parameters {len(old)}")
    out = []
    for i, (n, o) in enumerate(zip(new, old, strict=True)):
        if n.shape != o.shape:
            raise UpdateError(f"array {i}: shape {n.shape} != global shape {o.shape}")
        out.append(n.astype(np.float64) - o.astype(np.float64))
    return out


def compute_clip_factor(norm: float, clipping_norm: float) -> float:
    """``min(1, C / norm)``: the scale that brings an update of L2 norm ``norm`` inside the ball of radius C."""
    if not clipping_norm > 0:
        raise UpdateError(f"clipping_norm must be > 0, got {clipping_norm!r}")
    return 1.0 if norm <= clipping_norm else clipping_norm / norm


def compute_clipped_update(
    new: Sequence[np.ndarray], old: Sequence[np.ndarray], clipping_norm: float
) -> tuple[list[np.ndarray], float]:
    """The update ``new - old`` scaled to L2 norm at most ``clipping_norm``, as float32, and its norm before.

    A non-finite update cannot be clipped meaningfully; it is an error here rather than a NaN on the wire.
    """
    delta = compute_update(new, old)
    norm = compute_update_norm(delta)
    if not np.isfinite(norm):
        raise UpdateError("the update has non-finite values (did local training diverge?)")
    scale = compute_clip_factor(norm, clipping_norm)
    clipped = [(d * scale).astype(np.float32) for d in delta]
    # float32 rounding can push the norm a hair over C; shrink once more so the bound holds exactly.
    after = compute_update_norm(clipped)
    if after > clipping_norm:
        clipped = [(c * np.float32(clipping_norm / after * (1 - 1e-7))).astype(np.float32) for c in clipped]
    return clipped, norm
