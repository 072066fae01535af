"""What serving may learn from the partner's records in each privacy scope (shared/serving.py, DESIGN.md).

In ``joint`` scope under DP everything a user sees beyond their own record must be DP with respect to every
other user's record: a cold user's list is ranked by the DP popularity release (the item biases without one),
never by exact training counts, events do not move it, and calibration is never fitted on validation records.
In ``partner`` scope (and in a non-private run) both are allowed and unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsocial.shared.config import ModelConfig
from fedsocial.shared.data import SplitData
from fedsocial.shared.events import parse_event
from fedsocial.shared.serving import (
    Recommender,
    ServingError,
    compute_serving_scope,
    fit_calibrator,
)
from fedsocial.simulations import recommend
from fedsocial.simulations.serve import compute_health
from tests.serving_run import make_run
from tests.test_serving import randomised_model, tiny_split

torch.set_num_threads(1)

COLD = 0  # tiny_split's user 0 has no interactions and no out-neighbours


def dp_model(split: SplitData, release: bool = True, seed: int = 7) -> Any:
    """A randomised social model; ``release``: it carries a DP popularity release (``item_pop``) and its prior."""
    from fedsocial.shared.models import build_model

    if not release:
        return randomised_model(ModelConfig(dim=8, mlp_hidden=8, user_embedding="none"), split, seed)
    torch.manual_seed(seed)
    ds = split.dataset
    model = build_model(ModelConfig(dim=8, mlp_hidden=8, user_embedding="none"), split.n_users, split.n_items,
                        item_category=ds.item_category, item_price_bin=ds.item_price_bin, item_text=ds.item_text,
                        user_features=ds.user_features, user_feature_sizes=ds.user_feature_sizes,
                        popularity_prior=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "item_pop":  # a noisy, per-user-scaled histogram, as a partner releases it
                p.copy_(torch.as_tensor(np.random.default_rng(seed).normal(0.5, 0.4, split.n_items)))
            else:
                p.normal_(0.0, 0.3)
    return model


def with_train_items(split: SplitData, user: int, items: list[int]) -> SplitData:
    """``split`` with ``user``'s training interactions replaced by ``items`` (one record changed)."""
    keep = split.train_users != user
    return dataclasses.replace(split, train_users=np.concatenate([split.train_users[keep], np.full(len(items), user)]),
                               train_items=np.concatenate([split.train_items[keep], np.asarray(items, np.int64)]))


def with_val_items(split: SplitData, user: int, items: list[int]) -> SplitData:
    """``split`` with ``user``'s validation interactions replaced by ``items`` (one record changed)."""
    keep = split.val_users != user
    return dataclasses.replace(split, val_users=np.concatenate([split.val_users[keep], np.full(len(items), user)]),
                               val_items=np.concatenate([split.val_items[keep], np.asarray(items, np.int64)]))


def heavy_user_change(split: SplitData, rec: Recommender) -> SplitData:
    """User 1 interacts with every item outside the exact-count top 10: the count ranking must change."""
    top = {rec.item_index[x["item"]] for x in rec.recommend(COLD, 10, explain=False)}
    return with_train_items(split, 1, [i for i in range(split.n_items) if i not in top])


# --- cold users -----------------------------------------------------------------------------------
def test_joint_scope_cold_list_is_the_dp_release_not_the_training_counts() -> None:
    # Prepare: the same DP model (same release) over two splits that differ in one user's training record
    split = tiny_split(seed=2)
    model = dp_model(split)
    assert not any(split.train_users == COLD) and not any(split.dataset.social_src == COLD)
    counted = Recommender(copy.deepcopy(model), split, calibration="none", privacy_scope="partner")
    changed = heavy_user_change(split, counted)
    counted_changed = Recommender(copy.deepcopy(model), changed, calibration="none", privacy_scope="partner")
    # Execute
    a = Recommender(copy.deepcopy(model), split, privacy_scope="joint").recommend(COLD, 10)
    b = Recommender(copy.deepcopy(model), changed, privacy_scope="joint").recommend(COLD, 10)
    # Assert: the joint lists (items, scores, probabilities, explanations) are identical, and ranked by the
    # release's prior; with exact counts (partner scope) the same change does move the list
    assert a == b
    prior = model.item_prior().numpy()
    assert [x["item"] for x in a] == [int(i) for i in np.argsort(-prior, kind="stable")[:10]]
    assert {x["explanation"]["popularity"] for x in a} == {"dp_release"}
    assert counted.recommend(COLD, 10, explain=False) != counted_changed.recommend(COLD, 10, explain=False)


def test_joint_scope_without_a_release_ranks_cold_users_by_the_models_item_biases() -> None:
    # Prepare: a DP model without a popularity release, two splits differing in one user's training record
    split = tiny_split(seed=3)
    model = dp_model(split, release=False)
    exact = Recommender(copy.deepcopy(model), split, calibration="none", privacy_scope="none")
    changed = heavy_user_change(split, exact)
    # Execute
    rec = Recommender(copy.deepcopy(model), split, privacy_scope="joint")
    a = rec.recommend(COLD, 10)
    b = Recommender(copy.deepcopy(model), changed, privacy_scope="joint").recommend(COLD, 10)
    # Assert: the list is the biases' top 10, the same for both splits, and exact counts were never computed
    biases = model.item_biases().detach().numpy()
    assert a == b and rec.popularity is None
    assert [x["item"] for x in a] == [int(i) for i in np.argsort(-biases, kind="stable")[:10]]
    assert {x["explanation"]["popularity"] for x in a} == {"item_biases"}
    assert {x["explanation"]["reason"] for x in a} == {"popularity"}


def test_joint_scope_events_change_only_their_own_users_list() -> None:
    # Prepare: the cold user's list and a warm user's list before another user's purchases
    split = tiny_split(seed=4)
    rec = Recommender(dp_model(split), split, privacy_scope="joint")
    cold_before, warm_before = rec.recommend(COLD, 10), rec.recommend(5, 10)
    buyer = 3
    bought = [x["item"] for x in rec.recommend(COLD, 10, explain=False)[:4]]  # the cold list's own top items
    # Execute
    rec.apply_events([parse_event({"user": buyer, "item": i, "type": "purchase"}) for i in bought])
    # Assert: the buyer's own list changed (its purchases left it); nobody else's did
    assert rec.recommend(COLD, 10) == cold_before and rec.recommend(5, 10) == warm_before
    assert not {x["item"] for x in rec.recommend(buyer, 10)} & set(bought)


# --- calibration -----------------------------------------------------------------------------------
def test_joint_scope_never_fits_calibration_on_validation_records(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: two splits differing in one user's validation record; any read of validation scores fails
    split = tiny_split(seed=5)
    model = dp_model(split)
    val_user = int(split.val_users[0])
    changed = with_val_items(split, val_user, list(range(split.n_items // 2)))
    partner = [Recommender(copy.deepcopy(model), s, calibration="platt", privacy_scope="partner").calibrator
               for s in (split, changed)]

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("joint scope read validation records")

    monkeypatch.setattr(Recommender, "validation_scores", refuse)
    # Execute
    recs = [Recommender(copy.deepcopy(model), s, privacy_scope="joint") for s in (split, changed)]
    explicit_none = Recommender(copy.deepcopy(model), split, calibration="none", privacy_scope="joint")
    # Assert: auto is sigmoid(score) with the reason stated, identical for both splits (partner scope's Platt
    # fit is not: the control), and asking for platt or isotonic is refused naming the field and the scope
    grid = np.linspace(-5, 5, 41)
    for rec in recs:
        assert rec.calibrator.method == "none" and "privacy.scope = joint" in rec.calibrator.reason
        assert rec.calibrator.to_json()["reason"] == rec.calibrator.reason
        np.testing.assert_array_equal(rec.calibrator.predict(grid), 1.0 / (1.0 + np.exp(-grid)))
        row = rec.recommend(COLD, 3)[0]
        assert row["probability"] == pytest.approx(1.0 / (1.0 + np.exp(-row["score"])), rel=1e-12)
    assert recs[0].recommend(COLD, 10) == recs[1].recommend(COLD, 10)
    assert explicit_none.calibrator.method == "none" and explicit_none.calibrator.reason == ""
    assert not np.allclose(partner[0].predict(grid), partner[1].predict(grid))
    for method in ("platt", "isotonic"):
        with pytest.raises(ServingError, match=r"calibration: .*privacy\.scope = \"joint\""):
            Recommender(copy.deepcopy(model), split, calibration=method, privacy_scope="joint")


# --- partner scope and non-private runs: unchanged ---------------------------------------------------
@pytest.mark.parametrize("scope", ["partner", "none"])
def test_partner_scope_and_non_private_runs_keep_exact_counts_and_validation_calibration(scope: str) -> None:
    # Prepare
    split = tiny_split(seed=6)
    model = dp_model(split)
    # Execute
    rec = Recommender(copy.deepcopy(model), split, privacy_scope=scope)
    before = rec.recommend(COLD, 10)
    item = next(i for i in range(split.n_items) if i not in rec.seen[3])
    rec.apply_events([parse_event({"user": 3, "item": item, "type": "purchase"})])
    # Assert: cold users by the exact training counts, moved by events; auto is Platt fitted on validation data
    counts = np.bincount(split.train_items, minlength=split.n_items).astype(np.float64)
    assert [counts[x["item"]] for x in before] == sorted(counts, reverse=True)[:10]  # ties in any order
    assert {x["explanation"]["popularity"] for x in before} == {"training_counts"}
    assert rec.popularity is not None and rec.popularity[item] == counts[item] + 1
    exact = Recommender(copy.deepcopy(model), split, calibration="none", privacy_scope="none")
    expected = fit_calibrator(*exact.validation_scores(), "platt")
    assert (rec.calibrator.method, rec.calibrator.params, rec.calibrator.reason) == ("platt", expected.params, "")


def test_a_direct_caller_must_name_the_scope() -> None:
    # Prepare: a DP model, served from Python rather than the CLI
    split = tiny_split()
    model = dp_model(split)
    # Execute / Assert: no default scope to fall back on (it once defaulted to "none": exact counts and
    # calibration on validation records, served from a joint-scope run by any caller that forgot it)
    with pytest.raises(TypeError, match="privacy_scope"):
        Recommender(model, split, calibration="none")  # type: ignore[call-arg]
    with pytest.raises(ServingError, match=re.escape("privacy_scope: must be none|partner|joint, got ''")):
        Recommender(model, split, privacy_scope="")


def test_the_run_config_decides_the_serving_scope() -> None:
    # Execute / Assert: a non-private run has nothing to protect; under DP the configured scope applies
    assert compute_serving_scope(False, "joint") == "none" and compute_serving_scope(False, "partner") == "none"
    assert compute_serving_scope(True, "joint") == "joint" and compute_serving_scope(True, "partner") == "partner"


def test_a_dp_joint_run_serves_the_release_to_cold_users_and_refuses_platt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """End to end through ``fedsocial recommend``'s loader: the scope comes from the run's config."""
    from fedsocial.server.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
    from fedsocial.shared.config import load_config
    from fedsocial.simulations.simulate import write_config

    # Prepare: a run whose config is DP, joint scope, with a popularity release in its checkpoint
    run = make_run(tmp_path / "run", epochs=1)
    cfg = load_config(run / "config.toml").replace("privacy", enabled=True, popularity_noise_multiplier=1.0)
    (run / "config.toml").unlink()
    write_config(cfg, run)
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    n_items = next(a for n, a in zip(ckpt.names, ckpt.arrays, strict=True) if n == "item_bias.weight").shape[0]
    release = np.random.default_rng(0).normal(0.05, 0.03, size=(n_items,)).astype(np.float32)
    save_checkpoint(run, Checkpoint(ckpt.round, [*ckpt.names, "item_pop"], [*ckpt.arrays, release], ckpt.state))
    out = ["--out", str(tmp_path / "lists.jsonl")]
    # Execute
    refused = recommend.main([str(run), "--partner", "partner-0", "--calibration", "platt", *out])
    err = capsys.readouterr().err
    rec = recommend.load_recommender(recommend.resolve_source(run, "partner-0"))
    rec.add_user("newcomer")
    rows = rec.recommend("newcomer", 10)
    # Assert: platt is refused in one line naming the field; the default serves sigmoid(score), says why, and
    # ranks the cold user by the run's released popularity
    assert refused == 2 and "error: calibration: platt" in err and "privacy.scope" in err
    assert not (tmp_path / "lists.jsonl").exists()
    assert rec.privacy_scope == "joint" and rec.popularity is None and rec.calibrator.method == "none"
    assert "privacy.scope = joint" in recommend.describe_calibration(rec)
    prior = rec.model.item_prior()
    assert prior is not None
    assert [rec.item_index[x["item"]] for x in rows] == [int(i) for i in np.argsort(-prior.numpy(), kind="stable")[:10]]
    assert {x["explanation"]["popularity"] for x in rows} == {"dp_release"}
    health = compute_health(rec, "partner-0")  # what GET /health and the operator's page show
    assert (health["privacy_scope"], health["cold_start"], health["calibration"]["method"]) == ("joint", "dp_release",
                                                                                                 "none")
    assert "privacy.scope = joint" in health["calibration"]["reason"]
