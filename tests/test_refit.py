"""The local p_u refit (``SocialRec.refit_inputs`` / ``refit_objective``): its objective is the training loss.

The refit prepares the item side once and folds biases and the negatives' mask into one addend; these
tests hold it to the model's own loss path (``score_targets`` + ``compute_loss_per_target``, what
``calculate_loss`` runs) at arbitrary p_u, value and gradient, for every loss, temperature and the
learned scale, with removed negatives and a user whose negatives are all removed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsocial.shared.config import Config, DataConfig, ModelConfig, TrainConfig
from fedsocial.shared.models import (
    MASKED,
    compute_loss_per_target,
    compute_loss_per_target_premasked,
    compute_user_mean,
)
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.shared.trainer import LocalTrainer


def _trainer(**model: object) -> LocalTrainer:
    cfg = Config(data=DataConfig(n_users=60, n_items=70, interactions_per_user=10.0),
                 model=ModelConfig(dim=8, num_negatives=12, user_embedding="local", local_refit_steps=5,
                                   **model),  # type: ignore[arg-type]
                 train=TrainConfig(epochs=1, batch_size=16, lr=5e-3))
    trainer = LocalTrainer(cfg, split_dataset(generate(cfg.data), cfg.split), seed=3)
    trainer.fit(1, refit=False)  # trained shared parameters, not the initial ones
    return trainer


def _reference(model: torch.nn.Module, batch: dict[str, torch.Tensor], p: torch.Tensor, l2: float) -> torch.Tensor:
    """The objective as the training loss computes it: h_u + p_u through score_targets and the masked loss."""
    h0, qv, cb = model.target_user_vectors(batch)
    H = batch["targets"].shape[1]
    pos, neg = model.score_targets(h0 + p[:, None, :], qv, cb, H, model.user_scale(batch["users"]))
    per_target = compute_loss_per_target(pos, neg, batch["neg_mask"], model.model_cfg.loss)
    return compute_user_mean(per_target, batch["target_mask"]) + l2 * (p * p).sum(1)


CASES = [{"loss": "softmax", "temperature": 0.2}, {"loss": "softmax", "temperature": 0.0},
         {"loss": "bce", "temperature": 0.2}, {"loss": "bpr", "temperature": 1.0},
         {"loss": "softmax", "temperature": 0.2, "learned_scale": True}]


@pytest.mark.parametrize("model", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_refit_objective_equals_the_training_loss_in_value_and_gradient(model: dict[str, object]) -> None:
    # Prepare: a training batch with some negatives removed and one user with all of them removed
    trainer = _trainer(**model)
    batch = trainer._batch(trainer._example_users()[:24], np.random.default_rng(0))
    mask = batch["neg_mask"].clone()
    mask[0] = 0.0
    mask[1:, ::3] = 0.0
    batch["neg_mask"] = mask
    if model.get("learned_scale"):
        with torch.no_grad():
            trainer.model.scale_emb.weight.fill_(-0.3)  # a scale other than 1
    p = (0.2 * torch.randn(24, 8, generator=torch.Generator().manual_seed(1))).requires_grad_()
    q = p.detach().clone().requires_grad_()

    # Execute
    got = trainer.model.refit_objective(p, trainer.model.refit_inputs(batch), 0.7)
    want = _reference(trainer.model, batch, q, 0.7)
    got.sum().backward()
    want.sum().backward()

    # Assert
    assert p.grad is not None and q.grad is not None
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert float(p.grad.abs().sum()) > 0


def test_premasked_loss_equals_the_masked_loss_for_every_loss() -> None:
    # Prepare: scores, some negatives removed, one target row with every negative removed
    g = torch.Generator().manual_seed(0)
    pos, neg = 3 * torch.randn(4, 5, generator=g), 3 * torch.randn(4, 5, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    mask[2] = 0.0
    premasked = neg + torch.where(mask > 0, 0.0, MASKED)[:, None, :]
    n_valid = mask.sum(-1, keepdim=True).clamp(min=1.0)

    for loss in ("softmax", "bce", "bpr"):
        # Execute
        got = compute_loss_per_target_premasked(pos, premasked, n_valid, loss)
        want = compute_loss_per_target(pos, neg, mask, loss)
        # Assert
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_refit_reaches_the_objective_of_the_reference_loop() -> None:
    # Prepare: the refit before this change, written out (the training loss path at every Adam step)
    from fedsocial.shared.optim import make_adamw

    trainer = _trainer(loss="softmax", temperature=0.2)
    model = trainer.model
    batch = trainer._batch(trainer._example_users()[:32], np.random.default_rng(2))
    users = batch["users"]
    p = torch.zeros(32, 8, requires_grad=True)
    opt = make_adamw([p], 0.05, weight_decay=0.0)
    for _ in range(30):
        opt.zero_grad()
        _reference(model, batch, p, 1.0).sum().backward()
        opt.step()

    # Execute
    model.refit_local_users(batch, 30, 1.0)

    # Assert: the same p_u up to float rounding through 30 Adam steps, the same objective
    refit = model.local_user[users].detach()
    torch.testing.assert_close(refit, p.detach(), rtol=0, atol=2e-3)
    inputs = model.refit_inputs(batch)
    with torch.no_grad():
        torch.testing.assert_close(model.refit_objective(refit, inputs, 1.0).sum(),
                                   model.refit_objective(p.detach(), inputs, 1.0).sum(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("model", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_training_loss_equals_the_masked_einsum_loss_in_value_and_every_gradient(model: dict[str, object]) -> None:
    # Prepare: the same batch as above; the reference is score_targets + compute_loss_per_target (einsum, the
    # mask applied by masked_fill, the softmax over the concatenated scores)
    trainer = _trainer(**model)
    net = trainer.model
    batch = trainer._batch(trainer._example_users()[:24], np.random.default_rng(4))
    batch["neg_mask"][0] = 0.0
    batch["neg_mask"][1:, ::4] = 0.0
    params = [p for p in net.parameters() if p.requires_grad]

    # Execute
    got = net.calculate_loss(batch)
    got_grads = torch.autograd.grad(got.sum(), params, allow_unused=True)
    want = _reference(net, batch, torch.zeros(24, 8), 0.0)
    want_grads = torch.autograd.grad(want.sum(), params, allow_unused=True)

    # Assert
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for param, g, w in zip(params, got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None and w is not None:
            scale = float(w.abs().max())  # float32 sums in another order: error relative to the tensor's scale
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * scale + 1e-9,
                                       msg=lambda m, p=param: f"{p.shape}: {m}")
