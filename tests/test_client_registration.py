"""A partner calibrates its noise when it registers (issue 14 item 6): registrations are answered by all
partners side by side, SecAgg+'s per-round intents one partner after another, so the calibration (a
bisection over the accountant) moves off the sequential path. Intents are answered ahead (registration,
the previous round's fit) and kept by their exact inputs, so a fresh deployed process answers one
without loading Opacus. What is calibrated, trained and charged is unchanged.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fedsocial.client.flower import FedSocialClient
from fedsocial.client.partner import INTENTS_FILE, Partner, settings_from_context
from fedsocial.shared.privacy.accounting import compute_epsilon, would_exceed
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


def _secagg_partner(tmp_path: Path, **privacy: object) -> Partner:
    cfg = tiny_config().replace("privacy", **privacy).replace("secagg", enabled=True, num_shares=3,
                                                              reconstruction_threshold=2)
    run = tmp_path / "run"
    return Partner(settings_from_context({"config-path": str(write_config(cfg, run)), "run-dir": str(run)}, NODE))


def _direct_answer(partner: Partner, history: list[tuple[float, float, int]]) -> bool:
    plan, pc = partner.privacy_plan(), partner.cfg.privacy
    event = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    return not would_exceed(history, event, pc.target_delta, pc.max_epsilon, pc.accountant)


def test_a_fresh_process_answers_the_registered_partners_first_intent_without_the_accountant(tmp_path: Path) -> None:
    # Prepare: the registration (SecAgg+ on) answers round 1's intent ahead
    partner = _secagg_partner(tmp_path)
    FedSocialClient(partner).get_properties({})
    code = ("import sys, json\n"
            "from fedsocial.client.flower import FedSocialClient\n"
            "from fedsocial.client.partner import Partner, settings_from_context\n"
            f"s = settings_from_context({{'config-path': {str(partner.settings.config_path)!r}, "
            f"'run-dir': {str(partner.settings.run_dir)!r}}}, {NODE!r})\n"
            "out = FedSocialClient(Partner(s)).get_properties({'round': 1})\n"
            "print(json.dumps([out['will_train'], 'opacus' in sys.modules, 'torch' in sys.modules]))\n")
    # Execute: a new process, as each deployed message is
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    will, opacus, torch = json.loads(proc.stdout.strip().splitlines()[-1])
    # Assert: the answer is the accountant's, and neither Opacus nor torch was loaded to give it
    assert bool(will) == _direct_answer(partner, []) is True
    assert not opacus and not torch


def test_the_fit_answers_the_next_intent_ahead_and_it_is_the_refusal_the_accountant_gives(tmp_path: Path) -> None:
    # Prepare: room for one round, not two (as tests/test_wire_robustness.py)
    probe = _secagg_partner(tmp_path / "probe")
    plan = probe.privacy_plan()
    event = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    eps1, eps2 = compute_epsilon([event], 1e-4), compute_epsilon([event, event], 1e-4)
    partner = _secagg_partner(tmp_path, max_epsilon=(eps1 + eps2) / 2)
    _, initial = partner.initial_parameters()
    # Execute: train round 1
    partner.fit(initial, 1)
    cached = json.loads((partner.settings.state_dir / INTENTS_FILE).read_text(encoding="utf-8"))
    # Assert: round 2's answer is on disk, False, as the accountant says, and is what the intent returns
    assert list(cached.values()) == [False]
    assert _direct_answer(partner, [event]) is False
    assert partner.will_train(2) is False


def test_an_answer_is_reused_only_for_identical_inputs_and_a_damaged_file_is_ignored(tmp_path: Path) -> None:
    # Prepare: a partner whose round-1 intent is cached as True
    partner = _secagg_partner(tmp_path)
    assert partner.will_train(1) is True
    path = partner.settings.state_dir / INTENTS_FILE
    # Execute / Assert: the same partner with a cap below round 1's epsilon computes anew (another key)
    tight = _secagg_partner(tmp_path / "tight", max_epsilon=1e-3)
    tight.settings.state_dir.mkdir(parents=True, exist_ok=True)
    tight_path = tight.settings.state_dir / INTENTS_FILE
    tight_path.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")  # the loose partner's answers
    assert tight.will_train(1) is False
    # a damaged file costs only the computation
    path.write_text("{not json", encoding="utf-8")
    assert partner.will_train(1) is True
    assert json.loads(path.read_text(encoding="utf-8"))  # rewritten whole
