"""``fedsocial audit RUN_DIR [--max-epsilon E] [--public-keys DIR]``: verify privacy ledgers, recompute budgets.

Layout contract (what a federated run writes; the auditor reads nothing else):

``RUN_DIR/ledgers/<partner_id>.jsonl``
    the partner's signed, hash-chained privacy ledger (:mod:`shared.privacy.ledger`), one entry per
    round it trained. ``partner_id`` matches ``[A-Za-z0-9_-]{1,64}``.
``RUN_DIR/ledgers/<partner_id>.pub``
    the partner's Ed25519 public key (PEM) as the partner wrote it. ``--public-keys DIR`` replaces it
    with ``DIR/<partner_id>.pub``: the auditor's trusted copies, obtained out of band (a key shipped
    next to the ledger only proves that the ledger is self-consistent).
``RUN_DIR/ledgers/<partner_id>.json`` (optional)
    the partner's declaration: ``{"max_epsilon": float, "target_delta": float, "population": int}``.
``RUN_DIR/ledgers/<partner_id>.refusals.jsonl`` (optional)
    rounds the partner refused to train because its budget was exhausted (informational, unsigned).
``RUN_DIR/ledger_heads.json`` (optional)
    ``{"<partner_id>": {"round": int, "hash": "<sha256 hex>"}}``: the newest entry of each ledger as
    recorded by the server; reveals ledgers whose newest entries were removed.
``RUN_DIR/config.json`` or ``RUN_DIR/config.toml``, ``RUN_DIR/metrics.json`` (optional)
    the run's configuration (``Config.to_dict()``, or the config TOML read with
    :func:`shared.config.load_config`) and metrics, for context (cap fallback:
    ``config.privacy.max_epsilon``; SecAgg+, server noise and validation-based selection are reported).
``RUN_DIR/canary_audit.json`` (optional)
    an empirical lower bound on epsilon from a canary audit: ``{"epsilon_lower_bound": float,
    "reported_epsilon": float, "private": bool, ...}``; a bound above the accounted epsilon of a
    private canary run is an accounting finding (exit 5).

What is checked, per partner: the chain, every signature and the key fingerprint, canonical form,
strictly increasing rounds, the cumulative ``epsilon_rdp`` re-derived from the recorded
(sigma, q, steps) with Opacus's RDP analysis; then both recorded epsilons are recomputed with Google's
``dp_accounting`` (independent of Opacus): ``epsilon_rdp`` by its RDP accountant, ``epsilon_prv`` by its
PLD accountant, and compared (see :data:`RECOMPUTE_RTOL`); the epsilon of the entry's accountant of
record (``accountant``: rdp or prv) against the cap (``--max-epsilon`` > the partner's declaration >
``config.json``); ``target_delta < 1/population`` for every round; and that ``metrics.json``'s
``epsilon`` does not understate the ledgers (a warning).

Writes ``RUN_DIR/audit.json`` and a self-contained ``RUN_DIR/privacy_report.html``, prints a summary.

Exit codes (the most severe wins, in this order):
  2  unreadable or missing input (no ledgers, a garbage line, a missing or bad key file, bad JSON)
  3  tampering: a signature, key fingerprint, hash-chain, canonical-form, round-order or head failure
  5  accounting mismatch: a recorded epsilon that the recorded history does not give, or a canary
     lower bound above the accounted epsilon
  4  budget violation: epsilon over the cap, or target_delta >= 1/population
  0  everything verified
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedsocial.shared import signing
from fedsocial.shared.privacy.accounting import (
    PrivacyConfigError,
    check_delta,
    compute_epsilon_dp_accounting,
    compute_epsilons_dp_accounting,
    compute_epsilons_pld,
)
from fedsocial.shared.privacy.ledger import (
    ADJACENCY,
    PARTNER_ID_RE,
    UNIT,
    LedgerError,
    history_of,
    is_number,
    scan_ledger,
    verify_head,
    verify_ledger,
)

EXIT_OK, EXIT_INPUT, EXIT_TAMPER, EXIT_BUDGET, EXIT_ACCOUNTING = 0, 2, 3, 4, 5
_SEVERITY = {"input": EXIT_INPUT, "tamper": EXIT_TAMPER, "accounting": EXIT_ACCOUNTING, "budget": EXIT_BUDGET}
_PRECEDENCE = ("input", "tamper", "accounting", "budget")
# The recorded epsilon_rdp (Opacus) may be below the dp_accounting recomputation by at most this
# fraction. dp_accounting's fractional-order series is conservative (it truncates and drops orders
# that do not converge) while Opacus's matches numerical integration (tests/test_accounting.py), so
# dp_accounting is 0-2% higher for epsilon up to ~20; a shortfall beyond 5% means the recorded
# epsilon does not follow from the recorded (sigma, q, steps). A recorded value *above* the
# recomputation is conservative (e.g. dp_accounting's extra orders 128..1024 at tiny epsilon) and
# is reported, not failed. The same rule holds epsilon_prv against dp_accounting's PLD accountant
# (both are tight; PRV's recorded value is the upper end of its error band, PLD's discretisation is
# pessimistic, and they agree within about 0.2% in the tests).
RECOMPUTE_RTOL = 0.05
_CAP_SLACK = 1e-9  # float noise when comparing epsilon with the cap

_TAMPER_KINDS = {"schema", "key", "signature", "chain", "order", "format", "partner", "head"}


@dataclass
class Finding:
    severity: str  # input|tamper|accounting|budget|warning
    partner: str | None
    round: int | None
    line: int | None
    message: str

    def __str__(self) -> str:
        where = [f"partner {self.partner}" if self.partner else "run"]
        if self.round is not None:
            where.append(f"round {self.round}")
        if self.line is not None:
            where.append(f"line {self.line}")
        return f"{self.severity.upper()}: {', '.join(where)}: {self.message}"


@dataclass
class RoundRow:
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    target_delta: float
    population: int
    accountant: str  # the accountant of record, whose epsilon is held to the cap
    epsilon: float  # cumulative epsilon of record (epsilon_prv when accountant == "prv", else epsilon_rdp)
    epsilon_rdp: float
    epsilon_prv: float
    epsilon_dp_accounting: float  # independent RDP recomputation (dp_accounting), checks epsilon_rdp
    epsilon_pld: float  # independent PLD recomputation (dp_accounting), checks epsilon_prv
    timestamp: str


@dataclass
class PartnerReport:
    partner_id: str
    key_source: str = ""
    key_fingerprint: str = ""
    rounds: list[RoundRow] = field(default_factory=list)
    max_epsilon: float | None = None
    cap_source: str = ""
    declared: dict[str, Any] = field(default_factory=dict)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    torn_tail_bytes: int = 0
    verified: bool = False

    @property
    def epsilon(self) -> float:
        return self.rounds[-1].epsilon if self.rounds else 0.0

    @property
    def total_steps(self) -> int:
        return sum(r.steps for r in self.rounds)


@dataclass
class AuditResult:
    run_dir: str
    partners: list[PartnerReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    canary: dict[str, Any] | None = None
    outputs_written: bool = False

    @property
    def ledger_max_epsilon(self) -> float | None:
        """The largest final epsilon over partners that trained (what metrics.json must not understate)."""
        return max((p.epsilon for p in self.partners if p.rounds), default=None)

    @property
    def exit_code(self) -> int:
        for severity in _PRECEDENCE:
            if any(f.severity == severity for f in self.findings):
                return _SEVERITY[severity]
        return EXIT_OK

    def add(self, severity: str, partner: str | None, rnd: int | None, line: int | None, msg: str) -> None:
        self.findings.append(Finding(severity, partner, rnd, line, msg))

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "exit_code": self.exit_code,
            "verified": self.exit_code == EXIT_OK,
            "privacy_model": PRIVACY_MODEL,
            "recompute_rtol": RECOMPUTE_RTOL,
            "partners": [
                {**asdict(p), "epsilon": p.epsilon, "total_steps": p.total_steps, "n_rounds": len(p.rounds)}
                for p in self.partners
            ],
            "findings": [asdict(f) for f in self.findings],
            "context": self.context,
            "canary": self.canary,
        }


PRIVACY_MODEL = {
    "unit": f"{UNIT}: one user of a partner platform (their interactions and their own out-neighbour list)",
    "adjacency": ADJACENCY,
    "dp_variant": "user-level joint differential privacy in the billboard model (Hsu et al. 2014; "
                  "Jain, Kothari, Thakurta 2018)",
    "mechanism": "DP-SGD: per-user clipping to max_grad_norm, Gaussian noise noise_multiplier * "
                 "max_grad_norm, Poisson sampling at sample_rate",
    "accountant": "RDP (Opacus) or PRV (Opacus), as each entry's accountant field says (the other is a "
                  "cross-check); independent recomputation with Google dp_accounting (RDP for epsilon_rdp, "
                  "PLD for epsilon_prv)",
}


# ---------------------------------------------------------------- reading


def _read_json(path: Path, result: AuditResult, partner: str | None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        result.add("input", partner, None, None, f"{path}: unreadable JSON: {exc}")
        return None


def _load_context(run: Path, result: AuditResult) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    for name in ("config", "metrics"):
        p = run / f"{name}.json"
        if p.exists():
            data = _read_json(p, result, None)
            if data is not None and not isinstance(data, dict):
                result.add("input", None, None, None, f"{p}: expected a JSON object")
            elif data is not None:
                ctx[name] = data
                ctx[f"{name}_file"] = p.name
    if "config" not in ctx and (run / "config.toml").exists():  # the TOML a run copies, with defaults filled
        from fedsocial.shared.config import ConfigError, load_config

        try:
            ctx["config"] = load_config(run / "config.toml").to_dict()
            ctx["config_file"] = "config.toml"
        except ConfigError as exc:
            result.add("input", None, None, None, str(exc))
    canary = run / "canary_audit.json"
    if canary.exists():
        data = _read_json(canary, result, None)
        if isinstance(data, dict):
            result.canary = data
    return ctx


def _config_cap(ctx: dict[str, Any]) -> float | None:
    cap = ctx.get("config", {}).get("privacy", {}).get("max_epsilon")
    return float(cap) if is_number(cap) else None


def _load_key(partner: str, ledgers: Path, keys_dir: Path | None, report: PartnerReport,
              result: AuditResult) -> Any:
    path = (keys_dir if keys_dir is not None else ledgers) / f"{partner}.pub"
    report.key_source = str(path)
    if not path.exists():
        result.add("input", partner, None, None, f"no public key {path}")
        return None
    try:
        key = signing.load_public_key(path)
    except signing.SigningError as exc:
        result.add("input", partner, None, None, str(exc))
        return None
    report.key_fingerprint = signing.fingerprint(key)
    return key


def _read_refusals(path: Path, partner: str, result: AuditResult) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            result.add("warning", partner, None, n, f"{path.name}: unreadable refusal line ignored")
            continue
        out.append(entry if isinstance(entry, dict) else {"raw": entry})
    return out


# ---------------------------------------------------------------- checks


def _audit_partner(partner: str, ledgers: Path, keys_dir: Path | None, cli_cap: float | None,
                   heads: dict[str, Any], result: AuditResult) -> PartnerReport:
    report = PartnerReport(partner_id=partner)
    key = _load_key(partner, ledgers, keys_dir, report, result)
    decl_path = ledgers / f"{partner}.json"
    if decl_path.exists():
        decl = _read_json(decl_path, result, partner)
        report.declared = decl if isinstance(decl, dict) else {}
    refusals = ledgers / f"{partner}.refusals.jsonl"
    if refusals.exists():
        report.refusals = _read_refusals(refusals, partner, result)
    try:
        scan = scan_ledger(ledgers / f"{partner}.jsonl")
    except LedgerError as exc:
        result.add("input", partner, exc.round, exc.line, exc.reason)
        return report
    if scan.torn_tail:
        report.torn_tail_bytes = len(scan.torn_tail)
        result.add("warning", partner, None, len(scan.entries) + 1,
                   f"torn last line ({len(scan.torn_tail)} bytes) ignored: a write was interrupted, and the "
                   "ledger is appended before an update is sent, so that round released nothing")
    n_before = len(result.findings)
    if key is not None:
        for p in verify_ledger(scan.entries, key, partner, scan.lines, raw=scan.raw):
            severity = "tamper" if p.kind in _TAMPER_KINDS else "accounting"
            result.add(severity, partner, p.round, p.line, f"{p.kind}: {p.message}")
        if partner in heads:
            head = heads[partner] if isinstance(heads[partner], dict) else {}
            for p in verify_head(scan.entries, head.get("round"), str(head.get("hash", "")), partner):
                result.add("tamper", partner, p.round, p.line, f"{p.kind}: {p.message}")
    structurally_ok = all(f.severity != "tamper" and f.severity != "input" for f in result.findings[n_before:])
    if structurally_ok:
        report.rounds = _recompute(partner, scan.entries, scan.lines, result)
    _check_budget(report, cli_cap, result)
    report.verified = key is not None and all(f.severity == "warning" for f in result.findings[n_before:])
    return report


def _recompute(partner: str, entries: list[dict[str, Any]], lines: list[int],
               result: AuditResult) -> list[RoundRow]:
    """Per-round rows, with each cumulative epsilon recomputed by dp_accounting (RDP and PLD)."""
    history = history_of(entries)
    deltas = {e["target_delta"] for e in entries}
    if len(deltas) == 1:  # the usual case: one pass, cumulative values after each round
        delta = deltas.pop()
        rdp, pld = compute_epsilons_dp_accounting(history, delta), compute_epsilons_pld(history, delta)
    else:
        rdp = [compute_epsilon_dp_accounting(history[: i + 1], e["target_delta"]) for i, e in enumerate(entries)]
        pld = [compute_epsilons_pld(history[: i + 1], e["target_delta"])[-1] for i, e in enumerate(entries)]
    rows = []
    for entry, line, eps_dp, eps_pld in zip(entries, lines, rdp, pld, strict=True):
        of_record = entry["epsilon_prv"] if entry["accountant"] == "prv" else entry["epsilon_rdp"]
        rows.append(RoundRow(
            round=entry["round"], noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"],
            steps=entry["steps"], max_grad_norm=entry["max_grad_norm"], target_delta=entry["target_delta"],
            population=entry["population"], accountant=entry["accountant"], epsilon=of_record,
            epsilon_rdp=entry["epsilon_rdp"], epsilon_prv=entry["epsilon_prv"], epsilon_dp_accounting=eps_dp,
            epsilon_pld=eps_pld, timestamp=str(entry.get("timestamp", "")),
        ))
        for name, recorded, recomputed, method in (("epsilon_rdp", entry["epsilon_rdp"], eps_dp, "RDP"),
                                                   ("epsilon_prv", entry["epsilon_prv"], eps_pld, "PLD")):
            if recorded < recomputed * (1 - RECOMPUTE_RTOL):
                result.add("accounting", partner, entry["round"], line,
                           f"recorded {name} {recorded:.6g} is below the dp_accounting {method} recomputation "
                           f"{recomputed:.6g} by more than {RECOMPUTE_RTOL:.0%}")
    return rows


def _check_budget(report: PartnerReport, cli_cap: float | None, result: AuditResult) -> None:
    partner = report.partner_id
    declared_cap = report.declared.get("max_epsilon")
    config_cap = _config_cap(result.context)
    if cli_cap is not None:
        report.max_epsilon, report.cap_source = cli_cap, "--max-epsilon"
    elif is_number(declared_cap):
        report.max_epsilon, report.cap_source = float(declared_cap), f"{partner}.json"
    elif config_cap is not None:
        report.max_epsilon, report.cap_source = config_cap, f"{result.context['config_file']} privacy.max_epsilon"
    else:
        result.add("warning", partner, None, None, "no epsilon cap declared: budget not checked")
    if report.max_epsilon is not None:
        over = [r for r in report.rounds if r.epsilon > report.max_epsilon + _CAP_SLACK]
        if over:
            result.add("budget", partner, over[0].round, None,
                       f"cumulative epsilon ({over[0].accountant}) {over[0].epsilon:.4g} exceeds the cap "
                       f"{report.max_epsilon:g} ({report.cap_source}); final epsilon {report.epsilon:.4g}")
    decl_delta, decl_pop = report.declared.get("target_delta"), report.declared.get("population")
    for r in report.rounds:
        try:
            check_delta(r.target_delta, r.population)
        except PrivacyConfigError as exc:
            result.add("budget", partner, r.round, None, str(exc))
        if isinstance(decl_delta, (int, float)) and not math.isclose(r.target_delta, decl_delta, rel_tol=1e-12):
            result.add("budget", partner, r.round, None,
                       f"target_delta {r.target_delta!r} differs from the declared {decl_delta!r}")
        if isinstance(decl_pop, int) and r.population != decl_pop:
            result.add("warning", partner, r.round, None,
                       f"population {r.population} differs from the declared {decl_pop}")


def run_audit(
    run_dir: str | Path, max_epsilon: float | None = None, public_keys_dir: str | Path | None = None,
    write: bool = True,
) -> AuditResult:
    """Audit every ledger under ``run_dir/ledgers``; write ``audit.json`` and ``privacy_report.html``."""
    run = Path(run_dir)
    result = AuditResult(run_dir=str(run))
    ledgers = run / "ledgers"
    keys_dir = Path(public_keys_dir) if public_keys_dir is not None else None
    if not run.is_dir():
        result.add("input", None, None, None, f"{run}: no such run directory")
        return result
    if keys_dir is not None and not keys_dir.is_dir():
        result.add("input", None, None, None, f"{keys_dir}: no such public-keys directory")
    result.context = _load_context(run, result)
    partners = sorted(p.name[: -len(".jsonl")] for p in ledgers.glob("*.jsonl")
                      if not p.name.endswith(".refusals.jsonl")) if ledgers.is_dir() else []
    if not partners:
        result.add("input", None, None, None, f"{ledgers}: no ledgers (<partner_id>.jsonl) found")
    heads: dict[str, Any] = {}
    if (run / "ledger_heads.json").exists():
        data = _read_json(run / "ledger_heads.json", result, None)
        heads = data if isinstance(data, dict) else {}
    for partner in partners:
        if not PARTNER_ID_RE.fullmatch(partner):
            result.add("input", partner, None, None, f"ledger file name {partner!r}.jsonl is not a valid partner id")
            continue
        result.partners.append(_audit_partner(partner, ledgers, keys_dir, max_epsilon, heads, result))
    _check_metrics(result)
    _check_canary(result)
    for pub in sorted(ledgers.glob("*.pub")) if ledgers.is_dir() else []:
        if pub.stem not in partners:
            result.add("warning", pub.stem, None, None, "a public key without a ledger (the partner never trained?)")
    if write:
        _write_outputs(run, result)
    return result


def _check_metrics(result: AuditResult) -> None:
    """metrics.json's ``epsilon`` (the largest over partners) must not understate the ledgers."""
    reported = result.context.get("metrics", {}).get("epsilon")
    ledger_max = result.ledger_max_epsilon
    if isinstance(reported, (int, float)) and ledger_max is not None and reported < ledger_max * (1 - 1e-6):
        result.add("warning", None, None, None,
                   f"metrics.json reports epsilon {reported:.6g}, below the ledgers' largest {ledger_max:.6g}")


def _check_canary(result: AuditResult) -> None:
    """A canary lower bound above the accounted epsilon refutes the guarantee (Steinke et al. 2023, Thm 5.2).

    The bound holds with probability ``confidence`` for any mechanism that is (epsilon, delta)-DP, so
    exceeding the epsilon the canary run was accounted at is evidence that the implementation or its
    accounting is wrong, not bad luck (at most a 1 - confidence chance of a false alarm).
    """
    if result.canary is None:
        return
    lb, accounted = result.canary.get("epsilon_lower_bound"), result.canary.get("reported_epsilon")
    if not is_number(lb):
        result.add("input", None, None, None, "canary_audit.json: epsilon_lower_bound is not a number")
        return
    if accounted is None:  # older files: fall back on the ledgers, which ran the same schedule
        accounted = result.ledger_max_epsilon
    if not is_number(accounted) or not math.isfinite(accounted) or result.canary.get("private") is False:
        return  # a non-private canary run is a power check of the attack: no epsilon to refute
    if lb > accounted * (1 + _CAP_SLACK):
        confidence = result.canary.get("confidence", "unknown")
        result.add("accounting", None, None, None,
                   f"canary_audit.json: empirical lower bound {lb:.4g} exceeds the accounted epsilon "
                   f"{accounted:.4g} (confidence {confidence}): the released parameters leak more than the "
                   "accountant allows; the DP implementation or its accounting is wrong")


def _write_outputs(run: Path, result: AuditResult) -> None:
    try:
        (run / "audit.json").write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
        (run / "privacy_report.html").write_text(render_html(result), encoding="utf-8")
        result.outputs_written = True
    except OSError as exc:
        result.add("input", None, None, None, f"cannot write the audit outputs in {run}: {exc}")


# ---------------------------------------------------------------- summary and report


def summary_table(result: AuditResult) -> str:
    header = ("partner", "rounds", "steps", "sigma", "q", "acct", "epsilon", "eps_rdp", "eps_prv", "dp_rdp",
              "dp_pld", "cap", "delta", "users", "status")
    rows = [header]
    for p in result.partners:
        last = p.rounds[-1] if p.rounds else None
        bad = sorted({f.severity for f in result.findings if f.partner == p.partner_id and f.severity != "warning"})
        rows.append((
            p.partner_id, str(len(p.rounds)), str(p.total_steps),
            _span({r.noise_multiplier for r in p.rounds}), _span({r.sample_rate for r in p.rounds}),
            last.accountant if last else "-", f"{p.epsilon:.4g}",
            *((f"{last.epsilon_rdp:.4g}", f"{last.epsilon_prv:.4g}", f"{last.epsilon_dp_accounting:.4g}",
               f"{last.epsilon_pld:.4g}") if last else ("-",) * 4),
            f"{p.max_epsilon:g}" if p.max_epsilon is not None else "-",
            f"{last.target_delta:.3g}" if last else "-", str(last.population) if last else "-",
            "ok" if not bad else "FAIL(" + ",".join(bad) + ")",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


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
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x}</text>')
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


def _trust_model(ctx: dict[str, Any]) -> str:
    cfg = ctx.get("config", {})
    secagg = cfg.get("secagg", {}).get("enabled")
    server_noise = cfg.get("federation", {}).get("server_noise_multiplier")
    secagg_text = {True: "SecAgg+ was ON in this run: the server saw only the sum of the partners' updates.",
                   False: "SecAgg+ was OFF in this run: the server saw each partner's clipped update.",
                   None: "SecAgg+ setting unknown (no config.json)."}[secagg if isinstance(secagg, bool) else None]
    noise = (f" Server-side noise multiplier: {server_noise} (partner-level DP on top)." if
             isinstance(server_noise, (int, float)) and server_noise > 0 else "")
    return ("The server (and every other partner) sees only clipped updates of the shared parameters "
            "(item table, item biases, history table, per-category vectors if used, MLP, aggregator); "
            "user-specific social embeddings "
            "and any per-user vectors stay on the partner. " + secagg_text + noise)


def _selection_text(ctx: dict[str, Any]) -> str:
    sel = ctx.get("config", {}).get("privacy", {}).get("select_on_validation")
    if sel is True:
        return ("Epoch/hyperparameter selection on validation data was ON: that selection uses private data "
                "and is not covered by the ledger's epsilon unless accounted separately.")
    if sel is False:
        return "A fixed training schedule was used (no selection on validation data)."
    return "Whether selection on validation data was used is unknown (no config.json)."


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
        f"<dt>Unit of privacy</dt><dd>{esc(PRIVACY_MODEL['unit'])}</dd>",
        f"<dt>Adjacency</dt><dd>{esc(ADJACENCY)} (add/remove)</dd>",
        f"<dt>DP variant</dt><dd>{esc(PRIVACY_MODEL['dp_variant'])}: everything released beyond user u "
        "(shared parameters, partner updates, other users' recommendations) is (epsilon, delta)-DP with "
        "respect to u's record</dd>",
        f"<dt>Mechanism</dt><dd>{esc(PRIVACY_MODEL['mechanism'])}</dd>",
        f"<dt>Accountant</dt><dd>{esc(PRIVACY_MODEL['accountant'])}; recomputation tolerance "
        f"{RECOMPUTE_RTOL:.0%} (recorded may not fall below it)</dd>",
        f"<dt>Compositions</dt><dd>rounds per partner: {', '.join(map(str, rounds_all)) or 'n/a'}; "
        f"DP-SGD steps per partner: {', '.join(map(str, steps_all)) or 'n/a'}</dd>",
        f"<dt>Trust model</dt><dd>{esc(_trust_model(result.context))}</dd>",
        f"<dt>Hyperparameter selection</dt><dd>{esc(_selection_text(result.context))}</dd>",
        "</dl><h2>Caveats</h2><ul>", *[f"<li>{esc(c)}</li>" for c in CAVEATS], "</ul>",
        "<h2>Empirical lower bound</h2>",
    ]
    if result.canary:
        lb = result.canary.get("epsilon_lower_bound")
        parts.append(f"<p>Canary audit: empirical epsilon lower bound <strong>{esc(str(lb))}</strong>.</p>"
                     f"<pre>{esc(json.dumps(result.canary, indent=2))}</pre>")
    else:
        parts.append("<p>No canary audit in this run (<code>canary_audit.json</code> absent).</p>")
    parts += ["<h2>Cumulative epsilon per round</h2>", render_svg(result), "<h2>Findings</h2>"]
    parts.append("<ul>" + "".join(f"<li class='{'ok' if f.severity == 'warning' else 'bad'}'>{esc(str(f))}</li>"
                                  for f in result.findings) + "</ul>" if result.findings else "<p>None.</p>")
    for p in result.partners:
        parts.append(_partner_html(p))
    parts.append("</body></html>")
    return "\n".join(parts)


def _partner_html(p: PartnerReport) -> str:
    esc = html.escape
    head = (f"<h2>Partner {esc(p.partner_id)}</h2><p>Key {esc(p.key_fingerprint[:16])}&hellip; from "
            f"<code>{esc(p.key_source)}</code>; cap {p.max_epsilon if p.max_epsilon is not None else 'none'} "
            f"({esc(p.cap_source or 'n/a')}); final epsilon {p.epsilon:.4g}; "
            f"{'verified' if p.verified else 'NOT verified'}.</p>")
    cols = ("round", "sigma", "q", "steps", "C", "delta", "users", "accountant", "eps RDP", "eps PRV",
            "dp_accounting RDP", "dp_accounting PLD")
    rows = "".join(
        f"<tr><td>{r.round}</td><td>{r.noise_multiplier:.4g}</td><td>{r.sample_rate:.4g}</td><td>{r.steps}</td>"
        f"<td>{r.max_grad_norm:.3g}</td><td>{r.target_delta:.3g}</td><td>{r.population}</td>"
        f"<td>{r.accountant}</td><td>{r.epsilon_rdp:.4f}</td><td>{r.epsilon_prv:.4f}</td>"
        f"<td>{r.epsilon_dp_accounting:.4f}</td><td>{r.epsilon_pld:.4f}</td></tr>"
        for r in p.rounds
    )
    table = "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + rows + "</table>"
    refused = ""
    if p.refusals:
        refused = "<p>Rounds refused (budget): " + ", ".join(esc(str(r.get("round"))) for r in p.refusals) + "</p>"
    return head + table + refused


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsocial audit", description="Verify privacy ledgers and recompute budgets.",
                                epilog="exit codes: 0 verified; 2 unreadable input; 3 tampering; "
                                       "4 budget violation; 5 accounting mismatch")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--max-epsilon", type=float, default=None, help="cap for every partner (overrides declarations)")
    p.add_argument("--public-keys", default=None, metavar="DIR", help="trusted public keys DIR/<partner_id>.pub")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_epsilon is not None and not (math.isfinite(args.max_epsilon) and args.max_epsilon > 0):
        print(f"fedsocial audit: --max-epsilon must be > 0, got {args.max_epsilon}", file=sys.stderr)
        return EXIT_INPUT
    result = run_audit(args.run_dir, args.max_epsilon, args.public_keys)
    if result.partners:
        print(summary_table(result))
    for f in result.findings:
        print(str(f), file=sys.stderr)
    code = result.exit_code
    outputs = f" ({args.run_dir}/audit.json, privacy_report.html written)" if result.outputs_written else ""
    print(f"audit: {'all ledgers verified' if code == EXIT_OK else f'FAILED, exit code {code}'}{outputs}")
    return code


if __name__ == "__main__":
    sys.exit(main())
