"""The DP selection of the served model in joint scope (shared/privacy/selection.py): sensitivity, noise,
choice, accounting, charged once at every crash point, served by recommend/serve, off changes nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsocial.client import partner as partner_module
from fedsocial.client.partner import PartnerError
from fedsocial.shared.config import ConfigError, config_from_dict
from fedsocial.shared.metrics import evaluate_model, evaluate_model_per_user
from fedsocial.shared.models.prior import PriorRanking
from fedsocial.shared.privacy import selection
from fedsocial.shared.privacy.accounting import compute_epsilon
from fedsocial.shared.privacy.audit import EXIT_OK, audit_run
from fedsocial.shared.privacy.round import compute_federation_prefix
from fedsocial.shared.privacy.selection import (
    DEFAULT_SELECTION_CANDIDATES,
    SELECTION_CANDIDATES,
    SelectionError,
    compute_noisy_choice,
    compute_noisy_differences,
    compute_selection_differences,
    compute_selection_sensitivity,
    compute_selection_sums,
    load_selection_release,
    read_served_choice,
    selection_charges,
    uses_selection_release,
    write_served_choice,
)
from fedsocial.shared.serving import Recommender
from fedsocial.shared.trainer import LocalTrainer
from fedsocial.simulations.preflight import check_reachable_budget
from tests.partner_run import ledger_of, make_partner
from tests.server_records import sign_server_records
from tests.test_federation import tiny_config

SIGMA = 2.0


def selection_config(sigma: float = SIGMA, **federation: Any) -> Any:
    return tiny_config(rounds=1, **federation).replace("privacy", selection_noise_multiplier=sigma)


def kinds(entries: list[dict[str, Any]]) -> list[str]:
    return [e.get("release", "training") for e in entries]


# --- the pure mechanism -----------------------------------------------------------------------------

@pytest.mark.parametrize("candidates", [DEFAULT_SELECTION_CANDIDATES, SELECTION_CANDIDATES])
def test_removing_any_one_user_moves_the_differences_by_at_most_sqrt_k_minus_1(candidates: tuple[str, ...]) -> None:
    # Property, brute force: per-user metrics in [0, 1] for each candidate (extremes included), any user removed
    rng = np.random.default_rng(0)
    k = len(candidates)
    sensitivity = compute_selection_sensitivity(candidates)
    worst = 0.0
    for _ in range(1000):
        n = int(rng.integers(1, 40))
        per_user = rng.random((n, k)) * (rng.random((n, 1)) < 0.7)
        per_user[rng.integers(n)] = rng.choice([0.0, 1.0], k)
        if rng.random() < 0.2:  # the extreme user: 0 under the model, 1 under every other candidate
            per_user[rng.integers(n)] = [0.0] + [1.0] * (k - 1)
        full = compute_selection_differences(dict(zip(candidates, per_user.T, strict=True)), candidates)
        for u in range(n):
            rest = np.delete(per_user, u, 0)
            without = compute_selection_differences(dict(zip(candidates, rest.T, strict=True)), candidates)
            worst = max(worst, float(np.linalg.norm(full - without)))
    assert worst <= sensitivity + 1e-12
    assert worst == pytest.approx(math.sqrt(k - 1))  # attained: a user at 0 under the model and 1 under the others
    assert math.isclose(sensitivity, math.sqrt(k - 1))


def test_three_candidates_release_two_differences_with_sigma_sqrt_2_and_choose_the_best() -> None:
    # Prepare: known sums; default_rng(0).normal(0, 1, 2) = [0.12573022, -0.13210486]
    three = ("model", "prior", "product")
    per_user = {"model": np.array([0.5, 0.0]), "prior": np.array([0.25, 0.25]), "product": np.array([1.0, 0.5])}
    # Execute
    d = compute_selection_differences(per_user, three)
    noisy = compute_noisy_differences(d, 2.0, np.random.default_rng(0), three)
    # Assert: differences to the model, noise 2 * sqrt(2) on each, the argmax over [0, noisy...]
    np.testing.assert_allclose(d, [0.0, 1.0])
    np.testing.assert_allclose(noisy, [0.12573022 * 2 * math.sqrt(2), 1.0 - 0.13210486 * 2 * math.sqrt(2)],
                               atol=1e-7)
    assert compute_noisy_choice(noisy, three) == "product"
    assert compute_noisy_choice(np.array([-1.0, -0.5]), three) == "model"
    assert compute_noisy_choice(np.array([0.3, 0.3]), three) == "prior"  # ties to the earlier candidate
    with pytest.raises(ValueError, match="differences"):
        compute_noisy_differences(np.zeros(1), 1.0, np.random.default_rng(0), three)
    with pytest.raises(ValueError, match="candidates"):
        compute_noisy_choice(np.zeros(1), three)


@pytest.mark.parametrize(("text", "message"), [
    ("prior,model", "first"), ("model", "first"), ("model,prior,prior", "first"), ("model,best", "unknown"),
    ("", "unknown")])
def test_the_candidates_setting_is_validated(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"privacy.selection_candidates.*{message}"):
        config_from_dict({"privacy": {"selection_candidates": text}})
    assert selection.parse_selection_candidates(" model, product ") == ("model", "product")


def test_differences_are_the_sums_against_the_first_candidate() -> None:
    per_user = {"model": np.array([0.5, 0.25, 1.0]), "prior": np.array([0.0, 0.75, 1.0])}
    np.testing.assert_allclose(compute_selection_sums(per_user), [1.75, 1.75])
    np.testing.assert_allclose(compute_selection_differences({"model": per_user["model"],
                                                              "prior": np.array([0.0, 0.0, 0.5])}), [-1.25])


def test_sums_refuse_values_the_sensitivity_does_not_cover() -> None:
    with pytest.raises(ValueError, match="outside"):
        compute_selection_sums({"model": np.array([0.5, 1.2]), "prior": np.array([0.1, 0.2])})
    with pytest.raises(ValueError, match="outside"):
        compute_selection_differences({"model": np.array([0.5, np.nan]), "prior": np.array([0.1, 0.2])})
    with pytest.raises(ValueError, match="same users"):
        compute_selection_differences({"model": np.array([0.5]), "prior": np.array([0.1, 0.2])})


def test_noise_known_values_with_a_fixed_generator_and_its_scale() -> None:
    # Known values: default_rng(0).normal(0, 1, 1) = 0.12573022, times sigma 2 x sqrt(2 - 1)
    noisy = compute_noisy_differences(np.array([2.0]), 2.0, np.random.default_rng(0))
    np.testing.assert_allclose(noisy, [2.25146044], rtol=0, atol=1e-8)
    draws = np.stack([compute_noisy_differences(np.zeros(1), 0.5, np.random.default_rng(s)) for s in range(4000)])
    assert draws.std(axis=0) == pytest.approx([0.5], rel=0.05)
    with pytest.raises(ValueError, match="selection_noise_multiplier"):
        compute_noisy_differences(np.zeros(1), 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="differences"):
        compute_noisy_differences(np.zeros(2), 1.0, np.random.default_rng(0))


def test_the_choice_is_the_better_by_the_noisy_difference_ties_to_the_model() -> None:
    assert compute_noisy_choice(np.array([-0.5])) == "model"
    assert compute_noisy_choice(np.array([0.5])) == "prior"
    assert compute_noisy_choice(np.array([0.0])) == "model"
    rng = np.random.default_rng(3)
    for _ in range(200):
        d = rng.normal(0, 5, 1)
        assert compute_noisy_choice(d) == ("prior" if d[0] > 0 else "model")


def test_at_one_epsilon_the_difference_decides_with_half_the_noise_of_two_released_sums() -> None:
    # Brute force over many draws: the two-sums release (sensitivity sqrt 2, noise sigma sqrt 2 on each) against
    # the difference release (sensitivity 1, noise sigma), the same (sigma, 1, 1) event and so the same epsilon
    rng = np.random.default_rng(7)
    sigma, gap, n = 8.0, 6.5, 20000  # LastFM-like: the model ahead by 0.017 NDCG x 380 validation users
    wrong_sums = np.mean(gap + rng.normal(0, sigma * math.sqrt(2), n) - rng.normal(0, sigma * math.sqrt(2), n) < 0)
    wrong_diff = np.mean(gap + rng.normal(0, sigma, n) < 0)
    assert wrong_diff < 0.23 < 0.27 < wrong_sums  # 2 sigma noise: P(N > 6.5/16) = 0.34; sigma: P(N > 6.5/8) = 0.21


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_config_refuses_a_bad_selection_noise_multiplier(value: float) -> None:
    with pytest.raises(ConfigError, match="privacy.selection_noise_multiplier"):
        config_from_dict({"privacy": {"enabled": True, "selection_noise_multiplier": value}})


def test_the_selection_is_made_only_in_joint_scope_under_dp() -> None:
    cfg = selection_config()
    assert uses_selection_release(cfg)
    assert not uses_selection_release(cfg.replace("privacy", scope="partner"))
    assert not uses_selection_release(cfg.replace("privacy", enabled=False))
    assert not uses_selection_release(cfg.replace("privacy", selection_noise_multiplier=0.0))
    assert (SIGMA, 1.0, 1) in compute_federation_prefix(cfg)
    assert compute_federation_prefix(cfg.replace("privacy", selection_noise_multiplier=0.0)) == []


# --- the candidates on constructed models -------------------------------------------------------------

def _trainer(tmp_path: Path) -> LocalTrainer:
    partner = make_partner(tmp_path, selection_config())
    cfg = partner.cfg.replace("privacy", enabled=False)
    return LocalTrainer(cfg, partner.split, device="cpu", seed=1)


def _noisy_choice(trainer: LocalTrainer, sigma: float, seed: int) -> tuple[str, np.ndarray]:
    trainer.refit_local()
    per_user = {"model": evaluate_model_per_user(trainer.model, trainer.split, "val", builder=trainer.builder)[2],
                "prior": evaluate_model_per_user(PriorRanking(trainer.model), trainer.split, "val",
                                                 builder=trainer.builder)[2]}
    differences = compute_selection_differences(per_user)
    return compute_noisy_choice(compute_noisy_differences(differences, sigma, np.random.default_rng(seed))), differences


def test_the_prior_is_chosen_when_the_model_is_much_worse(tmp_path: Path) -> None:
    # Prepare: random, large item and history vectors (the user-item term is noise) and strong popularity biases
    trainer = _trainer(tmp_path)
    m = trainer.model
    counts = np.bincount(trainer.split.train_items, minlength=m.n_items).astype(np.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.item_emb.weight.normal_(0.0, 3.0, generator=gen)
        m.hist_emb.weight.normal_(0.0, 3.0, generator=gen)
        m.item_bias.weight[:, 0] = torch.as_tensor(np.log1p(counts), dtype=torch.float32) / m.model_cfg.bias_scale
    # Execute: noisy choices under sigma 1 (noise std sqrt(2) per sum)
    choices = [_noisy_choice(trainer, 1.0, seed) for seed in range(5)]
    # Assert
    differences = choices[0][1]
    assert differences[0] > 5  # precondition: the prior is much better on validation (prior minus model)
    assert {c for c, _ in choices} == {"prior"}


def test_the_model_is_chosen_when_it_is_much_better(tmp_path: Path) -> None:
    # Prepare: a model trained (non-private, a few epochs), then item biases replaced by small random values
    trainer = _trainer(tmp_path)
    trainer.fit(20, rng_seed=0)
    with torch.no_grad():
        m = trainer.model
        m.item_bias.weight.normal_(0.0, 1e-3, generator=torch.Generator().manual_seed(1))
    # Execute
    choices = [_noisy_choice(trainer, 1.0, seed) for seed in range(5)]
    # Assert
    differences = choices[0][1]
    assert differences[0] < -5  # precondition: the model is much better on validation
    assert {c for c, _ in choices} == {"model"}


def test_prior_ranking_scores_every_user_by_the_item_biases(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    batch = {"users": torch.arange(4)}
    scores = PriorRanking(trainer.model).full_sort_predict(batch)
    assert scores.shape == (4, trainer.model.n_items)
    assert torch.equal(scores, trainer.model.item_biases().detach().expand(4, -1))


def test_with_a_popularity_release_the_prior_is_the_release_alone_not_the_trained_biases(tmp_path: Path) -> None:
    # Prepare: a model holding a popularity release, and trained-looking (non-zero) biases
    from fedsocial.shared.models.prior import compute_prior_item_scores
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.synthetic import generate

    cfg = tiny_config()
    split = split_dataset(generate(cfg.data), cfg.split)
    trainer = LocalTrainer(cfg, split, seed=0, popularity_prior=True)
    counts = np.random.default_rng(3).poisson(5.0, trainer.model.n_items).astype(np.float64)
    trainer.set_item_popularity(counts / split.n_users)
    with torch.no_grad():
        trainer.model.item_bias.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(4))
    # Execute
    scores = PriorRanking(trainer.model).full_sort_predict({"users": torch.arange(3)})
    # Assert: every row is the release's prior, which the biases do not change
    prior = trainer.model.item_prior()
    assert prior is not None
    assert torch.equal(scores, prior.expand(3, -1)) and torch.equal(compute_prior_item_scores(trainer.model), prior)
    assert not torch.equal(prior, trainer.model.item_biases().detach())


# --- a partner's release ----------------------------------------------------------------------------

def test_one_selection_entry_after_the_last_round_composed_in_epsilon_and_audited(tmp_path: Path) -> None:
    # Prepare: 2 rounds, a DP evaluation release after each, the selection after the last
    cfg = tiny_config(rounds=2, eval_noise_multiplier=4.0).replace("privacy", selection_noise_multiplier=SIGMA)
    partner = make_partner(tmp_path, cfg)
    _, params = partner.initial_parameters()
    # Execute
    sent = []
    for r in (1, 2):
        params, _, _ = partner.fit(params, r)
        sent.append(partner.evaluate(params, r))
    # Assert: exactly one selection entry, the last round's, between its training and its evaluation
    entries = ledger_of(tmp_path)
    assert [(e["round"], k) for e, k in zip(entries, kinds(entries), strict=True)] == [
        (1, "training"), (1, "evaluation"), (2, "training"), (2, "selection"), (2, "evaluation")]
    sel = entries[3]
    assert (sel["noise_multiplier"], sel["sample_rate"], sel["steps"]) == (SIGMA, 1.0, 1)
    assert sel["max_grad_norm"] == pytest.approx(1.0)  # the sensitivity of the released difference
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    assert entries[-1]["epsilon_rdp"] == pytest.approx(compute_epsilon(history, cfg.privacy.target_delta), rel=1e-9)
    assert sel["epsilon_rdp"] == pytest.approx(compute_epsilon(history[:4], cfg.privacy.target_delta), rel=1e-9)
    saved = load_selection_release(partner.settings.state_dir, 2)
    assert saved is not None and saved["digest"] == sel["release_sha256"]
    assert (partner.settings.state_dir / "selection" / "round_0002.json").stat().st_mode & 0o077 == 0
    assert (partner.settings.state_dir / "selection" / "served.json").stat().st_mode & 0o077 == 0
    assert read_served_choice(partner.settings.state_dir) == saved["choice"]
    assert all(s is not None and "noisy_differences" not in (s[0] or {}) for s in sent)  # they stay on the partner
    sign_server_records(tmp_path / "run", {"partner-0": {"num_users": partner.num_users, "max_epsilon": 50.0,
                                                         "target_delta": 1e-4}}, max_epsilon=50.0)
    result = audit_run(tmp_path / "run")
    assert result.exit_code == EXIT_OK, [str(f) for f in result.findings]
    assert result.partners[0].selection_releases == 1
    assert result.partners[0].epsilon == pytest.approx(entries[-1]["epsilon_rdp"], rel=1e-9)


def test_the_served_metrics_are_the_chosen_candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the noisy difference forced to favour the prior (post-processing of any release is as private)
    monkeypatch.setattr(selection, "compute_noisy_differences", lambda diffs, sigma, rng, *_: np.array([1.0]))
    partner = make_partner(tmp_path, selection_config())
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)
    trainer, _ = partner._prepared_trainer(new, 1)
    trainer.refit_local()
    prior, _ = evaluate_model(PriorRanking(trainer.model), partner.split, "test", builder=trainer.builder)
    model, _ = trainer.evaluate("test")
    # Execute
    assert partner.evaluate(new, 1) == (None, 0)  # nothing leaves (DP default: the evaluation is kept)
    # Assert
    local = json.loads((partner.settings.state_dir / "eval" / "round_0001.json").read_text())
    assert local["ndcg@10"] == pytest.approx(prior["ndcg@10"]) and prior["ndcg@10"] != pytest.approx(model["ndcg@10"])
    assert read_served_choice(partner.settings.state_dir) == "prior"


@pytest.mark.parametrize("point", ["before_selection_append", "after_selection_append"])
def test_a_rerun_after_a_kill_reuses_the_saved_release_and_charges_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    # Prepare: the partner dies at the boundary, its release saved
    partner = make_partner(tmp_path, selection_config())
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)

    def die(name: str, round_: int, partner_id: str | None = None) -> None:
        if name == point:
            raise RuntimeError("killed")

    monkeypatch.setattr(partner_module, "fault_point", die)
    with pytest.raises(RuntimeError, match="killed"):
        partner.evaluate(new, 1)
    monkeypatch.undo()
    path = partner.settings.state_dir / "selection" / "round_0001.json"
    before = path.read_bytes()
    charges = selection_charges(ledger_of(tmp_path))  # the ledger tells "not charged" from a lost record
    assert read_served_choice(partner.settings.state_dir, charges) == ("model" if not charges else
                                                                      json.loads(before)["choice"])
    draws: list[int] = []
    real = selection.compute_noisy_differences
    monkeypatch.setattr(selection, "compute_noisy_differences", lambda *a: draws.append(1) or real(*a))
    # Execute: the re-run, twice
    partner.evaluate(new, 1)
    partner.evaluate(new, 1)
    # Assert: one selection entry naming the saved release, bit for bit, and no second draw
    entries = ledger_of(tmp_path)
    assert kinds(entries) == ["training", "selection"]
    assert path.read_bytes() == before and draws == []
    assert entries[1]["release_sha256"] == json.loads(before)["digest"]
    assert read_served_choice(partner.settings.state_dir) == json.loads(before)["choice"]


def test_a_deleted_served_record_is_decided_by_the_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a charged selection of the prior, then its served.json deleted (was: read as "no selection charged
    # yet", so the DP model was served instead of the charged choice, silently)
    monkeypatch.setattr(selection, "compute_noisy_differences", lambda diffs, sigma, rng, *_: np.array([1.0]))
    partner = make_partner(tmp_path, selection_config())
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)
    partner.evaluate(new, 1)
    state = partner.settings.state_dir
    (state / "selection" / "served.json").unlink()
    # Execute
    charges = selection_charges(ledger_of(tmp_path))
    served = read_served_choice(state, charges)
    # Assert: the ledger's charge decides; without the ledger the two states cannot be told apart: refused
    assert len(charges) == 1 and served == "prior"
    with pytest.raises(SelectionError, match="served.json is missing beside the saved selection release .*ledger-dir"):
        read_served_choice(state)


def test_an_uncharged_release_serves_the_model_and_a_record_the_ledger_never_charged_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the partner killed before the charge (its release saved, no ledger entry)
    monkeypatch.setattr(selection, "compute_noisy_differences", lambda diffs, sigma, rng, *_: np.array([1.0]))
    partner = make_partner(tmp_path, selection_config())
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)

    def die(name: str, round_: int, partner_id: str | None = None) -> None:
        if name == "before_selection_append":
            raise RuntimeError("killed")

    monkeypatch.setattr(partner_module, "fault_point", die)
    with pytest.raises(RuntimeError, match="killed"):
        partner.evaluate(new, 1)
    state = partner.settings.state_dir
    charges = selection_charges(ledger_of(tmp_path))
    # Execute / Assert: nothing charged, so the model is served
    assert charges == [] and read_served_choice(state, charges) == "model"
    # Execute: a served record written by hand for the uncharged release (the choice reaches users uncharged)
    release = load_selection_release(state, 1)
    assert release is not None
    write_served_choice(state, release)
    # Assert: refused with the ledger at hand, naming the file
    with pytest.raises(SelectionError, match="served.json: records the selection of round 1, which .* never charged"):
        read_served_choice(state, charges, tmp_path / "run" / "ledgers" / "partner-0.jsonl")


def test_a_later_charge_decides_over_an_older_served_record(tmp_path: Path) -> None:
    # Prepare: two charged selections (rounds 1 and 2), the record still naming round 1 (killed before it was
    # rewritten)
    state = tmp_path / "state"
    first = selection.compute_selection_release(1, 8.0, np.array([-1.0]), 10)
    second = selection.compute_selection_release(2, 8.0, np.array([1.0]), 10)
    for release in (first, second):
        selection.save_selection_release(state, release)
    write_served_choice(state, first)
    charges = [{"round": r["round"], "release": "selection", "release_sha256": r["digest"]} for r in (first, second)]
    # Execute
    served = read_served_choice(state, charges)
    # Assert
    assert (first["choice"], second["choice"]) == ("model", "prior") and served == "prior"
    assert read_served_choice(state, charges[:1]) == "model"


def test_a_charged_selection_whose_release_is_lost_is_refused(tmp_path: Path) -> None:
    partner = make_partner(tmp_path, selection_config())
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)
    partner.evaluate(new, 1)
    path = partner.settings.state_dir / "selection" / "round_0001.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "choice": "prior" if doc["choice"] == "model" else "model"}))  # altered
    with pytest.raises(SelectionError, match="round_0001.json\\) is missing, unreadable or altered"):
        read_served_choice(partner.settings.state_dir)  # an altered release is never served: refused, by name
    with pytest.raises(PartnerError, match="selection of round 1 was released and charged"):
        partner.evaluate(new, 1)
    assert kinds(ledger_of(tmp_path)) == ["training", "selection"]


def test_a_calibrated_noise_leaves_room_for_the_selection(tmp_path: Path) -> None:
    # Prepare: calibrated training noise (noise_multiplier 0), cap 12, the selection planned
    cfg = selection_config().replace("privacy", noise_multiplier=0.0, max_epsilon=12.0)
    partner = make_partner(tmp_path, cfg)
    _, initial = partner.initial_parameters()
    # Execute
    new, _, _ = partner.fit(initial, 1)
    partner.evaluate(new, 1)
    # Assert: the selection was admitted and the cap holds after it, close to it
    entries = ledger_of(tmp_path)
    assert kinds(entries) == ["training", "selection"]
    assert 12.0 * 0.98 < entries[-1]["epsilon_rdp"] <= 12.0
    # a selection noise that alone spends the cap is refused by the preflight, naming the key
    with pytest.raises(ConfigError, match="privacy.selection_noise_multiplier"):
        check_reachable_budget(cfg.replace("privacy", selection_noise_multiplier=0.05), 50)


def test_off_changes_nothing(tmp_path: Path) -> None:
    # Prepare: two partners on the same data and noise key material, one with the selection off (0)
    off = make_partner(tmp_path / "off", selection_config(0.0))
    _, initial = off.initial_parameters()
    new, _, _ = off.fit(initial, 1)
    # Execute
    sent = off.evaluate(new, 1)
    # Assert: no selection entry, no selection folder, the served metrics the DP model's
    assert sent == (None, 0)
    assert kinds(ledger_of(tmp_path / "off")) == ["training"]
    assert not (off.settings.state_dir / "selection").exists()
    trainer, _ = off._prepared_trainer(new, 1)
    trainer.refit_local()
    local = json.loads((off.settings.state_dir / "eval" / "round_0001.json").read_text())
    assert local["ndcg@10"] == pytest.approx(trainer.evaluate("test")[0]["ndcg@10"])
    assert read_served_choice(off.settings.state_dir) == "model"
    # and in partner scope a selection sigma is inert
    part = make_partner(tmp_path / "part", selection_config().replace("privacy", scope="partner"))
    assert compute_federation_prefix(part.cfg) == []


# --- serving ------------------------------------------------------------------------------------------

def test_serving_the_prior_ranks_unseen_items_by_the_biases_with_exact_terms(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    model = trainer.model
    with torch.no_grad():  # distinct biases (an untrained model's are all 0: ties)
        model.item_bias.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    trainer.refit_local()
    rec = Recommender(model, trainer.split, calibration="none", privacy_scope="none", ranking="prior")
    biases = model.item_biases().detach().numpy()
    u = int(trainer.split.train_users[0])
    rows = rec.recommend(rec.users[u], k=10)
    seen = rec.seen[u]
    expected = [i for i in np.argsort(-biases, kind="stable") if int(i) not in seen][:10]
    assert [rec.item_index[r["item"]] for r in rows] == [int(i) for i in expected]
    assert all(int(rec.item_index[r["item"]]) not in seen for r in rows)
    np.testing.assert_allclose([r["score"] for r in rows], biases[expected], rtol=1e-6)
    terms = rec.terms(u, np.asarray(expected))
    np.testing.assert_allclose(terms.total(), biases[expected], rtol=1e-6)
    assert {r["explanation"]["reason"] for r in rows} == {"prior"}
    with pytest.raises(ValueError, match="ranking"):
        Recommender(model, trainer.split, calibration="none", privacy_scope="none", ranking="alone")


def test_the_kept_last_evaluation_names_the_selection_entry_and_the_server_takes_it_as_the_head(
        tmp_path: Path) -> None:
    # Prepare: one round, the selection on, no DP evaluation release (the evaluation is kept on the partner)
    from flwr.common import Code, EvaluateRes, Status

    from fedsocial.client.flower import FedSocialClient
    from fedsocial.server.strategy import FedSocialStrategy
    from fedsocial.shared import protocol
    from fedsocial.shared.privacy.ledger import entry_hash
    from tests.test_strategy import _Proxy

    cfg = selection_config()
    partner = make_partner(tmp_path, cfg)
    client = FedSocialClient(partner)
    names, params = partner.initial_parameters()
    params, _, _ = partner.fit(params, 1)
    # Execute: the ClientApp's evaluation reply, then the server reading it
    _, n, reply = client.evaluate(params, protocol.EvalInstructions(1).to_config())
    registrations = {0: {"partner_id": "partner-0", "param_names": ",".join(names), "num_users": partner.num_users}}
    strategy = FedSocialStrategy(cfg, tmp_path / "server", names, params, registrations=registrations)
    strategy.aggregate_evaluate(1, [(_Proxy(0), EvaluateRes(Status(Code.OK, ""), 0.0, n, reply))], [])
    # Assert: the reply leaves only the round, id, released = 0 and the selection entry's (epsilon, round, hash);
    # the server's record of the partner (what it signs in ledger_heads.json) is that entry, epsilon included
    sel = ledger_of(tmp_path)[-1]
    assert sel["release"] == "selection"
    assert set(reply) == protocol.EVAL_KEPT_KEYS | protocol.EVAL_ACCOUNTING_KEYS and reply["released"] == 0
    assert (reply["ledger_round"], reply["ledger_head"]) == (1, entry_hash(sel))
    assert strategy.history[-1]["eval_dropped"] == []
    info = strategy.partners["partner-0"]
    assert (info["ledger_round"], info["ledger_head"]) == (1, entry_hash(sel))
    assert info["epsilon"] == pytest.approx(sel["epsilon_rdp"])


def test_a_kept_evaluation_with_accounting_of_another_round_is_refused() -> None:
    # Prepare: a kept reply naming an entry of round 2 for an evaluation of round 1
    from fedsocial.shared import protocol

    kept = {"round": 1, "partner_id": "partner-0", "released": 0, "epsilon": 1.0, "ledger_round": 2,
            "ledger_head": "a" * 64}
    # Execute
    parsed = protocol.parse_eval_report(kept, 1)
    # Assert
    assert isinstance(parsed, protocol.Rejected) and "ledger_round 2" in str(parsed)


# --- centralized DP training (fedsocial train) -------------------------------------------------------


def _centralized(sigma: float, noise_multiplier: float = 1.0) -> tuple[Any, Any]:
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.synthetic import generate

    cfg = tiny_config().replace("privacy", selection_noise_multiplier=sigma, noise_multiplier=noise_multiplier,
                                epochs=2, max_epsilon=20.0)
    return cfg, split_dataset(generate(cfg.data), cfg.split)


def test_centralized_dp_training_charges_one_selection_in_its_epsilon_and_calibrates_around_it() -> None:
    # Prepare
    from fedsocial.shared.privacy.popularity import compute_release_prefix
    from fedsocial.shared.trainer import train_centralized

    cfg, split = _centralized(SIGMA)
    calibrated_cfg, _ = _centralized(SIGMA, noise_multiplier=0.0)
    # Execute
    out = train_centralized(cfg, split)
    calibrated = train_centralized(calibrated_cfg, split)
    # Assert: the choice and its noisy difference; epsilon = the accountant over training and the (sigma, 1, 1) release;
    # with the noise calibrated (noise_multiplier = 0) the whole history still ends at most at the cap
    assert out.selection is not None and out.selection["choice"] in SELECTION_CANDIDATES
    assert len(out.selection["noisy_differences"]) == 1 and out.selection["noise_multiplier"] == SIGMA
    events = [*compute_release_prefix(cfg), (out.noise_multiplier, out.sample_rate, out.steps), (SIGMA, 1.0, 1)]
    assert out.epsilon == pytest.approx(compute_epsilon(events, cfg.privacy.target_delta), rel=1e-9)
    assert out.epsilon > compute_epsilon(events[:-1], cfg.privacy.target_delta)
    assert calibrated.epsilon is not None and calibrated.epsilon <= calibrated_cfg.privacy.max_epsilon + 1e-9
    assert calibrated.selection is not None


def test_centralized_dp_training_reports_the_chosen_candidates_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the noisy difference forced to favour the prior (any post-processing of the release is as private)
    from fedsocial.shared.trainer import train_centralized

    monkeypatch.setattr(selection, "compute_noisy_differences", lambda diffs, sigma, rng, *_: np.array([1.0]))
    cfg, split = _centralized(SIGMA)
    # Execute
    out = train_centralized(cfg, split)
    trainer = LocalTrainer(cfg, split, seed=cfg.train.seed)
    trainer.model.load_state_dict({k: torch.as_tensor(v) for k, v in out.state.items()})
    prior, _ = evaluate_model(PriorRanking(trainer.model), split, "test", builder=trainer.builder)
    # Assert
    assert out.selection is not None and out.selection["choice"] == "prior"
    assert out.metrics["ndcg@10"] == pytest.approx(prior["ndcg@10"])


def test_centralized_training_without_the_selection_is_unchanged() -> None:
    # Prepare
    from fedsocial.shared.trainer import train_centralized

    cfg, split = _centralized(0.0)
    # Execute
    out = train_centralized(cfg, split)
    # Assert: no selection, and epsilon is the training's alone
    assert out.selection is None
    assert out.epsilon == pytest.approx(compute_epsilon([(out.noise_multiplier, out.sample_rate, out.steps)],
                                                        cfg.privacy.target_delta), rel=1e-6)


# --- fedsocial train --resume: the centralized selection is drawn once per run folder (regression) -------------


def _published_run(tmp_path: Path) -> tuple[Any, Path, dict[str, Any]]:
    from fedsocial.simulations.train import run_train

    cfg, _ = _centralized(SIGMA)
    out = tmp_path / "run"
    return cfg, out, run_train(cfg, None, out, progress=False)


def test_resuming_a_finished_centralized_run_reuses_its_selection_instead_of_drawing_again(tmp_path: Path) -> None:
    # Prepare: a finished DP run that published its selection in metrics.json (before the fix, every
    # `fedsocial train --resume` of it drew a new noisy difference: uncharged releases to average the noise away)
    from fedsocial.simulations.train import run_train

    cfg, out, first = _published_run(tmp_path)
    # Execute
    again = [run_train(cfg, None, out, progress=False, resume=True) for _ in range(3)]
    # Assert: the saved release (0600) is the published one, bit for bit, at every resume
    saved = load_selection_release(out / "checkpoint", cfg.privacy.epochs)
    assert saved is not None and saved["noisy_differences"] == first["selection"]["noisy_differences"]
    assert (out / "checkpoint" / "selection" / f"round_{cfg.privacy.epochs:04d}.json").stat().st_mode & 0o777 == 0o600
    assert all(doc["selection"] == first["selection"] for doc in again)


def test_a_crash_after_the_selection_draw_resumes_with_the_same_draw(tmp_path: Path) -> None:
    # Prepare: the run killed after its selection was saved, before metrics.json was marked finished
    from fedsocial.simulations.train import run_train

    cfg, out, first = _published_run(tmp_path)
    progress = out / "checkpoint" / "progress.json"
    doc = json.loads(progress.read_text(encoding="utf-8"))
    progress.write_text(json.dumps({**doc, "finished": False}), encoding="utf-8")
    # Execute
    resumed = run_train(cfg, None, out, progress=False, resume=True)
    # Assert
    assert resumed["selection"] == first["selection"]


@pytest.mark.parametrize("damage", ["removed", "altered"])
def test_a_published_selection_whose_record_is_gone_or_altered_is_never_drawn_again(tmp_path: Path,
                                                                                    damage: str) -> None:
    # Prepare
    from fedsocial.simulations.train import run_train
    from fedsocial.simulations.train_checkpoint import TrainCheckpointError

    cfg, out, first = _published_run(tmp_path)
    path = out / "checkpoint" / "selection" / f"round_{cfg.privacy.epochs:04d}.json"
    if damage == "removed":
        path.unlink()
    else:
        record = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**record, "noisy_differences": [-1e9]}), encoding="utf-8")
    metrics_before = (out / "metrics.json").read_bytes()
    # Execute / Assert: refused with the file named; the published metrics are kept as they were
    with pytest.raises(TrainCheckpointError, match=str(path.name)):
        run_train(cfg, None, out, progress=False, resume=True)
    assert (out / "metrics.json").read_bytes() == metrics_before


def test_a_second_dp_training_into_a_finished_run_folder_is_refused(tmp_path: Path) -> None:
    # Regression: `fedsocial train` without --resume into a finished DP folder trained again with fresh noise
    # (a second popularity release and DP-SGD run over the same data) and overwrote the first's metrics
    from fedsocial.simulations.train import run_train
    from fedsocial.simulations.train_checkpoint import TrainCheckpointError

    cfg, out, _ = _published_run(tmp_path)
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(TrainCheckpointError, match="finished DP run"):
        run_train(cfg, None, out, progress=False)
    with pytest.raises(TrainCheckpointError, match="finished DP run"):  # nor as a non-private config
        run_train(cfg.replace("privacy", enabled=False), None, out, progress=False)
    assert (out / "metrics.json").read_bytes() == before
