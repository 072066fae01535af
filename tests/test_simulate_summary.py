"""``fedsocial simulate`` prints the federation's overhead it records in metrics.json (issue 14 item 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsocial.simulations.simulate import METRIC_KEYS, summary


def _doc(**extra: Any) -> dict[str, Any]:
    return {**{k: 0.1 for k in METRIC_KEYS}, "rounds_completed": 5, "simulation_wall_time_s": 30.0,
            "federation_time_s": 20.0, "partner_fit_time_s": 10.0, **extra}


def test_summary_prints_both_overhead_ratios_of_metrics_json() -> None:
    # Prepare: the ratios as run_simulation_from_config records them (wall / fit, wall / (fit + eval))
    doc = _doc(federation_overhead=3.0, federation_overhead_incl_eval=1.5)
    # Execute
    text = summary(doc, Path("runs/x"))
    # Assert
    assert "overhead    3.00 x the partners' training (1.50 x with their evaluation)" in text


def test_summary_omits_the_overhead_when_no_partner_trained() -> None:
    # Prepare: metrics.json holds None when the partners' training time is 0
    doc = _doc(federation_overhead=None, federation_overhead_incl_eval=None)
    # Execute / Assert
    assert "overhead" not in summary(doc, Path("runs/x"))
