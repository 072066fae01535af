"""The embedded synthetic dataset: planted communities, topical tastes and a measurable social signal.

Generative story (all steps vectorised numpy, seeded by ``DataConfig.synthetic_seed``):

1. items get a latent topic (``Dataset.item_category``) and a Zipf popularity ``rank^-s``
   (``item_popularity_exponent``), independent of the topic;
2. users belong to one of ``n_communities`` planted communities; each community has a taste profile
   over topics (a sparse Dirichlet draw), each user an individual one (a few favourite topics);
3. out-degrees follow a power law with mean ``friends_per_user``; an edge stays inside the user's
   community with probability ``homophily`` (else it goes to a uniform random user), and half of the
   drawn edges get a reverse edge, so about two thirds of edges are reciprocated (Ciao: 48%);
4. a user's taste is ``homophily`` x community profile + the rest individual, then mixed with
   the friends' mean taste (weight ``taste_smoothing``): individual tastes correlate along edges,
   not only through the community;
5. activity follows a power law with mean ``interactions_per_user``; each draw picks a topic from
   the user's taste and an item of that topic by popularity, except that a share
   ``social_influence`` of the draws of users with friends copies an item a random friend drew
   (social influence / word of mouth). Repeated (user, item) draws are merged.

Tastes are sampled as the mixtures they are (see ``sample_topics``), so memory and time stay
linear in the number of draws. A user's friends' items predict the user's held-out items clearly
better than random users' items or global popularity (``tests/test_synthetic.py`` measures this).
"""

from __future__ import annotations

import numpy as np

from fedsocial.shared.config import DataConfig
from fedsocial.shared.data import Dataset
from fedsocial.shared.loaders import compute_edges, compute_unique

SOCIAL_INFLUENCE = 0.4  # share of draws copied from a friend's draws
TASTE_SMOOTHING = 0.5  # weight of the friends' mean taste in a user's taste
RECIPROCITY = 0.5  # share of edges that are reciprocated
TOPICS_PER_COMMUNITY = 4  # number of item topics (categories) = 4 x n_communities
TOPIC_CONCENTRATION = 0.1  # Dirichlet parameter of community profiles: small -> few topics each
FAVOURITE_TOPICS = 2  # a user's individual taste: uniform over this many random topics
TOP_UP_ROUNDS = 3  # extra draws replacing repeated (user, item) draws, so activity means stay close
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


def sample_neighbours(
    users: np.ndarray, start: np.ndarray, count: np.ndarray, targets: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A uniform out-neighbour of each entry of ``users`` (CSR rows ``start``/``count`` over ``targets``)."""
    return targets[start[users] + (rng.random(users.size) * count[users]).astype(np.int64)]


def sample_topics(
    users: np.ndarray, community: np.ndarray, profile_cum: np.ndarray, favourites: np.ndarray,
    graph: tuple[np.ndarray, np.ndarray, np.ndarray], homophily: float, smoothing: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One topic per draw from user u's taste, sampled as the mixture it is, without a user x topic table:

    taste_u = (1 - smoothing) base_u + smoothing mean_{v friend of u} base_v, and
    base_w = homophily profile[community_w] + (1 - homophily) uniform(favourite topics of w).
    So: pick the source w (u, or a uniform friend w.p. ``smoothing``), then draw from w's
    community profile w.p. ``homophily``, else one of w's favourite topics.
    """
    start, count, targets = graph
    source = users.copy()
    via_friend = (count[users] > 0) & (rng.random(users.size) < smoothing)
    source[via_friend] = sample_neighbours(users[via_friend], start, count, targets, rng)
    topics = favourites[source, rng.integers(0, favourites.shape[1], size=users.size)]
    from_community = rng.random(users.size) < homophily
    topics[from_community] = sample_rows(profile_cum, community[source[from_community]], rng)
    return topics


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
    copy_users: np.ndarray, graph: tuple[np.ndarray, np.ndarray, np.ndarray], own_users: np.ndarray,
    own_items: np.ndarray, n_users: int, rng: np.random.Generator,
) -> np.ndarray:
    """Each copying draw of user u: a uniform out-neighbour v of u, then a uniform one of v's own draws
    (``own_users`` sorted)."""
    friend = sample_neighbours(copy_users, *graph, rng)
    o_count = np.bincount(own_users, minlength=n_users)
    return sample_neighbours(friend, np.cumsum(o_count) - o_count, o_count, own_items, rng)


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

    e_count = np.bincount(src, minlength=n)  # src is sorted: (start, count, dst) is the CSR graph
    graph = (np.cumsum(e_count) - e_count, e_count, dst)
    n_comm = int(community.max()) + 1
    profile_cum = np.cumsum(rng.dirichlet(np.full(n_topics, TOPIC_CONCENTRATION), size=n_comm), axis=1)
    favourites = rng.integers(0, n_topics, size=(n, FAVOURITE_TOPICS))
    activity = compute_power_law_counts(cfg.interactions_per_user, n, rng, minimum=1, cap=max(1, m // 2))
    n_copy = np.where(e_count > 0, rng.binomial(np.maximum(activity - 1, 0), social_influence), 0)

    def draw_own(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        users = np.repeat(np.arange(n, dtype=np.int64), counts)
        topics = sample_topics(users, community, profile_cum, favourites, graph, cfg.homophily,
                               taste_smoothing, rng)
        return users, sample_items(topics, item_topic, popularity, rng)

    own_users, own_items = draw_own(activity - n_copy)  # >= 1 own draw each
    copy_users = np.repeat(np.arange(n, dtype=np.int64), n_copy)
    copy_items = sample_copies(copy_users, graph, own_users, own_items, n, rng)
    all_users, all_items = np.concatenate([own_users, copy_users]), np.concatenate([own_items, copy_items])
    key = compute_unique(all_users * m + all_items)
    for _ in range(TOP_UP_ROUNDS):  # popular items repeat: redraw the shortfall from the user's taste
        deficit = activity - np.bincount(key // m, minlength=n)
        if deficit.sum() <= 0.005 * activity.sum():
            break
        extra_users, extra_items = draw_own(deficit)
        key = compute_unique(np.concatenate([key, extra_users * m + extra_items]))
    return Dataset(
        n_users=n, n_items=m, users=key // m, items=key % m, social_src=src, social_dst=dst,
        item_category=item_topic, name="synthetic",
        extra={"community": community, "item_popularity": popularity},
    )
