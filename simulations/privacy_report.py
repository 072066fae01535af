"""The human-readable outputs of an audit: the summary table and the self-contained HTML privacy report.

Rendering only: every number comes from :class:`shared.privacy.audit.AuditResult`.
"""

from __future__ import annotations

import html
import math
from typing import Any

from fedsocial.shared.privacy.audit import (
    EXIT_OK,
    PRIVACY_MODEL,
    RECOMPUTE_RTOL,
    AuditResult,
    PartnerReport,
    noise_text,
    scope_note,
    trust_text,
)
from fedsocial.shared.privacy.ledger import ADJACENCY


def summary_table(result: AuditResult) -> str:
    header = ("partner", "rounds", "steps", "sigma", "q", "acct", "epsilon", "eps_rdp", "eps_prv", "dp_rdp",
              "dp_pld", "cap", "delta", "users", "status")
    rows = [header]
    for p in result.partners:
        last = p.rounds[-1] if p.rounds else None
        bad = sorted({f.severity for f in result.findings if f.partner == p.partner_id and f.severity != "warning"})
        rows.append((
            p.partner_id, str(p.training_rounds), str(p.total_steps),
            _span({r.noise_multiplier for r in p.rounds}), _span({r.sample_rate for r in p.rounds}),
            last.accountant if last else "-", f"{p.epsilon:.4g}",
            *((f"{last.epsilon_rdp:.4g}", f"{last.epsilon_prv:.4g}", f"{last.epsilon_dp_accounting:.4g}",
               f"{last.epsilon_pld:.4g}") if last else ("-",) * 4),
            f"{p.max_epsilon:g}" if p.max_epsilon is not None else "-",
            f"{last.target_delta:.3g}" if last else "-", str(last.population) if last else "-",
            "ok" if not bad else "FAIL(" + ",".join(bad) + ")",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    notes = compute_run_notes(result)
    return "\n".join([table, *(f"note: {n}" for n in notes), *([f"note: {RECOMPUTATION_EXPLAINED}"] if notes else [])])


RECOMPUTATION_EXPLAINED = (
    "Independent accountants bound the same mechanism slightly differently (RDP orders, numerical "
    f"methods); the audit fails a ledger only when its value is more than {RECOMPUTE_RTOL:.0%} below the "
    "tighter of dp_accounting's RDP and PLD recomputations, and holds the cap against the accountant of record.")


def compute_recomputation_notes(p: PartnerReport, digits: int = 4) -> list[str]:
    """A sentence for each independent recomputation of a partner's final epsilon that differs from the
    ledger at ``digits`` significant digits (dp_accounting's RDP checks the ledger's RDP value, its PLD
    the ledger's PRV value), saying how the cap applies; :data:`RECOMPUTATION_EXPLAINED` says why."""
    if not p.rounds:
        return []
    last, notes = p.rounds[-1], []
    for method, recomputed, recorded, name in (("RDP", last.epsilon_dp_accounting, last.epsilon_rdp, "rdp"),
                                               ("PLD", last.epsilon_pld, last.epsilon_prv, "prv")):
        if not (math.isfinite(recomputed) and math.isfinite(recorded)) or recorded <= 0:
            continue
        if f"{recomputed:.{digits}g}" == f"{recorded:.{digits}g}":
            continue
        text = (f"{p.partner_id}: dp_accounting's {method} recomputation gives epsilon {recomputed:.{digits}g}, "
                f"the ledger {recorded:.{digits}g} ({(recomputed - recorded) / recorded:+.2%})")
        cap = p.max_epsilon
        if cap is not None and recomputed > cap >= last.epsilon:
            text += (f"; above the cap of {cap:g}, but the cap is held against the accountant of record "
                     f"({last.accountant}: {last.epsilon:.{digits}g}), so this is not a budget violation.")
        elif name != last.accountant:
            text += f"; a cross-check only (the accountant of record is {last.accountant})."
        else:
            text += "."
        notes.append(text)
    return notes


def compute_run_notes(result: AuditResult) -> list[str]:
    """:func:`compute_recomputation_notes` over all partners, one sentence for partners that share it."""
    grouped: dict[str, list[str]] = {}
    for p in result.partners:
        for note in compute_recomputation_notes(p):
            grouped.setdefault(note.removeprefix(f"{p.partner_id}: "), []).append(p.partner_id)
    return [f"{', '.join(ids)}: {text}" for text, ids in grouped.items()]


_CANARY_ROWS = (  # (key in canary_audit.json, label)
    ("reported_epsilon", "accounted epsilon of the audited schedule"), ("delta", "delta"),
    ("confidence", "confidence of the lower bound"), ("canaries", "canary users"),
    ("canary_items", "items per canary"), ("included", "canaries included in training"),
    ("guesses", "membership guesses made"), ("correct", "correct guesses"),
    ("noise_multiplier", "noise multiplier"), ("sample_rate", "sample rate"), ("rounds", "rounds"),
    ("local_epochs", "local epochs"), ("partner", "partner audited"), ("partner_users", "users of that partner"),
)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:.4g}"


def _canary_html(canary: dict[str, Any], accounted: float | None) -> str:
    """The canary audit as a table, its lower bound beside the run's accounted epsilon."""
    lb = canary.get("epsilon_lower_bound")
    rows = [("<strong>empirical epsilon lower bound</strong>", f"<strong>{_number(lb)}</strong>"),
            ("accounted epsilon of this run (ledger, largest over partners)",
             _number(accounted) if accounted is not None else "n/a")]
    rows += [(html.escape(label), _number(canary[key])) for key, label in _CANARY_ROWS if key in canary]
    method = html.escape(str(canary.get("method", "one-run canary audit")))
    body = "".join(f"<tr><td class='l'>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='canary'><caption>{method}</caption><tr><th class='l'>quantity</th>" \
           f"<th>value</th></tr>{body}</table>"


def _span(values: set[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g}-{hi:.4g}"


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def render_svg(result: AuditResult, width: int = 640, height: int = 320) -> str:
    """Cumulative epsilon per partner per round, with each cap dashed: plain SVG, no library."""
    left, right, top, bottom = 56, 140, 16, 40
    series = [(p.partner_id, [(r.round, r.epsilon) for r in p.rounds], p.max_epsilon) for p in result.partners]
    xs = [x for _, pts, _ in series for x, _ in pts] or [0, 1]
    ys = [y for _, pts, _ in series for _, y in pts] + [c for _, _, c in series if c is not None] + [0.0]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y1 = max(ys) * 1.08 or 1.0

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - y / y1) * (height - top - bottom)

    # No xmlns attribute: inline SVG in HTML5 needs none, and the report must contain no URL at all.
    out = [f'<svg width="{width}" height="{height}" role="img" '
           f'aria-label="cumulative epsilon per partner per round" font-family="sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'fill="none" stroke="#888"/>']
    step = _nice_step(y1 / 5)
    y1 = math.ceil(y1 / step) * step
    for i in range(int(round(y1 / step)) + 1):  # y ticks at round numbers
        v = step * i
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>'
                   f'<line x1="{left}" x2="{width - right}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>')
    for x in sorted(set(xs))[:: max(1, len(set(xs)) // 10)]:  # x ticks: at most about ten
        label = html.escape(str(x))
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">round</text>')
    out.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2})">cumulative epsilon</text>')
    for k, (name, pts, cap) in enumerate(series):
        colour = _COLOURS[k % len(_COLOURS)]
        if cap is not None:
            out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(cap):.1f}" y2="{sy(cap):.1f}" '
                       f'stroke="{colour}" stroke-dasharray="5 4" opacity="0.7"/>')
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        ly = top + 14 + 16 * k
        out.append(f'<line x1="{width - right + 10}" x2="{width - right + 28}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{colour}" stroke-width="2"/><text x="{width - right + 32}" y="{ly}">'
                   f'{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= ``raw``."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw * (1 - 1e-12))


def compute_run_settings(result: AuditResult) -> tuple[dict[str, Any], str]:
    """The run's SecAgg+, server-noise and selection settings, and where they come from: the signed manifest
    when the audit verified one, else the run's unsigned config (said so, since anyone can rewrite it)."""
    manifest = result.records.get("manifest")
    if isinstance(manifest, dict):
        fed, priv = manifest.get("federation") or {}, manifest.get("privacy") or {}
        return ({"secure_aggregation": fed.get("secure_aggregation"),
                 "server_noise_multiplier": fed.get("server_noise_multiplier"),
                 "select_on_validation": priv.get("select_on_validation")}, "the signed run manifest")
    cfg = result.context.get("config", {})
    return ({"secure_aggregation": (cfg.get("secagg") or {}).get("enabled"),
             "server_noise_multiplier": (cfg.get("federation") or {}).get("server_noise_multiplier"),
             "select_on_validation": (cfg.get("privacy") or {}).get("select_on_validation")},
            f"the run's {result.context.get('config_file', 'config')} (unsigned, not verified)")


def _trust_model(result: AuditResult) -> str:
    settings, source = compute_run_settings(result)
    secagg, server_noise = settings["secure_aggregation"], settings["server_noise_multiplier"]
    secagg_text = {True: "SecAgg+ was ON in this run: the server saw only the sum of the partners' updates",
                   False: "SecAgg+ was OFF in this run: the server saw each partner's clipped update",
                   None: "SecAgg+ setting unknown"}[secagg if isinstance(secagg, bool) else None]
    noise = (f" Server-side noise multiplier: {server_noise} (partner-level DP on top)." if
             isinstance(server_noise, (int, float)) and server_noise > 0 else "")
    return ("The server (and every other partner) sees only clipped updates of the shared parameters "
            "(item table, item biases, history table, per-category vectors if used, MLP, aggregator); "
            "user-specific social embeddings "
            f"and any per-user vectors stay on the partner. {secagg_text} (from {source}).{noise} "
            f"Keys: {trust_text(result)}.")


def _records_text(result: AuditResult) -> str:
    rec = result.records
    expected = rec.get("expected_partners") or []
    return (f"Expected partners from the signed records: {', '.join(expected) or 'none'}; rounds completed "
            f"per the server's signed heads: {rec.get('rounds_completed', 'unknown')}.")


def metrics_text(result: AuditResult) -> str:
    """Whether metrics.json (the published NDCG, recall, per-partner metrics, epsilon) is the one the server
    signed, as the audit found it."""
    verdict = result.records.get("metrics")
    if not isinstance(verdict, dict):
        return "not checked (no metrics.json and no signed records of it)"
    return str(verdict.get("note", "unknown"))


def canary_text(result: AuditResult) -> str:
    """Whether canary_audit.json is the one ``fedsocial canary-audit`` signed, as the audit found it ("" when
    the folder holds neither the file nor its record)."""
    verdict = result.records.get("canary")
    return str(verdict.get("note", "unknown")) if isinstance(verdict, dict) else ""


def _selection_text(result: AuditResult) -> str:
    settings, source = compute_run_settings(result)
    sel = settings["select_on_validation"]
    if sel is True:
        return ("Epoch/hyperparameter selection on validation data was ON: that selection uses private data "
                f"and is not covered by the ledger's epsilon unless accounted separately (from {source}).")
    if sel is False:
        return f"A fixed training schedule was used (no selection on validation data; from {source})."
    return f"Whether selection on validation data was used is not recorded in {source}."


CAVEATS = (
    "Not hidden: that a user appears in another user's out-neighbour list (that list is the other "
    "user's record), the item catalogue, and each partner's number of users.",
    "Choosing the epoch or hyperparameters on validation data is itself a use of private data: it "
    "counts against the budget unless a fixed schedule is used.",
    "A user's own recommendations may use that user's own data (joint DP): the guarantee covers "
    "everything released beyond user u, not u's own recommendation list.",
    "The guarantee is per partner: each partner's users are protected by that partner's epsilon; a "
    "person registered with several partners is several users.",
    "Multi-hop propagation over other users' records is excluded from DP training; adding it would "
    "break the one-record-one-example argument.",
    "Epsilon is an upper bound from the accountant; an empirical canary audit can only give a lower bound.",
)


def render_html(result: AuditResult) -> str:
    """A self-contained report (inline CSS and SVG, no external references)."""
    esc = html.escape
    eps_all = [p.epsilon for p in result.partners]
    deltas = sorted({r.target_delta for p in result.partners for r in p.rounds})
    rounds_all = [len(p.rounds) for p in result.partners]
    steps_all = [p.total_steps for p in result.partners]
    status = "VERIFIED" if result.exit_code == EXIT_OK else f"FAILED (exit code {result.exit_code})"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fedsocial privacy report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}.bad{color:#b00}.ok{color:#070}"
        "dt{font-weight:bold;margin-top:.4em}</style></head><body>",
        "<h1>fedsocial privacy report</h1>",
        f"<p>Run: <code>{esc(result.run_dir)}</code>. Audit result: "
        f"<strong class='{'ok' if result.exit_code == EXIT_OK else 'bad'}'>{status}</strong>.</p>",
        "<h2>The guarantee (as NIST SP 800-226 asks it to be stated)</h2><dl>",
        f"<dt>Epsilon</dt><dd>{'largest over partners ' + format(max(eps_all), '.4g') if eps_all else 'n/a'}"
        " (cumulative over all rounds; per partner below)</dd>",
        f"<dt>Delta</dt><dd>{', '.join(format(d, '.3g') for d in deltas) or 'n/a'} per partner; each checked "
        "below 1/(number of the partner's users)</dd>",
        f"<dt>Scope</dt><dd>{esc(scope_note(result.scope))}</dd>",
        f"<dt>Unit of privacy</dt><dd>{esc(PRIVACY_MODEL['unit'])}</dd>",
        f"<dt>Adjacency</dt><dd>{esc(ADJACENCY)} (add/remove)</dd>",
        f"<dt>DP variant</dt><dd>{esc(PRIVACY_MODEL['dp_variant'])}: everything released beyond user u "
        "(shared parameters, partner updates, other users' recommendations) is (epsilon, delta)-DP with "
        "respect to u's record</dd>",
        f"<dt>Mechanism</dt><dd>{esc(PRIVACY_MODEL['mechanism'])}</dd>",
        *([f"<dt>Noise</dt><dd>{esc(noise_text(result))}</dd>"] if noise_text(result) else []),
        f"<dt>Accountant</dt><dd>{esc(PRIVACY_MODEL['accountant'])}; recomputation tolerance "
        f"{RECOMPUTE_RTOL:.0%} (recorded may not fall below it)</dd>",
        f"<dt>Compositions</dt><dd>rounds per partner: {', '.join(map(str, rounds_all)) or 'n/a'}; "
        f"DP-SGD steps per partner: {', '.join(map(str, steps_all)) or 'n/a'}</dd>",
        f"<dt>Trust model</dt><dd>{esc(_trust_model(result))} {esc(_records_text(result))}</dd>",
        f"<dt>Published results (metrics.json)</dt><dd>{esc(metrics_text(result))}</dd>",
        f"<dt>Hyperparameter selection</dt><dd>{esc(_selection_text(result))}</dd>",
        "</dl><h2>Caveats</h2><ul>", *[f"<li>{esc(c)}</li>" for c in CAVEATS], "</ul>",
        "<h2>Empirical lower bound</h2>",
    ]
    if result.canary:
        lb = result.canary.get("epsilon_lower_bound")
        cost = result.canary.get("privacy_cost")
        cost_note = f"<p>Privacy cost of the canary audit: {esc(str(cost.get('note')))}.</p>" \
            if isinstance(cost, dict) and cost.get("note") else ""
        parts.append(f"<p>Canary audit: empirical epsilon lower bound <strong>{_number(lb)}</strong> "
                     f"(canary_audit.json: {esc(canary_text(result))}).</p>" + cost_note
                     + _canary_html(result.canary, result.ledger_max_epsilon))
    elif canary_text(result):  # a file the audit would not read as the canary audit's: not shown
        parts.append(f"<p>Canary audit not shown: canary_audit.json {esc(canary_text(result))}.</p>")
    else:
        parts.append("<p>No canary audit in this run (<code>canary_audit.json</code> absent).</p>")
    parts += ["<h2>Cumulative epsilon per round</h2>", render_svg(result)]
    notes = compute_run_notes(result)
    if notes:
        parts += ["<h2>Independent recomputations</h2>", *[f"<p class='note'>{esc(n)}</p>" for n in notes],
                  f"<p>{esc(RECOMPUTATION_EXPLAINED)}</p>"]
    parts.append("<h2>Findings</h2>")
    parts.append("<ul>" + "".join(f"<li class='{'ok' if f.severity == 'warning' else 'bad'}'>{esc(str(f))}</li>"
                                  for f in result.findings) + "</ul>" if result.findings else "<p>None.</p>")
    for p in result.partners:
        parts.append(_partner_html(p))
    parts.append("</body></html>")
    return "\n".join(parts)


def _partner_html(p: PartnerReport) -> str:
    esc = html.escape
    head = (f"<h2>Partner {esc(p.partner_id)}</h2><p>Key {esc(p.key_fingerprint[:16])}&hellip; from "
            f"<code>{esc(p.key_source)}</code>; cap {esc(str(p.max_epsilon if p.max_epsilon is not None else 'none'))} "
            f"({esc(p.cap_source or 'n/a')}); final epsilon {p.epsilon:.4g}; "
            f"scope {esc(p.scope or 'not recorded')}; DP evaluation releases {p.eval_releases}; "
            f"DP popularity releases {p.popularity_releases}; "
            f"DP selections of the served model {p.selection_releases}; "
            f"{'verified' if p.verified else 'NOT verified'}.</p>")
    cols = ("round", "sigma", "q", "steps", "C", "delta", "users", "accountant", "eps RDP", "eps PRV",
            "dp_accounting RDP", "dp_accounting PLD")
    rows = "".join(
        # every field escaped: a ledger whose key is missing is shown unverified, its strings as the file holds them
        f"<tr><td>{esc(str(r.round))}{'' if r.release == 'training' else ' (' + esc(str(r.release)) + ')'}</td>"
        f"<td>{r.noise_multiplier:.4g}</td><td>{r.sample_rate:.4g}</td><td>{esc(str(r.steps))}</td>"
        f"<td>{r.max_grad_norm:.3g}</td><td>{r.target_delta:.3g}</td><td>{esc(str(r.population))}</td>"
        f"<td>{esc(str(r.accountant))}</td><td>{r.epsilon_rdp:.4f}</td><td>{r.epsilon_prv:.4f}</td>"
        f"<td>{r.epsilon_dp_accounting:.4f}</td><td>{r.epsilon_pld:.4f}</td></tr>"
        for r in p.rounds
    )
    table = "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + rows + "</table>"
    refused = ""
    if p.refusals:
        refused = "<p>Rounds refused (nothing released or charged):</p><ul>" + "".join(
            f"<li>round {esc(str(r.get('round')))}: {esc(str(r.get('reason') or 'budget'))}</li>"
            for r in p.refusals) + "</ul>"
    return head + table + refused


