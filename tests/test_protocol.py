"""shared/protocol.py: typed reports both sides use; parsing returns a report or every problem, never raises."""

from __future__ import annotations

import math

import pytest

from fedsocial.shared import protocol
from fedsocial.shared.protocol import (
    EvalAccounting,
    EvalReport,
    FitAccounting,
    FitReport,
    Registration,
    Rejected,
    parse_eval_report,
    parse_fit_report,
    parse_intent,
    parse_registration,
)

HEAD = "ab" * 32
ACC = FitAccounting(epsilon=1.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.25, steps=8, max_grad_norm=0.1,
                    ledger_round=3, ledger_head=HEAD)
EVAL_ACC = EvalAccounting(epsilon=1.6, ledger_round=3, ledger_head=HEAD)


def _fit(**over: object) -> dict[str, object]:
    m = FitReport(3, "partner-0", ("item_emb", "item_bias"), 120, False, 0.69, 1.2, 1.5, 1e-5, ACC).to_metrics()
    m.update(over)
    return m


def _eval(**over: object) -> dict[str, object]:
    m = EvalReport(3, "partner-0", 40, dict.fromkeys(protocol.METRIC_KEYS, 0.25), 0.5, accounting=EVAL_ACC).to_metrics()
    m.update(over)
    return m


def test_reports_round_trip_through_their_metrics() -> None:
    # Prepare: one report of each kind, as a partner builds them
    reg = Registration("partner-0", ("item_emb", "item_bias"), 120, 8.0, 1e-5)
    shaped = Registration("partner-0", ("item_emb", "scale"), 120, 8.0, 1e-5, ((400, 16), ()))
    fit = FitReport(3, "partner-0", ("item_emb", "item_bias"), 120, False, 0.69, 1.2, 1.5, 1e-5, ACC)
    refusal = FitReport(3, "partner-0", ("item_emb",), 120, True, epsilon=7.9, delta=1e-5)
    ev = EvalReport(3, "partner-0", 40, dict.fromkeys(protocol.METRIC_KEYS, 0.25), 0.5)
    dp_ev = EvalReport(3, "partner-0", 40, dict.fromkeys(protocol.METRIC_KEYS, 0.25), 0.5, accounting=EVAL_ACC)

    # Execute / Assert: the server's parser gives back the very report
    assert parse_registration(reg.to_metrics()) == reg
    assert parse_registration(shaped.to_metrics()) == shaped
    assert parse_fit_report(fit.to_metrics(), 3) == fit
    assert parse_fit_report(refusal.to_metrics(), 3) == refusal
    assert parse_eval_report(ev.to_metrics(), 3) == ev
    assert parse_eval_report(dp_ev.to_metrics(), 3) == dp_ev
    intent = protocol.Intent("partner-0", 3, False)
    assert parse_intent(intent.to_metrics(), 3) == intent


def test_key_sets_are_the_reports_fields() -> None:
    assert set(_fit()) == protocol.FIT_METRIC_KEYS
    assert set(_eval()) == protocol.EVAL_METRIC_KEYS
    assert {"partner_id", "param_names", "num_users", "max_epsilon", "target_delta",
            "param_shapes"} == protocol.REGISTRATION_KEYS


@pytest.mark.parametrize(("over", "problem"), [
    ({"epsilon": "abc"}, "epsilon"),
    ({"budget_exhausted": "yes"}, "budget_exhausted"),
    ({"budget_exhausted": True}, "budget_exhausted"),
    ({"round": 2}, "wrong round"),
    ({"round": 3.0}, "wrong round"),
    ({"num_users": 10**400}, "num_users"),
    ({"num_users": 0}, "num_users"),
    ({"steps": 10**400}, "steps"),  # above the ledger's plausible 10^9: no DP-SGD round anyone ran
    ({"steps": 10**9}, None),
    ({"noise_multiplier": 1e-300}, "noise_multiplier"),
    ({"epsilon": 1e308}, "epsilon"),
    ({"fit_time_s": 1e308}, "fit_time_s"),  # summed over rounds it would be infinite in metrics.json
    ({"ledger_round": 2}, "ledger_round"),  # a stale accounting: the entry charging round 3 is round 3's
    ({"ledger_round": 10**400}, "ledger_round"),
    ({"budget_exhausted": 1}, "a refusal releases nothing"),
    ({"noise_multiplier": math.nan}, "noise_multiplier"),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"delta": 0.0}, "delta"),
    ({"ledger_head": "zz"}, "ledger_head"),
    ({"partner_id": "../../etc"}, "partner_id"),
    ({"param_names": "a,a"}, "param_names"),
    ({"train_loss": math.inf}, "train_loss"),
    ({"user_ids": "1,2,3"}, "outside the protocol"),
])
def test_each_bad_fit_field_is_named(over: dict[str, object], problem: str | None) -> None:
    parsed = parse_fit_report(_fit(**over), 3)

    if problem is None:
        assert isinstance(parsed, FitReport)
    else:
        assert isinstance(parsed, Rejected) and problem in str(parsed)


def test_missing_accounting_fields_reject_the_reply() -> None:
    m = _fit()
    del m["steps"]
    parsed = parse_fit_report(m, 3)
    assert isinstance(parsed, Rejected) and "steps" in str(parsed)


@pytest.mark.parametrize("bad", [math.nan, 1e9, -0.1, "0.3", None, True])
def test_an_evaluation_metric_outside_0_1_is_never_accepted(bad: object) -> None:
    parsed = parse_eval_report(_eval(**{"ndcg@10": bad}), 3)
    assert isinstance(parsed, Rejected) and "ndcg@10" in str(parsed)


def test_an_evaluation_missing_a_metric_is_rejected() -> None:
    m = _eval()
    del m["hr@20"]
    parsed = parse_eval_report(m, 3)
    assert isinstance(parsed, Rejected) and "hr@20" in str(parsed)


@pytest.mark.parametrize(("over", "problem"), [
    ({"ledger_round": 2}, "ledger_round"), ({"ledger_head": "x"}, "ledger_head"), ({"epsilon": math.inf}, "epsilon")])
def test_an_evaluation_accounting_that_is_incomplete_bad_or_of_another_round_is_rejected(
        over: dict[str, object], problem: str) -> None:
    incomplete = _eval()
    del incomplete["ledger_head"]
    assert isinstance(parse_eval_report(incomplete, 3), Rejected)
    parsed = parse_eval_report(_eval(**over), 3)
    assert isinstance(parsed, Rejected) and problem in str(parsed)


def test_registration_bounds_the_declared_user_count() -> None:
    ok = {"partner_id": "p1", "param_names": "a,b", "num_users": 10}
    assert isinstance(parse_registration(ok), Registration)
    for bad in (0, -5, 10**10, 1.5, "10", True):
        parsed = parse_registration({**ok, "num_users": bad})
        assert isinstance(parsed, Rejected) and "num_users" in str(parsed)


def test_parsers_report_every_problem_at_once() -> None:
    parsed = parse_fit_report({"round": "x", "epsilon": "abc"}, 3)
    assert isinstance(parsed, Rejected)
    text = str(parsed)
    for key in ("round", "partner_id", "param_names", "num_users", "budget_exhausted", "epsilon"):
        assert key in text


def test_the_protocols_plausible_ranges_are_the_ledgers() -> None:
    # the protocol mirrors them (importing the ledger would load the accountant in every partner message)
    from fedsocial.shared.privacy import ledger

    assert (protocol.MIN_NOISE_MULTIPLIER, protocol.MAX_NOISE_MULTIPLIER, protocol.MAX_STEPS, protocol.MAX_ROUND,
            protocol.MAX_GRAD_NORM, protocol.MAX_EPSILON) == (
        ledger.MIN_NOISE_MULTIPLIER, ledger.MAX_NOISE_MULTIPLIER, ledger.MAX_STEPS, ledger.MAX_ROUND,
        ledger.MAX_GRAD_NORM, ledger.MAX_EPSILON)
