"""A `fedsocial train` run folder whose checkpoint was edited: `--resume` refuses it naming the file and field,
never trains a number of epochs the config does not ask for, nor reads arrays from outside the folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsocial.shared.config import load_config
from fedsocial.shared.trainer import TrainCheckpoint
from fedsocial.simulations.train_checkpoint import (
    TrainCheckpointError,
    load_train_checkpoint,
    save_train_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


def saved_run(out: Path) -> Path:
    """``out`` holding the checkpoint of a run after 2 epochs, as save_train_checkpoint writes it."""
    cfg = load_config(ROOT / "configs" / "demo.toml", ["privacy.enabled=false"])
    ck = TrainCheckpoint(epochs_done=2, state={"w": np.ones(3)}, history=[{"epoch": 1.0}, {"epoch": 2.0}],
                         best_ndcg=0.5, best_epoch=2, best_val={"ndcg@10": 0.5}, best_state={"w": np.ones(3)},
                         noise_multiplier=0.0, sample_rate=0.0, steps=0)
    save_train_checkpoint(out, ck, cfg)
    return out / "checkpoint" / "progress.json"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs_done", -5, "field 'epochs_done' must be an integer >= 0, got -5"),
    ("epochs_done", "2", "field 'epochs_done' must be an integer >= 0, got '2'"),
    ("epochs_done", True, "field 'epochs_done' must be an integer >= 0, got True"),
    ("steps", -1, "field 'steps' must be an integer >= 0, got -1"),
    ("steps", 1.5, "field 'steps' must be an integer >= 0, got 1.5"),
    ("best_epoch", 9, "field 'best_epoch' is 9, after the 2 epochs done"),
    ("best_epoch", -2, "field 'best_epoch' must be an integer >= -1, got -2"),
    ("state", "../../../etc/passwd",
     "field 'state' must be 'state-2.npz' (the 2 epochs done), got '../../../etc/passwd'"),
    ("best_state", "/tmp/x.npz", "field 'best_state' must be null or 'best-2.npz', got '/tmp/x.npz'"),
])
def test_an_edited_progress_file_is_refused_naming_the_field(tmp_path: Path, field: str, value: object,
                                                             message: str) -> None:
    # Prepare: a consistent checkpoint, then one field edited (was: epochs_done -5 trained 7 epochs more than the
    # config asked, "2" or 1.5 were read as numbers, a state path outside the folder was opened)
    progress = saved_run(tmp_path)
    assert load_train_checkpoint(tmp_path) is not None
    doc = json.loads(progress.read_text())
    progress.write_text(json.dumps({**doc, field: value}))
    # Execute / Assert
    with pytest.raises(TrainCheckpointError) as caught:
        load_train_checkpoint(tmp_path)
    assert str(caught.value) == f"{progress}: {message}"


@pytest.mark.parametrize("cached", [0.3, 1e6, -1.0, "abc", None, True, float("nan")])
def test_an_edited_cached_noise_calibration_is_recalibrated_not_taken(
        tmp_path: Path, cached: object, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a partner whose calibrated noise is cached in privacy_plan.json, then the cached sigma edited (was:
    # 0.3 made the partner refuse every round as "exhausted its privacy budget", 1e6 trained on noise alone, "abc"
    # failed its ClientApp with a ValueError; all silently, the key still matching)
    from tests.partner_run import make_partner
    from tests.test_federation import tiny_config

    cfg = tiny_config().replace("privacy", noise_multiplier=0.0, max_epsilon=4.0)
    honest = make_partner(tmp_path, cfg).privacy_plan().noise_multiplier
    path = tmp_path / "run" / "partners" / "partner-0" / "privacy_plan.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "noise_multiplier": cached}))
    # Execute
    with caplog.at_level("WARNING", logger="fedsocial.client"):
        again = make_partner(tmp_path, cfg).privacy_plan().noise_multiplier
    # Assert
    assert again == pytest.approx(honest, rel=1e-9)
    assert "privacy_plan.json: the cached noise multiplier" in caplog.text and "calibrating again" in caplog.text
    assert json.loads(path.read_text())["noise_multiplier"] == pytest.approx(honest, rel=1e-9)  # the cache repaired


def test_an_honest_cached_noise_calibration_is_used_without_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    from tests.partner_run import make_partner
    from tests.test_federation import tiny_config

    cfg = tiny_config().replace("privacy", noise_multiplier=0.0, max_epsilon=4.0)
    honest = make_partner(tmp_path, cfg).privacy_plan().noise_multiplier
    # Execute
    with caplog.at_level("WARNING", logger="fedsocial.client"):
        again = make_partner(tmp_path, cfg).privacy_plan().noise_multiplier
    # Assert
    assert again == honest and "calibrating again" not in caplog.text
