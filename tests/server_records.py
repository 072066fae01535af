"""Test helper: play the coordinator's part for hand-built run folders (sign a manifest, heads, metrics).

The federation writes these records itself (server/federation.py, server/strategy.py); tests that
build ledgers by hand call :func:`sign_server_records` with what the server would have registered,
and :func:`sign_metrics` for the metrics.json the server writes (and signs) at the end of the run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.server.checkpoint import Checkpoint, save_checkpoint
from fedsocial.shared.config import config_from_dict
from fedsocial.shared.privacy.ledger import entry_hash, read_ledger
from fedsocial.shared.privacy.records import (
    HEADS,
    compute_params_sha256,
    write_run_manifest,
    write_signed_heads,
    write_signed_metrics,
)

MODEL_NAMES = ["item_emb.weight", "item_bias.weight"]


def model_arrays(seed: int = 0) -> list[np.ndarray]:
    """A small stand-in for a run's global parameters (what its checkpoint holds)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 3)), rng.normal(size=(4, 1))]


def metrics_doc(run: Path, **extra: Any) -> dict[str, Any]:
    """A metrics.json as build_metrics shapes it (the keys the audit and reports read), for the heads' round."""
    heads = json.loads((run / HEADS).read_text())
    partners = {pid: {"num_users": 100, "ndcg@10": 0.1234, "epsilon": _head_epsilon(run, pid, head["hash"])}
                for pid, head in heads["heads"].items()}
    return {"recall@10": 0.2345, "ndcg@10": 0.1234, "hr@10": 0.3456, "recall@20": 0.3, "ndcg@20": 0.15,
            "hr@20": 0.45, "rounds_completed": heads["round"], "partners": partners, **extra}


def _head_epsilon(run: Path, pid: str, digest: str) -> float:
    """The epsilon of record of the ledger entry a head names, as the partner's reply reported it to the server
    (what build_metrics publishes per partner); 0.0 when that entry is not in the ledger."""
    path = run / "ledgers" / f"{pid}.jsonl"
    for e in read_ledger(path) if path.is_file() else []:
        if entry_hash(e) == digest:
            return float(e["epsilon_prv"] if e["accountant"] == "prv" else e["epsilon_rdp"])
    return 0.0


def sign_metrics(run: Path, doc: Mapping[str, Any] | None = None, writer: str = "server") -> dict[str, Any]:
    """metrics.json (default :func:`metrics_doc`) and its signed record, as the server writes them at the end
    of a run, with the run's own server key; returns the record."""
    return write_signed_metrics(run, metrics_doc(run) if doc is None else doc, writer)


def sign_server_records(run: Path, declared: Mapping[str, Mapping[str, Any]] | None = None,
                        max_epsilon: float = 8.0, scope: str = "joint", round_: int | None = None,
                        model_seed: int = 0, metrics: Mapping[str, Any] | None = None) -> None:
    """A signed manifest registering ``declared`` (default: every ledger in ``run/ledgers``, with its
    population), the checkpoint of the heads' round (:func:`model_arrays`) and signed heads naming each
    ledger's newest entry and that model; with ``metrics``, also metrics.json (:func:`metrics_doc` updated
    with them) and its signed record, as at the end of a run."""
    ledgers = sorted(p for p in (run / "ledgers").glob("*.jsonl") if not p.name.endswith(".refusals.jsonl"))
    entries = {p.name[: -len(".jsonl")]: read_ledger(p) for p in ledgers}
    if declared is None:
        declared = {pid: {"num_users": int(es[-1]["population"]) if es else 1} for pid, es in entries.items()}
    # the run's delta admits every partner's (the server holds each to the tighter of the run's and its declared)
    deltas = [float(d["target_delta"]) for d in declared.values() if d.get("target_delta")] or \
        [float(e["target_delta"]) for es in entries.values() for e in es]
    privacy = {"enabled": True, "max_epsilon": max_epsilon, "scope": scope}
    cfg = config_from_dict({"privacy": {**privacy, **({"target_delta": max(deltas)} if deltas else {})}})
    write_run_manifest(run, cfg, declared)
    heads = {pid: {"round": int(es[-1]["round"]), "hash": entry_hash(es[-1])} for pid, es in entries.items() if es}
    last = max((h["round"] for h in heads.values()), default=0)
    rnd, arrays = last if round_ is None else round_, model_arrays(model_seed)
    save_checkpoint(run, Checkpoint(rnd, MODEL_NAMES, arrays, {}))
    write_signed_heads(run, rnd, heads, compute_params_sha256(MODEL_NAMES, arrays))
    if metrics is not None:
        sign_metrics(run, metrics_doc(run, **metrics))
