"""The embedded synthetic dataset: planted communities, topical tastes and a measurable social signal.

Generative story (all steps vectorised numpy, seeded by ``DataConfig.synthetic_seed``):

1. items get a latent topic (``Dataset.item_category``) and a Zipf popularity ``rank^-s``
   (``item_popularity_exponent``), independent of the topic;
2. users belong to one of ``n_communities`` planted communities; each community has a taste profile
   over topics (a sparse Dirichlet draw), each user an individual one;
3. out-degrees follow a power law with mean ``friends_per_user``; an edge stays inside the user's
   community with probability ``homophily`` (else it goes to a uniform random user), and half of the
   edges are reciprocated, as in trust networks (about 48% of Ciao's trust edges are);
4. a user's taste is ``homophily`` x community profile + the rest individual, then mixed with
   the friends' mean taste (weight ``taste_smoothing``): individual tastes correlate along edges,
   not only through the community;
5. activity follows a power law with mean ``interactions_per_user``; each draw picks a topic from
   the user's taste and an item of that topic by popularity, except that a share
   ``social_influence`` of the draws of users with friends copies an item a random friend drew
   (social influence / word of mouth). Repeated (user, item) draws are merged.

So a user's friends' items predict the user's held-out items clearly better than random users'
items or global popularity (``tests/test_synthetic.py`` measures this).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from shared.config import DataConfig
from shared.data import Dataset
from shared.loaders import compute_edges, compute_unique

SOCIAL_INFLUENCE = 0.4  # share of draws copied from a friend's draws
TASTE_SMOOTHING = 0.5  # weight of the friends' mean taste in a user's taste
RECIPROCITY = 0.5  # share of edges that are reciprocated
TOPICS_PER_COMMUNITY = 4  # number of item topics (categories) = 4 x n_communities
TOPIC_CONCENTRATION = 0.1  # Dirichlet parameter of taste profiles: small -> few topics per profile
TOP_UP_ROUNDS = 2  # extra draws replacing repeated (user, item) draws, so activity means stay close
POWER_LAW_SHAPE = 2.0  # Pareto shape of activity and out-degree (mean finite, variance infinite)


def compute_power_law_counts(
    mean: float, size: int, rng: np.random.Generator, *, minimum: int, cap: int
) -> np.ndarray:
    """Integer counts with a Pareto tail (shape ``POWER_LAW_SHAPE``), mean about ``mean``, in [min, cap]."""
    raw = rng.pareto(POWER_LAW_SHAPE, size) + 1.0  # Pareto with x_min 1: mean shape / (shape - 1)
    scale = mean * (POWER_LAW_SHAPE - 1.0) / POWER_LAW_SHAPE
    return np.clip(np.round(raw * scale), minimum, max(minimum, cap)).astype(np.int64)


def compute_social_graph(
    community: np.ndarray, out_degree: np.ndarray, homophily: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges: each of u's ``out_degree[u]`` edges targets u's community w.p. ``homophily``."""
    n = community.size
    src = np.repeat(np.arange(n, dtype=np.int64), out_degree)
    members = np.argsort(community, kind="stable")
    sizes = np.bincount(community, minlength=int(community.max()) + 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    c = community[src]
    inside = members[starts[c] + (rng.random(src.size) * sizes[c]).astype(np.int64)]
    outside = rng.integers(0, n, size=src.size)
    dst = np.where(rng.random(src.size) < homophily, inside, outside)
    back = rng.random(src.size) < RECIPROCITY
    return np.concatenate([src, dst[back]]), np.concatenate([dst, src[back]])


def compute_tastes(
    community: np.ndarray, n_topics: int, homophily: float, src: np.ndarray, dst: np.ndarray,
    rng: np.random.Generator, smoothing: float = TASTE_SMOOTHING,
) -> np.ndarray:
    """Row-stochastic user x topic tastes: community profile + individual taste, mixed with friends'."""
    n = community.size
    n_comm = int(community.max()) + 1
    profile = rng.dirichlet(np.full(n_topics, TOPIC_CONCENTRATION), size=n_comm)
    own = rng.dirichlet(np.full(n_topics, TOPIC_CONCENTRATION), size=n)
    base = homophily * profile[community] + (1.0 - homophily) * own
    adj = sp.csr_matrix((np.ones(src.size), (src, dst)), shape=(n, n))
    degree = np.asarray(adj.sum(axis=1)).ravel()
    friends = adj @ base
    has = degree > 0
    taste = base.copy()
    taste[has] = (1.0 - smoothing) * base[has] + smoothing * friends[has] / degree[has, None]
    return taste / taste.sum(axis=1, keepdims=True)


def sample_rows(weights_cum: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per entry of ``rows`` from row ``rows[k]`` of a row-cumsum matrix.

    Offsetting row r's cumulative sums by r makes one flat increasing array, so a single
    ``searchsorted`` samples from millions of different distributions at once.
    """
    n_rows, width = weights_cum.shape
    flat = (weights_cum / weights_cum[:, -1:] + np.arange(n_rows)[:, None]).ravel()
    idx = np.searchsorted(flat, rows + rng.random(rows.size), side="right")
    return np.clip(idx - rows * width, 0, width - 1)


def sample_items(
    topics: np.ndarray, item_topic: np.ndarray, popularity: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each drawn topic, an item of that topic with probability proportional to its popularity."""
    order = np.argsort(item_topic, kind="stable")
    cum = np.cumsum(popularity[order])
    counts = np.bincount(item_topic, minlength=int(item_topic.max()) + 1)
    last = np.cumsum(counts) - 1
    first = last - counts + 1
    lo = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0.0)
    x = lo[topics] + rng.random(topics.size) * (cum[last] - lo)[topics]
    idx = np.clip(np.searchsorted(cum, x, side="right"), first[topics], last[topics])
    return order[idx]


def sample_copies(
    copy_users: np.ndarray, src: np.ndarray, dst: np.ndarray, own_users: np.ndarray, own_items: np.ndarray,
    n_users: int, rng: np.random.Generator,
) -> np.ndarray:
    """Each copying draw of user u: a uniform out-neighbour v of u, then a uniform one of v's own draws."""
    e_order = np.argsort(src, kind="stable")
    e_count = np.bincount(src, minlength=n_users)
    e_start = np.cumsum(e_count) - e_count
    pick = e_start[copy_users] + (rng.random(copy_users.size) * e_count[copy_users]).astype(np.int64)
    friend = dst[e_order[pick]]
    o_order = np.argsort(own_users, kind="stable")
    o_count = np.bincount(own_users, minlength=n_users)
    o_start = np.cumsum(o_count) - o_count
    take = o_start[friend] + (rng.random(friend.size) * o_count[friend]).astype(np.int64)
    return own_items[o_order[take]]


def generate(
    cfg: DataConfig, *, social_influence: float = SOCIAL_INFLUENCE, taste_smoothing: float = TASTE_SMOOTHING
) -> Dataset:
    """Generate the synthetic dataset described in the module docstring (deterministic in the seed).

    ``social_influence`` and ``taste_smoothing`` (both in [0, 1]) set the strength of the two
    item-level social mechanisms; with them and ``cfg.homophily`` at 0 friends are random users.
    """
    rng = np.random.default_rng(cfg.synthetic_seed)
    n, m = cfg.n_users, cfg.n_items
    n_topics = min(m, max(2, TOPICS_PER_COMMUNITY * cfg.n_communities))
    item_topic = rng.permutation(np.arange(m, dtype=np.int64) % n_topics)
    popularity = (1.0 + rng.permutation(m)) ** -cfg.item_popularity_exponent
    community = rng.choice(cfg.n_communities, size=n, p=rng.dirichlet(np.full(cfg.n_communities, 5.0)))

    out_degree = np.zeros(n, dtype=np.int64)
    if cfg.friends_per_user > 0:  # reciprocation adds RECIPROCITY edges per drawn edge
        mean = cfg.friends_per_user / (1.0 + RECIPROCITY)
        out_degree = compute_power_law_counts(mean, n, rng, minimum=0 if mean < 1 else 1, cap=n - 1)
    raw_src, raw_dst = compute_social_graph(community, out_degree, cfg.homophily, rng)
    src, dst = compute_edges(raw_src, raw_dst, n, undirected=False)

    taste = compute_tastes(community, n_topics, cfg.homophily, src, dst, rng, taste_smoothing)
    activity = compute_power_law_counts(cfg.interactions_per_user, n, rng, minimum=1, cap=max(1, m // 2))
    has_friends = np.bincount(src, minlength=n) > 0
    n_copy = np.where(has_friends, rng.binomial(np.maximum(activity - 1, 0), social_influence), 0)
    taste_cum = np.cumsum(taste, axis=1)

    def draw_own(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        users = np.repeat(np.arange(n, dtype=np.int64), counts)
        return users, sample_items(sample_rows(taste_cum, users, rng), item_topic, popularity, rng)

    own_users, own_items = draw_own(activity - n_copy)  # >= 1 own draw each
    copy_users = np.repeat(np.arange(n, dtype=np.int64), n_copy)
    copy_items = sample_copies(copy_users, src, dst, own_users, own_items, n, rng)
    all_users, all_items = np.concatenate([own_users, copy_users]), np.concatenate([own_items, copy_items])
    key = compute_unique(all_users * m + all_items)
    for _ in range(TOP_UP_ROUNDS):  # popular items repeat: redraw the shortfall from the user's taste
        deficit = activity - np.bincount(key // m, minlength=n)
        if not deficit.any():
            break
        extra_users, extra_items = draw_own(deficit)
        key = compute_unique(np.concatenate([key, extra_users * m + extra_items]))
    return Dataset(
        n_users=n, n_items=m, users=key // m, items=key % m, social_src=src, social_dst=dst,
        item_category=item_topic, name="synthetic",
        extra={"community": community, "item_popularity": popularity},
    )
