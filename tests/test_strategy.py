"""Server strategy math and reply validation (pure functions), client-side clipping, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from fedsocial.client.update import UpdateError, compute_clipped_update
from fedsocial.server.aggregation import (
    compute_applied,
    compute_is_eval_round,
    compute_noised,
    compute_server_noise_rng,
    compute_server_noise_std,
    compute_specs,
    compute_update_norm,
    compute_weighted_average,
    compute_weighted_metrics,
    compute_weights,
    validate_update,
)
from fedsocial.server.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from fedsocial.server.strategy import FedSocialStrategy, QuorumError
from fedsocial.shared import protocol
from fedsocial.shared.config import Config

NAMES = ["item_emb", "item_bias"]


def _good_reply(rng: np.random.Generator) -> list[np.ndarray]:
    arrays = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)]
    clipped, _ = compute_clipped_update(arrays, [np.zeros_like(a) for a in arrays], 1.0)
    return clipped


def _validate(arrays: list[np.ndarray], names: list[str] | None = None, reply_round: object = 3,
              num_examples: int = 10) -> str | None:
    expected = compute_specs(NAMES, [np.zeros((5, 3), np.float32), np.zeros(5, np.float32)])
    return validate_update(arrays, NAMES if names is None else names, expected, clipping_norm=1.0,
                           norm_tolerance=1e-3, expected_round=3, reply_round=reply_round,
                           num_examples=num_examples)


# ---- client-side clipping -------------------------------------------------------------------------

def test_clipped_update_is_inside_the_ball_and_keeps_direction() -> None:
    rng = np.random.default_rng(0)
    old = [rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    new = [o + 5 * rng.normal(size=o.shape).astype(np.float32) for o in old]

    clipped, norm_before = compute_clipped_update(new, old, clipping_norm=0.5)

    raw = [n.astype(np.float64) - o for n, o in zip(new, old, strict=True)]
    assert norm_before == pytest.approx(compute_update_norm(raw))
    assert norm_before > 0.5
    assert compute_update_norm(clipped) <= 0.5
    assert compute_update_norm(clipped) == pytest.approx(0.5, rel=1e-5)
    cos = sum(float(np.sum(c * r)) for c, r in zip(clipped, raw, strict=True)) / (0.5 * norm_before)
    assert cos == pytest.approx(1.0, abs=1e-5)
    assert all(c.dtype == np.float32 for c in clipped)


def test_small_update_passes_unchanged() -> None:
    old = [np.ones((3,), np.float32)]
    new = [np.array([1.1, 1.0, 0.9], np.float32)]

    clipped, norm = compute_clipped_update(new, old, clipping_norm=10.0)

    np.testing.assert_allclose(clipped[0], new[0] - old[0], atol=1e-7)
    assert norm == pytest.approx(np.sqrt(0.02), rel=1e-5)


def test_clipping_rejects_mismatched_and_non_finite_updates() -> None:
    with pytest.raises(UpdateError, match="shape"):
        compute_clipped_update([np.zeros(3)], [np.zeros(4)], 1.0)
    with pytest.raises(UpdateError, match="non-finite"):
        compute_clipped_update([np.array([np.nan])], [np.zeros(1)], 1.0)


# ---- validation: one crafted bad reply per rule ----------------------------------------------------

def test_a_well_formed_reply_is_accepted() -> None:
    assert _validate(_good_reply(np.random.default_rng(1))) is None


def test_reply_for_another_round_is_dropped() -> None:
    arrays = _good_reply(np.random.default_rng(1))
    assert "wrong round" in (_validate(arrays, reply_round=2) or "")
    assert "wrong round" in (_validate(arrays, reply_round="3") or "")
    assert "wrong round" in (_validate(arrays, reply_round=None) or "")


def test_unexpected_or_missing_names_are_dropped() -> None:
    arrays = _good_reply(np.random.default_rng(1))
    reason = _validate(arrays, names=["item_emb", "user_emb"])
    assert reason is not None and "user_emb" in reason and "item_bias" in reason
    assert "order" in (_validate(arrays[::-1], names=NAMES[::-1]) or "")
    extra = [*arrays, np.zeros((2, 3), np.float32)]
    assert "user_emb" in (_validate(extra, names=[*NAMES, "user_emb"]) or "")


def test_wrong_array_count_shape_or_dtype_is_dropped() -> None:
    arrays = _good_reply(np.random.default_rng(1))
    assert "arrays for" in (_validate(arrays[:1]) or "")
    assert "shape" in (_validate([arrays[0][:4], arrays[1]]) or "")
    assert "dtype" in (_validate([arrays[0].astype(np.float64), arrays[1]]) or "")


def test_non_finite_values_are_dropped() -> None:
    arrays = _good_reply(np.random.default_rng(1))
    bad = arrays[1].copy()
    bad[2] = np.inf
    assert "non-finite" in (_validate([arrays[0], bad]) or "")
    bad[2] = np.nan
    assert "non-finite" in (_validate([arrays[0], bad]) or "")


def test_update_above_the_clipping_bound_is_dropped_within_tolerance_accepted() -> None:
    arrays = _good_reply(np.random.default_rng(1))  # norm exactly 1 (clipped)
    assert _validate([a * np.float32(1.0005) for a in arrays]) is None  # inside the 1e-3 tolerance
    reason = _validate([a * np.float32(1.01) for a in arrays])
    assert reason is not None and "exceeds clipping_norm" in reason


def test_negative_example_count_is_dropped() -> None:
    assert "num_examples" in (_validate(_good_reply(np.random.default_rng(1)), num_examples=-1) or "")


# ---- aggregation ----------------------------------------------------------------------------------

def test_weights_are_user_counts_capped() -> None:
    np.testing.assert_array_equal(compute_weights([10, 300, 50], 0), [10, 300, 50])
    np.testing.assert_array_equal(compute_weights([10, 300, 50], 100), [10, 100, 50])


def test_weighted_average_matches_hand_computation() -> None:
    u1 = [np.array([1.0, 0.0]), np.array([[2.0]])]
    u2 = [np.array([0.0, 4.0]), np.array([[-1.0]])]

    avg = compute_weighted_average([u1, u2], np.array([3.0, 1.0]))

    np.testing.assert_allclose(avg[0], [0.75, 1.0])
    np.testing.assert_allclose(avg[1], [[1.25]])
    zero = compute_weighted_average([u1, u2], np.array([0.0, 0.0]))
    assert all(np.all(z == 0) for z in zero)


def test_server_noise_has_the_configured_scale() -> None:
    std = compute_server_noise_std(noise_multiplier=2.0, clipping_norm=0.5, n_partners=4)
    assert std == pytest.approx(0.25)
    noised = compute_noised([np.zeros(200_000)], std, np.random.default_rng(0))
    assert float(np.std(noised[0])) == pytest.approx(0.25, rel=0.01)
    assert compute_noised([np.ones(3)], 0.0, np.random.default_rng(0))[0].tolist() == [1, 1, 1]


def test_applied_update_keeps_dtype() -> None:
    new = compute_applied([np.ones(2, np.float32)], [np.array([0.5, -0.5])])
    assert new[0].dtype == np.float32 and new[0].tolist() == [1.5, 0.5]


def test_metrics_are_weighted_by_evaluated_users() -> None:
    out = compute_weighted_metrics([{"ndcg@10": 0.2}, {"ndcg@10": 0.5}], [30, 10], ["ndcg@10"])
    assert out["ndcg@10"] == pytest.approx((0.2 * 30 + 0.5 * 10) / 40)


# ---- checkpoints ----------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_latest(tmp_path: Path) -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.5], np.float32)]
    for r in (1, 2):
        save_checkpoint(tmp_path, Checkpoint(r, NAMES, [a * r for a in arrays], {"history": [r]}))

    latest = latest_checkpoint(tmp_path)

    assert latest is not None and latest.round == 2 and latest.state == {"history": [2]}
    np.testing.assert_array_equal(latest.arrays[0], arrays[0] * 2)
    assert latest.arrays[0].dtype == np.float32
    first = load_checkpoint(tmp_path / "checkpoints" / "round_0001.npz")
    np.testing.assert_array_equal(first.arrays[1], arrays[1])
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


# ---- the strategy drops bad replies, keeps the round going while the quorum holds -----------------

class _Proxy(ClientProxy):
    """Identifies a reply's sender; the strategy never calls it (the workflow does the messaging)."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def _reply(node: int, arrays: list[np.ndarray], round_: object, users: int = 10) -> tuple[ClientProxy, FitRes]:
    metrics = {"round": round_, "partner_id": f"partner-{node}", "param_names": ",".join(NAMES), "num_users": users,
               "budget_exhausted": 0}
    return _Proxy(node), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), users, metrics)  # type: ignore[arg-type]


def _registrations(n: int, users: int = 10) -> dict[int, dict[str, object]]:
    return {i: {"partner_id": f"partner-{i}", "param_names": ",".join(NAMES), "num_users": users} for i in range(n)}


def _strategy(tmp_path: Path, min_partners: int) -> FedSocialStrategy:
    cfg = Config().replace("federation", partners=4, min_partners=min_partners, clipping_norm=1.0)
    initial = [np.zeros((5, 3), np.float32), np.ones(5, np.float32)]
    return FedSocialStrategy(cfg, tmp_path, NAMES, initial, registrations=_registrations(4))


def _bad_replies() -> list[tuple[ClientProxy, FitRes]]:
    rng = np.random.default_rng(3)
    good = _good_reply(rng)
    nan = [a.copy() for a in good]
    nan[0][0, 0] = np.nan
    return [_reply(0, good, 1), _reply(1, good, 2), _reply(2, [a * np.float32(3) for a in good], 1), _reply(3, nan, 1)]


def test_strategy_drops_each_bad_reply_with_partner_and_reason_and_aggregates_the_rest(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_partners=1)
    replies = _bad_replies()

    params, info = strategy.aggregate_fit(1, replies, [])

    assert params is not None and info == {"accepted": 1, "dropped": 3}
    dropped = {d["partner"]: d["reason"] for d in strategy._round["dropped"]}
    assert set(dropped) == {"partner-1", "partner-2", "partner-3"}
    assert "wrong round" in dropped["partner-1"]
    assert "exceeds clipping_norm" in dropped["partner-2"]
    assert "non-finite" in dropped["partner-3"]
    good = parameters_to_ndarrays(replies[0][1].parameters)
    new = parameters_to_ndarrays(params)
    np.testing.assert_allclose(new[0], good[0], atol=1e-6)
    np.testing.assert_allclose(new[1], 1.0 + good[1], atol=1e-6)


def test_server_noise_streams_are_keyed_per_round() -> None:
    # Prepare: two secrets
    key, other = bytes(range(32)), bytes(range(1, 33))

    # Execute: the first draws of each (key, round)
    def draw(k: bytes, r: int) -> list[float]:
        return compute_server_noise_rng(k, r).normal(size=4).tolist()

    # Assert: a re-run of a round redraws the same noise; another round or key draws other noise
    assert draw(key, 3) == draw(key, 3)
    assert draw(key, 3) != draw(key, 4)
    assert draw(key, 3) != draw(other, 3)


def _noised_round(run: Path, seed: int) -> np.ndarray:
    cfg = Config().replace("federation", partners=1, min_partners=1, clipping_norm=1.0,
                           server_noise_multiplier=1.0).replace("train", seed=seed)
    strategy = FedSocialStrategy(cfg, run, NAMES, [np.zeros((5, 3), np.float32), np.zeros(5, np.float32)],
                                 registrations=_registrations(1))
    zero = [np.zeros((5, 3), np.float32), np.zeros(5, np.float32)]
    params, _ = strategy.aggregate_fit(1, [_reply(0, zero, 1)], [])
    assert params is not None
    return parameters_to_ndarrays(params)[0]


def test_server_noise_comes_from_the_servers_secret_not_the_shared_seed(tmp_path: Path) -> None:
    # Prepare / Execute: the same config (same train.seed) in two run folders, and one folder twice
    first = _noised_round(tmp_path / "a", seed=7)
    again = _noised_round(tmp_path / "a", seed=7)
    other = _noised_round(tmp_path / "b", seed=7)

    # Assert: noise is there; the seed everyone knows does not regenerate it; the key file is the server's, 0600
    assert np.abs(first).max() > 0
    assert not np.allclose(first, other)
    np.testing.assert_array_equal(first, again)  # a resumed server redraws the same noise for the same round
    key = tmp_path / "a" / "server" / "dp_noise.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    assert "rng" not in FedSocialStrategy(Config(), tmp_path / "c", NAMES, [np.zeros(5, np.float32)] * 2).state_dict()


def test_strategy_fails_the_round_clearly_when_the_quorum_is_lost(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_partners=2)

    with pytest.raises(QuorumError, match=r"only 1 valid replies.*partner-2: update norm"):
        strategy.aggregate_fit(1, _bad_replies(), [])


# ---- evaluation every k rounds ---------------------------------------------------------------------

@pytest.mark.parametrize(("every", "expected"), [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (3, [3, 5]), (9, [5])])
def test_eval_rounds_are_every_kth_and_always_the_last(every: int, expected: list[int]) -> None:
    assert [r for r in range(1, 6) if compute_is_eval_round(r, 5, every)] == expected


def test_a_round_without_evaluation_is_still_recorded_and_checkpointed(tmp_path: Path) -> None:
    # Prepare: round 1 of 2 with eval_every 2 (Flower calls no aggregate_evaluate for it)
    cfg = Config().replace("federation", partners=4, rounds=2, min_partners=1, clipping_norm=1.0, eval_every=2)
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, [np.zeros((5, 3), np.float32), np.ones(5, np.float32)],
                                 registrations=_registrations(1))
    manager = SimpleClientManager()
    manager.register(_Proxy(0))
    strategy.configure_fit(1, ndarrays_to_parameters([]), manager)
    strategy.aggregate_fit(1, [_reply(0, _good_reply(np.random.default_rng(0)), 1)], [])

    # Execute
    ins = strategy.configure_evaluate(1, ndarrays_to_parameters([]), manager)

    # Assert: no evaluation asked, yet the round is in the history, rounds.jsonl and a checkpoint
    assert ins == []
    assert [r["round"] for r in strategy.history] == [1] and "ndcg@10" not in strategy.history[0]
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 1
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.round == 1


def _dp_strategy(tmp_path: Path, **federation: Any) -> FedSocialStrategy:
    cfg = Config().replace("federation", partners=3, min_partners=2, clipping_norm=1.0, **federation).replace(
        "privacy", enabled=True, max_epsilon=8.0, target_delta=1e-5)
    return FedSocialStrategy(cfg, tmp_path, NAMES, [np.zeros((5, 3), np.float32), np.ones(5, np.float32)],
                             registrations=_registrations(3))


def _dp_fit(node: int, arrays: list[np.ndarray], n: int, **metrics: Any) -> tuple[Any, FitRes]:
    doc = {"round": 1, "partner_id": f"partner-{node}", "param_names": ",".join(NAMES), "num_users": 10,
           "budget_exhausted": 0, **metrics}
    return _Proxy(node), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, doc)


def _accounting(head: str) -> dict[str, Any]:
    return {"epsilon": 2.0, "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10,
            "max_grad_norm": 0.1, "ledger_round": 1, "ledger_head": head * 64}


def test_a_dp_evaluation_release_over_the_partners_cap_is_not_published(tmp_path: Path) -> None:
    # Regression (adversarial review): an evaluation reply whose own accounting said epsilon 50 (cap 8) was published
    # Prepare: a round trained by three partners, DP evaluation releases
    s = _dp_strategy(tmp_path, eval_noise_multiplier=5.0)
    s.aggregate_fit(1, [_dp_fit(i, _good_reply(np.random.default_rng(i)), 10, **_accounting(str(i)))
                        for i in range(3)], [])

    def ev(node: int, epsilon: float, head: str) -> tuple[Any, EvaluateRes]:
        doc = {**dict.fromkeys(protocol.METRIC_KEYS, 0.2), "round": 1, "partner_id": f"partner-{node}",
               "evaluated_users": 5, "eval_time_s": 0.1, "epsilon": epsilon, "ledger_round": 1,
               "ledger_head": head * 64}
        return _Proxy(node), EvaluateRes(Status(Code.OK, ""), 0.8, 5, doc)

    # Execute
    s.aggregate_evaluate(1, [ev(0, 2.1, "b"), ev(1, 2.1, "c"), ev(2, 50.0, "d")], [])
    # Assert: dropped with the reason, the others published
    record = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[-1])
    assert sorted(record["partners"]) == ["partner-0", "partner-1"]
    (dropped,) = record["eval_dropped"]
    assert dropped["partner"] == "partner-2" and "epsilon 50 after this evaluation release exceeds the cap 8" in \
        dropped["reason"]


def test_server_noise_counts_only_the_replies_that_contribute(tmp_path: Path) -> None:
    # Regression (adversarial review): two budget-exhausted refusals (weight 0) divided the noise by three, though
    # the mean was one partner's update alone
    s = _dp_strategy(tmp_path, server_noise_multiplier=1.0)
    zero = [np.zeros((5, 3), np.float32), np.zeros(5, np.float32)]
    s.aggregate_fit(1, [_dp_fit(0, _good_reply(np.random.default_rng(0)), 10, **_accounting("a")),
                        _dp_fit(1, zero, 0, budget_exhausted=1, epsilon=7.9, delta=1e-5),
                        _dp_fit(2, zero, 0, budget_exhausted=1, epsilon=7.9, delta=1e-5)], [])
    assert s._round["server_noise_std"] == pytest.approx(1.0)  # sigma C / 1 contributor
