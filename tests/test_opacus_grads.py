"""Per-user clipping under Opacus ghost clipping equals a brute-force per-user loop, for the real models.

If a forward read an embedding's weight directly, or mixed users inside an example, Opacus would
under-estimate per-user norms and these comparisons would fail.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from fedsocial.shared.batching import ExampleBuilder
from fedsocial.shared.config import Config, DataConfig, ModelConfig
from fedsocial.shared.models import RecModel, build_model
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.shared.trainer import PerUserLoss, compute_embedding_norm_sample, register_fast_embedding_norm_sampler


def _setup(mcfg: ModelConfig, n_batch: int = 12) -> tuple[RecModel, dict[str, torch.Tensor]]:
    cfg = Config(data=DataConfig(n_users=40, n_items=60, interactions_per_user=8.0, friends_per_user=4.0))
    split = split_dataset(generate(cfg.data), cfg.split)
    builder = ExampleBuilder.from_split(split, mcfg)
    torch.manual_seed(0)
    model = build_model(mcfg, split.n_users, split.n_items, item_counts=builder.item_counts(),
                        item_category=split.dataset.item_category)
    with torch.no_grad():  # move away from the zero-initialised MLP output so its gradients are generic
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    users = np.array([0, 3, 3, 5, 7, 11, 12, 19, 23, 30, 31, 39][:n_batch])  # a repeated user too
    return model, builder.train_batch(users, np.random.default_rng(1))


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(torch.stack([(t * t).sum() for t in tensors]).sum())


def _brute_force(model: RecModel, batch: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Each user's gradient alone, clipped to ``clip`` (Opacus' factor), then summed."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(batch["users"].shape[0]):
        model.zero_grad()
        model({k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        norm = _norm(list(grads.values()))
        factor = (clip / (norm + 1e-6)).clamp(max=1.0)
        for n in total:
            total[n] += factor * grads[n]
    return total


def _per_user_norms(model: RecModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    norms = []
    for i in range(batch["users"].shape[0]):
        model.zero_grad()
        model({k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        norms.append(_norm([p.grad for p in model.parameters() if p.grad is not None]))
    return torch.stack(norms)


def _ghost(model: RecModel, batch: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Opacus ghost clipping, noise 0: after backward p.grad is the sum of the clipped per-user gradients."""
    register_fast_embedding_norm_sampler()  # as LocalTrainer does before a ghost-clipped fit
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(40)), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, dp_opt, crit, _ = PrivacyEngine().make_private(
            module=model, optimizer=opt, criterion=PerUserLoss(), data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=clip, grad_sample_mode="ghost")
    dp_opt.zero_grad()
    crit(gsm(batch), None).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    gsm._close()
    return out


CASES = {
    "social-mean-trained-p": ModelConfig(aggregator="mean", user_embedding="trained", loss="bce"),
    "social-gcn-softmax": ModelConfig(aggregator="gcn", user_embedding="trained", loss="softmax"),
    "social-attention-bpr": ModelConfig(aggregator="attention", user_embedding="trained", loss="bpr"),
    "social-attention-local": ModelConfig(aggregator="attention", user_embedding="local", loss="softmax"),
    "social-capped-bag": ModelConfig(aggregator="mean", max_history=3, max_targets=4, max_neighbors=2),
    "social-cosine-all-parts": ModelConfig(aggregator="gcn", user_embedding="trained", temperature=0.2),
    "social-category-cosine-local": ModelConfig(use_category=True, user_embedding="local", temperature=2.0,
                                                loss="softmax", bias_scale=4.0),
    "social-learned-scale-cosine-local": ModelConfig(learned_scale=True, user_embedding="local", temperature=0.2,
                                                     loss="softmax"),
    "bpr-mf": ModelConfig(name="bpr", loss="bpr"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ghost_clipping_matches_brute_force(name: str) -> None:
    # Prepare: the real model; a bound between the smallest and largest per-user norm, so some clip
    model, batch = _setup(CASES[name])
    norms = _per_user_norms(model, batch)
    clip = float(norms.median())
    assert float(norms.min()) < clip < float(norms.max())
    expected = _brute_force(copy.deepcopy(model), batch, clip)
    # Execute
    got = _ghost(model, batch, clip)
    # Assert: every parameter, relative error < 1e-4
    assert set(got) == set(expected)
    num = _norm([got[n] - expected[n] for n in expected])
    den = _norm(list(expected.values()))
    assert float(num / den) < 1e-4, f"relative error {float(num / den):.2e}"
    for n in expected:
        assert torch.allclose(got[n], expected[n], rtol=1e-3, atol=1e-7), n


@pytest.mark.parametrize("name", list(CASES))
def test_models_pass_opacus_validator(name: str) -> None:
    model, _ = _setup(CASES[name])
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize("name", ["social-attention-bpr", "bpr-mf"])
def test_per_user_loss_is_independent_of_the_rest_of_the_batch(name: str) -> None:
    # Prepare: one batch; the same user's row alone
    model, batch = _setup(CASES[name])
    # Execute
    together = model(batch)
    alone = torch.stack([model({k: v[i:i + 1] for k, v in batch.items()})[0] for i in range(together.shape[0])])
    # Assert: one DP example depends on its own user only
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-7)


def test_fast_embedding_norm_sampler_matches_opacus_and_is_registered() -> None:
    # Prepare: repeated and padded indices in a [B, L] lookup
    from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample as opacus_norms
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleModuleFastGradientClipping as GSM,
    )

    layer = torch.nn.Embedding(7, 3)
    ids = torch.tensor([[1, 1, 0, 6], [2, 0, 2, 2], [5, 5, 5, 5]])
    backprops = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(0))
    # Execute
    ours = compute_embedding_norm_sample(layer, [ids], backprops)[layer.weight]
    theirs = opacus_norms(layer, [ids], backprops)[layer.weight]
    register_fast_embedding_norm_sampler()
    # Assert
    torch.testing.assert_close(ours, theirs)
    assert GSM.NORM_SAMPLERS[torch.nn.Embedding] is compute_embedding_norm_sample
