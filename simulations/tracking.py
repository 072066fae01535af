"""Experiment tracking behind ``--track``: the run's metrics, epsilon, timings and config in TensorBoard.

``fedsocial train --track tensorboard`` and ``fedsocial simulate --track tensorboard`` write event
files under ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard`` shows them; the
project's tests read them back with TensorBoard's own ``EventAccumulator``):

- train: per epoch ``train/loss``, ``val/ndcg@10``, ``time/epoch_s``; at the end ``test/<metric>``,
  ``privacy/epsilon`` (DP) and ``time/wall_s``;
- simulate: per round ``federated/<metric>``, ``partner/<id>/<metric>``, ``privacy/epsilon/<id>``
  (each partner's spent epsilon), ``privacy/epsilon_max``, ``time/round_s``, ``time/fit_s/<id>``,
  ``federation/update_norm``; at the end ``test/<metric>`` and ``time/wall_s``;
- both: the resolved config as text (``config``, JSON by section).

TensorBoard is imported only when ``--track tensorboard`` is given (``pip install tensorboard``,
part of the project's ``track`` and ``dev`` extras). Only numbers go to scalars; a tracker never
raises into a run: a failed write is reported once and tracking stops.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from fedsocial.shared.config import ConfigError

TRACKERS = ("none", "tensorboard")
METRIC_KEYS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")


def is_scalar(value: Any) -> bool:
    """A finite int or float (bools excluded): what a scalar summary may hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compute_round_scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The scalars of one ``rounds.jsonl`` record (server/federation.py), by TensorBoard tag."""
    out: dict[str, float] = {}
    for key in METRIC_KEYS:
        if is_scalar(rec.get(key)):
            out[f"federated/{key}"] = float(rec[key])
    for pid, metrics in (rec.get("partners") or {}).items():
        for key in METRIC_KEYS:
            if isinstance(metrics, dict) and is_scalar(metrics.get(key)):
                out[f"partner/{pid}/{key}"] = float(metrics[key])
    for pid, eps in (rec.get("epsilon") or {}).items():
        if is_scalar(eps):
            out[f"privacy/epsilon/{pid}"] = float(eps)
    for pid, secs in (rec.get("fit_time_s") or {}).items():
        if is_scalar(secs):
            out[f"time/fit_s/{pid}"] = float(secs)
    for key, tag in (("epsilon_max", "privacy/epsilon_max"), ("round_time_s", "time/round_s"),
                     ("update_norm", "federation/update_norm")):
        if is_scalar(rec.get(key)):
            out[tag] = float(rec[key])
    return out


def compute_epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one epoch row of ``fedsocial train`` (shared/trainer.py's history)."""
    tags = {"loss": "train/loss", "val_ndcg@10": "val/ndcg@10", "epoch_time_s": "time/epoch_s"}
    return {tag: float(row[key]) for key, tag in tags.items() if is_scalar(row.get(key))}


def compute_final_scalars(doc: dict[str, Any]) -> dict[str, float]:
    """The scalars of a finished run's ``metrics.json``."""
    out = {f"test/{k}": float(doc[k]) for k in METRIC_KEYS if is_scalar(doc.get(k))}
    if is_scalar(doc.get("epsilon")):
        out["privacy/epsilon"] = float(doc["epsilon"])
    for key in ("simulation_wall_time_s", "wall_time_s"):
        if is_scalar(doc.get(key)):
            out["time/wall_s"] = float(doc[key])
            break
    return out


def compute_hparams(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The config flattened to ``section.key`` -> value (TensorBoard's hparams take scalars and strings)."""
    return {f"{s}.{k}": v for s, values in config.items() for k, v in values.items()
            if isinstance(v, (bool, int, float, str))}


class Tracker:
    """No tracking (``--track none``); the base of the real trackers."""

    def log_config(self, config: dict[str, dict[str, Any]]) -> None:
        """Record the resolved config once."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Record scalars by tag at ``step`` (epoch or round)."""

    def close(self) -> None:
        """Flush and close."""


class TensorBoardTracker(Tracker):
    """Writes TensorBoard event files under ``log_dir`` (torch's SummaryWriter)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--track tensorboard: the tensorboard package is not installed "
                              "(pip install tensorboard)") from None
        self.log_dir = log_dir
        self.writer: Any = SummaryWriter(log_dir=str(log_dir))
        self._failed = False

    def _guard(self, what: str, func: Any, *args: Any, **kwargs: Any) -> None:
        if self._failed:
            return
        try:
            func(*args, **kwargs)
        except (OSError, ValueError, TypeError) as exc:  # tracking must not end a run
            self._failed = True
            print(f"tracking stopped: could not write {what} to {self.log_dir}: {exc}", file=sys.stderr)

    def log_config(self, config: dict[str, dict[str, Any]]) -> None:
        text = "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```"
        self._guard("the config", self.writer.add_text, "config", text, 0)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._guard(tag, self.writer.add_scalar, tag, value, step)
        self._guard("a flush", self.writer.flush)

    def close(self) -> None:
        self._guard("a flush", self.writer.close)


def make_tracker(kind: str, run_dir: Path) -> Tracker:
    """The tracker ``--track KIND`` names, writing under ``run_dir``."""
    if kind == "none":
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard")
    raise ConfigError(f"--track: expected one of {', '.join(TRACKERS)}, got {kind!r}")


def add_track_argument(parser: Any) -> None:
    parser.add_argument("--track", default="none", choices=TRACKERS,
                        help="experiment tracking: tensorboard writes RUN/tensorboard (default: none)")


class TrackedRounds:
    """A round callback (``server.federation``'s ``on_round``) that also logs each round's scalars."""

    def __init__(self, inner: Any, tracker: Tracker) -> None:
        self.inner, self.tracker = inner, tracker

    def __call__(self, rec: dict[str, Any]) -> None:
        self.inner(rec)
        if is_scalar(rec.get("round")):
            self.tracker.log_scalars(compute_round_scalars(rec), int(rec["round"]))


class TrackedEpochs:
    """An epoch callback (``train_centralized``'s ``progress``) that also logs each epoch's scalars."""

    def __init__(self, inner: Any, tracker: Tracker) -> None:
        self.inner, self.tracker = inner, tracker

    def __call__(self, row: dict[str, Any]) -> None:
        self.inner(row)
        if is_scalar(row.get("epoch")):
            self.tracker.log_scalars(compute_epoch_scalars(row), int(row["epoch"]))
