"""Serving one partner's users: top-K lists, exact explanations, calibrated probabilities, live events.

The model a partner serves (DESIGN.md, the recommendation loop) is the global shared parameters plus
its local state (social table, per-user vectors) and its users' own records (histories, out-neighbours).
A user's vector is rebuilt from the user's own items and friends against the shared parameters with the
model's own ``user_vectors``, so an event changes that user's list at once, without retraining; scores
are the model's own ``_normalise(h_u) . _normalise(q_i) + c_i`` over an item matrix precomputed once,
so a request costs one matrix-vector product and a ``torch.topk``.

Exact explanations: with g = _normalise, g(h) = alpha h (alpha = 1 for dot-product scores, else
1 / (|h| sqrt(temperature))), and h = sum_j y_j / sqrt(n) + sum_v w_v s_v + p_u + MLP(...), so

    score(u, i) = sum_j alpha y_j.q_i / sqrt(n)  +  sum_v alpha w_v s_v.q_i  +  alpha p_u.q_i
                  + alpha MLP(...).q_i  +  c_i

term by term (history items, friends, per-user vector, MLP residual, bias): the terms sum to the score
to float precision (tests check it for every aggregator, p_u mode, scoring and category setting).
The normaliser alpha is the user's, common to all of the user's terms, so shares within one list compare.

Privacy (DESIGN.md): in the ``joint`` scope a user's list uses only the user's own record and the DP
shared parameters (plus the social vectors of the user's friends, parameters, never their records);
nothing here leaves the partner. What a user sees beyond their own record must then be DP as well, so in
``joint`` scope (``privacy_scope = "joint"``: a DP run, ``privacy.scope = "joint"``) two things the other
scopes fit on the partner's records are replaced: a cold user (no items, no friends) is ranked by the DP
popularity release's prior (the model's item biases where the run has none, ``compute_prior_item_scores``),
never by exact training counts, and live events do not move it; and probabilities are the sigmoid of the
model's score (``calibration = "none"``), never Platt or isotonic fits on validation records (asked for
explicitly, they are refused; ``"auto"`` picks ``none`` and says why). In the ``partner`` scope a locally
adapted model (``client/personalize.py``) may replace the model: pass it as ``model`` (a :class:`SocialRec`). In the
``joint`` scope the partner's DP selection (``shared/privacy/selection.py``) may have chosen ``ranking =
"prior"``: every score is then the DP popularity release's prior alone (the item biases where there is no
release; shared/models/prior.py: the user-item term dropped, seen items still excluded), and the
explanation's only term is that score (in the bias column); or ``ranking = "product"``: the model's score plus
the prior's, whose terms join the explanation's bias (within the category) and user (category share) columns.
"""

from __future__ import annotations

import concurrent.futures
import copy
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsocial.shared.batching import ExampleBuilder, compute_csr
from fedsocial.shared.data import SplitData
from fedsocial.shared.events import (
    SOCIAL,
    Event,
    append_events_durably,
    compute_external_id,
    compute_external_ids,
    compute_item_external_ids,
)
from fedsocial.shared.models.prior import (
    category_index,
    compute_category_affinity,
    compute_category_log_mass,
    compute_prior_item_scores,
    compute_user_category_counts,
)
from fedsocial.shared.models.social import SocialRec, compute_user_feature_index
from fedsocial.shared.privacy.selection import SELECTION_CANDIDATES

MAX_K = 1000  # the longest list one request may ask for (service, recommend CLI, Recommender alike)
REFIT_CHUNK = 1024  # users per batched p_u refit (refit_all_local_vectors' chunk)
_EPS = 1e-12  # torch.nn.functional.normalize's eps: the model's cosine uses it


class ServingError(ValueError):
    """A request the service cannot answer (unknown item, bad k, ...); the message says which field."""


class UnknownUserError(ServingError):
    """The user id is not one of the partner's users."""


# --- calibration (pure numpy) -----------------------------------------------------------------
def compute_platt_params(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, iters: int = 100,
                         ridge: float = 1e-6) -> tuple[float, float]:
    """(a, b) of P(y=1|s) = sigmoid(a s + b) by weighted Newton on the log-loss (Platt 1999), with a >= 0.

    A higher-ranked item must never get a lower probability: where the unconstrained fit's slope is negative
    (a weak model on few validation users), the log-loss is concave in (a, b), so the constrained optimum
    lies on a = 0: the weighted base rate for every item.
    """
    x = np.stack([scores, np.ones_like(scores)], 1).astype(np.float64)
    theta = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ theta, -50, 50)))
        grad = x.T @ (weights * (p - labels)) + ridge * theta
        hess = (x * (weights * p * (1 - p))[:, None]).T @ x + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    if theta[0] >= 0:
        return float(theta[0]), float(theta[1])
    rate = float(np.clip(np.sum(weights * labels) / max(float(np.sum(weights)), 1e-300), 1e-12, 1 - 1e-12))
    return 0.0, float(np.log(rate / (1.0 - rate)))


def compute_isotonic_fit(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted isotonic regression by pool-adjacent-violators (Zadrozny and Elkan 2002): knots (x, y),
    x and y non-decreasing; predict with ``np.interp``."""
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order].astype(np.float64), weights[order].astype(np.float64)
    means: list[float] = []  # one block per run of pooled points: mean, weight, score range
    wsum: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    for k in range(len(s)):
        means.append(float(y[k]))
        wsum.append(float(w[k]))
        lo.append(float(s[k]))
        hi.append(float(s[k]))
        while len(means) > 1 and means[-2] >= means[-1]:
            w2 = wsum[-2] + wsum[-1]
            m = (means[-2] * wsum[-2] + means[-1] * wsum[-1]) / w2
            means[-2:], wsum[-2:], hi[-2:], lo[-2:] = [m], [w2], [hi[-1]], [lo[-2]]
    # both ends of every block: constant inside a block (as the fit is), linear between blocks
    x = np.array([v for a, b in zip(lo, hi, strict=True) for v in (a, b)])
    return x, np.repeat(np.array(means), 2)


@dataclass(frozen=True)
class Calibrator:
    """Score -> probability of interaction; ``method`` platt | isotonic | none (sigmoid of the score);
    ``reason``: why this method (set where it is not the one asked for, or where privacy decided it)."""

    method: str
    params: tuple[float, float] = (1.0, 0.0)
    knots_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    knots_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reason: str = ""

    def predict(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "isotonic" and len(self.knots_x):
            return np.interp(s, self.knots_x, self.knots_y)
        a, b = self.params
        return 1.0 / (1.0 + np.exp(-np.clip(a * s + b, -50, 50)))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"method": self.method, "params": list(self.params), "knots": len(self.knots_x)}
        if self.reason:
            doc["reason"] = self.reason
        return doc


def fit_calibrator(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, method: str) -> Calibrator:
    if method == "platt":
        return Calibrator("platt", compute_platt_params(scores, labels, weights))
    if method == "isotonic":
        x, y = compute_isotonic_fit(scores, labels, weights)
        return Calibrator("isotonic", knots_x=x, knots_y=y)
    if method == "none":
        return Calibrator("none")
    raise ServingError(f"calibration: must be platt|isotonic|none, got {method!r}")


# --- what the privacy scope allows the service to learn from the partner's records ---------------
PRIVACY_SCOPES = ("none", "partner", "joint")  # none: a non-private run (privacy.enabled = false)
CALIBRATIONS = ("auto", "platt", "isotonic", "none")  # auto: platt where the scope allows it, else none
JOINT_CALIBRATION_REASON = ("privacy.scope = joint: Platt and isotonic calibration are fitted on the partner's "
                            "validation records without DP, and other users' probabilities would reveal them; "
                            "probability = sigmoid(score), the DP model's own estimate")


def compute_serving_scope(enabled: bool, scope: str) -> str:
    """The scope serving enforces: ``none`` for a non-private run (``privacy.enabled = false``: nothing is DP,
    so nothing to protect), else ``privacy.scope`` (joint | partner)."""
    if scope not in ("joint", "partner"):
        raise ServingError(f"privacy.scope: must be joint|partner, got {scope!r}")
    return scope if enabled else "none"


def compute_calibration_method(calibration: str, privacy_scope: str) -> tuple[str, str]:
    """(method, reason) to fit: ``auto`` is platt, except in joint scope where it is none (the reason says why);
    platt or isotonic asked for in joint scope is refused (they would fit on private records without DP)."""
    if calibration not in CALIBRATIONS:
        raise ServingError(f"calibration: must be {'|'.join(CALIBRATIONS)}, got {calibration!r}")
    if privacy_scope != "joint":
        return ("platt" if calibration == "auto" else calibration), ""
    if calibration in ("platt", "isotonic"):
        raise ServingError(f"calibration: {calibration} is fitted on the partner's validation records without DP, "
                           "which privacy.scope = \"joint\" does not allow (other users' probabilities would reveal "
                           "those records); use calibration none or auto (sigmoid of the score; CLI: --calibration), "
                           "or serve under privacy.scope = \"partner\"")
    return "none", JOINT_CALIBRATION_REASON if calibration == "auto" else ""


# --- the served model ---------------------------------------------------------------------------
@dataclass
class Terms:
    """One user's additive score terms, for a set of items (arrays over those items)."""

    history: np.ndarray  # [n_bag, k] one row per history item
    friends: np.ndarray  # [n_friends, k]
    user: np.ndarray  # [k] per-user vector p_u (trained + local) and the user's features f_u
    mlp: np.ndarray  # [k] residual MLP
    bias: np.ndarray  # [k] c_i

    def total(self) -> np.ndarray:
        return self.history.sum(0) + self.friends.sum(0) + self.user + self.mlp + self.bias


def _user_rows(items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(list(items) or [0], dtype=torch.long)[None, :]
    return ids, torch.full(ids.shape, 1.0 if items else 0.0)


class Recommender:
    """A partner's served model over its users; ids in and out are the partner's external ids."""

    def __init__(self, model: SocialRec, split: SplitData, calibration: str = "auto",
                 events_path: Path | None = None, seed: int = 0, refit_on_event: str = "sync",
                 ranking: str = "model", *, privacy_scope: str) -> None:
        """``privacy_scope``: what the run's privacy allows serving to learn from the partner's records
        (:func:`compute_serving_scope`): ``joint`` (a DP run in joint scope) ranks cold users by the DP
        popularity prior and serves uncalibrated probabilities; ``partner`` and ``none`` (a non-private run)
        may use exact counts and fit calibration on validation records. Required, with no default: a caller
        that forgot it would serve a joint-scope run with non-DP statistics of other users' records."""
        if not isinstance(model, SocialRec):
            raise ServingError(f"serving needs the social model (model.name = social), got {type(model).__name__}")
        if ranking not in SELECTION_CANDIDATES:
            raise ServingError(f"ranking: must be one of {'|'.join(SELECTION_CANDIDATES)}, got {ranking!r}")
        if privacy_scope not in PRIVACY_SCOPES:
            raise ServingError(f"privacy_scope: must be {'|'.join(PRIVACY_SCOPES)}, got {privacy_scope!r}")
        compute_calibration_method(calibration, privacy_scope)  # a refused calibration fails before any work
        self.privacy_scope = privacy_scope
        self.ranking = ranking  # "prior" / "product": the DP selection chose the prior alone / times the model
        self.model, self.split, self.cfg = model.eval(), split, model.model_cfg
        self.events_path, self.seed = events_path, seed
        # The local p_u refit after an event (the partner's evaluation procedure, ~50 Adam steps): "sync"
        # before apply_events returns; "async" on a worker thread (the history and friends terms change
        # at once, p_u a refit later); "off": p_u only at the next refit_all_local_vectors.
        if refit_on_event not in ("sync", "async", "off"):
            raise ServingError(f"refit_on_event: must be sync|async|off, got {refit_on_event!r}")
        self.refit_on_event = refit_on_event
        self._lock = threading.RLock()  # guards local_user rows (and one list's score + terms) against the worker
        self._version: dict[int, int] = {}  # bumped when a worker writes a user's p_u
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[concurrent.futures.Future[None]] = []
        self._twin: SocialRec | None = None
        ds = split.dataset
        self.users: list[int | str] = compute_external_ids(ds)
        self.user_index = {u: i for i, u in enumerate(self.users)}
        self.items: list[int | str] = compute_item_external_ids(ds)
        self.item_index = {it: i for i, it in enumerate(self.items)}
        self.item_category = None if ds.item_category is None else np.asarray(ds.item_category)
        self.item_category_names: tuple[str, ...] = tuple(ds.item_category_names)  # () : the codes name themselves
        self._category_codes = np.unique(self.item_category) if self.item_category is not None else None  # once
        # each user's own record as the service sees it: every known interaction, out-neighbours
        self.history: list[list[int]] = [[] for _ in self.users]
        self.seen: list[set[int]] = [set() for _ in self.users]
        for u, i in zip(*(np.concatenate([a, b, c]).tolist() for a, b, c in (
                (split.train_users, split.val_users, split.test_users),
                (split.train_items, split.val_items, split.test_items))), strict=True):
            self._add_item(u, i)
        self.friends: list[list[int]] = [[] for _ in self.users]
        for a, b in zip(ds.social_src.tolist(), ds.social_dst.tolist(), strict=True):
            if a != b and b not in self.friends[a]:
                self.friends[a].append(b)
        # cold users' ranking: exact training counts (moved by events) where the scope allows them; in joint
        # scope they are never computed, and cold users get the DP prior (prior_scores, _refresh_items)
        self.popularity: np.ndarray | None = (
            None if privacy_scope == "joint"
            else np.bincount(split.train_items, minlength=ds.n_items).astype(np.float64))
        self._refresh_items()
        self._h: dict[int, tuple[torch.Tensor, int]] = {}  # live user vector and the p_u version it used
        self.calibrator = self.fit_calibration(calibration)  # p_u as refitted on training items
        self.refit_all_local_vectors()  # then p_u from everything the user did, for serving

    def refit_all_local_vectors(self, chunk: int = 1024) -> None:
        """Reconstruct every user's local p_u from all their known items (``refit_local_users``, batched)."""
        mc = self.cfg
        if mc.user_embedding != "local" or mc.local_refit_steps == 0 or not self.model.local_user.shape[0]:
            return
        n = len(self.users)
        rows = np.repeat(np.arange(n), [len(h) for h in self.history])
        cols = np.fromiter((i for h in self.history for i in h), dtype=np.int64, count=len(rows))
        src = np.repeat(np.arange(n), [len(f) for f in self.friends])
        dst = np.fromiter((v for f in self.friends for v in f), dtype=np.int64, count=len(src))
        ip, ii = compute_csr(rows, cols, n)
        np_, ni = compute_csr(src, dst, n)
        builder = ExampleBuilder(n, self.model.n_items, ip, ii, np_, ni, mc.max_targets, mc.num_negatives,
                                 mc.max_neighbors, mc.max_history)
        rng = np.random.default_rng([self.seed, 17])
        users = np.arange(n)
        with torch.no_grad():
            self.model.local_user[:n] = 0.0
        for start in range(0, n, chunk):
            ub = users[start:start + chunk]
            self.model.refit_local_users(builder.train_batch(ub, rng), mc.local_refit_steps, mc.local_refit_l2)
        self._h.clear()

    # --- item side, computed once -------------------------------------------------------------
    def _refresh_items(self) -> None:
        with torch.no_grad():
            m = self.model
            # stored column-major ([d, n] contiguous, viewed as [n, d]): BLAS gemv over a short-row
            # row-major matrix reads it 3x slower (measured at 1M x 64: 58 vs 162 ms under load)
            self.item_matrix = m._normalise(m._item_vectors(torch.arange(m.n_items))).T.contiguous().T
            self.item_bias = m.item_biases().contiguous()  # b_i * bias_scale (+ the DP popularity prior)
            self.prior_scores = compute_prior_item_scores(m).contiguous()  # ranking = "prior" (DP selection)
            # the prior personalised by the user's own category shares where the model has item categories
            self.prior_cats = category_index(m)
            self.prior_log_mass = (None if self.prior_cats is None
                                   else compute_category_log_mass(self.prior_scores, self.prior_cats))
            self.prior_within = (self.prior_scores if self.prior_cats is None or self.prior_log_mass is None
                                 else self.prior_scores - self.prior_log_mass[self.prior_cats])  # log P(i | c(i))
            # what the prior is: the DP popularity release's (charged in the ledger), else the item biases
            self.prior_source = "dp_release" if m.item_prior() is not None else "item_biases"

    @property
    def cold_source(self) -> str:
        """What a cold user (no items, no friends) is ranked by: ``training_counts`` (exact, partner scope or a
        non-private run), or in joint scope ``dp_release`` / ``item_biases`` (:attr:`prior_scores`)."""
        return self.prior_source if self.popularity is None else "training_counts"

    # --- user side ------------------------------------------------------------------------------
    def _add_item(self, u: int, i: int) -> bool:
        if i in self.seen[u]:
            return False
        self.seen[u].add(i)
        self.history[u].append(i)
        return True

    def index_of(self, user: int | str) -> int:
        key = compute_external_id(user)
        if key not in self.user_index:
            raise UnknownUserError(f"unknown user {user!r}")
        return self.user_index[key]

    def _item_of(self, item: int | str, what: str = "item") -> int:
        key = compute_external_id(item)
        if key not in self.item_index:
            raise ServingError(f"field {what!r}: unknown item {item!r} (not in the catalogue)")
        return self.item_index[key]

    def add_user(self, user: int | str) -> int:
        """A new local user with no record (served from friends and popularity until they have items)."""
        key = compute_external_id(user)
        if key in self.user_index:
            return self.user_index[key]
        u = len(self.users)
        self.users.append(key)
        self.user_index[key] = u
        self.history.append([])
        self.seen.append(set())
        self.friends.append([])
        self._grow_tables(u + 1)
        return u

    def _grow_tables(self, n: int) -> None:
        """Zero rows for new users in the per-user tables (grown by a quarter, so adding users is amortised O(1))."""
        m = self.model
        sizes = [e.num_embeddings for e in (m.social_emb, m.user_emb) if e is not None]
        sizes += [t.shape[0] for t in (m.local_user, m.user_feat) if t.shape[0]]
        if not sizes or n <= min(sizes):
            return
        size = max(n, int(min(sizes) * 1.25) + 16)
        with torch.no_grad(), self._lock:
            for name in ("social_emb", "user_emb"):
                emb = getattr(m, name)
                if emb is not None and emb.num_embeddings < size:
                    new = nn.Embedding(size, emb.embedding_dim)
                    new.weight.zero_()
                    new.weight[: emb.num_embeddings] = emb.weight
                    setattr(m, name, new)
            if m.local_user.shape[0] and m.local_user.shape[0] < size:
                pad = torch.zeros(size - m.local_user.shape[0], m.local_user.shape[1])
                m.local_user = torch.cat([m.local_user, pad])
            if m.user_feat.shape[0] and m.user_feat.shape[0] < size:  # new users: every feature missing (code 0)
                widths = tuple(self.split.dataset.user_feature_sizes)
                missing = compute_user_feature_index(np.zeros((size - m.user_feat.shape[0], len(widths))), widths,
                                                     size - m.user_feat.shape[0])
                m.user_feat = torch.cat([m.user_feat, missing])

    def _batch(self, u: int, bag: Sequence[int], friends: Sequence[int]) -> dict[str, torch.Tensor]:
        b, bm = _user_rows(bag)
        n, nm = _user_rows(friends)
        return {"users": torch.tensor([u]), "bag": b, "bag_mask": bm, "nbrs": n, "nbr_mask": nm}

    def user_vector(self, u: int, bag: Sequence[int] | None = None, friends: Sequence[int] | None = None
                    ) -> torch.Tensor:
        """g(h_u) [d] with the model's own ``user_vectors`` and ``_normalise`` (cached for the live record)."""
        live = bag is None and friends is None
        version = self._version.get(u, 0)
        cached = self._h.get(u) if live else None
        if cached is not None and cached[1] == version:
            return cached[0]
        batch = self._batch(u, self.history[u] if bag is None else bag, self.friends[u] if friends is None else friends)
        with torch.no_grad(), self._lock:
            version = self._version.get(u, 0)
            h = self.model.scored_user_vectors(batch)[0]
        if live:
            self._h[u] = (h, version)
        return h

    def refit_local_vector(self, u: int) -> None:
        """Reconstruct p_u (``user_embedding = local``) from the user's own items, as the partner's evaluation
        does (``refit_local_users``), with a per-user seed so the result is reproducible."""
        self.refit_local_vectors([u])

    def refit_local_vectors(self, users: Sequence[int]) -> None:
        """:meth:`refit_local_vector` for several users at once: one batched refit per ``REFIT_CHUNK`` users
        (each user's p_u is its own convex problem, so batching changes only the negatives drawn), where one
        refit per user took 18 ms: a request of 10,000 new users blocked the service for minutes."""
        mc = self.cfg
        if mc.user_embedding != "local" or mc.local_refit_steps == 0 or not self.model.local_user.shape[0]:
            return
        records = {u: (list(self.history[u]), list(self.friends[u])) for u in sorted(set(users))}
        if self.refit_on_event != "async":
            with self._lock:
                self._refit_into(self.model, records)
                for u in records:
                    self._version[u] = self._version.get(u, 0) + 1
            return
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="refit")
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._worker.submit(self._refit_async, records))

    def _refit_into(self, model: SocialRec, records: Mapping[int, tuple[list[int], list[int]]]) -> None:
        """``model.refit_local_users`` on each user's own record (items, friends). One user: seeded by the user
        (reproducible); several: batched, seeded by the set."""
        mc = self.cfg
        for u in [u for u, (items, _) in records.items() if not items]:
            model.local_user[u] = 0.0
        users = sorted(u for u, (items, _) in records.items() if items)
        if not users:
            return
        n = users[-1] + 1
        rows = np.repeat(users, [len(records[u][0]) for u in users])
        cols = np.fromiter((i for u in users for i in records[u][0]), dtype=np.int64, count=len(rows))
        src = np.repeat(users, [len(records[u][1]) for u in users])
        dst = np.fromiter((v for u in users for v in records[u][1]), dtype=np.int64, count=len(src))
        ip, ii = compute_csr(rows, cols, n)
        np_, ni = compute_csr(src, dst, n)
        builder = ExampleBuilder(n, model.n_items, ip, ii, np_, ni, mc.max_targets, mc.num_negatives,
                                 max(1, *(len(records[u][1]) for u in users)), mc.max_history)
        rng = np.random.default_rng([self.seed, users[0]] if len(users) == 1 else [self.seed, 19, *users[:4], n])
        for start in range(0, len(users), REFIT_CHUNK):
            batch = builder.train_batch(np.asarray(users[start:start + REFIT_CHUNK]), rng)
            model.refit_local_users(batch, mc.local_refit_steps, mc.local_refit_l2)

    def _refit_async(self, records: Mapping[int, tuple[list[int], list[int]]]) -> None:
        """On the worker: refit into a twin of the model (same shared tensors, its own p_u buffer), then copy
        the rows in under the lock, so that a request never reads a half-written vector."""
        m = self.model
        if self._twin is None:
            self._twin = copy.copy(m)
            self._twin._buffers = dict(m._buffers)
        twin = self._twin
        twin._buffers.update({k: v for k, v in m._buffers.items() if k != "local_user"})
        if twin.local_user.shape != m.local_user.shape:
            twin._buffers["local_user"] = torch.zeros_like(m.local_user)
        self._refit_into(twin, records)
        with self._lock:
            for u in records:
                m.local_user[u] = twin.local_user[u]
                self._version[u] = self._version.get(u, 0) + 1

    def wait_for_refits(self) -> None:
        """Block until every asynchronous p_u refit scheduled so far has been applied."""
        for f in list(self._pending):
            f.result()
        self._pending = []

    def scores(self, u: int, bag: Sequence[int] | None = None, friends: Sequence[int] | None = None) -> torch.Tensor:
        """The model's score of every item for user u: g(h_u) . g(q_i) + c_i  [n_items] (the DP popularity prior
        alone when ``ranking = "prior"``, the two added when ``ranking = "product"``: shared/models/prior.py)."""
        if self.ranking == "prior":
            within, affinity = self._prior_terms(u, bag)
            return within + affinity
        scores = torch.mv(self.item_matrix, self.user_vector(u, bag, friends)) + self.item_bias
        if self.ranking == "product":  # the model times the prior (ProductRanking): their scores add
            within, affinity = self._prior_terms(u, bag)
            return scores + within + affinity
        return scores

    def _prior_terms(self, u: int, bag: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``ranking = "prior"`` or ``"product"``: (log P(i | c(i)) [I], log P(c(i) | u) [I]) from the user's own
        items (its live record: clicks and purchases move it), shared/models/prior.py; the plain prior and zeros
        without categories."""
        cats, log_mass = self.prior_cats, self.prior_log_mass
        if cats is None or log_mass is None:
            return self.prior_within, torch.zeros_like(self.prior_within)
        items = torch.as_tensor(list(self.history[u] if bag is None else bag), dtype=torch.long).reshape(1, -1)
        counts = compute_user_category_counts(items, torch.ones(items.shape), cats, log_mass.shape[0])
        return self.prior_within, compute_category_affinity(counts, log_mass)[0][cats]

    # --- lists ----------------------------------------------------------------------------------
    def category_code(self, category: int | str) -> int:
        """The code of a catalogue category given by its code, or by its name where items.csv named them."""
        if self.item_category is None:
            raise ServingError("field 'category': this catalogue has no categories")
        names = self.item_category_names
        if not isinstance(category, bool) and str(category) in names:  # a name, also one that reads as a number
            return names.index(str(category))  # (integer codes above 65,535 are kept as names: shared/features.py)
        if isinstance(category, str) and category.isascii() and category.lstrip("-").isdigit() \
                and len(category) <= 20:
            category = int(category)  # a code given as text (a query string, a CLI argument)
        if isinstance(category, bool) or not isinstance(category, int):
            raise ServingError(f"field 'category': no category {str(category)[:80]!r} in this catalogue "
                               f"(its categories: {self._category_list()})")
        return category

    def category_labels(self, limit: int = 1000) -> list[str]:
        """The catalogue's categories that hold items, by name where items.csv named them (else their codes)."""
        if self._category_codes is None:
            return []
        codes = self._category_codes[:limit].tolist()
        return [self.item_category_names[c] if self.item_category_names else str(c) for c in codes]

    def _category_list(self) -> str:
        shown = self.category_labels(21)
        quoted = [repr(c) for c in shown[:20]] if self.item_category_names else shown[:20]  # names may hold commas
        return ", ".join(quoted) + (", ..." if len(shown) > 20 else "")

    def recommend(self, user: int | str, k: int = 10, category: int | str | None = None,
                  explain: bool = True) -> list[dict[str, Any]]:
        """Top-``k`` unseen items for ``user`` (optionally within one catalogue category: its code or name)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ServingError(f"field 'k': must be an integer in [1, {MAX_K}], got {k!r}")
        code = None if category is None else self.category_code(category)
        u = self.index_of(user)
        with self._lock:  # the scores and the explanation read the same p_u
            return self._recommend(u, k, code, explain)

    def _recommend(self, u: int, k: int, category: int | None, explain: bool) -> list[dict[str, Any]]:
        cold = not self.history[u] and not self.friends[u]
        scores = self.scores(u)
        # no items and no friends: the model's vector is empty, so rank by popularity (the model's score kept):
        # exact counts where the scope allows them, else (joint scope) the DP prior, never a function of records
        if not cold:
            rank_by = scores.clone()
        elif self.popularity is None:
            rank_by = self.prior_scores.to(scores.dtype).clone()
        else:
            rank_by = torch.as_tensor(self.popularity, dtype=scores.dtype)
        if self.seen[u]:
            rank_by[torch.as_tensor(sorted(self.seen[u]))] = -torch.inf
        if category is not None:
            assert self.item_category is not None  # category_code refused a catalogue without categories
            in_category = self.item_category == category
            if not in_category.any():  # an empty list would read as "nothing left to recommend"
                raise ServingError(f"field 'category': no item of this catalogue is in category {category} "
                                   f"(its categories: {self._category_list()})")
            rank_by[torch.as_tensor(~in_category)] = -torch.inf
        top = torch.topk(rank_by, min(k, rank_by.shape[0]))
        keep = torch.isfinite(top.values)
        idx = top.indices[keep].numpy()
        top_scores = scores[idx].numpy().astype(np.float64)
        probs = self.calibrator.predict(top_scores)
        expl = self.explain(u, idx, cold=cold) if explain else [{} for _ in idx]
        return [{"item": self.items[i], "score": float(s), "probability": float(p), "explanation": e}
                for i, s, p, e in zip(idx.tolist(), top_scores, probs, expl, strict=True)]

    # --- explanations ---------------------------------------------------------------------------
    def terms(self, u: int, items: np.ndarray, bag: Sequence[int] | None = None,
              friends: Sequence[int] | None = None) -> Terms:
        """Additive terms of user u's score for ``items``; ``Terms.total()`` equals the model's score."""
        m, mc = self.model, self.cfg
        if self.ranking == "prior":  # the prior within the item's category (bias) and the user's share of it (user)
            ids = torch.as_tensor(np.asarray(items, dtype=np.int64))
            within, affinity = self._prior_terms(u, bag)
            none = np.zeros(len(ids))
            return Terms(history=np.zeros((0, len(ids))), friends=np.zeros((0, len(ids))),
                         user=affinity[ids].numpy().astype(np.float64), mlp=none,
                         bias=within[ids].numpy().astype(np.float64))
        bag = self.history[u] if bag is None else list(bag)
        friends = self.friends[u] if friends is None else list(friends)
        idx = torch.as_tensor(np.asarray(items, dtype=np.int64))
        qv = self.item_matrix[idx]  # [k, d]
        with torch.no_grad():
            parts, hist_rows, friend_rows = [], torch.zeros(0, mc.dim), torch.zeros(0, mc.dim)
            bag_full = None
            if m.hist_emb is not None:
                hist_rows = (m._history_vectors(torch.as_tensor(bag, dtype=torch.long)) / math.sqrt(max(len(bag), 1))
                             if bag else torch.zeros(0, mc.dim))
                bag_full = hist_rows.sum(0)
                parts.append(bag_full)
            if m.social_emb is not None:
                friend_rows = self._friend_rows(friends, bag_full)
                parts.append(friend_rows.sum(0))
            user_vec = torch.zeros(mc.dim)
            if m.user_emb is not None:
                user_vec = user_vec + m.user_emb.weight[u]
                parts.append(m.user_emb.weight[u])
            feats = m._user_features(torch.tensor([u]))  # f_u: the user's own features (users.csv)
            if feats is not None:
                user_vec = user_vec + feats[0]
                parts.append(feats[0])
            if m.local_user.shape[0]:
                with self._lock:
                    user_vec = user_vec + m.local_user[u]
            mlp = m.mlp(torch.cat(parts)[None])[0] if m.mlp is not None and parts else torch.zeros(mc.dim)
            h = hist_rows.sum(0) + friend_rows.sum(0) + user_vec + mlp
            alpha = 1.0 if mc.temperature <= 0 else 1.0 / (max(float(h.norm()), _EPS) * mc.temperature ** 0.5)
            scale = m.user_scale()  # learned_scale: the same factor scored_user_vectors applies
            alpha = alpha if scale is None else alpha * float(scale[0])
            user_term, bias_term = alpha * qv @ user_vec, self.item_bias[idx]
            if self.ranking == "product":  # the prior's terms join the user's (category share) and the item's
                within, affinity = self._prior_terms(u, bag)
                user_term, bias_term = user_term + affinity[idx], bias_term + within[idx]
            return Terms(history=(alpha * hist_rows @ qv.T).numpy().astype(np.float64),
                         friends=(alpha * friend_rows @ qv.T).numpy().astype(np.float64),
                         user=user_term.numpy().astype(np.float64),
                         mlp=(alpha * qv @ mlp).numpy().astype(np.float64),
                         bias=bias_term.numpy().astype(np.float64))

    def _friend_rows(self, friends: Sequence[int], bag_full: torch.Tensor | None) -> torch.Tensor:
        """w_v s_v for each friend, with the model's aggregator weights (SocialRec._social)."""
        m = self.model
        assert m.social_emb is not None
        if not friends:
            return torch.zeros(0, self.cfg.dim)
        s = m.social_emb(torch.as_tensor(friends, dtype=torch.long))
        n = float(len(friends))
        if self.cfg.aggregator == "mean":
            w = torch.full((len(friends),), 1.0 / n)
        elif self.cfg.aggregator == "gcn":
            w = torch.full((len(friends),), 1.0 / math.sqrt(n))
        else:
            assert m.att is not None
            q = torch.zeros_like(s) if bag_full is None else bag_full[None, :].expand_as(s)
            w = torch.softmax(m.att(torch.cat([q, s], dim=-1)).squeeze(-1), dim=0)
        return w[:, None] * s

    def explain(self, u: int, items: np.ndarray, top: int = 3, cold: bool = False) -> list[dict[str, Any]]:
        """Per item: the terms, and the ``top`` history items and friends that contributed most, each with
        its share = contribution / sum of |all contributions| to that item's score."""
        t = self.terms(u, items)
        bag, friends = self.history[u], self.friends[u]
        out = []
        for k in range(len(items)):
            parts = [t.history[:, k], t.friends[:, k], np.array([t.user[k], t.mlp[k], t.bias[k]])]
            scale = float(sum(np.abs(p).sum() for p in parts)) or 1.0
            doc: dict[str, Any] = {
                "reason": "popularity" if cold else self.ranking,  # model, prior or product (the DP selection)
                "terms": {"history": float(t.history[:, k].sum()), "social": float(t.friends[:, k].sum()),
                          "user": float(t.user[k]), "mlp": float(t.mlp[k]), "bias": float(t.bias[k])},
                "history": _top_terms(t.history[:, k], [self.items[i] for i in bag], "item", top, scale),
                "friends": _top_terms(t.friends[:, k], [self.users[v] for v in friends], "user", top, scale),
            }
            if cold:  # which popularity ranked the list (the terms stay the model's score)
                doc["popularity"] = self.cold_source
            out.append(doc)
        return out

    # --- events ---------------------------------------------------------------------------------
    def apply_events(self, events: Iterable[Event]) -> dict[str, Any]:
        """Apply events in order (all validated first, so a bad one changes nothing), append them durably,
        and rebuild the touched users' vectors. Returns counts."""
        events = list(events)
        for n, e in enumerate(events):
            if e.type in SOCIAL:
                if compute_external_id(e.neighbour) not in self.user_index:  # type: ignore[arg-type]
                    raise ServingError(f"event #{n}: field 'neighbour': unknown user {e.neighbour!r}")
            else:
                self._item_of(e.item, "item")  # type: ignore[arg-type]
        if self.events_path is not None:
            append_events_durably(self.events_path, events)
        created, touched = 0, set()
        for e in events:
            if compute_external_id(e.user) not in self.user_index:
                self.add_user(e.user)
                created += 1
            u = self.index_of(e.user)
            touched.add(u)
            if e.type in SOCIAL:
                v = self.index_of(e.neighbour)  # type: ignore[arg-type]
                if e.type == "follow" and v not in self.friends[u]:
                    self.friends[u].append(v)
                elif e.type == "unfollow" and v in self.friends[u]:
                    self.friends[u].remove(v)
            elif self._add_item(u, self._item_of(e.item)) and self.popularity is not None:  # type: ignore[arg-type]
                # exact counts only where the scope allows them: in joint scope an event changes only its
                # user's own list (the cold ranking is the DP prior, which no event moves)
                self.popularity[self._item_of(e.item)] += 1  # type: ignore[arg-type]
        for u in touched:
            self._h.pop(u, None)
        if self.refit_on_event != "off":
            self.refit_local_vectors(sorted(touched))
        return {"accepted": len(events), "created_users": created, "durable": self.events_path is not None}

    # --- calibration on the partner's validation data -----------------------------------------
    def fit_calibration(self, method: str, max_users: int = 2000, negatives: int = 50) -> Calibrator:
        """Fit score -> P(interaction) on validation data: each user's vector from training items only,
        validation items as positives, ``negatives`` uniform unseen items per user each weighted as the
        (unseen catalogue / negatives) items it stands for, so the probabilities keep the true base rate.
        In joint scope only ``none`` (no fit) is allowed: the validation records are never read."""
        method, reason = compute_calibration_method(method, self.privacy_scope)
        if method == "none":
            return Calibrator("none", reason=reason)
        s, y, w = self.validation_scores(max_users, negatives)
        if not len(s) or y.sum() == 0:
            return Calibrator("none", reason=f"{method}: no validation interactions to fit on")
        return fit_calibrator(s, y, w, method)

    def validation_scores(self, max_users: int = 2000, negatives: int = 50) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
        sp = self.split
        rng = np.random.default_rng(self.seed)
        train: dict[int, list[int]] = {}
        for a, b in zip(sp.train_users.tolist(), sp.train_items.tolist(), strict=True):
            train.setdefault(a, []).append(b)
        val: dict[int, list[int]] = {}
        for a, b in zip(sp.val_users.tolist(), sp.val_items.tolist(), strict=True):
            val.setdefault(a, []).append(b)
        users = sorted(val)
        if len(users) > max_users:
            users = sorted(rng.choice(users, max_users, replace=False).tolist())
        ss, ys, ws = [], [], []
        n_items = self.model.n_items
        for u in users:
            # the local p_u of the model was refitted on training items: it is part of this vector
            sc = self.scores(u, bag=train.get(u, []), friends=self.friends[u]).numpy()
            pos = np.asarray(val[u])
            excluded = set(train.get(u, [])) | set(val[u])
            neg = rng.integers(0, n_items, size=negatives)
            neg = neg[[i not in excluded for i in neg.tolist()]]
            weight = (n_items - len(excluded)) / negatives
            ss += [sc[pos], sc[neg]]
            ys += [np.ones(len(pos)), np.zeros(len(neg))]
            ws += [np.ones(len(pos)), np.full(len(neg), weight)]
        if not ss:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        return np.concatenate(ss).astype(np.float64), np.concatenate(ys), np.concatenate(ws)

    # --- user facts for the page ----------------------------------------------------------------
    def user_profile(self, user: int | str, limit: int = 50) -> dict[str, Any]:
        u = self.index_of(user)
        return {"user": self.users[u], "items": [self.items[i] for i in self.history[u][-limit:]],
                "n_items": len(self.history[u]), "friends": [self.users[v] for v in self.friends[u][:limit]],
                "n_friends": len(self.friends[u])}


def _top_terms(values: np.ndarray, ids: list[Any], key: str, top: int, scale: float) -> list[dict[str, Any]]:
    if not len(values):
        return []
    order = np.argsort(-np.abs(values), kind="stable")[:top]
    return [{key: ids[j], "contribution": float(values[j]), "share": float(values[j] / scale)} for j in order]
