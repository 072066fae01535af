"""The coordinator's signed records: what the auditor expects to find in a run folder.

A partner's ledger proves what that partner charged, but not that it is all there: a deleted ledger
or a truncated one is invisible from the ledgers alone. The server therefore signs, with its own
Ed25519 key created at run start (``RUN_DIR/server/signing.key``, 0600; public half
``RUN_DIR/server.pub``), two records:

``RUN_DIR/run_manifest.json``
    written when the run starts: the run's privacy settings (scope, cap, delta, noise, clipping,
    accountant), its federation settings, and every registered partner with the user count and the
    budget cap it declared. The auditor checks each partner's budget against its declared cap
    (and the run's cap) with no flags.
``RUN_DIR/ledger_heads.json``
    rewritten after every round: the round, for each partner the ``(round, hash)`` of the newest
    ledger entry its last reply named, and the sha256 of the global parameters that round released
    (``params_sha256``, :func:`compute_params_sha256`), and per round the hash of every ledger entry a
    reply the server took named (``received``, :func:`compute_received`). Every partner with a head must
    have a ledger that holds that entry and each entry it was received with, and the run's checkpoint of
    that round must be those parameters: records copied from another run do not match this folder's model.
``RUN_DIR/metrics_record.json``
    written right after ``metrics.json`` (and rewritten with it, by the server on every run or resume
    and by the operator's own tools that add to it: the simulation driver, ``compare_alone``): the round
    (``rounds_completed``), the sha256 of ``metrics.json``'s exact bytes, and the sha256 of the manifest and
    of the heads file it was signed with, with their ``params_sha256``. The published utility numbers
    (NDCG, recall, the per-partner metrics, ``federation_gain``, the epsilon it reports) are then the
    server's: an edited or swapped ``metrics.json``, or one of another round than the heads, is tampering.
``RUN_DIR/canary_record.json``
    written by ``fedsocial canary-audit`` right after ``canary_audit.json``, with the run's own server key
    when the folder holds it: the sha256 of the canary file's exact bytes and of the manifest. An edited
    empirical lower bound (lowered to hide an alarm, raised to fake one) or a canary file of another run
    is tampering.

Each record is a JSON object with ``record`` (its kind), ``version``, the payload,
``server_key_fingerprint`` and ``signature`` (Ed25519, base64, over the canonical JSON of the object
without ``signature``). Pure functions here; the ServerApp calls the writers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsocial.shared import signing
from fedsocial.shared.faults import fault_point
from fedsocial.shared.fileio import dumps_strict, write_atomic, write_json_atomic
from fedsocial.shared.privacy.ledger import canonical_json, utc_timestamp

RECORD_VERSION = 1
MANIFEST = "run_manifest.json"
HEADS = "ledger_heads.json"
SERVER_PUB = "server.pub"
SERVER_KEY = Path("server") / "signing.key"
METRICS = "metrics.json"
METRICS_RECORD = "metrics_record.json"
CANARY = "canary_audit.json"
CANARY_RECORD = "canary_record.json"


class RecordError(ValueError):
    """A signed record is missing, unreadable, malformed or does not verify (the message says which)."""


def server_key(run_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The server's signing key of this run (created 0600 on first use); its public half in ``server.pub``."""
    run = Path(run_dir)
    return signing.load_or_create_keypair(run / SERVER_KEY, run / SERVER_PUB)


def sign_record(key: Ed25519PrivateKey, kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"record": kind, "version": RECORD_VERSION, **dict(payload),
                           "server_key_fingerprint": signing.fingerprint(key.public_key())}
    doc["signature"] = base64.b64encode(signing.sign(key, canonical_json(doc).encode("ascii"))).decode("ascii")
    return doc


def verify_record(doc: Any, kind: str, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The record ``doc`` when it is a signed ``kind`` record of ``public_key``; else :class:`RecordError`."""
    if not isinstance(doc, dict):
        raise RecordError(f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("record") != kind or doc.get("version") != RECORD_VERSION:
        raise RecordError(f"not a version-{RECORD_VERSION} {kind!r} record (record={doc.get('record')!r}, "
                          f"version={doc.get('version')!r}): unsigned or from an older fedsocial")
    if doc.get("server_key_fingerprint") != signing.fingerprint(public_key):
        raise RecordError("server_key_fingerprint does not match the server's public key")
    sig = doc.get("signature")
    try:
        raw = base64.b64decode(str(sig).encode("ascii"), validate=True)
        payload = canonical_json({k: v for k, v in doc.items() if k != "signature"}).encode("ascii")
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise RecordError("signature is not base64") from None
    if not isinstance(sig, str) or not signing.verify(public_key, payload, raw):
        raise RecordError("the server's signature does not verify (record altered or signed by another key)")
    return doc


def compute_manifest_payload(cfg: Any, partners: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The run's privacy settings and each registered partner's declaration (``num_users``,
    ``max_epsilon``, ``target_delta``), as the manifest records them."""
    from fedsocial.shared.privacy.distributed import compute_assumed_contributors

    pc, fc = cfg.privacy, cfg.federation
    distributed = bool(pc.enabled and pc.distributed_noise)
    # t: the fewest honest shares a released sum is assumed to hold (shared/privacy/distributed.py)
    shares = {"grid_bits": int(pc.grid_bits),
              "contributors": compute_assumed_contributors(fc.min_partners, cfg.secagg.reconstruction_threshold)}
    return {
        "created": utc_timestamp(),
        "privacy": {"enabled": bool(pc.enabled), "scope": pc.scope, "max_epsilon": float(pc.max_epsilon),
                    "target_delta": float(pc.target_delta), "noise_multiplier": float(pc.noise_multiplier),
                    "max_grad_norm": float(pc.max_grad_norm), "accountant": pc.accountant,
                    "secure_rng": bool(pc.secure_rng), "distributed_noise": distributed,
                    "select_on_validation": bool(pc.select_on_validation),
                    **(shares if distributed else {})},
        "federation": {"partners": int(fc.partners), "rounds": int(fc.rounds), "local_epochs": int(fc.local_epochs),
                       "clipping_norm": float(fc.clipping_norm),
                       "server_noise_multiplier": float(fc.server_noise_multiplier),
                       "secure_aggregation": bool(cfg.secagg.enabled)},
        "partners": {str(pid): {k: _plain(v) for k, v in sorted(decl.items())}
                     for pid, decl in sorted(partners.items())},
    }


def _plain(v: Any) -> Any:
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def write_run_manifest(run_dir: str | os.PathLike[str], cfg: Any,
                       partners: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sign and write the manifest at run start. A resume keeps the manifest of the run it continues
    (refusing one whose partners changed: the audit's expected set must be the run's)."""
    run = Path(run_dir)
    key = server_key(run)
    path = run / MANIFEST
    payload = compute_manifest_payload(cfg, partners)
    if path.is_file():
        old = verify_record(read_json(path), "manifest", key.public_key())
        if set(old.get("partners", {})) != set(payload["partners"]):
            raise RecordError(f"{path}: the run was started with partners {sorted(old.get('partners', {}))}, "
                              f"now {sorted(payload['partners'])}")
        return old
    doc = sign_record(key, "manifest", payload)
    write_json_atomic(path, doc)
    return doc


def compute_params_sha256(names: Sequence[str], arrays: Sequence[Any]) -> str:
    """sha256 of a model's parameters: each array's name, dtype and shape (canonical JSON) and its C-order
    bytes, in order, every part length-prefixed (two different parameter lists never hash alike)."""
    h = hashlib.sha256()
    for name, a in zip(names, arrays, strict=True):
        arr = np.ascontiguousarray(a)
        head = canonical_json({"name": str(name), "dtype": arr.dtype.str, "shape": list(arr.shape)}).encode("ascii")
        for part in (head, arr.tobytes()):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return h.hexdigest()


RECEIVED_REPLIES = {"fit": ("training",), "evaluation": ("evaluation",), "kept": ("selection", "evaluation")}
"""The kinds of reply the server records in ``received``, and the ledger releases that may charge each: a fit
reply its round's training, a released evaluation its DP evaluation release, a kept evaluation with accounting
the round's DP selection (or, newest, its evaluation release)."""


def compute_received(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per server round, for each partner the ledger entries (``{"reply", "hash"}``) that the replies the server
    took in that round named as charging them (the ``received`` of each round's record, :mod:`server.strategy`),
    for the heads."""
    out = []
    for rec in history:
        got = rec.get("received")
        if isinstance(got, Mapping) and got and isinstance(rec.get("round"), int):
            out.append({"round": int(rec["round"]),
                        "partners": {str(p): [{"reply": str(e["reply"]), "hash": str(e["hash"])} for e in es]
                                     for p, es in sorted(got.items())}})
    return out


def write_signed_heads(run_dir: str | os.PathLike[str], round_: int, heads: Mapping[str, Mapping[str, Any]],
                       params_sha256: str | None = None,
                       received: Sequence[Mapping[str, Any]] | None = None,
                       param_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Sign and write each partner's ledger head after ``round_``, bound to the manifest and to the global
    parameters that round released (``params_sha256``; None only for callers without a model).

    ``received`` (:func:`compute_received`): every round so far, with the hash of each ledger entry that a
    partner's reply named as charging the release it sent. The newest head alone lets a partner that lies
    while the run goes on skip the entries of earlier rounds (its chain stays valid without them); each of
    these hashes must be in its ledger, so a release the server received uncharged is a finding.
    ``param_names``: the names of those parameters, so that what the model carries (the DP popularity
    prior's ``item_pop``) is known to the audit without its checkpoint."""
    run = Path(run_dir)
    key = server_key(run)
    manifest = run / MANIFEST
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    payload: dict[str, Any] = {
        "round": int(round_), "manifest_sha256": digest, "params_sha256": params_sha256,
        "heads": {str(p): {"round": int(h["round"]), "hash": str(h["hash"])} for p, h in sorted(heads.items())}}
    if received is not None:
        payload["received"] = [dict(r) for r in received]
    if param_names is not None:
        payload["param_names"] = [str(n) for n in param_names]
    doc = sign_record(key, "ledger_heads", payload)
    write_json_atomic(run / HEADS, doc)
    return doc


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compute_metrics_payload(run_dir: str | os.PathLike[str], metrics_bytes: bytes, round_: int,
                            public_key: Ed25519PublicKey, writer: str) -> dict[str, Any]:
    """The payload binding ``metrics_bytes`` (metrics.json's exact bytes) to the run's signed records: the
    round, the manifest's and the heads' sha256 and the heads' ``params_sha256``. Refuses (:class:`RecordError`)
    heads that ``public_key`` does not verify or that are of another round than ``round_``: a record chained
    to them would bind these numbers to records that are not the run's, or to another round."""
    run = Path(run_dir)
    manifest, heads_path = run / MANIFEST, run / HEADS
    heads_sha = params_sha = None
    if heads_path.is_file():
        heads = verify_record(read_json(heads_path), "ledger_heads", public_key)
        if heads.get("round") != int(round_):
            raise RecordError(f"{HEADS} is of round {heads.get('round')!r}, {METRICS} of round {round_}: "
                              "not signing results of another round than the heads")
        heads_sha, params_sha = sha256_of(heads_path), heads.get("params_sha256")
    return {"created": utc_timestamp(), "round": int(round_), "writer": str(writer),
            "metrics_sha256": hashlib.sha256(metrics_bytes).hexdigest(),
            "manifest_sha256": sha256_of(manifest) if manifest.is_file() else None,
            "heads_sha256": heads_sha, "params_sha256": params_sha}


def encode_metrics(doc: Mapping[str, Any]) -> bytes:
    """metrics.json's bytes: indented strict JSON (a metric that was not published is null, never NaN)."""
    return (dumps_strict(doc, indent=2) + "\n").encode("utf-8")


def write_signed_metrics(run_dir: str | os.PathLike[str], doc: Mapping[str, Any], writer: str = "server",
                         key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """Write ``metrics.json`` (atomically) and, right after it, ``metrics_record.json`` signing its exact
    bytes (atomically; ``key``: the run's server key by default). The round is ``doc["rounds_completed"]``.

    The old record goes first, then metrics.json and the new record are each replaced by a rename: a
    process killed at any point leaves either both files consistent or metrics.json without a record (an
    audit warning, never a metrics.json that a record of other bytes signs, which would read as an edit)."""
    run = Path(run_dir)
    key = server_key(run) if key is None else key
    data = encode_metrics(doc)
    round_ = int(doc.get("rounds_completed") or 0)
    payload = compute_metrics_payload(run, data, round_, key.public_key(), writer)
    (run / METRICS_RECORD).unlink(missing_ok=True)

    def write(fh: IO[bytes]) -> None:
        fh.write(data)

    write_atomic(run / METRICS, write)
    fault_point("before_metrics_record", round_)
    record = sign_record(key, "metrics", payload)
    write_json_atomic(run / METRICS_RECORD, record)
    return record


def load_metrics_signer(run_dir: str | os.PathLike[str]) -> Ed25519PrivateKey | None:
    """The run's server key, for a tool that adds to a finished run's ``metrics.json`` and must re-sign it.

    None when the run has no ``metrics_record.json`` (a run of an older fedsocial: there is no signature to
    keep, and signing now would bless numbers nobody verified). :class:`RecordError` when the change could
    not be signed honestly: no ``server/signing.key`` (stripped before the folder was shipped), a key that is
    not the run's ``server.pub``, a record that does not verify, or a ``metrics.json`` that is not the one it
    signs (changed since the server wrote it: re-signing would launder the change). Creates nothing."""
    run = Path(run_dir)
    record_path, key_path = run / METRICS_RECORD, run / SERVER_KEY
    if not record_path.is_file():
        return None
    if not key_path.is_file():
        raise RecordError(f"{METRICS} is signed ({METRICS_RECORD}) but {key_path} is not there (stripped before "
                          "the folder was shipped?): the server's key is needed to re-sign it")
    key = _load_key_pair(run)
    record = verify_record(read_json(record_path), "metrics", key.public_key())
    metrics = run / METRICS
    if not metrics.is_file() or sha256_of(metrics) != record.get("metrics_sha256"):
        raise RecordError(f"{metrics} is not the {METRICS} that {METRICS_RECORD} signs (changed or removed "
                          "since the server wrote it): not re-signing it")
    return key


def resign_metrics(run_dir: str | os.PathLike[str], doc: Mapping[str, Any], writer: str) -> bool:
    """Rewrite ``metrics.json`` as ``doc`` and re-sign it (:func:`load_metrics_signer` says when it may);
    without a record (an older run) it is rewritten unsigned. Returns whether it is signed."""
    key = load_metrics_signer(run_dir)
    if key is None:
        write_json_atomic(Path(run_dir) / METRICS, doc)
        return False
    write_signed_metrics(run_dir, doc, writer, key)
    return True


def load_run_signer(run_dir: str | os.PathLike[str]) -> Ed25519PrivateKey | None:
    """The run's server key for a tool that adds a signed file to a finished run (the canary audit).

    None when the folder has neither ``server/signing.key`` nor ``server.pub`` (no run there yet: nothing to
    sign with, and creating a key would make a server nobody registered with). :class:`RecordError` when only
    one of them is there or they are not a pair (the file could not be signed honestly). Creates nothing."""
    run = Path(run_dir)
    key_path, pub_path = run / SERVER_KEY, run / SERVER_PUB
    if not key_path.is_file() and not pub_path.is_file():
        return None
    if not key_path.is_file():
        raise RecordError(f"{pub_path} is there but {key_path} is not (stripped before the folder was shipped?): "
                          "the server's key is needed to sign into this run")
    return _load_key_pair(run)


def _load_key_pair(run: Path) -> Ed25519PrivateKey:
    """``server/signing.key``, when it is the key of the run's ``server.pub`` (else :class:`RecordError`)."""
    try:
        key = signing.load_private_key(run / SERVER_KEY)
        pub = signing.load_public_key(run / SERVER_PUB)
    except (signing.SigningError, OSError) as exc:
        raise RecordError(f"cannot load the run's server key: {exc}") from None
    if signing.fingerprint(key.public_key()) != signing.fingerprint(pub):
        raise RecordError(f"{run / SERVER_KEY} is not the key of the run's {SERVER_PUB}")
    return key


def write_signed_canary(run_dir: str | os.PathLike[str], doc: Mapping[str, Any],
                        writer: str = "canary-audit") -> bool:
    """Write ``canary_audit.json`` (atomically) and, signed with the run's key (:func:`load_run_signer`),
    ``canary_record.json`` binding its exact bytes to the folder's manifest. Returns whether it is signed.

    The old record goes first: a process killed between the two renames leaves a canary file without a
    record (an audit warning), never one that a record of other bytes signs (which reads as an edit)."""
    run = Path(run_dir)
    key = load_run_signer(run)  # refuses before anything is written
    data = encode_metrics(doc)
    (run / CANARY_RECORD).unlink(missing_ok=True)

    def write(fh: IO[bytes]) -> None:
        fh.write(data)

    write_atomic(run / CANARY, write)
    if key is None:
        return False
    fault_point("before_canary_record", 0)
    manifest = run / MANIFEST
    payload = {"created": utc_timestamp(), "writer": str(writer), "canary_sha256": hashlib.sha256(data).hexdigest(),
               "manifest_sha256": sha256_of(manifest) if manifest.is_file() else None}
    write_json_atomic(run / CANARY_RECORD, sign_record(key, "canary", payload))
    return True


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RecordError(f"{path.name}: unreadable JSON: {exc}") from None
