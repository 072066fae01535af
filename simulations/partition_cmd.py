"""``fedsocial partition``: one self-contained folder per partner platform, for a deployment.

``fedsocial partition --config configs/NAME.toml [--data-dir DIR] --partners N --out DIR`` loads the
dataset, assigns its users to ``N`` partners (``[partition]`` of the config) and writes::

    DIR/catalogue.json            n_items and the partners' names: every partner must agree on the
                                  shape of the shared item table
    DIR/federation.toml           the config the coordinator runs with (``flwr run --run-config
                                  config-path=...``): the input config, reading each partner's CSV data
    DIR/partner_<i>/data/         interactions.csv, social.csv, items.csv: the generic CSV format,
                                  GLOBAL item ids and the whole catalogue in items.csv (so the partner's
                                  item table lines up with everyone else's), the partner's users only,
                                  social edges between them only
    DIR/partner_<i>/partner.toml  [partner]: id, data-dir, state-dir, ledger-dir, device, signing-key,
                                  max_epsilon, target_delta; [config.*]: the config sections

A partner needs only its folder: :func:`node_config` turns ``partner.toml`` into the
``flower-supernode --node-config`` values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.shared.config import Config, ConfigError, config_from_dict
from fedsocial.shared.data import Dataset, SplitData
from fedsocial.shared.fileio import write_json_atomic
from fedsocial.simulations.common import add_config_arguments, config_from_args, user_errors

DATA_SUBDIR = "data"  # each partner's CSV folder, relative to its partner folder (= its data-dir)
CONFIG_SECTIONS = ("data", "split", "model", "train", "privacy", "federation", "secagg")


def partner_name(index: int) -> str:
    return f"partner_{index}"


def compute_partner_dataset(ds: Dataset, assignment: np.ndarray, partner: int) -> Dataset:
    """The partner's users with all their interactions and the social edges among them; the item
    table (``n_items``, ``item_ids``, ``item_category``) is the global one. Every item gets a category
    so that ``items.csv`` can list the whole catalogue (one category ``0`` when the data has none)."""
    from fedsocial.shared.partition import partner_split

    empty = np.zeros(0, dtype=np.int64)
    whole = SplitData(dataset=ds, train_users=ds.users, train_items=ds.items, val_users=empty,
                      val_items=empty, test_users=empty, test_items=empty)
    sub = partner_split(whole, assignment, partner).dataset
    category = sub.item_category if sub.item_category is not None else np.zeros(ds.n_items, dtype=np.int64)
    # the partner's slice as partner_split makes it (user features and schema included), under global ids
    return dataclasses.replace(sub, item_category=category, user_ids=_global_user_ids(ds, sub), extra={})


def _global_user_ids(ds: Dataset, sub: Dataset) -> np.ndarray:
    """The partner's users under their original ids (global indices for data without ids)."""
    members = np.asarray(sub.user_ids)
    return members if ds.user_ids is None else np.asarray(ds.user_ids)[members]


def federation_config(cfg: Config, partners: int) -> dict[str, dict[str, Any]]:
    """The config every partner and the coordinator run with: the input's model, training, privacy
    and federation settings; data read from each partner's own CSV folder (``data-dir``/data)."""
    raw = cfg.to_dict()
    out = {k: dict(raw[k]) for k in CONFIG_SECTIONS}
    out["data"] = {"format": "csv", "path": DATA_SUBDIR}
    out["federation"]["partners"] = partners
    out["federation"]["min_partners"] = min(out["federation"]["min_partners"], partners)
    config_from_dict(out, "<federation config>")  # what we write must load
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string: JSON escaping is valid TOML


def to_toml(tables: dict[str, dict[str, Any]], header: str = "") -> str:
    """Flat tables of scalars as TOML (table names may be dotted)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def partner_table(cfg: Config, index: int, partners: int) -> dict[str, Any]:
    """The [partner] table: node-config values (paths relative to the partner folder) and budget."""
    return {
        "id": partner_name(index), "index": index, "partners": partners,
        "data-dir": ".", "state-dir": "state", "ledger-dir": "ledger",
        "signing-key": "keys/ledger_signing.key", "device": cfg.train.device,
        "max_epsilon": cfg.privacy.max_epsilon, "target_delta": cfg.privacy.target_delta,
        "require_dp": bool(cfg.privacy.enabled),  # the partner refuses a run config that turns DP off
    }


def write_partitions(cfg: Config, ds: Dataset, partners: int, out: str | os.PathLike[str],
                     catalogue: Path | None = None) -> list[Path]:
    """Write every partner's folder, ``catalogue.json`` and ``federation.toml``; returns the folders.

    ``catalogue``: the data set's own ``items.csv`` (generic CSV), given to every partner as it is, so that its
    prices, titles and texts (public, and the same for every partner) reach the partners' features."""
    import shutil

    from fedsocial.shared.csvio import write_csv_dataset
    from fedsocial.shared.partition import partition_users

    out = Path(out)
    if out.exists() and any(out.glob("partner_*")):
        raise ConfigError(f"--out {out}: already holds partner folders; choose an empty folder")
    assignment = partition_users(ds, partners, cfg.partition)
    fed = federation_config(cfg, partners)
    # Users' records (interactions, out-lists) are personal data: owner-only from the first byte, the
    # folders 0700 before anything is written into them.
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.chmod(0o700)
    folders = []
    for p in range(partners):
        folder = out / partner_name(p)
        folder.mkdir(mode=0o700)
        write_csv_dataset(compute_partner_dataset(ds, assignment, p), folder / DATA_SUBDIR)
        if catalogue is not None:
            shutil.copyfile(catalogue, folder / DATA_SUBDIR / "items.csv")
        tables = {"partner": partner_table(cfg, p, partners), **{f"config.{k}": v for k, v in fed.items()}}
        header = (f"Partner {p} of {partners} (fedsocial partition of {ds.name}).\n"
                  "[partner] paths are relative to this folder; [config.*] is the federation's config.")
        (folder / "partner.toml").write_text(to_toml(tables, header), encoding="utf-8")
        folders.append(folder)
    (out / "federation.toml").write_text(
        to_toml(fed, f"Config of the {partners}-partner federation (fedsocial partition of {ds.name})."),
        encoding="utf-8")
    sizes = np.bincount(assignment, minlength=partners)
    write_json_atomic(out / "catalogue.json", {
        "n_items": int(ds.n_items), "dataset": ds.name, "partition": cfg.partition.method,
        "partners": {partner_name(p): {"folder": partner_name(p), "num_users": int(sizes[p])}
                     for p in range(partners)},
    })
    for folder in folders:
        make_owner_only_inplace(folder)
    return folders


def make_owner_only_inplace(root: Path) -> None:
    """``root`` and everything under it owner-only: directories 0700, files 0600 (links left alone)."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(0o700 if path.is_dir() else 0o600)


def read_partner_toml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Config]:
    """``partner.toml`` as (its [partner] table with paths made absolute, the config it carries)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if "partner" not in raw or "config" not in raw:
        raise ConfigError(f"{path}: expected [partner] and [config.*] tables")
    table = dict(raw["partner"])
    for key in ("data-dir", "state-dir", "ledger-dir", "signing-key"):
        if key in table:
            table[key] = str((path.parent / str(table[key])).resolve())
    return table, config_from_dict(raw["config"], str(path))


def node_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``--node-config`` values of the partner described by ``partner.toml`` at ``path``."""
    table, _ = read_partner_toml(path)
    keys = ("data-dir", "state-dir", "ledger-dir", "signing-key", "device")
    missing = [k for k in ("id", "max_epsilon", "target_delta") if k not in table]
    if missing:  # was: a KeyError traceback (found in review)
        raise ConfigError(f"{path}: [partner] lacks {', '.join(missing)} (fedsocial partition writes them)")
    budget = {"max-epsilon": table["max_epsilon"], "target-delta": table["target_delta"]}  # the partner's own cap
    if "require_dp" in table:
        budget["require-dp"] = bool(table["require_dp"])
    return {"partner-id": str(table["id"]), **{k: table[k] for k in keys if k in table}, **budget}


def format_node_config(values: dict[str, Any]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML values (strings quoted)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, (str, bool)) else v}" for k, v in values.items())


def main_node_config(argv: list[str] | None = None) -> int:
    """``python -m fedsocial.simulations.partition_cmd PARTNER_TOML``: print the partner's ``--node-config``."""
    p = argparse.ArgumentParser(prog="python -m fedsocial.simulations.partition_cmd",
                                description="Print flower-supernode --node-config for a partner.toml.")
    p.add_argument("partner_toml")
    args = p.parse_args(argv)
    try:
        print(format_node_config(node_config(args.partner_toml)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsocial partition",
                                description="Write one self-contained folder per partner platform.")
    add_config_arguments(p)
    p.add_argument("--partners", type=int, required=True, help="number of partner platforms")
    p.add_argument("--out", required=True, help="output folder (partner_<i>/, catalogue.json, federation.toml)")
    return p


@user_errors
def main(argv: list[str] | None = None) -> int:
    """``fedsocial partition --config C [--data-dir D] [--set k=v] --partners N --out DIR``."""
    from fedsocial.shared.loaders import load_dataset, resolve_data_path

    args = _parser().parse_args(argv)
    if args.partners < 1:
        raise ConfigError(f"--partners {args.partners}: must be >= 1")
    cfg = config_from_args(args)
    ds = load_dataset(cfg.data, args.data_dir)
    items = resolve_data_path(cfg.data, args.data_dir) / "items.csv" if cfg.data.format == "csv" else None
    folders = write_partitions(cfg, ds, args.partners, args.out, items if items and items.is_file() else None)
    sizes = json.loads((Path(args.out) / "catalogue.json").read_text(encoding="utf-8"))["partners"]
    for folder in folders:
        print(f"{folder}: {sizes[folder.name]['num_users']} users")
    print(f"{Path(args.out) / 'federation.toml'}: config for `flwr run --run-config config-path=...`")
    return 0


if __name__ == "__main__":
    sys.exit(main_node_config())
