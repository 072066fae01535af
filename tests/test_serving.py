"""Serving: exact score decomposition, calibration, events, batch lists, social analysis (shared/serving.py)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsocial.shared.batching import ExampleBuilder
from fedsocial.shared.config import ModelConfig
from fedsocial.shared.data import Dataset, SplitData
from fedsocial.shared.events import (
    EventError,
    append_events_durably,
    compute_external_ids,
    compute_grown_local_state,
    compute_split_with_events,
    parse_event,
    read_events,
)
from fedsocial.shared.models import RecModel, build_model
from fedsocial.shared.serving import (
    Calibrator,
    Recommender,
    ServingError,
    UnknownUserError,
    compute_isotonic_fit,
    compute_platt_params,
    fit_calibrator,
)
from fedsocial.shared.social_analysis import analyse, compute_communities, compute_item_lift
from fedsocial.simulations import recommend
from tests.serving_run import make_run

torch.set_num_threads(1)


def tiny_split(seed: int = 0, n_users: int = 24, n_items: int = 40) -> SplitData:
    """A hand-made split: random interactions (user 0 has none), a random graph, 4 item categories."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(1, n_users), 6)
    items = rng.integers(0, n_items, users.size)
    pairs = np.unique(np.stack([users, items], 1), axis=0)
    src = rng.integers(0, n_users, 60)
    dst = rng.integers(0, n_users, 60)
    keep = (src != dst) & (src != 0)
    ds = Dataset(n_users, n_items, pairs[:, 0], pairs[:, 1], src[keep], dst[keep],
                 item_category=np.arange(n_items) % 4, item_price_bin=np.arange(n_items) % 3,
                 item_text=rng.normal(size=(n_items, 5)).astype(np.float32),
                 user_features=np.stack([np.arange(n_users) % 3, np.arange(n_users) % 2], 1),
                 user_feature_names=("age", "region"), user_feature_sizes=(3, 2))
    val = rng.random(len(pairs)) < 0.2
    return SplitData(ds, pairs[~val, 0], pairs[~val, 1], pairs[val, 0], pairs[val, 1],
                     np.zeros(0, np.int64), np.zeros(0, np.int64))


def randomised_model(mc: ModelConfig, split: SplitData, seed: int) -> RecModel:
    """Every parameter random (the MLP's zero output layer too), so that every term is non-trivial."""
    torch.manual_seed(seed)
    ds = split.dataset
    model = build_model(mc, split.n_users, split.n_items, item_category=ds.item_category,
                        item_price_bin=ds.item_price_bin, item_text=ds.item_text, user_features=ds.user_features,
                        user_feature_sizes=ds.user_feature_sizes)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


VARIANTS = [dict(aggregator=a, user_embedding=p, temperature=t, use_category=bool(n % 2), bias_scale=1.0 + n % 3,
                 use_mlp=n % 4 != 3)
            for n, (a, p, t) in enumerate(itertools.product(("mean", "gcn", "attention"), ("trained", "local", "none"),
                                                            (0.0, 0.2)))]
VARIANTS += [dict(use_social=False, user_embedding="local"), dict(use_history=False, aggregator="attention"),
             dict(use_history=False, use_social=False, user_embedding="trained"),
             dict(use_price=True, use_text=True, use_user_features=True, use_category=True, temperature=0.2,
                  aggregator="attention", user_embedding="local"),
             dict(learned_scale=True, temperature=0.2, user_embedding="local"),  # the scale is random here too
             dict(learned_scale=True, aggregator="gcn", user_embedding="trained")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_terms_sum_to_the_models_own_score(variant: dict[str, object]) -> None:
    # Prepare
    split = tiny_split()
    mc = ModelConfig(dim=8, mlp_hidden=8, local_refit_steps=3, **variant)  # type: ignore[arg-type]
    model = randomised_model(mc, split, seed=len(str(variant)))
    rec = Recommender(model, split, calibration="none", privacy_scope="none")  # type: ignore[arg-type]
    rec.apply_events([parse_event({"user": "new", "neighbour": 3, "type": "follow"})])  # a cold-start user
    eval_builder = ExampleBuilder.from_split(split, mc)
    all_items = np.arange(split.n_items)
    for u in [0, 1, 5, 17, rec.index_of("new")]:
        # Execute
        terms = rec.terms(u, all_items)
        batch = rec._batch(u, rec.history[u], rec.friends[u])
        with torch.no_grad():
            expected = model.full_sort_predict(batch)[0].double().numpy()
        # Assert: the terms sum to the model's score, and the served score is that score
        np.testing.assert_allclose(terms.total(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rec.scores(u).double().numpy(), expected, rtol=1e-5, atol=1e-5)
    # the served vector from training items equals the model's own evaluation batch (ExampleBuilder.eval_batch)
    train = {int(u): split.train_items[split.train_users == u].tolist() for u in (1, 5)}
    for u, bag in train.items():
        with torch.no_grad():
            own = model.full_sort_predict(eval_builder.eval_batch(np.array([u])))[0].numpy()
        np.testing.assert_allclose(rec.scores(u, bag=bag).numpy(), own, rtol=1e-5, atol=1e-5)


def test_explanations_name_the_largest_terms_and_exclude_seen_items() -> None:
    # Prepare
    split = tiny_split(seed=1)
    model = randomised_model(ModelConfig(dim=8, mlp_hidden=8, user_embedding="none"), split, seed=3)
    rec = Recommender(model, split, calibration="none", privacy_scope="none")  # type: ignore[arg-type]
    user = 4
    # Execute
    items = rec.recommend(user, k=5)
    # Assert
    assert len(items) == 5 and not {rec.item_index[x["item"]] for x in items} & rec.seen[user]
    terms = rec.terms(user, np.array([rec.item_index[items[0]["item"]]]))
    e = items[0]["explanation"]
    assert abs(sum(e["terms"].values()) - items[0]["score"]) < 1e-5
    assert e["history"][0]["contribution"] == pytest.approx(terms.history[np.abs(terms.history[:, 0]).argmax(), 0])
    assert [x["score"] for x in items] == sorted((x["score"] for x in items), reverse=True)


# --- calibration ---------------------------------------------------------------------------------
def reliability_gap(pred: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Largest |mean predicted - observed rate| over equal-count bins of the prediction."""
    order = np.argsort(pred)
    return max(abs(pred[b].mean() - labels[b].mean()) for b in np.array_split(order, bins))


def test_platt_recovers_known_parameters_and_is_calibrated() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    s = rng.normal(size=40000)
    y = (rng.random(s.size) < 1 / (1 + np.exp(-(2 * s - 1)))).astype(float)
    # Execute
    cal = fit_calibrator(s, y, np.ones_like(s), "platt")
    # Assert
    a, b = cal.params
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-1.0, abs=0.1)
    assert reliability_gap(cal.predict(s), y) < 0.02


def test_platt_weights_equal_repeated_rows() -> None:
    # Prepare: a weight of 3 must act exactly as three copies of the row (the negative weighting relies on it)
    rng = np.random.default_rng(1)
    s, y = rng.normal(size=300), (rng.random(300) < 0.3).astype(float)
    w = rng.integers(1, 4, 300).astype(float)
    # Execute
    weighted = compute_platt_params(s, y, w)
    repeated = compute_platt_params(np.repeat(s, w.astype(int)), np.repeat(y, w.astype(int)),
                                    np.ones(int(w.sum())))
    # Assert
    np.testing.assert_allclose(weighted, repeated, rtol=1e-6)


def test_isotonic_known_value_and_calibrated() -> None:
    # Prepare / Execute: PAV pools the violating pair (1, 0) into 0.5
    x, y = compute_isotonic_fit(np.array([1.0, 2, 3, 4]), np.array([1.0, 0, 1, 1]), np.ones(4))
    # Assert
    np.testing.assert_allclose(y, [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(x, [1.0, 2.0, 3.0, 4.0])
    rng = np.random.default_rng(2)
    s = rng.uniform(-3, 3, 30000)
    truth = np.clip(0.05 + 0.15 * np.floor(s + 3), 0, 1)  # a monotone step function, not a sigmoid
    labels = (rng.random(s.size) < truth).astype(float)
    cal = fit_calibrator(s, labels, np.ones_like(s), "isotonic")
    assert reliability_gap(cal.predict(s), labels) < 0.02


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.booleans(), st.floats(0.1, 10)), min_size=1, max_size=60),
       st.sampled_from(["platt", "isotonic"]))
def test_calibrated_probability_is_monotone_in_the_score(rows: list[tuple[float, bool, float]], method: str) -> None:
    # Prepare
    s, y, w = (np.array([r[k] for r in rows], dtype=float) for k in range(3))
    # Execute
    cal = fit_calibrator(s, y, w, method)
    grid = np.linspace(-6, 6, 200)
    p = cal.predict(grid)
    # Assert: non-decreasing in the score, for any data (Platt's slope is held at >= 0)
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) >= -1e-12)


def test_platt_on_anti_correlated_scores_gives_the_base_rate_not_a_falling_curve() -> None:
    # Prepare: labels that fall with the score (was: a negative slope, rank 1 below rank 2)
    s = np.linspace(-2, 2, 400)
    y = (s < 0).astype(float)
    w = np.where(y > 0, 1.0, 3.0)  # weighted base rate 0.25
    # Execute
    a, b = compute_platt_params(s, y, w)
    # Assert
    assert a == 0.0 and 1 / (1 + np.exp(-b)) == pytest.approx(0.25, rel=1e-9)


def test_unknown_calibration_is_refused() -> None:
    with pytest.raises(ServingError, match="calibration"):
        fit_calibrator(np.zeros(2), np.zeros(2), np.ones(2), "magic")
    assert Calibrator("none").predict(np.array([0.0]))[0] == pytest.approx(0.5)


# --- events --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("doc", "field"), [
    ({"user": 1, "item": 2, "type": "buy"}, "type"), ({"item": 2, "type": "click"}, "user"),
    ({"user": 1, "type": "follow"}, "neighbour"), ({"user": 1, "item": 2, "type": "rating", "value": "x"}, "value"),
    ({"user": 1, "neighbour": 1, "type": "follow"}, "neighbour"), ({"user": True, "item": 2, "type": "view"}, "user"),
    ({"user": 1, "item": 2, "type": "view", "colour": 1}, "colour"), ([1, 2], "object"),
    ({"user": "u" * 1025, "item": 2, "type": "view"}, "'user': an id of 1025 characters"),
    ({"user": 1, "item": "9" * 5000, "type": "click"}, "'item': an id of 5000")])
def test_malformed_events_name_the_field(doc: object, field: str) -> None:
    with pytest.raises(EventError, match=field):
        parse_event(doc)


def test_events_replay_into_the_split_and_grow_local_state(tmp_path: Path) -> None:
    # Prepare
    split = tiny_split()
    path = tmp_path / "events.jsonl"
    docs = [{"user": 0, "item": 5, "type": "purchase"}, {"user": "nova", "item": 7, "type": "click"},
            {"user": "nova", "neighbour": 2, "type": "follow"}, {"user": "nova", "neighbour": 2, "type": "unfollow"},
            {"user": "nova", "neighbour": 3, "type": "follow"}, {"user": 0, "item": 5, "type": "view"}]
    # Execute
    append_events_durably(path, [parse_event(d) for d in docs])
    grown = compute_split_with_events(split, read_events(path))
    # Assert
    assert grown.n_users == split.n_users + 1
    nova = grown.n_users - 1
    assert len(grown.train_items) == len(split.train_items) + 2  # the repeated (0, 5) counts once
    assert {(0, 5), (nova, 7)} <= set(zip(grown.train_users.tolist(), grown.train_items.tolist(), strict=True))
    edges = set(zip(grown.dataset.social_src.tolist(), grown.dataset.social_dst.tolist(), strict=True))
    assert (nova, 3) in edges and (nova, 2) not in edges
    state = compute_grown_local_state({"social_emb.weight": np.ones((split.n_users, 4)), "item_cat": np.ones(40)},
                                      grown.n_users)
    assert state["social_emb.weight"].shape == (grown.n_users, 4) and not state["social_emb.weight"][-1].any()
    assert state["item_cat"].shape == (40,)
    # regression: the replay keeps the catalogue's and users' features (a new user's are missing: code 0)
    assert grown.dataset.item_price_bin is split.dataset.item_price_bin and grown.dataset.item_text is not None
    feats = grown.dataset.user_features
    assert feats is not None and feats.shape == (grown.n_users, 2) and not feats[-1].any()
    codes = compute_grown_local_state({"user_feat": np.ones((split.n_users, 2), np.int64)}, grown.n_users)
    assert "user_feat" not in codes  # rebuilt by the model from the grown data
    with pytest.raises(EventError, match="unknown item"):
        compute_split_with_events(split, [parse_event({"user": 0, "item": 999, "type": "view"})])
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(EventError, match=r"events.jsonl:7"):
        read_events(path)


def test_string_ids_keep_their_spelling_and_odd_ids_are_unknown_not_errors(tmp_path: Path) -> None:
    # Prepare: a data set whose ids are strings ("007" and "7" are two users), as the CSV loader keeps them
    split = tiny_split(n_users=5)
    ids = np.array(["007", "7", "x", "--5", "²"], dtype=object)
    split = SplitData(dataclasses.replace(split.dataset, user_ids=ids), split.train_users, split.train_items,
                      split.val_users, split.val_items, split.test_users, split.test_items)
    rec = Recommender(randomised_model(ModelConfig(dim=8, user_embedding="local", local_refit_steps=1), split, 0),  # type: ignore[arg-type]
                      split, calibration="none", privacy_scope="none", events_path=tmp_path / "events.jsonl")
    # Execute
    external = compute_external_ids(split.dataset)
    found = [rec.index_of(u) for u in ("007", "7", "x", "--5", "²")]
    # Assert: regression: "007" was keyed 7 (two users on one key), "--5", "²" and long digit strings raised
    assert external == ["007", 7, "x", "--5", "²"]
    assert found == [0, 1, 2, 3, 4]
    assert rec.index_of(7) == 1 and rec.index_of(" 7 ") == 1
    for odd in ("1" * 5000, "+7", "٣"):
        with pytest.raises(UnknownUserError):
            rec.index_of(odd)
    assert parse_event({"user": "x" * 1000, "item": 1, "type": "view"}).user == "x" * 1000  # long, still an id
    with pytest.raises(EventError, match="an id of 5000 characters"):
        parse_event({"user": "1" * 5000, "item": 1, "type": "view"})  # longer than any id an event may create


def test_a_category_no_item_has_is_refused_not_an_empty_list() -> None:
    # Prepare: the catalogue's categories are 0..3
    split = tiny_split()
    rec = Recommender(randomised_model(ModelConfig(dim=8, user_embedding="none", use_category=True), split, 2),  # type: ignore[arg-type]
                      split, calibration="none", privacy_scope="none")
    # Execute
    inside = rec.recommend(3, 5, category=2, explain=False)
    # Assert
    assert rec.item_category is not None
    assert inside and all(int(rec.item_category[rec.item_index[x["item"]]]) == 2 for x in inside)
    for missing in (9999, -5):
        with pytest.raises(ServingError,
                           match=rf"no item of this catalogue is in category {missing} \(its categories: 0, 1, 2, 3\)"):
            rec.recommend(3, 5, category=missing)


def test_a_category_is_taken_by_its_name_or_code_and_an_unknown_name_is_refused() -> None:
    # Prepare: the catalogue's four categories named (items.csv gave names; was: only integer codes were taken)
    split = tiny_split()
    names = ("Books", "Garden", "Music", "Toys")
    split = dataclasses.replace(split, dataset=dataclasses.replace(split.dataset, item_category_names=names))
    rec = Recommender(randomised_model(ModelConfig(dim=8, user_embedding="none", use_category=True), split, 2),  # type: ignore[arg-type]
                      split, calibration="none", privacy_scope="none")
    # Execute
    by_name = rec.recommend(3, 5, category="Music", explain=False)
    by_code = rec.recommend(3, 5, category=2, explain=False)
    by_text = rec.recommend(3, 5, category="2", explain=False)  # a query string or CLI argument
    # Assert
    assert by_name == by_code == by_text and by_name
    assert rec.category_labels() == list(names)
    with pytest.raises(ServingError, match=r"no category 'Gardening' in this catalogue \(its categories: 'Books', "
                                           r"'Garden', 'Music', 'Toys'\)"):
        rec.recommend(3, 5, category="Gardening")
    with pytest.raises(ServingError, match="no item of this catalogue is in category 7 .*'Books'"):
        rec.recommend(3, 5, category="7")



def test_a_category_named_by_a_large_integer_is_found_by_that_number() -> None:
    # Integer codes above 65,535 are kept as names (shared/features.py, found in review): asking for the number, as
    # an integer or as text, finds that category, not the code of that value
    split = tiny_split()
    names = ("1000000000000000000", "1000000000000000001", "7", "99999")
    split = dataclasses.replace(split, dataset=dataclasses.replace(split.dataset, item_category_names=names))
    rec = Recommender(randomised_model(ModelConfig(dim=8, user_embedding="none", use_category=True), split, 2),  # type: ignore[arg-type]
                      split, calibration="none", privacy_scope="none")
    assert rec.category_code(10**18 + 1) == rec.category_code("1000000000000000001") == 1
    assert rec.category_code(7) == 2  # the name "7" wins over the code 7 where the catalogue names its categories

def test_an_event_changes_the_list_at_once_and_a_bad_batch_changes_nothing(tmp_path: Path) -> None:
    # Prepare
    split = tiny_split()
    rec = Recommender(randomised_model(ModelConfig(dim=8, user_embedding="local", local_refit_steps=3), split, 5),  # type: ignore[arg-type]
                      split, calibration="none", privacy_scope="none", events_path=tmp_path / "events.jsonl")
    user = 3
    before = [x["item"] for x in rec.recommend(user, 5, explain=False)]
    # Execute
    with pytest.raises(ServingError, match="unknown item"):
        rec.apply_events([parse_event({"user": user, "item": before[0], "type": "purchase"}),
                          parse_event({"user": user, "item": 999, "type": "purchase"})])
    unchanged = [x["item"] for x in rec.recommend(user, 5, explain=False)]
    appended_nothing = not (tmp_path / "events.jsonl").exists()
    rec.apply_events([parse_event({"user": user, "item": i, "type": "purchase"}) for i in before[:2]])
    after = [x["item"] for x in rec.recommend(user, 5, explain=False)]
    # Assert
    assert unchanged == before and appended_nothing
    assert after != before and not set(before[:2]) & set(after)
    assert len(read_events(tmp_path / "events.jsonl")) == 2
    with pytest.raises(UnknownUserError):
        rec.recommend("nobody", 5)


# --- batch lists from a run folder ----------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("serving") / "run")


def test_recommend_writes_k_items_per_user_jsonl_and_csv(run_dir: Path, tmp_path: Path) -> None:
    # Prepare
    out_jsonl, out_csv = tmp_path / "lists.jsonl", tmp_path / "lists.csv"
    # Execute
    rc1 = recommend.main([str(run_dir), "--partner", "partner-0", "--k", "10", "--out", str(out_jsonl)])
    rc2 = recommend.main([str(run_dir), "--partner", "partner-1", "--k", "3", "--out", str(out_csv),
                          "--calibration", "isotonic"])
    # Assert
    assert rc1 == 0 and rc2 == 0
    rows = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    per_user: dict[object, list[int]] = {}
    for r in rows:
        assert set(r) == {"user", "rank", "item", "score", "probability", "explanation"}
        assert 0.0 <= r["probability"] <= 1.0
        per_user.setdefault(r["user"], []).append(r["rank"])
    rec = recommend.load_recommender(recommend.resolve_source(run_dir, "partner-0"))
    assert set(per_user) == set(rec.users) and all(v == list(range(1, 11)) for v in per_user.values())
    probs = [r["probability"] for r in rows if r["user"] == rows[0]["user"]]
    assert probs == sorted(probs, reverse=True)  # monotone in the score
    lines = out_csv.read_text().splitlines()
    assert lines[0] == "user,rank,item,score,probability,explanation" and len(lines) > 1


def test_recommend_refuses_bad_arguments_with_one_line(run_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    bad_suffix = recommend.main([str(run_dir), "--partner", "partner-0", "--out", str(tmp_path / "x.txt")])
    bad_partner = recommend.main([str(run_dir), "--partner", "partner-9", "--out", str(tmp_path / "x.jsonl")])
    bad_user = recommend.main([str(run_dir), "--partner", "partner-0", "--users", "no-such-user",
                               "--out", str(tmp_path / "x.jsonl")])
    not_a_run = recommend.main([str(tmp_path), "--partner", "partner-0", "--out", str(tmp_path / "x.jsonl")])
    # Assert
    err = capsys.readouterr().err
    assert (bad_suffix, bad_partner, bad_user, not_a_run) == (2, 2, 2, 2)
    assert ".jsonl or .csv" in err and "partner-9" in err and "no-such-user" in err and "--checkpoint" in err
    assert "not among partner-0's" in err  # a user of another partner: the message says whose users were searched
    assert "Traceback" not in err


def test_recommend_refuses_unreadable_or_foreign_model_files_with_one_line(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Regression: CheckpointError, TrainerError and numpy's ValueError came out as tracebacks
    # Prepare: a garbage checkpoint, a missing one, another model's, and a copy of the run with torn local state
    import shutil

    from fedsocial.server.checkpoint import Checkpoint, save_checkpoint

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an archive")
    foreign = save_checkpoint(tmp_path / "other",
                              Checkpoint(1, ["item_emb.weight"], [np.zeros((3, 2), np.float32)], {}))
    torn = tmp_path / "torn"
    shutil.copytree(run_dir, torn)
    (torn / "partners" / "partner-0" / "rounds" / "round_0001.npz").write_bytes(b"PK\x03\x04 torn")
    out = ["--out", str(tmp_path / "x.jsonl")]
    # Execute
    codes = [recommend.main([str(run_dir), "--partner", "partner-0", "--checkpoint", str(ck), *out])
             for ck in (garbage, tmp_path / "missing.npz", foreign)]
    codes.append(recommend.main([str(torn), "--partner", "partner-0", *out]))
    # Assert: exit 2 each, one line naming the file or the mismatched parameter
    err = capsys.readouterr().err
    assert codes == [2, 2, 2, 2] and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert str(garbage) in lines[0] and "missing.npz" in lines[1] and "shared parameters mismatch" in lines[2]
    assert "round_0001.npz: unreadable local state" in lines[3]
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("size", [0, 1000])
def test_a_truncated_checkpoint_is_one_line_naming_it(run_dir: Path, tmp_path: Path, size: int,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # Regression (adversarial review): a checkpoint cut short gave zipfile.BadZipFile / EOFError tracebacks
    # Prepare: the run's checkpoint truncated to 1000 bytes, or emptied
    import shutil

    cut = Path(shutil.copytree(run_dir, tmp_path / "cut"))
    path = cut / "checkpoints" / "round_0001.npz"
    path.write_bytes(path.read_bytes()[:size])
    # Execute
    code = recommend.main([str(cut), "--partner", "partner-0", "--out", str(tmp_path / "x.jsonl")])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "round_0001.npz: unreadable checkpoint" in err


def test_partner_training_data_includes_served_events(run_dir: Path) -> None:
    """Regression for the loop: the partner's loader (client/partner.py) replays events.jsonl."""
    from fedsocial.client.partner import Partner, PartnerSettings

    # Prepare
    rec = recommend.load_recommender(recommend.resolve_source(run_dir, "partner-1"), calibration="none")
    user, item = rec.users[0], next(it for it in rec.items if rec.item_index[it] not in rec.seen[0])
    rec.apply_events([parse_event({"user": user, "item": item, "type": "purchase"}),
                      parse_event({"user": "fresh", "neighbour": user, "type": "follow"})])
    settings = PartnerSettings(config_path=run_dir / "config.toml", data_dir=None, run_dir=run_dir,
                               partner_id="partner-1", partner_index=1, num_partitions=2,
                               state_dir=run_dir / "partners" / "partner-1", ledger_dir=run_dir / "ledgers",
                               device="cpu", signing_key=None, num_threads=1)
    # Execute
    partner = Partner(settings)
    reloaded = recommend.load_recommender(recommend.resolve_source(run_dir, "partner-1"), calibration="none")
    # Assert
    pairs = set(zip(partner.split.train_users.tolist(), partner.split.train_items.tolist(), strict=True))
    assert (0, rec.item_index[item]) in pairs and partner.num_users == len(rec.users)
    assert "fresh" in reloaded.user_index and rec.item_index[item] in reloaded.seen[0]


# --- social analysis -----------------------------------------------------------------------------
def test_communities_and_lift_known_values() -> None:
    # Prepare: two 4-cliques joined by one edge
    src, dst = [], []
    for block in (range(4), range(4, 8)):
        for a, b in itertools.permutations(block, 2):
            src.append(a), dst.append(b)  # type: ignore[func-returns-value]
    src.append(3), dst.append(4)  # type: ignore[func-returns-value]
    # Execute
    comms = compute_communities(9, src, dst, seed=0)
    lift = compute_item_lift([1, 1, 2], np.array([1, 1, 2, 2, 3, 3]), 4, min_support=1)
    # Assert
    assert comms[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]] and comms[2] == [8]
    assert lift[0][:2] == (1, pytest.approx((2 / 3) / (2 / 6)))  # item 1: 2/3 of the community vs 1/3 overall
    assert lift[1][:2] == (2, pytest.approx((1 / 3) / (2 / 6)))


def test_social_analysis_of_a_partner(run_dir: Path) -> None:
    # Prepare
    rec = recommend.load_recommender(recommend.resolve_source(run_dir, "partner-0"), calibration="none")
    # Execute
    doc = analyse(rec, k=5)
    # Assert
    assert doc["communities"] and all(0.0 <= c["social_share"] <= 1.0 for c in doc["communities"])
    assert sum(c["size"] for c in doc["communities"]) + doc["isolated_users"] == len(rec.users)
    infl = [x["influence"] for x in doc["influencers"]]
    assert infl == sorted(infl, reverse=True) and all(x > 0 for x in infl)


# --- the serving benchmark's pure parts ---------------------------------------------------------
def test_cold_split_keeps_at_most_two_items_and_moves_the_rest_to_test() -> None:
    from fedsocial.simulations.serve_bench import compute_cold_split, compute_percentiles

    # Prepare
    rng = np.random.default_rng(3)
    pairs = np.unique(np.stack([np.repeat(np.arange(30), 10), rng.integers(0, 200, 300)], 1), axis=0)
    test = rng.random(len(pairs)) < 0.2
    ds = Dataset(30, 200, pairs[:, 0], pairs[:, 1], np.zeros(0, np.int64), np.zeros(0, np.int64))
    split = SplitData(ds, pairs[~test, 0], pairs[~test, 1], np.zeros(0, np.int64), np.zeros(0, np.int64),
                      pairs[test, 0], pairs[test, 1])
    # Execute
    cold_split, cold = compute_cold_split(split, share=0.5, max_items=2, seed=0)
    # Assert: every interaction of a cold user is either one of its <= 2 training items or a test item
    assert len(cold) == round(0.5 * len(np.unique(split.test_users)))
    for u in cold.tolist():
        kept = cold_split.train_items[cold_split.train_users == u]
        tested = cold_split.test_items[cold_split.test_users == u]
        assert 1 <= len(kept) <= 2 and not set(kept) & set(tested)
        assert sorted([*kept, *tested]) == sorted(pairs[pairs[:, 0] == u, 1].tolist())
    assert set(np.unique(cold_split.test_users)) == set(cold.tolist())
    warm = ~np.isin(split.train_users, cold)
    assert int(np.isin(cold_split.train_users, cold, invert=True).sum()) == int(warm.sum())
    p = compute_percentiles([float(v) for v in range(1, 101)])
    assert p["p50_ms"] == pytest.approx(50.5) and p["p99_ms"] == pytest.approx(99.01) and p["n"] == 100


def test_partner_scope_serves_the_locally_adapted_model(tmp_path: Path) -> None:
    """privacy.scope = partner: the served model is client/personalize.py's choice, and it stays local."""
    # Prepare
    run = make_run(tmp_path / "run", ["privacy.scope=\"partner\"", "federation.local_epochs=1"], epochs=1)
    joint = make_run(tmp_path / "joint", epochs=1)
    # Execute
    rec = recommend.load_recommender(recommend.resolve_source(run, "partner-0"), calibration="none")
    plain = recommend.load_recommender(recommend.resolve_source(joint, "partner-0"), calibration="none")
    # Assert
    personal = run / "partners" / "partner-0" / "personal"
    assert (personal / "alone.npz").is_file() and (personal / "finetune.npz").is_file()
    assert not (joint / "partners" / "partner-0" / "personal").exists()
    user = rec.users[0]
    items = rec.recommend(user, 5)
    assert len(items) == 5 and abs(sum(items[0]["explanation"]["terms"].values()) - items[0]["score"]) < 1e-4
    assert len(plain.recommend(user, 5)) == 5


def test_async_refit_gives_the_synchronous_result() -> None:
    """refit_on_event = async (the service's default): the list changes at once, and once the worker is done
    p_u, the list and its exact explanation equal the synchronous refit's."""
    import copy

    # Prepare
    split = tiny_split(seed=4)
    model = randomised_model(ModelConfig(dim=8, user_embedding="local", local_refit_steps=5), split, 9)
    sync = Recommender(copy.deepcopy(model), split, calibration="none", privacy_scope="none")  # type: ignore[arg-type]
    lazy = Recommender(copy.deepcopy(model), split, calibration="none", privacy_scope="none", refit_on_event="async")  # type: ignore[arg-type]
    user = 6
    bought = [x["item"] for x in sync.recommend(user, 2, explain=False)]
    events = [parse_event({"user": user, "item": i, "type": "purchase"}) for i in bought]
    events.append(parse_event({"user": "late", "neighbour": user, "type": "follow"}))
    # Execute
    sync.apply_events(events)
    lazy.apply_events(events)
    at_once = [x["item"] for x in lazy.recommend(user, 5, explain=False)]
    lazy.wait_for_refits()
    # Assert
    assert not set(bought) & set(at_once)
    for u in (user, lazy.index_of("late")):
        np.testing.assert_allclose(lazy.model.local_user[u].numpy(), sync.model.local_user[u].numpy(), atol=1e-6)
        assert lazy.recommend(lazy.users[u], 5) == sync.recommend(sync.users[u], 5)
    top = lazy.recommend(user, 1)[0]
    assert abs(sum(top["explanation"]["terms"].values()) - top["score"]) < 1e-5
    with pytest.raises(ServingError, match="refit_on_event"):
        Recommender(model, split, calibration="none", privacy_scope="none", refit_on_event="later")  # type: ignore[arg-type]


def test_a_request_of_many_users_refits_them_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    from fedsocial.shared import serving
    from fedsocial.shared.models.social import SocialRec

    # Prepare: 2,500 events, each creating a user with one item (one refit per user once blocked the service
    # for minutes: 18 ms each)
    split = tiny_split(seed=5)
    model = randomised_model(ModelConfig(dim=8, user_embedding="local", local_refit_steps=5), split, 3)
    rec = Recommender(copy.deepcopy(model), split, calibration="none", privacy_scope="none")  # type: ignore[arg-type]
    alone = Recommender(copy.deepcopy(model), split, calibration="none", privacy_scope="none")  # type: ignore[arg-type]
    items = [rec.items[i % len(rec.items)] for i in range(2500)]
    events = [parse_event({"user": f"new {i}", "item": it, "type": "view"}) for i, it in enumerate(items)]
    calls: list[int] = []
    inner = SocialRec.refit_local_users

    def counted(self: SocialRec, batch: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(int(batch["users"].shape[0]))
        inner(self, batch, *args, **kwargs)

    monkeypatch.setattr(SocialRec, "refit_local_users", counted)
    # Execute
    rec.apply_events(events)
    batched = list(calls)
    alone.apply_events(events[:1])  # the first user on its own: the per-user path
    # Assert: three batched refits of at most REFIT_CHUNK users cover all 2,500; each user's p_u is its own
    # convex fit, so the first user's batched vector is close to the one refitted alone (other negatives)
    assert batched == [serving.REFIT_CHUNK, serving.REFIT_CHUNK, 2500 - 2 * serving.REFIT_CHUNK]
    first = rec.index_of("new 0")
    assert first == alone.index_of("new 0")
    a, b = rec.model.local_user[first].numpy(), alone.model.local_user[first].numpy()
    assert np.linalg.norm(a) > 0 and np.linalg.norm(a - b) < 0.5 * np.linalg.norm(b)


def test_recommend_from_a_deployed_partner_folder(run_dir: Path, tmp_path: Path) -> None:
    """A folder written by `fedsocial partition` (partner.toml + data) and the global parameters it received."""
    from fedsocial.simulations import partition_cmd
    from tests.serving_run import ROOT, SMALL

    # Prepare
    sets = [a for kv in SMALL for a in ("--set", kv)]
    assert partition_cmd.main(["--config", str(ROOT / "configs" / "demo.toml"), *sets, "--partners", "2",
                               "--out", str(tmp_path / "parts")]) == 0
    folder = tmp_path / "parts" / "partner_1"
    out = tmp_path / "lists.jsonl"
    # Execute
    rc = recommend.main([str(folder), "--partner", "partner_1", "--checkpoint",
                         str(run_dir / "checkpoints" / "round_0001.npz"), "--k", "4", "--out", str(out)])
    missing = recommend.main([str(folder), "--partner", "partner_1", "--out", str(out)])
    # Assert
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    users = {r["user"] for r in rows}
    assert rc == 0 and len(rows) == 4 * len(users) and users
    assert missing == 2


def test_each_kind_of_source_finds_the_partners_ledger(run_dir: Path, tmp_path: Path) -> None:
    # Prepare: a deployed partner folder (its partner.toml names ledger-dir), and the run folder
    from fedsocial.simulations import partition_cmd
    from tests.serving_run import ROOT, SMALL

    sets = [a for kv in SMALL for a in ("--set", kv)]
    assert partition_cmd.main(["--config", str(ROOT / "configs" / "demo.toml"), *sets, "--partners", "2",
                               "--out", str(tmp_path / "parts")]) == 0
    folder = tmp_path / "parts" / "partner_1"
    ckpt = str(run_dir / "checkpoints" / "round_0001.npz")
    # Execute
    run = recommend.resolve_source(run_dir, "partner-0")
    deployed = recommend.resolve_source(folder, "partner_1", checkpoint=ckpt)
    explicit = recommend.resolve_source(folder / "data", "partner_1", config=str(run_dir / "config.toml"),
                                        checkpoint=ckpt, state_dir=str(folder / "state"))
    given = recommend.resolve_source(folder / "data", "partner_1", config=str(run_dir / "config.toml"),
                                     checkpoint=ckpt, state_dir=str(folder / "state"), ledger_dir=str(tmp_path))
    # Assert: the run's ledgers/, partner.toml's ledger-dir, unknown without --ledger-dir, or the one given
    assert run.ledger_path == run_dir / "ledgers" / "partner-0.jsonl"
    assert deployed.ledger_path == (folder / "ledger" / "partner_1.jsonl").resolve()
    assert explicit.ledger_path is None and given.ledger_path == tmp_path / "partner_1.jsonl"
    assert recommend.read_selection_charges(explicit.ledger_path) is None


def test_an_event_id_is_an_integer_exactly_when_the_loader_would_make_it_one() -> None:
    # Prepare: ids at and beyond int64 (was: the service made "9223372036854775808" an int, which the loader
    # keeps as a string, so an event for that user created a second one)
    from fedsocial.shared.events import compute_external_id
    from fedsocial.shared.loaders import _typed_ids

    # ("-0": found in review, the service made it the integer 0, merging two users the loader keeps apart)
    cases = ["9223372036854775807", "-9223372036854775808", "9223372036854775808", "-9223372036854775809", "12",
             "-0", "0", "-7", "007"]
    # Execute
    service = [compute_external_id(c) for c in cases]
    loader = [_typed_ids(np.array([c, "1"]))[0] for c in cases]
    # Assert
    assert [type(v) is int for v in service] == [isinstance(v, np.integer) for v in loader] == [
        True, True, False, False, True, False, True, True, False]
    assert [str(v) for v in service] == cases


def test_recommend_refuses_local_state_of_data_that_changed_since_the_run(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Regression: after users were added to the data, the partition moved every user and the saved per-user rows
    # (social table, p_u) were silently served to other users (zero-padded for the "new" ones)
    # Prepare: a copy of the run whose data now has 20 more users
    import shutil

    grown = tmp_path / "grown"
    shutil.copytree(run_dir, grown)
    config = grown / "config.toml"
    text = config.read_text(encoding="utf-8")
    assert "n_users = 160" in text
    config.write_text(text.replace("n_users = 160", "n_users = 180"), encoding="utf-8")
    out = tmp_path / "x.jsonl"
    # Execute
    rc = recommend.main([str(grown), "--partner", "partner-0", "--out", str(out)])
    rc_same = recommend.main([str(run_dir), "--partner", "partner-0", "--out", str(out)])
    # Assert: one line naming the state, the round and both user counts; the unchanged run still serves
    err = capsys.readouterr().err
    assert rc == 2 and rc_same == 0 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert "partner-0's local state of round 1 holds" in line and "the data changed since the run" in line


def test_serve_refuses_a_busy_port_before_loading_the_model(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # Regression: the model loaded (tens of seconds), "serving ... on http://..." was printed, then uvicorn's
    # own ERROR line and exit 1
    # Prepare: another process's socket on a port (a folder that is not a run: the port is checked first)
    import socket

    from fedsocial.simulations import serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # Execute
        rc = serve.main([str(tmp_path), "--partner", "partner-0", "--port", str(port)])
    # Assert: exit 2, one line naming the port, nothing claims to serve
    captured = capsys.readouterr()
    assert rc == 2 and "serving" not in captured.out
    assert captured.err.strip() == captured.err.strip().splitlines()[0]
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in captured.err


def test_recommend_replaces_an_earlier_list_but_never_another_file(run_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Regression (adversarial review): --out interactions.csv silently overwrote the partner's training data
    # Prepare: a data file, and earlier lists in both formats
    data = tmp_path / "interactions.csv"
    data.write_text("user,item\n1,2\n")
    args = [str(run_dir), "--partner", "partner-0", "--k", "2", "--users"]
    assert recommend.main([*args[:-1], "--out", str(tmp_path / "all.jsonl")]) == 0
    first_user = json.loads((tmp_path / "all.jsonl").read_text().splitlines()[0])["user"]
    assert recommend.main([*args, str(first_user), "--out", str(tmp_path / "l.csv")]) == 0
    capsys.readouterr()
    # Execute
    refused = recommend.main([*args, str(first_user), "--out", str(data)])
    again_jsonl = recommend.main([*args, str(first_user), "--out", str(tmp_path / "all.jsonl")])
    again_csv = recommend.main([*args, str(first_user), "--out", str(tmp_path / "l.csv")])
    # Assert: the data file kept, one line naming it; the earlier lists replaced
    err = capsys.readouterr().err
    assert refused == 2 and data.read_text() == "user,item\n1,2\n"
    assert f"--out {data}: exists and is not an earlier list" in err and "Traceback" not in err
    assert again_jsonl == 0 and again_csv == 0
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("partner", ["../partners/partner-0", "./partner-0", "partner-0/", ".hidden"])
def test_a_partner_given_as_a_path_is_refused(run_dir: Path, tmp_path: Path, partner: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Regression (adversarial review): "../partners/partner-0" served partner-0's lists while the ledger lookup
    # (ledgers/../partners/partner-0.jsonl) missed the partner's ledger
    code = recommend.main([str(run_dir), "--partner", partner, "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "a partner id is" in err and "Traceback" not in err
