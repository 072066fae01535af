"""The ``product`` selection candidate (shared/models/prior.py ProductRanking): the DP model's score plus the
personalised prior's, chosen by the joint-scope DP selection among three candidates
(``privacy.selection_candidates``), evaluated and served as chosen, and its terms explaining exactly its score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsocial.shared.metrics import evaluate_model
from fedsocial.shared.models import prior as P
from fedsocial.shared.privacy import selection
from fedsocial.shared.privacy.selection import load_selection_release, read_served_choice
from fedsocial.shared.serving import Recommender
from tests.partner_run import ledger_of, make_partner
from tests.test_category_prior import _trainer
from tests.test_selection import selection_config

THREE = "model,prior,product"


def test_the_product_scores_are_the_models_plus_the_priors_for_every_user_and_item(tmp_path: Path) -> None:
    # Prepare: a model with item categories and random biases
    trainer = _trainer(tmp_path)
    batch = trainer.builder.eval_batch(np.arange(6))
    # Execute
    got = P.ProductRanking(trainer.model).full_sort_predict(batch)
    # Assert: the sum of the two experts' log scores, exactly
    expected = trainer.model.full_sort_predict(batch) + P.PriorRanking(trainer.model).full_sort_predict(batch)
    torch.testing.assert_close(got, expected)
    assert P.candidate_model("model", trainer.model) is trainer.model
    assert isinstance(P.candidate_model("prior", trainer.model), P.PriorRanking)
    with pytest.raises(ValueError, match="unknown candidate"):
        P.candidate_model("best", trainer.model)


def test_serving_the_product_ranks_by_its_scores_with_terms_that_add_up(tmp_path: Path) -> None:
    # Prepare: the service over the same model, the product as the DP selection's choice
    trainer = _trainer(tmp_path)
    model, split = trainer.model, trainer.split
    rec = Recommender(model, split, calibration="none", privacy_scope="none", ranking="product")
    plain = Recommender(model, split, calibration="none", privacy_scope="none", ranking="model")
    u = int(split.train_users[0])
    own = torch.as_tensor(list(rec.history[u]), dtype=torch.long).reshape(1, -1)
    prior = P.PriorRanking(model).full_sort_predict({"users": torch.tensor([u]), "bag": own,
                                                     "bag_mask": torch.ones(own.shape)})[0]
    # Execute
    scores = rec.scores(u)
    rows = rec.recommend(rec.users[u], k=5)
    ids = np.array([rec.item_index[r["item"]] for r in rows])
    terms = rec.terms(u, ids)
    # Assert: the model's served score plus the prior's; the list and the explanation agree with it
    torch.testing.assert_close(scores, plain.scores(u) + prior.float(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([r["score"] for r in rows], scores[ids].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms.total(), scores[ids].numpy(), rtol=1e-5, atol=1e-5)
    assert {r["explanation"]["reason"] for r in rows} == {"product"}


def test_a_partner_choosing_among_three_serves_and_reports_the_product(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: three candidates; the noisy differences forced to favour the product (post-processing of any
    # release is as private), the real mechanism's sensitivity recorded
    seen: list[float] = []
    real = selection.compute_noisy_differences

    def favour_product(diffs: np.ndarray, sigma: float, rng: np.random.Generator, candidates: tuple[str, ...]
                       ) -> np.ndarray:
        seen.append(selection.compute_selection_sensitivity(candidates))
        assert real(diffs, sigma, rng, candidates).shape == (2,)
        return np.array([0.5, 1.0])

    monkeypatch.setattr(selection, "compute_noisy_differences", favour_product)
    cfg = selection_config()
    cfg = cfg.replace("privacy", selection_candidates=THREE)
    partner = make_partner(tmp_path, cfg)
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)
    trainer, _ = partner._prepared_trainer(new, 1)
    trainer.refit_local()
    product, _ = evaluate_model(P.ProductRanking(trainer.model), partner.split, "test", builder=trainer.builder)
    # Execute
    partner.evaluate(new, 1)
    # Assert: served and kept metrics are the product's; the release names its candidates; charged once
    state = partner.settings.state_dir
    local = json.loads((state / "eval" / "round_0001.json").read_text())
    assert local["ndcg@10"] == pytest.approx(product["ndcg@10"])
    release = load_selection_release(state, 1)
    assert release is not None and release["candidates"] == ["model", "prior", "product"]
    assert release["choice"] == "product" and seen == [pytest.approx(2 ** 0.5)]
    charges = [e for e in ledger_of(tmp_path) if e.get("release") == "selection"]
    assert len(charges) == 1 and charges[0]["noise_multiplier"] == cfg.privacy.selection_noise_multiplier
    assert read_served_choice(state, charges) == "product"


def test_an_uncharged_release_among_other_candidates_is_drawn_again_not_reused(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a release saved (not charged) under the two default candidates, then the config names three
    partner = make_partner(tmp_path, selection_config().replace("privacy", selection_candidates=THREE))
    _, initial = partner.initial_parameters()
    new, _, _ = partner.fit(initial, 1)
    state = partner.settings.state_dir
    stale = selection.compute_selection_release(1, partner.cfg.privacy.selection_noise_multiplier,
                                                np.array([9.0]), 10)
    selection.save_selection_release(state, stale)
    # Execute
    partner.evaluate(new, 1)
    # Assert: the charged release is one among the config's three candidates, not the stale one
    release = load_selection_release(state, 1)
    assert release is not None and release["candidates"] == THREE.split(",")
    assert release["digest"] != stale["digest"]


def test_a_release_whose_candidates_were_altered_is_not_trusted(tmp_path: Path) -> None:
    # Prepare: a saved release, then its candidates rewritten (digest recomputed by the attacker or not)
    state = tmp_path / "state"
    release = selection.compute_selection_release(3, 2.0, np.array([1.0, -1.0]), 20, ("model", "prior", "product"))
    selection.save_selection_release(state, release)
    path = selection.selection_release_path(state, 3)
    doc = json.loads(path.read_text())
    # Execute / Assert: a candidate list the mechanism never allows, or a choice outside it, is refused
    for cands, choice in ((["prior", "model"], "prior"), (["model", "model"], "model"), (["model"], "model"),
                          (["model", "prior"], "product")):
        body = {**{k: v for k, v in doc.items() if k != "digest"}, "candidates": cands, "choice": choice}
        path.write_text(json.dumps({**body, "digest": selection._digest(body)}))
        assert load_selection_release(state, 3) is None, cands
