"""A per-partner, append-only, signed and hash-chained privacy ledger (JSON Lines).

One entry per round a partner trained, appended *before* the partner's update leaves the machine.
Each entry records the round's DP-SGD parameters, the cumulative epsilon (RDP of record, PRV as a
cross-check) and the partner's population, and is

* chained: ``prev_hash`` is the SHA-256 (hex) of the previous entry's canonical JSON line
  (:data:`GENESIS_HASH` for the first), so dropping, reordering or inserting entries breaks the chain;
* signed: ``signature`` is Ed25519 (base64) over the canonical JSON of the entry without
  ``signature``; ``public_key_fingerprint`` names the key (SHA-256 of its raw bytes).

Canonical JSON is ``json.dumps(sort_keys=True, separators=(",", ":"), allow_nan=False)``; floats are
written by ``repr`` (shortest round-trip form), so parsing and re-serialising is exact.

Durability: each entry is one ``os.write`` of one full line on an ``O_APPEND`` descriptor followed by
``fsync`` (the directory is fsynced when the file is created), under an exclusive ``flock``. A process
killed mid-write can leave at most a torn *last* line without its newline; readers report it
(:class:`TornTailWarning`) and never touch earlier lines, and :func:`recover_torn_tail` truncates
exactly that fragment before the next append.

The ledger alone cannot reveal a truncated *tail* (the newest entries removed); :meth:`Ledger.head`
gives ``(round, hash)`` of the newest entry so that a third party (the server) can record it, and the
auditor checks recorded heads when a run directory has them.

Rounds a partner refuses to train (budget exhausted) produce no ledger entry: nothing was released.
They are logged in a separate, unsigned file by :func:`record_refusal`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsocial.shared import signing
from fedsocial.shared.privacy.accounting import (
    DEFAULT_ALPHAS,
    INTEGER_ALPHAS,
    Event,
    PrivacyConfigError,
    compute_epsilon_prv,
    compute_rdp_curve,
    epsilon_from_rdp,
    validate_event,
)

LEDGER_VERSION = 1
GENESIS_HASH = "0" * 64
UNIT = "user"
ADJACENCY = "add/remove one user's record"
ACCOUNTANT_NAMES = ("rdp", "prv", "rdp_int")
# Partner ids name files (<id>.jsonl, <id>.pub): no dots, slashes or spaces.
PARTNER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Relative tolerance when re-deriving a recorded epsilon_rdp with the same (Opacus) analysis: the
# value is written by this very code, so only floating-point noise across library versions is allowed.
EPSILON_RTOL = 1e-6

# Plausible ranges: a value outside them is not a DP-SGD round anyone ran, and would make the accountant
# overflow (a steps count of 400 digits) or crawl (sigma 1e-300): it is refused as a schema problem.
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 1e-2, 1e6
MAX_STEPS = 10**9
MAX_ROUND = 10**9
MAX_POPULATION = 10**12
MAX_GRAD_NORM = 1e9
MAX_EPSILON = 1e12
_FLOAT_FIELDS = ("noise_multiplier", "sample_rate", "max_grad_norm", "target_delta", "epsilon_rdp", "epsilon_prv")
_INT_FIELDS = ("round", "steps", "population", "ledger_version")
_STR_FIELDS = ("partner_id", "unit", "adjacency", "accountant", "timestamp", "prev_hash",
               "public_key_fingerprint", "signature")
REQUIRED_FIELDS: tuple[str, ...] = (*_INT_FIELDS, *_FLOAT_FIELDS, *_STR_FIELDS, "secure_rng")
_MANAGED_FIELDS = ("partner_id", "prev_hash", "public_key_fingerprint", "signature", "ledger_version")


class LedgerError(Exception):
    """An unreadable or invalid ledger line, or a refused append."""

    def __init__(self, partner: str | None, round: int | None, line: int | None, reason: str) -> None:
        self.partner, self.round, self.line, self.reason = partner, round, line, reason
        super().__init__(describe(partner, round, line, reason))


class TornTailWarning(UserWarning):
    """The last line of a ledger is incomplete (a writer was killed mid-write)."""


@dataclass(frozen=True)
class Problem:
    """One verification failure. ``kind``: schema|key|signature|chain|order|epsilon|partner|head."""

    partner: str | None
    round: int | None
    line: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        return describe(self.partner, self.round, self.line, f"{self.kind}: {self.message}")


def describe(partner: str | None, round: int | None, line: int | None, reason: str) -> str:
    where = [f"partner {partner}" if partner is not None else "partner ?"]
    if round is not None:
        where.append(f"round {round}")
    if line is not None:
        where.append(f"line {line}")
    return f"{', '.join(where)}: {reason}"


@dataclass
class LedgerScan:
    """What a reader found: the complete entries (with 1-based line numbers) and any torn tail."""

    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # the complete lines as stored (without newline)
    valid_length: int = 0  # bytes up to and including the last complete line's newline
    torn_tail: bytes = b""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the entry's canonical JSON line (signature included, newline excluded)."""
    return hashlib.sha256(canonical_json(dict(entry)).encode("ascii")).hexdigest()


def signing_payload(entry: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in entry.items() if k != "signature"}).encode("ascii")


def is_number(x: Any) -> TypeGuard[float]:
    """A JSON number (bool is not one, although Python's bool is an int)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def schema_problems(entry: Mapping[str, Any]) -> list[str]:
    """Field-level problems of one entry (missing fields, wrong types, values out of range)."""
    out = [f"missing field {k!r}" for k in REQUIRED_FIELDS if k not in entry]
    for k in _INT_FIELDS:
        if k in entry and (not isinstance(entry[k], int) or isinstance(entry[k], bool)):
            out.append(f"{k}: expected an integer, got {_short(entry[k])}")
    for k in _FLOAT_FIELDS:
        if k in entry and not (is_number(entry[k]) and _fits_float(entry[k])):
            out.append(f"{k}: expected a finite number, got {_short(entry[k])}")
    for k in _STR_FIELDS:
        if k in entry and not isinstance(entry[k], str):
            out.append(f"{k}: expected a string, got {entry[k]!r}")
    if "secure_rng" in entry and not isinstance(entry["secure_rng"], bool):
        out.append(f"secure_rng: expected a boolean, got {entry['secure_rng']!r}")
    if entry.get("release", "training") not in RELEASE_KINDS:
        out.append(f"release: expected one of {RELEASE_KINDS}, got {entry.get('release')!r}")
    if out:
        return out
    checks = [
        (entry["ledger_version"] == LEDGER_VERSION, f"ledger_version: expected {LEDGER_VERSION}"),
        (entry["round"] >= 0, "round: must be >= 0"),
        (entry["partner_id"] != "", "partner_id: must not be empty"),
        (entry["unit"] == UNIT, f"unit: expected {UNIT!r}"),
        (entry["adjacency"] == ADJACENCY, f"adjacency: expected {ADJACENCY!r}"),
        (entry["accountant"] in ACCOUNTANT_NAMES, f"accountant: must be one of {ACCOUNTANT_NAMES}"),
        (MIN_NOISE_MULTIPLIER <= entry["noise_multiplier"] <= MAX_NOISE_MULTIPLIER,
         f"noise_multiplier: must be in [{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}], "
         f"got {_short(entry['noise_multiplier'])}"),
        (0 < entry["sample_rate"] <= 1, "sample_rate: must be in (0, 1]"),
        (0 <= entry["steps"] <= MAX_STEPS, f"steps: must be in [0, {MAX_STEPS}], got {_short(entry['steps'])}"),
        (entry["round"] <= MAX_ROUND, f"round: must be <= {MAX_ROUND}, got {_short(entry['round'])}"),
        (0 < entry["max_grad_norm"] <= MAX_GRAD_NORM, f"max_grad_norm: must be in (0, {MAX_GRAD_NORM:g}]"),
        (0 < entry["target_delta"] < 1, "target_delta: must be in (0, 1)"),
        (0 <= entry["epsilon_rdp"] <= MAX_EPSILON and 0 <= entry["epsilon_prv"] <= MAX_EPSILON,
         f"epsilon_rdp, epsilon_prv: must be in [0, {MAX_EPSILON:g}]"),
        (1 <= entry["population"] <= MAX_POPULATION,
         f"population: must be in [1, {MAX_POPULATION}], got {_short(entry['population'])}"),
        (_is_hex64(entry["prev_hash"]), "prev_hash: expected 64 hex digits"),
        (_is_hex64(entry["public_key_fingerprint"]), "public_key_fingerprint: expected 64 hex digits"),
    ]
    return [msg for ok, msg in checks if not ok]


def _fits_float(x: float) -> bool:
    """Finite as a double: a 400-digit integer where a float belongs overflows (found by tests/test_fuzz_ledger.py)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _short(value: Any) -> str:
    """A value for a message: a 400-digit integer is shown by its length, not printed whole."""
    if isinstance(value, int) and abs(value) >= 10**30:  # str() of a huge int is slow, or refused past 4300 digits
        return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _plain(value: Any) -> Any:
    """numpy scalars to Python numbers (json cannot write them)."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _partner_from_path(path: Path) -> str:
    return path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem


def scan_ledger(path: str | os.PathLike[str]) -> LedgerScan:
    """Parse every complete line; a trailing fragment without newline is reported, not parsed.

    Raises :class:`LedgerError` (naming the line) for a complete line that is not a JSON object: that
    is damage, not an interrupted write.
    """
    path = Path(path)
    partner = _partner_from_path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LedgerError(partner, None, None, f"{path}: cannot read: {exc.strerror or exc}") from None
    scan = LedgerScan(path=path)
    end = data.rfind(b"\n") + 1
    scan.valid_length, scan.torn_tail = end, data[end:]
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit integer
            raise LedgerError(partner, None, number, f"{path}: not valid JSON: {exc}") from None
        if not isinstance(entry, dict):
            raise LedgerError(partner, None, number, f"{path}: expected a JSON object")
        scan.entries.append(entry)
        scan.lines.append(number)
        scan.raw.append(raw.decode("utf-8"))
    return scan


def read_ledger(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The complete entries of a ledger; a torn last line is reported with :class:`TornTailWarning`."""
    scan = scan_ledger(path)
    if scan.torn_tail:
        warnings.warn(
            f"{scan.path}: torn last line ({len(scan.torn_tail)} bytes after line {len(scan.entries)}) ignored",
            TornTailWarning,
            stacklevel=2,
        )
    return scan.entries


# within a round, in this order: the popularity release (round 1 only), training, the DP selection of the
# served model (the last round only, shared/privacy/selection.py), evaluation
RELEASE_KINDS = ("popularity", "training", "selection", "evaluation")


def order_key(entry: Mapping[str, Any]) -> tuple[int, int]:
    """Entries are ordered by round, and within a round by :data:`RELEASE_KINDS`."""
    kind = entry.get("release", "training")
    return int(entry["round"]), RELEASE_KINDS.index(kind if kind in RELEASE_KINDS else "training")


def entries_before_training(entries: Sequence[Mapping[str, Any]], round_: int) -> list[Mapping[str, Any]]:
    """Every release charged before round ``round_``'s training: earlier rounds', and this round's
    popularity release (the history that round's admission and intent are computed on)."""
    return [e for e in entries if order_key(e) < (round_, RELEASE_KINDS.index("training"))]


def training_entries(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in entries if e.get("release", "training") == "training"]


def history_of(entries: Sequence[Mapping[str, Any]]) -> list[Event]:
    """The accountant history ``[(noise_multiplier, sample_rate, steps), ...]``, one event per entry."""
    return [validate_event((e["noise_multiplier"], e["sample_rate"], e["steps"])) for e in entries]


def verify_ledger(
    entries: Sequence[Mapping[str, Any]],
    public_key: Ed25519PublicKey,
    partner_id: str | None = None,
    lines: Sequence[int] | None = None,
    check_epsilon: bool = True,
    raw: Sequence[str] | None = None,
) -> list[Problem]:
    """Every problem found: schema, key fingerprint, signatures, hash chain, rounds strictly
    increasing, one partner, and each cumulative ``epsilon_rdp`` re-derived from the recorded history.

    With ``raw`` (the stored lines, from :func:`scan_ledger`), a line that is not exactly the canonical
    JSON of its entry is reported too (kind ``format``): an edit that leaves the parsed values equal,
    e.g. a changed 17th significant digit that rounds to the same double, is still an edit.
    """
    problems: list[Problem] = []
    fp = signing.fingerprint(public_key)
    expected_prev = GENESIS_HASH
    last_round: int | None = None
    last_key: tuple[int, int] | None = None
    rdp = np.zeros(len(DEFAULT_ALPHAS))
    rdp_int = np.zeros(len(INTEGER_ALPHAS))  # entries of accountant rdp_int: the integer orders only
    history_ok = True
    for i, entry in enumerate(entries):
        line = lines[i] if lines is not None else i + 1
        rnd = entry.get("round") if isinstance(entry.get("round"), int) else None
        pid = entry.get("partner_id") if isinstance(entry.get("partner_id"), str) else partner_id

        def add(kind: str, message: str, rnd: int | None = rnd, line: int = line, pid: str | None = pid) -> None:
            problems.append(Problem(pid, rnd, line, kind, message))

        bad = schema_problems(entry)
        if raw is not None and _canonical_or_none(entry) != raw[i]:
            add("format", "line is not the canonical JSON of its entry (edited after signing)")
        for msg in bad:
            add("schema", msg)
        if partner_id is not None and entry.get("partner_id") != partner_id:
            add("partner", f"partner_id {entry.get('partner_id')!r} in the ledger of {partner_id!r}")
            partner_id = partner_id  # keep naming the ledger's owner
        if entry.get("public_key_fingerprint") != fp:
            add("key", "public_key_fingerprint does not match the verifying key")
        if not _signature_ok(entry, public_key):
            add("signature", "Ed25519 signature does not verify (entry altered or wrong key)")
        if entry.get("prev_hash") != expected_prev:
            what = "the genesis value" if i == 0 else f"the hash of line {lines[i - 1] if lines else i}"
            add("chain", f"prev_hash is not {what} (entry dropped, inserted, reordered or altered)")
        try:
            expected_prev = entry_hash(entry)
        except ValueError:  # NaN/inf smuggled in: not canonical JSON
            expected_prev = ""
        key = order_key(entry) if rnd is not None else None
        if key is not None and last_key is not None and key <= last_key:
            add("order", f"round {rnd} does not follow round {last_round} (rounds must strictly increase; a "
                         "round's evaluation release may follow its training release)")
        last_round = rnd if rnd is not None else last_round
        last_key = key if key is not None else last_key
        if not check_epsilon:
            continue
        if bad:
            history_ok = False  # cannot re-derive this or later cumulative epsilons
            continue
        try:
            event = validate_event((entry["noise_multiplier"], entry["sample_rate"], entry["steps"]))
            rdp = rdp + compute_rdp_curve([event])
            rdp_int = rdp_int + compute_rdp_curve([event], INTEGER_ALPHAS)
            recomputed = (epsilon_from_rdp(rdp_int, entry["target_delta"], INTEGER_ALPHAS)
                          if entry.get("accountant") == "rdp_int" else epsilon_from_rdp(rdp, entry["target_delta"]))
        except PrivacyConfigError as exc:
            add("schema", str(exc))
            history_ok = False
            continue
        if history_ok and not math.isclose(entry["epsilon_rdp"], recomputed, rel_tol=EPSILON_RTOL, abs_tol=1e-12):
            add("epsilon", f"recorded cumulative epsilon_rdp {entry['epsilon_rdp']!r} but the recorded "
                           f"history gives {recomputed!r}")
    return problems


def verify_head(
    entries: Sequence[Mapping[str, Any]], head_round: int | None, head_hash: str, partner_id: str | None = None
) -> list[Problem]:
    """Check the newest entry against a head ``(round, hash)`` recorded by a third party (the server).

    The chain alone cannot reveal that the newest entries were removed (a rolled-back tail); a head
    recorded elsewhere can. An entry *beyond* the recorded head is fine (the head may be older).
    """
    same_round = [i for i, entry in enumerate(entries) if entry.get("round") == head_round]
    if same_round:  # a round may hold a training and an evaluation release: the head names one of them
        if any(compute_entry_hash_or_none(entries[i]) == head_hash for i in same_round):
            return []
        lines = ", ".join(str(i + 1) for i in same_round)  # the head names one of them: none matches
        return [Problem(partner_id, head_round, same_round[-1] + 1, "head",
                        f"no entry of round {head_round} (line{'s' if len(same_round) > 1 else ''} {lines}) is the "
                        "one the server recorded as this partner's head: an entry of that round was changed or "
                        "replaced")]
    if head_round is None and head_hash == GENESIS_HASH:
        return []
    last = entries[-1].get("round") if entries else None
    return [Problem(partner_id, head_round, None, "head",
                    f"the server recorded an entry for round {head_round} that the ledger lacks "
                    f"(last entry: round {last}); entries were removed")]


def compute_entry_hash_or_none(entry: Mapping[str, Any]) -> str | None:
    """The entry's hash, or None for an entry with no canonical form (already a schema finding)."""
    try:
        return entry_hash(entry)
    except (TypeError, ValueError):  # NaN or a non-JSON value smuggled in: no canonical form, no hash
        return None


def _canonical_or_none(entry: Mapping[str, Any]) -> str | None:
    try:
        return canonical_json(dict(entry))
    except ValueError:
        return None


def _signature_ok(entry: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    sig = entry.get("signature")
    if not isinstance(sig, str):
        return False
    try:
        raw = base64.b64decode(sig.encode("ascii"), validate=True)
        payload = signing_payload(entry)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return signing.verify(public_key, payload, raw)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_locked(path: Path) -> tuple[int, bool]:
    """An O_APPEND descriptor holding an exclusive flock; True when the file was just created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        created = True
    except FileExistsError:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)
    if created:
        _fsync_dir(path.parent)  # the new directory entry must survive a crash too
    return fd, created


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one complete line durably: one ``os.write`` on O_APPEND, then fsync (under flock)."""
    path = Path(path)
    fd, _ = _open_locked(path)
    try:
        _write_all_once(fd, path, line)
    finally:
        os.close(fd)


def _write_all_once(fd: int, path: Path, line: str) -> None:
    data = line.encode("ascii")
    if not data.endswith(b"\n") or b"\n" in data[:-1]:
        raise ValueError("append_line expects exactly one newline-terminated line")
    size = os.fstat(fd).st_size
    written = os.write(fd, data)
    if written != len(data):  # regular files do not short-write short of ENOSPC; undo the fragment
        os.ftruncate(fd, size)
        os.fsync(fd)
        raise OSError(errno.EIO, f"{path}: short write ({written} of {len(data)} bytes), entry not recorded")
    os.fsync(fd)


def recover_torn_tail(path: str | os.PathLike[str], locked_fd: int | None = None) -> bytes:
    """Remove a torn last line (bytes after the last newline) and return it; complete lines untouched.

    A single ``ftruncate`` to the end of the last complete line, under the writers' lock, then fsync.
    ``locked_fd``: a writable descriptor of ``path`` on which the caller already holds the lock
    (flock is per open file, so taking it again on a new descriptor would deadlock).
    """
    path = Path(path)
    if locked_fd is None and not path.exists():
        return b""
    fd = locked_fd if locked_fd is not None else os.open(path, os.O_RDWR)
    try:
        if locked_fd is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        tail = data[end:]
        if tail:
            os.ftruncate(fd, end)
            os.fsync(fd)
        return tail
    finally:
        if locked_fd is None:
            os.close(fd)


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Ledger:
    """One partner's ledger file, written with that partner's Ed25519 key.

    ``Ledger(path, signing_key, partner_id)`` opens (or will create) ``path``; a torn last line left by
    a killed writer is removed at open (``recover=True``, with a :class:`TornTailWarning`) so that the
    next append starts on a fresh line. Existing entries must belong to ``partner_id``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        signing_key: Ed25519PrivateKey,
        partner_id: str,
        recover: bool = True,
    ) -> None:
        if not isinstance(partner_id, str) or not PARTNER_ID_RE.fullmatch(partner_id):
            raise LedgerError(None, None, None, f"partner_id must match {PARTNER_ID_RE.pattern}, got {partner_id!r}")
        self.path = Path(path)
        self.partner_id = partner_id
        self.signing_key = signing_key
        self.public_key = signing_key.public_key()
        self.fingerprint = signing.fingerprint(self.public_key)
        self.recover = recover
        self._cache_size = -1
        self._entries: list[dict[str, Any]] = []
        if self.path.exists():
            self._load()

    def _load(self, locked_fd: int | None = None) -> None:
        scan = scan_ledger(self.path)
        if scan.torn_tail:
            if not self.recover:
                raise LedgerError(self.partner_id, None, len(scan.entries) + 1,
                                  f"{self.path}: torn last line; call recover_torn_tail() before appending")
            lost = recover_torn_tail(self.path, locked_fd)
            warnings.warn(f"{self.path}: removed a torn last line ({len(lost)} bytes) left by an interrupted "
                          "write; that entry was never complete", TornTailWarning, stacklevel=3)
            scan = scan_ledger(self.path)
        for entry, line in zip(scan.entries, scan.lines, strict=True):
            if entry.get("partner_id") != self.partner_id:
                raise LedgerError(self.partner_id, entry.get("round"), line,
                                  f"{self.path}: entry of partner {entry.get('partner_id')!r}")
        self._entries = scan.entries
        self._cache_size = scan.valid_length

    def _refresh(self, locked_fd: int | None = None) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size != self._cache_size:  # someone else appended (or a torn tail appeared): re-read
            if size == 0:
                self._entries, self._cache_size = [], 0
            else:
                self._load(locked_fd)

    def entries(self) -> list[dict[str, Any]]:
        self._refresh()
        return [dict(e) for e in self._entries]

    def history(self) -> list[Event]:
        """The accountant history to restore at the start of every round."""
        return history_of(self.entries())

    def last_round(self) -> int | None:
        entries = self.entries()
        return int(entries[-1]["round"]) if entries else None

    def head(self) -> tuple[int | None, str]:
        """``(round, hash)`` of the newest entry (``(None, GENESIS_HASH)`` when empty): give it to a third party."""
        entries = self.entries()
        return (int(entries[-1]["round"]), entry_hash(entries[-1])) if entries else (None, GENESIS_HASH)

    def verify(self) -> list[Problem]:
        scan = scan_ledger(self.path) if self.path.exists() else LedgerScan(self.path)
        return verify_ledger(scan.entries, self.public_key, self.partner_id, scan.lines, raw=scan.raw)

    def append(self, entry_fields: Mapping[str, Any]) -> dict[str, Any]:
        """Complete, sign and durably append one entry; returns the entry as written.

        ``entry_fields`` holds at least ``round``, ``noise_multiplier``, ``sample_rate``, ``steps``,
        ``max_grad_norm``, ``target_delta``, ``accountant``, ``epsilon_rdp``, ``epsilon_prv``,
        ``population`` and ``secure_rng``; ``unit``, ``adjacency`` and ``timestamp`` are filled in;
        chain, key and signature fields are managed here. Extra JSON-serialisable fields are kept
        (and signed).
        """
        fields = {k: _plain(v) for k, v in entry_fields.items()}
        for k in _MANAGED_FIELDS:
            if k in fields and not (k == "partner_id" and fields[k] == self.partner_id):
                raise LedgerError(self.partner_id, fields.get("round"), None, f"field {k!r} is managed by the ledger")
        for k in _FLOAT_FIELDS:  # 1 -> 1.0: one canonical spelling per value
            if is_number(fields.get(k)):
                fields[k] = float(fields[k])
        fd, _ = _open_locked(self.path)
        try:
            self._refresh(fd)
            prev = self._entries[-1] if self._entries else None
            entry: dict[str, Any] = {"unit": UNIT, "adjacency": ADJACENCY, "timestamp": utc_timestamp(), **fields}
            entry.update(
                partner_id=self.partner_id,
                ledger_version=LEDGER_VERSION,
                prev_hash=entry_hash(prev) if prev is not None else GENESIS_HASH,
                public_key_fingerprint=self.fingerprint,
            )
            rnd = entry.get("round")
            problems = schema_problems({**entry, "signature": ""})
            if problems:
                raise LedgerError(self.partner_id, rnd if isinstance(rnd, int) else None, None, "; ".join(problems))
            if prev is not None and order_key(entry) <= order_key(prev):
                raise LedgerError(self.partner_id, rnd, None, f"round must exceed the last recorded {prev['round']} "
                                                              "(or be its evaluation release)")
            try:
                payload = signing_payload(entry)
            except (TypeError, ValueError) as exc:
                raise LedgerError(self.partner_id, rnd, None, f"entry is not JSON-serialisable: {exc}") from None
            entry["signature"] = base64.b64encode(signing.sign(self.signing_key, payload)).decode("ascii")
            _write_all_once(fd, self.path, canonical_json(entry) + "\n")
            self._entries.append(entry)
            self._cache_size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        return dict(entry)

    def append_round(
        self,
        *,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        target_delta: float,
        population: int,
        secure_rng: bool,
        accountant: str = "rdp",
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append the entry of a trained round, computing cumulative epsilon_rdp and epsilon_prv
        from this ledger's history plus the new event."""
        history = [*self.history(), validate_event((noise_multiplier, sample_rate, steps))]
        alphas = INTEGER_ALPHAS if accountant == "rdp_int" else DEFAULT_ALPHAS  # the orders its bound holds at
        eps_rdp = epsilon_from_rdp(compute_rdp_curve(history, alphas), target_delta, alphas)
        eps_prv = compute_epsilon_prv(history, target_delta)
        fields = dict(extra or {})
        fields.update(
            round=round, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
            max_grad_norm=max_grad_norm, target_delta=target_delta, population=population,
            secure_rng=secure_rng, accountant=accountant, epsilon_rdp=eps_rdp, epsilon_prv=eps_prv,
        )
        return self.append(fields)


def refusals_path(ledger_path: str | os.PathLike[str]) -> Path:
    """``<dir>/<partner>.refusals.jsonl`` beside ``<dir>/<partner>.jsonl``."""
    p = Path(ledger_path)
    return p.with_name(f"{_partner_from_path(p)}.refusals.jsonl")


def record_refusal(
    ledger_path: str | os.PathLike[str],
    *,
    partner_id: str,
    round: int,
    epsilon_spent: float,
    epsilon_next: float,
    max_epsilon: float,
    reason: str = "budget exhausted: the next round would exceed max_epsilon",
) -> dict[str, Any]:
    """Log a round the partner refused to train (no update was released, so no ledger entry)."""
    entry = {
        "round": int(round), "partner_id": partner_id, "epsilon_spent": float(epsilon_spent),
        "epsilon_next": float(epsilon_next), "max_epsilon": float(max_epsilon), "reason": reason,
        "timestamp": utc_timestamp(),
    }
    append_line(refusals_path(ledger_path), canonical_json(entry) + "\n")
    return entry
