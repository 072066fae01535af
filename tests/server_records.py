"""Test helper: play the coordinator's part for hand-built run folders (sign a manifest and heads).

The federation writes these records itself (server/federation.py, server/strategy.py); tests that
build ledgers by hand call :func:`sign_server_records` with what the server would have registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.server.checkpoint import Checkpoint, save_checkpoint
from fedsocial.shared.config import config_from_dict
from fedsocial.shared.privacy.ledger import entry_hash, read_ledger
from fedsocial.shared.privacy.records import compute_params_sha256, write_run_manifest, write_signed_heads

MODEL_NAMES = ["item_emb.weight", "item_bias.weight"]


def model_arrays(seed: int = 0) -> list[np.ndarray]:
    """A small stand-in for a run's global parameters (what its checkpoint holds)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 3)), rng.normal(size=(4, 1))]


def sign_server_records(run: Path, declared: Mapping[str, Mapping[str, Any]] | None = None,
                        max_epsilon: float = 8.0, scope: str = "joint", round_: int | None = None,
                        model_seed: int = 0) -> None:
    """A signed manifest registering ``declared`` (default: every ledger in ``run/ledgers``, with its
    population), the checkpoint of the heads' round (:func:`model_arrays`) and signed heads naming each
    ledger's newest entry and that model."""
    ledgers = sorted(p for p in (run / "ledgers").glob("*.jsonl") if not p.name.endswith(".refusals.jsonl"))
    entries = {p.name[: -len(".jsonl")]: read_ledger(p) for p in ledgers}
    if declared is None:
        declared = {pid: {"num_users": int(es[-1]["population"]) if es else 1} for pid, es in entries.items()}
    cfg = config_from_dict({"privacy": {"enabled": True, "max_epsilon": max_epsilon, "scope": scope}})
    write_run_manifest(run, cfg, declared)
    heads = {pid: {"round": int(es[-1]["round"]), "hash": entry_hash(es[-1])} for pid, es in entries.items() if es}
    last = max((h["round"] for h in heads.values()), default=0)
    rnd, arrays = last if round_ is None else round_, model_arrays(model_seed)
    save_checkpoint(run, Checkpoint(rnd, MODEL_NAMES, arrays, {}))
    write_signed_heads(run, rnd, heads, compute_params_sha256(MODEL_NAMES, arrays))
