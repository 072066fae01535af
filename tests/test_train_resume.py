"""`fedsocial train` writes best-so-far metrics and checkpoints as it goes, and `--resume` continues them:
history and best kept, the DP steps behind the released model all charged, nothing lost to a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedsocial.shared.config import Config, load_config
from fedsocial.shared.loaders import load_dataset
from fedsocial.shared.privacy.accounting import compute_epsilon
from fedsocial.shared.split import split_dataset
from fedsocial.shared.trainer import compute_sample_rate
from fedsocial.simulations.train import run_train
from fedsocial.simulations.train_checkpoint import load_train_checkpoint, save_train_checkpoint
from fedsocial.simulations.train_checkpoint import prepare_run_folder as prepare

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.n_users=80", "data.n_items=100", "data.interactions_per_user=10.0", "model.dim=8",
         "model.mlp_hidden=8", "model.num_negatives=8", "model.max_targets=16", "train.batch_size=20",
         "train.num_threads=1", "train.eval_every=2", "train.patience=0"]


class Crash(Exception):
    """Stands for a kill at the end of an epoch."""


def _cfg(*extra: str) -> Config:
    return load_config(REPO / "configs" / "demo.toml", [*SMALL, *extra])


def _crash_after(cfg: Config, out: Path, epoch: int) -> None:
    """Train until ``epoch`` has finished (its checkpoint written, if due), then crash."""
    from fedsocial.shared import trainer

    split = split_dataset(load_dataset(cfg.data), cfg.split)
    prepare(cfg, out, resume=False)

    def progress(row: dict[str, Any]) -> None:
        if int(row["epoch"]) == epoch + 1:
            raise Crash

    with pytest.raises(Crash):
        trainer.train_centralized(cfg, split, progress=progress,
                                  checkpoint=lambda ck: save_train_checkpoint(out, ck, cfg))


def test_non_private_run_resumes_with_its_history_and_best(tmp_path: Path) -> None:
    # Prepare: 6 epochs, checkpoints every 2; killed during epoch 5 (after the epoch-4 checkpoint)
    cfg = _cfg("privacy.enabled=false", "train.epochs=6")
    out = tmp_path / "run"
    _crash_after(cfg, out, 4)
    best_mid = json.loads((out / "best_so_far.json").read_text(encoding="utf-8"))
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    # Execute
    doc = run_train(cfg, None, out, progress=False, resume=True)
    # Assert: best-so-far metrics were on disk at the crash; one consistent checkpoint set was kept;
    # the resumed run continues at epoch 5 and numbers its epochs over the whole run
    assert best_mid["epochs_done"] == 4 and 0.0 <= best_mid["val"]["ndcg@10"] <= 1.0 and not best_mid["finished"]
    assert files == ["best-4.npz", "progress.json", "state-4.npz"]
    assert [int(r["epoch"]) for r in doc["history"]] == [1, 2, 3, 4, 5, 6]
    assert doc["epochs_run"] == 6 and all(0.0 <= doc[k] <= 1.0 for k in ("ndcg@10", "recall@20"))
    assert doc["best_epoch"] in (2, 4, 6)
    assert json.loads((out / "best_so_far.json").read_text(encoding="utf-8"))["finished"]


def test_dp_resume_charges_every_step_behind_the_model(tmp_path: Path) -> None:
    # Prepare: a 4-epoch DP schedule killed during epoch 3; and the same schedule uninterrupted
    cfg = _cfg("train.epochs=4", "privacy.epochs=4", "train.eval_every=1")
    _crash_after(cfg, tmp_path / "cut", 2)
    mid = load_train_checkpoint(tmp_path / "cut")
    # Execute
    resumed = run_train(cfg, None, tmp_path / "cut", progress=False, resume=True)
    whole = run_train(cfg, None, tmp_path / "whole", progress=False)
    # Assert: the checkpoint counted the steps of epochs 1-2; the resumed run reports all 4 epochs' steps
    # under the planned noise, so its epsilon equals the uninterrupted run's (the cap, as calibrated)
    q = compute_sample_rate(80, 20)
    per_epoch = round(1 / q)
    assert mid is not None and mid.epochs_done == 2 and mid.steps == 2 * per_epoch
    assert resumed["steps"] == whole["steps"] == 4 * per_epoch
    assert resumed["noise_multiplier"] == pytest.approx(whole["noise_multiplier"], rel=1e-12)
    want = compute_epsilon([(whole["noise_multiplier"], q, 4 * per_epoch)], cfg.privacy.target_delta)
    assert resumed["epsilon"] == pytest.approx(want, rel=1e-9)
    assert resumed["epsilon"] == pytest.approx(whole["epsilon"], rel=1e-3) and resumed["epsilon"] <= 8.0 + 1e-3
    best = json.loads((tmp_path / "cut" / "best_so_far.json").read_text(encoding="utf-8"))
    assert best["epsilon_so_far"] == pytest.approx(want, rel=1e-9) and best["delta"] == 1e-5


def test_a_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg("privacy.enabled=false", "train.epochs=2")
    first = run_train(cfg, None, tmp_path / "run", progress=False)
    # Execute
    again = run_train(cfg, None, tmp_path / "run", progress=False, resume=True)
    # Assert: same model (restored best), no further epochs
    assert again["epochs_run"] == 2 and again["ndcg@10"] == pytest.approx(first["ndcg@10"], abs=1e-12)


def test_cli_refuses_to_overwrite_an_unfinished_run_or_resume_another_config(tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg("privacy.enabled=false", "train.epochs=6")
    out = tmp_path / "run"
    _crash_after(cfg, out, 2)
    sets = [a for s in [*SMALL, "privacy.enabled=false", "train.epochs=6"] for a in ("--set", s)]
    base = [sys.executable, "-m", "fedsocial.simulations.cli", "train", "--config", "configs/demo.toml",
            "--out", str(out), "--no-progress", *sets]
    # Execute
    overwrite = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=120)
    other = subprocess.run([*base, "--set", "train.lr=0.01", "--resume"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    # Assert: one line each, exit 2, the checkpoint untouched
    assert overwrite.returncode == 2 and "unfinished run (2 epochs done); pass --resume" in overwrite.stderr
    assert other.returncode == 2 and "config differs" in other.stderr
    assert "Traceback" not in overwrite.stderr + other.stderr
    ck = load_train_checkpoint(out)
    assert ck is not None and ck.epochs_done == 2


def test_malformed_progress_file_is_a_clear_error(tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg("privacy.enabled=false", "train.epochs=4")
    out = tmp_path / "run"
    _crash_after(cfg, out, 2)
    (out / "checkpoint" / "progress.json").write_text('{"epochs_done": 2}', encoding="utf-8")
    # Execute / Assert
    with pytest.raises(ValueError, match=r"progress.json: malformed checkpoint"):
        run_train(cfg, None, out, progress=False, resume=True)


def test_a_dp_run_says_when_privacy_epochs_overrides_train_epochs(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Found in review: under DP `--set train.epochs=1` was ignored in silence (privacy.epochs decides the schedule)
    cfg = _cfg("privacy.enabled=true", "privacy.epochs=2", "train.epochs=1", "privacy.noise_multiplier=1.0")
    doc = run_train(cfg, None, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "DP training runs privacy.epochs = 2 epochs" in err and "not train.epochs = 1" in err
    assert doc["epochs_run"] == 2
