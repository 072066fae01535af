"""Write a :class:`Dataset` in the generic CSV format that :func:`shared.loaders.load_csv` reads.

``interactions.csv`` (``user,item``), ``social.csv`` (``user,neighbour``, directed) and, when the
dataset has item categories, ``items.csv`` (``item,category`` for the whole catalogue, so items
without interactions survive a round trip; named categories by name) and, when it has user features,
``users.csv`` with ``user_feature_values.json`` (the values of each column's codes, so that a subset of the
users is coded as the whole was). Ids are the dataset's original ids (``user_ids`` / ``item_ids``) where
present, else the indices. ``fedsocial partition`` exports each partner's folder with this (and gives every
partner the data set's own ``items.csv``, prices and texts included).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fedsocial.shared.data import Dataset


def _ids(original: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if original is None else np.asarray(original)


def _write(path: Path, header: tuple[str, ...], rows: Iterable[tuple[object, ...]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")  # quotes ids that contain commas or quotes
        writer.writerow(header)
        writer.writerows(rows)


def write_csv_dataset(ds: Dataset, folder: str | os.PathLike[str]) -> Path:
    """Write ``ds`` under ``folder`` (created if needed) and return the folder's path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    user_ids, item_ids = _ids(ds.user_ids, ds.n_users), _ids(ds.item_ids, ds.n_items)
    _write(out / "interactions.csv", ("user", "item"),
           zip(user_ids[ds.users].tolist(), item_ids[ds.items].tolist(), strict=True))
    _write(out / "social.csv", ("user", "neighbour"),
           zip(user_ids[ds.social_src].tolist(), user_ids[ds.social_dst].tolist(), strict=True))
    items_csv = out / "items.csv"
    if ds.item_category is not None:
        names = ds.item_category_names  # named categories are written by name, so the export reads back the same
        labels = [names[c] for c in ds.item_category.tolist()] if names else ds.item_category.tolist()
        rows = zip(item_ids.tolist(), labels, strict=True)
        _write(items_csv, ("item", "category"), rows)
    elif items_csv.exists():
        items_csv.unlink()  # a stale catalogue from an earlier export would be read back
    if ds.user_features is not None and ds.user_feature_values:
        _write_user_features(ds, user_ids, out)
    else:
        for stale in ("users.csv", "user_feature_values.json"):
            (out / stale).unlink(missing_ok=True)
    return out


def _write_user_features(ds: Dataset, user_ids: np.ndarray, out: Path) -> None:
    """``users.csv`` (each user's values, empty where missing) and the schema ``user_feature_values.json`` that
    codes them as they were coded here (a partner's own users may not hold every value)."""
    from fedsocial.shared.fileio import write_json_atomic
    from fedsocial.shared.loaders import USER_VALUES_FILE

    assert ds.user_features is not None
    columns = [("",) + tuple(v) for v in ds.user_feature_values]  # code 0: missing
    rows = ((uid, *(columns[f][c] for f, c in enumerate(codes)))
            for uid, codes in zip(user_ids.tolist(), ds.user_features.tolist(), strict=True))
    _write(out / "users.csv", ("user", *ds.user_feature_names), rows)
    write_json_atomic(out / USER_VALUES_FILE, dict(zip(ds.user_feature_names, map(list, ds.user_feature_values),
                                                       strict=True)))
