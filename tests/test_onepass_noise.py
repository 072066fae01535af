"""The fused DP-SGD release of shared/onepass.py (``noisy_clipped_backward``) and its noise source, the fixed
parallel streams of shared/dp_noise.py (``GaussianStreams``).

With one generator the release is the clipped sum plus ``add_noise_inplace``'s draws; with the streams it is the
clipped sum plus the streams' draws, which depend on the secret seed only (never on the number of threads) and are
N(0, std^2) on every coordinate of every trained parameter."""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsocial.shared.dp_noise import (
    MIN_PARALLEL_NUMEL,
    MIN_SPLIT_NUMEL,
    STREAMS,
    GaussianStreams,
    NoiseStreamError,
    compute_draw_plan,
    compute_stream_chunks,
    compute_stream_seeds,
    compute_worker_count,
)
from fedsocial.shared.onepass import OnePassClipper
from fedsocial.shared.trainer import add_noise_inplace
from tests.test_opacus_grads import CASES, _brute_force, _per_user_norms, _setup

STD, EXPECTED = 0.3, 7


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _releases(name: str, empty: bool, noise_of: Callable[[], Any],
              add_reference_noise: Callable[[list[torch.Tensor], Any], None]
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """(reference: clipped_backward, then ``add_reference_noise`` on the trained parameters; fused:
    noisy_clipped_backward; clip), each path with a fresh noise source from ``noise_of`` (seeded alike)."""
    model, batch = _setup(CASES[name])
    clip = float(_per_user_norms(model, batch).median())
    twin = copy.deepcopy(model)
    out = []
    for m, fused in ((model, False), (twin, True)):
        clipper = OnePassClipper(m)
        m.zero_grad(set_to_none=True)
        clipper.start()
        loss = None if empty else m(batch)
        with noise_of() as noise:
            if fused:
                clipper.noisy_clipped_backward(loss, clip, STD, EXPECTED, noise)
            else:
                if loss is not None:
                    clipper.clipped_backward(loss, clip)
                add_reference_noise([p for p in m.parameters() if p.requires_grad], noise)
        out.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        clipper.close()
    return out[0], out[1], clip


def _two_path_grads(name: str, empty: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """(reference: clipped_backward + add_noise_inplace, fused: noisy_clipped_backward, clip), one generator."""
    return _releases(name, empty, lambda: contextlib.nullcontext(torch.Generator().manual_seed(123)),
                     lambda params, gen: add_noise_inplace(params, STD, EXPECTED, gen))


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


@pytest.mark.parametrize("streams", [False, True], ids=["one-generator", "streams"])
def test_fused_release_is_clipped_sum_plus_gaussian_of_the_accounted_scale(streams: bool) -> None:
    # Prepare: the brute-force clipped sum (a per-user loop) of one batch; one generator, or the streams with
    # the tables cut into chunks
    model, batch = _setup(CASES["social-mean-trained-p"])
    clip = float(_per_user_norms(model, batch).median())
    exact = _brute_force(copy.deepcopy(model), batch, clip)
    clipper = OnePassClipper(model)
    clipper.start()
    source = GaussianStreams(6, min_split=1000) if streams else contextlib.nullcontext(torch.Generator().manual_seed(5))
    # Execute
    with source as noise:
        clipper.noisy_clipped_backward(model(batch), clip, STD, EXPECTED, noise)
    clipper.close()
    # Assert: grad * expected batch - clipped sum is N(0, STD^2) on every trained parameter (5-sigma bounds)
    per_param = {n: (_grad(p) * EXPECTED - exact[n]).reshape(-1) for n, p in model.named_parameters()
                 if p.requires_grad}
    noise_all = torch.cat(list(per_param.values()))
    k = noise_all.numel()
    assert k > 5000
    assert abs(float(noise_all.mean())) < 5 * STD / k ** 0.5
    assert float(noise_all.std()) == pytest.approx(STD, rel=5 * (0.5 / k) ** 0.5)
    assert all(bool((v != 0).all()) for v in per_param.values())


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


def _stream_noise(numels: list[int], seed: int, std: float = 1.0, workers: int | None = None) -> list[torch.Tensor]:
    """Fresh tensors of these sizes, NaN first (a coordinate no stream draws stays NaN), filled by the streams."""
    out = [torch.full((n,), float("nan")) for n in numels]
    with GaussianStreams(seed, workers=workers) as noise:
        noise.normal_inplace(out, std)
    return out


def test_stream_seeds_are_sha256_of_the_noise_seed_and_the_stream_index() -> None:
    # Prepare: the documented derivation, written out by hand
    seed = 2**62 + 12345
    by_hand = [int.from_bytes(hashlib.sha256(b"fedsocial-noise-stream:" + seed.to_bytes(8, "little")
                                             + k.to_bytes(4, "little")).digest()[:8], "little") >> 1
               for k in range(STREAMS)]
    # Execute
    seeds, other = compute_stream_seeds(seed), compute_stream_seeds(seed + 1)
    # Assert: the same values, all distinct, none shared with a neighbouring noise seed, all < 2**63
    assert seeds == by_hand
    assert len(set(seeds) | set(other)) == 2 * STREAMS
    assert all(0 <= s < 2**63 for s in seeds + other)
    with pytest.raises(NoiseStreamError, match="noise seed"):
        compute_stream_seeds(-1)


@pytest.mark.parametrize("numel", [0, 1, 15, MIN_SPLIT_NUMEL - 1, MIN_SPLIT_NUMEL, MIN_SPLIT_NUMEL + 3, 2_500_001])
def test_chunks_cover_every_coordinate_once_and_tiny_tensors_come_from_stream_zero(numel: int) -> None:
    # Execute
    chunks = compute_stream_chunks(numel)
    # Assert: STREAMS contiguous ranges in stream order that tile [0, numel); below the threshold stream 0 only
    assert len(chunks) == STREAMS
    assert chunks[0][0] == 0 and chunks[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    sizes = [stop - start for start, stop in chunks]
    if numel < MIN_SPLIT_NUMEL:
        assert sizes[0] == numel and not any(sizes[1:])
    else:
        assert max(sizes) - min(sizes) <= 1


def test_each_stream_draws_its_chunks_in_tensor_order_from_its_own_generator() -> None:
    # Prepare: two split tensors and a tiny one between them
    numels, seed = [MIN_SPLIT_NUMEL * 2 + 5, 100, MIN_SPLIT_NUMEL + 1], 77
    # Execute
    drawn = torch.cat(_stream_noise(numels, seed, std=0.5))
    # Assert: brute force, each stream's generator drawing its chunks one after the other, by hand
    expected = torch.empty(sum(numels))
    offsets = np.cumsum([0, *numels])
    for k, s in enumerate(compute_stream_seeds(seed)):
        gen = torch.Generator().manual_seed(s)
        for i, start, stop in compute_draw_plan(numels)[k]:
            expected[offsets[i] + start:offsets[i] + stop].normal_(0.0, 0.5, generator=gen)
    assert torch.equal(drawn, expected)
    assert [c[0] for c in compute_draw_plan(numels)[0]] == [0, 1, 2]  # the tiny tensor: stream 0 only
    assert all(1 not in [c[0] for c in compute_draw_plan(numels)[k]] for k in range(1, STREAMS))


def test_the_same_seed_draws_the_same_noise_whatever_the_number_of_threads() -> None:
    # Prepare
    numels, before = [300_000, 7, MIN_SPLIT_NUMEL, 40_001], torch.get_num_threads()
    try:
        # Execute: explicit worker counts, and the count taken from torch's threads
        runs = {f"workers={w}": _stream_noise(numels, 5, workers=w) for w in (1, 2, 4)}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[f"threads={threads}"] = _stream_noise(numels, 5)
    finally:
        torch.set_num_threads(before)
    # Assert: bit for bit the same draws
    first = runs.pop("workers=1")
    for label, tensors in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(first, tensors, strict=True)), label


def test_worker_threads_only_on_cpu_for_large_draws_and_never_more_than_the_streams() -> None:
    cpu, big = torch.device("cpu"), MIN_PARALLEL_NUMEL
    assert [compute_worker_count(STREAMS, t, cpu, big) for t in (1, 2, 3, 16)] == [1, 2, 3, STREAMS]
    assert compute_worker_count(STREAMS, 16, cpu, big - 1) == 1  # a small model: the calling thread alone
    assert compute_worker_count(STREAMS, 16, torch.device("cuda"), 10 * big) == 1


def test_successive_fills_continue_the_streams() -> None:
    # Prepare
    numels = [50_000, 10]
    with GaussianStreams(3) as noise:
        a, b = [torch.empty(n) for n in numels], [torch.empty(n) for n in numels]
        # Execute
        noise.normal_inplace(a, 1.0)
        noise.normal_inplace(b, 1.0)
    # Assert: two fills are two consecutive draws of each stream, the same as one fill of twice the tensors
    both = _stream_noise(numels + numels, 3)
    assert all(torch.equal(x, y) for x, y in zip(a + b, both, strict=True))
    assert not torch.equal(a[0], b[0])


def test_streams_and_seeds_give_different_draws_and_the_chunks_are_uncorrelated() -> None:
    # Prepare: one tensor split in STREAMS chunks of m coordinates, and the same from another seed
    m = 100_000
    x = _stream_noise([STREAMS * m], 11)[0].reshape(STREAMS, m)
    y = _stream_noise([STREAMS * m], 12)[0].reshape(STREAMS, m)
    # Execute: correlation of every pair of rows (streams of one seed, and the same stream across seeds)
    corr = np.corrcoef(torch.cat([x, y]).numpy())
    # Assert: no row equals another; every correlation within 5 standard errors (1 / sqrt(m)) of 0
    rows = torch.cat([x, y])
    assert all(not torch.equal(rows[i], rows[j]) for i in range(len(rows)) for j in range(i))
    off_diagonal = corr[~np.eye(len(rows), dtype=bool)]
    assert np.abs(off_diagonal).max() < 5 / m ** 0.5


def test_the_stream_noise_is_gaussian_with_the_requested_std_on_every_chunk() -> None:
    # Prepare
    std, numels = 0.7, [STREAMS * 60_000, 5000, 1]
    # Execute
    drawn = _stream_noise(numels, 21, std=std)
    # Assert: every coordinate drawn (no NaN left); each stream's chunk has mean ~0 and std ~0.7 (5-sigma
    # bounds) and Gaussian tails (the fraction beyond 2 std within 5 standard errors of 4.55 %)
    assert all(not torch.isnan(t).any() for t in drawn)
    for start, stop in compute_stream_chunks(numels[0]):
        chunk = drawn[0][start:stop].double()
        k = chunk.numel()
        assert abs(float(chunk.mean())) < 5 * std / k ** 0.5
        assert float(chunk.std()) == pytest.approx(std, rel=5 * (0.5 / k) ** 0.5)
        tail, p = float((chunk.abs() > 2 * std).double().mean()), 0.04550026
        assert abs(tail - p) < 5 * (p * (1 - p) / k) ** 0.5


def test_a_buffer_the_streams_cannot_fill_is_refused() -> None:
    with GaussianStreams(1) as noise, pytest.raises(NoiseStreamError, match="contiguous"):
        noise.normal_inplace([torch.empty(8, 4).t()], 1.0)


def _add_stream_noise(params: list[torch.Tensor], noise: GaussianStreams) -> None:
    """The streams' draws into fresh tensors, added to the clipped sum and divided (the unfused release)."""
    fresh = [torch.empty_like(p) for p in params]
    noise.normal_inplace(fresh, STD)
    for p, z in zip(params, fresh, strict=True):
        p.grad = (z if p.grad is None else z.add_(p.grad)).div_(EXPECTED)


def _stream_release(name: str, empty: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(reference: clipped_backward + the streams' draws into fresh tensors, fused: noisy_clipped_backward with
    the streams), same seed; a small split threshold so that the test model's tables are cut into chunks."""
    ref, fused, _ = _releases(name, empty, lambda: GaussianStreams(123, min_split=1000), _add_stream_noise)
    return ref, fused


@pytest.mark.parametrize("name", list(CASES))
def test_fused_release_with_streams_equals_clipped_sum_plus_the_streams_draws(name: str) -> None:
    # Execute
    ref, fused = _stream_release(name, empty=False)
    # Assert: every trained parameter released, the same values (float order of the additions only)
    assert set(fused) == set(ref) and ref
    for n in ref:
        torch.testing.assert_close(fused[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_fused_release_with_streams_of_an_empty_batch_is_their_noise_bit_for_bit() -> None:
    # Execute
    ref, fused = _stream_release("social-attention-bpr", empty=True)
    # Assert: the same noise, and every trained parameter noised, down to the one-coordinate bias
    model, _ = _setup(CASES["social-attention-bpr"])
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(fused) == set(ref) == set(trained) and min(trained.values()) == 1
    for n in ref:
        assert torch.equal(fused[n], ref[n]), n
        assert bool((fused[n] != 0).all()), n


def test_trainer_dp_fit_equals_the_loop_replayed_by_hand_with_the_streams() -> None:
    # Prepare: a real DP fit whose item table is large enough to be cut over the streams, and the same fit
    # replayed with clipped_backward + the streams' draws into fresh tensors, from the same secret-derived seeds
    from fedsocial.shared.privacy.round import compute_sample_rate
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.synthetic import generate
    from fedsocial.shared.trainer import LocalTrainer, compute_dp_seeds
    from tests.test_federation import tiny_config

    cfg = tiny_config()
    cfg = cfg.replace("data", n_items=2100)
    split = split_dataset(generate(cfg.data), cfg.split)
    fused, manual = LocalTrainer(cfg, split, seed=4), LocalTrainer(cfg, split, seed=4)
    fused.noise_key = manual.noise_key = b"k" * 32
    pc, n = cfg.privacy, split.n_users
    params = [p for p in manual.model.parameters() if p.requires_grad]
    assert any(len(compute_stream_chunks(p.numel())) == STREAMS and p.numel() >= MIN_SPLIT_NUMEL for p in params)
    # Execute
    result = fused.fit(1, noise_multiplier=1.0, rng_seed=3, refit=False)
    q = compute_sample_rate(n, cfg.train.batch_size)
    sample_seed, noise_seed = compute_dp_seeds(3, manual.noise_key)
    sampler, noise = torch.Generator().manual_seed(sample_seed), GaussianStreams(noise_seed, workers=1)
    rng, opt, clipper = np.random.default_rng(3), manual._optimizer(), OnePassClipper(manual.model)
    manual.model.train()
    for _ in range(int(1 / q)):
        uids = (torch.rand(n, generator=sampler) < q).nonzero().reshape(-1)
        opt.zero_grad(set_to_none=True)
        if uids.numel():
            clipper.start()
            clipper.clipped_backward(manual.model(manual._batch(uids.numpy(), rng)), pc.max_grad_norm)
        fresh = [torch.empty_like(p) for p in params]
        noise.normal_inplace(fresh, 1.0 * pc.max_grad_norm)
        for p, z in zip(params, fresh, strict=True):
            p.grad = (z if p.grad is None else z.add_(p.grad)).div_(max(1, int(n * q)))
        opt.step()
    clipper.close()
    noise.close()
    # Assert: the same steps, and the same trained parameters (float rounding of the additions only)
    assert result.steps == int(1 / q)
    for (name, a), b in zip(fused.model.named_parameters(), manual.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the streams' GPU path is not exercised")
def test_the_streams_fill_cuda_buffers_serially_with_gaussian_noise() -> None:
    # Prepare
    device = torch.device("cuda")
    bufs = [torch.full((STREAMS * 50_000,), float("nan"), device=device), torch.full((3,), float("nan"), device=device)]
    # Execute: one worker on a GPU (its kernels are asynchronous), twice from the same seed
    with GaussianStreams(8, device) as noise:
        noise.normal_inplace(bufs, 0.5)
    again = [torch.empty_like(b) for b in bufs]
    with GaussianStreams(8, device) as noise:
        noise.normal_inplace(again, 0.5)
    # Assert: every coordinate drawn, reproducible, std 0.5
    assert all(not torch.isnan(b).any() for b in bufs)
    assert all(torch.equal(a, b) for a, b in zip(bufs, again, strict=True))
    assert float(bufs[0].std()) == pytest.approx(0.5, rel=0.02)


def test_bench_dp_cost_times_the_one_stream_fit_beside_the_streams(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    import json

    import fedsocial.shared.trainer as trainer_module
    from fedsocial.simulations import bench
    from fedsocial.simulations.simulate import write_config
    from tests.test_federation import tiny_config

    config = write_config(tiny_config(), tmp_path / "cfg")
    # Execute
    code = bench.main(["dp-cost", "--config", str(config), "--epochs", "1", "--repeats", "1", "--json",
                       "--compare-one-stream"])
    # Assert: both DP ratios printed, and the trainer's noise source is the parallel streams again afterwards
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and doc["ratio"] > 0 and doc["ratio_one_stream"] > 0 and doc["ratio_one_stream_cpu"] > 0
    assert trainer_module.GaussianStreams is GaussianStreams
