"""Synthetic generator: validity, determinism, the planted structure, a real social signal, and scale."""

from __future__ import annotations

import time

import numpy as np

from fedsocial.shared.config import DataConfig, SplitConfig
from fedsocial.shared.data import Dataset
from fedsocial.shared.loaders import load_dataset
from fedsocial.shared.split import split_dataset, to_csr
from fedsocial.shared.synthetic import generate


def test_generate_is_valid_and_clean() -> None:
    # Prepare / Execute
    cfg = DataConfig()
    ds = generate(cfg)
    # Assert: ids in range, one row per (user, item), no self-loops or repeated edges, all users active.
    assert (ds.n_users, ds.n_items, ds.name) == (600, 800, "synthetic")
    assert ds.users.min() >= 0 and ds.users.max() < ds.n_users and ds.items.max() < ds.n_items
    assert np.unique(ds.users * ds.n_items + ds.items).size == ds.n_interactions
    assert np.unique(ds.social_src * ds.n_users + ds.social_dst).size == ds.n_edges
    assert not (ds.social_src == ds.social_dst).any()
    assert (np.bincount(ds.users, minlength=ds.n_users) >= 1).all()
    assert ds.item_category is not None and ds.item_category.shape == (ds.n_items,)
    assert np.bincount(ds.item_category).min() > 0  # every topic has items


def test_generate_is_deterministic_in_the_seed() -> None:
    a, b = generate(DataConfig()), generate(DataConfig())
    c = generate(DataConfig(synthetic_seed=8))
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.social_dst, b.social_dst)
    assert a.n_interactions != c.n_interactions or not np.array_equal(a.items, c.items)


def test_generate_matches_configured_means_and_heavy_tails() -> None:
    # Prepare / Execute
    cfg = DataConfig(n_users=5000, n_items=2000, interactions_per_user=20.0, friends_per_user=8.0)
    ds = generate(cfg)
    activity = np.bincount(ds.users, minlength=ds.n_users)
    out_degree = np.bincount(ds.social_src, minlength=ds.n_users)
    popularity = np.sort(np.bincount(ds.items, minlength=ds.n_items))[::-1]
    # Assert: means close to the config, power-law tails, Zipf-like item popularity.
    assert abs(activity.mean() - 20.0) < 2.0
    assert abs(out_degree.mean() - 8.0) < 1.5
    assert activity.max() > 8 * np.median(activity) and out_degree.max() > 8 * np.median(out_degree)
    assert popularity[: ds.n_items // 10].sum() > 0.4 * ds.n_interactions


def test_homophily_controls_the_share_of_edges_inside_communities() -> None:
    # Prepare
    shares = []
    for h in (0.0, 0.8):
        ds = generate(DataConfig(n_users=3000, homophily=h))
        community = ds.extra["community"]
        assert isinstance(community, np.ndarray)
        # Execute
        shares.append(float((community[ds.social_src] == community[ds.social_dst]).mean()))
    # Assert: random targets land in the same community about 1/6 of the time (6 communities).
    assert shares[0] < 0.3 and shares[1] > 0.75


def compute_hit_rates(ds: Dataset, seed: int = 0) -> dict[str, float]:
    """HR@10 of held-out items ranked by three scores: the items of the user's friends, the items of
    as many random users, and global popularity (the user's training items excluded)."""
    split = split_dataset(ds, SplitConfig())
    n, m = ds.n_users, ds.n_items
    tr_ptr, tr_idx = to_csr(split.train_users, split.train_items, n)
    fr_ptr, fr_idx = to_csr(ds.social_src, ds.social_dst, n)
    te_ptr, te_idx = to_csr(split.test_users, split.test_items, n)
    global_pop = np.bincount(split.train_items, minlength=m).astype(float)
    rng = np.random.default_rng(seed)
    hits = {"friends": 0, "random": 0, "popularity": 0}
    evaluated = 0
    for u in range(n):
        friends, test = fr_idx[fr_ptr[u]:fr_ptr[u + 1]], te_idx[te_ptr[u]:te_ptr[u + 1]]
        if friends.size == 0 or test.size == 0:
            continue
        evaluated += 1
        strangers = rng.choice(n, size=friends.size, replace=False)
        for name, others in (("friends", friends), ("random", strangers), ("popularity", None)):
            if others is None:
                score = global_pop.copy()
            else:
                rows = np.concatenate([tr_idx[tr_ptr[v]:tr_ptr[v + 1]] for v in others])
                score = np.bincount(rows, minlength=m) + 1e-6 * global_pop  # popularity breaks ties
            score[tr_idx[tr_ptr[u]:tr_ptr[u + 1]]] = -np.inf
            hits[name] += bool(np.isin(test, np.argsort(-score, kind="stable")[:10]).any())
    assert evaluated > 0.9 * n
    return {k: v / evaluated for k, v in hits.items()}


def test_friends_items_predict_held_out_items_better_than_strangers_and_popularity() -> None:
    # Prepare
    ds = generate(DataConfig())
    # Execute
    hr = compute_hit_rates(ds)
    # Assert: the social signal is real (measured: friends 0.46, random users 0.28, popularity 0.34).
    assert hr["friends"] > 1.3 * hr["random"]
    assert hr["friends"] > 1.2 * hr["popularity"]


def test_without_social_influence_or_homophily_the_signal_vanishes() -> None:
    # Prepare: the same generator with its three social mechanisms off.
    ds = generate(DataConfig(homophily=0.0), social_influence=0.0, taste_smoothing=0.0)
    # Execute
    hr = compute_hit_rates(ds)
    # Assert: friends are then no better than strangers (so the test above measures the mechanism).
    assert hr["friends"] < 1.15 * hr["random"]


def test_load_dataset_synthetic_is_the_generator() -> None:
    cfg = DataConfig(n_users=50, n_items=60)
    ds = load_dataset(cfg, None)
    np.testing.assert_array_equal(ds.items, generate(cfg).items)


def test_generation_scales_to_200k_users() -> None:
    # Prepare
    cfg = DataConfig(n_users=200_000, n_items=20_000)
    # Execute
    start = time.process_time()  # CPU time: other jobs on a shared machine do not count
    ds = generate(cfg)
    elapsed = time.process_time() - start
    # Assert: about 2-3 s of CPU here; the bound leaves room for slower machines.
    assert ds.n_users == 200_000 and ds.n_interactions > 3_000_000
    assert elapsed < 20.0
