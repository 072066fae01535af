"""The audit of a run's privacy accounting, as a pure function: run folder in, :class:`AuditResult` out.

What it reads (the layout contract of a federated run; nothing else):

``RUN_DIR/run_manifest.json``, ``RUN_DIR/ledger_heads.json``, ``RUN_DIR/server.pub``
    the coordinator's signed records (:mod:`shared.privacy.records`): the partners that registered
    with their declared caps and the run's privacy settings (scope included), and each partner's
    newest ledger entry as of the last round, and per round the entry each reply it took named
    (``received``). They say what must be there: a registered partner whose ledger is missing, a ledger
    the server never registered, a ledger without an entry the server recorded (the newest, or that of
    any round's release), a missing or unsigned heads file, or no manifest at all, are findings.
``RUN_DIR/metrics_record.json``
    the server's signature of ``metrics.json``'s exact bytes, for the heads' round, chained to the manifest
    and heads: a ``metrics.json`` it does not sign (edited, another run's) or a record of another round is
    tampering; no record beside heads or a metrics.json is a warning (older runs, unfinished runs).
``RUN_DIR/ledgers/<partner_id>.jsonl`` and ``<partner_id>.pub``
    each partner's signed, hash-chained ledger (:mod:`shared.privacy.ledger`) and its public key.
    ``--public-keys DIR`` replaces the keys (``DIR/<partner_id>.pub``, and ``DIR/server.pub`` when
    present) with the auditor's trusted copies, and adds each key's partner to the expected set.
``RUN_DIR/ledgers/<partner_id>.json``, ``<partner_id>.refusals.jsonl`` (optional)
    a partner's own declaration (cap, delta, population) and the rounds it refused for budget.
``RUN_DIR/config.json`` / ``config.toml``, ``metrics.json``, ``canary_audit.json`` (optional)
    context: the cap fallback, SecAgg+/server noise/selection for the report, the metrics' epsilon,
    an empirical lower bound.

What is checked, per partner: the chain, every signature and the key fingerprint, canonical form,
plausible values, strictly increasing rounds, each cumulative ``epsilon_rdp`` re-derived with Opacus's
RDP analysis, then both recorded epsilons recomputed with Google's ``dp_accounting`` (RDP and PLD,
independent of Opacus, see :data:`RECOMPUTE_RTOL`); the epsilon of record against the cap
(``--max-epsilon`` > the signed manifest's declared cap > the partner's declaration file >
the config); ``target_delta < 1/population`` for every round.

Exit codes (the most severe wins, in this order):
  2  unreadable or missing input (no ledgers, no manifest, no heads, a garbage line, a bad key file)
  3  tampering: a signature, key fingerprint, hash-chain, canonical-form, schema, round-order or head
     failure, a missing ledger the signed records expect, or a ledger they do not, a metrics.json the
     server did not sign
  5  accounting mismatch: a recorded epsilon that the recorded history does not give, a canary
     lower bound above the accounted epsilon, or a signed metrics.json publishing an epsilon below that of
     the entries the signed heads name
  4  budget violation: epsilon over the cap, or target_delta >= 1/population
  0  everything verified

No exception escapes :func:`audit_run`: an unexpected error while auditing one partner becomes an
``input`` finding naming that partner.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedsocial.shared import signing
from fedsocial.shared.privacy.accounting import (
    INTEGER_ALPHAS,
    PrivacyConfigError,
    check_delta,
    compute_epsilon_dp_accounting,
    compute_epsilon_prv,
    compute_epsilons_dp_accounting,
    compute_epsilons_pld,
)
from fedsocial.shared.privacy.ledger import (
    ADJACENCY,
    EPSILON_RTOL,
    PARTNER_ID_RE,
    UNIT,
    LedgerError,
    compute_entry_hash_or_none,
    history_of,
    is_number,
    scan_ledger,
    schema_problems,
    verify_head,
    verify_ledger,
)
from fedsocial.shared.privacy.records import (
    CANARY,
    CANARY_RECORD,
    HEADS,
    MANIFEST,
    METRICS,
    METRICS_RECORD,
    RECEIVED_REPLIES,
    SERVER_PUB,
    RecordError,
    compute_params_sha256,
    read_json,
    sha256_of,
    verify_record,
)

EXIT_OK, EXIT_INPUT, EXIT_TAMPER, EXIT_BUDGET, EXIT_ACCOUNTING = 0, 2, 3, 4, 5
_SEVERITY = {"input": EXIT_INPUT, "tamper": EXIT_TAMPER, "accounting": EXIT_ACCOUNTING, "budget": EXIT_BUDGET}
_PRECEDENCE = ("input", "tamper", "accounting", "budget")
# The recorded epsilon_rdp (Opacus) may be below the dp_accounting recomputation by at most this
# fraction. dp_accounting's fractional-order series is conservative (it truncates and drops orders
# that do not converge) while Opacus's matches numerical integration (tests/test_accounting.py), so
# dp_accounting is 0-2% higher for epsilon up to ~20; a shortfall beyond 5% below the tighter of its
# RDP and PLD recomputations means the recorded epsilon does not follow from the recorded (sigma, q, steps)
# (both are upper bounds on the true epsilon, so a value above either one is sound). A recorded value *above* the
# recomputation is conservative (e.g. dp_accounting's extra orders 128..1024 at tiny epsilon) and
# is reported, not failed. The same rule holds epsilon_prv against dp_accounting's PLD accountant
# (both are tight; PRV's recorded value is the upper end of its error band, PLD's discretisation is
# pessimistic, and they agree within about 0.2% in the tests).
RECOMPUTE_RTOL = 0.05
_CAP_SLACK = 1e-9  # float noise when comparing epsilon with the cap

POPULARITY_PARAM = "item_pop"  # the released popularity's shared array (shared/privacy/distributed.VALUE_PARAMS)
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
    release: str = "training"  # what the entry charges: training, evaluation, popularity or selection


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
    scope: str = ""  # privacy.scope the ledger entries name ("" when they predate it)
    eval_releases: int = 0  # DP evaluation releases charged in the ledger
    popularity_releases: int = 0  # DP item-popularity releases charged in the ledger (shared/privacy/popularity.py)
    selection_releases: int = 0  # DP selections of the served model charged in the ledger (shared/privacy/selection.py)
    head_epsilon: float | None = None  # epsilon of record of the entry the server's signed head names

    @property
    def epsilon(self) -> float:
        return self.rounds[-1].epsilon if self.rounds else 0.0

    @property
    def total_steps(self) -> int:
        """DP-SGD steps of the training releases (a popularity, selection or evaluation release is one Gaussian
        step)."""
        return sum(r.steps for r in self.rounds if r.release == "training")

    @property
    def training_rounds(self) -> int:
        return sum(1 for r in self.rounds if r.release == "training")


@dataclass
class AuditResult:
    run_dir: str
    partners: list[PartnerReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    canary: dict[str, Any] | None = None
    outputs_written: bool = False
    scope: str = ""  # the run's privacy.scope (signed manifest, else config); "" when not recorded
    records: dict[str, Any] = field(default_factory=dict)  # what the signed records say (expected set, rounds)

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
                {**asdict(p), "epsilon": p.epsilon, "total_steps": p.total_steps, "n_rounds": p.training_rounds,
                 "n_entries": len(p.rounds)}
                for p in self.partners
            ],
            "findings": [asdict(f) for f in self.findings],
            "scope": self.scope or None,
            "scope_note": scope_note(self.scope),
            "records": self.records,
            "context": self.context,
            "canary": self.canary,
        }


SCOPES = {
    "joint": "joint: everything released beyond user u, including other users' recommendations inside the "
             "same partner, is (epsilon, delta)-DP with respect to u's record",
    "partner": "partner: everything that leaves a partner (its updates, hence the shared parameters and every "
               "other partner's model) is (epsilon, delta)-DP with respect to one user's record; inside the "
               "partner, the model it serves its own users may also learn from them without DP",
}


def scope_note(scope: str) -> str:
    if scope in SCOPES:
        return SCOPES[scope]
    return ("not recorded: this run predates privacy.scope (its ledgers and records do not name a scope); "
            "runs of that time trained in the joint scope, but the audit cannot verify it")


def noise_text(result: AuditResult) -> str:
    """Where the run's noise was added, from the signed manifest, with the assumptions that makes."""
    priv = (result.records.get("manifest") or {}).get("privacy") or {}
    if priv.get("distributed_noise") is True:
        return (f"distributed: integer Skellam shares of one full-batch DP-GD step's noise under SecAgg+ "
                f"(shared/privacy/distributed.py); assumes SecAgg+ hides every share and at least "
                f"{priv.get('contributors')} honest partners' shares in each released sum")
    if priv.get("enabled") is True:
        return "per partner: each partner's release carries its full noise (no trust in secure aggregation needed)"
    return ""


SIGNING_KEY_NAMES = ("ledger_signing.key", "signing.key")  # a partner's ledger key, the server's record key


def trust_text(result: AuditResult) -> str:
    """What the verdict rests on: whose public keys were used, and whether the folder itself could forge them."""
    trust = result.records.get("trust") or {}
    held = trust.get("private_keys_in_folder") or []
    if trust.get("partner_keys") == "pinned" and trust.get("server_key") == "pinned":
        text = "every key pinned (--public-keys): the records are those the key holders signed"
    elif trust.get("partner_keys") == "pinned":
        text = ("partner keys pinned (--public-keys), the server's key read from the run folder: the manifest, "
                "heads and metrics record prove nothing against a rewrite re-signed under a new server key")
    else:
        text = ("nothing pinned: every public key was read from the run folder, so the audit proves the records "
                "complete and consistent, not who wrote them; give --public-keys DIR (each partner's "
                "<partner_id>.pub and the coordinator's server.pub, obtained from them) to prove that")
    if held:
        text += (f"; the folder also holds {len(held)} private signing key(s) ({', '.join(held[:3])}"
                 f"{', ...' if len(held) > 3 else ''}): whoever has this folder can re-sign it consistently "
                 "(a simulation plays every party); remove them before handing the folder to an auditor")
    return text


def _check_trust(run: Path, keys_dir: Path | None, result: AuditResult) -> None:
    """Record which keys the verdict rests on; pinning that cannot hold (no server.pub, or the private keys
    shipped in the folder) is a warning, since the operator asked for more than the folder can prove."""
    pinned_server = keys_dir is not None and (keys_dir / SERVER_PUB).is_file()
    held = sorted(str(p.relative_to(run)) for name in SIGNING_KEY_NAMES for p in run.rglob(name)
                  if p.is_file() and len(p.relative_to(run).parts) <= 4)
    result.records["trust"] = {"partner_keys": "pinned" if keys_dir is not None else "run folder",
                               "server_key": "pinned" if pinned_server else "run folder",
                               "private_keys_in_folder": held}
    if keys_dir is not None and not pinned_server:
        result.add("warning", None, None, None,
                   f"--public-keys {keys_dir} has no {SERVER_PUB}: the manifest, heads and metrics record were "
                   f"checked against the run folder's own {SERVER_PUB}, so a rollback of the ledgers with the "
                   f"heads re-signed under a new server key would pass; add the coordinator's {SERVER_PUB}")
    if keys_dir is not None and held:
        result.add("warning", None, None, None,
                   f"the run folder holds private signing keys ({', '.join(held)}): with them, anyone holding the "
                   "folder can re-sign forged ledgers and records that verify under the pinned public keys; an "
                   "audit of this folder proves consistency only (remove the keys, or audit the parties' copies)")


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
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
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
    privacy = ctx.get("config", {}).get("privacy")
    cap = privacy.get("max_epsilon") if isinstance(privacy, dict) else None
    return float(cap) if is_number(cap) and math.isfinite(cap) and cap > 0 else None


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
    n_before = len(result.findings)
    try:
        _audit_partner_into(report, ledgers, keys_dir, cli_cap, heads, result)
    except Exception as exc:  # noqa: BLE001 - crafted input must give a finding, never a traceback
        result.add("input", partner, None, None, f"cannot audit this ledger ({type(exc).__name__}: {exc})")
        report.rounds = []
    report.verified = bool(report.key_fingerprint) and all(f.severity == "warning" for f in result.findings[n_before:])
    return report


def _audit_partner_into(report: PartnerReport, ledgers: Path, keys_dir: Path | None, cli_cap: float | None,
                        heads: dict[str, Any], result: AuditResult) -> None:
    partner = report.partner_id
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
        return
    if scan.torn_tail:
        report.torn_tail_bytes = len(scan.torn_tail)
        result.add("warning", partner, None, len(scan.entries) + 1,
                   f"torn last line ({len(scan.torn_tail)} bytes) ignored: a write was interrupted, and the "
                   "ledger is appended before an update is sent, so that round released nothing")
    n_before = len(result.findings)
    if key is None:
        report.key_fingerprint = ""
        # no key to verify it with (already a finding): its entries are still held to the schema before any is
        # recomputed or shown (found in review: an unchecked field reached the report as markup)
        for number, entry in zip(scan.lines, scan.entries, strict=True):
            for problem in schema_problems(entry):
                result.add("tamper", partner, entry.get("round") if isinstance(entry.get("round"), int) else None,
                           number, f"schema: {problem}")
    else:
        for p in verify_ledger(scan.entries, key, partner, scan.lines, raw=scan.raw):
            severity = "tamper" if p.kind in _TAMPER_KINDS else "accounting"
            result.add(severity, partner, p.round, p.line, f"{p.kind}: {p.message}")
        if partner in heads:
            head = heads[partner] if isinstance(heads[partner], dict) else {}
            for p in verify_head(scan.entries, head.get("round"), str(head.get("hash", "")), partner):
                result.add("tamper", partner, p.round, p.line, f"{p.kind}: {p.message}")
            named = next((e for e in scan.entries if compute_entry_hash_or_none(e) == head.get("hash")), None)
            if named is not None and is_number(named.get("epsilon_prv")) and is_number(named.get("epsilon_rdp")):
                report.head_epsilon = float(named["epsilon_prv"] if named.get("accountant") == "prv"
                                            else named["epsilon_rdp"])
        _check_received(partner, scan.entries, scan.lines, result)
    structurally_ok = all(f.severity != "tamper" and f.severity != "input" for f in result.findings[n_before:])
    if structurally_ok:
        report.rounds = _recompute(partner, scan.entries, scan.lines, result)
        _check_prv_of_record(partner, scan.entries, scan.lines, result)
        _check_skellam(partner, scan.entries, scan.lines, _shared_dim(ledgers.parent), result)
    scopes = sorted({str(e["scope"]) for e in scan.entries if isinstance(e.get("scope"), str)})
    report.scope = ",".join(scopes)
    signed_scope = ((result.records.get("manifest") or {}).get("privacy") or {}).get("scope")
    unscoped = [line for e, line in zip(scan.entries, scan.lines, strict=True) if not isinstance(e.get("scope"), str)]
    if isinstance(signed_scope, str) and unscoped:  # every partner entry names its scope since the scope exists
        result.add("tamper", partner, None, unscoped[0],
                   f"{len(unscoped)} ledger entries name no privacy scope (first at line {unscoped[0]}), in a run "
                   f"whose signed manifest says {signed_scope!r}")
    if len(scopes) > 1:
        result.add("tamper", partner, None, None, f"ledger entries name different privacy scopes {scopes}")
    elif scopes and result.scope and scopes[0] != result.scope:
        result.add("tamper", partner, None, None,
                   f"ledger entries name privacy scope {scopes[0]!r}, the run's records {result.scope!r}")
    report.eval_releases = sum(1 for e in scan.entries if e.get("release") == "evaluation")
    report.popularity_releases = sum(1 for e in scan.entries if e.get("release") == "popularity")
    report.selection_releases = sum(1 for e in scan.entries if e.get("release") == "selection")
    _check_budget(report, cli_cap, result)


def _shared_dim(run: Path) -> int | None:
    """The number of trained shared coordinates (the Skellam mechanism's dimension: the released values such
    as item_pop are not in it), from the newest checkpoint's shapes (None without one)."""
    from fedsocial.server.checkpoint import CheckpointError, latest_checkpoint
    from fedsocial.shared.privacy.distributed import VALUE_PARAMS

    try:
        ckpt = latest_checkpoint(run)
    except CheckpointError:
        return None
    if ckpt is None:
        return None
    return sum(int(a.size) for n, a in zip(ckpt.names, ckpt.arrays, strict=True) if n not in VALUE_PARAMS)


def _check_skellam(partner: str, entries: list[dict[str, Any]], lines: list[int], dim: int | None,
                   result: AuditResult) -> None:
    """Distributed-noise entries (shared/privacy/distributed.py): the recorded noise multiplier must be the
    Gaussian equivalent of the recorded shares over the model's coordinates, at no fewer contributors than
    the signed manifest assumes, and only where secure aggregation hid the shares."""
    from fedsocial.shared.privacy.distributed import compute_record_problems

    manifest = result.records.get("manifest") or {}
    priv, fed = manifest.get("privacy") or {}, manifest.get("federation") or {}
    distributed, step = priv.get("distributed_noise") is True, compute_signed_grid_step(priv)
    for entry, line in zip(entries, lines, strict=True):
        rnd = entry.get("round")
        if entry.get("mechanism") != "skellam":
            if distributed and "release" not in entry:  # a training entry: its noise is the shares the server summed
                result.add("accounting", partner, rnd, line,
                           "a training entry without the Skellam description in a run whose signed manifest says "
                           "privacy.distributed_noise: its noise multiplier is not backed by the shares summed")
            continue
        malformed = compute_skellam_schema_problems(entry)
        for problem in malformed:
            result.add("tamper", partner, rnd, line, f"schema: distributed noise: {problem}")
        if malformed:
            continue
        if entry.get("accountant") != "rdp_int":  # PRV / fractional orders are no bound for Skellam (PRIVACY.md 6)
            result.add("accounting", partner, rnd, line, f"distributed noise accounted by {entry.get('accountant')!r}: "
                                                         "the Skellam bound holds only at integer RDP orders "
                                                         "(rdp_int)")
        if step is not None and not math.isclose(float(entry["grid_step"]), step, rel_tol=1e-9):
            result.add("accounting", partner, rnd, line,
                       f"distributed noise: grid step {float(entry['grid_step']):.6g}, but the signed manifest's grid "
                       f"is {step:.6g} (privacy.max_grad_norm / 2**privacy.grid_bits), the one the server decodes "
                       "the sum with")
        if dim is None:
            result.add("warning", partner, rnd, line, "distributed noise: no checkpoint to take the model's size "
                                                      "from; the recorded sensitivities are not re-derived")
        else:
            for problem in compute_record_problems(entry, float(entry["noise_multiplier"]),
                                                   float(entry["max_grad_norm"]), dim):
                result.add("accounting", partner, rnd, line, f"distributed noise: {problem}")
        if manifest and fed.get("secure_aggregation") is not True:
            result.add("accounting", partner, rnd, line, "distributed noise without secure aggregation in the "
                                                         "signed manifest: each share alone carries 1/t of the noise")
        assumed = priv.get("contributors")
        if isinstance(assumed, int) and int(entry.get("contributors", 0)) > assumed:  # mu / t each: t too large
            result.add("accounting", partner, rnd, line, f"distributed noise: shares sized for "
                                                         f"{entry.get('contributors')} contributors, but the run "
                                                         f"releases sums of as few as {assumed}")
        elif manifest and not isinstance(assumed, int):
            result.add("accounting", partner, rnd, line, "distributed noise in a run whose signed manifest does "
                                                         "not say so (privacy.distributed_noise)")


def compute_skellam_schema_problems(entry: dict[str, Any]) -> list[str]:
    """Crafted values in a Skellam entry: ``contributors`` a positive integer, ``grid_step`` and ``share_variance``
    finite and > 0 (a negative t times a negative share would pass every product check)."""
    out = []
    t = entry.get("contributors")
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 10**6:
        out.append(f"contributors must be an integer in [1, 10**6], got {json.dumps(t)}")
    for key in ("grid_step", "share_variance"):
        v = entry.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            out.append(f"{key} must be a finite number > 0, got {json.dumps(v)}")
    return out


def compute_signed_grid_step(priv: dict[str, Any]) -> float | None:
    """The grid step the server decodes with, max_grad_norm / 2**grid_bits, from the signed manifest's privacy
    settings (None where the manifest does not sign both)."""
    c, bits = priv.get("max_grad_norm"), priv.get("grid_bits")
    if isinstance(c, bool) or isinstance(bits, bool) or not isinstance(c, int | float) or not isinstance(bits, int):
        return None
    return float(c) / 2.0 ** bits if c > 0 and 0 <= bits <= 62 else None


def _recompute(partner: str, entries: list[dict[str, Any]], lines: list[int],
               result: AuditResult) -> list[RoundRow]:
    """Per-round rows, with each cumulative epsilon recomputed by dp_accounting (RDP and PLD)."""
    history = history_of(entries)
    deltas = {e["target_delta"] for e in entries}
    # rdp_int (the distributed Skellam rounds): dp_accounting at the same integer orders
    orders = list(INTEGER_ALPHAS) if any(e.get("accountant") == "rdp_int" for e in entries) else None
    if len(deltas) == 1:  # the usual case: one pass, cumulative values after each round
        delta = deltas.pop()
        rdp, pld = compute_epsilons_dp_accounting(history, delta, orders), compute_epsilons_pld(history, delta)
    else:
        rdp = [compute_epsilon_dp_accounting(history[: i + 1], e["target_delta"], orders)
               for i, e in enumerate(entries)]
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
            release=str(entry.get("release", "training")),
        ))
        # Each recomputation is an upper bound on the true epsilon, so a recorded value is sound when it is
        # at least the tighter of the two: at large epsilon dp_accounting's RDP drops the small fractional
        # orders whose series does not converge and lands far above (Opacus 69.7, it 92.3, PLD 64.5).
        floor, method = min((eps_dp, "RDP"), (eps_pld, "PLD"))
        for name, recorded in (("epsilon_rdp", entry["epsilon_rdp"]), ("epsilon_prv", entry["epsilon_prv"])):
            if recorded < floor * (1 - RECOMPUTE_RTOL):
                result.add("accounting", partner, entry["round"], line,
                           f"recorded {name} {recorded:.6g} is below the dp_accounting {method} recomputation "
                           f"{floor:.6g} (the tighter of RDP {eps_dp:.6g} and PLD {eps_pld:.6g}) by more than "
                           f"{RECOMPUTE_RTOL:.0%}")
    return rows


def _check_prv_of_record(partner: str, entries: list[dict[str, Any]], lines: list[int], result: AuditResult) -> None:
    """A newest entry whose accountant of record is ``prv`` has its epsilon_prv re-derived with the ledger's own
    Opacus PRV computation (deterministic; about 0.1-1 s), as verify_ledger does for epsilon_rdp: the 5% PLD
    cross-check alone would let a value 4% low pass the cap. The newest entry suffices for the cap, since the
    true cumulative epsilon only grows along the ledger."""
    if not entries or entries[-1].get("accountant") != "prv":
        return
    last = entries[-1]
    recomputed = compute_epsilon_prv(history_of(entries), float(last["target_delta"]))
    if not math.isclose(last["epsilon_prv"], recomputed, rel_tol=EPSILON_RTOL, abs_tol=1e-12):
        result.add("accounting", partner, last.get("round"), lines[-1],
                   f"epsilon: recorded cumulative epsilon_prv {last['epsilon_prv']!r} (the accountant of record) but "
                   f"the recorded history gives {recomputed!r} with Opacus's PRV accountant")


def _check_budget(report: PartnerReport, cli_cap: float | None, result: AuditResult) -> None:
    partner = report.partner_id
    declared_cap = report.declared.get("max_epsilon")
    config_cap = _config_cap(result.context)
    if cli_cap is not None:
        report.max_epsilon, report.cap_source = cli_cap, "--max-epsilon"
    else:  # the tightest cap any record declares: an unsigned declaration can only make the audit stricter
        candidates: list[tuple[float, str]] = []
        if is_number(declared_cap) and math.isfinite(declared_cap) and declared_cap > 0:
            candidates.append((float(declared_cap), f"{partner}.json"))
        signed_cap = result.records.get("caps", {}).get(partner)
        if signed_cap is not None:
            candidates.append((float(signed_cap[0]), str(signed_cap[1])))
        if config_cap is not None:
            candidates.append((config_cap, f"{result.context['config_file']} privacy.max_epsilon"))
        if candidates:
            tightest = min(c for c, _ in candidates)
            report.max_epsilon, report.cap_source = next(c for c in candidates if c[0] == tightest)
        else:
            result.add("warning", partner, None, None, "no epsilon cap declared: budget not checked")
    if report.max_epsilon is not None:
        over = [r for r in report.rounds if r.epsilon > report.max_epsilon + _CAP_SLACK]
        if over:
            result.add("budget", partner, over[0].round, None,
                       f"cumulative epsilon ({over[0].accountant}) {over[0].epsilon:.4g} exceeds the cap "
                       f"{report.max_epsilon:g} ({report.cap_source}); final epsilon {report.epsilon:.4g}")
    decl_delta, decl_pop = report.declared.get("target_delta"), report.declared.get("population")
    signed = (result.records.get("signed_declarations") or {}).get(partner) or {}
    signed_delta, signed_users = signed.get("target_delta"), signed.get("num_users")
    epochs = ((result.records.get("manifest") or {}).get("federation") or {}).get("local_epochs")
    for r in report.rounds:
        if r.release == "training" and r.sample_rate * r.population < 1 - 1e-9:
            # Opacus's rate is 1 / ceil(n / batch) >= 1 / n: less claims an amplification no loader gives
            result.add("budget", partner, r.round, None,
                       f"sample_rate {r.sample_rate!r} is below 1/population = 1/{r.population}: no DP-SGD loader "
                       "samples fewer than one user per expected batch, so the epsilon claims an amplification "
                       "that never ran")
        if r.release == "training" and isinstance(epochs, int) and not isinstance(epochs, bool) and \
                r.steps != epochs * round(1 / r.sample_rate):
            result.add("warning", partner, r.round, None,
                       f"{r.steps} steps at sample rate {r.sample_rate:.6g}: {epochs} local epochs (signed "
                       f"{MANIFEST} federation.local_epochs) take {epochs * round(1 / r.sample_rate)}")
        try:
            check_delta(r.target_delta, r.population)
        except PrivacyConfigError as exc:
            result.add("budget", partner, r.round, None, str(exc))
        # the signed manifest: the delta the server held this partner's replies to, the users it registered (an
        # entry at a larger delta reports a smaller epsilon than the guarantee the run was run for)
        if signed_delta is not None and r.target_delta > signed_delta * (1 + 1e-12):
            result.add("budget", partner, r.round, None,
                       f"target_delta {r.target_delta!r} is above {signed_delta!r}, the delta the signed {MANIFEST} "
                       "holds this partner to: its epsilon is stated for a weaker guarantee than the run's")
        if signed_users is not None and r.population != signed_users:
            result.add("warning", partner, r.round, None,
                       f"population {r.population} differs from the {signed_users} users the partner registered "
                       f"(signed {MANIFEST})")
            try:
                check_delta(r.target_delta, signed_users)
            except PrivacyConfigError as exc:
                result.add("budget", partner, r.round, None, f"{exc} (the registered users, signed {MANIFEST})")
        if isinstance(decl_delta, (int, float)) and not math.isclose(r.target_delta, decl_delta, rel_tol=1e-12):
            result.add("budget", partner, r.round, None,
                       f"target_delta {r.target_delta!r} differs from the declared {decl_delta!r}")
        if isinstance(decl_pop, int) and r.population != decl_pop:
            result.add("warning", partner, r.round, None,
                       f"population {r.population} differs from the declared {decl_pop}")


def audit_run(
    run_dir: str | Path, max_epsilon: float | None = None, public_keys_dir: str | Path | None = None,
) -> AuditResult:
    """Audit the run folder ``run_dir`` (see the module docstring); reads files, writes nothing, never raises."""
    run = Path(run_dir)
    result = AuditResult(run_dir=str(run))
    try:
        _audit_into(run, max_epsilon, None if public_keys_dir is None else Path(public_keys_dir), result)
    except Exception as exc:  # noqa: BLE001 - the auditor reports, it does not crash on crafted input
        result.add("input", None, None, None, f"cannot audit {run} ({type(exc).__name__}: {exc})")
    return result


def _audit_into(run: Path, max_epsilon: float | None, keys_dir: Path | None, result: AuditResult) -> None:
    ledgers = run / "ledgers"
    if not run.is_dir():
        result.add("input", None, None, None, f"{run}: no such run directory")
        return
    if keys_dir is not None and not keys_dir.is_dir():
        result.add("input", None, None, None, f"{keys_dir}: no such public-keys directory")
        keys_dir = None
    unsafe = compute_unreadable_inputs(run, keys_dir)
    for msg in unsafe:
        result.add("input", None, None, None, msg)
    if unsafe:
        return  # reading a FIFO blocks for ever, /dev/zero fills the memory: audit nothing rather than hang
    result.context = _load_context(run, result)
    found = sorted(p.name[: -len(".jsonl")] for p in ledgers.glob("*.jsonl")
                   if not p.name.endswith(".refusals.jsonl")) if ledgers.is_dir() else []
    expected, heads, server_key = _read_records(run, keys_dir, result)
    _check_trust(run, keys_dir, result)
    for partner in sorted(set(found) | set(expected)):
        if not PARTNER_ID_RE.fullmatch(partner):
            result.add("input", partner, None, None, f"ledger file name {partner!r}.jsonl is not a valid partner id")
            continue
        if partner not in found:
            if result.records.get("privacy_enabled") is not False:  # else "never trained" would be untrue
                _missing_ledger(partner, expected[partner], heads, result)
            continue
        if expected and partner not in expected:
            result.add("tamper", partner, None, None, "a ledger of a partner that the signed records do not list "
                                                      "(not registered with the server, nor in --public-keys)")
        result.partners.append(_audit_partner(partner, ledgers, keys_dir, max_epsilon, heads, result))
    if not found:
        result.add("input", None, None, None, f"{ledgers}: no ledgers (<partner_id>.jsonl) found")
    _check_model(run, result)
    _check_popularity(result)
    _check_metrics_record(run, server_key, result)
    _check_metrics(result)
    _check_canary_record(run, server_key, result)
    _check_canary(result)
    for pub in sorted(ledgers.glob("*.pub")) if ledgers.is_dir() else []:
        if pub.stem not in found and pub.stem not in expected:
            result.add("warning", pub.stem, None, None, "a public key without a ledger (the partner never trained?)")


MAX_INPUT_BYTES = 1 << 30  # no honest run's record, ledger, key or checkpoint comes near 1 GiB
_INPUT_NAMES = (MANIFEST, HEADS, SERVER_PUB, METRICS, METRICS_RECORD, CANARY, CANARY_RECORD, "config.json",
                "config.toml")


def compute_unreadable_inputs(run: Path, keys_dir: Path | None) -> list[str]:
    """Each file the audit would read that is not a regular file of at most :data:`MAX_INPUT_BYTES` (a FIFO, a
    device such as /dev/zero, a directory, a link to one, or a huge file), as a message naming it."""
    paths = [run / name for name in _INPUT_NAMES]
    for folder, pattern in ((run / "ledgers", "*.jsonl"), (run / "ledgers", "*.pub"), (run / "ledgers", "*.json"),
                            (run / "checkpoints", "round_*.npz"), (keys_dir, "*.pub")):
        if folder is not None and folder.is_dir():
            paths += sorted(folder.glob(pattern))
    out = []
    for path in paths:
        if not path.exists() and not path.is_symlink():
            continue
        try:
            st = path.stat()
        except OSError as exc:
            out.append(f"{path}: cannot be read ({exc.strerror or exc})")
            continue
        if not stat.S_ISREG(st.st_mode):
            out.append(f"{path}: not a regular file (a FIFO, device, directory or a link to one): not read")
        elif st.st_size > MAX_INPUT_BYTES:
            out.append(f"{path}: {st.st_size} bytes, above the {MAX_INPUT_BYTES} an audit input may have: not read")
    return out


def _missing_ledger(partner: str, why: str, heads: dict[str, Any], result: AuditResult) -> None:
    """A partner the signed records expect has no ledger: a finding unless it provably never released."""
    head = heads.get(partner)
    if isinstance(head, dict) and head.get("round") is not None:
        result.add("tamper", partner, head.get("round"), None,
                   f"no ledger ledgers/{partner}.jsonl, but the server recorded its entry of round "
                   f"{head.get('round')} ({why}): the ledger was removed")
    elif why.startswith("--public-keys"):
        result.add("tamper", partner, None, None, f"no ledger ledgers/{partner}.jsonl for a trusted key ({why})")
    else:
        result.add("warning", partner, None, None,
                   f"registered ({why}) but no ledger and no head recorded: it never trained (nothing released)")


def _read_records(run: Path, keys_dir: Path | None,
                  result: AuditResult) -> tuple[dict[str, str], dict[str, Any], Any]:
    """The expected partners (partner -> where that expectation comes from), the signed heads and the server's
    public key (None when there is none to load).

    Sources: the server-signed manifest and heads (server key: ``--public-keys DIR/server.pub`` when
    present, else the run's own ``server.pub``) and the operator's trusted keys ``--public-keys DIR``.
    """
    expected: dict[str, str] = {}
    if keys_dir is not None:
        for pub in sorted(keys_dir.glob("*.pub")):
            if pub.name != SERVER_PUB:
                expected[pub.stem] = f"--public-keys {pub.name}"
    key_path = keys_dir / SERVER_PUB if keys_dir is not None and (keys_dir / SERVER_PUB).is_file() else run / SERVER_PUB
    result.records["server_key_source"] = str(key_path)
    result.records["server_key_pinned"] = key_path.parent != run
    server_key = None
    if key_path.is_file():
        try:
            server_key = signing.load_public_key(key_path)
        except signing.SigningError as exc:
            result.add("input", None, None, None, f"{key_path}: {exc}")
    manifest = _read_manifest(run, server_key, result)
    if manifest is not None:
        priv = manifest.get("privacy", {}) if isinstance(manifest.get("privacy"), dict) else {}
        scope = priv.get("scope")
        result.scope = scope if isinstance(scope, str) else ""
        result.records["rounds_planned"] = manifest.get("federation", {}).get("rounds")
        run_cap = priv.get("max_epsilon") if priv.get("enabled") else None
        result.records["privacy_enabled"] = priv.get("enabled") is True
        if priv.get("enabled") is not True:  # a non-private run must never pass, whatever ledgers lie beside it
            result.add("budget", None, None, None,
                       f"the signed {MANIFEST} says privacy.enabled = {json.dumps(priv.get('enabled'))}: this run "
                       "trained without differential privacy, so what its partners released has no (epsilon, "
                       "delta) bound and nothing here can certify it as private")
        caps: dict[str, tuple[float, str]] = {}
        signed: dict[str, dict[str, Any]] = {}
        for pid, decl in (manifest.get("partners") or {}).items():
            expected.setdefault(str(pid), f"{MANIFEST}")
            cap = _cap_of(decl.get("max_epsilon") if isinstance(decl, dict) else None, run_cap)
            if cap is not None:
                caps[str(pid)] = cap
            signed[str(pid)] = _signed_declaration(decl if isinstance(decl, dict) else {},
                                                   priv.get("target_delta") if priv.get("enabled") else None)
        result.records["caps"] = caps
        result.records["signed_declarations"] = signed
    elif not (run / MANIFEST).is_file():  # pinned keys name the partners, never the caps, delta or noise settings
        result.add("input", None, None, None,
                   f"no signed {MANIFEST}: the run's caps, delta, scope and noise settings are unknown"
                   + ("" if keys_dir is not None else ", and so are the partners it must account for (a removed "
                      "ledger could not be noticed)"))
    if not result.scope:
        cfg_privacy = result.context.get("config", {}).get("privacy")
        cfg_scope = cfg_privacy.get("scope") if isinstance(cfg_privacy, dict) else None
        result.scope = cfg_scope if isinstance(cfg_scope, str) else ""
    heads = _read_heads(run, server_key, manifest, result)
    result.records["expected_partners"] = sorted(expected)
    return expected, heads, server_key


def _signed_declaration(decl: dict[str, Any], run_delta: Any) -> dict[str, Any]:
    """What the manifest signs about one partner's releases: the delta they must stay within (the tighter of
    the run's and the partner's declared, as the server holds its replies to) and the users it registered."""
    deltas = [float(d) for d in (run_delta, decl.get("target_delta"))
              if is_number(d) and math.isfinite(d) and 0 < d < 1]
    users = decl.get("num_users")
    return {"target_delta": min(deltas) if deltas else None,
            "num_users": users if isinstance(users, int) and not isinstance(users, bool) and users > 0 else None}


def _cap_of(partner_cap: Any, run_cap: Any) -> tuple[float, str] | None:
    """The tighter of a partner's declared cap and the run's, as signed in the manifest."""
    ok = [(float(c), src) for c, src in ((partner_cap, f"{MANIFEST}, declared by the partner"),
                                        (run_cap, f"{MANIFEST} privacy.max_epsilon"))
          if is_number(c) and math.isfinite(c) and c > 0]
    return next(c for c in ok if c[0] == min(v for v, _ in ok)) if ok else None  # a tie names the partner's


def _read_manifest(run: Path, server_key: Any, result: AuditResult) -> dict[str, Any] | None:
    path = run / MANIFEST
    if not path.is_file():
        return None
    if server_key is None:
        result.add("input", None, None, None, f"{MANIFEST} present but no server public key ({SERVER_PUB})")
        return None
    try:
        doc = verify_record(read_json(path), "manifest", server_key)
    except RecordError as exc:
        result.add("input" if "unreadable" in str(exc) else "tamper", None, None, None, f"{MANIFEST}: {exc}")
        return None
    if not isinstance(doc.get("partners"), dict):
        result.add("tamper", None, None, None, f"{MANIFEST}: signed but without a partners object")
        return None
    result.records["manifest"] = {k: doc.get(k) for k in ("created", "privacy", "federation")}
    return doc


def _read_heads(run: Path, server_key: Any, manifest: dict[str, Any] | None, result: AuditResult) -> dict[str, Any]:
    """The signed heads (partner -> {round, hash}); missing, unsigned or malformed ones are findings."""
    path = run / HEADS
    if not path.is_file():
        result.add("input", None, None, None,
                   f"no {HEADS}: the server's record of each ledger's newest entry is missing, so a truncated "
                   "or removed ledger could not be noticed")
        return {}
    try:
        doc = read_json(path)
    except RecordError as exc:
        result.add("input", None, None, None, str(exc))
        return {}
    if server_key is None:
        result.add("input", None, None, None, f"{HEADS} cannot be verified: no server public key ({SERVER_PUB})")
        return {}
    try:
        verify_record(doc, "ledger_heads", server_key)
    except RecordError as exc:
        result.add("tamper", None, None, None, f"{HEADS}: {exc}")
        return {}
    heads = doc.get("heads")
    if not isinstance(heads, dict) or not all(isinstance(h, dict) for h in heads.values()):
        result.add("tamper", None, None, None, f"{HEADS}: signed but malformed (heads must map partner -> object)")
        return {}
    if manifest is not None:
        if doc.get("manifest_sha256") != hashlib.sha256((run / MANIFEST).read_bytes()).hexdigest():
            result.add("tamper", None, None, None, f"{HEADS} was signed for another {MANIFEST}")
        unknown = sorted(set(heads) - set(manifest["partners"]))
        if unknown:
            result.add("tamper", None, None, None, f"{HEADS} names partners the manifest does not: {unknown}")
    received = _parse_received(doc.get("received"), heads)
    if received is None:
        result.add("tamper", None, None, None, f"{HEADS}: signed but malformed received (a list of rounds, each "
                                               "naming partners -> ledger entry hashes)")
    elif "received" in doc:
        result.records["received"] = received
    else:
        result.records["received_note"] = (f"{HEADS} names no per-round received entries (an older fedsocial): only "
                                           "each ledger's newest entry is checked against the server's record")
    names = doc.get("param_names")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):  # signed: known without the checkpoint
        result.records["popularity_prior"] = POPULARITY_PARAM in names
    elif names is not None:
        result.add("tamper", None, None, None, f"{HEADS}: signed but malformed param_names (a list of names)")
    result.records["rounds_completed"] = doc.get("round")
    result.records["params_sha256"] = doc.get("params_sha256")  # verified: the model the heads' round released
    result.records["heads_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return heads


def _parse_received(raw: Any, heads: dict[str, Any]) -> dict[str, list[tuple[int, str, str]]] | None:
    """The signed heads' ``received`` as partner -> [(server round, reply kind, entry hash)]; None when
    malformed. A partner named there must have a head too (the server keeps the newest it received)."""
    if raw is None:
        return {}
    out: dict[str, list[tuple[int, str, str]]] = {}
    if not isinstance(raw, list):
        return None
    for rec in raw:
        rnd = rec.get("round") if isinstance(rec, dict) else None
        partners = rec.get("partners") if isinstance(rec, dict) else None
        if not isinstance(rnd, int) or isinstance(rnd, bool) or not isinstance(partners, dict):
            return None
        for pid, got in partners.items():
            if pid not in heads or not isinstance(got, list):
                return None
            for e in got:
                if isinstance(e, str):  # the first form (a bare hash, no reply kind): presence and round only
                    e = {"reply": "any", "hash": e}
                if not isinstance(e, dict) or e.get("reply") not in (*RECEIVED_REPLIES, "any") or \
                        not (isinstance(e.get("hash"), str) and re.fullmatch(r"[0-9a-f]{64}", e["hash"])):
                    return None
                out.setdefault(pid, []).append((rnd, e["reply"], e["hash"]))
    return out


def _check_received(partner: str, entries: list[dict[str, Any]], lines: list[int], result: AuditResult) -> None:
    """Every release the server took from ``partner`` (signed in the heads, per round) must be charged by the
    entry its reply named, of that round and of that release's kind: the newest head alone cannot show a round
    a partner left out, nor an evaluation release charged by the round's training entry."""
    hashed = ((compute_entry_hash_or_none(entry), line, entry) for entry, line in zip(entries, lines, strict=True))
    by_hash = {h: (line, entry) for h, line, entry in hashed if h is not None}  # None: already a schema finding
    for rnd, reply, digest in (result.records.get("received") or {}).get(partner, []):
        found = by_hash.get(digest)
        what = "reply" if reply == "any" else f"{reply} reply"
        if found is None:
            result.add("tamper", partner, rnd, None,
                       f"the server took a {what} of round {rnd} naming ledger entry {digest[:12]}... as its "
                       "charge, and this ledger has no such entry: a release went uncharged (or the ledger was "
                       "rewritten)")
            continue
        line, entry = found
        kind = entry.get("release", "training")
        if entry.get("round") != rnd:
            result.add("tamper", partner, rnd, line,
                       f"the entry charging the {what} the server took in round {rnd} is of round "
                       f"{entry.get('round')!r}")
        elif reply != "any" and kind not in RECEIVED_REPLIES[reply]:
            result.add("tamper", partner, rnd, line,
                       f"the {reply} reply the server took in round {rnd} named a {kind!r} entry as its charge "
                       f"(it needs {' or '.join(map(repr, RECEIVED_REPLIES[reply]))}): that release went uncharged")


# any round-numbered file, however renamed (round_3.npz, round_0004.npz.bak): a model hidden under another
# name is still a released model
_CHECKPOINT = re.compile(r"round_(\d+)(?:\..*)?")


def _check_model(run: Path, result: AuditResult) -> None:
    """The signed heads name the global parameters of their round: the folder's checkpoint of that round must
    be them and none may be newer, else these privacy records are not those of this folder's model."""
    if "params_sha256" not in result.records:
        return  # no verified heads: already a finding
    want, rnd = result.records["params_sha256"], result.records.get("rounds_completed")
    if not isinstance(want, str) or not isinstance(rnd, int) or isinstance(rnd, bool):
        result.add("warning", None, None, None, f"{HEADS} names no model (written before the records bound the global "
                                                 "parameters): nothing ties these records to this folder's model")
        return
    folder = run / "checkpoints"
    rounds = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _CHECKPOINT.fullmatch(p.name))) \
        if folder.is_dir() else []
    if rounds and rounds[-1] > rnd:
        result.add("tamper", None, rounds[-1], None,
                   f"checkpoints/ holds a model of round {rounds[-1]}, newer than round {rnd}, the last the signed "
                   f"{HEADS} cover: a released model these privacy records do not account for")
    if rnd not in rounds:
        result.add("warning", None, rnd, None,
                   f"no checkpoints/round_{rnd:04d}.npz: the model the signed {HEADS} name is not in this folder "
                   "(the server stopped between signing and checkpointing, or the model was removed)")
        return
    from fedsocial.server.checkpoint import CheckpointError, load_checkpoint  # the server's own reader (no pickle)

    try:
        ckpt = load_checkpoint(folder / f"round_{rnd:04d}.npz")
    except (CheckpointError, TypeError, AttributeError) as exc:
        result.add("tamper", None, rnd, None, f"checkpoints/round_{rnd:04d}.npz: {exc}")
        return
    if compute_params_sha256(ckpt.names, ckpt.arrays) != want:
        result.add("tamper", None, rnd, None,
                   f"checkpoints/round_{rnd:04d}.npz is not the model the signed {HEADS} name (its sha256 differs): "
                   "these privacy records are not those of this folder's run")
        return
    result.records.setdefault("popularity_prior", POPULARITY_PARAM in ckpt.names)  # heads without param_names


def _check_popularity(result: AuditResult) -> None:
    """A model with the DP popularity prior (``item_pop``: only a config that releases popularity has it, and
    partners register one parameter list) was trained by partners that each released their histogram with
    their first round: every partner whose round-1 release the server took must charge a popularity entry of
    round 1 (shared/privacy/popularity.py), else the histogram in the model went uncharged."""
    if result.records.get("popularity_prior") is not True:
        return
    for report in result.partners:
        if not report.rounds or not any(r == 1 and reply == "fit" for r, reply, _ in (
                result.records.get("received") or {}).get(report.partner_id, [])):
            continue  # no verified entries (already a finding), or no round-1 release the server took
        if not any(r.release == "popularity" and r.round == 1 for r in report.rounds):
            result.add("tamper", report.partner_id, 1, None,
                       f"the server took this partner's round-1 release and the model carries the DP popularity "
                       f"prior ({POPULARITY_PARAM}), but the ledger charges no popularity release: the histogram "
                       "it sent with round 1 went uncharged")


def _metrics_verdict(result: AuditResult, verified: bool, text: str) -> None:
    result.records["metrics"] = {"verified": verified, "note": text}


def _check_metrics_record(run: Path, server_key: Any, result: AuditResult) -> None:
    """metrics.json must be the one the server signed (``metrics_record.json``: its sha256), for the round of
    the signed heads and chained to this folder's manifest and heads; else its numbers were changed after the
    run, or come from another run or round (tampering). No record beside signed heads or a metrics.json is a
    warning: a run of an older fedsocial, one still running or stopped before its end, or a removed record."""
    metrics, path = run / METRICS, run / METRICS_RECORD
    if not path.is_file():
        if metrics.is_file() or (run / HEADS).is_file():
            what = (f"{METRICS} is not bound by the server's signature: its numbers (NDCG, recall, the "
                    "per-partner metrics, federation_gain, epsilon) are unverified" if metrics.is_file()
                    else f"no {METRICS} either: the run's results were not published")
            result.add("warning", None, None, None,
                       f"no {METRICS_RECORD}: {what} (a run of an older fedsocial, one still running or stopped "
                       "before its end, or the record was removed)")
            _metrics_verdict(result, False, f"not signed (no {METRICS_RECORD})" if metrics.is_file()
                             else f"absent (no {METRICS} and no {METRICS_RECORD})")
        return
    try:
        doc = read_json(path)
    except RecordError as exc:
        result.add("input", None, None, None, str(exc))
        _metrics_verdict(result, False, f"{METRICS_RECORD} unreadable")
        return
    if server_key is None:
        result.add("input", None, None, None, f"{METRICS_RECORD} cannot be verified: no server public key "
                                              f"({SERVER_PUB})")
        _metrics_verdict(result, False, f"{METRICS_RECORD} cannot be verified (no server key)")
        return
    try:
        verify_record(doc, "metrics", server_key)
    except RecordError as exc:
        result.add("tamper", None, None, None, f"{METRICS_RECORD}: {exc}")
        _metrics_verdict(result, False, f"NOT verified: {METRICS_RECORD} does not verify")
        return
    rnd, problems = doc.get("round"), []
    heads_round = result.records.get("rounds_completed")
    if "heads_sha256" in result.records:  # verified heads: the record must be of their round, chained to them
        if rnd != heads_round:
            problems.append(f"{METRICS_RECORD} was signed for round {rnd!r}, the signed {HEADS} for round "
                            f"{heads_round!r}: {METRICS} is not the result of the round these records account for")
        if doc.get("heads_sha256") != result.records["heads_sha256"] or \
                doc.get("params_sha256") != result.records.get("params_sha256"):
            problems.append(f"{METRICS_RECORD} was signed with another {HEADS} (or another model) than this "
                            "folder's")
    if (run / MANIFEST).is_file() and doc.get("manifest_sha256") != hashlib.sha256(
            (run / MANIFEST).read_bytes()).hexdigest():
        problems.append(f"{METRICS_RECORD} was signed for another {MANIFEST}")
    for msg in problems:
        result.add("tamper", None, rnd if isinstance(rnd, int) else None, None, msg)
    if not metrics.is_file():
        result.add("warning", None, None, None, f"{METRICS_RECORD} signs a {METRICS} that is not in this folder")
        _metrics_verdict(result, False, f"absent ({METRICS_RECORD} signs one that is not in this folder)")
        return
    if hashlib.sha256(metrics.read_bytes()).hexdigest() != doc.get("metrics_sha256"):
        result.add("tamper", None, rnd if isinstance(rnd, int) else None, None,
                   f"{METRICS} is not the one the server signed (its sha256 differs from {METRICS_RECORD}'s): "
                   "its numbers were changed after the run, or it is another run's")
        _metrics_verdict(result, False, f"NOT verified: {METRICS} differs from the one the server signed")
        return
    if problems:
        _metrics_verdict(result, False, f"NOT verified: {METRICS_RECORD} is not chained to this folder's records")
        return
    writer = doc.get("writer")
    _metrics_verdict(result, True, f"verified by the server's signature ({METRICS_RECORD}, round {rnd}"
                                   + (f", written by {writer}" if isinstance(writer, str) else "") + ")")


def _check_metrics(result: AuditResult) -> None:
    """metrics.json's ``epsilon`` (the largest over partners) must not understate the ledgers, and one above
    them says the ledgers are not the run's that wrote it (both warnings, also when metrics.json is signed:
    the ledgers are the accounting of record, metrics.json the server's summary of them)."""
    metrics = result.context.get("metrics", {})
    reported = metrics.get("epsilon")
    ledger_max = result.ledger_max_epsilon
    if (result.records.get("metrics") or {}).get("verified") is True and _check_published_epsilon(metrics, result):
        return
    if (result.records.get("metrics") or {}).get("verified") is not True and "heads_sha256" in result.records \
            and metrics.get("rounds_completed") == result.records.get("rounds_completed") \
            and _check_published_epsilon(metrics, result, signed=False):
        return  # unsigned, of the heads' own round: no crash leaves that understating them (found in review)
    if isinstance(reported, (int, float)) and ledger_max is not None and reported < ledger_max * (1 - 1e-6):
        result.add("warning", None, None, None,
                   f"metrics.json reports epsilon {reported:.6g}, below the ledgers' largest {ledger_max:.6g}")
    elif isinstance(reported, (int, float)) and ledger_max is not None and reported > ledger_max * (1 + 1e-6):
        result.add("warning", None, None, None,
                   f"metrics.json reports epsilon {reported:.6g}, above the ledgers' largest {ledger_max:.6g}: "
                   "these ledgers may not be this run's")


def _check_published_epsilon(metrics: dict[str, Any], result: AuditResult, signed: bool = True) -> bool:
    """A signed, verified metrics.json must not publish an epsilon below that of the entries the server's
    signed heads name (what it took last from each partner: its ``epsilon``, the largest over partners, and
    each partner's own): the ledgers exceed those only by releases the server never took (a straggler's
    late reply), the heads never. Returns whether it found such an understatement (an accounting finding).
    ``signed = False``: an unsigned metrics.json that names the heads' round as its ``rounds_completed`` (a
    server killed between writing metrics.json and its record leaves an earlier round's, never one of the
    heads' round that publishes less than they name), held to the same rule."""
    heads = {p.partner_id: p.head_epsilon for p in result.partners if p.head_epsilon is not None}
    if not heads:
        return False
    found = False
    what = "signed metrics.json" if signed else \
        f"unsigned metrics.json (no {METRICS_RECORD}, yet of the signed heads' round)"
    top, largest = metrics.get("epsilon"), max(heads.values())
    if is_number(top) and top < largest * (1 - 1e-6):
        found = True
        result.add("accounting", None, None, None,
                   f"the {what} publishes epsilon {top:.6g}, below {largest:.6g}, the epsilon of record "
                   f"of the newest entries the server took (its signed {HEADS}): the published privacy loss "
                   "understates the run's accounting")
    partners = metrics.get("partners")
    for pid, eps in sorted(heads.items()):
        own = partners.get(pid) if isinstance(partners, dict) else None
        claimed = own.get("epsilon") if isinstance(own, dict) else None
        if is_number(claimed) and claimed < eps * (1 - 1e-6):
            found = True
            result.add("accounting", pid, None, None,
                       f"the {what} publishes this partner's epsilon {claimed:.6g}, below {eps:.6g}, that "
                       f"of the entry the server's signed {HEADS} name: the published privacy loss understates it")
    return found


def _canary_verdict(result: AuditResult, verified: bool, text: str) -> None:
    result.records["canary"] = {"verified": verified, "note": text}


def _check_canary_record(run: Path, server_key: Any, result: AuditResult) -> None:
    """canary_audit.json must be the one ``fedsocial canary-audit`` signed with the run's key
    (``canary_record.json``: its sha256, for this folder's manifest); else its lower bound was edited (lowered
    to hide an alarm, raised to fake one) or the file is another run's (tampering). An unsigned canary file is a
    warning: written by an older fedsocial, into a folder without the run's key, or its record removed."""
    canary, path = run / CANARY, run / CANARY_RECORD
    if not path.is_file():
        if canary.is_file():
            result.add("warning", None, None, None,
                       f"no {CANARY_RECORD}: {CANARY}'s empirical lower bound is not bound by the server's signature "
                       "(an older fedsocial, a folder without the run's key, or the record was removed)")
            _canary_verdict(result, False, f"not signed (no {CANARY_RECORD})")
        return
    try:
        doc = verify_record(read_json(path), "canary", server_key) if server_key is not None else None
    except RecordError as exc:
        result.add("tamper", None, None, None, f"{CANARY_RECORD}: {exc}")
        result.canary = None
        _canary_verdict(result, False, f"NOT verified: {CANARY_RECORD} does not verify")
        return
    if doc is None:
        result.add("input", None, None, None,
                   f"{CANARY_RECORD} cannot be verified: no server public key ({SERVER_PUB})")
        _canary_verdict(result, False, f"{CANARY_RECORD} cannot be verified (no server key)")
        return
    if not canary.is_file():
        result.add("warning", None, None, None, f"{CANARY_RECORD} signs a {CANARY} that is not in this folder "
                                                "(the canary audit's result was removed)")
        _canary_verdict(result, False, f"absent ({CANARY_RECORD} signs one that is not in this folder)")
        return
    problems = []
    if sha256_of(canary) != doc.get("canary_sha256"):
        problems.append(f"{CANARY} is not the one canary-audit signed (its sha256 differs from {CANARY_RECORD}'s): "
                        "its lower bound was changed after the audit, or it is another run's")
    manifest = run / MANIFEST
    if manifest.is_file() and doc.get("manifest_sha256") != sha256_of(manifest):
        problems.append(f"{CANARY_RECORD} was signed for another {MANIFEST}")
    for msg in problems:
        result.add("tamper", None, None, None, msg)
    if problems:
        result.canary = None  # numbers that are not the audit's are neither shown nor judged
        _canary_verdict(result, False, f"NOT verified: {problems[0]}")
        return
    _canary_verdict(result, True, f"verified by the server's signature ({CANARY_RECORD})")


def _check_canary(result: AuditResult) -> None:
    """A canary lower bound above the accounted epsilon refutes the guarantee (Steinke et al. 2023, Thm 5.2).

    The bound holds with probability ``confidence`` for any mechanism that is (epsilon, delta)-DP, so
    exceeding the epsilon the canary run was accounted at is evidence that the implementation or its
    accounting is wrong, not bad luck (at most a 1 - confidence chance of a false alarm).
    """
    if result.canary is None:
        return
    cost = result.canary.get("privacy_cost")
    if isinstance(cost, dict) and cost.get("real_users") is True:  # a second DP use of those users' data
        eps = cost.get("epsilon")
        result.add("warning", None, None, None,
                   f"canary_audit.json was computed on partner {cost.get('partner')!s}'s real users: publishing it "
                   f"costs them up to epsilon {eps:.4g} more than their ledger (composition; not in any ledger); "
                   "`fedsocial canary-audit` without --background real measures the same mechanism at no cost"
                   if is_number(eps) else "canary_audit.json was computed on real users: publishing it is a "
                   "second use of their data that no ledger holds")
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


