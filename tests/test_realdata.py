"""Real datasets after cleaning: counts measured here and cross-checked with ../shared/datasets/README.md.

Skipped with a message when the datasets folder is missing (it is never part of the repository).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.config import DataConfig, SplitConfig
from fedsocial.shared.data import Dataset
from fedsocial.shared.loaders import load_ciao, load_dataset, load_douban, load_filmtrust, load_lastfm
from fedsocial.shared.split import split_dataset

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATASETS.is_dir(), reason=f"real datasets not found at {DATASETS} "
                       "(see the README for where the public releases come from)"),
]


def load_timed(loader: Callable[[Path], Dataset], folder: str) -> tuple[Dataset, float]:
    start = time.perf_counter()
    ds = loader(DATASETS / folder)
    return ds, time.perf_counter() - start


def reciprocated(ds: Dataset) -> int:
    key = ds.social_src * ds.n_users + ds.social_dst
    return int(np.isin(key, ds.social_dst * ds.n_users + ds.social_src).sum())


def test_lastfm_counts() -> None:
    # Execute
    ds, seconds = load_timed(load_lastfm, "lastfm-hetrec2011-2k")
    # Assert: README: 1,892 users, 17,632 items, 92,834 interactions (clean), 12,717 friendships
    # listed both ways = 25,434 directed edges, every user has a friend.
    assert (ds.name, ds.n_users, ds.n_items, ds.n_interactions) == ("lastfm", 1892, 17632, 92834)
    assert ds.n_edges == 25434 == 2 * 12717 and reciprocated(ds) == ds.n_edges
    assert np.unique(ds.social_src).size == 1892
    assert ds.user_ids is not None and (ds.user_ids.min(), ds.user_ids.max()) == (2, 2100)
    assert np.bincount(ds.users).max() == 50  # "each user keeps at most 50 artists"
    assert seconds < 5.0


def test_filmtrust_counts() -> None:
    # Execute
    ds, _ = load_timed(load_filmtrust, "filmtrust")
    # Assert: 35,497 rows - 3 repeated rows = 35,494; 1,853 trust rows lose those touching the
    # 134 trust users without ratings: 1,632 directed edges, from 522 users.
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (1508, 2071, 35494)
    assert ds.n_edges == 1632 and np.unique(ds.social_src).size == 522
    assert reciprocated(ds) == 1012 < ds.n_edges  # directed graph kept directed


def test_douban_counts() -> None:
    # Execute
    ds, _ = load_timed(load_douban, "douban-monti")
    # Assert: 2,999 users with ratings (row 2997 has none), 3,000 items, 136,891 ratings;
    # 2,690 nonzeros of W - 2 self-loops = 2,688 directed edges = 1,344 ties both ways.
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (2999, 3000, 136891)
    assert ds.user_ids is not None and 2997 not in ds.user_ids.tolist()
    assert ds.n_edges == 2688 == 2 * 1344 and reciprocated(ds) == ds.n_edges
    assert not (ds.social_src == ds.social_dst).any()


def test_ciao_counts_categories_and_speed() -> None:
    # Execute
    ds, seconds = load_timed(load_ciao, "ciao")
    # Assert: 284,086 rows - 1,436 repeated (user, item) rows = 282,650 positives (zeros included);
    # item ids have gaps up to 106,797; all 111,781 trust edges join rating users.
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (7375, 105114, 282650)
    assert ds.item_ids is not None and int(ds.item_ids.max()) == 106797
    assert ds.n_edges == 111781 and reciprocated(ds) == 53152  # 47.6% reciprocated
    assert ds.n_users - np.unique(np.concatenate([ds.social_src, ds.social_dst])).size == 58
    assert ds.item_category is not None and ds.item_category.shape == (105114,)
    assert set(np.unique(ds.item_category).tolist()) == set(range(1, 29))  # 28 categories
    assert seconds < 5.0  # about 0.7 s on one idle core


def test_lastfm_split_and_dispatch_through_config() -> None:
    # Prepare
    cfg = DataConfig(format="lastfm", path="lastfm-hetrec2011-2k")
    # Execute
    ds = load_dataset(cfg, DATASETS)
    split = split_dataset(ds, SplitConfig())
    # Assert: measured sizes of the 8:1:1 split; the 9 users with fewer than 3 artists are train-only.
    assert (split.train_items.size, split.val_items.size, split.test_items.size) == (74296, 9269, 9269)
    assert int((np.bincount(ds.users) < 3).sum()) == 9
    assert np.unique(split.test_users).size == 1892 - 9
