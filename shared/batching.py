"""Per-user training examples: one DP example = one user (DESIGN.md, privacy model).

A user's example holds, from that user's own record only: at most H target items sampled from
the user's training items, the history bag (the user's training items, at most ``max_history``),
a flag per target telling whether it sits in the bag (the model then leaves it out of the bag),
M uniformly sampled negative items shared by the user's targets (the user's own positives are
masked out), and at most K sampled out-neighbours (their ids only; the model reads their social
embeddings, which are parameters, never their records). Everything is padded to the longest row
of the batch, with float masks, so that every embedding table is called once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsocial.shared.config import ModelConfig
from fedsocial.shared.data import SplitData

Batch = dict[str, torch.Tensor]


def compute_csr(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of the distinct (row, col) pairs, columns sorted within a row."""
    keys = np.unique(rows.astype(np.int64) * (int(cols.max(initial=0)) + 1) + cols.astype(np.int64))
    width = int(cols.max(initial=0)) + 1
    r, c = keys // width, keys % width
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(indptr, r + 1, 1)
    return np.cumsum(indptr), c


def sample_padded(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, cap: int, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``cap`` entries of each CSR row (a uniform sample without replacement when longer).

    Returns (ids [B, L], mask [B, L]) with L = min(cap, longest row); padding ids are 0.
    With ``rng`` None the first ``cap`` entries are taken (deterministic, for evaluation).
    """
    counts = indptr[rows + 1] - indptr[rows]
    take = np.minimum(counts, cap)
    width = max(int(take.max(initial=0)), 1)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    total = int(counts.sum())
    if total == 0:
        return ids, mask
    owner = np.repeat(np.arange(len(rows)), counts)
    flat = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(indptr[rows], counts)
    key = rng.random(total) if rng is not None else np.arange(total, dtype=np.float64)
    order = np.lexsort((key, owner))  # by row, then by random key
    owner, flat = owner[order], flat[order]
    rank = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = rank < take[owner]
    ids[owner[keep], rank[keep]] = indices[flat[keep]]
    mask[owner[keep], rank[keep]] = 1.0
    return ids, mask


@dataclass
class ExampleBuilder:
    """Builds padded per-user batches from one partner's training interactions and social graph."""

    n_users: int
    n_items: int
    item_indptr: np.ndarray
    item_indices: np.ndarray
    nbr_indptr: np.ndarray
    nbr_indices: np.ndarray
    max_targets: int = 64
    num_negatives: int = 8
    max_neighbors: int = 20
    max_history: int = 256

    @classmethod
    def from_split(cls, split: SplitData, mcfg: ModelConfig) -> ExampleBuilder:
        ds = split.dataset
        ip, ii = compute_csr(split.train_users, split.train_items, ds.n_users)
        keep = ds.social_src != ds.social_dst  # a self-loop is not a neighbour
        npp, ni = compute_csr(ds.social_src[keep], ds.social_dst[keep], ds.n_users)
        return cls(ds.n_users, ds.n_items, ip, ii, npp, ni, mcfg.max_targets, mcfg.num_negatives,
                   mcfg.max_neighbors, getattr(mcfg, "max_history", 256))

    def item_counts(self) -> np.ndarray:
        """Training interactions per item (MostPop's score)."""
        return np.bincount(self.item_indices, minlength=self.n_items).astype(np.float32)

    def _is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether items[b, j] is a training item of users[b] (binary search in the sorted CSR rows)."""
        out = np.zeros(items.shape, dtype=bool)
        for b, u in enumerate(users):  # rows are short; B searches of M items each
            row = self.item_indices[self.item_indptr[u]:self.item_indptr[u + 1]]
            if len(row):
                pos = np.minimum(np.searchsorted(row, items[b]), len(row) - 1)
                out[b] = row[pos] == items[b]
        return out

    def _bag(self, users: np.ndarray, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        bag, bmask = sample_padded(self.item_indptr, self.item_indices, users, self.max_history, rng)
        return {"bag": bag, "bag_mask": bmask}

    def _neighbours(self, users: np.ndarray, cap: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        nbrs, nmask = sample_padded(self.nbr_indptr, self.nbr_indices, users, cap, rng)
        return {"nbrs": nbrs, "nbr_mask": nmask}

    def train_batch(self, users: np.ndarray, rng: np.random.Generator) -> Batch:
        """One example per user in ``users`` (any order, repeats allowed)."""
        users = np.asarray(users, dtype=np.int64)
        tg, tmask = sample_padded(self.item_indptr, self.item_indices, users, self.max_targets, rng)
        out = {"users": users, "targets": tg, "target_mask": tmask}
        out.update(self._bag(users, rng))
        in_bag = (tg[:, :, None] == out["bag"][:, None, :]) & (out["bag_mask"][:, None, :] > 0)
        out["target_in_bag"] = (in_bag.any(-1) & (tmask > 0)).astype(np.float32)
        neg = rng.integers(0, self.n_items, size=(len(users), self.num_negatives))
        out["negatives"] = neg
        out["neg_mask"] = (~self._is_positive(users, neg)).astype(np.float32)
        out.update(self._neighbours(users, self.max_neighbors, rng))
        return {k: torch.as_tensor(v) for k, v in out.items()}

    def eval_batch(self, users: np.ndarray) -> Batch:
        """The user's whole bag and all out-neighbours (deterministic), for full ranking."""
        users = np.asarray(users, dtype=np.int64)
        counts_n = self.nbr_indptr[users + 1] - self.nbr_indptr[users]
        counts_i = self.item_indptr[users + 1] - self.item_indptr[users]
        out: dict[str, np.ndarray] = {"users": users}
        bag, bmask = sample_padded(self.item_indptr, self.item_indices, users, int(counts_i.max(initial=1)), None)
        out.update({"bag": bag, "bag_mask": bmask})
        out.update(self._neighbours(users, int(counts_n.max(initial=1)), None))
        return {k: torch.as_tensor(v) for k, v in out.items()}
