"""The trainer: DP steps, calibration and accounting, seeding, early stopping, the local-round API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsocial.shared.config import Config, DataConfig, ModelConfig, TrainConfig
from fedsocial.shared.data import SplitData
from fedsocial.shared.metrics import METRIC_KEYS, evaluate_model
from fedsocial.shared.privacy.accounting import PrivacyConfigError, calibrate_noise_multiplier, compute_epsilon
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.shared.trainer import (
    LocalTrainer,
    TrainerError,
    compute_sample_rate,
    train_centralized,
)


def _cfg(**sections: object) -> Config:
    base = Config(data=DataConfig(n_users=80, n_items=90, interactions_per_user=10.0),
                  model=ModelConfig(dim=16, mlp_hidden=16, num_negatives=16, loss="softmax"),
                  train=TrainConfig(epochs=3, batch_size=16, lr=5e-3, patience=0))
    for name, values in sections.items():
        base = base.replace(name, **values)  # type: ignore[arg-type]
    return base


def _split(cfg: Config) -> SplitData:
    return split_dataset(generate(cfg.data), cfg.split)


def test_dp_fit_changes_parameters_and_reports_its_accounting_entry() -> None:
    # Prepare
    cfg = _cfg(privacy={"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.5})
    split = _split(cfg)
    trainer = LocalTrainer(cfg, split, seed=1)
    before = trainer.get_shared()
    # Execute
    res = trainer.fit(2)
    # Assert: every shared parameter moved; (sigma, q, steps) as Opacus counts them
    after = trainer.get_shared()
    assert all(not np.allclose(before[n], after[n]) for n in before)
    q = compute_sample_rate(split.n_users, cfg.train.batch_size)
    assert res.sample_rate == pytest.approx(q) and res.steps == 2 * round(1 / q)
    assert res.noise_multiplier == 1.0 and res.max_grad_norm == 0.5 and res.num_examples == split.n_users
    assert res.epsilon == pytest.approx(compute_epsilon([(1.0, q, res.steps)], cfg.privacy.target_delta))
    assert not hasattr(next(trainer.model.parameters()), "grad_sample")  # Opacus hooks removed


def test_dp_training_calibrates_noise_to_the_budget() -> None:
    # Prepare: noise 0 means "calibrate to max_epsilon over the fixed schedule"
    cfg = _cfg(privacy={"enabled": True, "max_epsilon": 4.0, "epochs": 3}, model={"user_embedding": "local"})
    # Execute
    out = train_centralized(cfg, _split(cfg))
    # Assert
    assert out.epsilon is not None and 0.95 * 4.0 <= out.epsilon <= 4.0 + 1e-9
    assert out.noise_multiplier == pytest.approx(
        calibrate_noise_multiplier(4.0, 1e-5, out.sample_rate, out.steps, 1))
    assert out.epsilon == pytest.approx(compute_epsilon([(out.noise_multiplier, out.sample_rate, out.steps)],
                                                                1e-5))
    assert out.epochs_run == 3 and not out.selected_on_validation and out.delta == 1e-5
    assert set(out.metrics) == set(METRIC_KEYS)


def test_centralized_dp_refuses_a_delta_at_or_above_one_over_the_users() -> None:
    # Regression: `fedsocial train` trained with target_delta 0.5 on 120 users and reported "epsilon 7.995
    # (delta 0.5)", a bound that permits publishing users' records outright; partners refused it, train did not
    # Prepare: 80 users, so delta must stay below 1/80
    cfg = _cfg(privacy={"enabled": True, "max_epsilon": 4.0, "epochs": 1, "target_delta": 1 / 80},
               model={"user_embedding": "local"})
    # Execute / Assert: refused before any training, naming the setting
    with pytest.raises(PrivacyConfigError, match="target_delta"):
        train_centralized(cfg, _split(cfg))
    assert train_centralized(cfg.replace("privacy", target_delta=1e-3), _split(cfg)).delta == 1e-3


def test_same_seed_same_numbers() -> None:
    cfg = _cfg(privacy={"enabled": False}, train={"epochs": 2, "patience": 0})
    split = _split(cfg)
    a, b = train_centralized(cfg, split), train_centralized(cfg, split)
    assert a.metrics == b.metrics and [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    c = train_centralized(cfg.replace("train", seed=5), split)
    assert [h["loss"] for h in c.history] != [h["loss"] for h in a.history]


def test_dp_noise_is_not_a_function_of_the_config_seed() -> None:
    # Regression: the DP noise and Poisson samples were seeded from train.seed, so anyone holding the
    # config could regenerate the noise and remove it; now they come from OS entropy (or a partner's key)
    cfg = _cfg(privacy={"enabled": True, "noise_multiplier": 1.0}, train={"epochs": 2, "patience": 0})
    split = _split(cfg)
    a, b = train_centralized(cfg, split), train_centralized(cfg, split)
    assert any(not np.array_equal(a.state[k], b.state[k]) for k in a.state)
    assert a.epsilon == pytest.approx(b.epsilon, rel=1e-12)  # same mechanism, other noise
    # regression: a DP run's per-epoch loss (a non-private function of its batches) is not published
    assert a.history and all("loss" not in h for h in a.history)


def test_early_stopping_restores_the_best_epoch() -> None:
    # Prepare: a large learning rate so that validation NDCG peaks and then falls
    cfg = _cfg(train={"epochs": 40, "patience": 3, "lr": 0.05, "batch_size": 8})
    split = _split(cfg)
    # Execute
    out = train_centralized(cfg, split)
    # Assert: stopped `patience` epochs after the best; the returned state is the best epoch's
    vals = [h["val_ndcg@10"] for h in out.history]
    assert out.best_epoch == int(np.argmax(vals)) + 1
    assert out.epochs_run == out.best_epoch + 3 < 40
    trainer = LocalTrainer(cfg, split)
    trainer.set_local_state({k: v for k, v in out.state.items() if k not in trainer.shared_names()})
    trainer.set_shared({k: out.state[k] for k in trainer.shared_names()})
    val, _ = evaluate_model(trainer.model, split, "val")
    assert val["ndcg@10"] == pytest.approx(max(vals), abs=1e-12) and val == out.val_metrics
    assert vals[-1] < max(vals)


def test_local_round_api_roundtrip_and_errors() -> None:
    cfg = _cfg()
    split = _split(cfg)
    a, b = LocalTrainer(cfg, split, seed=0), LocalTrainer(cfg, split, seed=1)
    assert "item_emb.weight" in a.shared_names() and "social_emb.weight" not in a.shared_names()
    assert "social_emb.weight" in a.get_local_state() and "item_emb.weight" not in a.get_local_state()
    assert all(v.dtype == np.float32 for v in a.get_shared().values())
    b.set_shared(a.get_shared())
    b.set_local_state(a.get_local_state())
    assert a.evaluate("test") == b.evaluate("test")
    with pytest.raises(TrainerError, match="missing"):
        b.set_shared({})
    with pytest.raises(TrainerError, match="shape"):
        b.set_shared({k: v[:1] for k, v in a.get_shared().items()})
    with pytest.raises(TrainerError, match="unknown"):
        b.set_local_state({"item_emb.weight": np.zeros(1)})


def test_local_user_vectors_are_refitted_after_fit() -> None:
    cfg = _cfg(model={"user_embedding": "local", "local_refit_steps": 5})
    trainer = LocalTrainer(cfg, _split(cfg))
    trainer.fit(1)
    local = trainer.get_local_state()["local_user"]
    assert local.shape == (trainer.split.n_users, 16) and np.abs(local).sum() > 0


def test_dp_with_empty_poisson_batches_still_steps() -> None:
    # batch_size 1: q = 1/n, so about a third of the Poisson batches are empty
    cfg = _cfg(privacy={"enabled": True, "noise_multiplier": 1.0}, train={"batch_size": 1, "epochs": 1},
               data={"n_users": 20, "n_items": 30})
    trainer = LocalTrainer(cfg, _split(cfg))
    res = trainer.fit(1)
    assert res.steps == 20 and np.isfinite(res.train_loss)


def test_mostpop_trains_nothing_and_evaluates() -> None:
    cfg = _cfg(model={"name": "mostpop"})
    out = train_centralized(cfg, _split(cfg))
    assert out.epochs_run == 0 and out.steps == 0 and 0.0 < out.metrics["hr@20"] <= 1.0


def test_device_auto_and_unavailable_cuda() -> None:
    cfg = _cfg()
    assert LocalTrainer(cfg, _split(cfg), device="auto").device.type == ("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainerError, match="CUDA"):
            LocalTrainer(cfg, _split(cfg), device="cuda:0")


def test_fit_without_refit_leaves_p_u_and_a_later_refit_gives_the_same_vectors() -> None:
    # Prepare: two trainers on the same data, the same seed for their fit
    cfg = _cfg(model={"user_embedding": "local", "local_refit_steps": 5})
    split = _split(cfg)
    with_refit, without = LocalTrainer(cfg, split), LocalTrainer(cfg, split)

    # Execute
    with_refit.fit(1, rng_seed=5)
    without.fit(1, rng_seed=5, refit=False)
    untouched = without.get_local_state()["local_user"].copy()
    without.refit_local()

    # Assert: the partner's path (refit before evaluation only) loses nothing
    assert np.abs(untouched).sum() == 0
    np.testing.assert_allclose(without.get_local_state()["local_user"], with_refit.get_local_state()["local_user"],
                               atol=1e-6)
