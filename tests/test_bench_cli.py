"""``fedsocial bench dp-cost ... --json``: the CLI contract of DESIGN.md (one JSON object with ``ratio``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedsocial.simulations import bench
from fedsocial.simulations.simulate import write_config
from tests.test_federation import tiny_config


def test_dp_cost_json_prints_one_object_with_the_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    config = write_config(tiny_config(), tmp_path / "cfg")
    # Execute
    code = bench.main(["dp-cost", "--config", str(config), "--epochs", "1", "--repeats", "1", "--json"])
    # Assert: the last line of stdout is the JSON object, on one line
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    doc = json.loads(lines[-1])
    assert code == 0 and isinstance(doc, dict)
    assert math.isfinite(doc["ratio"]) and doc["ratio"] > 0


def test_calibration_bench_times_both_searches_and_they_agree() -> None:
    # Execute
    rows = bench.measure_calibration([(8.0, 1e-4, 0.5, 4)], repeats=1)
    # Assert
    assert len(rows) == 1 and rows[0]["same_sigma"] == 1.0
    assert rows[0]["guided_s"] > 0 and rows[0]["opacus_only_s"] > 0 and rows[0]["sigma"] > 0


def test_profile_times_the_local_refit_where_the_config_has_one(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the tiny federation config (user_embedding = local, 5 refit steps) and one without the refit
    config = write_config(tiny_config(), tmp_path / "cfg")
    # Execute
    code = bench.main(["profile", "--config", str(config)])
    out = capsys.readouterr().out
    doc = json.loads(out[out.index("{"):])
    no_refit = bench.measure_profile(tiny_config().replace("model", user_embedding="none"), None, dp=False)
    # Assert: every phase timed, the refit only where there is one
    assert code == 0
    assert doc["refit_wall_s"] > 0 and doc["refit_cpu_s"] > 0 and doc["epoch_wall_s"] > 0 and doc["eval_wall_s"] > 0
    assert "refit_wall_s" not in no_refit
