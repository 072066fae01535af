"""``fedsocial train``: centralized training (non-private or user-level DP) and full-ranking evaluation.

Writes ``OUT/metrics.json`` with the test metrics at the top level (``ndcg@10`` ...), the config,
seed, epochs, wall time, and ``epsilon``/``delta`` when DP is on. ``OUT`` must be new or empty (or
``--resume`` an unfinished run of the same config: train_checkpoint.py). A diverged training (a NaN or
infinite loss, or non-finite weights at a checkpoint) stops with one line and no metrics: its scores
would rank nothing.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

from fedsocial.shared.config import ConfigError
from fedsocial.shared.fileio import write_json_atomic
from fedsocial.simulations.common import add_config_arguments, config_from_args, format_table, user_errors
from fedsocial.simulations.tracking import TrackedEpochs, add_track_argument, compute_final_scalars, make_tracker

METRIC_KEYS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsocial train", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_track_argument(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in --out from its last checkpoint (train_checkpoint.py)")
    return parser


class _Progress:
    """A tqdm bar over epochs that shows the latest loss and validation NDCG@10."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="epochs", unit="ep", disable=not enabled, dynamic_ncols=True)

    def __call__(self, info: dict[str, Any]) -> None:
        shown = {k: f"{v:.4f}" for k, v in info.items() if k in ("loss", "val_ndcg@10", "epsilon")
                 and isinstance(v, float)}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class TrainingDivergedError(ConfigError):
    """The loss or the model's weights stopped being finite numbers (train.lr too high, most often)."""


def _diverged(what: str, cfg: Any) -> TrainingDivergedError:
    return TrainingDivergedError(f"training diverged: {what}; lower train.lr (now {cfg.train.lr:g}) and train "
                                 "again (into a new --out if a checkpoint was written)")


class _DivergenceCheck:
    """The per-epoch callback: stops the run at the first epoch whose loss (or validation NDCG) is not finite,
    before that epoch's checkpoint is written."""

    def __init__(self, inner: Any, cfg: Any) -> None:
        self.inner, self.cfg = inner, cfg

    def __call__(self, row: dict[str, Any]) -> None:
        for key in ("loss", "val_ndcg@10"):
            value = row.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise _diverged(f"epoch {int(row.get('epoch', 0))} has a non-finite {key} ({value})", self.cfg)
        self.inner(row)


def compute_nonfinite_arrays(state: dict[str, Any] | None) -> list[str]:
    """The names of the floating arrays of a model state that hold a NaN or an infinity."""
    import numpy as np

    bad = []
    for name, arr in (state or {}).items():
        a = np.asarray(arr)
        if np.issubdtype(a.dtype, np.floating) and not bool(np.isfinite(a).all()):
            bad.append(name)
    return bad


def _checked_state(state: dict[str, Any] | None, where: str, cfg: Any) -> None:
    bad = compute_nonfinite_arrays(state)
    if bad:  # the checked model is a release already (DP): testing it for NaN is post-processing, free
        raise _diverged(f"{where} has non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})",
                        cfg)


def run_train(cfg: Any, data_dir: str | None, out: Path, progress: bool = True, track: str = "none",
              resume: bool = False) -> dict[str, Any]:
    """Load, split, train and evaluate; returns (and writes) the metrics document.

    Checkpoints and best-so-far metrics are written as the run goes; ``resume`` continues them.
    """
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.trainer import train_centralized
    from fedsocial.simulations.init_cmd import dp_advice_line
    from fedsocial.simulations.train_checkpoint import (
        CHECKPOINT_DIR,
        json_safe,
        mark_finished,
        prepare_run_folder,
        save_train_checkpoint,
    )

    start = prepare_run_folder(cfg, out, resume)  # refuses a mismatched --resume before any work
    advice = dp_advice_line(cfg)  # DP turned on for a non-private config: say which keys to change
    if advice:
        print(advice, file=sys.stderr)

    t0 = time.perf_counter()
    dataset = load_dataset(cfg.data, data_dir)
    split = split_dataset(dataset, cfg.split)
    from fedsocial.simulations.preflight import check_evaluable

    check_evaluable(split, f"data ({cfg.data.format}{': ' + cfg.data.path if cfg.data.path else ''})",
                    cfg.split.min_interactions)
    load_s = time.perf_counter() - t0
    epochs = (cfg.privacy.epochs or cfg.train.epochs) if cfg.privacy.enabled else cfg.train.epochs
    if cfg.privacy.enabled and cfg.privacy.epochs and cfg.privacy.epochs != cfg.train.epochs:
        # the DP schedule decides (the noise is calibrated for it): say so rather than ignore train.epochs silently
        print(f"note: DP training runs privacy.epochs = {cfg.privacy.epochs} epochs (the schedule the noise is "
              f"calibrated for), not train.epochs = {cfg.train.epochs}; set privacy.epochs to change it",
              file=sys.stderr)
    # MostPop has no epochs (nothing to train): no epoch bar that would stay at 0/N
    bar = _Progress(epochs, progress and cfg.model.name != "mostpop")
    if start is not None:
        bar.bar.update(min(start.epochs_done, epochs))
    tracker = make_tracker(track, out)  # --track: TensorBoard events under OUT/tensorboard (tracking.py)
    tracker.log_config(cfg.to_dict())
    def checkpoint(ck: Any) -> None:  # a diverged model is never checkpointed (nor resumed from)
        _checked_state(ck.state, f"the model after epoch {ck.epochs_done}", cfg)
        _checked_state(ck.best_state, f"the best model so far (epoch {ck.best_epoch})", cfg)
        save_train_checkpoint(out, ck, cfg)

    try:
        outcome = train_centralized(cfg, split, progress=_DivergenceCheck(TrackedEpochs(bar, tracker), cfg),
                                    checkpoint=checkpoint, resume=start, release_dir=out / CHECKPOINT_DIR)
    except TrainingDivergedError:
        tracker.close()
        raise
    finally:
        bar.close()
    _checked_state(outcome.state, "the trained model", cfg)
    bad = [k for k in METRIC_KEYS if not math.isfinite(float(outcome.metrics[k]))]
    if bad:
        raise _diverged(f"the test metrics are not finite ({', '.join(bad)})", cfg)
    doc: dict[str, Any] = {k: float(outcome.metrics[k]) for k in METRIC_KEYS}
    doc.update(_outcome_fields(outcome))
    doc.update({
        "dataset": {"name": dataset.name, "users": dataset.n_users, "items": dataset.n_items,
                    "interactions": dataset.n_interactions, "social_edges": dataset.n_edges},
        "seed": cfg.train.seed,
        "wall_time_s": time.perf_counter() - t0,
        "load_time_s": load_s,
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "config": cfg.to_dict(),
    })
    write_json_atomic(out / "metrics.json", json_safe(doc))  # strict JSON: a NaN anywhere is written as null
    mark_finished(out)
    tracker.log_scalars(compute_final_scalars(doc), int(doc.get("epochs_run") or epochs))
    tracker.close()
    return doc


def _outcome_fields(outcome: Any) -> dict[str, Any]:
    fields = dict(vars(outcome))  # a TrainOutcome dataclass instance: its fields by name
    fields.pop("metrics", None)
    fields = {k: v for k, v in fields.items() if not k.startswith("_") and k != "state"}
    if fields.get("selection") is None:  # no DP selection: metrics.json as before
        fields.pop("selection", None)
    if fields.get("epsilon") is None:  # DP off: no epsilon/delta keys at all
        fields.pop("epsilon", None)
        fields.pop("delta", None)
    return fields


def summary(doc: dict[str, Any]) -> str:
    rows = [(k, f"{doc[k]:.4f}") for k in METRIC_KEYS]
    if "epsilon" in doc:
        rows.append(("epsilon", f"{doc['epsilon']:.3f} (delta {doc['delta']:g})"))
    if doc.get("selection"):
        sel = doc["selection"]
        others = sel.get("candidates", ["model", "prior"])[1:]
        diffs = ", ".join(f"{name} {d:+.1f}" for name, d in zip(others, sel["noisy_differences"], strict=False))
        rows.append(("DP selection", f"serves the {sel['choice']} (noisy validation NDCG@10 sums minus the model's: "
                                     f"{diffs})"))
    for key in ("best_epoch", "epochs_run"):
        if key in doc:
            rows.append((key.replace("_", " "), str(doc[key])))
    rows.append(("wall time", f"{doc['wall_time_s']:.1f} s"))
    return format_table(rows, title=f"test metrics ({doc['dataset']['name']}, seed {doc['seed']})")


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    doc = run_train(cfg, args.data_dir, out, progress=not args.no_progress, track=args.track, resume=args.resume)
    print(summary(doc))
    print(f"metrics: {out / 'metrics.json'}")
    return 0
