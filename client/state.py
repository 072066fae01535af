"""A partner's local state on its own disk: user/social tables that never leave it, one snapshot per round.

Each Flower message may start a fresh ClientApp process, so nothing lives in memory between rounds.
After training round r the partner writes ``STATE_DIR/rounds/round_XXXX.npz`` (its local tables after
round r) and ``STATE_DIR/state.npz`` (the latest, same content plus the round), both atomically. Round
r + 1 starts from snapshot r, so a run resumed from the server's checkpoint of round k continues from
exactly the partners' state of round k, even if a crashed attempt already wrote round k + 1.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedsocial.shared.fileio import save_npz_atomic

SNAPSHOTS = "rounds"
LATEST = "state.npz"
KEEP_SNAPSHOTS = 3  # the last complete round, plus slack for a crashed round in flight
_NAME = re.compile(r"^round_(\d{4,})\.npz$")


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: np.array(z[k]) for k in z.files}


def snapshot_path(state_dir: Path, round_: int) -> Path:
    return state_dir / SNAPSHOTS / f"round_{round_:04d}.npz"


def save_local_state(state_dir: Path, round_: int, state: dict[str, np.ndarray]) -> Path:
    """Write the local state after ``round_`` (snapshot and latest), then prune old snapshots."""
    path = snapshot_path(state_dir, round_)
    save_npz_atomic(path, state, mode=0o600)  # user and social embeddings: the partner's eyes only
    save_npz_atomic(state_dir / LATEST, {**state, "__round__": np.array(round_, dtype=np.int64)}, mode=0o600)
    for r, old in list_snapshots(state_dir):
        if r <= round_ - KEEP_SNAPSHOTS:
            old.unlink(missing_ok=True)
    return path


def load_local_state(state_dir: Path, round_: int) -> dict[str, np.ndarray] | None:
    """The local state after ``round_`` (None when that round has no snapshot, e.g. round 0)."""
    path = snapshot_path(state_dir, round_)
    return load_npz(path) if path.is_file() else None


def list_snapshots(state_dir: Path) -> list[tuple[int, Path]]:
    folder = state_dir / SNAPSHOTS
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
