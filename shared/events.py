"""User feedback events: parsed, appended durably to a partner's data, and replayed into its training data.

The recommendation loop (DESIGN.md, serving): a served user's events (view, click, purchase, rating;
follow, unfollow) change that user's list at once, and are appended to ``STATE_DIR/events.jsonl``
(one JSON object per line, fsync'd) so that the partner's next federated round trains on them: the
partner's loader calls :func:`compute_split_with_events`, and the ledger charges that round like any
other (the events are part of the users' records). Every interaction type is an implicit positive
(the evaluation protocol's convention); ``rating`` may carry a ``value``, kept but not used.

Ids in events are the partner's *external* ids (the dataset's original user / item ids): an event
whose user is unknown creates the user; an unknown item or neighbour is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.shared.data import BAD_ID_CHAR, MAX_ID_CHARS, Dataset, SplitData

LOG = logging.getLogger("fedsocial.events")
EVENTS_FILE = "events.jsonl"
INTERACTIONS = ("view", "click", "purchase", "rating")
SOCIAL = ("follow", "unfollow")
# local-state entries with one row per user: grown with zero rows when events add users
PER_USER_STATE = ("social_emb.weight", "user_emb.weight", "local_user")
USER_FEATURE_STATE = "user_feat"  # the model's per-user feature codes (a buffer computed from the data)
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]*")  # what str(int) writes: "007", "+7", "-0" are other ids
_MAX_INT_DIGITS = 4000  # below Python's int-from-string limit (4300 digits)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # the loader's integer ids are int64 (shared.loaders._typed_ids)
_BAD_ID_CHAR = BAD_ID_CHAR  # what no id of the data can hold either (the CSV loader refuses them): shared/data.py


class EventError(ValueError):
    """A malformed event; the message names the field (and the line, for a file)."""


@dataclass(frozen=True)
class Event:
    user: int | str
    type: str
    item: int | str | None = None
    neighbour: int | str | None = None
    value: float | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"user": self.user, "type": self.type}
        doc.update({k: v for k, v in (("item", self.item), ("neighbour", self.neighbour), ("value", self.value))
                    if v is not None})
        return doc


def _id(doc: Mapping[str, Any], key: str, where: str) -> int | str:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | str) or (isinstance(value, str) and not value.strip()):
        # blank after the loader's strip of spaces around a field: no data set can hold it as an id
        raise EventError(f"{where}field {key!r}: expected a non-empty string or integer id, got {str(value)[:80]!r}")
    if len(str(value)) > MAX_ID_CHARS:  # a JSON integer too: 4,000 digits are no id either
        raise EventError(f"{where}field {key!r}: an id of {len(str(value))} characters (at most {MAX_ID_CHARS})")
    bad = _BAD_ID_CHAR.search(value) if isinstance(value, str) else None
    if bad is not None:
        raise EventError(f"{where}field {key!r}: an id may not hold the character U+{ord(bad.group()):04X} "
                         "(a control character, line break, invisible format character or lone surrogate)")
    return compute_external_id(value)


def compute_external_id(value: int | str) -> int | str:
    """An id as the service keys it: a canonical integer literal is the integer (URL path ids are strings).

    The rule is the loader's (:func:`shared.loaders._typed_ids`): only ``0|-?[1-9][0-9]*`` (ASCII digits)
    is an integer (``0``, not ``-0``), so ``"007"`` and ``"7"`` stay two ids, a zero-padded id keeps its own
    spelling, and ``"--5"``, ``"²"`` or a 5000-digit string are plain strings, never an error.
    """
    if isinstance(value, str) and len(value) <= _MAX_INT_DIGITS and _CANONICAL_INT.fullmatch(value.strip()):
        number = int(value.strip())
        return number if _INT64_MIN <= number <= _INT64_MAX else value  # the loader keeps wider ids as strings
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _INT64_MAX:
        return str(value)  # a JSON integer beyond int64 names the user the loader keeps as that string
    return value


def parse_event(doc: Any, where: str = "") -> Event:
    """One event from a JSON object; :class:`EventError` names the offending field."""
    if not isinstance(doc, Mapping):
        raise EventError(f"{where}an event must be a JSON object, got {type(doc).__name__}")
    kind = doc.get("type")
    if kind not in INTERACTIONS + SOCIAL:
        raise EventError(f"{where}field 'type': must be one of {', '.join(INTERACTIONS + SOCIAL)}, got {kind!r}")
    allowed = {"user", "type", "item", "value", "time"} if kind in INTERACTIONS else {"user", "type", "neighbour",
                                                                                      "time"}
    extra = sorted(set(doc) - allowed)
    if extra:
        raise EventError(f"{where}unexpected field(s) {extra} for a {kind!r} event")
    user = _id(doc, "user", where)
    if kind in SOCIAL:
        neighbour = _id(doc, "neighbour", where)
        if neighbour == user:
            raise EventError(f"{where}field 'neighbour': a user cannot {kind} themselves")
        return Event(user=user, type=str(kind), neighbour=neighbour)
    value = doc.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not math.isfinite(compute_float_or_inf(value))):
        raise EventError(f"{where}field 'value': expected a finite number, got {str(value)[:80]}")
    return Event(user=user, type=str(kind), item=_id(doc, "item", where),
                 value=None if value is None else float(value))


def compute_float_or_inf(value: int | float) -> float:
    """``float(value)``, or infinity for a JSON integer beyond float's range (a 400-digit value was an
    OverflowError, answered 500 by the service: found by a red team)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


_TAIL_BYTES = 1 << 20  # how far back an append looks for the end of the last complete line


def _parse_tail(tail: bytes) -> Event | None:
    """The event an unterminated last line holds, or None when it holds none (a write cut short)."""
    try:
        return parse_event(json.loads(tail.decode("utf-8")))
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError and EventError are ValueErrors
        return None


def append_events_durably(path: Path, events: Iterable[Event]) -> int:
    """Append events as JSON lines in one write, then fsync (a crash loses none that was acknowledged).

    A last line without its ``\\n`` is a write cut short (a crash, a full disk): it was never acknowledged, as
    the reply follows the fsync of the whole write. It is cut off first, so that the new lines never join it
    (which made the file unreadable and lost the events just acknowledged); one that holds an event (a file
    edited by hand) is ended with ``\\n`` instead. A short write is continued until every byte is written.
    """
    lines = "".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in events)
    if not lines:
        return 0
    data = lines.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = os.fstat(fd).st_size
        end = os.pread(fd, min(size, _TAIL_BYTES), max(0, size - _TAIL_BYTES)) if size else b""
        if end and not end.endswith(b"\n"):
            cut = end.rfind(b"\n") + 1
            if _parse_tail(end[cut:]) is not None or (cut == 0 and size > _TAIL_BYTES):
                data = b"\n" + data
            else:
                os.ftruncate(fd, size - (len(end) - cut))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return lines.count("\n")


def read_events(path: Path) -> list[Event]:
    """All events of ``path`` (none when it does not exist); a bad line is an error naming it.

    An unterminated last line that holds no event is a write cut short, never acknowledged (see
    :func:`append_events_durably`): it is skipped with a warning, so that a partner restarts after a crash."""
    if not path.is_file():
        return []
    out = []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data) and data[cut:].strip() and _parse_tail(data[cut:]) is None:
        LOG.warning("%s:%d: an unterminated last line that holds no event (a write cut short, never acknowledged): "
                    "ignored", path, data.count(b"\n") + 1)
        data = data[:cut]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = data[: exc.start].count(b"\n") + 1
        raise EventError(f"{path}:{line_no}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # lines end at "\n" only (what append_events_durably writes), so line numbers are an editor's
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EventError(f"{path}:{n}: not JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # a 5000-digit integer, nesting deeper than the parser goes
            raise EventError(f"{path}:{n}: not an event ({type(exc).__name__}: {str(exc)[:120]})") from None
        out.append(parse_event(doc, where=f"{path}:{n}: "))
    return out


def compute_external_ids(ds: Dataset) -> list[int | str]:
    """External id of each local user: the original id where the data keeps one, else the index."""
    original = ds.extra.get("original_user_ids", ds.user_ids)
    if original is None:
        return list(range(ds.n_users))
    return [compute_external_id(v.item() if isinstance(v, np.generic) else v) for v in np.asarray(original)]


def compute_item_external_ids(ds: Dataset) -> list[int | str]:
    if ds.item_ids is None:
        return list(range(ds.n_items))
    return [compute_external_id(v.item() if isinstance(v, np.generic) else v) for v in np.asarray(ds.item_ids)]


def compute_split_with_events(split: SplitData, events: list[Event], where: str = "events") -> SplitData:
    """The partner's split with ``events`` replayed in order: interactions join the training data (pairs
    already present anywhere are kept where they are), follows add edges, unfollows remove them, unknown
    users are appended as new local users (with no validation or test data)."""
    if not events:
        return split
    ds = split.dataset
    users = compute_external_ids(ds)
    index = {u: i for i, u in enumerate(users)}
    items = {it: i for i, it in enumerate(compute_item_external_ids(ds))}
    known = set(zip(np.concatenate([split.train_users, split.val_users, split.test_users]).tolist(),
                    np.concatenate([split.train_items, split.val_items, split.test_items]).tolist(), strict=True))
    edges = dict.fromkeys(zip(ds.social_src.tolist(), ds.social_dst.tolist(), strict=True))
    new_pairs: list[tuple[int, int]] = []
    for n, e in enumerate(events, start=1):
        if e.user not in index:
            index[e.user] = len(users)
            users.append(e.user)
        u = index[e.user]
        if e.type in SOCIAL:
            if e.neighbour not in index:
                raise EventError(f"{where} #{n}: unknown neighbour {e.neighbour!r}")
            edge = (u, index[e.neighbour])  # type: ignore[index]
            if e.type == "follow":
                edges[edge] = None
            else:
                edges.pop(edge, None)
            continue
        if e.item not in items:
            raise EventError(f"{where} #{n}: unknown item {e.item!r}")
        pair = (u, items[e.item])  # type: ignore[index]
        if pair not in known:
            known.add(pair)
            new_pairs.append(pair)
    return _rebuilt(split, users, new_pairs, list(edges))


def _rebuilt(split: SplitData, users: list[int | str], new_pairs: list[tuple[int, int]],
             edges: list[tuple[int, int]]) -> SplitData:
    ds = split.dataset
    nu, ni = (np.array([p[k] for p in new_pairs], dtype=np.int64) for k in (0, 1))
    src, dst = (np.array([e[k] for e in edges], dtype=np.int64) for k in (0, 1))
    grown = len(users) - ds.n_users
    user_ids = None if ds.user_ids is None else np.concatenate([ds.user_ids, np.full(grown, -1, dtype=np.int64)])
    feats = ds.user_features
    if feats is not None and grown:  # a new user's features are unknown: code 0 (missing) in every column
        feats = np.concatenate([feats, np.zeros((grown, feats.shape[1]), dtype=feats.dtype)])
    extra = {**ds.extra, "original_user_ids": np.array(users, dtype=object)}
    # every other field (categories, prices, texts, feature names) is the catalogue's or unchanged
    new_ds = dataclasses.replace(ds, n_users=len(users), users=np.concatenate([ds.users, nu]),
                                 items=np.concatenate([ds.items, ni]), social_src=src, social_dst=dst,
                                 user_ids=user_ids, user_features=feats, extra=extra)
    return SplitData(dataset=new_ds, train_users=np.concatenate([split.train_users, nu]),
                     train_items=np.concatenate([split.train_items, ni]), val_users=split.val_users,
                     val_items=split.val_items, test_users=split.test_users, test_items=split.test_items)


def load_split_with_events(split: SplitData, state_dir: Path) -> SplitData:
    """The hook for a partner's loader: its split plus ``STATE_DIR/events.jsonl`` (unchanged when absent)."""
    path = Path(state_dir) / EVENTS_FILE
    return compute_split_with_events(split, read_events(path), where=str(path))


def compute_grown_local_state(state: dict[str, np.ndarray], n_users: int) -> dict[str, np.ndarray]:
    """Local state with per-user tables padded by zero rows up to ``n_users`` (users added by events)."""
    out = dict(state)
    feats = state.get(USER_FEATURE_STATE)
    if feats is not None and feats.shape[0] and feats.shape[0] < n_users:
        del out[USER_FEATURE_STATE]  # derived from the data (users.csv codes): the model rebuilds it for all users
    for name in PER_USER_STATE:
        table = state.get(name)
        if table is not None and table.shape[0] and table.shape[0] < n_users:
            pad = np.zeros((n_users - table.shape[0], *table.shape[1:]), dtype=table.dtype)
            out[name] = np.concatenate([table, pad])
    return out
