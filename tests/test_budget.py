"""Budget exhaustion in a simulation: each partner stops training at the round its cap predicts, keeps
evaluating, and the audit of the run passes. Also: a partner's own (node-config) cap wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsocial.client.partner import Partner, compute_partner_config, settings_from_context
from fedsocial.shared.config import ConfigError
from fedsocial.shared.privacy.accounting import compute_epsilon
from fedsocial.simulations.audit import main as audit_main
from fedsocial.simulations.simulate import run_simulation_from_config, write_config
from tests.test_federation import tiny_config

ROUNDS = 3


def _rounds_within(event: tuple[float, float, int], cap: float, delta: float) -> int:
    """How many rounds of ``event`` fit under ``cap`` (brute force over the composition)."""
    return max([k for k in range(ROUNDS + 1) if k == 0 or compute_epsilon([event] * k, delta) <= cap])


@pytest.mark.slow  # runs a federation (or Flower's local runtime)
def test_partners_stop_at_the_round_their_cap_predicts_and_the_audit_passes(tmp_path: Path) -> None:
    # Prepare: fixed noise; partners differ in size, hence in sample rate and epsilon per round
    cfg = tiny_config(rounds=ROUNDS)
    delta = cfg.privacy.target_delta
    events = []
    for i in range(3):
        probe = Partner(settings_from_context({"config-path": str(write_config(cfg, tmp_path / "probe")),
                                               "run-dir": str(tmp_path / "probe")},
                                              {"partition-id": i, "num-partitions": 3}))
        plan = probe.privacy_plan()
        events.append((plan.noise_multiplier, plan.sample_rate, plan.steps))
    spender = max(events, key=lambda e: compute_epsilon([e, e], delta))
    cap = (compute_epsilon([spender], delta) + compute_epsilon([spender, spender], delta)) / 2  # 1 round fits
    cfg = cfg.replace("privacy", max_epsilon=cap)
    expected = {f"partner-{i}": _rounds_within(e, cap, delta) for i, e in enumerate(events)}
    assert min(expected.values()) == 1  # the test exercises a refusal

    # Execute
    run = tmp_path / "run"
    run_simulation_from_config(cfg, None, run, progress=False)
    code = audit_main([str(run)])

    # Assert: ledgers hold exactly the affordable rounds, refusals name the next round, evaluation went on
    for pid, k in expected.items():
        entries = (run / "ledgers" / f"{pid}.jsonl").read_text().splitlines()
        assert len(entries) == k, pid
        assert max(json.loads(e)["epsilon_rdp"] for e in entries) <= cap
        if k < ROUNDS:
            log = (run / "ledgers" / f"{pid}.refusals.jsonl").read_text().splitlines()
            refusals = [json.loads(line) for line in log]
            assert refusals[0]["round"] == k + 1
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == ROUNDS
    # evaluation went on every round, on the partners (under DP it stays there: the server gets no metric)
    assert not any("ndcg@10" in r for r in rounds)
    for pid in expected:
        assert sorted(p.name for p in (run / "partners" / pid / "eval").iterdir()) == [
            f"round_{r:04d}.json" for r in range(1, ROUNDS + 1)]
    doc = json.loads((run / "metrics.json").read_text())  # the simulation driver reads the partners' files
    assert all("ndcg@10" in r for r in doc["rounds"]) and 0.0 <= doc["ndcg@10"] <= 1.0
    assert code == 0


def test_a_partners_own_cap_applies_and_a_looser_one_is_refused(tmp_path: Path) -> None:
    # Prepare
    cfg = tiny_config()
    run_config = {"config-path": str(write_config(cfg, tmp_path / "r")), "run-dir": str(tmp_path / "r")}
    node = {"partition-id": 0, "num-partitions": 3}
    # Execute
    tight = compute_partner_config(cfg, settings_from_context(run_config, {**node, "max-epsilon": 2.0,
                                                                         "target-delta": 1e-6}))
    # Assert
    assert (tight.privacy.max_epsilon, tight.privacy.target_delta) == (2.0, 1e-6)
    with pytest.raises(ConfigError, match="max-epsilon"):
        compute_partner_config(cfg, settings_from_context(run_config, {**node, "max-epsilon": 1e3}))
    with pytest.raises(ConfigError, match="max-epsilon"):
        settings_from_context(run_config, {**node, "max-epsilon": "lots"})
