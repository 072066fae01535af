"""The privacy-utility grid's cell definitions (the runs themselves are benchmarks, not tests)."""

from __future__ import annotations

import math

import pytest

from shared.config import load_config
from simulations.privacy_grid import cell_key, compute_cell_overrides, markdown_table, parse_epsilons


def test_each_epsilon_sets_the_cap_and_inf_turns_privacy_off() -> None:
    eps = parse_epsilons("1,2,inf")

    cfgs = [load_config("configs/demo.toml", compute_cell_overrides(e, "local")) for e in eps]

    assert [c.privacy.enabled for c in cfgs] == [True, True, False]
    assert [c.privacy.max_epsilon for c in cfgs[:2]] == [1.0, 2.0]
    assert math.isinf(eps[2]) and all(c.model.user_embedding == "local" for c in cfgs)


def test_variant_sets_how_user_vectors_are_held() -> None:
    cfg = load_config("configs/demo.toml", compute_cell_overrides(8.0, "trained"))

    assert cfg.model.user_embedding == "trained" and cfg.privacy.max_epsilon == 8.0


def test_table_lists_mostpop_then_cells_in_epsilon_order() -> None:
    row = {"ndcg@10": 0.1, "recall@10": 0.2, "noise_multiplier": 1.5, "wall_time_s": 3.0}
    results = {"mostpop": {"ndcg@10": 0.05, "recall@10": 0.06, "wall_time_s": 1.0},
               cell_key(8.0, "local"): row, cell_key(math.inf, "local"): {**row, "noise_multiplier": None}}

    lines = markdown_table(results, [math.inf, 8.0], ["local", "trained"]).splitlines()

    assert lines[2].startswith("| – | MostPop | 0.0500")
    assert lines[3].startswith("| 8 | local | 0.1000 | 0.2000 | 1.50 |")
    assert lines[4].startswith("| inf | local |") and len(lines) == 5


def test_unknown_variant_is_a_config_error() -> None:
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="model.user_embedding"):
        load_config("configs/demo.toml", compute_cell_overrides(8.0, "shared"))
