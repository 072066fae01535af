"""The joint-scope ``prior`` personalised by each user's own category shares (shared/models/prior.py).

Known values by hand, a brute-force cross-check of the whole score matrix, the two limits (no items: the plain
prior; no categories: the plain prior), the privacy property (a user's scores depend on the DP parameters and
that user's own items only) and the same scores in serving, moved by the user's own events.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fedsocial.shared.metrics import evaluate_model
from fedsocial.shared.models import prior as P
from fedsocial.shared.serving import Recommender
from fedsocial.shared.trainer import LocalTrainer
from tests.partner_run import make_partner
from tests.test_federation import tiny_config


def test_known_values_of_the_affinity_and_the_within_category_prior() -> None:
    # Prepare: 4 items in 2 categories, prior scores log(1), log(3) | log(2), log(2); a user with 3 items in
    # category 0 and none in 1
    scores = torch.log(torch.tensor([1.0, 3.0, 2.0, 2.0]))
    cats = torch.tensor([0, 0, 1, 1])
    counts = torch.tensor([[3.0, 0.0]])

    # Execute
    log_mass = P.compute_category_log_mass(scores, cats)
    affinity = P.compute_category_affinity(counts, log_mass, pseudocount=1.0)
    out = P.compute_category_prior_scores(scores, cats, log_mass, affinity)

    # Assert: masses 4 and 4, so g = (1/2, 1/2); P(c | u) = (3 + 1/2) / 4 and (0 + 1/2) / 4
    torch.testing.assert_close(log_mass, torch.log(torch.tensor([4.0, 4.0])))
    torch.testing.assert_close(affinity, torch.log(torch.tensor([[3.5 / 4, 0.5 / 4]])))
    expected = torch.tensor([[0.25 * 3.5 / 4, 0.75 * 3.5 / 4, 0.5 * 0.5 / 4, 0.5 * 0.5 / 4]]).log()
    torch.testing.assert_close(out, expected)
    assert math.isclose(float(out.exp().sum()), 1.0, rel_tol=1e-6)  # a distribution over the catalogue


def test_a_user_without_items_ranks_by_the_plain_prior() -> None:
    # Prepare: random prior over 50 items in 5 categories
    gen = torch.Generator().manual_seed(0)
    scores, cats = torch.randn(50, generator=gen), torch.randint(0, 5, (50,), generator=gen)
    log_mass = P.compute_category_log_mass(scores, cats)
    # Execute
    out = P.compute_category_prior_scores(scores, cats, log_mass,
                                          P.compute_category_affinity(torch.zeros(1, 5), log_mass))
    # Assert: the prior minus a constant (log of the total mass)
    torch.testing.assert_close(out[0], scores - torch.logsumexp(scores, 0))


def _trainer(tmp_path: Path) -> LocalTrainer:
    cfg = tiny_config().replace("model", use_category=True).replace("privacy", enabled=False)
    partner = make_partner(tmp_path, cfg)
    trainer = LocalTrainer(cfg, partner.split, device="cpu", seed=1)
    with torch.no_grad():  # distinct biases: the prior
        trainer.model.item_bias.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    return trainer


def test_the_prior_ranking_equals_a_brute_force_per_user_and_per_item(tmp_path: Path) -> None:
    # Prepare: a model with item categories (synthetic topics) and random biases
    trainer = _trainer(tmp_path)
    model, split = trainer.model, trainer.split
    users = np.arange(6)
    batch = trainer.builder.eval_batch(users)

    # Execute
    got = P.PriorRanking(model).full_sort_predict(batch)

    # Assert: log(exp(b_i) / sum_{j in c(i)} exp(b_j)) + log((n_uc + g_c) / (n_u + 1)), written out with loops
    b = model.item_biases().detach().double().numpy()
    cat = model.item_cat.numpy()
    mass = np.array([np.exp(b[cat == c]).sum() for c in range(cat.max() + 1)])
    g = mass / mass.sum()
    for row, u in enumerate(users):
        own = split.train_items[split.train_users == u]
        n_u = len(np.unique(own))
        for i in range(model.n_items):
            c = cat[i]
            n_uc = len(np.unique(own[cat[own] == c]))
            expected = b[i] - math.log(mass[c]) + math.log((n_uc + g[c]) / (n_u + 1.0))
            assert abs(float(got[row, i]) - expected) < 1e-4, (u, i)


def test_a_users_prior_scores_depend_only_on_the_dp_parameters_and_their_own_items(tmp_path: Path) -> None:
    # Prepare: the same model; a second split in which every other user's training items are replaced
    trainer = _trainer(tmp_path)
    split = trainer.split
    u = int(split.train_users[0])
    others = split.train_users != u
    rng = np.random.default_rng(3)
    items = split.train_items.copy()
    items[others] = rng.integers(0, split.n_items, int(others.sum()))
    from dataclasses import replace

    changed = replace(split, train_items=items)
    from fedsocial.shared.batching import ExampleBuilder

    # Execute
    a = P.PriorRanking(trainer.model).full_sort_predict(trainer.builder.eval_batch(np.array([u])))
    b = P.PriorRanking(trainer.model).full_sort_predict(
        ExampleBuilder.from_split(changed, trainer.cfg.model).eval_batch(np.array([u])))

    # Assert: joint DP needs exactly this (the billboard model): nothing of another user reaches u's ranking
    assert torch.equal(a, b)


def test_without_item_categories_the_prior_ranking_is_the_plain_prior(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.model.item_cat = torch.zeros(0, dtype=torch.long)  # a model without model.use_category
    got = P.PriorRanking(trainer.model).full_sort_predict(trainer.builder.eval_batch(np.arange(4)))
    assert torch.equal(got, trainer.model.item_biases().detach().expand(4, -1))


def test_serving_ranks_by_the_same_scores_with_exact_terms_and_the_users_events_move_them(tmp_path: Path) -> None:
    # Prepare: the service over the same model, the prior as the DP selection's choice
    trainer = _trainer(tmp_path)
    model, split = trainer.model, trainer.split
    rec = Recommender(model, split, calibration="none", privacy_scope="none", ranking="prior")
    u = int(split.train_users[0])
    own = torch.as_tensor(list(rec.history[u]), dtype=torch.long).reshape(1, -1)  # what the service knows of u
    expected = P.PriorRanking(model).full_sort_predict({"users": torch.tensor([u]), "bag": own,
                                                        "bag_mask": torch.ones(own.shape)})[0]

    # Execute
    scores = rec.scores(u)
    rows = rec.recommend(rec.users[u], k=5)
    ids = np.array([rec.item_index[r["item"]] for r in rows])
    terms = rec.terms(u, ids)

    # Assert: the evaluation's scores, the list ranked by them, terms that add up to them
    torch.testing.assert_close(scores, expected.float())
    np.testing.assert_allclose([r["score"] for r in rows], expected[ids].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms.total(), expected[ids].numpy(), rtol=1e-5, atol=1e-6)
    assert np.any(terms.user != 0)  # the user's category share is its own term

    # Execute: the user's items now all in one category (what their clicks and purchases would add)
    c = int(model.item_cat[ids[-1]])
    bag = [int(i) for i in np.flatnonzero(model.item_cat.numpy() == c)][:10]
    moved = rec.scores(u, bag=bag)
    # Assert: that category's items gain against every other's
    in_c = model.item_cat == c
    assert float((moved - scores)[in_c].min()) > float((moved - scores)[~in_c].max())


def test_the_trainers_prior_evaluation_uses_the_personalised_prior(tmp_path: Path) -> None:
    # the evaluation a DP selection reads: better than the plain prior on data whose users stick to topics
    trainer = _trainer(tmp_path)
    personal = evaluate_model(P.PriorRanking(trainer.model), trainer.split, "test", builder=trainer.builder)[0]
    trainer.model.item_cat = torch.zeros(0, dtype=torch.long)
    plain = evaluate_model(P.PriorRanking(trainer.model), trainer.split, "test", builder=trainer.builder)[0]
    assert personal["ndcg@10"] > plain["ndcg@10"]


def test_the_config_turns_the_category_personalisation_off(tmp_path: Path) -> None:
    # Prepare: the same model under model.prior_by_category = false
    trainer = _trainer(tmp_path)
    trainer.model.model_cfg = trainer.model.model_cfg.__class__(**{**trainer.model.model_cfg.__dict__,
                                                                   "prior_by_category": False})
    # Execute
    got = P.PriorRanking(trainer.model).full_sort_predict(trainer.builder.eval_batch(np.arange(4)))
    # Assert
    assert P.category_index(trainer.model) is None
    assert torch.equal(got, trainer.model.item_biases().detach().expand(4, -1))
