"""Dataset loaders: one reader per on-disk format, one pure cleaning step, one dispatcher.

Cleaning follows the evaluation protocol of DESIGN.md (RecBole-GNN / SocialLGN conventions):
every observed interaction is an implicit positive whatever its rating, repeated (user, item) rows
are merged, ids are re-indexed contiguously (originals kept in ``Dataset.user_ids`` /
``item_ids``), social self-loops are dropped, social edges are restricted to users that have
interactions, and undirected graphs (LastFM, Douban) are listed in both directions once.

Errors in the files raise :class:`shared.data.DataError` whose message names the file, the line
and the problem. Rules common to every loader (README, "Data rules"):

- a social edge whose user or neighbour has no interactions is dropped, and one notice on the
  ``fedsocial.data`` logger counts them and names their first lines; with ``data.strict = true``
  the load is refused instead, listing every such line;
- lines are separated by ``\n`` (or ``\r\n``) only: a Unicode line or paragraph separator, a
  form feed or another control separator inside a row is refused with its line, so that line
  numbers are the ones an editor shows and a row is never silently split in two.

The generic CSV format also refuses, with file:line, a row with the wrong number of fields, a
repeated header line, a separator other than the comma inside an id (a stray ``;``, tab or ``|``),
and an interaction with an item missing from ``items.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.shared.config import DataConfig, resolve_data_path
from fedsocial.shared.data import BAD_ID_CHAR, MAX_ID_CHARS, DataError, Dataset
from fedsocial.shared.features import cached_text_features, compute_codes, compute_price_bins

PathLike = str | os.PathLike[str]
LOG = logging.getLogger("fedsocial.data")

_INT_RE = re.compile(r"^[+-]?\d+$")

INTERACTION_COLUMNS = ("user", "item", "value", "timestamp")
SOCIAL_COLUMNS = ("user", "neighbour")
ITEM_COLUMNS = ("item",)
ITEM_OPTIONAL = ("category", "title", "text", "price")


# ----------------------------------------------------------------------------------------------
# cleaning (pure)
# ----------------------------------------------------------------------------------------------


def compute_unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array.

    ``np.unique`` in numpy >= 2.3 hashes without ``return_inverse`` and is about 70x slower than
    a sort on millions of int64 keys (9.5 s vs 0.13 s for 5M keys here).
    """
    out = np.sort(np.asarray(keys, dtype=np.int64))
    if out.size == 0:
        return out
    keep = np.empty(out.size, dtype=bool)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]


def compute_item_category(items: np.ndarray, categories: np.ndarray, n_items: int) -> np.ndarray:
    """Each item's most frequent category among its rows (ties: the smallest category code).

    Ciao lists 105 items under two categories; one label per item keeps partitions well defined.
    """
    categories = np.asarray(categories, dtype=np.int64)
    lo = int(categories.min(initial=0))
    width = int(categories.max(initial=0)) - lo + 1
    key = np.sort(np.asarray(items, dtype=np.int64) * width + (categories - lo))
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    pair, counts = key[starts], np.diff(np.append(starts, key.size))
    item, cat = pair // width, pair % width + lo
    order = np.lexsort((cat, -counts, item))  # per item: most frequent first, then smallest code
    first = np.concatenate([[True], item[order[1:]] != item[order[:-1]]])
    out = np.full(n_items, -1, dtype=np.int64)
    out[item[order[first]]] = cat[order[first]]
    return out


def compute_edges(
    src: np.ndarray, dst: np.ndarray, n_users: int, undirected: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Drop self-loops, add reverse edges when ``undirected``, deduplicate; sorted by (src, dst)."""
    keep = src != dst
    src, dst = src[keep], dst[keep]
    if undirected:
        src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    key = compute_unique(src.astype(np.int64) * n_users + dst)
    return key // n_users, key % n_users


def clean(
    users: np.ndarray,
    items: np.ndarray,
    social_src: np.ndarray,
    social_dst: np.ndarray,
    *,
    undirected: bool,
    name: str,
    categories: np.ndarray | None = None,
    item_catalogue: tuple[np.ndarray, np.ndarray] | None = None,
) -> Dataset:
    """Build a cleaned :class:`Dataset` from raw id arrays (ints or strings).

    ``categories`` (optional) is one category code per interaction row, as in Ciao's rating file.
    ``item_catalogue`` (optional) is (item ids, category code of each): the whole catalogue,
    including items without interactions; it must contain every item of ``items``.
    Users and items are indexed in sorted order of their original ids; social edges whose ends
    have no interaction are dropped.
    """
    user_ids, u = np.unique(users, return_inverse=True)
    if item_catalogue is None:
        item_ids, i = np.unique(items, return_inverse=True)
    else:
        item_ids, first = np.unique(item_catalogue[0], return_index=True)
        i = np.searchsorted(item_ids, items)
    n_users, n_items = int(user_ids.size), int(item_ids.size)
    key = compute_unique(u.astype(np.int64) * n_items + i)  # merges duplicates, sorts by (user, item)
    src_idx, src_ok = _lookup(user_ids, np.asarray(social_src))
    dst_idx, dst_ok = _lookup(user_ids, np.asarray(social_dst))
    ok = src_ok & dst_ok
    src, dst = compute_edges(src_idx[ok], dst_idx[ok], n_users, undirected)
    item_category = None if categories is None else compute_item_category(i, np.asarray(categories), n_items)
    if item_catalogue is not None:
        item_category = np.asarray(item_catalogue[1], dtype=np.int64)[first]
    return Dataset(
        n_users=n_users, n_items=n_items, users=key // n_items, items=key % n_items,
        social_src=src, social_dst=dst, item_category=item_category, name=name,
        user_ids=user_ids, item_ids=item_ids,
    )


def _lookup(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each query id in ``sorted_ids`` and whether it is there."""
    if query.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    pos = np.searchsorted(sorted_ids, query)
    pos_c = np.minimum(pos, sorted_ids.size - 1)
    return pos_c.astype(np.int64), sorted_ids[pos_c] == query


# ----------------------------------------------------------------------------------------------
# rules every loader shares
# ----------------------------------------------------------------------------------------------

# What str.splitlines() would also break a line at: refused inside a row (a numeric table treats
# vertical tab and form feed as whitespace, as the research releases' readers do).
_ROW_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_ROW_BREAKS_NUMERIC = re.compile("[\x1c\x1d\x1e\x85\u2028\u2029]")
_SHOWN_LINES = 10


def split_lines(path: Path, text: str, *, numeric: bool = False) -> list[str]:
    """The lines of ``text`` split at ``\n`` / ``\r\n`` only (or ``\r`` in a file that has no ``\n``).

    A Unicode line separator or another control separator inside a row is refused with its line.
    """
    nul = text.find("\x00")
    if nul >= 0:  # numpy's text arrays drop trailing NULs: "0\x00" would silently become the id "0"
        raise DataError(f"{path}:{text.count(chr(10), 0, nul) + 1}: a NUL character (U+0000): binary data, not "
                        "text")
    found = (_ROW_BREAKS_NUMERIC if numeric else _ROW_BREAKS).search(text)
    if found is not None:
        line = text.count("\n", 0, found.start()) + 1
        raise DataError(f"{path}:{line}: line separator U+{ord(found.group()):04X} inside a row "
                        "(only \\n or \\r\\n may end a line)")
    text = text.replace("\r\n", "\n")
    if "\r" in text:
        if "\n" not in text:
            text = text.replace("\r", "\n")  # a file with old Mac line endings
        else:
            line = text.count("\n", 0, text.index("\r")) + 1
            raise DataError(f"{path}:{line}: a carriage return inside a row")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def compute_unknown_edges(known_users: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Boolean mask of the social rows whose user or neighbour is not in ``known_users``."""
    known = np.asarray(known_users)
    return ~(np.isin(src, known) & np.isin(dst, known))


def apply_edge_rule(path: Path, line_no: np.ndarray, unknown: np.ndarray, strict: bool) -> np.ndarray:
    """The documented rule for social rows naming a user without interactions: drop them with one
    notice that counts them (default), or refuse the load listing every line (``strict``).
    Returns the mask of rows to keep."""
    n = int(unknown.sum())
    if n == 0:
        return ~unknown
    lines = line_no[unknown].tolist()
    if strict:
        raise DataError(f"{path}: {n} social row(s) name a user with no interactions (data.strict = true); "
                        f"lines: {', '.join(map(str, lines))}")
    shown = ", ".join(map(str, lines[:_SHOWN_LINES])) + (", ..." if n > _SHOWN_LINES else "")
    LOG.warning("%s: dropped %d social edge(s) naming a user with no interactions (%s %s); "
                "data.strict = true refuses them instead", path, n, "line" if n == 1 else "lines", shown)
    return ~unknown


# ----------------------------------------------------------------------------------------------
# whitespace-separated numeric files (the research releases)
# ----------------------------------------------------------------------------------------------


def read_numeric_table(path: Path, n_cols: int, *, header: bool = False) -> np.ndarray:
    """Read a whitespace-separated numeric file into a float64 array [rows, n_cols]."""
    return read_numeric_rows(path, n_cols, header=header)[0]


def read_numeric_rows(path: Path, n_cols: int, *, header: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a whitespace-separated numeric file: (float64 array [rows, n_cols], 1-based line of each row).

    Fast path: one ``np.fromstring`` over the whole text (about 0.2 s for Ciao's 284k rows);
    only when a check fails is the file re-scanned line by line to name the first bad line.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    lines = split_lines(path, text, numeric=True)
    first = 1 if header else 0
    if header and lines and _is_numeric_line(lines[0]):
        first = 0  # tolerate a release without its header line
    body = lines[first:]
    if not any(line.strip() for line in body):
        raise DataError(f"{path}: empty file (no data rows)")
    widths = compute_line_widths("\n".join(body), len(body))
    bad = np.flatnonzero((widths != n_cols) & (widths != 0))
    if bad.size:
        k = int(bad[0])
        raise DataError(f"{path}:{k + first + 1}: expected {n_cols} whitespace-separated columns, "
                        f"found {widths[k]}: {body[k][:80]!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring("\n".join(body), sep=" ")
        except (ValueError, DeprecationWarning):
            values = np.zeros(0)
    if values.size != int(widths.sum()) or not np.isfinite(values).all():
        _raise_first_non_numeric(path, body, first)
    return values.reshape(-1, n_cols), np.flatnonzero(widths != 0).astype(np.int64) + first + 1


def compute_line_widths(text: str, n_lines: int) -> np.ndarray:
    """Number of whitespace-separated fields on each of the ``n_lines`` lines of ``text`` (vectorised:
    a Python loop over Ciao's lines costs about a second)."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    newline = raw == 10
    space = newline | (raw == 32) | (raw == 9) | (raw == 13) | (raw == 11) | (raw == 12)
    starts = ~space
    starts[1:] &= space[:-1]  # a field starts at a non-space after a space (or at the beginning)
    line = np.cumsum(newline) - newline  # line number of every byte
    return np.bincount(line[starts], minlength=n_lines)[:n_lines]


def _is_numeric_line(line: str) -> bool:
    try:
        [float(tok) for tok in line.split()]
    except ValueError:
        return False
    return bool(line.split())


def _raise_first_non_numeric(path: Path, body: Sequence[str], first: int) -> None:
    for k, line in enumerate(body):
        for col, tok in enumerate(line.split(), start=1):
            try:
                ok = np.isfinite(float(tok))
            except ValueError:
                ok = False
            if not ok:
                raise DataError(f"{path}:{k + first + 1}: column {col} is not a finite number: {tok!r}")
    raise DataError(f"{path}: could not parse the file as numbers")  # pragma: no cover


def _int_column(table: np.ndarray, col: int, path: Path, what: str) -> np.ndarray:
    values = table[:, col]
    whole = values == np.round(values)
    if not whole.all():
        k = int(np.flatnonzero(~whole)[0])
        raise DataError(f"{path}: data row {k + 1}: {what} must be an integer id, got {values[k]!r}")
    return values.astype(np.int64)


def _social_pair(path: Path, n_cols: int, src: str, dst: str, users: np.ndarray, header: bool,
                 strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """A whitespace social table's (user, neighbour) columns after the shared edge rule."""
    table, line_no = read_numeric_rows(path, n_cols, header=header)
    s, d = _int_column(table, 0, path, src), _int_column(table, 1, path, dst)
    keep = apply_edge_rule(path, line_no, compute_unknown_edges(compute_unique(users), s, d), strict)
    return s[keep], d[keep]


def _load_pair(rating: tuple[Path, int, str, str], social: tuple[Path, int, str, str], *, header: bool,
               undirected: bool, name: str, strict: bool) -> Dataset:
    """Two whitespace tables whose first two columns are (user, item) and (user, neighbour)."""
    (r_path, r_cols, r_user, r_item), (s_path, s_cols, s_src, s_dst) = rating, social
    r = read_numeric_table(r_path, r_cols, header=header)
    users = _int_column(r, 0, r_path, r_user)
    src, dst = _social_pair(s_path, s_cols, s_src, s_dst, users, header, strict)
    return clean(users, _int_column(r, 1, r_path, r_item), src, dst, undirected=undirected, name=name)


def load_lastfm(folder: PathLike, *, strict: bool = False) -> Dataset:
    """HetRec 2011 LastFM: ``user_artists.dat`` (play counts, binarised) and ``user_friends.dat``."""
    folder = Path(folder)
    return _load_pair((folder / "user_artists.dat", 3, "userID", "artistID"),
                      (folder / "user_friends.dat", 2, "userID", "friendID"),
                      header=True, undirected=True, name="lastfm", strict=strict)


def load_filmtrust(folder: PathLike, *, strict: bool = False) -> Dataset:
    """FilmTrust: ``ratings.txt`` (user item rating) and directed ``trust.txt`` (truster trustee 1)."""
    folder = Path(folder)
    return _load_pair((folder / "ratings.txt", 3, "user", "item"), (folder / "trust.txt", 3, "truster", "trustee"),
                      header=False, undirected=False, name="filmtrust", strict=strict)


def load_douban(folder: PathLike, *, strict: bool = False) -> Dataset:
    """Douban (Monti et al. 2017): ``derived/ratings.tsv`` and the symmetric
    ``derived/social_W_users_nonzeros.tsv``.

    Both original train and test rows are used; the project makes its own per-user split.
    """
    folder = Path(folder) / "derived"
    return _load_pair((folder / "ratings.tsv", 4, "user", "item"),
                      (folder / "social_W_users_nonzeros.tsv", 2, "i", "j"),
                      header=False, undirected=True, name="douban", strict=strict)


def load_ciao(folder: PathLike, *, strict: bool = False) -> Dataset:
    """Ciao (Tang et al. 2012): ``derived/rating.tsv`` (user item category rating helpfulness) and
    directed ``derived/trustnetwork.tsv``; the category column becomes ``Dataset.item_category``."""
    folder = Path(folder) / "derived"
    r_path, t_path = folder / "rating.tsv", folder / "trustnetwork.tsv"
    r = read_numeric_table(r_path, 5)
    users = _int_column(r, 0, r_path, "user")
    src, dst = _social_pair(t_path, 2, "truster", "trustee", users, False, strict)
    return clean(users, _int_column(r, 1, r_path, "item"), src, dst,
                 undirected=False, name="ciao", categories=_int_column(r, 2, r_path, "category"))


# ----------------------------------------------------------------------------------------------
# the generic CSV format
# ----------------------------------------------------------------------------------------------

_DELIMITERS = ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"))


@dataclass(frozen=True)
class CsvTable:
    """A validated comma-separated file held by column (stripped strings) with each row's line number.

    Id columns are numpy string arrays; another column may be an object array of str (:func:`_text_column`)."""

    path: Path
    header: list[str]
    columns: dict[str, np.ndarray]
    line_no: np.ndarray  # int64, 1-based line of each row

    def where(self, bad: np.ndarray) -> int:
        """Line number of the first row flagged in the boolean array ``bad``."""
        return int(self.line_no[int(np.argmax(bad))])


def _decode(path: Path) -> str:
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    try:  # utf-8-sig: spreadsheet exports often start with a byte-order mark
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# the names public data sets give the generic format's columns (MovieLens userId/movieId/rating, LastFM
# weight, Epinions-style truster/trustee, ...), read as the canonical ones; only where the canonical name is one
# of the file's columns, and a file that names a column twice (user and userId) is refused as repeated
COLUMN_ALIASES = {
    "userid": "user", "user_id": "user", "uid": "user", "truster": "user", "follower": "user",
    "itemid": "item", "item_id": "item", "iid": "item", "movieid": "item", "movie_id": "item", "productid": "item",
    "product_id": "item", "artistid": "item", "artist_id": "item", "bookid": "item", "book_id": "item",
    "rating": "value", "score": "value", "weight": "value", "count": "value",
    "time": "timestamp", "ts": "timestamp",
    "neighbor": "neighbour", "friend": "neighbour", "friendid": "neighbour", "friend_id": "neighbour",
    "trustee": "neighbour", "followee": "neighbour",
    "genre": "category", "name": "title", "description": "text",
}


def compute_canonical_header(names: Sequence[str], known: Sequence[str]) -> list[str]:
    """Header names lower-cased and stripped, each alias of a ``known`` column (:data:`COLUMN_ALIASES`) read as it."""
    out = []
    for name in names:
        low = name.strip().lower()
        alias = COLUMN_ALIASES.get(low)
        out.append(alias if alias is not None and alias in known else low)
    return out


def _parse_header(
    path: Path, line_no: int, line: str, required: Sequence[str], optional: Sequence[str],
    any_columns: bool = False,
) -> list[str]:
    expected = ",".join([*required, *(f"[{c}]" for c in optional)])
    if "," not in line and len(required) > 1:
        for delim, label in _DELIMITERS:
            if delim in line:
                raise DataError(f"{path}:{line_no}: fields are separated by {label}s; "
                                f"this format needs commas (header {expected})")
    try:  # the rules of the rows: spaces around a field are ignored, a quoted field must be well formed
        names = next(csv.reader([line], strict=True, skipinitialspace=True))
    except csv.Error as exc:
        raise DataError(f"{path}:{line_no}: malformed quoting in the header ({exc}); expected header "
                        f"{expected}") from None
    header = compute_canonical_header(names, (*required, *optional))
    for col in header:
        if col not in (*required, *optional) and (not any_columns or not col or _INT_RE.match(col)):
            hint = " (missing header line?)" if _INT_RE.match(col) or not col else ""
            raise DataError(f"{path}:{line_no}: unknown column {col!r}{hint}; expected header {expected}")
    for col in required:
        if col not in header:
            raise DataError(f"{path}:{line_no}: missing column {col!r}; expected header {expected}")
    if len(set(header)) != len(header):
        raise DataError(f"{path}:{line_no}: repeated column in header {line!r}")
    return header


def _field_count_error(path: Path, line_no: int, line: str, header: list[str], found: int) -> DataError:
    why = next((f"; it looks {label}-separated, this format needs commas"
                for d, label in _DELIMITERS if d in line), "")
    expected = f"{len(header)} fields ({','.join(header)})"
    return DataError(f"{path}:{line_no}: expected {expected}, found {found}{why}")


def read_csv_table(path: Path, required: Sequence[str], optional: Sequence[str] = (),
                   any_columns: bool = False) -> CsvTable:
    """Read and check a comma-separated file with a header naming its columns (any order).

    Files without quotes (the usual case) are split with vectorised numpy field counting; files
    with quoted fields go through the csv module. Either way each row keeps its line number.

    The ``required`` columns are the file's ids: their length is checked (at most :data:`MAX_ID_CHARS`) on the
    fields as read, before any fixed-width array is built, and they are held as numpy string arrays. Every other
    column is a fixed-width string array only where that costs about what its text does; else an object array of
    str (one 400 KB description would have made every row of a fixed-width column 1.6 MB wide).
    """
    path = Path(path)
    lines = split_lines(path, _decode(path))
    head = next((k for k, line in enumerate(lines) if line.strip()), None)
    if head is None:
        raise DataError(f"{path}: empty file (expected a header line {','.join(required)})")
    header = _parse_header(path, head + 1, lines[head], required, optional, any_columns)
    body = lines[head + 1:]
    first_line = head + 2
    fields: list[list[str]]  # by column
    if any('"' in line for line in body):
        rows, numbers = [], []
        # strict: an unbalanced quote is an error, not a field that silently swallows the rest of the file;
        # each line keeps its "\n", so a quoted field may span lines (a record's line is where it starts)
        reader = csv.reader((line + "\n" for line in body), strict=True, skipinitialspace=True)
        consumed = 0  # lines of body the reader has read
        # the csv module's field limit (128 Ki characters) would call a long quoted description "malformed"; the
        # text is in memory already, so a field may be as long as the file
        limit = csv.field_size_limit(max(csv.field_size_limit(), sum(map(len, body)) + len(body)))
        try:
            while True:
                k = consumed  # the next record starts on body line k
                try:
                    row = next(reader, None)
                except csv.Error as exc:
                    raise DataError(f"{path}:{k + first_line}: malformed quoting ({exc}): a quoted field must end "
                                    "with a quote followed by a comma or the line end, a quote inside it "
                                    "doubled") from None
                if row is None:
                    break
                consumed = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != len(header):
                    raise _field_count_error(path, k + first_line, body[k], header, len(row))
                rows.append(row)
                numbers.append(k + first_line)
        finally:
            csv.field_size_limit(limit)
        fields = [[v.strip() for v in col] for col in zip(*rows, strict=True)] if rows else [[] for _ in header]
        line_no = np.array(numbers, dtype=np.int64)
    else:
        commas, blank = compute_line_commas("\n".join(body), len(body))
        bad = ~blank & (commas != len(header) - 1)
        if bad.any():
            k = int(np.argmax(bad))
            raise _field_count_error(path, k + first_line, body[k], header, int(commas[k]) + 1)
        keep = np.flatnonzero(~blank)
        text = ",".join([body[k] for k in keep.tolist()])
        flat = text.split(",") if keep.size else []
        if not text.isascii() or any(space in text for space in _ASCII_SPACES):
            flat = [v.strip() for v in flat]  # some field may have spaces around it
        fields = [flat[c::len(header)] for c in range(len(header))]
        line_no = keep.astype(np.int64) + first_line
    for c, name in enumerate(header):
        if name in required:
            _check_id_lengths(path, name, fields[c], line_no)
    columns = {name: np.array(fields[c], dtype=str) if name in required else _text_column(fields[c])
               for c, name in enumerate(header)}
    _refuse_repeated_header(path, head + 1, header, columns, line_no, (*required, *optional))
    return CsvTable(path, header, columns, line_no)


_ASCII_SPACES = " \t\x0b\x0c\r\x1c\x1d\x1e\x1f"  # what str.strip() removes among ASCII characters


def _check_id_lengths(path: Path, name: str, values: list[str], line_no: np.ndarray) -> None:
    """Refuse an id longer than :data:`MAX_ID_CHARS`, with its line, before the column becomes a fixed-width array."""
    if values and max(map(len, values)) > MAX_ID_CHARS:
        k = next(k for k, v in enumerate(values) if len(v) > MAX_ID_CHARS)
        raise DataError(f"{path}:{line_no[k]}: a {name} id of {len(values[k])} characters (at most {MAX_ID_CHARS})")


def _text_column(values: list[str]) -> np.ndarray:
    """``values`` as a fixed-width string array when its width costs at most about twice their text, else as an
    object array of str: memory stays proportional to the file, however long one field is."""
    longest = max(map(len, values), default=0)
    if longest * len(values) <= 2 * sum(map(len, values)) + 65_536:
        return np.array(values, dtype=str)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _refuse_repeated_header(path: Path, header_line: int, header: list[str], columns: dict[str, np.ndarray],
                            line_no: np.ndarray, known: Sequence[str]) -> None:
    """Refuse a row that reads as the header (in any spelling the header may use: case, aliases), with its line."""
    if line_no.size == 0:
        return
    lead = header[0]
    spellings = {lead, *(alias for alias, canonical in COLUMN_ALIASES.items() if canonical == lead and lead in known)}
    col = columns[lead]
    if col.dtype.kind == "U":
        candidates = np.flatnonzero(np.isin(np.char.lower(col), sorted(spellings))).tolist()
    else:
        candidates = [k for k, v in enumerate(col.tolist()) if v.lower() in spellings]
    for k in candidates:
        if compute_canonical_header([str(columns[name][k]) for name in header], known) == header:
            raise DataError(f"{path}:{int(line_no[k])}: the header line is repeated (first on line {header_line}); "
                            "concatenated files keep one header")


def compute_line_commas(text: str, n_lines: int) -> tuple[np.ndarray, np.ndarray]:
    """Commas on each line of ``text``, and whether the line is blank (vectorised over bytes)."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    newline = raw == 10
    line = np.cumsum(newline) - newline
    space = newline | (raw == 32) | (raw == 9) | (raw == 13)
    commas = np.bincount(line[raw == 44], minlength=n_lines)[:n_lines]
    return commas, np.bincount(line[~space], minlength=n_lines)[:n_lines] == 0


def _check_ids(table: CsvTable, names: Sequence[str]) -> None:
    """Ids are non-empty, at most :data:`MAX_ID_CHARS` long, hold no character events could not name
    (:data:`BAD_ID_CHAR`: control and invisible format characters) and no other field separator (a stray ``;``,
    tab or ``|`` in a comma file)."""
    for name in names:
        col = table.columns[name]
        empty = col == ""
        if empty.any():
            raise DataError(f"{table.path}:{table.where(empty)}: empty {name} id")
        long = np.char.str_len(col) > MAX_ID_CHARS if col.size else np.zeros(0, dtype=bool)
        if long.any():
            raise DataError(f"{table.path}:{table.where(long)}: a {name} id of "
                            f"{int(np.char.str_len(col[int(np.argmax(long))]))} characters (at most {MAX_ID_CHARS})")
        broken = np.char.find(col, "\n") >= 0 if col.size else np.zeros(0, dtype=bool)
        if broken.any():
            raise DataError(f"{table.path}:{table.where(broken)}: {name} id {str(col[int(np.argmax(broken))])!r} "
                            "spans several lines (a quoted field with a line break)")
        for delim, label in _DELIMITERS:
            stray = np.char.find(col, delim) >= 0 if col.size else np.zeros(0, dtype=bool)
            if stray.any():
                raise DataError(f"{table.path}:{table.where(stray)}: stray {label} separator in {name} id "
                                f"{str(col[int(np.argmax(stray))])!r}; this format separates fields by commas")
        if col.size and BAD_ID_CHAR.search("".join(col.tolist())) is not None:
            k = next(k for k, v in enumerate(col.tolist()) if BAD_ID_CHAR.search(v))
            bad = BAD_ID_CHAR.search(str(col[k]))
            assert bad is not None
            raise DataError(f"{table.path}:{table.line_no[k]}: {name} id {str(col[k])[:80]!r} holds the character "
                            f"U+{ord(bad.group()):04X} (a control or invisible format character): no id may hold it")


def _check_numbers(table: CsvTable, name: str) -> None:
    col = table.columns[name]
    ok = None
    if col.dtype.kind == "U" and col.size:  # vectorised: only the characters of plain notation, then a cast
        points = col.view(np.uint32)  # that refuses the same strings float() does
        if int(points.max()) < _NUMBER_CHARS.size and _NUMBER_CHARS[points].all():
            try:
                ok = np.isfinite(col.astype(np.float64))
            except ValueError:
                ok = None
    if ok is None:
        ok = np.array([_is_finite_number(v) for v in col.tolist()], dtype=bool)
    if not ok.all():
        k = int(np.argmax(~ok))
        raise DataError(f"{table.path}:{table.line_no[k]}: column {name!r} must be a number, "
                        f"got {str(col[k])[:80]!r}")


# a number field: ASCII decimal or scientific notation only (float() would also take "1_000", "١٢" or "inf")
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMBER_RE = re.compile(_NUMBER)
_NUMBER_CHARS = np.zeros(128, dtype=bool)  # the characters of that notation, and numpy's padding (NUL)
_NUMBER_CHARS[[0, *map(ord, "0123456789+-.eE")]] = True


def _is_finite_number(text: str) -> bool:
    """``text`` is a number in plain ASCII decimal or scientific notation, and finite as a float64."""
    return _NUMBER_RE.fullmatch(text) is not None and bool(np.isfinite(float(text)))


def _check_known(table: CsvTable, name: str, known: np.ndarray, what: str, where: str) -> None:
    missing = ~np.isin(table.columns[name], known)
    if missing.any():
        k = int(np.argmax(missing))
        raise DataError(f"{table.path}:{table.line_no[k]}: {what} {str(table.columns[name][k])[:80]!r} {where}")


def _typed_ids(ids: np.ndarray) -> np.ndarray:
    """Integer ids when every id is a canonical integer literal (so they sort numerically), else strings."""
    if ids.size == 0:
        return ids
    try:
        as_int = ids.astype(np.int64)
    except (ValueError, OverflowError):
        return ids
    return as_int if (as_int.astype(str) == ids).all() else ids  # "01" or "+1" stay strings


def load_csv(folder: PathLike, *, strict: bool = False, price_bins: int = 8, text_dim: int = 32,
             min_value: float = 0.0) -> Dataset:
    """The generic format: ``interactions.csv`` (``user,item[,value][,timestamp]``), ``social.csv``
    (``user,neighbour``, directed: user follows / trusts neighbour; absent: no social ties, one warning),
    optional ``items.csv``
    (``item[,category][,title][,text][,price]``: the catalogue, also items without interactions) and
    optional ``users.csv`` (``user`` plus any categorical columns).

    Ids are arbitrary strings (canonical integers sort numerically). Social rows naming a user that
    is not in ``interactions.csv`` follow :func:`apply_edge_rule`; an interaction with an item
    missing from ``items.csv`` is an error. Values and timestamps are checked to be numbers;
    interactions are implicit. Categories (integer codes or names) become ``item_category``, prices
    ``item_price_bin`` (``price_bins`` quantile bins), titles and texts ``item_text`` (``text_dim``
    offline features, :mod:`shared.features`), users.csv's columns ``user_features``.
    """
    folder = Path(folder)
    inter = read_csv_table(folder / "interactions.csv", ("user", "item"), ("value", "timestamp"))
    if inter.line_no.size == 0:
        raise DataError(f"{inter.path}: no interaction rows after the header")
    _check_ids(inter, ("user", "item"))
    for name in ("value", "timestamp"):
        if name in inter.columns:
            _check_numbers(inter, name)
    users, items = inter.columns["user"], inter.columns["item"]
    if min_value > 0:  # explicit feedback: only values >= min_value are positives
        if "value" not in inter.columns:
            raise DataError(f"{inter.path}: data.min_value = {min_value:g} needs a value column "
                            "(value, rating, score, weight or count)")
        keep = inter.columns["value"].astype(np.float64) >= min_value
        if not keep.any():
            raise DataError(f"{inter.path}: no interaction has a value >= data.min_value = {min_value:g}")
        users, items = users[keep], items[keep]

    u_str = np.unique(users)
    if (folder / "social.csv").exists() or not (folder / "interactions.csv").is_file():
        social = read_csv_table(folder / "social.csv", SOCIAL_COLUMNS)
        _check_ids(social, SOCIAL_COLUMNS)
        src, dst = social.columns["user"], social.columns["neighbour"]
        keep = apply_edge_rule(social.path, social.line_no, compute_unknown_edges(u_str, src, dst), strict)
        src, dst = src[keep], dst[keep]
    else:  # a data set without social ties: the model's social parts stay empty (every user has no friends)
        LOG.warning("%s: no social.csv: the data has no social ties; the social parts of the model stay empty and "
                    "partition.method = community has no graph to follow (use random)", folder)
        src = dst = u_str[:0]

    catalogue = None
    if (folder / "items.csv").exists():  # a folder of that name is an error (it was silently ignored)
        catalogue = _read_items_csv(folder / "items.csv")
        _check_known(inter, "item", catalogue["ids"], "item", "is not listed in items.csv")
    i_str = np.unique(items if catalogue is None else catalogue["ids"])
    u_typed, i_typed = _typed_ids(u_str), _typed_ids(i_str)  # aligned with u_str / i_str

    def conv(values: np.ndarray, keys: np.ndarray, typed: np.ndarray) -> np.ndarray:
        return typed[np.searchsorted(keys, values)] if values.size else typed[:0]

    typed_catalogue = None
    if catalogue is not None:
        codes = catalogue.get("category")
        typed_catalogue = (conv(catalogue["ids"], i_str, i_typed),
                           codes if codes is not None else np.zeros(catalogue["ids"].size, dtype=np.int64))
    ds = clean(conv(users, u_str, u_typed), conv(items, i_str, i_typed),
               conv(src, u_str, u_typed), conv(dst, u_str, u_typed),
               undirected=False, name=folder.resolve().name or "csv", item_catalogue=typed_catalogue)
    # clean() indexes ids in sorted order of their typed values (integers numerically: 1, 2, 10), u_str / i_str
    # are sorted as strings ("1", "10", "2"): the index of each string id is looked up, never assumed
    assert ds.user_ids is not None and ds.item_ids is not None
    u_index, i_index = np.searchsorted(ds.user_ids, u_typed), np.searchsorted(ds.item_ids, i_typed)
    if catalogue is not None:
        ds = _with_item_features(ds, catalogue, i_index[np.searchsorted(i_str, catalogue["ids"])], price_bins,
                                 text_dim)
    if (folder / "users.csv").exists():
        ds = _with_user_features(ds, folder / "users.csv", u_str, u_index,
                                 read_user_feature_values(folder / USER_VALUES_FILE))
    return ds


USER_VALUES_FILE = "user_feature_values.json"  # the federation's schema of users.csv: {column: [values, ...]}


def read_user_feature_values(path: Path) -> dict[str, tuple[str, ...]] | None:
    """``user_feature_values.json`` beside users.csv, where there is one: each column's values in code order.

    Every partner codes its users.csv with the same lists, so a shared vector per (column, value) means the same
    value on every partner (a deployed partner sees only its own users' values; :func:`fedsocial partition`
    writes the file)."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected an object {{column: [value, ...]}}")
    out = {}
    for column, values in doc.items():
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values) \
                or len(set(values)) != len(values):
            raise DataError(f"{path}: column {column!r}: expected a list of distinct non-empty strings")
        out[str(column)] = tuple(values)
    return out


def _with_item_features(ds: Dataset, catalogue: dict[str, Any], index: np.ndarray, price_bins: int,
                        text_dim: int) -> Dataset:
    """``ds`` with items.csv's optional columns as features, ``index`` = each catalogue row's item index.

    Row r of the catalogue is item ``index[r]`` of ``ds`` (looked up by id: ``clean`` sorts integer ids
    numerically, the catalogue's strings sort otherwise).
    """
    changes: dict[str, Any] = {}
    if catalogue.get("category") is None:
        changes["item_category"] = None
    elif catalogue.get("category_names"):
        changes["item_category_names"] = tuple(catalogue["category_names"])
    if catalogue.get("price") is not None:
        bins = np.empty(ds.n_items, dtype=np.int64)
        bins[index] = compute_price_bins(catalogue["price"], price_bins)
        changes["item_price_bin"] = bins
    if catalogue.get("text") is not None:
        texts = [""] * ds.n_items
        for r, text in zip(index.tolist(), catalogue["text"], strict=True):
            texts[r] = text
        changes["item_text"] = cached_text_features(texts, text_dim)
    return dataclasses.replace(ds, **changes) if changes else ds


def _with_user_features(ds: Dataset, path: Path, u_str: np.ndarray, u_index: np.ndarray,
                        schema: dict[str, tuple[str, ...]] | None = None) -> Dataset:
    """users.csv (``user`` + categorical columns) as codes [n_users, F], 0 for a missing value or user: a value's
    rank among the column's values, or its place in ``schema`` (``user_feature_values.json``) where given; with a
    schema the columns are in its order, whatever order the file's header has. ``u_str`` is the sorted string ids
    of the users with interactions, ``u_index`` the index in ``ds`` of each.

    Rows for users without interactions are ignored (they have no record to train on).
    """
    table = read_csv_table(path, ("user",), any_columns=True)
    _check_ids(table, ("user",))
    ids = table.columns["user"]
    _refuse_repeated(table, ids, "user")
    names = tuple(c for c in table.header if c != "user")
    if schema is not None and set(schema) != set(names):
        raise DataError(f"{path.parent / USER_VALUES_FILE}: lists columns {sorted(schema)}, {path} has {sorted(names)}")
    if schema is not None:  # the schema's column order, not the file's: column f's codes are rows of the same
        names = tuple(schema)  # shared table on every partner whatever order its users.csv lists them in
    pos = np.minimum(np.searchsorted(u_str, ids), max(u_str.size - 1, 0))
    known = u_str[pos] == ids if u_str.size else np.zeros(ids.size, dtype=bool)
    rows = u_index[pos[known]]  # each known row's user index in ds
    out = np.zeros((ds.n_users, len(names)), dtype=np.int64)
    sizes, vocabularies = [], []
    for f, name in enumerate(names):
        col = [str(v) for v in table.columns[name].tolist()]
        vocabulary = schema[name] if schema is not None else tuple(sorted({v for v in col if v}))
        code_of = {v: k + 1 for k, v in enumerate(vocabulary)}  # code 0: missing
        values = np.zeros(len(col), dtype=np.int64)
        for r, v in enumerate(col):
            if v:
                code = code_of.get(v)
                if code is None:
                    raise DataError(f"{path}:{table.line_no[r]}: column {name!r}: value {v[:80]!r} is not "
                                    f"among the {len(vocabulary)} values {path.parent / USER_VALUES_FILE} lists")
                values[r] = code
        out[rows, f] = values[known]
        sizes.append(len(vocabulary) + 1)
        vocabularies.append(tuple(str(v) for v in vocabulary))
    return dataclasses.replace(ds, user_features=out, user_feature_names=names, user_feature_sizes=tuple(sizes),
                               user_feature_values=tuple(vocabularies))


def _refuse_repeated(table: CsvTable, ids: np.ndarray, what: str) -> None:
    order = np.argsort(ids, kind="stable")
    repeated = np.zeros(ids.size, dtype=bool)
    repeated[order[1:]] = ids[order[1:]] == ids[order[:-1]]
    if repeated.any():
        k = int(np.argmax(repeated))
        first = int(table.line_no[order[np.searchsorted(ids[order], ids[k])]])
        raise DataError(f"{table.path}:{table.line_no[k]}: {what} {str(ids[k])!r} listed twice "
                        f"(first on line {first})")


def _read_items_csv(path: Path) -> dict[str, Any]:
    """``items.csv`` by column: ``ids`` (each item once) and, where present, ``category`` (int64 codes),
    ``price`` (float64, NaN where empty) and ``text`` (title and text joined)."""
    table = read_csv_table(path, ITEM_COLUMNS, ITEM_OPTIONAL)
    _check_ids(table, ("item",))
    ids = table.columns["item"]
    _refuse_repeated(table, ids, "item")
    out: dict[str, Any] = {"ids": ids}
    if "category" in table.columns:
        cats = table.columns["category"]
        empty = cats == ""
        if empty.any():
            raise DataError(f"{path}:{table.where(empty)}: empty category (leave the column out, "
                            "or give every item one)")
        out["category"], out["category_names"] = compute_codes(cats)
    if "price" in table.columns:
        out["price"] = _read_prices(table)
    texts = [table.columns[c] for c in ("title", "text") if c in table.columns]
    if texts:
        out["text"] = [" ".join(parts) for parts in zip(*(t.tolist() for t in texts), strict=True)]
    return out


def _read_prices(table: CsvTable) -> np.ndarray:
    """The price column as float64: empty is missing (NaN); anything else a finite number >= 0."""
    col = table.columns["price"]
    prices = np.full(col.size, np.nan)
    for k, text in enumerate(col.tolist()):
        if text == "":
            continue
        if not _is_finite_number(text) or float(text) < 0:
            raise DataError(f"{table.path}:{table.line_no[k]}: column 'price' must be a number >= 0 "
                            f"or empty, got {text[:80]!r}")
        prices[k] = float(text)
    return prices


# ----------------------------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------------------------

LOADERS = {
    "lastfm": load_lastfm,
    "filmtrust": load_filmtrust,
    "douban": load_douban,
    "ciao": load_ciao,
    "csv": load_csv,
}


def load_dataset(cfg: DataConfig, data_dir: PathLike | None = None) -> Dataset:
    """Load the dataset ``cfg`` names: the synthetic generator, or a real folder under ``data_dir``."""
    if cfg.format == "synthetic":
        from fedsocial.shared.synthetic import generate

        return generate(cfg)
    folder = resolve_data_path(cfg, data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such dataset folder (data.format = {cfg.format!r}, "
                        f"data.path = {cfg.path!r}; set --data-dir or FEDSOCIAL_DATA_DIR)")
    if cfg.format == "csv":
        return load_csv(folder, strict=cfg.strict, price_bins=cfg.price_bins, text_dim=cfg.text_dim,
                        min_value=cfg.min_value)
    return LOADERS[cfg.format](folder, strict=cfg.strict)
