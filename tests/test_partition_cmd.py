"""``fedsocial partition``: per-partner folders that load on their own and add up to the whole dataset."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.config import ConfigError, load_config
from fedsocial.shared.data import DataError
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
                         "max-epsilon", "target-delta", "require-dp"}
    assert node["require-dp"] is True and "require-dp=true" in partition_cmd.format_node_config(node)
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


def _feature_rich_csv(folder: Path) -> None:
    """A generic-CSV data set with named categories, titles, prices and a users.csv column."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    users, items = [f"u{i}" for i in range(90)], [f"it{j}" for j in range(120)]
    inter = {(u, items[j]) for u in users for j in rng.choice(120, 10, replace=False).tolist()}
    (folder / "interactions.csv").write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in sorted(inter)))
    edges = {(u, users[v]) for u in users for v in rng.choice(90, 3).tolist() if users[v] != u}
    (folder / "social.csv").write_text("user,neighbour\n" + "".join(f"{a},{b}\n" for a, b in sorted(edges)))
    cats = ("Books", "Garden & Outdoor", "Toys")
    (folder / "items.csv").write_text("item,category,title,price\n" + "".join(
        f'{it},{cats[j % 3]},"a {cats[j % 3]} thing number {j}",{(j * 7) % 40 + 0.5}\n' for j, it in enumerate(items)))
    regions = ("north", "south", "east", "west", "rare-isle")
    (folder / "users.csv").write_text("user,region\n" + "".join(
        f"{u},{'rare-isle' if k == 5 else regions[k % 4] if k % 11 else ''}\n" for k, u in enumerate(users)))


def test_each_partner_folder_loads_the_features_its_slice_of_the_whole_has(tmp_path: Path) -> None:
    # Prepare: was: the export wrote items.csv with category codes only and no users.csv, so a deployed
    # partner of a config with use_price / use_text / use_user_features had none of them, and a partner's own
    # users.csv would code its users' values by its own ranks (the shared vector of a value differing by partner)
    _feature_rich_csv(tmp_path / "data")
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(f'[data]\nformat = "csv"\npath = "{tmp_path / "data"}"\n[partition]\nmethod = "random"\n',
                        encoding="utf-8")
    whole = load_csv(tmp_path / "data")
    # Execute
    rc = partition_cmd.main(["--config", str(cfg_path), "--partners", "3", "--out", str(tmp_path / "parts")])
    parts = [load_csv(tmp_path / "parts" / f"partner_{p}" / "data") for p in range(3)]
    # Assert: the catalogue's features are the whole's on every partner; each user's feature codes and the sizes
    # are the whole's (the rare value one user holds keeps its code on every partner)
    assert rc == 0 and whole.item_price_bin is not None and whole.item_text is not None
    assert whole.user_features is not None
    index = {u: k for k, u in enumerate(np.asarray(whole.user_ids).tolist())}
    for d in parts:
        assert d.item_category_names == whole.item_category_names == ("Books", "Garden & Outdoor", "Toys")
        assert np.array_equal(d.item_category, whole.item_category)
        assert np.array_equal(d.item_price_bin, whole.item_price_bin)
        assert np.allclose(d.item_text, whole.item_text)
        assert d.user_feature_sizes == whole.user_feature_sizes == (6,)
        assert d.user_feature_values == whole.user_feature_values
        rows = [index[u] for u in np.asarray(d.user_ids).tolist()]
        assert d.user_features is not None and np.array_equal(d.user_features, whole.user_features[rows])
    users_csv = (tmp_path / "parts" / "partner_0" / "data" / "users.csv").read_text().splitlines()
    assert len(users_csv) == 1 + parts[0].n_users  # its own users only


def test_a_user_value_outside_the_schema_is_refused_naming_the_line(tmp_path: Path) -> None:
    # Prepare
    _feature_rich_csv(tmp_path / "data")
    (tmp_path / "data" / "user_feature_values.json").write_text('{"region": ["north", "south"]}')
    # Execute / Assert
    with pytest.raises(DataError, match=r"users.csv:4: column 'region': value 'east' is not among the 2 values"):
        load_csv(tmp_path / "data")
    (tmp_path / "data" / "user_feature_values.json").write_text('{"age": ["1"]}')
    with pytest.raises(DataError, match=r"user_feature_values.json: lists columns \['age'\], .* has \['region'\]"):
        load_csv(tmp_path / "data")
    (tmp_path / "data" / "user_feature_values.json").write_text('{"region": ["a", "a"]}')
    with pytest.raises(DataError, match="expected a list of distinct non-empty strings"):
        load_csv(tmp_path / "data")


def test_a_partner_users_csv_with_its_columns_in_another_order_codes_them_as_the_schema_does(tmp_path: Path) -> None:
    # Prepare: was: a partner's columns were coded in its users.csv header order, so a partner listing
    # (tier, region) where the schema has (region, tier) put its tier codes on the rows of the shared table that
    # the others use for region (same total size, so the same shapes: nothing refused it, the vectors mixed)
    folder = tmp_path / "data"
    _feature_rich_csv(folder)
    users = [line.split(",")[0] for line in (folder / "users.csv").read_text().splitlines()[1:]]
    tiers = ("gold", "silver")
    rows = [line.split(",") for line in (folder / "users.csv").read_text().splitlines()[1:]]
    (folder / "users.csv").write_text("user,region,tier\n" + "".join(
        f"{u},{r[1]},{tiers[k % 2]}\n" for k, (u, r) in enumerate(zip(users, rows, strict=True))))
    (folder / "user_feature_values.json").write_text(json.dumps(
        {"region": ["east", "north", "rare-isle", "south", "west"], "tier": list(tiers)}))
    in_order = load_csv(folder)
    (folder / "users.csv").write_text("user,tier,region\n" + "".join(
        f"{u},{tiers[k % 2]},{r[1]}\n" for k, (u, r) in enumerate(zip(users, rows, strict=True))))
    # Execute
    swapped = load_csv(folder)
    # Assert: the same column order, codes and sizes as the partner whose header follows the schema
    assert swapped.user_feature_names == in_order.user_feature_names == ("region", "tier")
    assert swapped.user_feature_sizes == in_order.user_feature_sizes == (6, 3)
    assert swapped.user_features is not None and in_order.user_features is not None
    assert np.array_equal(swapped.user_features, in_order.user_features)
    assert set(in_order.user_features[:, 1].tolist()) == {1, 2}  # tier codes in the second column


def test_a_deployed_partner_without_the_user_schema_refuses_to_load_naming_the_file(tmp_path: Path) -> None:
    # Prepare: was: a partner folder missing user_feature_values.json loaded, coding users.csv by the ranks of
    # its own users' values: with a value only another partner's user holds, its user-feature table had other
    # rows, and where the sizes agreed a value's shared vector silently meant another value elsewhere
    from fedsocial.client.partner import load_partner_split, settings_from_context

    _feature_rich_csv(tmp_path / "data")
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(f'[data]\nformat = "csv"\npath = "{tmp_path / "data"}"\n[partition]\nmethod = "random"\n'
                        '[model]\nuse_user_features = true\n', encoding="utf-8")
    assert partition_cmd.main(["--config", str(cfg_path), "--partners", "3", "--out", str(tmp_path / "parts")]) == 0
    federation = str(tmp_path / "parts" / "federation.toml")
    folder = tmp_path / "parts" / "partner_1"
    settings = settings_from_context({"config-path": federation}, partition_cmd.node_config(folder / "partner.toml"))
    cfg = load_config(federation)
    assert load_partner_split(cfg, settings).dataset.user_features is not None  # with the schema: loads
    (folder / "data" / "user_feature_values.json").unlink()
    # Execute / Assert: refused, naming the missing file and where it comes from
    with pytest.raises(DataError, match=r"partner_1/data/user_feature_values.json: no such file: with "
                                        r"model.use_user_features every partner codes users.csv"):
        load_partner_split(load_config(federation), settings)


def test_a_dp_partner_refuses_a_run_config_that_turns_privacy_off(tmp_path: Path) -> None:
    # Regression (adversarial review): a deployed partner whose partner.toml says DP with cap 3 trained and sent a
    # non-DP update, with its exact loss, when the coordinator's config set privacy.enabled = false
    from fedsocial.client.partner import compute_partner_config, settings_from_context
    from fedsocial.shared.config import ConfigError

    out = tmp_path / "parts"
    cfg = load_config(_config(tmp_path), SMALL)
    partition_cmd.write_partitions(cfg, load_dataset(cfg.data), 2, out)
    node = partition_cmd.node_config(out / "partner_0" / "partner.toml")
    off = tmp_path / "off.toml"
    off.write_text((out / "federation.toml").read_text().replace("enabled = true", "enabled = false", 1))
    assert not load_config(off).privacy.enabled
    # Execute / Assert: refused naming the node config and the run's config; the agreed config is accepted
    with pytest.raises(ConfigError, match=r"partner_0: node config require-dp = true .* privacy.enabled = false"):
        compute_partner_config(load_config(off), settings_from_context({"config-path": str(off)}, node))
    fed = str(out / "federation.toml")
    assert compute_partner_config(load_config(fed), settings_from_context({"config-path": fed}, node)).privacy.enabled


def test_a_partner_toml_without_its_budget_is_one_line(tmp_path: Path) -> None:
    # Regression (adversarial review): a KeyError traceback
    from fedsocial.shared.config import ConfigError

    out = tmp_path / "parts"
    cfg = load_config(_config(tmp_path), SMALL)
    partition_cmd.write_partitions(cfg, load_dataset(cfg.data), 2, out)
    path = out / "partner_0" / "partner.toml"
    path.write_text("\n".join(line for line in path.read_text().splitlines() if not line.startswith("max_epsilon")))
    with pytest.raises(ConfigError, match=r"partner.toml: \[partner\] lacks max_epsilon"):
        partition_cmd.node_config(path)
