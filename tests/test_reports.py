"""report.html: numbers formatted for people, rounded ticks, and the page checked in headless Chromium
(it renders, its key numbers are on the page, its plots are non-empty)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fedsocial.simulations.report import compute_nice_step, compute_ticks, format_number, render_report, write_report
from tests.browser import open_page, screenshot_variance

METRICS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")


def _doc(rounds: int = 4) -> dict[str, Any]:
    """A metrics.json as `fedsocial simulate` writes it (the keys the report reads)."""
    rows = []
    for r in range(1, rounds + 1):
        row: dict[str, Any] = {k: 0.05 + 0.01 * r + 0.001 * j for j, k in enumerate(METRICS)}
        row.update(round=r, accepted=["partner-0", "partner-1"], dropped=[], budget_exhausted=[],
                   epsilon_max=2.0 * r - 0.001059 * r, round_time_s=1.5)
        rows.append(row)
    doc: dict[str, Any] = {k: rows[-1][k] for k in METRICS}
    doc.update(epsilon=7.995480313, delta=1e-5, rounds=rows, rounds_completed=rounds,
               partners={"partner-0": {"num_users": 36, "epsilon": 7.99, "ndcg@10": 0.0439},
                         "partner-1": {"num_users": 40, "epsilon": 7.99, "ndcg@10": 0.0419}},
               config={"privacy": {"target_delta": 1e-5}})
    return doc


def test_nice_steps_and_ticks_known_values() -> None:
    assert compute_nice_step(0.01036, 4) == pytest.approx(0.002)
    assert compute_nice_step(4.2, 4) == pytest.approx(1.0)
    assert compute_nice_step(0.3, 4) == pytest.approx(0.1)  # raw 0.075 rounds up to 1 x 10^-1
    assert compute_ticks(-0.00106, 0.0093) == ([0.0, 0.002, 0.004, 0.006, 0.008], 3)
    assert compute_ticks(7.49, 8.51) == ([7.6, 7.8, 8.0, 8.2, 8.4], 1)
    assert compute_ticks(1, 2, 1, min_step=1.0) == ([1.0, 2.0], 0)


@pytest.mark.parametrize(("value", "key", "shown"), [
    (1e-5, "delta", "1e-05"), (1e-6, "", "1e-06"), (2.5e-4, "", "2.5e-04"), (0.0, "", "0.0000"),
    (7.995480313, "", "7.9955"), (3, "", "3"), (123456.7, "", "1.23e+05"), (float("nan"), "", "n/a"),
    (True, "", "True"), ("<b>", "", "&lt;b&gt;"),
])
def test_format_number_known_values(value: Any, key: str, shown: str) -> None:
    assert format_number(value, key) == shown


def test_report_shows_delta_in_scientific_notation_and_rounded_ticks() -> None:
    # Prepare
    doc = _doc()
    # Execute
    page = render_report(doc)
    # Assert: delta is not 0.0000; every axis label is a short rounded number, no raw -0.001059
    assert "<td>delta</td><td>1e-05</td>" in page
    labels = re.findall(r'font-size="10">([^<]*)</text>', page)
    assert labels and all(re.fullmatch(r"-?\d+(\.\d{1,3})?", t) for t in labels), labels
    assert "0.001059" not in page


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_report_renders_in_headless_chromium_with_its_numbers_and_plots(tmp_path: Path) -> None:
    # Prepare
    doc = _doc(rounds=5)
    path = write_report(tmp_path, doc)
    # Execute
    with open_page(path.as_uri()) as page:
        text = page.inner_text("body")
        plots = page.evaluate("""() => [...document.querySelectorAll('svg')].map(svg => ({
            points: [...svg.querySelectorAll('polyline')].map(p => p.points.numberOfItems),
            width: [...svg.querySelectorAll('polyline')].map(p => p.getBBox().width),
            circles: svg.querySelectorAll('circle').length,
            shown: svg.getBoundingClientRect().width * svg.getBoundingClientRect().height }))""")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    # Assert: the headline numbers as the report formats them, and four drawn plots with a point per round
    for shown in ("1e-05", "7.9955", format_number(doc["ndcg@10"]), "Final test metrics", "Per round"):
        assert shown in text, shown
    assert len(plots) == 4  # ndcg, recall, hr, epsilon
    for plot in plots:
        assert plot["shown"] > 0 and all(n == 5 for n in plot["points"]) and all(w > 0 for w in plot["width"])
        assert plot["circles"] == 5 * len(plot["points"])
    assert screenshot_variance(tmp_path / "report.png") > 10.0
