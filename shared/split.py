"""Seeded per-user train / validation / test split, and compressed per-user item lists.

The split follows RecBole's ``split_by_ratio`` with ``group_by = user`` (the protocol behind the
published LastFM tables): each user's interactions are shuffled, the validation and test parts get
``floor(ratio * n)`` items, raised to one item when ``0 < ratio * n < 1`` while more than one
training item remains, and the rest is training. Users with fewer than ``min_interactions``
interactions are train-only (DESIGN.md, evaluation protocol).
"""

from __future__ import annotations

import numpy as np

from fedsocial.shared.config import SplitConfig
from fedsocial.shared.data import Dataset, SplitData

# floor(0.1 * 30) must be 3 although 0.1 * 30 is computed as 3.0000000000000004 or, for other
# ratios, a hair below the integer: a tiny tolerance keeps the floor exact.
_EPS = 1e-9


def compute_split_sizes(counts: np.ndarray, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user (n_train, n_val, n_test) for interaction counts ``counts`` (vectorised RecBole rule)."""
    counts = np.asarray(counts, dtype=np.int64)
    n_val = np.floor(cfg.val * counts + _EPS).astype(np.int64)
    n_test = np.floor(cfg.test * counts + _EPS).astype(np.int64)
    n_train = counts - n_val - n_test
    # RecBole bumps the last part first (test), then validation, while training keeps > 1 item.
    for part, ratio in ((n_test, cfg.test), (n_val, cfg.val)):
        bump = (part == 0) & (ratio * counts > 0) & (ratio * counts < 1) & (n_train > 1)
        part += bump
        n_train -= bump
    train_only = counts < cfg.min_interactions
    n_train = np.where(train_only, counts, n_train)
    n_val = np.where(train_only, 0, n_val)
    n_test = np.where(train_only, 0, n_test)
    return n_train, n_val, n_test


def compute_user_ranks(users: np.ndarray, n_users: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rank 0..n_u-1 of each interaction within its user's interactions."""
    order = np.lexsort((rng.random(users.size), users))
    starts = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=starts[1:])
    ranks = np.empty(users.size, dtype=np.int64)
    ranks[order] = np.arange(users.size, dtype=np.int64) - starts[users[order]]
    return ranks


def split_dataset(ds: Dataset, cfg: SplitConfig) -> SplitData:
    """Split every user's interactions 8:1:1 (by default), seeded by ``cfg.seed``; deterministic.

    Each part is sorted by (user, item).
    """
    rng = np.random.default_rng(cfg.seed)
    counts = np.bincount(ds.users, minlength=ds.n_users)
    n_train, n_val, _ = compute_split_sizes(counts, cfg)
    ranks = compute_user_ranks(ds.users, ds.n_users, rng)
    limit_train, limit_val = n_train[ds.users], (n_train + n_val)[ds.users]
    parts = []
    for mask in (ranks < limit_train, (ranks >= limit_train) & (ranks < limit_val), ranks >= limit_val):
        u, i = ds.users[mask], ds.items[mask]
        order = np.lexsort((i, u))
        parts.append((u[order], i[order]))
    (tu, ti), (vu, vi), (su, si) = parts
    return SplitData(dataset=ds, train_users=tu, train_items=ti, val_users=vu, val_items=vi,
                     test_users=su, test_items=si)


def to_csr(users: np.ndarray, items: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Compressed rows: user u's items are ``indices[indptr[u]:indptr[u + 1]]``, sorted ascending."""
    order = np.lexsort((items, users))
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    return indptr, np.asarray(items, dtype=np.int64)[order]


def user_item_lists(users: np.ndarray, items: np.ndarray, n_users: int) -> list[np.ndarray]:
    """Each user's sorted item array (views into one CSR index array)."""
    indptr, indices = to_csr(users, items, n_users)
    return np.split(indices, indptr[1:-1])
