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
