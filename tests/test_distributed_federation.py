"""Distributed noise in a federation (privacy.distributed_noise): the shares pass Flower's SecAgg+ exactly,
the server's step is AdamW on their decoded sum, a resume continues the optimizer, the audit checks the
recorded mechanism, and misconfigurations are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsocial.client.state import load_release
from fedsocial.server.aggregation import compute_adam_step
from fedsocial.server.checkpoint import checkpoint_path, load_checkpoint
from fedsocial.shared.config import ConfigError, config_from_dict
from fedsocial.shared.privacy import distributed as dn
from fedsocial.shared.privacy.audit import EXIT_OK, audit_run
from fedsocial.shared.privacy.ledger import read_ledger
from fedsocial.simulations.simulate import run_simulation_from_config
from tests.noise_keys import share_noise_keys

PARTNERS = 3


def tiny_raw(**privacy: Any) -> dict[str, Any]:
    return {
        "data": {"format": "synthetic", "n_users": 150, "n_items": 120, "n_communities": 3,
                 "interactions_per_user": 12.0, "friends_per_user": 4.0},
        "model": {"dim": 8, "mlp_hidden": 8, "max_neighbors": 5, "max_targets": 8, "num_negatives": 2,
                  "user_embedding": "local", "local_refit_steps": 5},
        "train": {"batch_size": 16, "lr": 0.01, "seed": 1, "num_threads": 1},
        "privacy": {"enabled": True, "max_grad_norm": 0.5, "target_delta": 1e-4, "max_epsilon": 8.0,
                    "distributed_noise": True, "accountant": "rdp_int", **privacy},
        "federation": {"partners": PARTNERS, "rounds": 3, "local_epochs": 1, "clipping_norm": 1.0,
                       "min_partners": 2, "eval_every": 3},
        "secagg": {"enabled": True, "num_shares": 3, "reconstruction_threshold": 2},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("distributed")
    cfg = config_from_dict(tiny_raw())
    share_noise_keys(PARTNERS, base / "straight", base / "resumed")  # the same secrets: comparable bit for bit
    straight = run_simulation_from_config(cfg, None, base / "straight", progress=False)
    run_simulation_from_config(cfg, None, base / "resumed", progress=False, stop_after=2)
    resumed = run_simulation_from_config(cfg, None, base / "resumed", resume=True, progress=False)
    return {"base": base, "cfg": cfg, "straight": straight, "resumed": resumed}


@pytest.mark.slow  # two federations
def test_the_server_steps_on_the_exact_sum_of_the_shares(runs: dict[str, Any]) -> None:
    # Prepare: round 2's checkpoint (parameters, AdamW moments) and the three round-3 shares the partners saved
    run, cfg = runs["base"] / "straight", runs["cfg"]
    before, after = load_checkpoint(checkpoint_path(run, 2)), load_checkpoint(checkpoint_path(run, 3))
    shares = [load_release(run / "partners" / f"partner-{i}", 3) for i in range(PARTNERS)]
    users = sum(int(read_ledger(run / "ledgers" / f"partner-{i}.jsonl")[0]["population"]) for i in range(PARTNERS))
    bits, step = dn.compute_sum_bits(PARTNERS), dn.compute_grid_step(0.5, cfg.privacy.grid_bits)
    # Execute: what the server must have done, from the shares themselves
    summed = [sum(s[1][k] for s in shares if s is not None) for k in range(len(before.names))]
    grads = [dn.compute_decoded_sum(a, PARTNERS, bits) * (step / users) for a in summed]
    m = [before.optimizer[f"m/{n}"] for n in before.names]
    v = [before.optimizer[f"v/{n}"] for n in before.names]
    update, _, _ = compute_adam_step(before.arrays, grads, m, v, 3, cfg.train.lr, cfg.train.weight_decay)
    expected = [(p.astype(np.float64) + u).astype(p.dtype) for p, u in zip(before.arrays, update, strict=True)]
    # Assert: SecAgg+ neither rounded nor clipped anything: the model is bit for bit the expected one
    assert all(s is not None for s in shares)
    assert before.state["opt_step"] == 2 and after.state["opt_step"] == 3
    assert all(np.array_equal(a, b) for a, b in zip(after.arrays, expected, strict=True))


@pytest.mark.slow
def test_a_resumed_run_continues_the_server_optimizer(runs: dict[str, Any]) -> None:
    # Prepare / Execute: the fixture stopped one run after round 2 and resumed it
    a = load_checkpoint(checkpoint_path(runs["base"] / "straight", 3))
    b = load_checkpoint(checkpoint_path(runs["base"] / "resumed", 3))
    # Assert: the moments came back from the checkpoint, so the runs agree bit for bit
    assert all(np.array_equal(x, y) for x, y in zip(a.arrays, b.arrays, strict=True))
    assert runs["resumed"]["ndcg@10"] == runs["straight"]["ndcg@10"]


@pytest.mark.slow
def test_the_ledger_charges_one_full_batch_step_a_round_and_the_audit_passes(runs: dict[str, Any]) -> None:
    # Prepare
    run = runs["base"] / "straight"
    entries = read_ledger(run / "ledgers" / "partner-0.jsonl")
    training = [e for e in entries if e.get("release", "training") == "training"]
    # Execute
    result = audit_run(run)
    # Assert
    assert [(e["sample_rate"], e["steps"], e["mechanism"], e["accountant"]) for e in training] == \
        [(1.0, 1, "skellam", "rdp_int")] * 3
    assert training[-1]["epsilon_rdp"] <= 8.0 and training[-1]["contributors"] == 2
    assert result.exit_code == EXIT_OK, [str(f) for f in result.findings]
    assert result.records["manifest"]["privacy"]["distributed_noise"] is True
    from fedsocial.shared.privacy.audit import noise_text
    from fedsocial.simulations.privacy_report import render_html

    assert "at least 2 honest partners' shares" in noise_text(result)  # the assumption, stated with its t
    assert "<dt>Noise</dt><dd>distributed: integer Skellam shares" in render_html(result)


def test_record_problems_name_an_undersized_share_and_wrong_sensitivities() -> None:
    # Prepare: a true description, then one whose shares were halved, then one with a smaller model's bounds
    plan = dn.compute_share_plan(2.0, 0.5, 16, 10_000, 2, 3)
    good = plan.to_record()
    halved = {**good, "share_variance": plan.share_variance / 2}
    # Execute
    ok = dn.compute_record_problems(good, 2.0, 0.5, 10_000)
    low = dn.compute_record_problems(halved, 2.0, 0.5, 10_000)
    other = dn.compute_record_problems(good, 2.0, 0.5, 40_000)
    # Assert
    assert ok == []
    assert len(low) == 1 and "below the recorded noise_multiplier" in low[0]
    assert any("sensitivities" in p for p in other)


def test_server_adam_step_is_torch_adamw() -> None:
    # Prepare: three steps of torch's AdamW on a parameter with fixed gradients
    rng = np.random.default_rng(0)
    p0, grads = rng.normal(size=(4, 3)), [rng.normal(size=(4, 3)) for _ in range(3)]
    w = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=0.05, weight_decay=0.01)
    for g in grads:
        w.grad = torch.tensor(g)
        opt.step()
    # Execute
    p, m, v = p0.copy(), [np.zeros_like(p0)], [np.zeros_like(p0)]
    for step, g in enumerate(grads, start=1):
        (u,), m, v = compute_adam_step([p], [g], m, v, step, 0.05, 0.01)
        p = p + u
    # Assert
    assert np.allclose(p, w.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("change,key", [
    ({"secagg": {"enabled": False}}, "secagg.enabled"),
    ({"privacy": {"accountant": "rdp"}}, "privacy.accountant"),
    ({"federation": {"local_epochs": 2}}, "federation.local_epochs"),
    ({"federation": {"server_noise_multiplier": 0.1}}, "federation.server_noise_multiplier"),
])
def test_misconfigured_distributed_noise_is_refused_by_name(change: dict[str, Any], key: str) -> None:
    # Prepare
    raw = tiny_raw()
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    # Execute / Assert
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_secagg_settings_carry_integers_unchanged() -> None:
    # Prepare
    from flwr.common.secure_aggregation.quantization import quantize

    from fedsocial.server.secagg import derive_secagg_settings

    cfg = config_from_dict(tiny_raw())
    # Execute
    kw = derive_secagg_settings(cfg, [50.0, 50.0, 50.0])
    values = dn.compute_encoded(np.array([-(2 ** 40), -3, 0, 7, 2 ** 33]), dn.compute_sum_bits(PARTNERS))
    (q,) = quantize([values], kw["clipping_range"], kw["quantization_range"])
    # Assert: weight 1 of 1, one quantisation step per integer, the sum below the modulus
    assert kw["max_weight"] == 1.0 and kw["quantization_range"] == 2 * kw["clipping_range"]
    assert PARTNERS * kw["quantization_range"] < kw["modulus_range"]
    assert np.array_equal(q, values + kw["clipping_range"])


@pytest.mark.slow  # a federation
def test_the_popularity_release_is_averaged_by_users_not_stepped(tmp_path: Path) -> None:
    # Regression: under distributed noise the untrained item_pop got the Skellam gradient path, so each
    # partner's popularity release never reached the server and the server moved item_pop by AdamW on noise.
    # Prepare
    cfg = config_from_dict(tiny_raw(popularity_noise_multiplier=3.0))
    run = tmp_path / "run"
    # Execute
    run_simulation_from_config(cfg.replace("federation", rounds=2, eval_every=2), None, run, progress=False)
    names = load_checkpoint(checkpoint_path(run, 1)).names
    k = names.index("item_pop")
    shares = [load_release(run / "partners" / f"partner-{i}", 1) for i in range(PARTNERS)]
    users = sum(int(read_ledger(run / "ledgers" / f"partner-{i}.jsonl")[-1]["population"]) for i in range(PARTNERS))
    summed = sum(s[1][k] for s in shares if s is not None)
    expected = dn.compute_decoded_sum(summed, PARTNERS, dn.compute_sum_bits(PARTNERS)) * (dn.VALUE_GRID / users)
    first, second = (load_checkpoint(checkpoint_path(run, r)).arrays[k] for r in (1, 2))
    # Assert: the users-weighted mean of the partners' releases, kept as it is by the next round
    assert np.array_equal(first, expected.astype(first.dtype))
    assert np.abs(first).max() > 0 and np.allclose(first, second, atol=dn.VALUE_GRID / users * PARTNERS)
    # the audit's dimension leaves the released values out, as the partners' shares do (regression)
    assert audit_run(run).exit_code == EXIT_OK


def test_a_partner_refuses_instructions_of_the_other_noise_placement(tmp_path: Path) -> None:
    # Prepare: a per-partner-noise partner told that its reply is a distributed share (the client's update
    # clipping would then let its new parameters leave unclipped)
    from fedsocial.client.flower import FedSocialClient
    from fedsocial.client.partner import Partner, PartnerError, settings_from_context
    from fedsocial.shared.protocol import FitInstructions
    from fedsocial.simulations.simulate import write_config

    raw = tiny_raw(distributed_noise=False, accountant="rdp", noise_multiplier=1.0)
    config = write_config(config_from_dict(raw), tmp_path / "run")
    partner = Partner(settings_from_context({"config-path": str(config), "run-dir": str(tmp_path / "run")},
                                            {"partition-id": 0, "num-partitions": PARTNERS}))
    ins = FitInstructions(1, 1.0, 3, None, None, True, True).to_config()
    # Execute / Assert: refused before anything is trained or charged
    with pytest.raises(PartnerError, match="distributed"):
        FedSocialClient(partner).fit(partner.initial_parameters()[1], ins)
    assert not (tmp_path / "run" / "ledgers").exists() or not any((tmp_path / "run" / "ledgers").glob("*.jsonl"))


def test_the_server_unmasks_no_sum_of_fewer_shares_than_the_noise_assumes() -> None:
    # Prepare: the workflow's state after two masked vectors arrived, three assumed
    from types import SimpleNamespace

    from fedsocial.server.secagg import ScreenedSecAggPlusWorkflow

    halts: list[str] = []
    wf = ScreenedSecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2, on_halt=halts.append, min_summed=3)
    state = SimpleNamespace(active_node_ids={1, 2})
    # Execute
    ok = wf.unmask_stage(None, None, state)  # type: ignore[arg-type]
    # Assert
    assert ok is False and len(halts) == 1 and "fewer than the 3" in halts[0]


@pytest.mark.slow  # a federation
def test_only_masked_shares_and_whitelisted_scalars_leave_a_partner(tmp_path: Path) -> None:
    # Prepare: one round with an egress recorder on every ClientApp
    import json

    from fedsocial.client.flower import make_egress_recorder
    from fedsocial.shared.privacy.evaluation import RELEASED_KEYS
    from fedsocial.shared.protocol import FIT_METRIC_KEYS

    cfg = config_from_dict(tiny_raw()).replace("federation", rounds=1, eval_every=1)
    secagg_keys = {"pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares"}  # SecAgg+'s stages
    # Execute
    run_simulation_from_config(cfg, None, tmp_path / "run", progress=False,
                               client_mods=[make_egress_recorder(tmp_path / "egress")])
    records = [json.loads(line) for f in sorted((tmp_path / "egress").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    # Assert: training replies carry no array in the clear, only the masked share and the charged accounting
    trains = [r for r in records if r["message_type"] == "train"]
    assert sum("masked_params" in r["configs"].get("secaggplus_configs", {}) for r in trains) == PARTNERS
    for rec in trains:
        assert all(not arrays for arrays in rec["arrays"].values()), rec["arrays"]
        for rname, values in rec["configs"].items():
            if not rname.endswith(".status"):
                assert set(values) <= set(FIT_METRIC_KEYS) | secagg_keys, set(values)
                assert "train_loss" not in values and values.get("fit_time_s", 0.0) == 0.0
        assert all(v.get("num_examples", 1) == 1 for v in rec["metrics"].values())
    for rec in (r for r in records if r["message_type"] == "evaluate"):
        values = {k for rn, vals in rec["configs"].items() if not rn.endswith(".status") for k in vals}
        assert values == set(RELEASED_KEYS["local"]), values


def test_a_distributed_partner_refuses_secagg_stages_that_break_its_shares() -> None:
    # Prepare: what a partner of tiny_raw expects, and a server's setup asking for Flower's defaults instead
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    from fedsocial.client.flower import check_share_stage
    from fedsocial.client.partner import PartnerError

    settings = dn.compute_secagg_share_settings(PARTNERS, 3, 2)
    expected = (settings, 2, PARTNERS)  # t = 2 of 3: one dropout allowed
    good = {Key.STAGE: Stage.SETUP, Key.CLIPPING_RANGE: settings["clipping_range"],
            Key.TARGET_RANGE: settings["quantization_range"], Key.MOD_RANGE: settings["modulus_range"],
            Key.MAX_WEIGHT: 1.0}
    # Execute / Assert: the expected setup and an unmask of enough shares pass; the others are refused
    check_share_stage(good, expected)
    check_share_stage({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]}, expected)
    # Regression: the unmask lists are the partner's neighbours, not every contributor: three active
    # neighbours of five partners with t = 5 is no evidence of a small sum (it refused every round)
    check_share_stage({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: []},
                      (dn.compute_secagg_share_settings(5, 3, 2), 5, 5))
    with pytest.raises(PartnerError, match="clipping_range"):
        check_share_stage({**good, Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 4194304}, expected)
    with pytest.raises(PartnerError, match="2 of this partner's SecAgg"):
        check_share_stage({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1], Key.DEAD_NODE_ID_LIST: [2, 3]},
                          expected)
    check_share_stage({**good, Key.CLIPPING_RANGE: 8.0}, None)  # per-partner noise: SecAgg+'s own settings


@pytest.mark.slow  # a federation
def test_every_partner_needed_with_fewer_secagg_neighbours_than_partners(tmp_path: Path) -> None:
    # Regression: the partners' unmask check counted their SecAgg+ neighbours as the contributors, so with
    # 5 partners, 3 shares each and t = 5 every round was refused and nothing was trained
    # Prepare
    raw = tiny_raw()
    raw["federation"] = {**raw["federation"], "partners": 5, "min_partners": 5, "rounds": 1, "eval_every": 1}
    raw["data"] = {**raw["data"], "n_users": 200}
    run = tmp_path / "run"
    # Execute
    doc = run_simulation_from_config(config_from_dict(raw), None, run, progress=False)
    # Assert: the round was aggregated from all five shares, and the audit passes
    assert doc["rounds_completed"] == 1 and doc["epsilon"] > 0
    assert load_checkpoint(checkpoint_path(run, 1)).state["opt_step"] == 1
    assert audit_run(run).exit_code == EXIT_OK


@pytest.mark.slow  # two federations (a run stopped after round 2, then resumed)
def test_a_server_crash_after_a_released_round_loses_the_round_and_never_sums_a_share_twice(
        tmp_path: Path) -> None:
    # Prepare: the state a server killed after aggregating round 2 and before checkpointing it leaves (its signed
    # heads and round record of round 2 written, the partners' round-2 shares released and charged, the newest
    # checkpoint round 1's)
    cfg, run = config_from_dict(tiny_raw()), tmp_path / "run"
    run_simulation_from_config(cfg, None, run, progress=False, stop_after=2)
    checkpoint_path(run, 2).unlink()

    # Execute: the resumed server asks round 2 again
    run_simulation_from_config(cfg, None, run, resume=True, progress=False)

    # Assert: every partner declined round 2 (released before), so it was skipped, not summed a second time; round 3
    # went on; every round charged once; the audit verifies the run
    records = {r["round"]: r for r in map(json.loads, (run / "rounds.jsonl").read_text().splitlines())}
    assert sorted(records[2]["released_before"]) == [f"partner-{i}" for i in range(PARTNERS)]
    assert "skipped" in records[2] and records[2]["budget_exhausted"] == []
    assert len(records[3]["accepted"]) == PARTNERS
    for i in range(PARTNERS):
        rounds = [e["round"] for e in read_ledger(run / "ledgers" / f"partner-{i}.jsonl")
                  if e.get("release", "training") == "training"]
        assert rounds == [1, 2, 3]
    audited = audit_run(run)
    assert audited.exit_code == EXIT_OK, [str(f) for f in audited.findings]


def test_a_plain_training_message_never_makes_a_share_leave_unmasked(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression (adversarial review): a coordinator that sent a distributed-noise partner a plain training message
    # (no SecAgg+ stage) got its Skellam share, 1/t of the step's noise, in the clear, charged as a full release
    from flwr.app import Context, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.supercore.task_identity import TaskIdentity

    from fedsocial.client.flower import make_secagg_mod, update_clipping_mod
    from fedsocial.client.partner import Partner, PartnerError, settings_from_context
    from fedsocial.shared import protocol
    from fedsocial.shared.config import config_from_dict
    from fedsocial.simulations.simulate import write_config

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):  # what a ClientApp process has set
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)
    run = tmp_path / "run"
    config = write_config(config_from_dict(tiny_raw()), run)
    rc, nc = {"config-path": str(config), "run-dir": str(run)}, {"partition-id": 0, "num-partitions": 3}
    partner = Partner(settings_from_context(rc, nc))
    _, initial = partner.initial_parameters()
    ins = protocol.FitInstructions(1, 1.0, 3, None, None, secure_aggregation=False, distributed_noise=True,
                                   contributors=("partner-0", "partner-1", "partner-2")).to_config()
    msg = Message(content=compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(initial), ins), keep_input=True),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config=rc)
    reached: list[int] = []

    def fit(m: Message, c: Context) -> Message:
        reached.append(1)
        raise AssertionError("the partner's fit must not run")

    # Execute / Assert: refused before the fit, nothing drawn or charged
    with pytest.raises(PartnerError, match="a training message outside SecAgg\\+"):
        make_secagg_mod({})(msg, ctx, lambda m, c: update_clipping_mod(m, c, fit))
    assert reached == [] and not (run / "ledgers" / "partner-0.jsonl").exists()
