"""A self-contained HTML report of a federated run: no external assets, inline SVG plots drawn here.

``python -m fedsocial.simulations.report RUN_DIR`` (re)writes ``RUN_DIR/report.html`` from ``metrics.json``.
"""

from __future__ import annotations

import html
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsocial.shared.fileio import write_text_atomic

METRIC_KEYS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def compute_axis_range(values: Sequence[float]) -> tuple[float, float]:
    """[lo, hi] covering the finite values with 5 % headroom; a flat series gets a unit-width window."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        return lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def compute_nice_step(span: float, n: int = 4) -> float:
    """A 1-2-5 x 10^k step giving about ``n`` intervals over ``span`` (Heckbert, "Nice numbers for
    graph labels", Graphics Gems 1990)."""
    raw = span / max(n, 1)
    if not math.isfinite(raw) or raw <= 0:
        return 1.0
    base = 10.0 ** math.floor(math.log10(raw))
    frac = raw / base
    return base * (1.0 if frac < 1.5 else 2.0 if frac < 3.0 else 5.0 if frac < 7.0 else 10.0)


def compute_ticks(lo: float, hi: float, n: int = 4, min_step: float = 0.0) -> tuple[list[float], int]:
    """Tick values at multiples of a nice step (at least ``min_step``) inside [lo, hi], and the decimals
    that show the step."""
    step = max(compute_nice_step(hi - lo, n), min_step)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [round(k * step, decimals) + 0.0 for k in range(first, last + 1)], decimals


def format_number(value: Any, key: str = "") -> str:
    """A number for people: delta and other tiny or huge magnitudes in scientific notation
    (``1e-05``, not ``0.0000``), integers as integers, the rest with four decimals."""
    if value is None:  # a metric that was not published (null in metrics.json)
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "n/a" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if key == "delta" or (value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5)):
        mantissa, exp = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp):+03d}"
    return f"{value:.4f}"


def compute_points(xs: Sequence[float], ys: Sequence[float], box: tuple[float, float, float, float],
                   x_range: tuple[float, float], y_range: tuple[float, float]) -> list[tuple[float, float]]:
    """Data -> SVG pixel coordinates inside ``box`` = (left, top, width, height); y grows downwards."""
    left, top, width, height = box
    (x0, x1), (y0, y1) = x_range, y_range
    sx = width / (x1 - x0) if x1 > x0 else 0.0
    sy = height / (y1 - y0) if y1 > y0 else 0.0
    return [(left + (x - x0) * sx if x1 > x0 else left + width / 2, top + height - (y - y0) * sy)
            for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]


def compute_legend_layout(names: Sequence[str], left: float, width: float) -> list[tuple[float, int]]:
    """Each legend entry's (x, row): entries as wide as their names (about 6.5 px a character at 11 px),
    wrapping onto a new row when the next would pass ``width``."""
    out, x, row = [], left, 0
    for name in names:
        span = 14 + 6.5 * len(name) + 14
        if x > left and x + span > width:
            x, row = left, row + 1
        out.append((x, row))
        x += span
    return out


def svg_line_plot(title: str, xs: Sequence[float], series: Mapping[str, Sequence[float]],
                  width: int = 460, height: int = 260, x_label: str = "round",
                  x_ticks: Sequence[tuple[float, str]] | None = None) -> str:
    """An inline SVG line chart with axes, ticks and a legend; x ticks at whole numbers (rounds) unless
    ``x_ticks`` gives them as (position, label) (a grid's epsilons on a log scale)."""
    legend = compute_legend_layout(list(series), 52.0, width - 8.0)
    rows = 1 + max((row for _, row in legend), default=0)
    box = (52.0, 28.0, width - 70.0, height - 76.0 - 13.0 * (rows - 1))
    all_y = [v for ys in series.values() for v in ys]
    y_range = compute_axis_range(all_y)
    x_range = (min(xs), max(xs)) if xs else (0.0, 1.0)
    left, top, w, h = box
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    ticks, decimals = compute_ticks(*y_range)
    for yv in ticks:  # rounded values at a 1-2-5 step, not the raw range's fractions
        (_, py), = compute_points([x_range[0]], [yv], box, x_range, y_range)
        parts.append(f'<line x1="{left - 4}" y1="{py:.1f}" x2="{left + w}" y2="{py:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end" font-size="10">'
                     f'{yv:.{decimals}f}</text>')
    if x_ticks is not None:
        x_tick_labels = [(float(v), html.escape(label)) for v, label in x_ticks]
    else:
        found, x_decimals = (compute_ticks(*x_range, n=min(8, len(set(xs)) - 1), min_step=1.0)  # whole rounds
                             if len(set(xs)) > 1 else (sorted(set(xs)), 0))
        x_tick_labels = [(v, f"{v:.{x_decimals}f}") for v in found]
    for xv, label in x_tick_labels:
        (px, _), = compute_points([xv], [y_range[0]], box, x_range, y_range)
        parts.append(f'<text x="{px:.1f}" y="{top + h + 14}" text-anchor="middle" font-size="10">{label}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{top + h + 28}" text-anchor="middle" font-size="11">'
                 f'{html.escape(x_label)}</text>')
    for k, ((name, ys), (lx, row)) in enumerate(zip(series.items(), legend, strict=True)):
        colour = COLOURS[k % len(COLOURS)]
        pts = compute_points(xs, ys, box, x_range, y_range)
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        ly = top + h + 44 + 13 * row
        parts.append(f'<rect x="{lx:.1f}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{lx + 14:.1f}" y="{ly}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: Any) -> str:
    return format_number(v)


def _num(v: Any) -> float:
    """A plotted value: NaN for a metric that was not published (null in metrics.json)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table; a row whose first cell is "delta" shows its value in scientific notation."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{format_number(c, str(row[0]) if j else '')}</td>"
                                    for j, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(doc: dict[str, Any], title: str = "fedsocial federated run") -> str:
    """The whole report as one HTML string (inline CSS and SVG only)."""
    rounds = doc.get("rounds", [])
    xs = [float(r["round"]) for r in rounds]
    plots = [svg_line_plot(f"{kind}@K per round", xs,
                           {f"{kind}@{k}": [_num(r.get(f"{kind}@{k}")) for r in rounds] for k in (10, 20)})
             for kind in ("ndcg", "recall", "hr")]
    if any("epsilon_max" in r for r in rounds):
        plots.append(svg_line_plot("epsilon (max over partners)", xs,
                                   {"epsilon": [_num(r.get("epsilon_max")) for r in rounds]}))
    final_rows = [(k, doc.get(k, math.nan)) for k in METRIC_KEYS]
    if "epsilon" in doc:
        final_rows += [("epsilon (max over partners)", doc["epsilon"]), ("delta", doc.get("delta"))]
    for key in ("rounds_completed", "simulation_wall_time_s", "federation_time_s", "partner_fit_time_s",
                "partner_eval_time_s", "federation_overhead", "federation_overhead_incl_eval", "secure_aggregation"):
        if doc.get(key) is not None:
            final_rows.append((key.replace("_", " "), doc[key]))
    partners = doc.get("partners", {})
    p_cols = ["num_users", "evaluated_users", *METRIC_KEYS, "epsilon", "budget_exhausted", "fit_time_s_total",
              "eval_time_s_total"]
    p_rows = [[pid, *[info.get(c, "") for c in p_cols]] for pid, info in sorted(partners.items())]
    r_rows = [[r["round"], *[r.get(k, math.nan) for k in ("ndcg@10", "recall@10", "hr@10")],
               len(r.get("accepted", [])), len(r.get("dropped", [])), ", ".join(r.get("budget_exhausted", [])),
               r.get("epsilon_max", ""), r.get("round_time_s", math.nan)] for r in rounds]
    dropped = doc.get("dropped_replies", [])
    alone_rows = [[pid, info.get("served", info).get("ndcg@10", math.nan), info["alone"].get("ndcg@10", math.nan),
                   info.get("served_over_alone", math.nan), info.get("served", info).get("recall@10", math.nan),
                   info["alone"].get("recall@10", math.nan), info.get("personalisation", {}).get("choice", "")]
                  for pid, info in sorted(partners.items()) if isinstance(info.get("alone"), dict)]
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Final test metrics</h2>", render_table(["", "value"], final_rows),
        "<h2>Per round</h2>", '<div class="plots">' + "".join(plots) + "</div>",
        render_table(["round", "ndcg@10", "recall@10", "hr@10", "accepted", "dropped", "out of budget", "epsilon",
                "time (s)"], r_rows),
        "<h2>Partners</h2>", render_table(["partner", *[c.replace("_", " ") for c in p_cols]], p_rows),
        *(["<h2>Served vs alone (--compare-alone)</h2>",
           f"<p>federation gain (mean of served / alone NDCG@10): {_fmt(doc.get('federation_gain', math.nan))}</p>",
           render_table(["partner", "served ndcg@10", "alone ndcg@10", "served / alone", "served recall@10",
                   "alone recall@10", "served model"], alone_rows)] if alone_rows else []),
        "<h2>Dropped replies</h2>",
        render_table(["round", "partner", "reason"],
                     [[d.get("round"), d.get("partner"), d.get("reason")] for d in dropped])
        if dropped else "<p>none</p>",
    ]
    if "privacy_model" in doc:
        sections += ["<h2>Privacy model</h2>", f"<p>{html.escape(doc['privacy_model'])}</p>"]
    sections += ["<h2>Config</h2>", f"<pre>{html.escape(json.dumps(doc.get('config', {}), indent=2))}</pre>"]
    return render_page(title, sections)


def render_page(title: str, sections: Sequence[str]) -> str:
    """A self-contained HTML page (inline CSS) of the given HTML sections."""
    css = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
           ".plots{display:flex;flex-wrap:wrap;gap:12px}pre{background:#f8f8f8;padding:1em}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{css}</style></head><body>{''.join(sections)}</body></html>\n")


def write_report(run_dir: Path, doc: dict[str, Any]) -> Path:
    path = Path(run_dir) / "report.html"
    write_text_atomic(path, render_report(doc, f"fedsocial federated run: {Path(run_dir).name}"))  # a link: replaced
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedsocial.simulations.report RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        print(f"error: {metrics}: no such file", file=sys.stderr)
        return 2
    print(write_report(run_dir, json.loads(metrics.read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
