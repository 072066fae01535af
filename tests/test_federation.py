"""The federation end to end, in-process (Flower's simulation runtime with Ray), on tiny synthetic data.

One module-scoped set of runs (3 partners, DP on, server noise on):
  A: 2 rounds straight, with an egress recorder on every ClientApp;
  B: the same config interrupted after round 1, then resumed for round 2;
  C: the same config with SecAgg+.
Tests: B's final metrics equal A's; what left each client is only shared-parameter arrays and
whitelisted scalars; the run directory has everything issue 3 asks for; C's global parameters equal
A's up to SecAgg+'s quantisation. Plus partner-level tests of the privacy budget (no Flower needed).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsocial.client.flower import make_egress_recorder
from fedsocial.client.partner import (
    EVAL_METRIC_KEYS,
    FIT_METRIC_KEYS,
    PROPERTY_KEYS,
    Partner,
    settings_from_context,
)
from fedsocial.client.state import load_npz
from fedsocial.server.checkpoint import latest_checkpoint
from fedsocial.shared.config import Config, config_from_dict
from fedsocial.shared.privacy.accounting import compute_epsilon
from fedsocial.shared.privacy.audit import audit_run
from fedsocial.shared.privacy.evaluation import RELEASED_KEYS
from fedsocial.simulations.audit import main as audit_main
from fedsocial.simulations.simulate import run_simulation_from_config, write_config
from tests.noise_keys import share_noise_keys

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

METRIC_KEYS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")


def tiny_config(**federation: Any) -> Config:
    fed = {"partners": 3, "rounds": 2, "clipping_norm": 1.0, "min_partners": 2, "server_noise_multiplier": 0.01,
           **federation}
    return config_from_dict({
        "data": {"format": "synthetic", "n_users": 150, "n_items": 120, "n_communities": 3,
                 "interactions_per_user": 12.0, "friends_per_user": 4.0},
        "model": {"dim": 8, "mlp_hidden": 8, "max_neighbors": 5, "max_targets": 8, "num_negatives": 2,
                  "user_embedding": "local", "local_refit_steps": 5},
        "train": {"batch_size": 16, "lr": 0.01, "seed": 1},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.5, "target_delta": 1e-4,
                    "max_epsilon": 50.0},
        "federation": fed,
    })


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("fed")
    cfg = tiny_config()
    share_noise_keys(cfg.federation.partners, base / "straight", base / "resumed", base / "secagg")  # compared
    straight = run_simulation_from_config(cfg, None, base / "straight", progress=False,
                                          client_mods=[make_egress_recorder(base / "egress")])
    run_simulation_from_config(cfg, None, base / "resumed", progress=False, stop_after=1)
    after_stop = json.loads((base / "resumed" / "metrics.json").read_text())
    stop_record = json.loads((base / "resumed" / "metrics_record.json").read_text())
    resumed = run_simulation_from_config(cfg, None, base / "resumed", resume=True, progress=False)
    secure = cfg.replace("secagg", enabled=True, num_shares=3, reconstruction_threshold=2)
    secagg = run_simulation_from_config(secure, None, base / "secagg", progress=False)
    return {"base": base, "cfg": cfg, "straight": straight, "after_stop": after_stop, "resumed": resumed,
            "secagg": secagg, "stop_record": stop_record}


@pytest.mark.slow  # runs a federation (or Flower's local runtime)
def test_resume_gives_the_same_final_metrics_as_a_straight_run(runs: dict[str, Any]) -> None:
    straight, after_stop, resumed = runs["straight"], runs["after_stop"], runs["resumed"]

    assert after_stop["rounds_completed"] == 1
    assert resumed["rounds_completed"] == straight["rounds_completed"] == 2
    for k in METRIC_KEYS:
        assert resumed[k] == pytest.approx(straight[k], abs=1e-6), k
    assert resumed["epsilon"] == pytest.approx(straight["epsilon"], rel=1e-9)
    a = latest_checkpoint(runs["base"] / "straight")
    b = latest_checkpoint(runs["base"] / "resumed")
    assert a is not None and b is not None and a.round == b.round == 2
    for x, y in zip(a.arrays, b.arrays, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    # the stopped run's signed metrics (round 1) were rewritten and re-signed for round 2: the audit verifies them
    record = json.loads((runs["base"] / "resumed" / "metrics_record.json").read_text())
    assert (runs["stop_record"]["round"], record["round"], record["writer"]) == (1, 2, "simulate")
    audited = audit_run(runs["base"] / "resumed")
    assert audited.exit_code == 0 and audited.records["metrics"]["verified"] is True, \
        [str(f) for f in audited.findings]
    lines = (runs["base"] / "resumed" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]


def test_only_shared_arrays_and_whitelisted_scalars_leave_a_client(runs: dict[str, Any]) -> None:
    base = runs["base"]
    ckpt = latest_checkpoint(base / "straight")
    assert ckpt is not None
    shared_shapes = [list(a.shape) for a in ckpt.arrays]
    local = load_npz(base / "straight" / "partners" / "partner-0" / "state.npz")
    local_names = {k for k in local if k != "__round__"}
    files = sorted((base / "egress").glob("*.jsonl"))
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    allowed = {"get_properties": PROPERTY_KEYS, "train": FIT_METRIC_KEYS, "evaluate": EVAL_METRIC_KEYS}
    seen_types = {r["message_type"] for r in records}

    assert {"train", "evaluate", "get_properties", "get_parameters"} <= seen_types
    assert sum(r["message_type"] == "train" for r in records) == 3 * 2
    for rec in records:
        arrays = [v for rn in rec["arrays"].values() for v in rn.values()]
        if rec["message_type"] in ("train", "get_parameters"):
            assert [shape for shape, _ in arrays] == shared_shapes
            assert {dtype for _, dtype in arrays} == {"float32"}
        else:
            assert arrays == []
        keys = [k for rn in rec["arrays"].values() for k in rn]
        assert not local_names & set(keys)
        for rname, values in rec["configs"].items():
            if rname.endswith(".status"):
                continue
            assert set(values) <= allowed[rec["message_type"]], (rname, set(values) - allowed[rec["message_type"]])
            assert all(isinstance(v, (bool, int, float, str)) for v in values.values()), values
        for values in rec["metrics"].values():
            assert set(values) <= {"num_examples", "loss"}  # loss = 1 - ndcg@10 of the partner
    assert local_names, "the partners' user/social tables exist locally"
    for rec in (r for r in records if r["message_type"] == "train"):  # DP: no uncovered statistic rides along
        values = {k: v for rn, vals in rec["configs"].items() if not rn.endswith(".status") for k, v in vals.items()}
        assert "train_loss" not in values and values.get("fit_time_s", 0.0) == 0.0, values  # 0.0: the report's default
    evals = [r for r in records if r["message_type"] == "evaluate"]
    assert evals
    for rec in evals:  # DP without a DP evaluation release: only the round and the partner id leave
        values = {k: v for rn, vals in rec["configs"].items() if not rn.endswith(".status") for k, v in vals.items()}
        assert set(values) == RELEASED_KEYS["local"] and values["released"] == 0, values
        assert all(v in (0, 0.0) for vals in rec["metrics"].values() for v in vals.values()), rec["metrics"]
    local = json.loads((base / "straight" / "partners" / "partner-0" / "eval" / "round_0002.json").read_text())
    assert 0.0 <= local["ndcg@10"] <= 1.0  # kept on the partner, where the simulation driver reads it


@pytest.mark.slow  # resumes a federation
def test_resuming_a_complete_run_whose_metrics_record_is_gone_signs_it_anew(runs: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    # Prepare: a copy of the finished run, its metrics record removed (a writer killed before it)
    run_dir = Path(shutil.copytree(runs["base"] / "straight", tmp_path / "run"))
    (run_dir / "metrics_record.json").unlink()
    assert audit_run(run_dir).records["metrics"]["verified"] is False
    # Execute: the resume does not stop at "already complete": the ServerApp rebuilds metrics.json and signs it
    doc = run_simulation_from_config(runs["cfg"], None, run_dir, resume=True, progress=False)
    # Assert
    audited = audit_run(run_dir)
    assert audited.exit_code == 0 and audited.records["metrics"]["verified"] is True, \
        [str(f) for f in audited.findings]
    assert doc["rounds_completed"] == 2 and doc["ndcg@10"] == pytest.approx(runs["straight"]["ndcg@10"], abs=1e-9)


def test_run_directory_holds_metrics_rounds_checkpoints_states_ledgers_and_report(runs: dict[str, Any]) -> None:
    run_dir = runs["base"] / "straight"
    doc = json.loads((run_dir / "metrics.json").read_text())

    assert all(0.0 <= doc[k] <= 1.0 for k in METRIC_KEYS)
    assert doc["epsilon"] > 0 and doc["delta"] == 1e-4
    assert doc["epsilon"] == max(p["epsilon"] for p in doc["partners"].values())
    assert set(doc["partners"]) == {"partner-0", "partner-1", "partner-2"}
    assert sum(p["num_users"] for p in doc["partners"].values()) == 150
    assert len((run_dir / "rounds.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_0001.npz", "round_0002.npz"]
    for pid in doc["partners"]:
        assert (run_dir / "partners" / pid / "rounds" / "round_0002.npz").is_file()
        assert len((run_dir / "ledgers" / f"{pid}.jsonl").read_text().splitlines()) == 2
        assert (run_dir / "ledgers" / f"{pid}.pub").is_file()
    heads = json.loads((run_dir / "ledger_heads.json").read_text())["heads"]  # signed by the server
    assert (run_dir / "run_manifest.json").is_file() and (run_dir / "server.pub").is_file()
    assert {pid: h["round"] for pid, h in heads.items()} == dict.fromkeys(doc["partners"], 2)
    assert audit_main([str(run_dir)]) == 0  # the partners' ledgers verify against the recorded heads
    report = (run_dir / "report.html").read_text()
    assert "<svg" in report and "partner-2" in report
    assert "http://" not in report.replace("http://www.w3.org/2000/svg", "")
    assert "<script" not in report and "<link" not in report


def one_round_partner(tmp_path: Path) -> tuple[Partner, tuple[float, float, int]]:
    """Partner 1 of the tiny federation with a cap that has room for one round, not two, and its round's event."""
    cfg = tiny_config()
    node = {"partition-id": 1, "num-partitions": 3}
    probe = Partner(settings_from_context({"config-path": str(write_config(cfg, tmp_path / "probe")),
                                           "run-dir": str(tmp_path / "probe")}, node))
    plan = probe.privacy_plan()
    event = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    eps1, eps2 = compute_epsilon([event], 1e-4), compute_epsilon([event, event], 1e-4)
    cfg = cfg.replace("privacy", max_epsilon=(eps1 + eps2) / 2)  # room for one round, not two
    config_path = write_config(cfg, tmp_path / "run")
    partner = Partner(settings_from_context({"config-path": str(config_path), "run-dir": str(tmp_path / "run")}, node))
    return partner, event


def test_exhausted_partner_refuses_to_train_and_sends_back_the_unchanged_parameters(tmp_path: Path) -> None:
    partner, event = one_round_partner(tmp_path)
    eps1 = compute_epsilon([event], 1e-4)
    _, initial = partner.initial_parameters()

    first, w1, m1 = partner.fit(initial, 1)
    second, w2, m2 = partner.fit(first, 2)

    assert m1["budget_exhausted"] == 0 and w1 == partner.num_users
    assert m1["epsilon"] == pytest.approx(eps1)
    assert m2["budget_exhausted"] == 1 and w2 == 0
    assert all(np.array_equal(a, b) for a, b in zip(second, first, strict=True))
    ledger = tmp_path / "run" / "ledgers" / "partner-1.jsonl"
    assert len(ledger.read_text().splitlines()) == 1  # no entry for a round that was not trained
    refusals = (tmp_path / "run" / "ledgers" / "partner-1.refusals.jsonl").read_text().splitlines()
    assert json.loads(refusals[0])["round"] == 2
    assert (tmp_path / "run" / "partners" / "partner-1" / "rounds" / "round_0002.npz").is_file()


def test_rerun_of_a_recorded_round_restores_history_without_a_second_entry(tmp_path: Path) -> None:
    cfg = tiny_config()
    config_path = write_config(cfg, tmp_path / "run")
    settings = settings_from_context({"config-path": str(config_path), "run-dir": str(tmp_path / "run")},
                                     {"partition-id": 0, "num-partitions": 3})
    partner = Partner(settings)
    _, initial = partner.initial_parameters()

    out1, _, m1 = partner.fit(initial, 1)
    again, _, m_again = partner.fit(initial, 1)  # a crashed round re-run after resume: same inputs, same seed

    assert m_again["epsilon"] == pytest.approx(m1["epsilon"])
    for a, b in zip(out1, again, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert len((tmp_path / "run" / "ledgers" / "partner-0.jsonl").read_text().splitlines()) == 1


def test_secure_aggregation_gives_the_plain_aggregate_up_to_quantisation(runs: dict[str, Any]) -> None:
    plain = latest_checkpoint(runs["base"] / "straight")
    secure = latest_checkpoint(runs["base"] / "secagg")
    doc = runs["secagg"]

    assert plain is not None and secure is not None and secure.round == 2
    assert doc["secure_aggregation"] is True and doc["secagg_settings"]["clipping_range"] == 1.0
    for x, y in zip(plain.arrays, secure.arrays, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)
    assert doc["ndcg@10"] == pytest.approx(runs["straight"]["ndcg@10"], abs=0.01)


def test_local_batch_size_sets_the_partners_steps_per_round(tmp_path: Path) -> None:
    node = {"partition-id": 0, "num-partitions": 3}

    def plan_of(local_batch_size: int) -> Any:
        cfg = tiny_config(local_batch_size=local_batch_size)
        run = tmp_path / f"b{local_batch_size}"
        partner = Partner(settings_from_context({"config-path": str(write_config(cfg, run)), "run-dir": str(run)},
                                                node))
        return partner, partner.privacy_plan()

    default, plan_default = plan_of(0)
    small, plan_small = plan_of(5)
    _, initial = small.initial_parameters()
    _, _, metrics = small.fit(initial, 1)

    n = small.num_users
    assert default.cfg.train.batch_size == 16 and small.cfg.train.batch_size == 5
    assert plan_default.sample_rate == pytest.approx(1 / -(-n // 16))
    assert plan_small.sample_rate == pytest.approx(1 / -(-n // 5))
    assert metrics["steps"] == plan_small.steps == round(-(-n // 5))  # one local epoch of batches of 5
