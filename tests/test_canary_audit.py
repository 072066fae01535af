"""Canary users and the one-run audit on a real (small) training run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

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


def _csv_copy(tmp_path: Path, name: str, shuffle: bool) -> list[str]:
    """SMALL's synthetic data written as a generic CSV data set (a 'real' one to the loader); ``shuffle``: the
    interactions dealt to other users (the same sizes, other records)."""

    from fedsocial.shared.csvio import write_csv_dataset

    ds = load_dataset(load_config(None, SMALL).data, None)
    if shuffle:
        perm = np.random.default_rng(5).permutation(ds.n_items)  # items relabelled: every user, other items
        ds = dataclasses.replace(ds, items=perm[ds.items])
    write_csv_dataset(ds, tmp_path / name)
    return [*SMALL, "data.format=\"csv\"", f"data.path=\"{tmp_path / name}\""]


def test_a_synthetic_background_uses_no_real_record_and_costs_nothing(tmp_path: Path) -> None:
    # Prepare: two 'real' data sets of the same sizes whose users hold different records
    one, other = _csv_copy(tmp_path, "one", False), _csv_copy(tmp_path, "other", True)
    # Execute
    a = run_canary_audit(load_config(None, one), None, m=60, items_each=3, partner=0, background="synthetic")
    b = run_canary_audit(load_config(None, other), None, m=60, items_each=3, partner=0, background="synthetic")
    real = run_canary_audit(load_config(None, one), None, m=60, items_each=3, partner=0, background="real")
    # Assert: the generated background depends on sizes only, so the result cannot tell the two apart
    assert a["background"] == "synthetic" and a["privacy_cost"]["real_users"] is False
    assert a["score_gap"] == b["score_gap"] and a["epsilon_lower_bound"] == b["epsilon_lower_bound"]
    assert real["background"] == "real" and real["privacy_cost"]["real_users"] is True


def test_a_canary_audit_on_real_users_states_its_cost_in_the_file_the_audit_and_the_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a DP canary run on a 'real' data set, written into a run folder the audit reads
    import json

    from fedsocial.simulations.audit import main as audit_main
    from fedsocial.simulations.canary_audit import main as canary_main

    spec = _csv_copy(tmp_path, "data", False)
    run = tmp_path / "run"
    args = ["--config", "configs/demo.toml", *[x for s in spec for x in ("--set", s)], "--set", "privacy.enabled=true",
            "--canaries", "40", "--canary-items", "3", "--background", "real", "--out", str(run)]
    # Execute
    assert canary_main(args) == 0
    doc = json.loads((run / "canary_audit.json").read_text())
    audit_main([str(run)])
    output = capsys.readouterr()
    # Assert
    cost = doc["privacy_cost"]
    assert cost["real_users"] is True and cost["epsilon"] == doc["reported_epsilon"] > 0 and cost["partner"] == 0
    assert "canary_audit.json was computed on partner 0's real users" in output.err + output.out
    assert "second use of their data" in (run / "privacy_report.html").read_text()


def test_a_synthetic_background_keeps_the_public_catalogue_and_draws_user_features(tmp_path: Path) -> None:
    # Prepare: a 'real' data set with items.csv (titles: text features) and users.csv (a private column)
    from fedsocial.simulations.canary_audit import compute_synthetic_background

    spec = _csv_copy(tmp_path, "data", False)
    folder = tmp_path / "data"
    ds = load_dataset(load_config(None, spec).data, None)
    (folder / "items.csv").write_text("item,title\n" + "".join(f"{i},shoe model {i % 5}\n" for i in range(ds.n_items)))
    (folder / "users.csv").write_text("user,region\n" + "".join(f"{u},{'nsew'[u % 4]}\n" for u in range(ds.n_users)))
    cfg = load_config(None, [*spec, "model.use_text=true", "model.use_user_features=true"])
    split = split_dataset(load_dataset(cfg.data, None), cfg.split)
    # Execute
    background = compute_synthetic_background(cfg, split, seed=0)
    result = run_canary_audit(cfg, None, m=40, items_each=3, partner=0)  # the default background
    # Assert: the catalogue's text features kept, user-feature codes generated within the column's size
    bg = background.dataset
    assert bg.n_users == split.n_users and bg.n_items == split.n_items
    assert np.array_equal(bg.item_text, split.dataset.item_text)
    assert bg.user_features is not None and bg.user_feature_sizes == split.dataset.user_feature_sizes
    assert bg.user_features.max() < bg.user_feature_sizes[0]
    assert not np.array_equal(bg.users, split.dataset.users[: len(bg.users)])
    # regression: the background's activity is the generator's public default, not the partner's mean
    doubled = dataclasses.replace(split, train_users=np.concatenate([split.train_users, split.train_users]),
                                  train_items=np.concatenate([split.train_items, split.train_items]))
    again = compute_synthetic_background(cfg, doubled, seed=0).dataset
    assert np.array_equal(again.users, bg.users) and np.array_equal(again.items, bg.items)
    assert result["background"] == "synthetic" and result["privacy_cost"]["real_users"] is False
    # regression: canaries planted among users with features get code 0 ("missing"); this raised before
    planted = run_canary_audit(cfg, None, m=20, items_each=3, partner=0, background="real")
    assert planted["background"] == "real" and planted["canaries"] == 20
