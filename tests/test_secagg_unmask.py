"""SecAgg+'s unmask stage against a hostile partner's shares: one partner's garbage never ends the run.

An in-memory federation: the server is ``run_server`` itself (the real strategy, the real
``ScreenedSecAggPlusWorkflow`` inside Flower's ``DefaultWorkflow``); each partner runs Flower's own
client side of SecAgg+ (``secaggplus_mod``) around a trivial fit that returns a fixed clipped update.
The grid stand-in routes each message to its node (a copy, as over the wire); a hostile node damages
its unmask reply as it leaves. Each run has two rounds, the damage is in round 1 only.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.common.typing import GetParametersRes, GetPropertiesRes
from flwr.supercore.task_identity import TaskIdentity

from fedsocial.client.update import compute_clipped_update
from fedsocial.server.checkpoint import checkpoint_path, load_checkpoint
from fedsocial.server.federation import run_server
from fedsocial.server.secagg import compute_quantization_error, compute_screened_shares, compute_share_problem
from fedsocial.shared import protocol
from tests.stub_grid import StubGrid

NAMES = ("item_emb", "item_bias")
INITIAL = [np.zeros((30, 4), np.float32), np.zeros(30, np.float32)]
OK = Status(Code.OK, "")
HOSTILE = 3  # the node that damages its unmask reply

Shares = tuple[list[int], list[bytes]]  # an unmask reply: the owners' node ids and the shares this node holds


class _Partner:
    """One partner as its SuperNode would run it: Flower's ``secaggplus_mod`` around a trivial fit."""

    def __init__(self, nid: int, users: int, update: list[np.ndarray]) -> None:
        self.nid, self.users, self.update = nid, users, update
        self.pid = f"partner-{nid}"
        self.context = Context(run_id=7, node_id=nid, node_config={}, state=RecordDict(), run_config={})

    def answer(self, msg: Message) -> Message:
        kind = msg.metadata.message_type
        if kind == MessageTypeLegacy.GET_PROPERTIES:  # registration, or "will you train round r?"
            asked = compat.recorddict_to_getpropertiesins(msg.content).config
            props = (protocol.Intent(self.pid, int(asked["round"]), True).to_metrics() if "round" in asked
                     else protocol.Registration(self.pid, NAMES, self.users).to_metrics())
            return Message(compat.getpropertiesres_to_recorddict(GetPropertiesRes(OK, props)), reply_to=msg)
        if kind == MessageTypeLegacy.GET_PARAMETERS:
            initial = GetParametersRes(OK, ndarrays_to_parameters(INITIAL))
            return Message(compat.getparametersres_to_recorddict(initial, keep_input=True), reply_to=msg)
        if kind == MessageType.EVALUATE:
            g = int(compat.recorddict_to_evaluateins(msg.content, keep_input=True).config["round"])
            report = protocol.EvalReport(g, self.pid, self.users, dict.fromkeys(protocol.METRIC_KEYS, 0.2))
            res = EvaluateRes(OK, 0.8, self.users, report.to_metrics())
            return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)
        return secaggplus_mod(msg, self.context, self._fit)

    def _fit(self, msg: Message, context: Context) -> Message:
        config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
        report = protocol.FitReport(int(config["round"]), self.pid, NAMES, self.users, False)
        res = FitRes(OK, ndarrays_to_parameters(self.update), int(config["weight"]), report.to_metrics())
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


class _FederationGrid(StubGrid):
    """Routes each message to its partner; in round 1 ``HOSTILE`` passes its unmask reply through
    ``damage``, and ``gone`` (if any) fails after sending its key shares (a dropout SecAgg+ recovers from);
    ``silent``: ``gone`` sends no reply at all instead of an error."""

    def __init__(self, partners: dict[int, _Partner], damage: Callable[[Shares], Shares] | None,
                 gone: int | None = None, silent: bool = False) -> None:
        super().__init__(partners)
        self.partners, self.damage, self.gone, self.silent = partners, damage, gone, silent

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            nid, request = msg.metadata.dst_node_id, copy.deepcopy(msg)  # the node reads its own copy
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = configs.get(Key.STAGE) if configs is not None else None
            first = msg.metadata.group_id == "1"
            if first and nid == self.gone and stage == Stage.COLLECT_MASKED_VECTORS:
                if not self.silent:  # silent: no reply at all (a straggler, or a node not yet declared offline)
                    out.append(Message(Error(0, "the partner went away"), reply_to=request))
                continue
            if first and nid == self.gone and self.silent and msg.metadata.message_type == MessageType.EVALUATE:
                raise AssertionError(f"node {nid} missed round 1's deadline and was asked to evaluate round 1")
            reply = self.partners[nid].answer(request)
            if first and nid == HOSTILE and stage == Stage.UNMASK and self.damage is not None:
                rec = reply.content.config_records[RECORD_KEY_CONFIGS]
                nids, shares = self.damage((list(rec[Key.NODE_ID_LIST]), list(rec[Key.SHARE_LIST])))  # type: ignore[arg-type]
                rec[Key.NODE_ID_LIST], rec[Key.SHARE_LIST] = nids, shares
            out.append(reply)
        return out


@pytest.fixture
def server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity Flower gives a ServerApp process (a Message needs its run id)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _updates(n: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(5)
    out = []
    for _ in range(n):
        arrays = [rng.normal(size=a.shape).astype(np.float32) for a in INITIAL]
        out.append(compute_clipped_update(arrays, [np.zeros_like(a) for a in INITIAL], 1.0)[0])
    return out


def _federate(tmp_path: Path, damage: Callable[[Shares], Shares] | None, n: int = 3, gone: int | None = None,
              secagg: str = "", federation: str = "", silent: bool = False,
              ) -> tuple[dict[str, Any], list[np.ndarray], float]:
    """Two rounds of ``n`` partners (nodes 1..n, 10, 20, 30, ... users): metrics.json, the global
    parameters after them, and the quantisation error bound of one round's weighted mean."""
    config = tmp_path / "fed.toml"
    config.write_text(f"[federation]\npartners = {n}\nmin_partners = {n - 1}\nrounds = 2\nclipping_norm = 1.0\n"
                      f"{federation}[secagg]\nenabled = true\n{secagg}")
    updates = _updates(n)
    partners = {i + 1: _Partner(i + 1, 10 * (i + 1), updates[i]) for i in range(n)}
    run_dir = tmp_path / "run"
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"config-path": str(config), "run-dir": str(run_dir), "wait-timeout": 5.0})

    doc = run_server(_FederationGrid(partners, damage, gone, silent), context)

    s = doc["secagg_settings"]
    bound = compute_quantization_error(s["clipping_range"], 1.0, s["quantization_range"], s["max_weight"],
                                       min(p.users for p in partners.values()))
    return doc, load_checkpoint(checkpoint_path(run_dir, 2)).arrays, bound


def _mean(partners: Iterable[int]) -> list[np.ndarray]:
    """The weighted mean (weights 10 x node id) of the updates of ``partners``."""
    updates, ids = _updates(5), list(partners)
    w = np.array([10.0 * i for i in ids])
    return [sum(wi * updates[i - 1][k].astype(np.float64) for wi, i in zip(w, ids, strict=True)) / w.sum()
            for k in range(len(INITIAL))]


def _assert_applied(got: list[np.ndarray], rounds: list[list[int]], bound: float) -> None:
    """The global parameters are the initial ones plus the weighted mean of each aggregated round."""
    want = [a.astype(np.float64) for a in INITIAL]
    for contributors in rounds:
        want = [w + m for w, m in zip(want, _mean(contributors), strict=True)]
    err = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True))
    assert err <= 2 * bound + 1e-6, err


def _each(change: Callable[[bytes], bytes]) -> Callable[[Shares], Shares]:
    return lambda held: (held[0], [change(s) for s in held[1]])


def _index(i: int) -> Callable[[bytes], bytes]:
    return lambda s: i.to_bytes(4, "little") + s[4:]


def _flip(start: int, stop: int | None) -> Callable[[bytes], bytes]:
    """A share still well formed, with the bytes ``[start, stop)`` inverted: the secret it combines to
    changes by an amount that depends on the inversion and the share indices only, not on the secret."""
    def flip(s: bytes) -> bytes:
        end = len(s) if stop is None else stop
        return s[:start] + bytes(b ^ 0xFF for b in s[start:end]) + s[end:]
    return flip


def _twice(held: Shares) -> Shares:
    return held[0] + held[0][:1], held[1] + [held[1][1]]  # a second share for the first owner


def _index_of_another(held: Shares) -> Shares:
    return held[0], [(int.from_bytes(s[:4], "little") % 3 + 1).to_bytes(4, "little") + s[4:] for s in held[1]]


def _rounds(doc: dict[str, Any]) -> list[list[str]]:
    return [r["accepted"] for r in doc["rounds"]]


ALL3 = ["partner-1", "partner-2", "partner-3"]


@pytest.mark.usefixtures("server_task")
def test_an_honest_in_memory_secagg_run_reconstructs_the_weighted_mean(tmp_path: Path) -> None:
    # Execute
    doc, params, bound = _federate(tmp_path, None)

    # Assert: both rounds aggregated every partner; the global moved by the weighted mean twice
    assert doc["skipped_rounds"] == [] and _rounds(doc) == [ALL3, ALL3]
    _assert_applied(params, [[1, 2, 3], [1, 2, 3]], bound)


@pytest.mark.usefixtures("server_task")
def test_an_honest_dropout_after_the_key_shares_is_unmasked_from_its_private_key(tmp_path: Path) -> None:
    # Execute: partner-2 fails in round 1 after sharing its keys; the others' shares recover its private key
    doc, params, bound = _federate(tmp_path, None, gone=2)

    # Assert: round 1 is the mean of partners 1 and 3, round 2 of all three
    assert doc["skipped_rounds"] == [] and _rounds(doc) == [["partner-1", "partner-3"], ALL3]
    _assert_applied(params, [[1, 3], [1, 2, 3]], bound)


@pytest.mark.usefixtures("server_task")
def test_a_silent_straggler_misses_the_deadline_and_the_round_goes_on(tmp_path: Path) -> None:
    # Execute: partner-2 sends no masked vector in round 1 (no reply, no error); the straggler deadline is 0.3 s
    t0 = time.monotonic()
    doc, params, bound = _federate(tmp_path, None, gone=2, silent=True, federation="straggler_grace = 0.3\n")

    # Assert: round 1 closed without it (unmasked from its private key's shares) and named it; it was not asked
    # to evaluate round 1 (the grid raises if it is), and round 2 asked it again and aggregated all three
    assert doc["skipped_rounds"] == [] and _rounds(doc) == [["partner-1", "partner-3"], ALL3]
    _assert_applied(params, [[1, 3], [1, 2, 3]], bound)
    assert doc["rounds"][0]["missed_deadline"] == ["partner-2"] and "missed_deadline" not in doc["rounds"][1]
    assert doc["rounds"][0]["eval_failures"] == 1
    assert time.monotonic() - t0 < 60.0  # without the deadline the round would wait for ever


@pytest.mark.usefixtures("server_task")
@pytest.mark.parametrize("damage", [
    _each(lambda s: b""),
    _each(lambda s: s[:-1]),
    _each(lambda s: s + bytes(16)),
    _each(lambda s: np.random.default_rng(3).bytes(len(s))),
    _each(_index(0)),
    _each(_index(9)),
    _twice,
], ids=["empty", "truncated", "a chunk longer", "random bytes", "index 0", "index 9", "two for one secret"])
def test_malformed_shares_are_dropped_and_the_rest_reconstruct_the_exact_mean(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Shares], Shares]) -> None:
    # Execute: without the screen, Flower's combine_shares raised and ended the run
    with caplog.at_level(logging.WARNING, "fedsocial.server"):
        doc, params, bound = _federate(tmp_path, damage)

    # Assert: two honest shares of each secret remain (threshold 2): both rounds are exact means
    assert doc["skipped_rounds"] == [] and _rounds(doc) == [ALL3, ALL3]
    _assert_applied(params, [[1, 2, 3], [1, 2, 3]], bound)
    assert "sent by node 3 (partner-3)" in caplog.text
    # round 1's record (rounds.jsonl) names the sender of every dropped share, and no honest partner;
    # round 2, undamaged, lists none
    first, second = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    dropped = first["secagg_dropped_shares"]
    assert dropped and {d["holder"] for d in dropped} == {"node 3 (partner-3)"}, dropped
    assert all(d["owner"].startswith("node ") and d["reason"] for d in dropped)
    assert "secagg_dropped_shares" not in second


@pytest.mark.usefixtures("server_task")
def test_a_duplicated_share_index_is_dropped_on_both_sides_and_five_partners_still_reconstruct(
        tmp_path: Path) -> None:
    # Prepare: 5 partners, 5 shares of each secret, 3 needed: a duplicate leaves 3
    five = "num_shares = 5\nreconstruction_threshold = 3\n"

    # Execute
    doc, params, bound = _federate(tmp_path, _index_of_another, n=5, secagg=five)

    # Assert
    assert doc["skipped_rounds"] == []
    _assert_applied(params, [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]], bound)


@pytest.mark.usefixtures("server_task")
@pytest.mark.parametrize(("damage", "gone", "reason"), [
    (_index_of_another, None, "1 usable shares of its secret, 2 needed"),
    (_each(_flip(-16, None)), None, "do not combine to its secret: ValueError: Failed to combine shares"),
    (_each(_flip(4, 5)), 2, "node 2 (partner-2): its shares do not combine to its secret: ValueError"),
], ids=["duplicate index, too few left", "padding broken", "a dead partner's private key broken"])
def test_shares_that_cannot_be_unmasked_skip_the_round_and_the_next_one_proceeds(
        tmp_path: Path, damage: Callable[[Shares], Shares], gone: int | None, reason: str) -> None:
    # Execute
    doc, params, bound = _federate(tmp_path, damage, gone=gone)

    # Assert: round 1 is skipped with the unmask's reason and applied nothing; round 2 is a full mean
    (skip,) = doc["skipped_rounds"]
    assert skip["round"] == 1 and skip["reason"].startswith("secure aggregation halted (unmask refused")
    assert reason in skip["reason"], skip["reason"]
    assert _rounds(doc) == [[], ALL3]
    _assert_applied(params, [[1, 2, 3]], bound)
    records = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert records[0]["skipped"] == skip["reason"] and "halted" not in records[0]


@pytest.mark.usefixtures("server_task")
def test_well_formed_wrong_shares_give_a_garbage_sum_that_is_refused_not_applied(tmp_path: Path) -> None:
    # Execute: partner-3's shares of the mask seeds, their first secret byte inverted, are well formed:
    # the seeds combine to wrong 32-byte seeds without raising, and the sum unmasks to garbage. (Inverting
    # a whole 16-byte chunk would not do: Flower's generator folds the seed to 32 bits by XOR of its words.)
    doc, params, bound = _federate(tmp_path, _each(_flip(4, 5)))

    # Assert: the strategy's check of the aggregate refuses it; round 2 proceeds
    (skip,) = doc["skipped_rounds"]
    assert skip["round"] == 1 and "the securely aggregated update is invalid" in skip["reason"], skip
    assert _rounds(doc) == [[], ALL3]
    _assert_applied(params, [[1, 2, 3]], bound)


# ---- the share checks, known values ------------------------------------------------------------------

def test_share_problems_known_values() -> None:
    good = (2).to_bytes(4, "little") + bytes(48)
    assert compute_share_problem(good, 3) is None
    assert "not 4 + 16k" in str(compute_share_problem(good[:-1], 3))
    assert "not 4 + 16k" in str(compute_share_problem(good[:4], 3))
    assert compute_share_problem(bytes(20), 3) == "index 0 outside [1, 3]"
    assert compute_share_problem((4).to_bytes(4, "little") + bytes(16), 3) == "index 4 outside [1, 3]"


def test_screened_shares_keep_what_combines_and_name_each_dropped_holder() -> None:
    # Prepare: Flower's shares of a secret (3 shares, 2 needed) held by nodes 10, 11, 12
    secret = bytes(range(32))
    s1, s2, s3 = create_shares(secret, 2, 3)

    # Execute / Assert: honest shares are all kept
    kept, dropped = compute_screened_shares([(10, s1), (11, s2), (12, s3)], 3)
    assert kept == [(10, s1), (11, s2), (12, s3)] and dropped == []
    assert combine_shares([s for _, s in kept]) == secret

    # a longer share, a second share from one holder, a duplicated index: dropped with the holder named
    kept, dropped = compute_screened_shares([(10, s1), (11, s2), (12, s3 + bytes(16))], 3)
    assert [h for h, _ in kept] == [10, 11] and [h for h, _ in dropped] == [12]
    assert combine_shares([s for _, s in kept]) == secret
    kept, dropped = compute_screened_shares([(10, s1), (11, s2), (12, s3), (12, s3)], 3)
    assert [h for h, _ in kept] == [10, 11] and dropped == [(12, "2 shares for one secret")]
    kept, dropped = compute_screened_shares([(10, s1), (11, s2), (12, s1[:4] + s3[4:])], 3)
    assert [h for h, _ in kept] == [11] and sorted(h for h, _ in dropped) == [10, 12]

    # two lengths, one share each: neither is the most common, both dropped
    kept, dropped = compute_screened_shares([(10, s1), (12, s3 + bytes(16))], 3)
    assert kept == [] and "no length is the most common" in dropped[0][1]
