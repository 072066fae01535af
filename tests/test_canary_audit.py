"""Canary users and the one-run audit on a real (small) training run."""

from __future__ import annotations

import numpy as np

from fedsocial.shared.config import load_config
from fedsocial.shared.loaders import load_dataset
from fedsocial.shared.split import split_dataset
from fedsocial.simulations.canary_audit import plant_canaries, run_canary_audit

SMALL = ["data.n_users=200", "data.n_items=300", "federation.partners=1", "federation.min_partners=1",
         "federation.rounds=2", "federation.local_epochs=4", "train.batch_size=64", "train.lr=0.01",
         "model.dim=16", "model.mlp_hidden=16", "model.user_embedding=\"local\"", "model.local_refit_steps=5"]


def test_plant_canaries_includes_each_record_or_leaves_it_empty() -> None:
    # Prepare
    cfg = load_config(None, SMALL)
    split = split_dataset(load_dataset(cfg.data, None), cfg.split)
    # Execute
    planted, items, included = plant_canaries(split, 50, 5, np.random.default_rng(1))
    # Assert
    n = split.n_users
    assert planted.n_users == n + 50 and items.shape == (50, 5)
    canary_rows = planted.train_users >= n
    assert canary_rows.sum() == 5 * included.sum()
    for c in np.flatnonzero(included)[:5]:
        got = np.sort(planted.train_items[planted.train_users == n + c])
        assert np.array_equal(got, np.sort(items[c]))
    assert not np.isin(n + np.flatnonzero(~included), planted.train_users).any()


def test_attack_detects_non_private_training_and_dp_bound_stays_below_epsilon() -> None:
    # Prepare
    cfg = load_config(None, SMALL)
    # Execute
    plain = run_canary_audit(cfg, None, m=300, items_each=5, partner=0)
    private = run_canary_audit(cfg.replace("privacy", enabled=True, max_epsilon=1.0), None, m=300,
                               items_each=5, partner=0)
    # Assert: the attack separates members without DP; with DP the bound respects the accounting
    assert plain["score_gap"] > 0.05
    assert plain["epsilon_lower_bound"] > 0.5
    assert private["reported_epsilon"] <= 1.0 + 1e-6
    assert private["epsilon_lower_bound"] <= private["reported_epsilon"]


def test_canary_scores_are_the_models_own_ranking_with_temperature_bias_scale_and_categories() -> None:
    # Prepare: a model with every scoring feature the old re-implementation left out, random weights
    import dataclasses

    import torch

    from fedsocial.shared.batching import ExampleBuilder
    from fedsocial.shared.trainer import LocalTrainer
    from fedsocial.simulations.canary_audit import compute_canary_percentiles

    cfg = load_config(None, [*SMALL, "model.temperature=0.5", "model.bias_scale=4.0", "model.use_category=true"])
    split = split_dataset(load_dataset(cfg.data, None), cfg.split)
    rng = np.random.default_rng(3)
    items = np.stack([rng.choice(split.dataset.n_items, size=5, replace=False) for _ in range(8)])
    n = split.n_users
    trainer = LocalTrainer(cfg, dataclasses.replace(split, dataset=dataclasses.replace(split.dataset, n_users=n + 8,
                                                                                        user_ids=None)))
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    users = n + np.arange(8)
    # Execute
    got = compute_canary_percentiles(trainer.model, users, items)
    # Assert: the evaluation path (ExampleBuilder.eval_batch -> full_sort_predict) of users whose training
    # items are each canary's items but the first ranks the first item at the same percentile
    held_out = dataclasses.replace(split, dataset=dataclasses.replace(split.dataset, n_users=n + 8, user_ids=None),
                                   train_users=np.concatenate([split.train_users, np.repeat(users, 4)]),
                                   train_items=np.concatenate([split.train_items, items[:, 1:].reshape(-1)]))
    batch = ExampleBuilder.from_split(held_out, cfg.model).eval_batch(users)
    batch["nbr_mask"] = torch.zeros_like(batch["nbr_mask"])  # canaries have no neighbours
    with torch.no_grad():
        scores = trainer.model.full_sort_predict(batch)
    own = scores.gather(1, torch.as_tensor(items[:, :1]))
    expected = (scores < own).float().mean(-1).numpy()
    np.testing.assert_allclose(got[:, 0], expected, atol=1e-6)
    assert cfg.model.temperature == 0.5 and trainer.model.cat_emb is not None
