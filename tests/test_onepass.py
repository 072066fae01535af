"""One-pass DP clipping (shared/onepass.py) equals a brute-force per-user loop and Opacus's ghost clipping.

The DP bound holds only if every per-user norm is exact: a missed gradient path (a direct read of a
weight, a user mixed into another's example) under-estimates norms, and these comparisons fail.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedsocial.shared.config import Config, DataConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedsocial.shared.onepass import (
    OnePassClipper,
    OnePassError,
    compute_clip_factors,
    compute_embedding_norm_sq,
    compute_embedding_row_sums,
    compute_linear_per_example,
)
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.shared.trainer import LocalTrainer
from tests.test_opacus_grads import CASES, _brute_force, _ghost, _norm, _per_user_norms, _setup


def _onepass(model: nn.Module, batch: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor],
                                                                                       torch.Tensor]:
    clipper = OnePassClipper(model)
    model.zero_grad(set_to_none=True)
    clipper.start()
    norms = clipper.clipped_backward(model(batch), clip)
    clipper.close()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, norms


@pytest.mark.parametrize("name", list(CASES))
def test_onepass_norms_and_clipped_sum_match_brute_force(name: str) -> None:
    # Prepare: the real model; a bound between the smallest and largest per-user norm, so some clip
    model, batch = _setup(CASES[name])
    expected_norms = _per_user_norms(model, batch)
    clip = float(expected_norms.median())
    assert float(expected_norms.min()) < clip < float(expected_norms.max())
    expected = _brute_force(copy.deepcopy(model), batch, clip)
    # Execute
    got, norms = _onepass(model, batch, clip)
    # Assert: each user's norm, and every parameter's clipped sum (relative error < 1e-5)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-8)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trained
    num = _norm([got[n] - expected[n] for n in expected])
    assert float(num / _norm(list(expected.values()))) < 1e-5
    for n in expected:
        diff = float((got[n] - expected[n]).abs().max())
        assert torch.allclose(got[n], expected[n], rtol=1e-4, atol=1e-7), f"{n}: max abs diff {diff:.1e}"


@pytest.mark.parametrize("name", ["social-gcn-softmax", "social-attention-bpr", "social-category-cosine-local"])
def test_onepass_equals_opacus_ghost_clipping(name: str) -> None:
    # Prepare: one model, two copies
    model, batch = _setup(CASES[name])
    clip = float(_per_user_norms(model, batch).median())
    # Execute
    ours, _ = _onepass(copy.deepcopy(model), batch, clip)
    theirs = _ghost(model, batch, clip)
    # Assert: the same clipped sums (parameters Opacus leaves without a gradient are zero in ours)
    for n, g in ours.items():
        torch.testing.assert_close(g, theirs.get(n, torch.zeros_like(g)), rtol=1e-4, atol=1e-8)


def test_every_clipped_contribution_is_within_the_bound() -> None:
    # Prepare: one user at a time, a tiny bound: each user's clipped gradient must have norm <= C
    model, batch = _setup(CASES["social-attention-bpr"])
    clip = 1e-3
    for i in range(batch["users"].shape[0]):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        # Execute
        got, norms = _onepass(model, row, clip)
        # Assert: the released sum of a single example is clipped to C (Opacus's 1e-6 slack)
        assert float(norms[0]) > clip
        assert float(_norm(list(got.values()))) <= clip * (1 + 1e-5)


def test_embedding_norm_known_value_with_repeated_ids() -> None:
    # Prepare: example 0 holds index 2 twice (its rows add before squaring), example 1 two indices
    ids = torch.tensor([[2, 2], [0, 1]])
    grads = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [4.0, 0.0]]])
    # Execute
    norm_sq = compute_embedding_norm_sq(ids, grads, vocab=3)
    # Assert: |(3, 0)|^2 = 9; |(0, 3)|^2 + |(4, 0)|^2 = 25
    torch.testing.assert_close(norm_sq, torch.tensor([9.0, 25.0]))


def test_embedding_row_sums_against_a_brute_force_dictionary() -> None:
    # Prepare: many repeated ids within and across examples (a small vocabulary), random output grads
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (5, 30), generator=g)
    grads = torch.randn(5, 30, 4, generator=g, dtype=torch.float64)
    expected: dict[tuple[int, int], torch.Tensor] = {}
    for b in range(5):
        for t in range(30):
            key = (b, int(ids[b, t]))
            expected[key] = expected.get(key, torch.zeros(4, dtype=torch.float64)) + grads[b, t]
    # Execute
    example, table_row, summed = compute_embedding_row_sums(ids, grads, vocab=7)
    # Assert: one row per distinct (example, id) pair, each the sum of that pair's output rows
    got = {(int(b), int(j)): summed[k] for k, (b, j) in enumerate(zip(example, table_row, strict=True))}
    assert set(got) == set(expected) and len(got) == len(example)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value)


def test_linear_per_example_matches_autograd() -> None:
    # Prepare: a layer over [B, T, in]; each example's gradient by autograd alone
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(4, 6, 5)
    per_example = []
    for b in range(4):
        layer.zero_grad()
        (layer(x[b:b + 1]) ** 2).sum().backward()
        per_example.append((layer.weight.grad.clone(), layer.bias.grad.clone()))
    # Execute
    out = layer(x)
    gw, gb = compute_linear_per_example(x, (2 * out).detach(), bias=True)
    # Assert
    assert gb is not None
    for b, (w, bias) in enumerate(per_example):
        torch.testing.assert_close(gw[b], w)
        torch.testing.assert_close(gb[b], bias)


def test_clip_factor_is_opacus_rule() -> None:
    factors = compute_clip_factors(torch.tensor([0.0, 0.25, 4.0]), 1.0)
    torch.testing.assert_close(factors, torch.tensor([1.0, 1.0, 1.0 / (2.0 + 1e-6)]))


def test_unsupported_trained_layer_is_refused() -> None:
    # Prepare: a trained parameter in a layer type whose per-example gradient the clipper cannot form
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    # Execute / Assert: refused, naming the layer
    with pytest.raises(OnePassError, match="layer 1 is a LayerNorm"):
        OnePassClipper(model)


def test_layer_called_twice_sums_its_contributions() -> None:
    # Prepare: one linear layer applied twice per example; brute force per example
    torch.manual_seed(1)
    layer = nn.Linear(4, 4)
    x = torch.randn(3, 4)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        return layer(torch.tanh(layer(inp))).pow(2).sum(-1)

    clip = 0.5
    expected = [torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)]
    for b in range(3):
        layer.zero_grad()
        loss(x[b:b + 1]).sum().backward()
        g = [layer.weight.grad.clone(), layer.bias.grad.clone()]
        f = min(1.0, clip / (float(_norm(g)) + 1e-6))
        expected = [e + f * gi for e, gi in zip(expected, g, strict=True)]
    clipper = OnePassClipper(layer)
    layer.zero_grad(set_to_none=True)
    # Execute
    clipper.start()
    clipper.clipped_backward(loss(x), clip)
    # Assert
    torch.testing.assert_close(layer.weight.grad, expected[0])
    torch.testing.assert_close(layer.bias.grad, expected[1])


def test_onepass_fit_charges_the_same_accounting_as_opacus() -> None:
    # Prepare: a small DP fit with each clipping implementation, same settings
    cfg = Config(data=DataConfig(n_users=120, n_items=80, interactions_per_user=8.0),
                 model=ModelConfig(user_embedding="local", local_refit_steps=0),
                 train=TrainConfig(batch_size=16, epochs=1),
                 privacy=PrivacyConfig(enabled=True, noise_multiplier=1.1, max_grad_norm=0.5))
    split = split_dataset(generate(cfg.data), cfg.split)
    results = {}
    for mode in ("onepass", "ghost"):
        trainer = LocalTrainer(cfg.replace("privacy", clipping=mode), split, seed=3)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        # Execute
        results[mode] = trainer.fit(2)
        moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
        # every trained parameter is released noised, so each one moves
        assert sorted(moved) == sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    # Assert: the same (sigma, q, steps) and epsilon; finite losses
    a, b = results["onepass"], results["ghost"]
    assert (a.noise_multiplier, a.sample_rate, a.steps) == (b.noise_multiplier, b.sample_rate, b.steps)
    assert a.epsilon == pytest.approx(b.epsilon, rel=1e-12)
    assert np.isfinite(a.train_loss)


def test_a_layer_input_shared_by_the_batch_is_refused() -> None:
    # Prepare: an embedding looked up once for the whole batch (shared negatives, say): its rows belong to
    # no single example, so attributing them by reshaping to [B, -1] would break the per-user bound
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 3)

        def forward(self, users: torch.Tensor) -> torch.Tensor:
            shared = self.emb(torch.arange(4))  # [4, 3], not [B, ...]
            return (users[:, None] * shared.sum(0)[None, :]).sum(1)

    model = Shared()
    clipper = OnePassClipper(model)
    clipper.start()
    loss = model(torch.ones(2))
    # Execute / Assert
    with pytest.raises(OnePassError, match="leading dimension 4, not the batch's 2"):
        clipper.clipped_backward(loss, 1.0)


def test_noise_has_the_accounted_scale_and_is_added_to_the_clipped_sum() -> None:
    # Prepare: a clipped sum of known value, sigma * C = 0.3, expected batch 4
    from fedsocial.shared.trainer import add_noise_inplace

    p = nn.Parameter(torch.zeros(400_000))
    p.grad = torch.full_like(p, 2.0)
    q = nn.Parameter(torch.zeros(3))  # no gradient: released as noise alone
    gen = torch.Generator().manual_seed(0)
    # Execute
    add_noise_inplace([p, q], std=0.3, expected_batch=4, generator=gen)
    # Assert: mean 2 / 4, standard deviation 0.3 / 4 (4-sigma bounds for 400k draws)
    assert p.grad is not None and q.grad is not None
    assert float(p.grad.mean()) == pytest.approx(0.5, abs=4 * 0.075 / 400_000 ** 0.5)
    assert float(p.grad.std()) == pytest.approx(0.075, rel=4 * (0.5 / 400_000) ** 0.5)
    assert bool((q.grad != 0).all())
