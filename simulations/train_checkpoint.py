"""``fedsocial train`` checkpoints: best-so-far metrics and the model as the run goes, and ``--resume``.

After every ``train.eval_every``-th epoch the run folder gets

- ``checkpoint/state-E.npz`` (the model after epoch E), ``checkpoint/best-E.npz`` (the best model so
  far, non-private runs) and then ``checkpoint/progress.json``, which names them: it is written last,
  atomically, so a crash at any point leaves the previous consistent set (older files are removed only
  after the new progress file is in place);
- ``best_so_far.json``: the best validation metrics so far, their epoch, the epochs done and, with DP,
  the epsilon spent by the steps behind the checkpointed model.

``fedsocial train --config C --out RUN --resume`` continues RUN from ``progress.json`` (the config must
be the one RUN was started with, ``RUN/config.toml``, and RUN a train run folder); a run that finished is not
trained again. Without ``--resume`` the folder must be new or empty (or hold only what a start that failed
before its first checkpoint left: a ``config.toml`` this project wrote): any other content (a finished run,
a ``simulate`` run, the user's files) is refused, untouched. Arrays are read with ``allow_pickle=False``;
JSON files never hold NaN or Infinity (written as null).
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.shared.config import Config, ConfigError, load_config
from fedsocial.shared.fileio import save_npz_atomic, write_json_atomic
from fedsocial.shared.trainer import TrainCheckpoint

CHECKPOINT_DIR = "checkpoint"
PROGRESS = "progress.json"
BEST_SO_FAR = "best_so_far.json"
CONFIG_NAME = "config.toml"
TRACK_DIR = "tensorboard"  # --track tensorboard (tracking.py)
METRICS = "metrics.json"
# everything `fedsocial train` writes at the top of its run folder
TRAIN_RUN_NAMES = frozenset({CONFIG_NAME, METRICS, BEST_SO_FAR, CHECKPOINT_DIR, TRACK_DIR})
_TEMP_LEFTOVER = re.compile(r"^\..+\.tmp$")  # an atomic write killed before its rename (shared/fileio.py)


class TrainCheckpointError(ConfigError):
    """A run folder's checkpoint cannot be resumed; the message names the file."""


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None: strict JSON (``json.dumps`` would write the
    non-standard ``NaN`` / ``Infinity`` tokens, which other JSON readers reject)."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def save_train_checkpoint(out: Path, ck: TrainCheckpoint, cfg: Config, finished: bool = False) -> None:
    """Write ``ck`` under ``out/checkpoint`` (arrays first, the progress file naming them last)."""
    folder = out / CHECKPOINT_DIR
    state_name = f"state-{ck.epochs_done}.npz"
    save_npz_atomic(folder / state_name, ck.state)
    best_name = None
    if ck.best_state is not None:
        best_name = f"best-{ck.epochs_done}.npz"
        save_npz_atomic(folder / best_name, ck.best_state)
    doc: dict[str, Any] = {
        "epochs_done": ck.epochs_done, "finished": finished, "state": state_name, "best_state": best_name,
        "best_epoch": ck.best_epoch, "best_ndcg": ck.best_ndcg, "best_val": ck.best_val, "history": ck.history,
        "noise_multiplier": ck.noise_multiplier, "sample_rate": ck.sample_rate, "steps": ck.steps,
    }
    write_json_atomic(folder / PROGRESS, json_safe(doc))
    for old in folder.glob("*.npz"):  # only after the new progress file names its own set
        if old.name not in (state_name, best_name):
            old.unlink(missing_ok=True)
    best: dict[str, Any] = {"epochs_done": ck.epochs_done, "best_epoch": ck.best_epoch,
                            "val": ck.best_val, "finished": finished}
    if cfg.privacy.enabled and ck.steps:
        from fedsocial.shared.privacy.accounting import compute_epsilon

        best["epsilon_so_far"] = compute_epsilon([(ck.noise_multiplier, ck.sample_rate, ck.steps)],
                                                 cfg.privacy.target_delta, cfg.privacy.accountant)
        best["delta"] = cfg.privacy.target_delta
    write_json_atomic(out / BEST_SO_FAR, json_safe(best))


def mark_finished(out: Path) -> None:
    """Record that the run in ``out`` completed (a later ``--resume`` does not train it again)."""
    for path in (out / CHECKPOINT_DIR / PROGRESS, out / BEST_SO_FAR):
        if path.is_file():
            doc = json.loads(path.read_text(encoding="utf-8"))
            doc["finished"] = True
            write_json_atomic(path, json_safe(doc))


def read_progress(out: Path) -> dict[str, Any] | None:
    """``out/checkpoint/progress.json``, or None when the folder has no checkpoint."""
    path = out / CHECKPOINT_DIR / PROGRESS
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainCheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    if not isinstance(doc, dict):
        raise TrainCheckpointError(f"{path}: not a checkpoint progress file")
    return doc


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {k: np.asarray(arrays[k]) for k in arrays.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # truncated: BadZipFile, EOFError
        raise TrainCheckpointError(f"{path}: unreadable checkpoint arrays ({type(exc).__name__}: "
                                   f"{str(exc)[:200]})") from None


def load_train_checkpoint(out: Path) -> TrainCheckpoint | None:
    """The checkpoint of the run in ``out`` (None: none yet)."""
    doc = read_progress(out)
    if doc is None:
        return None
    folder, path = out / CHECKPOINT_DIR, out / CHECKPOINT_DIR / PROGRESS
    check_progress(path, doc)
    try:
        best = doc["best_state"]
        return TrainCheckpoint(
            epochs_done=int(doc["epochs_done"]), state=_load_npz(folder / str(doc["state"])),
            history=[dict(r) for r in doc["history"]], best_ndcg=float(doc["best_ndcg"]),
            best_epoch=int(doc["best_epoch"]), best_val={k: float(v) for k, v in doc["best_val"].items()},
            best_state=None if best is None else _load_npz(folder / str(best)),
            noise_multiplier=float(doc["noise_multiplier"]), sample_rate=float(doc["sample_rate"]),
            steps=int(doc["steps"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TrainCheckpointError(f"{path}: malformed checkpoint ({exc!r})") from None


def check_progress(path: Path, doc: dict[str, Any]) -> None:
    """The counters and file names of a progress file are what :func:`save_train_checkpoint` writes: a count is a
    JSON integer >= 0 (the best epoch -1 when there is none, else at most the epochs done), the arrays are this
    folder's ``state-E.npz`` and ``best-E.npz`` of that same E. Anything else was edited: -5 epochs done trained 7
    epochs more than the config asks, a step count of 1.5 is no count of DP steps, ``../..`` reads outside the
    folder. (A missing field is left to the reader's "malformed checkpoint".)"""
    def count(key: str, least: int = 0) -> int | None:
        if key not in doc:
            return None
        value = doc[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TrainCheckpointError(f"{path}: field {key!r} must be an integer >= {least}, got {value!r}")
        return value

    epochs, best_epoch = count("epochs_done"), count("best_epoch", -1)
    count("steps")
    if epochs is None:
        return
    if best_epoch is not None and best_epoch > epochs:
        raise TrainCheckpointError(f"{path}: field 'best_epoch' is {best_epoch}, after the {epochs} epochs done")
    if "state" in doc and doc["state"] != f"state-{epochs}.npz":
        raise TrainCheckpointError(f"{path}: field 'state' must be 'state-{epochs}.npz' (the {epochs} epochs done), "
                                   f"got {doc['state']!r}")
    if doc.get("best_state") not in (None, f"best-{epochs}.npz"):
        raise TrainCheckpointError(f"{path}: field 'best_state' must be null or 'best-{epochs}.npz', "
                                   f"got {doc.get('best_state')!r}")


def prepare_run_folder(cfg: Config, out: Path, resume: bool) -> TrainCheckpoint | None:
    """Check ``out`` against ``--resume`` and record the config; returns the checkpoint to continue."""
    from fedsocial.simulations.simulate import write_config

    progress = read_progress(out)
    if not resume:
        if progress is not None and not progress.get("finished"):
            raise TrainCheckpointError(f"--out {out}: holds an unfinished run ({progress.get('epochs_done')} epochs "
                                       "done); pass --resume to continue it, or choose another --out")
        if progress is not None and (cfg.privacy.enabled or (out / CONFIG_NAME).is_file()
                                     and _was_private(out / CONFIG_NAME)):
            # a second DP training over the same data in the same folder: fresh noise, its releases overwriting
            # the first's as if only one had been made (averaging the two would remove noise)
            raise TrainCheckpointError(f"--out {out}: holds a finished DP run, whose releases are published; train "
                                       "into a new --out (each DP run is a separate release of the data)")
        if progress is not None:  # its metrics, config and checkpoints would be replaced by another run's
            raise TrainCheckpointError(f"--out {out}: holds a finished train run; choose a new folder")
        if out.is_dir() and any(out.iterdir()) and not compute_failed_train_start(out):
            # a finished `simulate` run (its signed records), another train run, the user's own files
            raise TrainCheckpointError(f"--out {out}: not empty; choose a new folder, or --resume to continue an "
                                       "unfinished train run of this config there")
        write_config(cfg, out)
        return None
    saved = out / CONFIG_NAME
    if not saved.is_file():
        raise TrainCheckpointError(f"--resume: {saved}: no such file (nothing to resume in {out})")
    others = sorted(name for name in _entry_names(out) if name not in TRAIN_RUN_NAMES)
    if others:  # e.g. a `simulate` run of the same config: train would replace its metrics and config
        raise TrainCheckpointError(f"--resume: {out} is not a train run folder (it holds {', '.join(others[:3])}"
                                   f"{', ...' if len(others) > 3 else ''}); choose a new folder")
    if load_config(saved) != cfg:
        raise TrainCheckpointError(f"--resume: the config differs from {saved}, the one this run started with")
    if progress is not None and progress.get("finished"):
        check_published_selection(cfg, out)
    return load_train_checkpoint(out)


def _entry_names(out: Path) -> set[str]:
    """The names at the top of ``out``, less the leftovers of killed atomic writes."""
    return {p.name for p in out.iterdir() if not _TEMP_LEFTOVER.match(p.name)}


def compute_failed_train_start(out: Path) -> bool:
    """Whether ``out`` holds only what a train start that failed before its first checkpoint left behind: the
    ``config.toml`` this project wrote (read back to the same text), maybe ``tensorboard/`` and an empty
    ``checkpoint/``; no metrics, no progress, nothing else. Such a folder may be trained into again."""
    from fedsocial.simulations.simulate import config_to_toml

    names = _entry_names(out)
    if CONFIG_NAME not in names or names - {CONFIG_NAME, TRACK_DIR, CHECKPOINT_DIR}:
        return False
    folder = out / CHECKPOINT_DIR
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        return False
    path = out / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        return config_to_toml(load_config(path)) == path.read_text(encoding="utf-8")
    except (ConfigError, OSError, UnicodeDecodeError):
        return False


def _was_private(path: Path) -> bool:
    try:
        return bool(load_config(path).privacy.enabled)
    except ConfigError:
        return True  # unreadable: treat as the stricter case


def check_published_selection(cfg: Config, out: Path) -> None:
    """A finished DP run with a selection published it in metrics.json: its saved release must be there, intact,
    for ``--resume`` to re-use it (a second draw would be an uncharged release of the same validation data)."""
    from fedsocial.shared.privacy.selection import (
        load_selection_release,
        selection_release_path,
        uses_selection_release,
    )

    if not uses_selection_release(cfg):
        return
    epochs = cfg.privacy.epochs or cfg.train.epochs
    if load_selection_release(out / CHECKPOINT_DIR, epochs) is None:
        path = selection_release_path(out / CHECKPOINT_DIR, epochs)
        raise TrainCheckpointError(f"--resume: {path}: the finished run's DP selection was published, but its record "
                                   "is missing or altered; refusing a second draw (train into a new --out)")
