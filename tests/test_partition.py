"""Partitions into partners, and each partner's local view of a split dataset."""

from __future__ import annotations

import numpy as np
import pytest

from fedsocial.shared.config import ConfigError, DataConfig, PartitionConfig, SplitConfig
from fedsocial.shared.data import Dataset
from fedsocial.shared.partition import (
    compute_balanced_packing,
    compute_dominant_category,
    compute_within_share,
    partition_users,
    partner_split,
)
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return generate(DataConfig(n_users=600))


@pytest.mark.parametrize("method", ["random", "community", "dirichlet"])
def test_every_partner_is_non_empty_and_assignment_is_seeded(ds: Dataset, method: str) -> None:
    # Prepare
    cfg = PartitionConfig(method=method, seed=3)
    # Execute
    a, b = partition_users(ds, 5, cfg), partition_users(ds, 5, cfg)
    # Assert
    assert a.shape == (ds.n_users,) and a.min() == 0 and a.max() == 4
    assert (np.bincount(a, minlength=5) > 0).all()
    np.testing.assert_array_equal(a, b)


def test_random_is_balanced_and_depends_on_seed(ds: Dataset) -> None:
    a = partition_users(ds, 7, PartitionConfig(method="random", seed=1))
    b = partition_users(ds, 7, PartitionConfig(method="random", seed=2))
    sizes = np.bincount(a)
    assert sizes.max() - sizes.min() <= 1 and not np.array_equal(a, b)


def test_community_keeps_most_friendships_inside_partners(ds: Dataset) -> None:
    # Prepare
    n = 5
    # Execute
    community = partition_users(ds, n, PartitionConfig(method="community"))
    random = partition_users(ds, n, PartitionConfig(method="random"))
    # Assert: random keeps about 1/n of the edges inside; Louvain packing keeps far more
    # (measured here: 0.72 vs 0.20), with partners within 30% of the mean size.
    assert compute_within_share(ds, random) < 0.3
    assert compute_within_share(ds, community) > 0.6
    sizes = np.bincount(community, minlength=n)
    assert np.abs(sizes - ds.n_users / n).max() < 0.3 * ds.n_users / n


def test_community_gives_isolated_users_a_partner_and_splits_one_big_community() -> None:
    # Prepare: a 10-user clique (one Louvain community) plus 2 isolated users, 3 partners.
    src, dst = np.array([(u, v) for u in range(10) for v in range(10) if u != v]).T
    users = np.arange(12)
    ds = Dataset(n_users=12, n_items=1, users=users, items=np.zeros(12, np.int64),
                 social_src=src, social_dst=dst)
    # Execute
    a = partition_users(ds, 3, PartitionConfig(method="community"))
    # Assert: the clique is cut into fair-share pieces so that all three partners are used.
    assert sorted(np.bincount(a, minlength=3).tolist()) == [4, 4, 4]


def test_balanced_packing_puts_largest_first_into_smallest() -> None:
    owner = compute_balanced_packing(np.array([5, 1, 4, 3, 3]), 2)
    loads = np.bincount(owner, weights=[5, 1, 4, 3, 3], minlength=2)
    assert owner.tolist() == [0, 1, 1, 1, 0] and loads.tolist() == [8.0, 8.0]


def test_dirichlet_small_alpha_concentrates_categories(ds: Dataset) -> None:
    # Prepare
    dominant = compute_dominant_category(ds)

    def purity(alpha: float) -> float:
        """Mean over partners of the share of the partner's most common dominant category."""
        a = partition_users(ds, 4, PartitionConfig(method="dirichlet", alpha=alpha, seed=0))
        return float(np.mean([np.bincount(dominant[a == p]).max() / (a == p).sum() for p in range(4)]))

    # Execute / Assert: small alpha -> specialised partners; large alpha -> mixed partners.
    assert purity(0.05) > purity(100.0) + 0.1


def test_dominant_category_is_the_mode_of_the_users_items() -> None:
    ds = Dataset(n_users=2, n_items=3, users=np.array([0, 0, 0, 1]), items=np.array([0, 1, 2, 2]),
                 social_src=np.zeros(0, np.int64), social_dst=np.zeros(0, np.int64),
                 item_category=np.array([1, 1, 0]))
    assert compute_dominant_category(ds).tolist() == [1, 0]


def test_dirichlet_without_categories_is_a_clear_error(ds: Dataset) -> None:
    plain = Dataset(n_users=ds.n_users, n_items=ds.n_items, users=ds.users, items=ds.items,
                    social_src=ds.social_src, social_dst=ds.social_dst, name="lastfm")
    with pytest.raises(ConfigError, match="dirichlet.*needs item categories.*lastfm"):
        partition_users(plain, 3, PartitionConfig(method="dirichlet"))


def test_more_partners_than_users_is_an_error(ds: Dataset) -> None:
    with pytest.raises(ConfigError, match="federation.partners"):
        partition_users(ds, ds.n_users + 1, PartitionConfig())


def test_partner_split_is_the_partners_local_data(ds: Dataset) -> None:
    # Prepare
    split = split_dataset(ds, SplitConfig())
    assignment = partition_users(ds, 3, PartitionConfig(method="community"))
    # Execute
    parts = [partner_split(split, assignment, p) for p in range(3)]
    # Assert: local users map back to their global index; items, catalogue and categories are global.
    for p, part in enumerate(parts):
        sub = part.dataset
        members = np.flatnonzero(assignment == p)
        assert sub.user_ids is not None and np.array_equal(sub.user_ids, members)
        assert sub.n_users == members.size and sub.n_items == ds.n_items
        assert sub.item_category is ds.item_category
        pairs = ((split.train_users, split.train_items, part.train_users, part.train_items),
                 (split.val_users, split.val_items, part.val_users, part.val_items),
                 (split.test_users, split.test_items, part.test_users, part.test_items))
        for glob_u, glob_i, loc_u, loc_i in pairs:
            mine = assignment[glob_u] == p
            np.testing.assert_array_equal(members[loc_u], glob_u[mine])
            np.testing.assert_array_equal(loc_i, glob_i[mine])
        edges = set(zip(members[sub.social_src].tolist(), members[sub.social_dst].tolist(), strict=True))
        inside = (assignment[ds.social_src] == p) & (assignment[ds.social_dst] == p)
        assert edges == set(zip(ds.social_src[inside].tolist(), ds.social_dst[inside].tolist(), strict=True))
    # Every interaction and every within-partner edge lands in exactly one partner.
    assert sum(part.dataset.n_interactions for part in parts) == ds.n_interactions
    within = round(compute_within_share(ds, assignment) * ds.n_edges)
    assert sum(part.dataset.n_edges for part in parts) == within
