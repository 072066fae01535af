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


# --- privacy_report.html (the renderer is simulations/privacy_report.py) --------------------------------


def _audit_result(recomputed_rdp: float = 8.002, cap: float = 8.0) -> Any:
    from fedsocial.shared.privacy.audit import AuditResult, PartnerReport, RoundRow

    def row(rnd: int, eps: float, eps_dp: float) -> RoundRow:
        return RoundRow(round=rnd, noise_multiplier=0.638, sample_rate=0.25, steps=8 * rnd, max_grad_norm=0.1,
                        target_delta=1e-5, population=200, accountant="rdp", epsilon=eps, epsilon_rdp=eps,
                        epsilon_prv=eps - 0.5, epsilon_dp_accounting=eps_dp, epsilon_pld=eps - 0.5,
                        timestamp="2026-12-01T00:00:00Z")

    partners = [PartnerReport(partner_id=f"partner-{k}", rounds=[row(1, 4.1, 4.1), row(2, 7.9954, recomputed_rdp)],
                              max_epsilon=cap, cap_source="config", verified=True) for k in range(2)]
    canary = {"method": "one-run audit (Steinke, Nasr and Jagielski 2023)", "epsilon_lower_bound": 0.37,
              "confidence": 0.95, "reported_epsilon": 7.9954, "delta": 1e-5, "canaries": 300, "canary_items": 5,
              "included": 151, "guesses": 40, "correct": 27, "noise_multiplier": 0.638, "sample_rate": 0.25}
    return AuditResult(run_dir="runs/demo", partners=partners, canary=canary, scope="joint")


def test_a_recomputation_above_the_cap_gets_a_sentence() -> None:
    # Prepare
    from fedsocial.simulations.privacy_report import compute_recomputation_notes, summary_table

    result = _audit_result()
    # Execute
    notes = compute_recomputation_notes(result.partners[0])
    table = summary_table(result)
    # Assert: the 8.002 > cap 8 case the issue names is explained, once for both partners in the CLI table
    assert len(notes) == 1 and "RDP recomputation gives epsilon 8.002, the ledger 7.995 (+0.08%)" in notes[0]
    assert "above the cap of 8, but the cap is held against the accountant of record (rdp: 7.995)" in notes[0]
    assert table.count("note: partner-0, partner-1: dp_accounting's RDP") == 1 and "holds the cap against" in table


def test_no_sentence_when_the_recomputation_agrees() -> None:
    from fedsocial.simulations.privacy_report import compute_recomputation_notes

    result = _audit_result(recomputed_rdp=7.99541)
    assert compute_recomputation_notes(result.partners[0]) == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_privacy_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    # Prepare
    from fedsocial.simulations.privacy_report import render_html

    path = tmp_path / "privacy_report.html"
    path.write_text(render_html(_audit_result()), encoding="utf-8")
    # Execute
    with open_page(path.as_uri()) as page:
        text = page.inner_text("body")
        canary = page.evaluate("""() => [...document.querySelectorAll('table.canary tr')].map(
            tr => [...tr.children].map(td => td.innerText))""")
        plot = page.evaluate("""() => { const svg = document.querySelector('svg');
            const lines = [...svg.querySelectorAll('polyline, path, line')].filter(e => e.getBBox().width > 0);
            return {shown: svg.getBoundingClientRect().width, drawn: lines.length}; }""")
        page.screenshot(path=str(tmp_path / "privacy.png"), full_page=True)
    # Assert: the canary audit is a table with the lower bound beside the accounted epsilon (no JSON dump),
    # delta in scientific notation, the recomputation sentence, a drawn epsilon plot
    rows = {r[0]: r[1] for r in canary if len(r) == 2}
    assert rows["empirical epsilon lower bound"] == "0.37"
    assert rows["accounted epsilon of this run (ledger, largest over partners)"] == "7.995"
    assert rows["correct guesses"] == "27" and "{" not in text
    assert "1e-05" in text and "above the cap of 8" in text
    assert plot["shown"] > 0 and plot["drawn"] >= 2
    assert screenshot_variance(tmp_path / "privacy.png") > 10.0
