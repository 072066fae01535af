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
