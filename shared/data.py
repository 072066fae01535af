"""The one in-memory representation of a social-recommendation dataset, and its split form.

Ids are contiguous integers after cleaning: users ``0..n_users-1``, items ``0..n_items-1``.
Interactions are implicit positives (one row per distinct (user, item) pair); social edges are
directed (u, v): "u follows / trusts v"; undirected datasets list both directions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

MAX_ID_CHARS = 1024  # an id is a key of the partner's data and of its events.jsonl: no 100 KB user ids
# what no id may hold, in the data (shared/loaders.py) and in events (shared/events.py) alike: control characters,
# Unicode line breaks, lone surrogates (not text: they cannot be written as UTF-8), and the invisible format
# characters (zero-width space and joiners, word joiner, a byte-order mark inside a file) that make "1" and "\u200b1"
# two users who look the same; also the soft hyphen, the bidirectional embeddings, overrides and isolates (U+202E
# shows "3" as another id on the operator page), the tag characters, and the noncharacters U+FFFE / U+FFFF (of the
# basic plane and of the planes in use)
BAD_ID_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\xad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufffe\uffff"
                         "\ud800-\udfff\U000e0000-\U000e007f\U0001fffe\U0001ffff\U0002fffe\U0002ffff\U0003fffe"
                         "\U0003ffff\U000efffe\U000effff\U000ffffe\U000fffff\U0010fffe\U0010ffff]")


class DataError(ValueError):
    """Malformed input data; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Dataset:
    n_users: int
    n_items: int
    users: np.ndarray  # int64 [N] user of each interaction
    items: np.ndarray  # int64 [N] item of each interaction
    social_src: np.ndarray  # int64 [E] u in "u follows v"
    social_dst: np.ndarray  # int64 [E] v
    item_category: np.ndarray | None = None  # int64 [n_items] or None
    item_category_names: tuple[str, ...] = ()  # code c's name, where items.csv named its categories (else the codes)
    name: str = ""
    user_ids: np.ndarray | None = None  # original id of each user index (None: identity)
    item_ids: np.ndarray | None = None  # original id of each item index
    extra: dict[str, object] = field(default_factory=dict)
    # optional catalogue features (items.csv; public, like the catalogue) and user features (users.csv;
    # part of a user's record, so they stay on the user's partner)
    item_price_bin: np.ndarray | None = None  # int64 [n_items] price bin code (the last code: no price)
    item_text: np.ndarray | None = None  # float32 [n_items, text_dim] offline text features (zeros: no text)
    user_features: np.ndarray | None = None  # int64 [n_users, F] categorical codes (0: missing)
    user_feature_names: tuple[str, ...] = ()
    user_feature_sizes: tuple[int, ...] = ()  # codes per column, 0 (missing) included: the same for every partner
    user_feature_values: tuple[tuple[str, ...], ...] = ()  # per column, the value of codes 1, 2, ... (the schema)

    @property
    def n_interactions(self) -> int:
        return int(self.users.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.social_src.shape[0])


@dataclass(frozen=True)
class SplitData:
    """A dataset with each user's interactions split into train / val / test (8:1:1 by default)."""

    dataset: Dataset
    train_users: np.ndarray
    train_items: np.ndarray
    val_users: np.ndarray
    val_items: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray

    @property
    def n_users(self) -> int:
        return self.dataset.n_users

    @property
    def n_items(self) -> int:
        return self.dataset.n_items
