"""Ranking metrics: known values by hand, and agreement with a brute-force per-user loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedsocial.shared.config import Config, DataConfig
from fedsocial.shared.metrics import (
    METRIC_KEYS,
    MetricsError,
    compute_per_user_ndcg,
    compute_topk_metrics,
    evaluate_model,
    evaluate_model_per_user,
    evaluation_matrices,
)
from fedsocial.shared.models import build_model
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate


def _truth(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    u = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    i = np.array([x for r in rows for x in r], dtype=np.int64)
    return sp.csr_matrix((np.ones(len(i)), (u, i)), shape=(len(rows), n_items))


def _brute(topk: np.ndarray, rows: list[list[int]], k: int) -> dict[str, float]:
    rec, ndcg, hr, n = 0.0, 0.0, 0.0, 0
    for u, rel in enumerate(rows):
        if not rel:
            continue
        n += 1
        hits = [1 if topk[u, r] in set(rel) else 0 for r in range(k)]
        rec += sum(hits) / len(rel)
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(rel))))
        ndcg += dcg / idcg
        hr += 1.0 if sum(hits) else 0.0
    return {f"recall@{k}": rec / n, f"ndcg@{k}": ndcg / n, f"hr@{k}": hr / n}


def test_known_values() -> None:
    # Prepare: user 0 hits at ranks 1 and 3 of 2 relevant items; user 1 no hit; user 2 no relevant items
    topk = np.array([[5, 1, 7, 2], [0, 1, 2, 3], [4, 5, 6, 7]])
    truth = _truth([[5, 7], [9], []], 10)
    # Execute
    m = compute_topk_metrics(topk, truth, ks=(2, 4))
    # Assert: hand-computed, user 2 skipped
    ndcg0_2 = 1.0 / (1 + 1 / math.log2(3))
    ndcg0_4 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["recall@2"] == pytest.approx((0.5 + 0) / 2, abs=1e-12)
    assert m["recall@4"] == pytest.approx((1.0 + 0) / 2, abs=1e-12)
    assert m["ndcg@2"] == pytest.approx(ndcg0_2 / 2, abs=1e-12)
    assert m["ndcg@4"] == pytest.approx(ndcg0_4 / 2, abs=1e-12)
    assert m["hr@2"] == pytest.approx(0.5) and m["hr@4"] == pytest.approx(0.5)


def test_recall_divides_by_all_test_items_recbole() -> None:
    # 30 relevant items, all 10 recommended are hits: RecBole recall is 10/30, NDCG is 1
    truth = _truth([list(range(30))], 40)
    m = compute_topk_metrics(np.arange(20)[None, :], truth, ks=(10, 20))
    assert m["recall@10"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["ndcg@10"] == pytest.approx(1.0, abs=1e-12)


def test_matches_brute_force_on_random_scores() -> None:
    # Prepare: random scores, random ground truth (some users empty)
    rng = np.random.default_rng(3)
    n_users, n_items = 50, 60
    rows = [sorted(rng.choice(n_items, size=rng.integers(0, 8), replace=False).tolist()) for _ in range(n_users)]
    topk = np.argsort(-rng.random((n_users, n_items)), axis=1)[:, :20]
    # Execute
    got = compute_topk_metrics(topk, _truth(rows, n_items), ks=(10, 20))
    # Assert
    for k in (10, 20):
        for key, val in _brute(topk, rows, k).items():
            assert abs(got[key] - val) < 1e-12, key


def test_shape_errors() -> None:
    with pytest.raises(MetricsError):
        compute_topk_metrics(np.zeros((2, 5), dtype=np.int64), _truth([[1], [2], [3]], 5), ks=(5,))
    with pytest.raises(MetricsError):
        compute_topk_metrics(np.zeros((1, 5), dtype=np.int64), _truth([[1]], 9), ks=(10,))


def test_evaluator_masks_seen_items_and_matches_manual_ranking() -> None:
    # Prepare: MostPop on synthetic data (deterministic scores)
    cfg = Config(data=DataConfig(n_users=50, n_items=70))
    split = split_dataset(generate(cfg.data), cfg.split)
    from fedsocial.shared.batching import ExampleBuilder

    counts = ExampleBuilder.from_split(split, cfg.model).item_counts()
    model = build_model(cfg.model.__class__(name="mostpop"), split.n_users, split.n_items, item_counts=counts)
    # Execute
    metrics, n_eval = evaluate_model(model, split, "test")
    # Assert: the same numbers by a manual ranking with train+val masked
    truth, seen = evaluation_matrices(split, "test")
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    tops = []
    for u in users:
        s = torch.as_tensor(counts).clone()
        s[seen[u].indices] = -torch.inf
        tops.append(torch.topk(s, 20).indices.numpy())
        assert not set(tops[-1][:10]) & set(seen[u].indices) or len(seen[u].indices) > 60
    expected = compute_topk_metrics(np.stack(tops), truth[users], (10, 20))
    assert n_eval == len(users) > 0
    assert set(metrics) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12)


def test_per_user_ndcg_averages_to_the_evaluators_and_matches_a_manual_count() -> None:
    # Prepare: a social model on synthetic data, and two users' rankings by hand
    cfg = Config(data=DataConfig(n_users=50, n_items=70))
    split = split_dataset(generate(cfg.data), cfg.split)
    torch.manual_seed(0)
    model = build_model(cfg.model, split.n_users, split.n_items)
    # Execute
    _, n_same, per_user = evaluate_model_per_user(model, split, "val")
    metrics, n = evaluate_model(model, split, "val")
    truth = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 0, 0, 1]]))
    manual = compute_per_user_ndcg(np.array([[2, 1, 0, 3], [0, 1, 2, 3]]), truth, 2)
    # Assert: one value per evaluated user, the evaluator's mean; known values (hit at rank 1 of 2 relevant;
    # no hit in the top 2)
    assert per_user.shape == (n,) and n_same == n
    assert float(per_user.mean()) == pytest.approx(metrics["ndcg@10"], abs=1e-12)
    np.testing.assert_allclose(manual, [1.0 / (1.0 + 1.0 / math.log2(3)), 0.0])


def test_a_catalogue_smaller_than_k_is_ranked_whole() -> None:
    # Prepare: 6 items, fewer than K = 10 and 20 (a small shop); a real model
    cfg = Config(data=DataConfig(n_users=40, n_items=6, interactions_per_user=4.0))
    split = split_dataset(generate(cfg.data), cfg.split)
    torch.manual_seed(0)
    model = build_model(cfg.model, split.n_users, split.n_items)
    # Execute: regression: "topk_items has 6 columns, need 20" (a MetricsError traceback from `fedsocial train`)
    metrics, n = evaluate_model(model, split, "test")
    _, _, per_user = evaluate_model_per_user(model, split, "test")
    # Assert: every unseen item is in the list, so every test item is found, at both K
    assert n > 0 and per_user.shape == (n,)
    for k in (10, 20):
        assert metrics[f"recall@{k}"] == pytest.approx(1.0) and metrics[f"hr@{k}"] == pytest.approx(1.0)
        assert 0.0 < metrics[f"ndcg@{k}"] <= 1.0
    assert float(per_user.mean()) == pytest.approx(metrics["ndcg@10"], abs=1e-12)
