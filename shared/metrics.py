"""Top-K ranking metrics on full ranking over all items (RecBole conventions).

Definitions (binary relevance, mean over users with at least one ground-truth item):

- Recall@K = hits@K / |test items of u|  (RecBole's definition, not min(K, |test|));
- NDCG@K = DCG@K / IDCG@K, DCG = sum_{rank r <= K, hit} 1 / log2(r + 1), and IDCG over the
  min(K, |test|) ideal positions (Jarvelin and Kekalainen 2002);
- HR@K = 1 if at least one hit in the top K, else 0.

``compute_topk_metrics`` is pure numpy; ``evaluate_model`` ranks every item for the evaluated
users with the model's ``full_sort_predict``, masking the user's training items (and validation
items when testing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from fedsocial.shared.data import SplitData

if TYPE_CHECKING:
    from fedsocial.shared.batching import ExampleBuilder
    from fedsocial.shared.models import RecModel

METRIC_KEYS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")


class MetricsError(ValueError):
    """Inputs to a metric have inconsistent shapes or an unknown split name."""


def compute_hits(topk_items: np.ndarray, ground_truth: sp.csr_matrix) -> np.ndarray:
    """Boolean [U, K]: whether the item at each rank is in the user's ground-truth row."""
    rows = np.repeat(np.arange(topk_items.shape[0]), topk_items.shape[1])
    vals = np.asarray(ground_truth[rows, topk_items.reshape(-1)]).reshape(topk_items.shape)
    return vals > 0


def compute_topk_metrics(
    topk_items: np.ndarray, ground_truth: sp.csr_matrix, ks: Sequence[int] = (10, 20)
) -> dict[str, float]:
    """Recall, NDCG and HR at each K, averaged over the rows of ``ground_truth`` that are non-empty.

    ``topk_items`` [U, >= max(ks)] lists item ids best first (fewer columns only when they rank the whole
    catalogue: a catalogue smaller than K); row u of ``ground_truth`` (U x n_items) holds u's relevant
    items. Rows without relevant items are skipped.
    """
    if topk_items.ndim != 2 or topk_items.shape[0] != ground_truth.shape[0]:
        raise MetricsError(f"topk_items {topk_items.shape} does not match ground truth {ground_truth.shape}")
    if topk_items.shape[1] < min(max(ks), ground_truth.shape[1]):
        raise MetricsError(f"topk_items has {topk_items.shape[1]} columns, need {max(ks)} "
                           f"(or the whole catalogue of {ground_truth.shape[1]} items)")
    n_rel = np.diff(ground_truth.indptr).astype(np.float64)
    keep = n_rel > 0
    hits = compute_hits(topk_items, ground_truth)[keep].astype(np.float64)
    n_rel = n_rel[keep]
    discounts = 1.0 / np.log2(np.arange(2, topk_items.shape[1] + 2))
    ideal_cum = np.cumsum(discounts)
    out: dict[str, float] = {}
    for k in ks:
        h = hits[:, :k]
        n_hits = h.sum(1)
        dcg = (h * discounts[:k]).sum(1)
        idcg = ideal_cum[np.minimum(n_rel, k).astype(np.int64) - 1]
        out[f"recall@{k}"] = float(np.mean(n_hits / n_rel)) if len(n_rel) else 0.0
        out[f"ndcg@{k}"] = float(np.mean(dcg / idcg)) if len(n_rel) else 0.0
        out[f"hr@{k}"] = float(np.mean(n_hits > 0)) if len(n_rel) else 0.0
    return out


def interaction_matrix(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary user x item CSR matrix (duplicates collapse to 1)."""
    data = np.ones(len(users), dtype=np.float32)
    m = sp.csr_matrix((data, (users, items)), shape=(n_users, n_items))
    m.data[:] = 1.0
    return m


def evaluation_matrices(split: SplitData, which: str) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(ground truth, mask of already-seen items) for ``which`` in {"val", "test"}."""
    nu, ni = split.n_users, split.n_items
    train = interaction_matrix(split.train_users, split.train_items, nu, ni)
    if which == "val":
        return interaction_matrix(split.val_users, split.val_items, nu, ni), train
    if which == "test":
        seen = train + interaction_matrix(split.val_users, split.val_items, nu, ni)
        return interaction_matrix(split.test_users, split.test_items, nu, ni), seen.tocsr()
    raise MetricsError(f"unknown evaluation split {which!r} (expected 'val' or 'test')")


def compute_chunk_rows(n_items: int, budget: int = 1 << 22) -> int:
    """Users scored at once: about ``budget`` scores (16 MB of float32) per chunk, at least 16 users.

    Small chunks keep the score block near the cache and avoid the page faults of a fresh
    [512 x n_items] block (215 MB on Ciao) per batch.
    """
    return max(16, budget // max(1, n_items))


def mask_and_topk(scores: torch.Tensor, seen: sp.csr_matrix, k: int) -> torch.Tensor:
    """Top-``k`` item ids per row of ``scores`` [B, I] after setting the rows' ``seen`` items to -inf.

    Writes into ``scores`` (a fresh block); ties are broken by torch.topk.
    """
    rows = torch.as_tensor(np.repeat(np.arange(scores.shape[0]), np.diff(seen.indptr)), device=scores.device)
    scores[rows, torch.as_tensor(seen.indices, dtype=torch.long, device=scores.device)] = -torch.inf
    return torch.topk(scores, min(k, scores.shape[1]), dim=1).indices


@torch.no_grad()
def evaluate_model(
    model: RecModel,
    split: SplitData,
    which: str = "test",
    builder: ExampleBuilder | None = None,
    ks: Sequence[int] = (10, 20),
    batch_size: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, float], int]:
    """Full-ranking metrics of ``model`` on ``which``; returns (metrics, number of evaluated users).

    Every item is scored for every evaluated user (no candidate sampling), in chunks of users
    (``batch_size``, 0: :func:`compute_chunk_rows`), the item side computed once per pass, and only
    the top max(ks) ids of a chunk kept (torch.topk). Users are visited in order of history length so
    that a chunk's padded bag stays short; each user's scores do not depend on the chunk.
    """
    metrics, n, _ = evaluate_model_per_user(model, split, which, builder, ks, batch_size, device)
    return metrics, n


def evaluate_model_per_user(model: RecModel, split: SplitData, which: str = "test",
                            builder: ExampleBuilder | None = None, ks: Sequence[int] = (10, 20), batch_size: int = 0,
                            device: str | torch.device = "cpu") -> tuple[dict[str, float], int, np.ndarray]:
    """:func:`evaluate_model`'s (metrics, evaluated users) and, from the same ranking pass, every evaluated
    user's NDCG@``ks[0]`` in user order (what a paired comparison of two models on the same users needs)."""
    tops, truth_rows = _ranked(model, split, which, builder, max(ks), batch_size, device)
    if not len(tops):
        return {k: 0.0 for k in METRIC_KEYS}, 0, np.zeros(0)
    return (compute_topk_metrics(tops, truth_rows, ks), int(len(tops)),
            compute_per_user_ndcg(tops, truth_rows, ks[0]))


def compute_per_user_ndcg(topk_items: np.ndarray, ground_truth: sp.csr_matrix, k: int) -> np.ndarray:
    """NDCG@k per non-empty row of ``ground_truth`` (its mean is :func:`compute_topk_metrics`'s ndcg@k)."""
    n_rel = np.diff(ground_truth.indptr).astype(np.float64)
    keep = n_rel > 0
    hits = compute_hits(topk_items[:, :k], ground_truth)[keep].astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_rel[keep], k).astype(np.int64) - 1]
    return np.asarray((hits * discounts[: hits.shape[1]]).sum(1) / ideal)


def evaluate_models_per_user(models: Mapping[str, RecModel], split: SplitData, which: str = "test",
                             builder: ExampleBuilder | None = None, ks: Sequence[int] = (10, 20), batch_size: int = 0,
                             device: str | torch.device = "cpu") -> dict[str, tuple[dict[str, float], int, np.ndarray]]:
    """:func:`evaluate_model_per_user` of several models over the same users in one ranking pass: each chunk's
    batch is built once and handed to every model in turn (so that models which share scores can reuse them within a
    chunk, client/personalize.py), each model's item side computed once. The same results as one call per model."""
    tops, truth_rows = _ranked_many(models, split, which, builder, max(ks), batch_size, device)
    out: dict[str, tuple[dict[str, float], int, np.ndarray]] = {}
    for name, top in tops.items():
        if not len(top):
            out[name] = ({k: 0.0 for k in METRIC_KEYS}, 0, np.zeros(0))
        else:
            out[name] = (compute_topk_metrics(top, truth_rows, ks), int(len(top)),
                         compute_per_user_ndcg(top, truth_rows, ks[0]))
    return out


def _ranked(model: RecModel, split: SplitData, which: str, builder: ExampleBuilder | None, kmax: int,
            batch_size: int, device: str | torch.device) -> tuple[np.ndarray, sp.csr_matrix]:
    """(top-``kmax`` item ids [U, kmax] of every user with relevant items in ``which``, their truth rows)."""
    tops, truth_rows = _ranked_many({"model": model}, split, which, builder, kmax, batch_size, device)
    return tops["model"], truth_rows


@torch.no_grad()  # evaluation never differentiates: without this every chunk's scores carried an autograd graph
def _ranked_many(models: Mapping[str, RecModel], split: SplitData, which: str, builder: ExampleBuilder | None,
                 kmax: int, batch_size: int, device: str | torch.device) -> tuple[dict[str, np.ndarray], sp.csr_matrix]:
    """:func:`_ranked` of every model, the users visited once in chunks (every model scores a chunk's batch)."""
    from fedsocial.shared.batching import ExampleBuilder  # local import: batching imports nothing from here

    if not models:
        raise MetricsError("evaluate: no model to rank with")
    first = next(iter(models.values()))
    builder = builder if builder is not None else ExampleBuilder.from_split(split, first.model_cfg)
    truth, seen = evaluation_matrices(split, which)
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    if not len(users):
        return {name: np.zeros((0, kmax), dtype=np.int64) for name in models}, truth[users]
    order = users[np.argsort(np.diff(builder.item_indptr)[users], kind="stable")]
    chunk = batch_size or compute_chunk_rows(split.n_items)
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    sides = {name: m.item_side() for name, m in models.items()}
    tops = {name: np.zeros((len(users), min(kmax, split.n_items)), dtype=np.int64) for name in models}
    slot = np.searchsorted(users, order)  # row of each visited user in ``users``
    for start in range(0, len(order), chunk):
        ub = order[start:start + chunk]
        batch = {k: v.to(device) for k, v in builder.eval_batch(ub).items()}
        rows_seen = seen[ub]
        for name, m in models.items():
            scores = m.score_all(batch, sides[name]).float()
            if scores._base is not None or not scores.is_contiguous():
                scores = scores.clone()  # a view (e.g. MostPop's expanded counts): the mask writes in place
            tops[name][slot[start:start + chunk]] = mask_and_topk(scores, rows_seen, kmax).cpu().numpy()
    for name, m in models.items():
        m.train(was_training[name])
    return tops, truth[users]
