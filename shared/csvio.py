"""Write a :class:`Dataset` in the generic CSV format that :func:`shared.loaders.load_csv` reads.

``interactions.csv`` (``user,item``), ``social.csv`` (``user,neighbour``, directed) and, when the
dataset has item categories, ``items.csv`` (``item,category`` for the whole catalogue, so items
without interactions survive a round trip). Ids are the dataset's original ids (``user_ids`` /
``item_ids``) where present, else the indices. ``fedsocial partition`` exports each partner's
folder with this.
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
    return out
