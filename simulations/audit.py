"""``fedsocial audit RUN_DIR [--max-epsilon E] [--public-keys DIR]``: verify privacy ledgers, recompute budgets.

The audit itself is :func:`shared.privacy.audit.audit_run` (what is read, what is checked, the exit
codes: see that module); this command runs it, prints the summary and findings, and writes
``RUN_DIR/audit.json`` and a self-contained ``RUN_DIR/privacy_report.html``
(:mod:`simulations.privacy_report`), also when the audit fails.

Exit codes: 0 verified; 2 unreadable or missing input; 3 tampering; 4 budget violation;
5 accounting mismatch.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from fedsocial.shared.fileio import write_text_atomic
from fedsocial.shared.privacy.audit import (
    EXIT_ACCOUNTING,
    EXIT_BUDGET,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_TAMPER,
    PRIVACY_MODEL,
    RECOMPUTE_RTOL,
    AuditResult,
    Finding,
    PartnerReport,
    RoundRow,
    audit_run,
    noise_text,
    trust_text,
)
from fedsocial.simulations.privacy_report import canary_text, metrics_text, render_html, render_svg, summary_table

__all__ = ["EXIT_ACCOUNTING", "EXIT_BUDGET", "EXIT_INPUT", "EXIT_OK", "EXIT_TAMPER", "PRIVACY_MODEL",
           "RECOMPUTE_RTOL", "AuditResult", "Finding", "PartnerReport", "RoundRow", "main", "render_html",
           "render_svg", "run_audit", "summary_table"]


def compute_json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float written as a string: crafted inputs (NaN, inf in a
    declaration or canary file) must not stop audit.json from being written as strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {str(k): compute_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [compute_json_safe(v) for v in obj]
    return obj


def write_outputs(run: Path, result: AuditResult) -> None:
    """audit.json and privacy_report.html in the run folder; a failure to write is itself a finding."""
    try:
        text = json.dumps(compute_json_safe(result.to_dict()), indent=2, allow_nan=False, default=str)
        # renamed into place: a link planted where an output goes is replaced, never followed (the folder comes
        # from the parties being audited)
        write_text_atomic(run / "audit.json", text + "\n")
        write_text_atomic(run / "privacy_report.html", render_html(result))
        result.outputs_written = True
    except (OSError, ValueError) as exc:
        result.add("input", None, None, None, f"cannot write the audit outputs in {run}: {exc}")


def run_audit(run_dir: str | Path, max_epsilon: float | None = None, public_keys_dir: str | Path | None = None,
              write: bool = True) -> AuditResult:
    """Audit ``run_dir`` and (by default) write its audit.json and privacy_report.html."""
    result = audit_run(run_dir, max_epsilon, public_keys_dir)
    if write and Path(run_dir).is_dir():
        write_outputs(Path(run_dir), result)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsocial audit", description="Verify privacy ledgers and recompute budgets.",
                                epilog="exit codes: 0 verified; 2 unreadable input; 3 tampering; "
                                       "4 budget violation; 5 accounting mismatch")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--max-epsilon", type=float, default=None, help="cap for every partner (overrides declarations)")
    p.add_argument("--public-keys", default=None, metavar="DIR", help="trusted public keys DIR/<partner_id>.pub")
    return p


RUN_MARKERS = ("run_manifest.json", "ledger_heads.json", "metrics.json", "metrics_record.json", "ledgers",
               "checkpoints", "server.pub", "canary_audit.json", "canary_record.json", "config.toml",
               "config.json")  # what a simulation, deployed run or canary-audit folder holds (any one)


def compute_not_a_run(run_dir: Path) -> str:
    """Why ``run_dir`` is no run folder to audit ("": it is one, possibly damaged: the audit says how). Nothing is
    written into a folder that holds none of ``RUN_MARKERS``: a typo must not leave audit files behind."""
    if not run_dir.exists():
        return f"{run_dir}: no such run directory"
    if not run_dir.is_dir():
        return f"{run_dir}: not a directory (give the run folder that holds ledgers/ and run_manifest.json)"
    if not any((run_dir / name).exists() for name in RUN_MARKERS):
        return (f"{run_dir}: not a run folder (none of {', '.join(RUN_MARKERS)} is there); nothing written")
    return ""


# all but tab and newline: escape codes, bells; and the bidirectional overrides and marks, which reorder what a
# terminal shows (a planted U+202E reverses the rest of its line)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def compute_terminal_text(text: str, one_line: bool = False) -> str:
    """``text`` with control characters shown as ``\\xNN`` (bidirectional controls as ``\\uNNNN``): the audit quotes
    what audited files hold, and an escape sequence planted in a ledger must not drive the auditor's terminal
    (found in review). ``one_line``: a newline too, so that a planted value cannot print a line of its own (a fake
    verdict) inside a finding or a status line."""
    out = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                       text)
    return out.replace("\n", "\\n") if one_line else out


def _say(text: str, file: Any = None, one_line: bool = True) -> None:
    print(compute_terminal_text(text, one_line), file=file if file is not None else sys.stdout)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_epsilon is not None and not (math.isfinite(args.max_epsilon) and args.max_epsilon > 0):
        print(f"fedsocial audit: --max-epsilon must be > 0, got {args.max_epsilon}", file=sys.stderr)
        return EXIT_INPUT
    why = compute_not_a_run(Path(args.run_dir))
    if why:
        print(f"fedsocial audit: {why}", file=sys.stderr)
        print(f"audit: FAILED, exit code {EXIT_INPUT}")
        return EXIT_INPUT
    result = run_audit(args.run_dir, args.max_epsilon, args.public_keys)
    if result.partners:
        _say(summary_table(result), one_line=False)  # the table's rows: partner ids are validated file names
    _say(f"privacy scope: {result.scope or 'not recorded (the run predates privacy.scope)'}")
    if noise_text(result):
        _say(f"noise: {noise_text(result)}")
    _say(f"metrics.json: {metrics_text(result)}")
    if result.records.get("trust"):
        _say(f"keys: {trust_text(result)}")
    if canary_text(result):
        _say(f"canary_audit.json: {canary_text(result)}")
    for f in result.findings:
        _say(str(f), file=sys.stderr)
    code = result.exit_code
    outputs = f" ({args.run_dir}/audit.json, privacy_report.html written)" if result.outputs_written else ""
    _say(f"audit: {'all ledgers verified' if code == EXIT_OK else f'FAILED, exit code {code}'}{outputs}")
    return code


if __name__ == "__main__":
    sys.exit(main())
