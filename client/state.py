"""A partner's local state on its own disk: user/social tables that never leave it, one snapshot per round.

Each Flower message may start a fresh ClientApp process, so nothing lives in memory between rounds.
After training round r the partner writes ``STATE_DIR/rounds/round_XXXX.npz`` (its local tables after
round r) and ``STATE_DIR/state.npz`` (the latest, same content plus the round), both atomically. Round
r + 1 starts from snapshot r, so a run resumed from the server's checkpoint of round k continues from
exactly the partners' state of round k, even if a crashed attempt already wrote round k + 1.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from fedsocial.shared.fileio import save_npz_atomic
from fedsocial.shared.privacy.noise_key import NOISE_KEY as NOISE_KEY
from fedsocial.shared.privacy.noise_key import load_or_create_noise_key as load_or_create_noise_key

SNAPSHOTS = "rounds"
LATEST = "state.npz"
KEEP_SNAPSHOTS = 3  # the last complete round, plus slack for a crashed round in flight
_NAME = re.compile(r"^round_(\d{4,})\.npz$")


class StateError(ValueError):
    """A local-state file that cannot be read (torn, replaced, not an npz archive); the message names it."""


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.array(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise StateError(f"{path}: unreadable local state ({exc})") from None


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


# --- released updates ----------------------------------------------------------------------------
# What a partner released in a round (its new shared parameters, weight and reply metrics), kept on
# its own disk *before* the ledger entry that charges it is appended, so that a re-run of a charged
# round (a crash after the append, or after the reply and before the server's checkpoint) re-sends
# that very release instead of a second, uncharged one.
RELEASES = "releases"
_META = "__release__"


def release_path(state_dir: Path, round_: int) -> Path:
    return state_dir / RELEASES / f"round_{round_:04d}.npz"


def compute_release_digest(names: list[str], arrays: list[np.ndarray]) -> str:
    """SHA-256 (hex) over each array's name, dtype, shape and bytes, in order: equal iff bit-for-bit equal."""
    import hashlib

    h = hashlib.sha256()
    for name, a in zip(names, arrays, strict=True):
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_release(state_dir: Path, round_: int, names: list[str], arrays: list[np.ndarray],
                 meta: dict[str, object]) -> str:
    """Write the round's release atomically (0600) and return its digest (what the ledger entry records)."""
    import json

    digest = compute_release_digest(names, arrays)
    doc = json.dumps({"round": round_, "names": names, "digest": digest, **meta}).encode("utf-8")
    content = {f"param/{n}": a for n, a in zip(names, arrays, strict=True)}
    content[_META] = np.frombuffer(doc, dtype=np.uint8)
    save_npz_atomic(release_path(state_dir, round_), content, mode=0o600)
    for r, old in list_releases(state_dir):
        if r <= round_ - KEEP_SNAPSHOTS:
            old.unlink(missing_ok=True)
    return digest


def load_release(state_dir: Path, round_: int) -> tuple[list[str], list[np.ndarray], dict[str, object]] | None:
    """(names, arrays, meta) of the round's saved release, or None when there is none or it is unreadable."""
    import json
    import zipfile

    path = release_path(state_dir, round_)
    if not path.is_file():
        return None
    try:
        z = load_npz(path)
        meta = json.loads(bytes(z[_META]).decode("utf-8"))
        names = list(meta["names"])
        arrays = [z[f"param/{n}"] for n in names]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if compute_release_digest(names, arrays) != meta.get("digest"):
        return None
    return names, arrays, meta


def list_releases(state_dir: Path) -> list[tuple[int, Path]]:
    folder = state_dir / RELEASES
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))


# --- what a DP round keeps local ------------------------------------------------------------------
FIT_FOLDER = "fit"


def write_local_fit(state_dir: Path, round_: int, train_loss: float, fit_time_s: float) -> Path:
    """A DP round's training loss and time, kept on the partner (``STATE_DIR/fit/round_XXXX.json``, 0600):
    both depend on the users' data and no DP mechanism covers them, so they are not sent."""
    import json

    from fedsocial.shared.fileio import write_text_atomic

    path = state_dir / FIT_FOLDER / f"round_{round_:04d}.json"
    write_text_atomic(path, json.dumps({"round": int(round_), "train_loss": train_loss, "fit_time_s": fit_time_s}))
    path.chmod(0o600)
    return path

