"""``fedsocial partition``: per-partner folders that load on their own and add up to the whole dataset."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.config import ConfigError, load_config
from fedsocial.shared.loaders import load_csv, load_dataset
from fedsocial.simulations import partition_cmd

SMALL = ["data.n_users=120", "data.n_items=150", "data.interactions_per_user=8.0", "data.friends_per_user=4.0"]


def _config(tmp_path: Path, method: str = "community") -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(f'[data]\nformat = "synthetic"\n[partition]\nmethod = "{method}"\n'
                    '[privacy]\nenabled = true\nmax_epsilon = 3.0\ntarget_delta = 1e-6\n'
                    '[federation]\nclipping_norm = 2.0\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["community", "random", "dirichlet"])
def test_round_trip_users_disjoint_union_all_items_global(tmp_path: Path, method: str) -> None:
    # Prepare
    cfg_path = _config(tmp_path, method)
    cfg = load_config(cfg_path, SMALL)
    whole = load_dataset(cfg.data)
    out = tmp_path / "parts"

    # Execute
    rc = partition_cmd.main(["--config", str(cfg_path), *sum((["--set", s] for s in SMALL), []),
                             "--partners", "3", "--out", str(out)])
    parts = [load_csv(out / f"partner_{p}" / "data") for p in range(3)]

    # Assert: users disjoint, union = all users
    assert rc == 0
    user_sets = [set(np.asarray(d.user_ids).tolist()) for d in parts]
    assert sum(len(s) for s in user_sets) == whole.n_users
    assert set().union(*user_sets) == set(range(whole.n_users))
    # items global: same table size, and item index k is global item k in every partner
    pairs = set(zip(whole.users.tolist(), whole.items.tolist(), strict=True))
    for d in parts:
        assert d.n_items == whole.n_items
        assert np.array_equal(np.asarray(d.item_ids), np.arange(whole.n_items))
        assert d.item_category is not None and whole.item_category is not None
        assert np.array_equal(d.item_category, whole.item_category)
        glob = np.asarray(d.user_ids)
        assert set(zip(glob[d.users].tolist(), d.items.tolist(), strict=True)) <= pairs
    # every interaction went to exactly one partner
    assert sum(d.n_interactions for d in parts) == whole.n_interactions
    # social edges: the partner's users only, and all edges inside a partner are kept
    inside = 0
    for d, users in zip(parts, user_sets, strict=True):
        glob = np.asarray(d.user_ids)
        assert set(glob[d.social_src].tolist()) | set(glob[d.social_dst].tolist()) <= users
        inside += d.n_edges
    owner = np.empty(whole.n_users, dtype=np.int64)
    for p, users in enumerate(user_sets):
        owner[list(users)] = p
    assert inside == int(np.sum(owner[whole.social_src] == owner[whole.social_dst]))


def test_partner_folder_is_self_contained(tmp_path: Path) -> None:
    # Prepare / Execute
    out = tmp_path / "parts"
    cfg = load_config(_config(tmp_path), SMALL)
    partition_cmd.write_partitions(cfg, load_dataset(cfg.data), 2, out)
    table, partner_cfg = partition_cmd.read_partner_toml(out / "partner_1" / "partner.toml")
    node = partition_cmd.node_config(out / "partner_1" / "partner.toml")
    catalogue = json.loads((out / "catalogue.json").read_text())
    fed = tomllib.loads((out / "federation.toml").read_text())

    # Assert: budget and settings travel with the folder; its data loads through its own config
    assert (table["max_epsilon"], table["target_delta"]) == (3.0, 1e-6)
    assert node["partner-id"] == "partner_1" and Path(node["data-dir"]) == (out / "partner_1").resolve()
    assert set(node) == {"partner-id", "data-dir", "state-dir", "ledger-dir", "signing-key", "device",
                         "max-epsilon", "target-delta"}
    assert (node["max-epsilon"], node["target-delta"]) == (3.0, 1e-6)  # the partner enforces its own cap
    assert partner_cfg.data.format == "csv" and partner_cfg.federation.partners == 2
    assert partner_cfg.federation.clipping_norm == 2.0 and partner_cfg.privacy.max_epsilon == 3.0
    own = load_dataset(partner_cfg.data, node["data-dir"])
    assert own.n_items == catalogue["n_items"] == cfg.data.n_items
    assert own.n_users == catalogue["partners"]["partner_1"]["num_users"]
    assert fed["data"] == {"format": "csv", "path": "data"} and fed["model"] == cfg.to_dict()["model"]


def test_refuses_to_mix_with_an_earlier_partition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(_config(tmp_path), SMALL)
    partition_cmd.write_partitions(cfg, load_dataset(cfg.data), 2, tmp_path / "parts")
    with pytest.raises(ConfigError, match="already holds partner folders"):
        partition_cmd.write_partitions(cfg, load_dataset(cfg.data), 2, tmp_path / "parts")
    rc = partition_cmd.main(["--config", str(_config(tmp_path)), "--partners", "0", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--partners" in capsys.readouterr().err
