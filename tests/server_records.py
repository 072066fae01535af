"""Test helper: play the coordinator's part for hand-built run folders (sign a manifest and heads).

The federation writes these records itself (server/federation.py, server/strategy.py); tests that
build ledgers by hand call :func:`sign_server_records` with what the server would have registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsocial.shared.config import config_from_dict
from fedsocial.shared.privacy.ledger import entry_hash, read_ledger
from fedsocial.shared.privacy.records import write_run_manifest, write_signed_heads


def sign_server_records(run: Path, declared: Mapping[str, Mapping[str, Any]] | None = None,
                        max_epsilon: float = 8.0, scope: str = "joint", round_: int | None = None) -> None:
    """A signed manifest registering ``declared`` (default: every ledger in ``run/ledgers``, with its
    population) and signed heads naming each ledger's newest entry."""
    ledgers = sorted(p for p in (run / "ledgers").glob("*.jsonl") if not p.name.endswith(".refusals.jsonl"))
    entries = {p.name[: -len(".jsonl")]: read_ledger(p) for p in ledgers}
    if declared is None:
        declared = {pid: {"num_users": int(es[-1]["population"]) if es else 1} for pid, es in entries.items()}
    cfg = config_from_dict({"privacy": {"enabled": True, "max_epsilon": max_epsilon, "scope": scope}})
    write_run_manifest(run, cfg, declared)
    heads = {pid: {"round": int(es[-1]["round"]), "hash": entry_hash(es[-1])} for pid, es in entries.items() if es}
    last = max((h["round"] for h in heads.values()), default=0)
    write_signed_heads(run, last if round_ is None else round_, heads)
