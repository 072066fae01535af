"""Chunked full ranking with top-k selection (shared/metrics.evaluate_model) equals brute force.

Brute force: every user's scores for every item in one block, the seen items masked, a full
descending sort of each row, and Recall / NDCG / HR counted by hand from the definitions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsocial.shared.batching import ExampleBuilder
from fedsocial.shared.config import Config, DataConfig, ModelConfig
from fedsocial.shared.metrics import METRIC_KEYS, evaluate_model, evaluation_matrices, mask_and_topk
from fedsocial.shared.models import build_model
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate


def _brute_force(model: torch.nn.Module, split, builder: ExampleBuilder, which: str) -> dict[str, float]:
    truth, seen = evaluation_matrices(split, which)
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    with torch.no_grad():
        scores = model.full_sort_predict(builder.eval_batch(users)).float().numpy().copy()
    sums = {k: 0.0 for k in METRIC_KEYS}
    for row, u in enumerate(users):
        s = scores[row]
        s[seen[u].indices] = -np.inf
        ranked = np.argsort(-s, kind="stable")
        relevant = set(truth[u].indices.tolist())
        for k in (10, 20):
            hits = [int(i) in relevant for i in ranked[:k]]
            dcg = sum(1.0 / math.log2(r + 2) for r, h in enumerate(hits) if h)
            idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(relevant))))
            sums[f"recall@{k}"] += sum(hits) / len(relevant)
            sums[f"ndcg@{k}"] += dcg / idcg
            sums[f"hr@{k}"] += float(any(hits))
    return {k: v / len(users) for k, v in sums.items()}


@pytest.mark.parametrize("mcfg", [
    ModelConfig(aggregator="gcn", temperature=0.2, loss="softmax"),
    ModelConfig(aggregator="attention", user_embedding="local", use_category=True),
    ModelConfig(name="bpr", loss="bpr"),
    ModelConfig(name="mostpop"),
], ids=["social-cosine", "social-attention-category", "bpr", "mostpop"])
@pytest.mark.parametrize("which", ["val", "test"])
def test_chunked_topk_equals_brute_force(mcfg: ModelConfig, which: str) -> None:
    # Prepare: a model with generic (random) scores; chunks of 7 users, so the last chunk is partial
    cfg = Config(data=DataConfig(n_users=150, n_items=90, interactions_per_user=10.0), model=mcfg)
    split = split_dataset(generate(cfg.data), cfg.split)
    builder = ExampleBuilder.from_split(split, mcfg)
    torch.manual_seed(0)
    model = build_model(mcfg, split.n_users, split.n_items, item_counts=builder.item_counts(),
                        item_category=split.dataset.item_category)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if mcfg.name == "mostpop":  # distinct scores: tied items may come in any order (torch.topk's choice)
            model.counts.add_(torch.randperm(split.n_items).float() * 1e-3)
    expected = _brute_force(model, split, builder, which)
    # Execute: small chunks and the default chunking
    small, n_small = evaluate_model(model, split, which, builder=builder, batch_size=7)
    default, _ = evaluate_model(model, split, which, builder=builder)
    # Assert: equal to brute force up to the order of the final float sums
    assert n_small == int((np.diff(evaluation_matrices(split, which)[0].indptr) > 0).sum())
    for key in METRIC_KEYS:
        assert small[key] == pytest.approx(expected[key], abs=1e-12), key
        assert default[key] == pytest.approx(expected[key], abs=1e-12), key


def test_mask_and_topk_never_returns_a_seen_item() -> None:
    # Prepare: scores where the seen items are the best ones
    import scipy.sparse as sp

    scores = torch.arange(12, dtype=torch.float32).repeat(2, 1)
    seen = sp.csr_matrix((np.ones(4), ([0, 0, 1, 1], [11, 10, 11, 3])), shape=(2, 12))
    # Execute
    top = mask_and_topk(scores, seen, 3).numpy()
    # Assert: the best unseen items, best first
    assert top.tolist() == [[9, 8, 7], [10, 9, 8]]
