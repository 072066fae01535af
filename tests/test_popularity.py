"""The DP item-popularity release (shared/privacy/popularity.py): sensitivity, noise, accounting, charged once."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsocial.client import partner as partner_module
from fedsocial.client.partner import PartnerError
from fedsocial.shared.config import ConfigError, config_from_dict
from fedsocial.shared.privacy.accounting import PrivacyConfigError, calibrate_noise_multiplier, compute_epsilon
from fedsocial.shared.privacy.audit import EXIT_OK, audit_run
from fedsocial.shared.privacy.ledger import read_ledger
from fedsocial.shared.privacy.popularity import (
    POPULARITY_RELEASE,
    compute_noisy_histogram,
    compute_popularity_histogram,
    compute_popularity_prior,
    load_popularity_release,
)
from fedsocial.simulations.privacy_report import render_html
from fedsocial.simulations.simulate import run_simulation_from_config, write_config
from tests.partner_run import ledger_of, make_partner
from tests.test_federation import tiny_config

SIGMA_POP = 3.0


def popularity_config(**federation: Any) -> Any:
    return tiny_config(**federation).replace("privacy", popularity_noise_multiplier=SIGMA_POP)


# --- the pure functions -------------------------------------------------------------------------

def test_histogram_known_values_distinct_items_each_user_of_unit_norm() -> None:
    # Prepare: user 0 has items {0, 1}; user 1 has {1, 2} (item 2 twice); user 2 has {3}; user 3 none
    users, items = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 2, 2, 3])
    # Execute
    h = compute_popularity_histogram(users, items, n_users=4, n_items=5)
    # Assert
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(h, [r, 2 * r, r, 1.0, 0.0], rtol=0, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7)), min_size=1, max_size=40))
def test_adding_or_removing_one_user_moves_the_histogram_by_at_most_one(pairs: list[tuple[int, int]]) -> None:
    # Brute force: the L2 distance between the histograms with and without each user (user-level adjacency)
    users, items = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    full = compute_popularity_histogram(users, items, 6, 8)
    for u in range(6):
        keep = users != u
        without = compute_popularity_histogram(users[keep], items[keep], 6, 8)
        distance = float(np.linalg.norm(full - without))
        assert distance <= 1.0 + 1e-12
        assert distance == pytest.approx(1.0 if (~keep).any() else 0.0, abs=1e-12)


def test_noise_has_the_declared_scale_and_is_refused_without_it() -> None:
    h = np.zeros(400_000)
    noisy = compute_noisy_histogram(h, 2.5, np.random.default_rng(0))
    assert abs(float(noisy.mean())) < 0.02 and float(noisy.std()) == pytest.approx(2.5, rel=0.01)
    with pytest.raises(ValueError, match="popularity_noise_multiplier"):
        compute_noisy_histogram(h, 0.0, np.random.default_rng(0))


def test_prior_known_values_monotone_and_zero_without_a_release() -> None:
    # Noise scale s = RMS of the negative entries = sqrt((1 + 9) / 2) = sqrt(5)
    m = np.array([-1.0, -3.0, 0.0, 2.0, 10.0])
    s = math.sqrt(5.0)
    prior = compute_popularity_prior(m)
    np.testing.assert_allclose(prior, [0.0, 0.0, 0.0, math.log((2 + s) / s), math.log((10 + s) / s)], rtol=1e-12)
    assert np.all(np.diff(compute_popularity_prior(np.sort(np.random.default_rng(1).normal(0, 1, 50)))) >= 0)
    assert not compute_popularity_prior(np.zeros(4)).any()  # nothing released: no prior
    np.testing.assert_allclose(compute_popularity_prior(np.array([0.0, 1.0, 4.0])), [0.0, math.log(2), math.log(5)])


def test_calibration_composes_the_prefix_and_still_meets_the_cap() -> None:
    # Prepare
    prefix = [(SIGMA_POP, 1.0, 1)]
    # Execute
    alone = calibrate_noise_multiplier(2.0, 1e-5, 0.25, 8, 20)
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 0.25, 8, 20, prefix=prefix)
    # Assert: the cap holds with the prefix, and a sigma smaller by the tolerance would exceed it
    assert sigma > alone
    assert compute_epsilon([*prefix, (sigma, 0.25, 160)], 1e-5) <= 2.0
    assert compute_epsilon([*prefix, (sigma * (1 - 2e-3), 0.25, 160)], 1e-5) > 2.0
    with pytest.raises(PrivacyConfigError, match="already spend it all"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.25, 8, 20, prefix=[(1.0, 1.0, 1)])


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_config_refuses_a_bad_popularity_noise_multiplier(value: float) -> None:
    with pytest.raises(ConfigError, match="privacy.popularity_noise_multiplier"):
        config_from_dict({"privacy": {"enabled": True, "popularity_noise_multiplier": value}})


# --- a partner's release --------------------------------------------------------------------------

def test_a_partner_releases_popularity_once_before_training_and_charges_it(tmp_path: Path) -> None:
    # Prepare
    cfg = popularity_config(clipping_norm=1e6)  # no update clipping: the sent array is the release itself
    partner = make_partner(tmp_path, cfg)
    names, initial = partner.initial_parameters()
    # Execute: two rounds (the second from the first round's arrays as the global model)
    first, _, m1 = partner.fit(initial, 1)
    second, _, m2 = partner.fit(first, 2)
    # Assert: popularity (round 1), training 1, training 2; the sigma of the calibration composes it
    entries = ledger_of(tmp_path)
    assert [(e["round"], e.get("release", "training")) for e in entries] == [
        (1, "popularity"), (1, "training"), (2, "training")]
    pop = entries[0]
    assert (pop["noise_multiplier"], pop["sample_rate"], pop["steps"], pop["max_grad_norm"]) == (SIGMA_POP, 1.0, 1, 1.0)
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    assert m2["epsilon"] == pytest.approx(compute_epsilon(history, cfg.privacy.target_delta), rel=1e-9)
    saved = load_popularity_release(partner.settings.state_dir)
    assert saved is not None and saved[1]["digest"] == pop["release_sha256"]
    i = names.index("item_pop")
    assert np.array_equal(first[i], (saved[0] / partner.num_users).astype(np.float32))  # what left is the release
    assert np.array_equal(second[i], first[i])  # never trained: later rounds send it back unchanged
    assert not initial[i].any()


def test_a_rerun_of_round_1_re_sends_the_charged_histogram_and_a_lost_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the partner dies after charging the popularity release, before charging round 1's training
    partner = make_partner(tmp_path, popularity_config(clipping_norm=1e6), index=1)
    names, initial = partner.initial_parameters()

    def die(point: str, round_: int, partner_id: str) -> None:
        if point == "before_ledger_append":
            raise RuntimeError("killed")

    monkeypatch.setattr(partner_module, "fault_point", die)
    with pytest.raises(RuntimeError, match="killed"):
        partner.fit(initial, 1)
    monkeypatch.undo()
    charged = load_popularity_release(partner.settings.state_dir)
    # Execute: the re-run
    again, _, _ = partner.fit(initial, 1)
    # Assert: one popularity entry, and the round-1 release carries that same histogram
    entries = ledger_of(tmp_path, 1)
    assert [e.get("release", "training") for e in entries] == ["popularity", "training"]
    assert charged is not None
    assert np.array_equal(again[names.index("item_pop")], (charged[0] / partner.num_users).astype(np.float32))
    # A lost release after the charge is refused, never drawn a second time
    fresh = make_partner(tmp_path / "other", popularity_config(), index=2)
    monkeypatch.setattr(partner_module, "fault_point", die)
    with pytest.raises(RuntimeError):
        fresh.fit(fresh.initial_parameters()[1], 1)
    monkeypatch.undo()
    (fresh.settings.state_dir / POPULARITY_RELEASE).unlink()
    with pytest.raises(PartnerError, match="popularity release was charged"):
        fresh.fit(fresh.initial_parameters()[1], 1)
    assert [e.get("release") for e in ledger_of(tmp_path / "other", 2)] == ["popularity"]


def test_a_popularity_release_the_cap_cannot_hold_is_refused_with_the_round(tmp_path: Path) -> None:
    # Prepare: sigma_pop 0.3 alone costs more than epsilon 5; a fixed training noise, so no calibration
    cfg = tiny_config().replace("privacy", popularity_noise_multiplier=0.3, max_epsilon=5.0)
    partner = make_partner(tmp_path, cfg)
    _, initial = partner.initial_parameters()
    # Execute
    out, weight, metrics = partner.fit(initial, 1)
    # Assert: nothing charged, nothing released
    assert weight == 0 and metrics["budget_exhausted"] == 1
    assert not (tmp_path / "run" / "ledgers" / "partner-0.jsonl").is_file() or not ledger_of(tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(out, initial, strict=True))


# --- the whole path ------------------------------------------------------------------------------

@pytest.mark.slow  # runs a federation (or Flower's local runtime)
def test_federation_with_the_release_audits_and_the_report_names_it(tmp_path: Path) -> None:
    # Prepare / Execute
    cfg = popularity_config()
    run_simulation_from_config(cfg, None, tmp_path / "sim", progress=False)
    result = audit_run(tmp_path / "sim")
    # Assert
    assert result.exit_code == EXIT_OK, [str(f) for f in result.findings]
    for report in result.partners:
        assert report.popularity_releases == 1
        assert report.rounds[0].release == "popularity" and report.rounds[0].round == 1
        entries = read_ledger(tmp_path / "sim" / "ledgers" / f"{report.partner_id}.jsonl")
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        assert report.epsilon == pytest.approx(compute_epsilon(history, cfg.privacy.target_delta), rel=1e-6)
        assert report.epsilon <= cfg.privacy.max_epsilon
        assert report.training_rounds == cfg.federation.rounds  # the release is an entry, not a round
        assert report.total_steps == sum(r.steps for r in report.rounds[1:])
    page = render_html(result)
    assert "DP popularity releases 1" in page and "1 (popularity)" in page


@pytest.mark.parametrize("clipping", ["onepass", "ghost"])
def test_centralized_dp_charges_the_release_in_its_epsilon(clipping: str) -> None:
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.trainer import train_centralized

    # Prepare: calibrated noise (noise_multiplier 0) to epsilon 6 with the release in the history
    cfg = popularity_config().replace("privacy", noise_multiplier=0.0, max_epsilon=6.0, epochs=2, clipping=clipping)
    split = split_dataset(load_dataset(cfg.data), cfg.split)
    # Execute
    outcome = train_centralized(cfg, split)
    # Assert
    events = [(SIGMA_POP, 1.0, 1), (outcome.noise_multiplier, outcome.sample_rate, outcome.steps)]
    assert outcome.epsilon == pytest.approx(compute_epsilon(events, cfg.privacy.target_delta), rel=1e-9)
    assert outcome.epsilon <= 6.0
    assert np.abs(outcome.state["item_pop"]).sum() > 0


def test_popularity_bench_prints_the_release_alone_per_sigma(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    import json

    from fedsocial.simulations.popularity_bench import main

    # Prepare
    config = write_config(tiny_config(), tmp_path / "cfg")
    # Execute
    code = main(["--config", str(config), "--partners", "3", "--sigmas", "0,3", "--seeds", "0,1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # Assert: the exact histogram once, the noisy one per seed; the release's epsilon at the config's delta
    assert code == 0 and [(r["popularity_noise_multiplier"], r["seeds"]) for r in rows] == [(0.0, 1), (3.0, 2)]
    assert rows[1]["epsilon_of_release"] == pytest.approx(compute_epsilon([(3.0, 1.0, 1)], 1e-4), abs=1e-4)
    assert all(0.0 <= r["ndcg@10"] <= 1.0 for r in rows)
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--sigmas", "-1"])


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_non_finite_global_parameters_are_refused_before_anything_is_charged(tmp_path: Path, poison: float) -> None:
    # Prepare: a hostile or broken server sends a NaN / inf in the popularity array of round 2
    partner = make_partner(tmp_path, popularity_config(clipping_norm=1e6))
    names, initial = partner.initial_parameters()
    first, _, _ = partner.fit(initial, 1)
    charged = len(ledger_of(tmp_path))
    hostile = [a.copy() for a in first]
    hostile[names.index("item_pop")][0] = poison
    # Execute / Assert: refused by name, nothing charged, evaluation refused too
    with pytest.raises(PartnerError, match="item_pop"):
        partner.fit(hostile, 2)
    with pytest.raises(PartnerError, match="non-finite"):
        partner.evaluate(hostile, 2)
    assert len(ledger_of(tmp_path)) == charged
