"""The privacy-utility grid's cell definitions (the runs themselves are benchmarks, not tests)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedsocial.shared.config import load_config
from fedsocial.simulations.privacy_grid import (
    cell_key,
    compute_cell_overrides,
    compute_config_sha256,
    is_cached,
    markdown_table,
    move_aside,
    parse_epsilons,
)


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
    from fedsocial.shared.config import ConfigError

    with pytest.raises(ConfigError, match="model.user_embedding"):
        load_config("configs/demo.toml", compute_cell_overrides(8.0, "shared"))


def test_cached_cell_is_kept_only_for_the_same_resolved_config() -> None:
    # Prepare: a cell run with one config; the same cell under a changed override
    cfg = load_config("configs/demo.toml", compute_cell_overrides(8.0, "local"))
    changed = load_config("configs/demo.toml", [*compute_cell_overrides(8.0, "local"), "model.temperature=1.0"])
    key = cell_key(8.0, "local")
    results = {key: {"ndcg@10": 0.1, "config_sha256": compute_config_sha256(cfg)}}
    # Execute / Assert: same config -> cached; changed config or a cell without fingerprint -> rerun
    assert is_cached(results, key, compute_config_sha256(cfg))
    assert not is_cached(results, key, compute_config_sha256(changed))
    assert not is_cached({key: {"ndcg@10": 0.1}}, key, compute_config_sha256(cfg))
    assert compute_config_sha256(cfg) == compute_config_sha256(load_config("configs/demo.toml",
                                                                           compute_cell_overrides(8.0, "local")))


def test_earlier_cell_folder_is_moved_aside_not_reused(tmp_path: Path) -> None:
    # Prepare: an interrupted cell left a ledger; an earlier replacement already exists
    cell = tmp_path / "eps8-local"
    (cell / "ledgers").mkdir(parents=True)
    (cell / "ledgers" / "partner-0.jsonl").write_text("{}\n", encoding="utf-8")
    (tmp_path / "eps8-local.replaced-1").mkdir()
    # Execute
    moved = move_aside(cell)
    # Assert: nothing lost, the cell folder is free, an empty or missing folder is left alone
    assert moved == tmp_path / "eps8-local.replaced-2"
    assert (moved / "ledgers" / "partner-0.jsonl").read_text(encoding="utf-8") == "{}\n"
    assert not cell.exists()
    assert move_aside(cell) is None


def test_partner_summary_reads_served_metrics_and_the_table_skips_cells_without_them() -> None:
    from fedsocial.simulations.privacy_grid import compute_partner_summary, partner_table

    doc = {"partners": {
        "partner-0": {"num_users": 10, "alone": {"ndcg@10": 0.2}, "served": {"ndcg@10": 0.3},
                      "personalisation": {"choice": "finetune", "shared_test": {"ndcg@10": 0.1}}},
        "partner-1": {"num_users": 12, "alone": {"ndcg@10": 0.4}, "ndcg@10": 0.2},  # served reported to the server
        "partner-2": {"num_users": 9},  # no alone metrics: not summarised
    }}

    summary = compute_partner_summary(doc)
    stale = {"per_partner": {"partner-9": {"num_users": 1, "alone": 0.1, "served": None, "shared": 0.0,
                                           "choice": "shared"}}, "federation_gain": 1.0}
    table = partner_table({"eps=8/local": {"per_partner": summary, "federation_gain": 1.0},
                           "eps=2/local": stale}, [8.0, 2.0], ["local"])

    assert summary == {
        "partner-0": {"num_users": 10, "alone": 0.2, "served": 0.3, "choice": "finetune", "shared": 0.1},
        "partner-1": {"num_users": 12, "alone": 0.4, "served": 0.2, "choice": "shared", "shared": 0.2},
    }
    assert "| 8 | partner-0 | 10 | 0.2000 | 0.1000 | 0.3000 | finetune | 1.500 |" in table
    assert "partner-9" not in table


def _partner_grid() -> dict[str, object]:
    def cell(served: float, shared: float) -> dict[str, object]:
        return {"ndcg@10": served, "recall@10": 0.1, "noise_multiplier": 1.0, "wall_time_s": 60.0,
                "scope": "partner", "federation_gain": 1.02,
                "per_partner": {"partner-0": {"num_users": 100, "alone": 0.20, "served": served, "shared": shared,
                                              "choice": "mix:finetune:0.5"},
                                "partner-1": {"num_users": 300, "alone": 0.10, "served": served, "shared": shared / 2,
                                              "choice": "alone"}}}
    return {"config": "configs/lastfm_dp.toml", "partners": 2, "overrides": ["privacy.scope=partner"],
            "mostpop": {"ndcg@10": 0.06, "recall@10": 0.05, "wall_time_s": 1.0},
            "eps=8/local": cell(0.16, 0.08), "eps=2/local": cell(0.15, 0.02), "eps=inf/local": cell(0.19, 0.17)}


def test_epsilon_series_has_each_scope_alone_and_mostpop_pooled_by_users() -> None:
    from fedsocial.simulations.privacy_grid import compute_epsilon_series

    # Prepare
    results = _partner_grid()
    # Execute
    xs, series = compute_epsilon_series(results, [8.0, 2.0, math.inf, 4.0], ["local"])
    # Assert: finite epsilons in order (4 not run: a gap), user-weighted means, MostPop flat
    assert xs == [2.0, 4.0, 8.0]
    assert series["partner scope served"][0] == 0.15 and math.isnan(series["partner scope served"][1])
    assert series["joint scope"][2] == pytest.approx((100 * 0.08 + 300 * 0.04) / 400)
    assert series["alone"][0] == pytest.approx((100 * 0.20 + 300 * 0.10) / 400)
    assert series["MostPop"] == [0.06] * 3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_grid_report_renders_in_headless_chromium_with_a_curve_per_scope(tmp_path: Path) -> None:
    from fedsocial.simulations.privacy_grid import render_grid_report
    from tests.browser import open_page

    # Prepare
    path = tmp_path / "report.html"
    path.write_text(render_grid_report(_partner_grid(), [1.0, 2.0, 8.0, math.inf], ["local"]), encoding="utf-8")
    # Execute
    with open_page(path.as_uri()) as page:
        text = page.inner_text("body")
        curves = page.evaluate("""() => [...document.querySelectorAll('svg polyline')].map(
            p => ({points: p.points.numberOfItems, width: p.getBBox().width}))""")
        legend = page.evaluate("() => [...document.querySelectorAll('svg text')].map(t => t.textContent)")
    # Assert: four curves (partner scope, joint scope, alone: the two run epsilons; MostPop: all three), drawn wide
    assert [c["points"] for c in curves] == [2, 2, 2, 3] and min(c["width"] for c in curves) > 100
    shown = {"partner scope served", "joint scope", "alone", "MostPop", "epsilon (log scale)", "1", "2", "8"}
    assert shown <= set(legend)
    assert "without privacy (epsilon inf): local: 0.1900" in text
    assert "partner-1" in text and "mix:finetune:0.5" in text and "1.020" in text
