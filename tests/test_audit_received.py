"""A release the server took must be charged in the partner's ledger, in every round, not only the last.

The signed heads name each partner's newest ledger entry. A partner that lies while the run goes on (its
reply names an entry it never appended, say in round 2) keeps a valid chain without that entry, and its
newest head still matches: only the server's per-round record (``received`` in ``ledger_heads.json``, the
entry each taken reply named) shows the round that was released uncharged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsocial.server.strategy import FedSocialStrategy
from fedsocial.shared import signing
from fedsocial.shared.config import Config, config_from_dict
from fedsocial.shared.privacy.audit import audit_run
from fedsocial.shared.privacy.ledger import Ledger, entry_hash, read_ledger
from fedsocial.shared.privacy.records import (
    HEADS,
    compute_params_sha256,
    compute_received,
    write_run_manifest,
    write_signed_heads,
)
from fedsocial.simulations.audit import EXIT_OK, EXIT_TAMPER
from tests.server_records import MODEL_NAMES, model_arrays
from tests.test_strategy import NAMES, _registrations
from tests.test_wire_robustness import INITIAL, _direction
from tests.test_wire_robustness import _fit as _fit_reply

DELTA = 1e-4
USERS = 500


def _build(run: Path, rounds: dict[str, list[int]]) -> dict[str, list[dict[str, Any]]]:
    """Each partner's signed ledger, charging one training release per listed round; the manifest and the
    checkpoint of the last round, as the server writes them. Returns the ledgers' entries."""
    out = {}
    for pid, charged in rounds.items():
        key, pub = signing.generate_keypair()
        signing.save_public_key(pub, run / "ledgers" / f"{pid}.pub")
        ledger = Ledger(run / "ledgers" / f"{pid}.jsonl", key, pid)
        for r in charged:
            ledger.append_round(round=r, noise_multiplier=1.1, sample_rate=0.05, steps=20, max_grad_norm=0.1,
                                target_delta=DELTA, population=USERS, secure_rng=False, extra={"scope": "joint"})
        out[pid] = read_ledger(ledger.path)
    cfg = config_from_dict({"privacy": {"enabled": True, "max_epsilon": 8.0, "target_delta": DELTA}})
    write_run_manifest(run, cfg, {pid: {"num_users": USERS, "max_epsilon": 8.0, "target_delta": DELTA}
                                  for pid in rounds})
    from fedsocial.server.checkpoint import Checkpoint, save_checkpoint

    save_checkpoint(run, Checkpoint(3, MODEL_NAMES, model_arrays(), {}))
    return out


def _fit(digest: str) -> dict[str, str]:
    return {"reply": "fit", "hash": digest}


def _sign_heads(run: Path, entries: dict[str, list[dict[str, Any]]],
                received: dict[int, dict[str, list[dict[str, str]]]]) -> None:
    """The heads the server signs after round 3: each partner's newest entry, and what it took per round."""
    heads = {pid: {"round": es[-1]["round"], "hash": entry_hash(es[-1])} for pid, es in entries.items()}
    history = [{"round": r, "received": got} for r, got in sorted(received.items())]
    write_signed_heads(run, 3, heads, compute_params_sha256(MODEL_NAMES, model_arrays()), compute_received(history))


def _honest(entries: dict[str, list[dict[str, Any]]]) -> dict[int, dict[str, list[dict[str, str]]]]:
    return {r: {pid: [_fit(entry_hash(es[r - 1]))] for pid, es in entries.items()} for r in (1, 2, 3)}


def _the_tampering(run: Path) -> Any:
    """The audit's one tampering finding on ``run`` (its exit code says tampering)."""
    result = audit_run(run)
    assert result.exit_code == EXIT_TAMPER
    (finding,) = [f for f in result.findings if f.severity == "tamper"]
    return finding


def test_an_honest_per_round_record_audits_clean(tmp_path: Path) -> None:
    # Prepare: both partners charge rounds 1-3 and the server took each round's release
    entries = _build(tmp_path, {"north": [1, 2, 3], "south": [1, 2, 3]})
    _sign_heads(tmp_path, entries, _honest(entries))
    # Execute
    result = audit_run(tmp_path)
    # Assert
    assert result.exit_code == EXIT_OK, [str(f) for f in result.findings]
    assert sorted(result.records["received"]) == ["north", "south"]
    assert [(r, reply) for r, reply, _ in result.records["received"]["north"]] == [(1, "fit"), (2, "fit"), (3, "fit")]


def test_a_round_the_server_took_but_the_ledger_never_charged_is_tampering(tmp_path: Path) -> None:
    # Prepare: north's ledger charges rounds 1 and 3 only (a valid chain: round 2 was never appended), while
    # its round-2 reply named an entry hash and the server took that update; its newest head is genuine
    entries = _build(tmp_path, {"north": [1, 3], "south": [1, 2, 3]})
    received = _honest({"south": entries["south"]})
    for r, got in received.items():
        got["north"] = [_fit(entry_hash(entries["north"][0 if r == 1 else 1]) if r != 2 else "2e" * 32)]
    _sign_heads(tmp_path, entries, received)
    # Execute
    finding = _the_tampering(tmp_path)
    # Assert: before the per-round record this audited 0 (chain, signatures and newest head all verify)
    assert (finding.partner, finding.round) == ("north", 2)
    assert "release went uncharged" in finding.message


def test_a_reply_naming_an_entry_of_another_round_is_tampering(tmp_path: Path) -> None:
    # Prepare: north's round-2 reply named its round-1 entry (a charge counted twice, round 2 never charged)
    entries = _build(tmp_path, {"north": [1, 3], "south": [1, 2, 3]})
    received = _honest({"south": entries["south"]})
    for r, got in received.items():
        got["north"] = [_fit(entry_hash(entries["north"][0 if r in (1, 2) else 1]))]
    _sign_heads(tmp_path, entries, received)
    # Execute
    finding = _the_tampering(tmp_path)
    # Assert
    assert (finding.partner, finding.round, finding.line) == ("north", 2, 1)
    assert "is of round 1" in finding.message


@pytest.mark.parametrize("received", [
    {"round": 1},  # not a list
    [{"round": "1", "partners": {}}],
    [{"round": 1, "partners": {"north": {"reply": "fit", "hash": "ab" * 32}}}],  # not a list
    [{"round": 1, "partners": {"north": [None]}}],
    [{"round": 1, "partners": {"north": [{"reply": "fit", "hash": "zz" * 32}]}}],
    [{"round": 1, "partners": {"north": [{"reply": "popularity", "hash": "ab" * 32}]}}],  # no such reply
    [{"round": 1, "partners": {"east": [{"reply": "fit", "hash": "ab" * 32}]}}],  # a partner without a head
])
def test_a_signed_but_malformed_per_round_record_is_tampering(tmp_path: Path, received: Any) -> None:
    # Prepare: signed by the server's key, so only its shape can be wrong
    entries = _build(tmp_path, {"north": [1, 2, 3]})
    _sign_heads(tmp_path, entries, {})
    doc = json.loads((tmp_path / HEADS).read_text())
    from fedsocial.shared.privacy.records import server_key, sign_record

    payload = {k: v for k, v in doc.items() if k not in ("record", "version", "server_key_fingerprint", "signature")}
    (tmp_path / HEADS).write_text(json.dumps(sign_record(server_key(tmp_path), "ledger_heads",
                                                         {**payload, "received": received})))
    # Execute
    result = audit_run(tmp_path)
    # Assert
    assert result.exit_code == EXIT_TAMPER
    assert any("malformed received" in f.message for f in result.findings)


def test_the_server_signs_each_round_s_read_releases_dropped_ones_too_and_no_refusal(tmp_path: Path) -> None:
    # Prepare: a DP run of 3 partners; partner-2 refuses round 2 (budget) and claims an over-cap epsilon in
    # round 3 (dropped, but read: the release left the partner)
    cfg = Config().replace("federation", partners=3, min_partners=2, clipping_norm=1.0, rounds=3).replace(
        "privacy", enabled=True, max_epsilon=8.0, target_delta=1e-5)
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=_registrations(3))
    zero = [np.zeros_like(a) for a in INITIAL]

    def acc(r: int, n: int, **over: Any) -> dict[str, Any]:
        return {"round": r, "epsilon": 1.0 * r, "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.1,
                "steps": 10, "max_grad_norm": 0.1, "ledger_round": r, "ledger_head": f"{r}{n}" * 32, **over}

    # Execute: three rounds as Flower drives them (fit, then the evaluation that closes the round)
    for r in (1, 2, 3):
        replies = [_fit_reply(n, _direction(n), 10, **acc(r, n)) for n in (0, 1)]
        if r == 1:
            replies.append(_fit_reply(2, _direction(2), 10, **acc(r, 2)))
        elif r == 2:
            replies.append(_fit_reply(2, zero, 0, round=2, budget_exhausted=1, epsilon=7.9, delta=1e-5))
        else:
            replies.append(_fit_reply(2, _direction(2), 10, **acc(r, 2, epsilon=9.5)))
        strategy.aggregate_fit(r, replies, [])  # type: ignore[arg-type]
        strategy.aggregate_evaluate(r, [], [])
    # Assert: the signed heads list per round the entry each taken reply named, and rounds.jsonl says the same
    doc = json.loads((tmp_path / HEADS).read_text())
    assert doc["received"] == [
        {"round": 1, "partners": {f"partner-{n}": [_fit(f"1{n}" * 32)] for n in (0, 1, 2)}},
        {"round": 2, "partners": {f"partner-{n}": [_fit(f"2{n}" * 32)] for n in (0, 1)}},
        {"round": 3, "partners": {f"partner-{n}": [_fit(f"3{n}" * 32)] for n in (0, 1, 2)}},
    ]
    assert doc["heads"]["partner-2"] == {"round": 3, "hash": "32" * 32}
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [sorted(r["received"]) for r in rounds] == [["partner-0", "partner-1", "partner-2"],
                                                       ["partner-0", "partner-1"],
                                                       ["partner-0", "partner-1", "partner-2"]]
    assert rounds[2]["accepted"] == ["partner-0", "partner-1"] and rounds[2]["epsilon"]["partner-2"] == 9.5
    assert strategy.partners["partner-2"]["epsilon"] == 9.5  # what metrics.json publishes: the release it read


@pytest.mark.parametrize("why", ["over the clipping norm", "over its cap"])
def test_a_reply_the_server_read_and_dropped_is_still_a_release_its_ledger_must_charge(
        tmp_path: Path, why: str) -> None:
    # Regression: a reply dropped after the server decoded it was in no round's record, so a ledger that left
    # its charge out audited clean although the release had left the partner.
    # Prepare: two partners; in round 2 partner-1's reply is read and dropped, and names an entry its ledger
    # never appended (the ledger charges rounds 1 and 3 only)
    cfg = Config().replace("federation", partners=2, min_partners=1, clipping_norm=1.0, rounds=3).replace(
        "privacy", enabled=True, max_epsilon=8.0, target_delta=DELTA)
    entries = _build(tmp_path, {"partner-0": [1, 2, 3], "partner-1": [1, 3]})
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=_registrations(2))
    missing = "ab" * 32

    def acc(pid: str, r: int) -> dict[str, Any]:
        es = {e["round"]: e for e in entries[pid]}
        head = entry_hash(es[r]) if r in es else missing
        return {"epsilon": 1.0 * r, "delta": DELTA, "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20,
                "max_grad_norm": 0.1, "ledger_round": r, "ledger_head": head}

    # Execute: three rounds; partner-1's round-2 update is ten times the clipping norm, or claims epsilon 9.5
    for r in (1, 2, 3):
        bad = r == 2 and why == "over the clipping norm"
        over = {"epsilon": 9.5} if r == 2 and why == "over its cap" else {}
        replies = [_fit_reply(0, _direction(0), 10, round=r, **acc("partner-0", r)),
                   _fit_reply(1, [10 * a for a in _direction(1)] if bad else _direction(1), 10, round=r,
                              **{**acc("partner-1", r), **over})]
        strategy.aggregate_fit(r, replies, [])  # type: ignore[arg-type]
        strategy.aggregate_evaluate(r, [], [])
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert rounds[1]["accepted"] == ["partner-0"] and rounds[1]["dropped"][0]["partner"] == "partner-1"

    # Assert: the audit names the round the server read but the ledger never charged
    finding = _the_tampering(tmp_path)
    assert finding.partner == "partner-1" and finding.round == 2
    assert "no such entry" in finding.message


def test_under_dp_evaluation_releases_a_released_evaluation_without_its_charge_is_not_published(
        tmp_path: Path) -> None:
    # Prepare: a DP run with DP evaluation releases (eval_noise_multiplier > 0); partner-0 and partner-1 send
    # released metrics naming the ledger entry that charges them, partner-2 sends released metrics with none
    from fedsocial.shared import protocol
    from tests.test_wire_robustness import _eval

    cfg = Config().replace("federation", partners=3, min_partners=2, clipping_norm=1.0,
                           eval_noise_multiplier=2.0).replace("privacy", enabled=True)
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, INITIAL, registrations=_registrations(3, 100))
    charged = [_eval(n, **{"epsilon": 1.0, "ledger_round": 1, "ledger_head": f"e{n}" * 32}) for n in (0, 1)]
    uncharged = _eval(2, **{"ndcg@10": 0.9})
    assert not isinstance(protocol.parse_eval_report(uncharged[1].metrics, 1), protocol.Rejected)
    # Execute
    _, agg = strategy.aggregate_evaluate(1, [*charged, uncharged], [])  # type: ignore[arg-type]
    # Assert: (was: averaged in and published, a release no ledger charged); the charged ones are signed as received
    record = strategy.history[-1]
    assert sorted(record["partners"]) == ["partner-0", "partner-1"] and agg["ndcg@10"] == pytest.approx(0.2)
    (dropped,) = record["eval_dropped"]
    assert dropped["partner"] == "partner-2" and "without the accounting" in dropped["reason"]
    doc = json.loads((tmp_path / HEADS).read_text())
    assert doc["received"] == [{"round": 1, "partners": {f"partner-{n}": [{"reply": "evaluation", "hash": f"e{n}" * 32}]
                                                         for n in (0, 1)}}]


def _popularity_run(run: Path, north_charges_popularity: bool, signed_names: bool = True) -> None:
    """Two partners' ledgers of rounds 1-3 and a model with the DP popularity prior (``item_pop``) that the
    signed heads name (with its parameter names unless ``signed_names`` is false, as before they were signed);
    south charges its round-1 popularity release, north only if told to."""
    from fedsocial.server.checkpoint import Checkpoint, save_checkpoint

    entries = {}
    for pid in ("north", "south"):
        key, pub = signing.generate_keypair()
        signing.save_public_key(pub, run / "ledgers" / f"{pid}.pub")
        ledger = Ledger(run / "ledgers" / f"{pid}.jsonl", key, pid)
        for r in (1, 2, 3):
            if r == 1 and (pid == "south" or north_charges_popularity):
                ledger.append_round(round=1, noise_multiplier=2.0, sample_rate=1.0, steps=1, max_grad_norm=1.0,
                                    target_delta=DELTA, population=USERS, secure_rng=False,
                                    extra={"scope": "joint", "release": "popularity"})
            ledger.append_round(round=r, noise_multiplier=1.1, sample_rate=0.05, steps=20, max_grad_norm=0.1,
                                target_delta=DELTA, population=USERS, secure_rng=False, extra={"scope": "joint"})
        entries[pid] = [e for e in read_ledger(ledger.path) if e.get("release", "training") == "training"]
    cfg = config_from_dict({"privacy": {"enabled": True, "max_epsilon": 8.0, "target_delta": DELTA}})
    write_run_manifest(run, cfg, {pid: {"num_users": USERS, "max_epsilon": 8.0, "target_delta": DELTA}
                                  for pid in entries})
    names, arrays = [*MODEL_NAMES, "item_pop"], [*model_arrays(), np.full(4, 0.25)]
    save_checkpoint(run, Checkpoint(3, names, arrays, {}))
    heads = {pid: {"round": 3, "hash": entry_hash(es[-1])} for pid, es in entries.items()}
    history = [{"round": r, "received": {pid: [_fit(entry_hash(es[r - 1]))] for pid, es in entries.items()}}
               for r in (1, 2, 3)]
    write_signed_heads(run, 3, heads, compute_params_sha256(names, arrays), compute_received(history),
                       names if signed_names else None)


def test_a_model_with_the_popularity_prior_needs_each_round_1_partner_s_popularity_charge(tmp_path: Path) -> None:
    # Prepare: two copies, north charging its popularity release in one only
    honest, cut = tmp_path / "honest", tmp_path / "cut"
    _popularity_run(honest, north_charges_popularity=True)
    _popularity_run(cut, north_charges_popularity=False)
    # Execute
    clean, found = audit_run(honest), audit_run(cut)
    # Assert: (was: exit 0 for both) the histogram north sent with round 1 is in the model, uncharged
    assert clean.exit_code == EXIT_OK, [str(f) for f in clean.findings]
    assert clean.records["popularity_prior"] is True
    assert found.exit_code == EXIT_TAMPER
    (finding,) = [f for f in found.findings if f.severity == "tamper"]
    assert (finding.partner, finding.round) == ("north", 1) and "no popularity release" in finding.message


@pytest.mark.parametrize("signed_names", [True, False])
def test_removing_the_checkpoint_does_not_hide_an_uncharged_popularity_release(tmp_path: Path,
                                                                            signed_names: bool) -> None:
    # Prepare: north's popularity release uncharged, and the model's checkpoint deleted (a warning only)
    _popularity_run(tmp_path, north_charges_popularity=False, signed_names=signed_names)
    (tmp_path / "checkpoints" / "round_0003.npz").unlink()
    # Execute
    result = audit_run(tmp_path)
    # Assert: the heads sign the parameter names, so the prior is known without the checkpoint; heads of the
    # first form (no names) leave it unknown, which the missing-checkpoint warning says
    tampered = [f for f in result.findings if f.severity == "tamper" and "no popularity release" in f.message]
    assert any("no checkpoints/round_0003.npz" in f.message for f in result.findings if f.severity == "warning")
    if signed_names:
        assert result.exit_code == EXIT_TAMPER and [(f.partner, f.round) for f in tampered] == [("north", 1)]
    else:
        assert result.exit_code == EXIT_OK and not tampered


def test_an_evaluation_release_charged_by_the_round_s_training_entry_is_tampering(tmp_path: Path) -> None:
    # Prepare: north's released evaluation of round 3 named its round-3 training entry (right round, wrong kind:
    # the evaluation release itself was never charged; was: exit 0)
    entries = _build(tmp_path, {"north": [1, 2, 3], "south": [1, 2, 3]})
    received = _honest(entries)
    received[3]["north"].append({"reply": "evaluation", "hash": entry_hash(entries["north"][2])})
    _sign_heads(tmp_path, entries, received)
    # Execute
    finding = _the_tampering(tmp_path)
    # Assert
    assert (finding.partner, finding.round, finding.line) == ("north", 3, 3)
    assert "named a 'training' entry as its charge" in finding.message


def test_the_first_form_of_the_record_bare_hashes_is_still_checked(tmp_path: Path) -> None:
    # Prepare: heads whose received lists bare hashes (written before the reply kinds were recorded), north's
    # round-2 hash not in its ledger
    entries = _build(tmp_path, {"north": [1, 3]})
    _sign_heads(tmp_path, entries, {})
    doc = json.loads((tmp_path / HEADS).read_text())
    from fedsocial.shared.privacy.records import server_key, sign_record

    payload = {k: v for k, v in doc.items() if k not in ("record", "version", "server_key_fingerprint", "signature")}
    bare = [{"round": 1, "partners": {"north": [entry_hash(entries["north"][0])]}},
            {"round": 2, "partners": {"north": ["2e" * 32]}}]
    (tmp_path / HEADS).write_text(json.dumps(sign_record(server_key(tmp_path), "ledger_heads",
                                                         {**payload, "received": bare})))
    # Execute
    finding = _the_tampering(tmp_path)
    # Assert: round 1 verifies, round 2's release is uncharged
    assert (finding.partner, finding.round) == ("north", 2) and "release went uncharged" in finding.message
