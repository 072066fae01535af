"""Regressions of `fedsocial train` found by a red team: a non-empty --out overwritten in silence (D3), a diverged
training reported as a valid run with NaN in its JSON files (D4), negative seeds as numpy tracebacks (D5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsocial.shared.config import ConfigError, PartitionConfig, SplitConfig, TrainConfig, load_config
from fedsocial.simulations import partition_cmd, simulate, train
from fedsocial.simulations.train_checkpoint import json_safe, prepare_run_folder, save_train_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.n_users=60", "data.n_items=60", "data.interactions_per_user=10.0", "model.dim=8",
         "model.mlp_hidden=8", "model.num_negatives=8", "model.max_targets=16", "train.batch_size=20",
         "train.num_threads=1", "train.patience=0", "privacy.enabled=false", "train.epochs=1"]


def _argv(out: Path, *extra: str) -> list[str]:
    sets = [a for s in [*SMALL, *extra] for a in ("--set", s)]
    return ["--config", str(REPO / "configs" / "demo.toml"), "--out", str(out), "--no-progress", *sets]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _strict_json(path: Path) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path}: non-standard JSON token {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


# --- D3: a non-empty --out is refused, nothing in it touched ---------------------------------------------------


def _simulate_like(run: Path) -> None:
    """A finished `simulate` run folder (its config.toml, manifest, audit and ledger), for the same config."""
    simulate.write_config(load_config(REPO / "configs" / "demo.toml", SMALL), run)
    (run / "run_manifest.json").write_text('{"signed": true}\n', encoding="utf-8")
    (run / "audit.json").write_text('{"ok": true}\n', encoding="utf-8")
    (run / "ledgers").mkdir()
    (run / "ledgers" / "partner_0.jsonl").write_text('{"release": 1}\n', encoding="utf-8")


@pytest.mark.parametrize("content", ["user_file", "simulate_run", "other_train_run"])
@pytest.mark.parametrize("resume", [False, True])
def test_train_into_a_non_empty_folder_is_refused_and_leaves_it_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, resume: bool) -> None:
    # Prepare: a folder holding the user's file, a finished simulate run of the same config, or a finished
    # train run of another config
    run = tmp_path / "run"
    if content == "user_file":
        run.mkdir()
        (run / "notes.txt").write_text("mine\n", encoding="utf-8")
    elif content == "simulate_run":
        _simulate_like(run)
    else:
        assert train.main(_argv(run, "train.lr=0.01")) == 0
    before = _snapshot(run)
    capsys.readouterr()
    # Execute
    code = train.main([*_argv(run), *(["--resume"] if resume else [])])
    # Assert: exit 2 as other config errors, one line naming the folder, every file as it was
    line = _error_line(capsys)
    assert code == 2 and line.startswith("error: ") and str(run) in line
    assert _snapshot(run) == before


def test_a_finished_train_run_is_refused_without_resume_and_still_resumes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a finished train run
    run = tmp_path / "run"
    assert train.main(_argv(run)) == 0
    before = _snapshot(run)
    capsys.readouterr()
    # Execute
    again = train.main(_argv(run))
    line = _error_line(capsys)
    resumed = train.main([*_argv(run), "--resume"])
    # Assert: trained again without --resume is refused (untouched); --resume of the same config still works
    assert again == 2 and f"--out {run}: holds a finished train run" in line
    assert resumed == 0 and _strict_json(run / "metrics.json")["epochs_run"] == 1
    assert before.keys() == _snapshot(run).keys()


def test_a_start_that_failed_before_its_first_checkpoint_may_be_trained_into_again(tmp_path: Path) -> None:
    # Prepare: only the config.toml of a start that failed (e.g. bad data, a diverged first epoch)
    run = tmp_path / "run"
    prepare_run_folder(load_config(REPO / "configs" / "demo.toml", [*SMALL, "train.lr=0.5"]), run, resume=False)
    # Execute: fixed config, same folder, no --resume
    code = train.main(_argv(run))
    # Assert
    assert code == 0 and _strict_json(run / "metrics.json")["config"]["train"]["lr"] == 0.005


# --- D4: a diverged training stops with one line; JSON files are strict JSON --------------------------------------


def test_a_diverged_training_stops_with_one_line_and_writes_no_metrics(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    run = tmp_path / "run"
    # Execute
    code = train.main(_argv(run, "train.lr=1e300", "train.epochs=2"))
    # Assert: non-zero, the epoch, the non-finite loss and the key to lower named; no test metrics printed or
    # written, no checkpoint of the NaN model
    captured = capsys.readouterr()
    line = captured.err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in captured.err
    assert "epoch 1" in line and "non-finite loss (nan)" in line and "lower train.lr" in line
    assert "test metrics" not in captured.out
    assert not (run / "metrics.json").exists() and not (run / "checkpoint").exists()
    assert not (run / "best_so_far.json").exists()


def test_a_diverged_dp_training_is_stopped_at_its_checkpoint(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a DP run publishes no loss; its checkpointed model is what shows the divergence
    run = tmp_path / "run"
    # Execute
    code = train.main(_argv(run, "train.lr=1e300", "privacy.enabled=true", "privacy.epochs=1",
                            "privacy.noise_multiplier=1.0"))
    # Assert
    line = _error_line(capsys)
    assert code == 2 and "after epoch 1 has non-finite weights" in line and "lower train.lr" in line
    assert not (run / "metrics.json").exists() and not (run / "checkpoint" / "progress.json").exists()


def test_checkpoint_json_files_never_hold_nan_or_infinity(tmp_path: Path) -> None:
    # Prepare: a checkpoint whose history and best metrics hold non-finite numbers
    from fedsocial.shared.trainer import TrainCheckpoint

    cfg = load_config(REPO / "configs" / "demo.toml", SMALL)
    ck = TrainCheckpoint(epochs_done=1, state={"w": np.zeros(2, dtype=np.float32)},
                         history=[{"epoch": 1.0, "loss": float("nan")}], best_ndcg=float("-inf"), best_epoch=1,
                         best_val={"ndcg@10": float("nan"), "recall@10": np.float32("inf")}, best_state=None,
                         noise_multiplier=0.0, sample_rate=0.0, steps=0)
    # Execute
    save_train_checkpoint(tmp_path, ck, cfg)
    # Assert: strict JSON, null where the number was not finite
    progress = _strict_json(tmp_path / "checkpoint" / "progress.json")
    best = _strict_json(tmp_path / "best_so_far.json")
    assert progress["history"][0]["loss"] is None and progress["best_ndcg"] is None
    assert best["val"] == {"ndcg@10": None, "recall@10": None}
    assert json_safe({"a": [1.5, float("inf"), (2, "x")]}) == {"a": [1.5, None, [2, "x"]]}


# --- D5: seeds outside numpy's [0, 2**32 - 1] are config errors -------------------------------------------------


@pytest.mark.parametrize("command,key", [
    ("train", "split.seed"), ("train", "train.seed"), ("train", "partition.seed"), ("train", "data.synthetic_seed"),
    ("partition", "partition.seed"), ("partition", "split.seed"),
    ("simulate", "split.seed"), ("simulate", "partition.seed"), ("simulate", "train.seed"),
])
@pytest.mark.parametrize("value", ["-1", str(2**32)])
def test_a_seed_outside_0_to_2_32_is_one_config_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          command: str, key: str, value: str) -> None:
    # Prepare
    config = ["--config", str(REPO / "configs" / "demo.toml"), "--set", f"{key}={value}"]
    main, argv = {"train": (train.main, [*config, "--out", str(tmp_path / "run"), "--no-progress"]),
                  "partition": (partition_cmd.main, [*config, "--partners", "1", "--out", str(tmp_path / "p")]),
                  "simulate": (simulate.main, [*config, "--out", str(tmp_path / "sim"), "--no-progress"])}[command]
    # Execute
    code = main(argv)
    # Assert: exit 2, the key and the range named, no traceback, nothing written
    line = _error_line(capsys)
    assert code == 2 and f"{key}: must be an integer in [0, 4294967295]" in line and value in line
    assert not any(tmp_path.iterdir())


def test_seed_bounds_in_the_dataclasses() -> None:
    # Prepare / Execute / Assert: the ends of the range are accepted; negatives, 2**32 and booleans refused
    assert SplitConfig(seed=0).seed == 0 and TrainConfig(seed=2**32 - 1).seed == 2**32 - 1
    for bad in (-1, 2**32, True):
        with pytest.raises(ConfigError, match="partition.seed: must be an integer"):
            PartitionConfig(seed=bad)
