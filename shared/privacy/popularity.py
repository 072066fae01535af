"""The DP item-popularity release and the item prior made from it (issue 12 item 3).

Under DP-SGD every user's whole gradient is clipped to ``max_grad_norm`` and every coordinate of every
trained table is noised at every step, so the item biases (one coordinate per item out of millions)
learn popularity very slowly: at small epsilon the shared model ranks at random, far below MostPop.
Popularity is one histogram, and a histogram is what the Gaussian mechanism releases best:

* each user ``u`` contributes the vector ``x_u = 1[i in I_u] / sqrt(|I_u|)`` over the catalogue
  (``I_u``: the user's distinct training items), so ``||x_u||_2 = 1`` exactly and adding or removing
  one user moves the histogram ``h = sum_u x_u`` by at most 1 in L2 norm (user-level adjacency);
* the partner releases ``h + N(0, sigma^2 I)`` once, before its first DP training round (the Gaussian
  mechanism, Dwork and Roth 2014, Theorem A.1; its RDP is ``alpha / (2 sigma^2)``, Mironov 2017,
  the same as one sampled-Gaussian step at sample rate 1), charged in its ledger as the event
  ``(sigma, 1.0, 1)`` with ``release = "popularity"``; the training noise is calibrated with that
  event already in the history, so the cap still holds after the last round;
* the partner sends ``noisy h / n_p`` as the shared array ``item_pop`` of round 1; the server's
  user-weighted average of those is the federation's ``sum_p noisy h_p / N``; every later round sends
  it back unchanged (it is not trained);
* the model adds the fixed prior ``log(max(m, 0) + s) - log(s)`` to every item's score, where ``s`` is
  the root mean square of the negative entries of ``m`` (entries below zero are noise: an estimate of
  the noise scale from the release itself). All of it is post-processing of the release.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.shared.fileio import save_npz_atomic

POPULARITY_RELEASE = "popularity_release.npz"
POPULARITY_SENSITIVITY = 1.0  # L2 norm of one user's contribution vector


def uses_popularity_release(cfg: Any) -> bool:
    """Whether a config releases popularity and its model carries the prior (DP on, social model, sigma > 0)."""
    pc = cfg.privacy
    return bool(pc.enabled and pc.popularity_noise_multiplier > 0 and cfg.model.name == "social")


def compute_release_prefix(cfg: Any) -> list[tuple[float, float, int]]:
    """The events charged before the first DP training round under ``cfg`` (what calibration composes with)."""
    return [popularity_event(cfg.privacy.popularity_noise_multiplier)] if uses_popularity_release(cfg) else []


def compute_user_contributions(users: np.ndarray, items: np.ndarray, n_users: int) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, weights) of the distinct (user, item) pairs, each weighted ``1 / sqrt(|I_u|)``."""
    pairs = np.unique(np.stack([np.asarray(users, np.int64), np.asarray(items, np.int64)], 1), axis=0)
    u, i = pairs[:, 0], pairs[:, 1]
    counts = np.bincount(u, minlength=n_users).astype(np.float64)
    return u, i, 1.0 / np.sqrt(counts[u])  # every user with items has ||x_u||_2 = 1 exactly


def compute_popularity_histogram(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> np.ndarray:
    """``h = sum_u x_u`` [n_items], float64: each user's distinct items, weighted to unit L2 norm."""
    _, i, w = compute_user_contributions(users, items, n_users)
    return np.bincount(i, weights=w, minlength=n_items).astype(np.float64)


def compute_noisy_histogram(histogram: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The Gaussian mechanism: ``h + N(0, (sigma * sensitivity)^2)`` on every item (Dwork and Roth 2014)."""
    if not sigma > 0:
        raise ValueError(f"privacy.popularity_noise_multiplier: must be > 0 for a release, got {sigma!r}")
    return histogram + rng.normal(0.0, sigma * POPULARITY_SENSITIVITY, histogram.shape)


def compute_popularity_prior(m: np.ndarray) -> np.ndarray:
    """The item prior ``log(max(m, 0) + s) - log(s)`` >= 0 from a (noisy, scaled) histogram ``m``.

    ``s`` is the root mean square of the negative entries: below zero there is only noise, so ``s``
    estimates the noise scale, and items the release cannot tell from noise get a prior near 0. The
    log matches the softmax item bias of a popularity model (``log p_i``). All zeros (nothing released)
    gives all zeros.
    """
    m = np.asarray(m, dtype=np.float64)
    negative = m[m < 0]
    if negative.size == 0:
        positive = m[m > 0]
        if positive.size == 0:
            return np.zeros_like(m)
        s = float(positive.min())  # no noise visible (exact counts): the smallest count as the floor
    else:
        s = float(np.sqrt(np.mean(np.square(negative))))
    return np.log(np.maximum(m, 0.0) + s) - np.log(s)


def popularity_event(sigma: float) -> tuple[float, float, int]:
    """The accountant event of the release: one Gaussian step at sample rate 1."""
    return (float(sigma), 1.0, 1)


def compute_popularity_digest(noisy: np.ndarray) -> str:
    """SHA-256 over the release's dtype, shape and bytes (what its ledger entry records)."""
    a = np.ascontiguousarray(noisy, dtype=np.float64)
    return hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode() + a.tobytes()).hexdigest()


def save_popularity_release(state_dir: Path, noisy: np.ndarray, meta: dict[str, Any]) -> str:
    """Keep the release (0600) before its ledger entry, so a re-run re-sends it instead of a second draw."""
    digest = compute_popularity_digest(noisy)
    doc = json.dumps({"digest": digest, **meta}).encode("utf-8")
    save_npz_atomic(state_dir / POPULARITY_RELEASE, {"noisy": np.asarray(noisy, np.float64),
                                                     "meta": np.frombuffer(doc, dtype=np.uint8)}, mode=0o600)
    os.chmod(state_dir / POPULARITY_RELEASE, 0o600)
    return digest


def load_popularity_release(state_dir: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(noisy histogram, meta) of the saved release; None when missing, unreadable or altered."""
    import zipfile

    path = state_dir / POPULARITY_RELEASE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            noisy = np.asarray(z["noisy"], dtype=np.float64)
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if not isinstance(meta, dict) or meta.get("digest") != compute_popularity_digest(noisy):
        return None
    return noisy, meta
