"""Gradient shares of a flat clipping norm (simulations.grad_share)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsocial.shared.config import Config, DataConfig, ModelConfig
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.shared.trainer import LocalTrainer
from fedsocial.simulations.grad_share import compute_gradient_shares, main


def _trainer(bias_scale: float) -> LocalTrainer:
    cfg = Config(data=DataConfig(n_users=40, n_items=60, interactions_per_user=8.0),
                 model=ModelConfig(dim=8, use_mlp=False, temperature=1.0, loss="softmax", bias_scale=bias_scale))
    return LocalTrainer(cfg, split_dataset(generate(cfg.data), cfg.split), seed=0)


def test_shares_sum_to_one_and_follow_the_bias_reparameterisation() -> None:
    # Prepare: the same model and users, plain and with c_i = 3 * b_i
    users = np.arange(0, 40, 4)
    plain, scaled = _trainer(1.0), _trainer(3.0)
    # Execute
    s1, n1 = compute_gradient_shares(plain, users)
    s3, n3 = compute_gradient_shares(scaled, users)
    # Assert: shares are a partition of the squared norm; the bias's squared gradient grows 9x, so its
    # share r becomes 9r / (9r + 1 - r) user by user (checked on the mean only as a bound) and the norm grows
    assert sum(s1.values()) == pytest.approx(1.0) and sum(s3.values()) == pytest.approx(1.0)
    assert 0 < s1["item_bias.weight"] < s3["item_bias.weight"]
    assert s3["item_bias.weight"] <= 9 * s1["item_bias.weight"]
    assert n3 > n1


def test_single_user_share_matches_a_direct_computation() -> None:
    # Prepare
    trainer = _trainer(1.0)
    rng = np.random.default_rng(0)
    trainer.model.zero_grad()
    trainer.model(trainer._batch(np.array([5]), rng)).sum().backward()
    sq = {n: float((p.grad ** 2).sum()) for n, p in trainer.model.named_parameters() if p.grad is not None}
    # Execute
    shares, norm = compute_gradient_shares(trainer, np.array([5]), seed=0)
    # Assert
    assert norm == pytest.approx(sum(sq.values()) ** 0.5, rel=1e-5)
    for name, value in sq.items():
        assert shares[name] == pytest.approx(value / sum(sq.values()), rel=1e-5)


def test_cli_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    rc = main(["--config", "configs/demo.toml", "--users", "5", "--set", "data.n_users=60"])
    # Assert
    out = capsys.readouterr().out
    assert rc == 0 and "| item_emb.weight |" in out and "median per-user gradient norm" in out
