"""DP-SGD's Gaussian noise drawn from a fixed number of independent streams, in parallel on CPU.

A DP step noises every coordinate of every trained parameter (Abadi et al. 2016): about 2.5M draws a
step for LastFM. One ``torch.Generator`` draws them serially (about 17 ms on one core here), while the
rest of the step runs on all of torch's threads. The buffer is therefore cut into ``STREAMS`` contiguous
chunks, each drawn by its own generator, and the streams are spread over worker threads (torch releases
the GIL inside ``normal_``).

What a fit draws depends only on the noise seed, ``STREAMS`` and the tensors' sizes, never on the number
of threads or the machine: a partner that re-runs a fit after a crash, or elsewhere, draws the same noise
from the same secret. Each stream's seed is a hash of the (secret) noise seed and the stream's index, so
the streams are as unpredictable as the seed itself and distinct from one another; each stream draws its
chunks in a fixed order (tensor by tensor), whichever thread runs it. Tensors smaller than
``MIN_SPLIT_NUMEL`` are drawn whole by stream 0 (decided by size only), where cutting them costs more
than it saves.
"""

from __future__ import annotations

import hashlib
import queue
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

STREAMS = 4  # fixed: part of what makes a draw reproducible; never derived from the machine
MIN_SPLIT_NUMEL = 1 << 14  # tensors below this many coordinates are drawn whole by stream 0
# below this many coordinates in all, the calling thread runs every stream: waking a worker thread costs more
# (measured 3.9 ms against 0.1 ms serially for a 60k-coordinate model on a loaded machine); which thread runs
# a stream never changes its draws, so this changes the speed only
MIN_PARALLEL_NUMEL = 1 << 18

# (tensor index, start, stop) in a tensor's flattened coordinates
Chunk = tuple[int, int, int]


class NoiseStreamError(ValueError):
    """A noise seed, stream count or buffer the streams cannot use."""


def compute_stream_seeds(noise_seed: int, streams: int = STREAMS) -> list[int]:
    """One generator seed per stream: sha256(tag || noise seed || stream index), 63 bits each.

    A hash (not seed + k) keeps the streams' seeds unrelated to each other and as secret as ``noise_seed``
    (shared/trainer.py ``compute_dp_seeds`` derives it from the partner's key).
    """
    if not 0 <= noise_seed < 2**64:
        raise NoiseStreamError(f"noise seed must be in [0, 2**64), got {noise_seed}")
    if streams < 1:
        raise NoiseStreamError(f"the number of noise streams must be >= 1, got {streams}")
    base = b"fedsocial-noise-stream:" + int(noise_seed).to_bytes(8, "little")
    return [int.from_bytes(hashlib.sha256(base + k.to_bytes(4, "little")).digest()[:8], "little") >> 1
            for k in range(streams)]


def compute_stream_chunks(numel: int, streams: int = STREAMS,
                          min_split: int = MIN_SPLIT_NUMEL) -> list[tuple[int, int]]:
    """Stream k's contiguous range [start, stop) of a tensor of ``numel`` coordinates, for every k.

    The ranges are in stream order and cover [0, numel) exactly once; below ``min_split`` stream 0 takes
    all of it (the other ranges are empty).
    """
    if numel < min_split:
        return [(0, numel)] + [(numel, numel)] * (streams - 1)
    bounds = [k * numel // streams for k in range(streams + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def compute_draw_plan(numels: Sequence[int], streams: int = STREAMS,
                      min_split: int = MIN_SPLIT_NUMEL) -> list[list[Chunk]]:
    """For each stream, the chunks it draws, in the order it draws them (tensor order); empty ones left out."""
    plan: list[list[Chunk]] = [[] for _ in range(streams)]
    for i, numel in enumerate(numels):
        for k, (start, stop) in enumerate(compute_stream_chunks(numel, streams, min_split)):
            if stop > start:
                plan[k].append((i, start, stop))
    return plan


def compute_worker_count(streams: int, torch_threads: int, device: torch.device, total_numel: int) -> int:
    """Threads that draw: min(streams, torch's threads) on CPU for at least ``MIN_PARALLEL_NUMEL`` coordinates;
    one for fewer, and on other devices (their kernels are asynchronous, a host thread per stream would only
    queue them)."""
    if device.type != "cpu" or total_numel < MIN_PARALLEL_NUMEL:
        return 1
    return max(1, min(streams, torch_threads))


class GaussianStreams:
    """``STREAMS`` seeded generators that fill tensors with N(0, std^2) noise, chunk k of every tensor from
    stream k, streams run in parallel on CPU. Successive calls continue each stream (fresh noise each step).

    Use: ``noise = GaussianStreams(noise_seed, device)``, ``noise.normal_inplace(buffers, std)`` per step,
    ``noise.close()`` at the end (or ``with GaussianStreams(...) as noise``).
    """

    def __init__(self, noise_seed: int, device: torch.device | str = "cpu", streams: int = STREAMS,
                 workers: int | None = None, min_split: int = MIN_SPLIT_NUMEL) -> None:
        self.device = torch.device(device)
        self.streams, self.min_split = streams, min_split
        self.generators = [torch.Generator(device=self.device).manual_seed(s)
                           for s in compute_stream_seeds(noise_seed, streams)]
        self._workers = workers  # None: decided at each fill from torch.get_num_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._plan_key: tuple[int, ...] = ()
        self._plan: list[list[Chunk]] = []

    def normal_inplace(self, tensors: Sequence[torch.Tensor], std: float) -> None:
        """Overwrite every tensor with independent N(0, std^2) draws (each must be contiguous, on the
        streams' device)."""
        for t in tensors:
            if not t.is_contiguous() or t.device.type != self.device.type:
                raise NoiseStreamError(f"noise buffers must be contiguous tensors on {self.device}, got one "
                                       f"of shape {tuple(t.shape)} on {t.device}")
        numels = tuple(t.numel() for t in tensors)
        if numels != self._plan_key:  # the plan depends on the sizes only; the tables keep theirs between steps
            self._plan_key, self._plan = numels, compute_draw_plan(numels, self.streams, self.min_split)
        flats = [t.view(-1) for t in tensors]
        workers = self._workers or compute_worker_count(self.streams, torch.get_num_threads(), self.device,
                                                        sum(numels))
        workers = min(workers, self.streams)
        if workers == 1:
            for k in range(self.streams):
                self._draw_stream(k, flats, std)
            return
        # the streams are taken from a queue by whichever thread is free: on a busy machine a worker the
        # scheduler has not run yet leaves its streams to the calling thread instead of stalling it; which
        # thread draws a stream never changes what it draws
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for k in range(self.streams):
            todo.put(k)
        pool = self._thread_pool(workers - 1)
        futures = [pool.submit(self._take, todo, flats, std) for _ in range(workers - 1)]
        self._take(todo, flats, std)
        for f in futures:
            f.result()

    def _take(self, todo: queue.SimpleQueue[int], flats: list[torch.Tensor], std: float) -> None:
        while True:
            try:
                k = todo.get_nowait()
            except queue.Empty:
                return
            self._draw_stream(k, flats, std)

    def _draw_stream(self, k: int, flats: list[torch.Tensor], std: float) -> None:
        gen = self.generators[k]
        for i, start, stop in self._plan[k]:
            flats[i][start:stop].normal_(0.0, std, generator=gen)

    def _thread_pool(self, size: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size != size:
            self.close()
            self._pool, self._pool_size = ThreadPoolExecutor(max_workers=size, thread_name_prefix="dp-noise"), size
        return self._pool

    def close(self) -> None:
        """Stop the worker threads (the generators stay usable; a later fill starts new threads)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> GaussianStreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
