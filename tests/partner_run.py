"""Test helper: one partner of a 3-partner run in ``tmp_path / "run"`` without Flower, and its ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsocial.client.partner import Partner, settings_from_context
from fedsocial.shared.privacy.ledger import read_ledger
from fedsocial.simulations.simulate import write_config


def make_partner(tmp_path: Path, cfg: Any, index: int = 0) -> Partner:
    run = tmp_path / "run"
    return Partner(settings_from_context({"config-path": str(write_config(cfg, run)), "run-dir": str(run)},
                                         {"partition-id": index, "num-partitions": 3}))


def ledger_of(tmp_path: Path, index: int = 0) -> list[dict[str, Any]]:
    return read_ledger(tmp_path / "run" / "ledgers" / f"partner-{index}.jsonl")
