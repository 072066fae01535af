"""Issue 11 items 4 and 5: an aggregate no partner can capture; SecAgg+ that hides single updates.

The strategy is driven through Flower's legacy Strategy API with real FitRes / EvaluateRes messages;
proxies stand in for the network only (they answer ``get_properties`` as a partner's ClientApp does).
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.common.typing import GetPropertiesRes
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.supercore.task_identity import TaskIdentity

from fedsocial.client.flower import FedSocialClient
from fedsocial.client.partner import PartnerError
from fedsocial.server.aggregation import ParamSpec, compute_weight_bounds
from fedsocial.server.screening import ScreenedGrid, compute_reply_problem
from fedsocial.server.strategy import FedSocialStrategy
from fedsocial.shared import protocol
from fedsocial.shared.config import Config
from tests.stub_grid import StubGrid
from tests.test_federation import one_round_partner
from tests.test_strategy import NAMES, _good_reply, _Proxy, _registrations

INITIAL = [np.zeros((5, 3), np.float32), np.ones(5, np.float32)]


def _fit(node: int, arrays: list[np.ndarray], num_examples: int, **metrics: Any) -> tuple[_Proxy, FitRes]:
    m = {"round": 1, "partner_id": f"partner-{node}", "param_names": ",".join(NAMES), "num_users": 10,
         "budget_exhausted": 0, **metrics}
    return _Proxy(node), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, m)


def _eval(node: int, users: int = 20, **metrics: Any) -> tuple[_Proxy, EvaluateRes]:
    m = {**dict.fromkeys(protocol.METRIC_KEYS, 0.2), "round": 1, "partner_id": f"partner-{node}",
         "evaluated_users": users, "eval_time_s": 0.1, **metrics}
    return _Proxy(node), EvaluateRes(Status(Code.OK, ""), 0.8, users, m)


def _strategy(tmp_path: Path, n: int = 3, users: int = 10, secagg: bool = False, **fed: Any) -> FedSocialStrategy:
    cfg = Config().replace("federation", **{"partners": n, "min_partners": min(2, n), "clipping_norm": 1.0, **fed})
    return FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=_registrations(n, users), secagg=secagg)


def _direction(seed: int) -> list[np.ndarray]:
    return _good_reply(np.random.default_rng(seed))


# ---- item 4: weights bounded by the registration ----------------------------------------------------

def test_a_reply_claiming_1e9_examples_does_not_become_the_aggregate(tmp_path: Path) -> None:
    # Prepare: three partners of 10 declared users; partner-2 replies num_examples = 1e9
    strategy = _strategy(tmp_path)
    ups = [_direction(s) for s in range(3)]
    replies = [_fit(0, ups[0], 10), _fit(1, ups[1], 10), _fit(2, ups[2], 10**9)]

    # Execute
    params, _ = strategy.aggregate_fit(1, replies, [])  # type: ignore[arg-type]

    # Assert: the plain mean of the three updates (equal declared weights), not partner-2's update
    new = parameters_to_ndarrays(params)  # type: ignore[arg-type]
    for k in range(2):
        expect = INITIAL[k] + (ups[0][k].astype(np.float64) + ups[1][k] + ups[2][k]) / 3
        np.testing.assert_allclose(new[k], expect, atol=1e-6)


def test_a_huge_declared_user_count_is_capped_relative_to_the_median(tmp_path: Path) -> None:
    # Prepare: partner-2 declared 10**6 users at registration, the others 10
    cfg = Config().replace("federation", partners=3, min_partners=2, clipping_norm=1.0)
    regs = _registrations(3)
    regs[2]["num_users"] = 10**6
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=regs)
    ups = [_direction(s) for s in range(3)]

    # Execute
    params, _ = strategy.aggregate_fit(1, [_fit(n, ups[n], 10) for n in range(3)], [])  # type: ignore[arg-type]

    # Assert: weights 10, 10, 4 x median = 40 (share 2/3, never the whole aggregate)
    assert strategy.weight_bounds() == {"partner-0": 10.0, "partner-1": 10.0, "partner-2": 40.0}
    new = parameters_to_ndarrays(params)  # type: ignore[arg-type]
    expect = INITIAL[0] + (10 * ups[0][0].astype(np.float64) + 10 * ups[1][0] + 40 * ups[2][0]) / 60
    np.testing.assert_allclose(new[0], expect, atol=1e-6)


@pytest.mark.parametrize(("declared", "cap", "ratio", "expected"), [
    ({"a": 10, "b": 20, "c": 1000}, 0, 4.0, {"a": 10, "b": 20, "c": 80}),
    ({"a": 10, "b": 20, "c": 1000}, 15, 4.0, {"a": 10, "b": 15, "c": 15}),
    ({"a": 10, "b": 20, "c": 1000}, 0, 0.0, {"a": 10, "b": 20, "c": 1000}),
    ({"a": 7}, 0, 4.0, {"a": 7}),
])
def test_weight_bounds_known_values(declared: dict[str, int], cap: int, ratio: float,
                                    expected: dict[str, float]) -> None:
    assert compute_weight_bounds(declared, cap, ratio) == expected


def test_a_re_registration_cannot_raise_the_declared_bound_of_a_resumed_run(tmp_path: Path) -> None:
    first = _strategy(tmp_path)
    regs = _registrations(3)
    regs[1]["num_users"] = 10**6  # the same partner declares more after a restart

    resumed = FedSocialStrategy(first.cfg, tmp_path, NAMES, INITIAL, state=first.state_dict(), registrations=regs)

    assert resumed.weight_bounds()["partner-1"] == 10.0


@pytest.mark.parametrize(("metrics", "problem"), [
    ({"epsilon": "abc"}, "epsilon"),
    ({"budget_exhausted": "yes"}, "budget_exhausted"),
    ({"steps": 10**400, "epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1e-300, "sample_rate": 0.1,
      "max_grad_norm": 0.1, "ledger_round": 1, "ledger_head": "z"}, "ledger_head"),
    ({"partner_id": "partner-0"}, "claims partner id"),
])
def test_a_malformed_fit_reply_is_dropped_and_logged_never_raised(tmp_path: Path, metrics: dict[str, Any],
                                                                   problem: str) -> None:
    strategy = _strategy(tmp_path)
    replies = [_fit(0, _direction(0), 10), _fit(1, _direction(1), 10), _fit(2, _direction(2), 10, **metrics)]

    _, info = strategy.aggregate_fit(1, replies, [])  # type: ignore[arg-type]

    assert info == {"accepted": 2, "dropped": 1}
    (dropped,) = strategy._round["dropped"]
    assert dropped["partner"] == "partner-2" and problem in dropped["reason"]


def _npy(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


_GOOD = _npy(np.zeros((5, 3), np.float32))


@pytest.mark.parametrize(("tensors", "problem"), [
    ([b"garbage", _npy(np.ones(5, np.float32))], "item_emb: not a serialised array"),
    ([_npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)] * 2, "item_emb: shape (2,)"),
    ([_npy(np.zeros((5, 3), dtype=object), allow_pickle=True)] * 2, "item_emb: dtype object"),
    ([_GOOD[:-4], _npy(np.ones(5, np.float32))], "item_emb: 56 data bytes, expected 60"),
    ([_GOOD + b"\0" * 10**6, _npy(np.ones(5, np.float32))], "data bytes, expected 60"),  # oversized payload
    ([_GOOD, _npy(np.ones(5, ">f4"))], "item_bias: dtype >f4"),
    ([_GOOD, _npy(np.ones(5, np.float32)), _GOOD], "3 arrays for 2 expected"),
    ([], "0 arrays for 2 expected"),
])
def test_undecodable_arrays_in_a_reply_are_dropped_with_a_reason_never_raised(
        tmp_path: Path, tensors: list[bytes], problem: str) -> None:
    # Prepare: two honest replies and one whose serialised arrays are hostile or broken
    strategy = _strategy(tmp_path)
    hostile = _fit(2, _direction(2), 10)
    hostile[1].parameters = Parameters(tensors, "numpy.ndarray")

    # Execute
    params, info = strategy.aggregate_fit(1, [_fit(0, _direction(0), 10), _fit(1, _direction(1), 10), hostile],
                                          [])  # type: ignore[arg-type]

    # Assert: refused with a named reason (nothing unpickled), the round goes on with the other two
    assert info == {"accepted": 2, "dropped": 1}
    (dropped,) = strategy._round["dropped"]
    assert dropped["partner"] == "partner-2" and problem in dropped["reason"], dropped
    new = parameters_to_ndarrays(params)  # type: ignore[arg-type]
    expect = INITIAL[0] + (_direction(0)[0].astype(np.float64) + _direction(1)[0]) / 2
    np.testing.assert_allclose(new[0], expect, atol=1e-6)


HEAD = "ab" * 32


def _accounting(**over: Any) -> dict[str, Any]:
    return {"epsilon": 2.0, "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 10,
            "max_grad_norm": 0.1, "ledger_round": 1, "ledger_head": HEAD, **over}


@pytest.mark.parametrize(("metrics", "declared_cap", "problem"), [
    ({}, 0.0, "without the privacy accounting"),  # the audit would see a partner that never trained
    ({"epsilon": 3.0, "delta": 1e-5}, 0.0, "without the privacy accounting"),  # a refusal's fields, an update
    (_accounting(epsilon=9.5), 0.0, "epsilon 9.5 after this release exceeds the cap 8"),  # the run's cap
    (_accounting(epsilon=4.5), 4.0, "epsilon 4.5 after this release exceeds the cap 4"),  # its own, declared
    (_accounting(epsilon=4.5), 20.0, None),  # a declaration never loosens the run's cap
    (_accounting(epsilon=9.5), 20.0, "exceeds the cap 8"),
    (_accounting(delta=1e-3), 0.0, "delta 0.001 exceeds target_delta 1e-05"),
    (_accounting(ledger_round=0), 0.0, "ledger_round"),
    (_accounting(noise_multiplier=1e-300), 0.0, "noise_multiplier"),
])
def test_under_dp_an_update_with_false_or_missing_privacy_accounting_is_refused(
        tmp_path: Path, metrics: dict[str, Any], declared_cap: float, problem: str | None) -> None:
    # Prepare: a DP run (cap 8, delta 1e-5); partner-2 may have declared its own cap at registration
    cfg = Config().replace("federation", partners=3, min_partners=2, clipping_norm=1.0).replace(
        "privacy", enabled=True, max_epsilon=8.0, target_delta=1e-5)
    regs = _registrations(3)
    regs[2].update(max_epsilon=declared_cap, target_delta=1e-5)
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=regs)
    honest = [_fit(n, _direction(n), 10, **_accounting(ledger_head=f"{n}" * 64)) for n in range(2)]

    # Execute
    _, info = strategy.aggregate_fit(1, [*honest, _fit(2, _direction(2), 10, **metrics)], [])  # type: ignore[arg-type]

    # Assert: dropped with its reason, out of the aggregate; a reply with accounting was read all the same, so
    # the round's record names the entry it said charges it (the audit then holds the ledger to it)
    if problem is None:
        assert info == {"accepted": 3, "dropped": 0}
        return
    assert info == {"accepted": 2, "dropped": 1}
    (dropped,) = strategy._round["dropped"]
    assert dropped["partner"] == "partner-2" and problem in dropped["reason"], dropped
    assert strategy._round["accepted"] == ["partner-0", "partner-1"]
    if "ledger_head" in metrics and not dropped["reason"].startswith("malformed reply"):  # parsed, then refused
        assert strategy._round["received"]["partner-2"] == [{"reply": "fit", "hash": metrics["ledger_head"]}]
        assert strategy._round["epsilon"]["partner-2"] == metrics["epsilon"]
    else:  # no accounting, or none the screen could parse: no entry it can name
        assert "partner-2" not in strategy._round["received"] and "partner-2" not in strategy._round["epsilon"]


def test_under_dp_a_refusal_and_a_zero_update_without_accounting_are_taken(tmp_path: Path) -> None:
    cfg = Config().replace("federation", partners=3, min_partners=3, clipping_norm=1.0).replace(
        "privacy", enabled=True)
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=_registrations(3))
    zero = [np.zeros_like(a) for a in INITIAL]

    _, info = strategy.aggregate_fit(1, [_fit(0, _direction(0), 10, **_accounting()),
                                         _fit(1, zero, 0, budget_exhausted=1, epsilon=7.9, delta=1e-5),
                                         _fit(2, zero, 10)], [])  # type: ignore[arg-type]

    assert info == {"accepted": 3, "dropped": 0}


@pytest.mark.parametrize("metrics", [None, [("round", 1)], "round=1"])
def test_a_reply_whose_metrics_are_no_mapping_is_dropped_never_raised(tmp_path: Path, metrics: Any) -> None:
    strategy = _strategy(tmp_path, users=100)
    hostile = _fit(2, _direction(2), 10)
    hostile[1].metrics = metrics
    broken_eval = _eval(2)
    broken_eval[1].metrics = metrics

    _, info = strategy.aggregate_fit(1, [_fit(0, _direction(0), 10), _fit(1, _direction(1), 10), hostile],
                                     [])  # type: ignore[arg-type]
    strategy.aggregate_evaluate(1, [_eval(0), _eval(1), broken_eval], [])

    assert info == {"accepted": 2, "dropped": 1}
    assert "partner_id: expected a string" in strategy.history[-1]["dropped"][0]["reason"]
    assert set(strategy.history[-1]["partners"]) == {"partner-0", "partner-1"}


def test_two_replies_with_one_partner_id_in_a_round_are_both_refused(tmp_path: Path) -> None:
    # Prepare: two nodes registered under one id are refused at registration ...
    regs = _registrations(3)
    regs[2]["partner_id"] = "partner-1"
    cfg = Config().replace("federation", partners=3, min_partners=1, clipping_norm=1.0)
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=regs)
    assert set(strategy.node_partner.values()) == {"partner-0"} and set(strategy.refused_nodes) == {1, 2}

    # ... and two replies carrying one id in a round (one node's reply relayed twice) are both dropped
    strategy = _strategy(tmp_path, min_partners=1)
    twice = _fit(1, _direction(1), 10)
    _, info = strategy.aggregate_fit(1, [_fit(0, _direction(0), 10), twice, twice], [])  # type: ignore[arg-type]

    assert info == {"accepted": 1, "dropped": 2}
    assert all("two replies with one partner id" in d["reason"] for d in strategy._round["dropped"])


def test_an_unregistered_node_cannot_contribute(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, n=2)

    _, info = strategy.aggregate_fit(1, [_fit(0, _direction(0), 10), _fit(1, _direction(1), 10),
                                         _fit(7, _direction(2), 10)], [])  # type: ignore[arg-type]

    assert info == {"accepted": 2, "dropped": 1}
    assert "not a registered partner" in strategy._round["dropped"][0]["reason"]


@pytest.mark.parametrize("bad", [{"ndcg@10": math.nan}, {"ndcg@10": 1e9}, {"hr@20": None}, {"recall@10": "x"},
                                 {"evaluated_users": 10**6}])
def test_a_bad_evaluation_is_never_averaged_in(tmp_path: Path, bad: dict[str, Any]) -> None:
    strategy = _strategy(tmp_path, users=100)
    broken = _eval(2, **bad)
    if bad.get("hr@20", 0) is None:
        del broken[1].metrics["hr@20"]

    loss, agg = strategy.aggregate_evaluate(1, [_eval(0), _eval(1, users=60, **{"ndcg@10": 0.5}), broken], [])

    assert agg["ndcg@10"] == pytest.approx((0.2 * 20 + 0.5 * 60) / 80)
    assert loss == pytest.approx(1 - float(agg["ndcg@10"]))
    assert strategy.history[-1]["eval_failures"] == 1
    assert set(strategy.history[-1]["partners"]) == {"partner-0", "partner-1"}


def test_under_dp_an_evaluation_the_run_keeps_local_is_not_published_when_a_partner_sends_it(tmp_path: Path) -> None:
    # Prepare: a DP run without DP evaluation releases; partner-2 sends its exact metrics anyway
    cfg = Config().replace("federation", partners=3, min_partners=2, clipping_norm=1.0).replace(
        "privacy", enabled=True)
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=_registrations(3, 100))
    kept = [(_Proxy(n), EvaluateRes(Status(Code.OK, ""), 0.0, 0,
                                    {"round": 1, "partner_id": f"partner-{n}", "released": 0})) for n in range(2)]

    # Execute
    loss, agg = strategy.aggregate_evaluate(1, [*kept, _eval(2, **{"ndcg@10": 0.9})], [])

    # Assert: nothing averaged or recorded from it; the refusal is in the round's record
    assert (loss, agg) == (None, {})
    record = strategy.history[-1]
    assert record["partners"] == {} and "ndcg@10" not in record
    (dropped,) = record["eval_dropped"]
    assert dropped["partner"] == "partner-2" and "no DP bound covers them" in dropped["reason"]


# ---- item 5: SecAgg+ counts contributors only -------------------------------------------------------

class _IntentProxy(_Proxy):
    """Answers the server's "will you train round r?" as a partner's ClientApp does."""

    def __init__(self, node_id: int, will: bool) -> None:
        super().__init__(node_id)
        self.will = will

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        intent = protocol.Intent(f"partner-{self.node_id}", int(ins.config["round"]), self.will)
        return GetPropertiesRes(Status(Code.OK, ""), intent.to_metrics())


def _manager(wills: list[bool]) -> SimpleClientManager:
    manager = SimpleClientManager()
    for node, will in enumerate(wills):
        manager.register(_IntentProxy(node, will))
    return manager


def test_secagg_round_with_one_contributor_is_skipped_and_recorded(tmp_path: Path) -> None:
    # Prepare: 3 partners, 2 out of budget: a secure "sum" would be partner-0's update alone
    strategy = _strategy(tmp_path, secagg=True)
    manager = _manager([True, False, False])

    # Execute: the SecAgg+ workflow asks configure_fit, then (no aggregate_fit) configure_evaluate
    fit_ins = strategy.configure_fit(1, ndarrays_to_parameters([]), manager)
    strategy.configure_evaluate(1, ndarrays_to_parameters([]), manager)
    strategy.aggregate_evaluate(1, [_eval(n) for n in range(3)], [])

    # Assert: nobody is asked to send a masked update; the round is recorded as skipped, params unchanged
    assert fit_ins == []
    record = strategy.history[-1]
    assert "max(2, secagg.reconstruction_threshold) = 2" in record["skipped"]
    assert record["budget_exhausted"] == ["partner-1", "partner-2"] and record["accepted"] == []
    assert all(np.array_equal(a, b) for a, b in zip(strategy.global_params, INITIAL, strict=True))


def test_secagg_round_samples_only_contributors_and_tells_them(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, secagg=True)

    fit_ins = strategy.configure_fit(1, ndarrays_to_parameters([]), _manager([True, False, True]))

    assert [p.node_id for p, _ in fit_ins] == [0, 2]  # type: ignore[attr-defined]
    assert all(ins.config["secure_aggregation"] == 1 and ins.config["weight"] == 10 for _, ins in fit_ins)


class _BarrierProxy(_IntentProxy):
    """Answers only once every partner has been asked: the intents must be asked together."""

    def __init__(self, node_id: int, barrier: threading.Barrier) -> None:
        super().__init__(node_id, True)
        self.barrier = barrier

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        self.barrier.wait(timeout=10)
        return super().get_properties(ins, timeout, group_id)


def test_secagg_intents_are_asked_together_not_one_partner_after_another(tmp_path: Path) -> None:
    # Regression: asked one at a time, a dead partner stalled the round by a timeout per partner
    strategy = _strategy(tmp_path, secagg=True)
    barrier = threading.Barrier(3)
    manager = SimpleClientManager()
    for node in range(3):
        manager.register(_BarrierProxy(node, barrier))

    fit_ins = strategy.configure_fit(1, ndarrays_to_parameters([]), manager)

    assert sorted(p.node_id for p, _ in fit_ins) == [0, 1, 2]  # type: ignore[attr-defined]
    assert strategy._round["dropped"] == []


def test_secagg_sum_with_a_weight_0_reply_is_not_aggregated(tmp_path: Path) -> None:
    # Prepare: a partner that refused at fit time anyway (weight 0) is in the secure sum of 2
    strategy = _strategy(tmp_path, secagg=True)
    mean = _direction(0)
    replies = [_fit(0, mean, 10), _fit(1, mean, 0, budget_exhausted=1, epsilon=7.9, delta=1e-5)]

    params, info = strategy.aggregate_fit(1, replies, [])  # type: ignore[arg-type]

    assert info["accepted"] == 0 and "skipped" in strategy._round
    new = parameters_to_ndarrays(params)  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(new, INITIAL, strict=True))


def test_a_voided_secure_sum_still_records_each_release_the_server_unmasked(tmp_path: Path) -> None:
    # Regression: a skipped SecAgg+ round recorded no release, although the server had unmasked the sum of
    # every contributor's update: a ledger leaving its charge out audited clean
    # Prepare: a DP sum of 2 where partner-1 claims an epsilon over its cap (one false claim voids the sum)
    strategy = _strategy(tmp_path, secagg=True)
    strategy.cfg = strategy.cfg.replace("privacy", enabled=True, max_epsilon=8.0, target_delta=1e-5)
    mean = _direction(0)

    def acc(n: int, eps: float) -> dict[str, Any]:
        return {"epsilon": eps, "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 10,
                "max_grad_norm": 0.1, "ledger_round": 1, "ledger_head": f"{n}" * 64}

    replies = [_fit(0, mean, 10, **acc(0, 1.0)), _fit(1, mean, 10, **acc(1, 9.5))]

    # Execute
    _, info = strategy.aggregate_fit(1, replies, [])  # type: ignore[arg-type]

    # Assert: not aggregated, and both releases named with the entries their replies said charge them
    assert info["accepted"] == 0 and "skipped" in strategy._round
    assert strategy._round["received"] == {"partner-0": [{"reply": "fit", "hash": "0" * 64}],
                                           "partner-1": [{"reply": "fit", "hash": "1" * 64}]}
    assert strategy._round["epsilon"] == {"partner-0": 1.0, "partner-1": 9.5}


def test_an_exhausted_partner_drops_out_of_a_secagg_round_instead_of_sending_zeros(tmp_path: Path) -> None:
    # Prepare: a real partner with room for one round, not two (as in test_federation)
    partner, _ = one_round_partner(tmp_path)
    client = FedSocialClient(partner)
    _, initial = partner.initial_parameters()
    config = {"round": 1, "secure_aggregation": 1, "weight": 10**9, "clipping_norm": 1.0}

    # Execute / Assert: round 1 trains (weight bounded by its own count), round 2 is refused by failing
    assert client.get_properties({"round": 1})["will_train"] == 1
    first, weight, metrics = client.fit(initial, config)
    assert weight == partner.num_users and metrics["budget_exhausted"] == 0
    assert client.get_properties({"round": 2})["will_train"] == 0
    with pytest.raises(PartnerError, match="not contributing"):
        client.fit(first, {**config, "round": 2})
    assert client.fit(first, {**config, "round": 2, "secure_aggregation": 0})[1] == 0  # plain path: weight 0


# ---- a hostile or broken coordinator: the partner refuses what it did not plan -----------------------

def _config(**over: Any) -> dict[str, Any]:
    return {**protocol.FitInstructions(1, 1.0, 2, 10**9, 0, False).to_config(), **over}


@pytest.mark.parametrize(("config", "problem"), [
    (_config(round=1.9), "round: expected an integer in [1, 2]"),  # was trained as round 1
    (_config(round=True), "round: expected an integer"),
    (_config(round=0), "round: expected an integer in [1, 2]"),
    (_config(round=3), "round: expected an integer in [1, 2]"),  # a round its budget was not planned for
    (_config(round="1"), "round: expected an integer"),
    ({"clipping_norm": 1.0}, "round: expected an integer"),
    (_config(num_rounds=50), "the coordinator runs 50 rounds, this partner planned its budget for 2"),
    (_config(weight=-5), "weight: expected an integer in [0"),
    (_config(clipping_norm=math.nan), "clipping_norm"),
    (_config(clipping_norm=0.0), "clipping_norm"),
    (_config(**{"privacy.enabled": False}), "keys outside the protocol: ['privacy.enabled']"),
    (_config(noise_multiplier=0.0, max_grad_norm=1e9), "keys outside the protocol"),
    (_config(secure_aggregation=2), "secure_aggregation"),
])
def test_a_partner_refuses_training_instructions_it_did_not_plan_before_spending_anything(
        tmp_path: Path, config: dict[str, Any], problem: str) -> None:
    # Prepare: a real partner of the tiny federation (2 rounds planned), nothing charged yet
    partner, _ = one_round_partner(tmp_path)
    client = FedSocialClient(partner)
    _, initial = partner.initial_parameters()
    ledger = tmp_path / "run" / "ledgers" / "partner-1.jsonl"

    # Execute / Assert: a clear refusal naming the field; no ledger entry, no saved state, no release
    with pytest.raises(PartnerError, match="refusing the coordinator's training instructions") as err:
        client.fit(initial, config)
    assert problem in str(err.value)
    assert not ledger.exists() or ledger.read_text() == ""
    assert not (tmp_path / "run" / "partners" / "partner-1" / "rounds").exists()


@pytest.mark.parametrize(("call", "config", "problem"), [
    ("evaluate", {"round": 3}, "round: expected an integer in [1, 2]"),
    ("evaluate", {"round": 1, "release": "exact"}, "keys outside the protocol"),
    ("evaluate", {"round": -1}, "round"),
    ("get_properties", {"round": 2.5}, "round"),
    ("get_properties", {"round": 1, "max_epsilon": 100.0}, "keys outside the protocol"),
])
def test_a_partner_refuses_evaluation_and_property_requests_it_did_not_plan(
        tmp_path: Path, call: str, config: dict[str, Any], problem: str) -> None:
    partner, _ = one_round_partner(tmp_path)
    client = FedSocialClient(partner)
    _, initial = partner.initial_parameters()

    with pytest.raises(PartnerError, match="refusing the coordinator's") as err:
        client.evaluate(initial, config) if call == "evaluate" else client.get_properties(config)

    assert problem in str(err.value)


def test_global_parameters_that_make_training_diverge_leave_the_partner_as_it_was(tmp_path: Path) -> None:
    # Prepare: a real DP partner; the coordinator sends finite but absurd globals (1e30 everywhere)
    partner, _ = one_round_partner(tmp_path)
    client = FedSocialClient(partner)
    _, initial = partner.initial_parameters()
    hostile = [a + np.float32(1e30) for a in initial]
    state = tmp_path / "run" / "partners" / "partner-1"

    # Execute: training on them diverges (its NaN tables used to be saved and the round charged, then not sent)
    with pytest.raises(PartnerError, match="round 1's training diverged"):
        client.fit(hostile, _config())

    # Assert: no snapshot, no release, no ledger entry; the sane round 1 then trains and is charged once
    assert not (state / "rounds").exists() and not (state / "releases").exists()
    ledger = tmp_path / "run" / "ledgers" / "partner-1.jsonl"
    assert not ledger.exists() or ledger.read_text() == ""
    out, _, metrics = client.fit(initial, _config())
    assert metrics["ledger_round"] == 1 and len(ledger.read_text().splitlines()) == 1
    assert all(np.isfinite(a).all() for a in out)


# ---- replies Flower's workflows could not read --------------------------------------------------------

class _ReplyGrid(StubGrid):
    """Nodes answering each training message with ``reply(node, request)`` (the transport is not under test)."""

    def __init__(self, reply: Any) -> None:
        super().__init__([0, 1, 2])
        self.reply = reply

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        return [self.reply(m.metadata.dst_node_id, m) for m in messages]


def _honest_reply(node: int, request: Message) -> Message:
    _, res = _fit(node, _direction(node), 10)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=request)


def _no_num_examples(content: RecordDict) -> None:
    del content.metric_records["fitres.num_examples"]


def _list_metric(content: RecordDict) -> None:
    content.config_records["fitres.metrics"]["epsilon"] = [1.0, 2.0]


def _no_status(content: RecordDict) -> None:
    del content.config_records["fitres.status"]


def _bad_code(content: RecordDict) -> None:
    content.config_records["fitres.status"]["code"] = 999


def _count_list(content: RecordDict) -> None:
    content.metric_records["fitres.num_examples"]["num_examples"] = [1, 2]


@pytest.fixture
def server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity Flower gives a ServerApp process (a Message needs its run id)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _fit_round_through_flowers_workflow(strategy: Any, reply: Any) -> None:
    """Round 1 of Flower's own fit workflow over three partners, each answering with ``reply(node, request)``,
    through the server's screen."""
    manager = SimpleClientManager()
    for node in range(3):
        manager.register(_Proxy(node))
    context = LegacyContext(Context(7, 0, {}, RecordDict(), {}), ServerConfig(num_rounds=1), strategy, manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(INITIAL), True)
    default_fit_workflow(ScreenedGrid(_ReplyGrid(reply), lambda: strategy.specs), context)


@pytest.mark.usefixtures("server_task")
@pytest.mark.parametrize("damage", [_no_num_examples, _list_metric, _no_status, _bad_code, _count_list])
def test_a_reply_flowers_workflow_cannot_read_is_that_partners_failure_not_the_runs(tmp_path: Path,
                                                                                    damage: Any) -> None:
    # Prepare: Flower's own fit workflow, the real strategy; partner-2's reply is damaged as it arrives
    def reply(node: int, request: Message) -> Message:
        msg = _honest_reply(node, request)
        if node == 2:
            damage(msg.content)
        return msg

    strategy = _strategy(tmp_path)

    # Execute: without the screen, Flower's conversion raised here and ended the run
    _fit_round_through_flowers_workflow(strategy, reply)

    # Assert: partner-2 is a failure with the screen's reason; the round aggregated the other two
    assert strategy._round["accepted"] == ["partner-0", "partner-1"]
    (dropped,) = strategy._round["dropped"]
    assert dropped["partner"] == "partner-2"  # named by its node (was "?")
    assert "refused by the server: node 2: unreadable train reply" in dropped["reason"]


@pytest.mark.usefixtures("server_task")
def test_a_partners_failed_reply_is_recorded_under_its_name(tmp_path: Path) -> None:
    # Prepare: partner-1's ClientApp fails (an error reply, as Flower sends it, with no node id in its text; was:
    # the round's record said the dropped reply was "?"'s, so an operator could not tell whose it was)
    def reply(node: int, request: Message) -> Message:
        if node == 1:
            return Message(Error(0, "ValueError: the partner's data changed"), reply_to=request)
        return _honest_reply(node, request)

    strategy = _strategy(tmp_path)
    # Execute
    _fit_round_through_flowers_workflow(strategy, reply)
    # Assert: the failure is partner-1's, with its own reason; the others aggregated
    assert strategy._round["accepted"] == ["partner-0", "partner-2"]
    (dropped,) = strategy._round["dropped"]
    assert dropped["partner"] == "partner-1" and "the partner's data changed" in dropped["reason"]


def _stage_messages(stage: str, asked: dict[str, Any], got: dict[str, Any]) -> tuple[Message, Message]:
    request = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **asked})}), 2,
                      MessageType.TRAIN)
    return request, Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(got)}), reply_to=request)


def _masked(*shapes: tuple[int, ...]) -> list[bytes]:
    return [_npy(np.zeros(s, np.int64)) for s in shapes]


@pytest.mark.usefixtures("server_task")
@pytest.mark.parametrize(("stage", "asked", "got", "problem"), [
    (Stage.SETUP, {}, {Key.PUBLIC_KEY_1: b"k"}, "public keys missing"),
    (Stage.SHARE_KEYS, {}, {Key.DESTINATION_LIST: [1, 3], Key.CIPHERTEXT_LIST: [b"c"]}, "equal length"),
    (Stage.SHARE_KEYS, {}, {Key.DESTINATION_LIST: ["1"], Key.CIPHERTEXT_LIST: [b"c"]}, "equal length"),
    (Stage.COLLECT_MASKED_VECTORS, {}, {Key.MASKED_PARAMETERS: _masked((1,), (5, 3))}, "2 masked arrays, expected 3"),
    (Stage.COLLECT_MASKED_VECTORS, {}, {Key.MASKED_PARAMETERS: _masked((1,), (5, 2), (5,))}, "masked array 1"),
    (Stage.COLLECT_MASKED_VECTORS, {}, {Key.MASKED_PARAMETERS: [b"x", b"y", b"z"]}, "masked array 0"),
    (Stage.COLLECT_MASKED_VECTORS, {}, {Key.MASKED_PARAMETERS: _masked((1,), (5, 3), (5,))},
     "unreadable train reply"),  # the masked vector without the fit reply the strategy reads
    (Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]},
     {Key.NODE_ID_LIST: [1, 99], Key.SHARE_LIST: [b"s", b"t"]}, "not asked about"),
    (Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [1, 2]}, {Key.NODE_ID_LIST: [1]}, "equal length"),
    (Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]},
     {Key.NODE_ID_LIST: [1, 3], Key.SHARE_LIST: [b"s", b"t"]}, None),
    (Stage.SETUP, {}, {Key.PUBLIC_KEY_1: b"k", Key.PUBLIC_KEY_2: b"l"}, None),
])
def test_secagg_stage_replies_the_workflow_could_not_read_are_refused_by_the_screen(
        stage: str, asked: dict[str, Any], got: dict[str, Any], problem: str | None) -> None:
    # Prepare: a stage request of SecAggPlusWorkflow and a reply as a hostile node may send it
    request, reply = _stage_messages(stage, asked, got)
    specs = [ParamSpec("item_emb", (5, 3)), ParamSpec("item_bias", (5,))]

    # Execute
    found = compute_reply_problem(request, reply, specs)

    # Assert: what the workflow would index, zip or add up is refused by name (its KeyError, strict zip
    # or broadcast error would have ended the run); a readable reply passes
    assert (found is None) if problem is None else (found is not None and problem in found), found
