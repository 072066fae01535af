"""Serving follows the privacy a run's releases were charged under, not an edited config.

Found by an adversarial review: setting ``privacy.scope = "partner"`` (or ``privacy.enabled = false``) in a finished
joint-scope DP run's ``config.toml`` made ``recommend`` / ``serve`` fit Platt calibration on validation records, rank
cold users by exact training counts and ignore the charged DP selection, while the audit (which reads the signed
records) still passed. The partner's ledger entries and the signed run manifest record the scope; a config that
disagrees is refused, naming both files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsocial.shared.config import ConfigError
from fedsocial.shared.privacy.records import write_run_manifest
from fedsocial.simulations.recommend import load_recommender, resolve_source
from tests.serving_run import make_run

DP_JOINT = ["privacy.enabled=true", "privacy.scope=joint", "privacy.noise_multiplier=1.0"]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_run(tmp_path_factory.mktemp("served") / "run", DP_JOINT, epochs=1)
    from fedsocial.shared.config import load_config

    write_run_manifest(run, load_config(run / "config.toml"), {})  # the real, signed manifest
    return run


def _edit(run: Path, tmp_path: Path, old: str, new: str) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    text = (copy / "config.toml").read_text(encoding="utf-8")
    assert old in text
    (copy / "config.toml").write_text(text.replace(old, new), encoding="utf-8")
    return copy


def test_the_runs_own_config_serves(dp_run: Path) -> None:
    rec = load_recommender(resolve_source(dp_run, "partner-0"), calibration="auto")
    assert rec.privacy_scope == "joint"


@pytest.mark.parametrize(("old", "new", "now"), [
    ('scope = "joint"', 'scope = "partner"', "DP in partner scope"),
    ("[privacy]\nenabled = true", "[privacy]\nenabled = false", "no DP"),
])
def test_an_edited_config_is_refused_by_the_signed_manifest(dp_run: Path, tmp_path: Path, old: str, new: str,
                                                            now: str) -> None:
    # Prepare: the run's config.toml edited after the run
    run = _edit(dp_run, tmp_path, old, new)
    # Execute / Assert: refused before anything is served, naming the config and the manifest
    with pytest.raises(ConfigError, match=rf"config.toml: .*say {now}, but .*run_manifest.json records DP in joint"):
        load_recommender(resolve_source(run, "partner-0"), calibration="auto")


def test_an_edited_config_is_refused_by_the_partners_ledger(dp_run: Path, tmp_path: Path) -> None:
    # Prepare: no manifest (a deployed partner's folder has none), the ledger's entries charged in joint scope
    run = _edit(dp_run, tmp_path, 'scope = "joint"', 'scope = "partner"')
    (run / "run_manifest.json").unlink()
    ledger = run / "ledgers" / "partner-0.jsonl"
    ledger.parent.mkdir()
    ledger.write_text(json.dumps({"round": 1, "scope": "joint", "partner_id": "partner-0"}) + "\n", encoding="utf-8")
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"say DP in partner scope, but .*partner-0.jsonl records DP in joint"):
        load_recommender(resolve_source(run, "partner-0"), calibration="auto")
