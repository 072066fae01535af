"""A partner calibrates its noise when it registers (issue 14 item 6): registrations are answered by all
partners side by side, SecAgg+'s per-round intents one partner after another, so the calibration (a
bisection over the accountant) moves off the sequential path. What is calibrated and charged is unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedsocial.client.flower import FedSocialClient
from fedsocial.client.partner import Partner, settings_from_context
from fedsocial.simulations.simulate import write_config
from tests.test_federation import tiny_config

NODE = {"partition-id": 0, "num-partitions": 3}


def _partner(tmp_path: Path, **privacy: object) -> Partner:
    cfg = tiny_config().replace("privacy", noise_multiplier=0.0, **privacy)  # 0: calibrated to max_epsilon
    run = tmp_path / "run"
    return Partner(settings_from_context({"config-path": str(write_config(cfg, run)), "run-dir": str(run)}, NODE))


def test_registration_stores_the_plan_that_training_then_uses(tmp_path: Path) -> None:
    # Prepare
    partner = _partner(tmp_path, max_epsilon=8.0)
    plan_file = partner.settings.state_dir / "privacy_plan.json"
    # Execute
    reply = FedSocialClient(partner).get_properties({})
    # Assert: the registration is the protocol's, the calibration is on disk, and a fresh process (a new
    # Partner, as each deployed message is) plans the very same noise from it
    assert reply["partner_id"] == "partner-0"
    stored = json.loads(plan_file.read_text(encoding="utf-8"))
    fresh = Partner(partner.settings).privacy_plan()
    assert fresh.noise_multiplier == stored["noise_multiplier"] == partner.privacy_plan().noise_multiplier
    assert fresh.noise_multiplier > 0


def test_an_unreachable_budget_does_not_stop_the_registration(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a cap that no noise meets for this partner (rejected by the accountant's calibration)
    partner = _partner(tmp_path, max_epsilon=1e-9)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedsocial.client"):
        reply = FedSocialClient(partner).get_properties({})
    # Assert: registered as before, the reason logged; the round that needs the plan still fails on it
    assert reply["partner_id"] == "partner-0"
    assert "no privacy plan yet" in caplog.text
    assert not (partner.settings.state_dir / "privacy_plan.json").exists()
