"""Social analysis of one partner's own graph (its users' data: it stays inside the partner).

* communities: Louvain (Blondel et al. 2008, networkx) on the partner's friendship graph (directed
  edges made undirected), each with its characteristic items: lift = the item's share of the
  community's interactions / its share of all the partner's interactions (items with at least
  ``min_support`` interactions in the community), as in association-rule mining;
* influence: how much a user's social vector moves the scores of their followers' recommendations,
  sum over followers u of the mean |w_uv s_v . g(q_i)| alpha_u over u's top-k items (the exact friend
  term of the score decomposition, :meth:`Recommender.terms`);
* the social term's share of the scores, per community: sum |friend terms| / sum |all terms| over
  the members' top-k items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from fedsocial.shared.serving import Recommender


@dataclass(frozen=True)
class UserSocialTerms:
    user: int  # local index
    friend_influence: dict[int, float]  # friend (local index) -> mean |term| over the user's top-k
    social_share: float  # sum |social terms| / sum |all terms| over the user's top-k


def compute_communities(n_users: int, src: list[int], dst: list[int], seed: int = 0) -> list[list[int]]:
    """Louvain communities of the undirected friendship graph, largest first (isolated users alone)."""
    g = nx.Graph()
    g.add_nodes_from(range(n_users))
    g.add_edges_from((a, b) for a, b in zip(src, dst, strict=True) if a != b)
    parts = nx.community.louvain_communities(g, seed=seed)
    return sorted((sorted(p) for p in parts), key=lambda c: (-len(c), c[0]))


def compute_item_lift(member_items: list[int], all_items: np.ndarray, n_items: int, min_support: int = 2
                      ) -> list[tuple[int, float, int]]:
    """(item, lift, count) of a community's items, highest lift first, count >= ``min_support``."""
    if not member_items:
        return []
    local = np.bincount(np.asarray(member_items), minlength=n_items).astype(np.float64)
    overall = np.bincount(all_items, minlength=n_items).astype(np.float64)
    ok = np.flatnonzero(local >= min_support)
    lift = (local[ok] / local.sum()) / (overall[ok] / overall.sum())
    order = np.lexsort((-local[ok], -lift))
    return [(int(ok[j]), float(lift[j]), int(local[ok[j]])) for j in order]


def compute_user_social_terms(rec: Recommender, u: int, k: int = 10) -> UserSocialTerms:
    """The exact friend terms of user u's top-k scores (sign dropped: a push either way is influence)."""
    items = [rec.item_index[it["item"]] for it in rec.recommend(rec.users[u], k, explain=False)]
    if not items:
        return UserSocialTerms(u, {}, 0.0)
    t = rec.terms(u, np.asarray(items))
    mag = np.abs(t.friends).mean(1) if len(t.friends) else np.zeros(0)
    total = (np.abs(t.history).sum() + np.abs(t.friends).sum() + np.abs(t.user).sum() + np.abs(t.mlp).sum()
             + np.abs(t.bias).sum())
    share = float(np.abs(t.friends).sum() / total) if total > 0 else 0.0
    if len(mag) != len(rec.friends[u]):  # the score has no friend term (no social table, or the DP prior is served)
        return UserSocialTerms(u, {}, share)
    return UserSocialTerms(u, {v: float(m) for v, m in zip(rec.friends[u], mag, strict=True)}, share)


def analyse(rec: Recommender, k: int = 10, top_items: int = 5, top_users: int = 10, max_users: int = 5000,
            seed: int = 0) -> dict[str, Any]:
    """Communities with their characteristic items and social share, and the most influential users."""
    n = len(rec.users)
    src = [a for a, fs in enumerate(rec.friends) for _ in fs]
    dst = [b for fs in rec.friends for b in fs]
    communities = compute_communities(n, src, dst, seed)
    users = np.arange(n)
    if n > max_users:  # the terms need one list per user: analyse a seeded sample of a large partner
        users = np.sort(np.random.default_rng(seed).choice(n, max_users, replace=False))
    terms = {int(u): compute_user_social_terms(rec, int(u), k) for u in users if rec.friends[u]}
    influence: dict[int, float] = {}
    followers: dict[int, int] = {}
    for t in terms.values():
        for v, m in t.friend_influence.items():
            influence[v] = influence.get(v, 0.0) + m
            followers[v] = followers.get(v, 0) + 1
    all_items = np.fromiter((i for h in rec.history for i in h), dtype=np.int64)
    out = []
    for c, members in enumerate(communities):
        if len(members) < 2:
            continue
        lift = compute_item_lift([i for u in members for i in rec.history[u]], all_items, rec.model.n_items)
        shares = [terms[u].social_share for u in members if u in terms]
        out.append({"community": c, "size": len(members), "members": [rec.users[u] for u in members[:20]],
                    "characteristic_items": [{"item": rec.items[i], "lift": lift_, "count": cnt}
                                             for i, lift_, cnt in lift[:top_items]],
                    "social_share": float(np.mean(shares)) if shares else 0.0,
                    "measured_users": len(shares)})
    ranked = sorted(influence, key=lambda v: -influence[v])[:top_users]
    return {"communities": out, "isolated_users": sum(1 for c in communities if len(c) == 1),
            "influencers": [{"user": rec.users[v], "influence": influence[v], "followers": followers[v]}
                            for v in ranked],
            "social_share": float(np.mean([t.social_share for t in terms.values()])) if terms else 0.0,
            "analysed_users": len(users), "k": k}
