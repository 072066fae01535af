"""The fused DP-SGD release of shared/onepass.py (``noisy_clipped_backward``): the same release as the clipped
sum plus ``add_noise_inplace``, the same draws from the same generator, with its buffers kept between steps."""

from __future__ import annotations

import copy

import pytest
import torch

from fedsocial.shared.onepass import OnePassClipper
from fedsocial.shared.trainer import add_noise_inplace
from tests.test_opacus_grads import CASES, _brute_force, _per_user_norms, _setup

STD, EXPECTED = 0.3, 7


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _two_path_grads(name: str, empty: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """(reference: clipped_backward + add_noise_inplace, fused: noisy_clipped_backward, clip), same seed."""
    model, batch = _setup(CASES[name])
    clip = float(_per_user_norms(model, batch).median())
    twin = copy.deepcopy(model)
    out = []
    for m, fused in ((model, False), (twin, True)):
        clipper = OnePassClipper(m)
        m.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(123)
        clipper.start()
        loss = None if empty else m(batch)
        if fused:
            clipper.noisy_clipped_backward(loss, clip, STD, EXPECTED, gen)
        else:
            if loss is not None:
                clipper.clipped_backward(loss, clip)
            add_noise_inplace([p for p in m.parameters() if p.requires_grad], STD, EXPECTED, gen)
        out.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        clipper.close()
    return out[0], out[1], clip


@pytest.mark.parametrize("name", list(CASES))
def test_fused_release_equals_clipped_sum_plus_noise(name: str) -> None:
    # Execute: both paths on the same batch, with generators seeded alike
    ref, fused, _ = _two_path_grads(name, empty=False)
    # Assert: every trained parameter released, and the same values (the same draws; only the order of
    # the float additions differs)
    assert set(fused) == set(ref) and ref
    for n in ref:
        torch.testing.assert_close(fused[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_fused_release_of_an_empty_batch_is_the_same_noise_bit_for_bit() -> None:
    # Execute
    ref, fused, _ = _two_path_grads("social-gcn-softmax", empty=True)
    # Assert: noise alone on every trained parameter, identical to add_noise_inplace's draws
    assert set(fused) == set(ref)
    for n in ref:
        assert torch.equal(fused[n], ref[n]), n


def test_fused_release_is_clipped_sum_plus_gaussian_of_the_accounted_scale() -> None:
    # Prepare: the brute-force clipped sum (a per-user loop) of one batch
    model, batch = _setup(CASES["social-mean-trained-p"])
    clip = float(_per_user_norms(model, batch).median())
    exact = _brute_force(copy.deepcopy(model), batch, clip)
    clipper = OnePassClipper(model)
    clipper.start()
    # Execute
    clipper.noisy_clipped_backward(model(batch), clip, STD, EXPECTED, torch.Generator().manual_seed(5))
    # Assert: grad * expected batch - clipped sum is N(0, STD^2) per coordinate (mean and std, 5-sigma bounds)
    noise = torch.cat([(_grad(p) * EXPECTED - exact[n]).reshape(-1) for n, p in model.named_parameters()
                       if p.requires_grad])
    k = noise.numel()
    assert k > 5000
    assert abs(float(noise.mean())) < 5 * STD / k ** 0.5
    assert float(noise.std()) == pytest.approx(STD, rel=5 * (0.5 / k) ** 0.5)
    clipper.close()


def test_buffers_are_reused_and_each_step_draws_fresh_noise() -> None:
    # Prepare
    model, batch = _setup(CASES["social-gcn-softmax"])
    clipper = OnePassClipper(model)
    gen = torch.Generator().manual_seed(9)
    grads = []
    # Execute: two noise-only steps, the optimizer dropping .grad in between as zero_grad(set_to_none) does
    for _ in range(2):
        clipper.noisy_clipped_backward(None, 1.0, STD, EXPECTED, gen)
        grads.append({n: (_grad(p).data_ptr(), _grad(p).clone())
                      for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    clipper.close()
    # Assert: the same storage both steps (no table-sized allocation per step), different draws
    for n, (ptr, first) in grads[0].items():
        ptr2, second = grads[1][n]
        assert ptr == ptr2, n
        assert not torch.equal(first, second), n
    assert clipper._buffers == {}  # close() lets the buffers go


def test_trainer_dp_fit_equals_the_unfused_loop_replayed_by_hand() -> None:
    # Prepare: a real DP fit, and the same fit replayed with clipped_backward + add_noise_inplace (the loop
    # before the fused release), from the same secret-derived seeds
    import numpy as np

    from fedsocial.shared.privacy.round import compute_sample_rate
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.synthetic import generate
    from fedsocial.shared.trainer import LocalTrainer, compute_dp_seeds
    from tests.test_federation import tiny_config

    cfg = tiny_config()
    split = split_dataset(generate(cfg.data), cfg.split)
    fused, manual = LocalTrainer(cfg, split, seed=4), LocalTrainer(cfg, split, seed=4)
    fused.noise_key = manual.noise_key = b"k" * 32
    pc, n = cfg.privacy, split.n_users
    # Execute
    result = fused.fit(1, noise_multiplier=1.0, rng_seed=3, refit=False)
    q = compute_sample_rate(n, cfg.train.batch_size)
    sample_seed, noise_seed = compute_dp_seeds(3, manual.noise_key)
    sampler, noise_gen = torch.Generator().manual_seed(sample_seed), torch.Generator().manual_seed(noise_seed)
    rng, opt, clipper = np.random.default_rng(3), manual._optimizer(), OnePassClipper(manual.model)
    params = [p for p in manual.model.parameters() if p.requires_grad]
    manual.model.train()
    for _ in range(int(1 / q)):
        uids = (torch.rand(n, generator=sampler) < q).nonzero().reshape(-1)
        opt.zero_grad(set_to_none=True)
        if uids.numel():
            clipper.start()
            clipper.clipped_backward(manual.model(manual._batch(uids.numpy(), rng)), pc.max_grad_norm)
        add_noise_inplace(params, 1.0 * pc.max_grad_norm, max(1, int(n * q)), noise_gen)
        opt.step()
    clipper.close()
    # Assert: the same steps, and the same trained parameters (float rounding of the additions only)
    assert result.steps == int(1 / q)
    for (name, a), b in zip(fused.model.named_parameters(), manual.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
