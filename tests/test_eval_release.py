"""Only what the guarantee covers leaves a partner's evaluation (issue 11 item 6).

Under DP the default keeps the metrics on the partner; with ``federation.eval_noise_multiplier`` the
partner releases the Gaussian mechanism on the metric sums and the count (L2 sensitivity sqrt(7)),
charged in its ledger as one sampled-Gaussian step at rate 1 that the audit recomputes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedsocial.client.partner import Partner, PartnerError, settings_from_context
from fedsocial.shared.privacy.accounting import compute_epsilon
from fedsocial.shared.privacy.audit import EXIT_OK, audit_run
from fedsocial.shared.privacy.evaluation import (
    EVAL_METRIC_KEYS,
    EVAL_SENSITIVITY,
    RELEASED_KEYS,
    compute_noisy_release,
    compute_pooled_metrics,
)
from fedsocial.shared.privacy.ledger import read_ledger
from fedsocial.shared.protocol import EVAL_KEPT_KEYS, EvalReport, parse_eval_report
from fedsocial.simulations.simulate import write_config
from tests.server_records import sign_server_records
from tests.test_federation import tiny_config


def test_one_user_moves_the_released_vector_by_at_most_the_sensitivity() -> None:
    # Property, brute force: any user's six metrics in [0, 1] plus their count of 1, removed from any data set
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 50))
        per_user = rng.random((n, len(EVAL_METRIC_KEYS))) * (rng.random((n, 1)) < 0.7)
        per_user[rng.integers(n)] = rng.choice([0.0, 1.0], len(EVAL_METRIC_KEYS))  # extremes too
        full = np.append(per_user.sum(0), n)
        for u in range(n):
            without = np.append(np.delete(per_user, u, 0).sum(0), n - 1)
            assert np.linalg.norm(full - without) <= EVAL_SENSITIVITY + 1e-12
    assert math.isclose(EVAL_SENSITIVITY, math.sqrt(7))


def test_noise_has_the_calibrated_scale_and_the_release_is_post_processed_into_range() -> None:
    # Prepare: a partner of 1000 users with known means; sigma 0.5 -> noise std 0.5 * sqrt(7) per sum
    metrics = dict(zip(EVAL_METRIC_KEYS, (0.2, 0.1, 0.3, 0.25, 0.12, 0.4), strict=True))
    rng = np.random.default_rng(1)
    # Execute
    draws = [compute_noisy_release(metrics, 1000, 0.5, 5000, rng) for _ in range(4000)]
    capped = [compute_noisy_release(metrics, 1000, 0.5, 1000, rng)[1] for _ in range(200)]
    # Assert: the count's spread is sigma * sqrt(7) (rounding adds 1/12); every released mean in [0, 1]
    counts = np.array([c for _, c in draws], dtype=float)
    assert counts.std() == pytest.approx(math.sqrt((0.5 * math.sqrt(7)) ** 2 + 1 / 12), rel=0.05)
    assert counts.mean() == pytest.approx(1000, abs=0.1)
    assert max(capped) <= 1000  # never above the declared (public) user count
    ndcg = np.array([m["ndcg@10"] for m, _ in draws])
    assert ndcg.mean() == pytest.approx(0.1, abs=2e-3)
    assert all(0.0 <= v <= 1.0 for m, _ in draws for v in m.values())
    tiny = [compute_noisy_release(metrics, 3, 5.0, 3, rng) for _ in range(200)]
    assert all(0.0 <= v <= 1.0 for m, _ in tiny for v in m.values()) and all(0 <= c <= 3 for _, c in tiny)


def test_a_kept_evaluation_carries_only_the_round_and_the_partner_id() -> None:
    kept = EvalReport(3, "partner-1", 0, {}, released=False).to_metrics()
    assert set(kept) == EVAL_KEPT_KEYS == RELEASED_KEYS["local"]
    parsed = parse_eval_report(kept, 3)
    assert isinstance(parsed, EvalReport) and parsed.released is False
    assert not isinstance(parse_eval_report({**kept, "ndcg@10": 0.3}, 3), EvalReport)  # nothing else may ride along


def _partner(tmp_path: Path, **federation: float) -> Partner:
    cfg = tiny_config(**federation)
    config = write_config(cfg, tmp_path / "run")
    return Partner(settings_from_context({"config-path": str(config), "run-dir": str(tmp_path / "run")},
                                         {"partition-id": 0, "num-partitions": 3}))


def test_under_dp_the_default_keeps_the_evaluation_and_the_training_loss_on_the_partner(tmp_path: Path) -> None:
    partner = _partner(tmp_path)
    _, initial = partner.initial_parameters()
    new, _, fit_metrics = partner.fit(initial, 1)

    sent, n = partner.evaluate(new, 1)

    assert (sent, n) == (None, 0)
    assert not {"train_loss", "fit_time_s"} & set(fit_metrics)  # data-dependent, not covered: kept local
    kept_fit = json.loads((partner.settings.state_dir / "fit" / "round_0001.json").read_text())
    assert math.isfinite(kept_fit["train_loss"]) and kept_fit["fit_time_s"] > 0
    local = json.loads((partner.settings.state_dir / "eval" / "round_0001.json").read_text())
    assert set(EVAL_METRIC_KEYS) <= set(local) and local["evaluated_users"] > 0
    assert (partner.settings.state_dir / "eval" / "round_0001.json").stat().st_mode & 0o077 == 0
    assert len(read_ledger(tmp_path / "run" / "ledgers" / "partner-0.jsonl")) == 1  # nothing released, nothing charged


def test_a_dp_evaluation_is_charged_in_the_ledger_recomputed_by_the_audit_and_resent_on_a_rerun(
    tmp_path: Path
) -> None:
    # Prepare
    partner = _partner(tmp_path, eval_noise_multiplier=4.0)
    _, initial = partner.initial_parameters()
    new, _, fit_metrics = partner.fit(initial, 1)
    plan = partner.privacy_plan()
    # Execute
    sent, n = partner.evaluate(new, 1)
    again = partner.evaluate(new, 1)  # a re-run of the round (crash after the release)
    # Assert: one evaluation entry (sigma, 1, 1) after the training entry; the same release re-sent
    entries = read_ledger(tmp_path / "run" / "ledgers" / "partner-0.jsonl")
    assert [(e["round"], e.get("release", "training")) for e in entries] == [(1, "training"), (1, "evaluation")]
    ev = entries[1]
    assert (ev["noise_multiplier"], ev["sample_rate"], ev["steps"]) == (4.0, 1.0, 1)
    assert ev["max_grad_norm"] == pytest.approx(math.sqrt(7))
    expected = compute_epsilon([plan.event, (4.0, 1.0, 1)], 1e-4)
    assert ev["epsilon_rdp"] == pytest.approx(expected, rel=1e-9) and ev["epsilon_rdp"] > fit_metrics["epsilon"]
    assert sent is not None and set(sent) == set(EVAL_METRIC_KEYS) and 0 <= n <= partner.num_users
    assert again == (sent, n)
    sign_server_records(tmp_path / "run", {"partner-0": {"num_users": partner.num_users, "max_epsilon": 50.0,
                                                         "target_delta": 1e-4}}, max_epsilon=50.0)
    result = audit_run(tmp_path / "run")
    assert result.exit_code == EXIT_OK, [str(f) for f in result.findings]
    assert result.partners[0].epsilon == pytest.approx(expected, rel=1e-9) and result.partners[0].eval_releases == 1
    # the next round's training composes on top of the evaluation release
    partner.fit(new, 2)
    last = read_ledger(tmp_path / "run" / "ledgers" / "partner-0.jsonl")[-1]
    assert last["epsilon_rdp"] == pytest.approx(compute_epsilon([plan.event, (4.0, 1.0, 1), plan.event], 1e-4),
                                                rel=1e-9)


def test_a_dp_evaluation_is_released_only_for_a_planned_round_the_partner_has_reached(tmp_path: Path) -> None:
    # Prepare: 2 rounds planned with eval_every 2 (one planned release, after round 2); round 1 trained
    partner = _partner(tmp_path, eval_noise_multiplier=4.0, eval_every=2)
    ledger = tmp_path / "run" / "ledgers" / "partner-0.jsonl"
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)

    # Execute / Assert: round 1 is no evaluation round: refused, nothing charged
    with pytest.raises(PartnerError, match="round 1, which the plan does not evaluate"):
        partner.evaluate(new, 1)
    # round 2 is, but this partner has not been asked to fit it: kept local, nothing charged (a release
    # there would have refused its round-2 training: the ledger's rounds only increase)
    assert partner.evaluate(new, 2) == (None, 0)
    assert [e.get("release", "training") for e in read_ledger(ledger)] == ["training"]
    # after its fit of round 2 the planned release goes out, charged once
    second, _, _ = partner.fit(new, 2)
    sent, _ = partner.evaluate(second, 2)
    assert sent is not None
    assert [(e["round"], e.get("release", "training")) for e in read_ledger(ledger)] == [
        (1, "training"), (2, "training"), (2, "evaluation")]


def test_an_evaluation_asked_after_a_later_release_draws_nothing(tmp_path: Path) -> None:
    # Regression (adversarial review): the evaluation of round 1 asked after the fit of round 2 drew and saved a
    # noisy release, which the ledger then refused (a raw LedgerError): a drawn, uncharged release on disk
    partner = _partner(tmp_path, eval_noise_multiplier=4.0, eval_every=1)
    ledger = tmp_path / "run" / "ledgers" / "partner-0.jsonl"
    _, initial = partner.initial_parameters()
    first, _, _ = partner.fit(initial, 1)
    partner.fit(first, 2)
    # Execute
    kept = partner.evaluate(first, 1)
    # Assert: kept local, nothing drawn, saved or charged
    assert kept == (None, 0)
    from fedsocial.shared.privacy.evaluation import EVAL_RELEASES

    assert not (partner.settings.state_dir / EVAL_RELEASES / "round_0001.json").exists()
    assert [(e["round"], e.get("release", "training")) for e in read_ledger(ledger)] == [
        (1, "training"), (2, "training")]


def test_pooled_metrics_weight_partners_by_their_users() -> None:
    evals = {"a": {**dict.fromkeys(EVAL_METRIC_KEYS, 0.2), "evaluated_users": 30},
             "b": {**dict.fromkeys(EVAL_METRIC_KEYS, 0.6), "evaluated_users": 10}}
    assert compute_pooled_metrics(evals)["ndcg@10"] == pytest.approx(0.3)


def test_partner_scope_releases_the_dp_models_metrics_never_the_personalised_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: partner scope serves a model that also learnt from every user's data without DP, so one
    # user can move many users' metrics: a Gaussian release with sensitivity sqrt(7) must be computed
    # from the DP model's metrics (each user's own), never from the served model's
    import fedsocial.shared.privacy.evaluation as evaluation

    seen: list[dict[str, float]] = []
    real = evaluation.compute_noisy_release

    def spy(metrics: dict[str, float], *args: object, **kwargs: object) -> object:
        seen.append(dict(metrics))
        return real(metrics, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluation, "compute_noisy_release", spy)
    cfg = tiny_config(eval_noise_multiplier=4.0, rounds=1).replace("privacy", scope="partner")
    config = write_config(cfg, tmp_path / "run")
    partner = Partner(settings_from_context({"config-path": str(config), "run-dir": str(tmp_path / "run")},
                                            {"partition-id": 0, "num-partitions": 3}))
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)
    trainer, _ = partner._prepared_trainer(new, 1)
    trainer.refit_local()
    dp_model, _ = trainer.evaluate("test")
    # Execute
    partner.evaluate(new, 1)
    # Assert
    assert len(seen) == 1
    assert seen[0] == pytest.approx({k: float(dp_model[k]) for k in EVAL_METRIC_KEYS})
    served = json.loads((partner.settings.state_dir / "eval" / "round_0001.json").read_text())
    record = json.loads((partner.settings.state_dir / "personal" / "round_0001.json").read_text())
    assert record["choice"] != "shared"  # precondition: the served model is a non-DP one here (seeded)
    assert served["ndcg@10"] != pytest.approx(dp_model["ndcg@10"])  # so the release could tell them apart


def test_a_calibrated_noise_leaves_room_for_every_planned_evaluation_release(tmp_path: Path) -> None:
    # Regression: the calibration spent the whole cap on training, so every DP evaluation was refused
    # Prepare: 2 rounds, evaluation after each, calibrated training noise (noise_multiplier 0), cap 12
    cfg = tiny_config(eval_noise_multiplier=3.0, eval_every=1).replace("privacy", noise_multiplier=0.0,
                                                                      max_epsilon=12.0)
    run = tmp_path / "run"
    partner = Partner(settings_from_context({"config-path": str(write_config(cfg, run)), "run-dir": str(run)},
                                            {"partition-id": 0, "num-partitions": 3}))
    _, params = partner.initial_parameters()
    # Execute: train and evaluate both rounds
    released = []
    for r in (1, 2):
        params, _, _ = partner.fit(params, r)
        released.append(partner.evaluate(params, r)[0])
    # Assert: both releases left and were charged; the last entry is within the cap, close to it
    entries = read_ledger(run / "ledgers" / "partner-0.jsonl")
    assert [e.get("release", "training") for e in entries] == ["training", "evaluation"] * 2
    assert all(r is not None for r in released)
    assert 12.0 * 0.98 < entries[-1]["epsilon_rdp"] <= 12.0


@pytest.mark.slow  # runs a federation
def test_the_last_rounds_evaluation_release_is_in_the_signed_heads_and_the_run_epsilon(tmp_path: Path) -> None:
    # Regression: the evaluation reply named no ledger entry, so the server's signed heads stopped at the
    # training entry: the last round's evaluation entries could be cut from every ledger and the audit
    # passed (exit 0), and metrics.json and the summary reported the epsilon before that release.
    # Prepare: 2 partners, 1 round, a DP evaluation release after it
    from fedsocial.shared.privacy.ledger import entry_hash
    from fedsocial.shared.privacy.records import HEADS
    from fedsocial.simulations.simulate import run_simulation_from_config

    cfg = tiny_config(partners=2, rounds=1, eval_noise_multiplier=4.0, server_noise_multiplier=0.0)
    run = tmp_path / "run"
    # Execute
    doc = run_simulation_from_config(cfg, None, run, progress=False)
    ledgers = {p: read_ledger(run / "ledgers" / f"{p}.jsonl") for p in ("partner-0", "partner-1")}
    heads = json.loads((run / HEADS).read_text())["heads"]
    intact = audit_run(run)
    for pid in ledgers:  # cut the evaluation entry (the last line) from every ledger
        path = run / "ledgers" / f"{pid}.jsonl"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    cut = audit_run(run)
    # Assert
    for pid, entries in ledgers.items():
        assert [e.get("release", "training") for e in entries] == ["training", "evaluation"]
        assert heads[pid] == {"round": 1, "hash": entry_hash(entries[-1])}
    assert doc["epsilon"] == pytest.approx(max(e[-1]["epsilon_rdp"] for e in ledgers.values()), rel=1e-12)
    assert doc["epsilon"] > max(e[0]["epsilon_rdp"] for e in ledgers.values())
    assert intact.exit_code == EXIT_OK, [str(f) for f in intact.findings]
    assert cut.exit_code == 3 and {f.partner for f in cut.findings if f.severity == "tamper"} == set(ledgers)
