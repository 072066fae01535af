"""Per-round checkpoints of the server: global shared parameters, strategy state, round, RNG state.

One file per completed round, ``RUN_DIR/checkpoints/round_XXXX.npz``, written atomically (temporary
file in the same folder, fsync, rename), so a crash leaves either the previous round's checkpoint or
the new one, never a torn file. Arrays are stored as ``param/<name>``; the JSON-able strategy state
(history, per-partner metrics, RNG state) as a UTF-8 byte array under ``__state__``.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.shared.faults import fault_point
from fedsocial.shared.fileio import dumps_strict, save_npz_atomic, write_text_atomic

_NAME = re.compile(r"^round_(\d{4,})\.npz$")
STATE_KEY = "__state__"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    names: list[str]
    arrays: list[np.ndarray]
    state: dict[str, Any]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)  # the server optimizer's moments, if any


def checkpoint_path(run_dir: Path, round_: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round_:04d}.npz"


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    fault_point("before_checkpoint", ckpt.round)  # crash tests: replies received, round not yet checkpointed
    arrays = {f"param/{n}": a for n, a in zip(ckpt.names, ckpt.arrays, strict=True)}
    arrays.update({f"opt/{k}": a for k, a in ckpt.optimizer.items()})
    doc = {"round": ckpt.round, "names": ckpt.names, "state": ckpt.state}
    arrays[STATE_KEY] = np.frombuffer(json.dumps(doc).encode("utf-8"), dtype=np.uint8)
    path = checkpoint_path(run_dir, ckpt.round)
    save_npz_atomic(path, arrays)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        with np.load(path, allow_pickle=False) as z:
            doc = json.loads(bytes(z[STATE_KEY]).decode("utf-8"))
            arrays = [np.array(z[f"param/{n}"]) for n in doc["names"]]
            optimizer = {k[len("opt/"):]: np.array(z[k]) for k in z.files if k.startswith("opt/")}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # truncated: BadZipFile, EOFError
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    return Checkpoint(int(doc["round"]), list(doc["names"]), arrays, dict(doc["state"]), optimizer)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint of the last complete round, or None when the run has none."""
    found = list_checkpoints(run_dir)
    return load_checkpoint(found[-1][1]) if found else None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (one write, then fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(dumps_strict(record) + "\n")  # strict JSON: a metric not published is null
        fh.flush()
        os.fsync(fh.fileno())


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace the file by exactly ``records`` (a resume drops lines of rounds it will redo)."""
    write_text_atomic(path, "".join(dumps_strict(r) + "\n" for r in records))
