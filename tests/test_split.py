"""Per-user split: RecBole's sizes, disjoint parts that cover the data, determinism, CSR helpers."""

from __future__ import annotations

import numpy as np
import pytest

from fedsocial.shared.config import SplitConfig
from fedsocial.shared.data import Dataset
from fedsocial.shared.split import compute_split_sizes, split_dataset, to_csr, user_item_lists


def recbole_sizes(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """RecBole's ``_calcu_split_ids`` written out one user at a time, as a reference."""
    cnt = [int(r * n + 1e-9) for r in ratios]
    cnt[0] = n - sum(cnt[1:])
    for i in range(1, len(ratios)):
        if cnt[0] <= 1:
            break
        if 0 < ratios[-i] * n < 1:
            cnt[-i] += 1
            cnt[0] -= 1
    return cnt[0], cnt[1], cnt[2]


def random_dataset(n_users: int, n_items: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 40, size=n_users)
    users = np.repeat(np.arange(n_users), counts)
    items = np.concatenate([rng.choice(n_items, size=c, replace=False) for c in counts])
    e = np.zeros(0, dtype=np.int64)
    return Dataset(n_users=n_users, n_items=n_items, users=users, items=items, social_src=e, social_dst=e)


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.7, 0.1, 0.2), (0.6, 0.2, 0.2)])
def test_split_sizes_match_recbole_rule(ratios: tuple[float, float, float]) -> None:
    # Prepare
    cfg = SplitConfig(train=ratios[0], val=ratios[1], test=ratios[2], min_interactions=3)
    counts = np.arange(1, 200)
    # Execute
    sizes = np.stack(compute_split_sizes(counts, cfg), axis=1)
    # Assert
    expected = np.array([recbole_sizes(n, ratios) if n >= 3 else (n, 0, 0) for n in counts.tolist()])
    np.testing.assert_array_equal(sizes, expected)


def test_split_sizes_small_users() -> None:
    sizes = np.stack(compute_split_sizes(np.array([1, 2, 3, 10, 15]), SplitConfig()), axis=1)
    assert sizes.tolist() == [[1, 0, 0], [2, 0, 0], [1, 1, 1], [8, 1, 1], [13, 1, 1]]


def test_split_partitions_each_users_items_and_is_deterministic() -> None:
    # Prepare
    ds = random_dataset(300, 120, seed=0)
    cfg = SplitConfig(seed=5)
    # Execute
    a, b = split_dataset(ds, cfg), split_dataset(ds, cfg)
    # Assert: the three parts are disjoint and cover every interaction; same seed -> same split.
    parts = [(a.train_users, a.train_items), (a.val_users, a.val_items), (a.test_users, a.test_items)]
    keys = [set(zip(u.tolist(), i.tolist(), strict=True)) for u, i in parts]
    assert sum(len(k) for k in keys) == ds.n_interactions
    assert keys[0] | keys[1] | keys[2] == set(zip(ds.users.tolist(), ds.items.tolist(), strict=True))
    for x, y in ((a.train_items, b.train_items), (a.val_items, b.val_items), (a.test_items, b.test_items)):
        np.testing.assert_array_equal(x, y)
    counts = np.bincount(ds.users, minlength=ds.n_users)
    n_train, n_val, n_test = compute_split_sizes(counts, cfg)
    np.testing.assert_array_equal(np.bincount(a.val_users, minlength=ds.n_users), n_val)
    np.testing.assert_array_equal(np.bincount(a.test_users, minlength=ds.n_users), n_test)
    assert (np.bincount(a.test_users, minlength=ds.n_users)[counts < 3] == 0).all()
    assert (np.diff(a.train_users) >= 0).all()


def test_split_depends_on_seed_and_is_uniform_within_user() -> None:
    # Prepare: one user with 10 items, split 2000 times with different seeds.
    ds = Dataset(n_users=1, n_items=10, users=np.zeros(10, np.int64), items=np.arange(10),
                 social_src=np.zeros(0, np.int64), social_dst=np.zeros(0, np.int64))
    # Execute
    hits = np.zeros(10)
    for seed in range(2000):
        hits[split_dataset(ds, SplitConfig(seed=seed)).test_items] += 1
    # Assert: every item is the test item about 1/10 of the time (binomial sd about 13).
    assert hits.sum() == 2000 and np.abs(hits - 200).max() < 60


def test_to_csr_and_user_item_lists() -> None:
    # Prepare
    users, items = np.array([2, 0, 2, 0, 3]), np.array([5, 4, 1, 2, 9])
    # Execute
    indptr, indices = to_csr(users, items, 5)
    lists = user_item_lists(users, items, 5)
    # Assert
    assert indptr.tolist() == [0, 2, 2, 4, 5, 5] and indices.tolist() == [2, 4, 1, 5, 9]
    assert [x.tolist() for x in lists] == [[2, 4], [], [1, 5], [9], []]
