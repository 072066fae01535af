"""Assign users to partner platforms, and cut a split dataset down to one partner's local data.

Three schemes (DESIGN.md, evaluation protocol), all seeded by ``PartitionConfig.seed`` and all
giving every partner at least one user:

- ``random``: a uniformly random balanced assignment;
- ``community``: Louvain communities of the undirected social graph (Blondel et al. 2008, as
  implemented by networkx), merged greedily into balanced partners, so that most friendships stay
  inside a partner, as with regional platforms;
- ``dirichlet``: label-skew by item category (Hsu, Qi and Brown 2019): for each category a
  Dirichlet(alpha) draw over partners, and each user goes to a partner drawn from the row of the
  user's dominant category. Small alpha: partners specialise in categories.
"""

from __future__ import annotations

import heapq

import networkx as nx
import numpy as np

from fedsocial.shared.config import ConfigError, PartitionConfig
from fedsocial.shared.data import Dataset, SplitData


def partition_users(ds: Dataset, n_partners: int, cfg: PartitionConfig) -> np.ndarray:
    """Partner id (0..n_partners-1) of every user of ``ds``; every partner gets at least one user."""
    if not 1 <= n_partners <= ds.n_users:
        raise ConfigError(f"federation.partners: must be in [1, {ds.n_users}] (the number of users), "
                          f"got {n_partners}")
    rng = np.random.default_rng(cfg.seed)
    if cfg.method == "random":
        return compute_random_assignment(ds.n_users, n_partners, rng)
    if cfg.method == "community":
        return compute_community_assignment(ds, n_partners, cfg.seed)
    return compute_dirichlet_assignment(ds, n_partners, cfg.alpha, rng)


def compute_random_assignment(n_users: int, n_partners: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced: partner sizes differ by at most one."""
    assignment = np.empty(n_users, dtype=np.int64)
    assignment[rng.permutation(n_users)] = np.arange(n_users) % n_partners
    return assignment


def social_graph(ds: Dataset) -> nx.Graph:
    """The undirected social graph over all users (isolated users included)."""
    graph = nx.Graph()
    graph.add_nodes_from(range(ds.n_users))
    graph.add_edges_from(zip(ds.social_src.tolist(), ds.social_dst.tolist(), strict=True))
    return graph


def compute_communities(graph: nx.Graph, seed: int) -> list[list[int]]:
    """Louvain communities, each sorted, ordered largest first; users without edges are singletons."""
    communities = [sorted(c) for c in nx.community.louvain_communities(graph, seed=seed)]
    return sorted(communities, key=lambda c: (-len(c), c[0]))


def compute_bfs_order(graph: nx.Graph, members: list[int]) -> list[int]:
    """Members in breadth-first order inside their subgraph, so consecutive chunks stay connected."""
    sub = graph.subgraph(members)
    seen: set[int] = set()
    order: list[int] = []
    for root in members:
        if root not in seen:
            component = [root, *(v for _, v in nx.bfs_edges(sub, root))]
            seen.update(component)
            order.extend(component)
    return order


def compute_balanced_packing(sizes: np.ndarray, n_partners: int) -> np.ndarray:
    """Greedy number partitioning: groups largest first, each into the currently smallest partner.

    Ties go to the lowest partner id, so the result is deterministic given the group order.
    """
    heap = [(0, p) for p in range(n_partners)]
    owner = np.empty(sizes.size, dtype=np.int64)
    for g in np.argsort(-sizes, kind="stable"):
        load, p = heapq.heappop(heap)
        owner[g] = p
        heapq.heappush(heap, (load + int(sizes[g]), p))
    return owner


def compute_community_assignment(ds: Dataset, n_partners: int, seed: int) -> np.ndarray:
    """Louvain communities packed into partners; communities larger than a fair share
    (ceil(n_users / n_partners)) are cut into fair-share pieces first, so partners stay balanced."""
    cap = -(-ds.n_users // n_partners)
    graph = social_graph(ds)
    groups: list[list[int]] = []
    for community in compute_communities(graph, seed):
        if len(community) > cap:
            community = compute_bfs_order(graph, community)
        groups.extend(community[k:k + cap] for k in range(0, len(community), cap))
    owner = compute_balanced_packing(np.array([len(g) for g in groups]), n_partners)
    assignment = np.empty(ds.n_users, dtype=np.int64)
    for g, members in enumerate(groups):
        assignment[members] = owner[g]
    return assignment


def compute_dominant_category(ds: Dataset) -> np.ndarray:
    """Each user's most frequent item category (ties: the smallest code; no interactions: 0)."""
    if ds.item_category is None:
        raise ConfigError(f"partition.method = 'dirichlet' needs item categories, and dataset "
                          f"{ds.name or '(unnamed)'} has none: use 'random' or 'community'")
    cats = ds.item_category[ds.items]
    n_cat = int(ds.item_category.max()) + 1
    counts = np.bincount(ds.users * n_cat + cats, minlength=ds.n_users * n_cat).reshape(ds.n_users, n_cat)
    return np.argmax(counts, axis=1)


def compute_dirichlet_assignment(
    ds: Dataset, n_partners: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Category-skewed assignment; empty partners then take a random user from the largest partner."""
    dominant = compute_dominant_category(ds)
    shares = rng.dirichlet(np.full(n_partners, alpha), size=int(dominant.max()) + 1)  # category x partner
    cum = np.cumsum(shares, axis=1)
    draws = rng.random(ds.n_users)
    assignment = np.minimum((cum[dominant] < draws[:, None]).sum(axis=1), n_partners - 1).astype(np.int64)
    for p in range(n_partners):
        if not (assignment == p).any():  # keep every partner non-empty (small alpha can starve one)
            largest = int(np.argmax(np.bincount(assignment, minlength=n_partners)))
            assignment[rng.choice(np.flatnonzero(assignment == largest))] = p
    return assignment


def compute_within_share(ds: Dataset, assignment: np.ndarray) -> float:
    """Share of social edges whose two ends are in the same partner (1.0 when there are no edges)."""
    if ds.n_edges == 0:
        return 1.0
    return float((assignment[ds.social_src] == assignment[ds.social_dst]).mean())


def partner_split(split: SplitData, assignment: np.ndarray, partner: int) -> SplitData:
    """Partner ``partner``'s local data: its users re-indexed 0..n_p-1 in global order
    (``dataset.user_ids`` holds their global index), items and ``n_items`` unchanged (the catalogue
    is shared), social edges kept when both ends belong to the partner."""
    ds = split.dataset
    members = np.flatnonzero(assignment == partner)
    local = np.full(ds.n_users, -1, dtype=np.int64)
    local[members] = np.arange(members.size)

    def cut(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = local[users] >= 0
        return local[users[keep]], items[keep]

    users, items = cut(ds.users, ds.items)
    keep = (local[ds.social_src] >= 0) & (local[ds.social_dst] >= 0)
    original = ds.user_ids[members] if ds.user_ids is not None else members
    sub = Dataset(
        n_users=int(members.size), n_items=ds.n_items, users=users, items=items,
        social_src=local[ds.social_src[keep]], social_dst=local[ds.social_dst[keep]],
        item_category=ds.item_category, item_category_names=ds.item_category_names,
        name=f"{ds.name}/partner{partner}", user_ids=members,
        item_ids=ds.item_ids, extra={"partner": partner, "original_user_ids": original},
        item_price_bin=ds.item_price_bin, item_text=ds.item_text,  # the catalogue's features are public
        user_features=None if ds.user_features is None else ds.user_features[members],  # stay with the partner
        user_feature_names=ds.user_feature_names, user_feature_sizes=ds.user_feature_sizes,
        user_feature_values=ds.user_feature_values,
    )
    tu, ti = cut(split.train_users, split.train_items)
    vu, vi = cut(split.val_users, split.val_items)
    su, si = cut(split.test_users, split.test_items)
    return SplitData(dataset=sub, train_users=tu, train_items=ti, val_users=vu, val_items=vi,
                     test_users=su, test_items=si)
