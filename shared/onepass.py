"""User-level DP-SGD clipping in one backward pass: ghost norms plus book-keeping.

Opacus's ghost clipping (Li et al. 2022) runs two backward passes per step: one to get each
example's gradient norm from the layers' activations and output gradients, a second one of the
loss re-weighted by the clip factors to get the clipped sum. Book-keeping (Bu, Wang, Zha and
Karypis, ICML 2023, "Differentially private optimization on large model at small cost") keeps the
activations and output gradients of the first pass and assembles the clipped sum from them, so the
second pass disappears. Here the one pass asks autograd only for the gradients of the layers'
outputs (``torch.autograd.grad``): the parameters' own (unclipped) gradients are never formed.

For the two layer types the models use (every trained parameter lives in one of them; anything else
is refused), with example b's rows ``a_b`` (inputs) and ``g_b`` (output gradients):

- ``nn.Embedding``: example b's gradient row j is the sum of g_b at b's positions holding index j;
  its squared norm is summed over the distinct (b, j) pairs (the fast sampler of shared/trainer.py),
  and the clipped sum is one ``index_add_`` of the re-weighted g;
- ``nn.Linear``: the per-example gradient ``g_b^T a_b`` [out, in] (and ``sum g_b`` for the bias) is
  formed explicitly (the models' layers are small), squared norms summed, clipped sum one einsum.

A module called several times per forward is handled (its calls' contributions per example add up).
The clip factor is Opacus's, ``min(1, C / (norm + 1e-6))``; ``tests/test_onepass.py`` checks norms
and clipped sums against a brute-force per-user loop and against Opacus's ghost clipping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedsocial.shared.dp_noise import GaussianStreams

SUPPORTED = (nn.Embedding, nn.Linear)


class OnePassError(ValueError):
    """The model has a trained parameter in a layer type the one-pass clipper cannot handle."""


def compute_embedding_row_sums(ids: torch.Tensor, grads: torch.Tensor,
                               vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example's gradient rows of an embedding table, duplicates summed: ids [B, L], output grads
    [B, L, d] -> (example [U], table row [U], summed gradient [U, d]) over the U distinct (example, row) pairs.

    The per-example norm and the clipped sum both read these U rows (U <= B L: a history item sampled again as
    a negative, or the same neighbour twice, is one row), so the B L output rows are grouped once, not twice.
    """
    n_rows, width = ids.shape
    rows = torch.arange(n_rows, device=ids.device).repeat_interleave(width)
    keys, inverse = torch.unique(rows * vocab + ids.reshape(-1), return_inverse=True)  # a 1-D key b * vocab + j
    summed = torch.zeros(len(keys), grads.shape[-1], dtype=grads.dtype, device=grads.device)
    summed.index_add_(0, inverse, grads.reshape(-1, grads.shape[-1]))
    return keys // vocab, keys % vocab, summed


def compute_embedding_norm_sq(ids: torch.Tensor, grads: torch.Tensor, vocab: int) -> torch.Tensor:
    """Squared per-example gradient norm of an embedding table: ids [B, L], output grads [B, L, d] -> [B].

    Rows of one example with the same index add up before squaring (:func:`compute_embedding_row_sums`).
    """
    example, _, summed = compute_embedding_row_sums(ids, grads, vocab)
    return compute_row_norm_sq(example, summed, ids.shape[0])


def compute_row_norm_sq(example: torch.Tensor, summed: torch.Tensor, n_examples: int) -> torch.Tensor:
    """Squared per-example norm [B] of distinct gradient rows ``summed`` [U, d] owned by ``example`` [U]."""
    norm_sq = torch.zeros(n_examples, dtype=summed.dtype, device=summed.device)
    return norm_sq.index_add_(0, example, (summed * summed).sum(1))


def compute_linear_per_example(acts: torch.Tensor, grads: torch.Tensor,
                               bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example gradients of a linear layer: inputs [B, T, in], output grads [B, T, out] ->
    (weight [B, out, in], bias [B, out] or None)."""
    weight = torch.einsum("bto,bti->boi", grads, acts)
    return weight, (grads.sum(1) if bias else None)


def compute_clip_factors(norm_sq: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's per-example factor min(1, C / (||g_b|| + 1e-6))."""
    return (max_grad_norm / (norm_sq.sqrt() + 1e-6)).clamp(max=1.0)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """The calls' tensors side by side along dim 1 (a single call as it is: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class OnePassClipper:
    """Records the inputs and outputs of the model's trained layers during a forward pass, then
    turns the per-example loss into the sum of per-example clipped gradients (``p.grad``).

    Use: ``clipper.start()``, ``losses = model(batch)`` (shape [B], one example per row),
    ``norms = clipper.clipped_backward(losses, C)`` (or ``noisy_clipped_backward``, the noised release of
    a DP-SGD step); ``close()`` removes the hooks.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[nn.Module] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(module, SUPPORTED):
                raise OnePassError(f"one-pass DP clipping: layer {name or '<root>'} is a {type(module).__name__}; "
                                   "only nn.Embedding and nn.Linear are supported (use privacy.clipping = ghost)")
            if isinstance(module, nn.Embedding) and (module.padding_idx is not None or module.max_norm is not None
                                                      or module.sparse):
                raise OnePassError(f"one-pass DP clipping: embedding {name} uses padding_idx, max_norm or sparse")
            self.layers.append(module)
        # every trained parameter, in model.parameters() order (the order the noise is drawn in)
        self.params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        self._buffers: dict[torch.Tensor, torch.Tensor] = {}
        self._records: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._recording = False
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if self._recording and torch.is_grad_enabled():
            self._records.setdefault(module, []).append((inputs[0].detach(), output))

    def start(self) -> None:
        """Record the next forward pass (earlier records are dropped)."""
        self._records, self._recording = {}, True

    def clipped_backward(self, per_example_loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """Set every trained parameter's ``.grad`` to sum_b clip_b * grad_b; returns the norms [B]."""
        norms = self._assemble(per_example_loss, max_grad_norm, None)
        for p in self.params:  # a layer this forward did not use: a zero gradient (noise still goes on it)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return norms

    def noisy_clipped_backward(self, per_example_loss: torch.Tensor | None, max_grad_norm: float, std: float,
                               expected_batch: int,
                               noise: GaussianStreams | torch.Generator | None) -> torch.Tensor | None:
        """DP-SGD's released gradient (Abadi et al. 2016) in one pass over each table:
        ``p.grad = (N(0, std^2) + sum_b clip_b * grad_b) / expected_batch`` on every trained parameter.

        The noise is drawn into one buffer per parameter, kept between steps (a fresh table-sized block each
        step costs page faults comparable to drawing the noise), and the clipped rows are added into it.
        ``noise``: the fit's :class:`~fedsocial.shared.dp_noise.GaussianStreams` (what the trainer uses: the
        draw split over fixed streams, in parallel), or one generator (or None, torch's default) drawing
        parameter by parameter in ``model.parameters()`` order, the draws of ``shared.trainer.add_noise_inplace``.
        ``per_example_loss`` None: an empty Poisson batch, noise alone.
        Returns the per-example norms (None for an empty batch).
        """
        bufs = self._noise_buffers()
        if isinstance(noise, GaussianStreams):
            noise.normal_inplace([bufs[p] for p in self.params], std)
        else:
            for p in self.params:
                bufs[p].normal_(0.0, std, generator=noise)
        norms = None if per_example_loss is None else self._assemble(per_example_loss, max_grad_norm, bufs)
        for p in self.params:
            p.grad = bufs[p].div_(expected_batch)
        return norms

    def _noise_buffers(self) -> dict[torch.Tensor, torch.Tensor]:
        """One buffer per trained parameter, (re)made only when a parameter's shape, dtype or device changed."""
        for p in self.params:
            buf = self._buffers.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                self._buffers[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return self._buffers

    def _assemble(self, per_example_loss: torch.Tensor, max_grad_norm: float,
                  into: dict[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The per-example norms [B] and the clipped sum: added into ``into[p]`` when given, else set as
        ``p.grad`` of the parameters this forward used."""
        self._recording = False
        n = per_example_loss.shape[0]
        calls = [(m, a, o) for m, recs in self._records.items() for a, o in recs]
        outs = [o for _, _, o in calls]
        grads = torch.autograd.grad(per_example_loss.sum(), outs, allow_unused=True) if outs else ()
        norm_sq = torch.zeros(n, dtype=per_example_loss.dtype, device=per_example_loss.device)
        linear: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}
        emb: dict[nn.Module, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for (module, acts, out), g in zip(calls, grads, strict=True):
            if acts.shape[0] != n or out.shape[0] != n:  # rows shared by examples would be misattributed
                raise OnePassError(f"one-pass DP clipping: a call of {type(module).__name__} has leading dimension "
                                   f"{acts.shape[0]}, not the batch's {n}; every layer input must be per example")
            g = torch.zeros_like(out) if g is None else g
            if isinstance(module, nn.Embedding):
                ids_list, g_list = emb.setdefault(module, ([], []))
                ids_list.append(acts.reshape(n, -1))
                g_list.append(g.reshape(n, -1, g.shape[-1]))
                continue
            assert isinstance(module, nn.Linear)
            gw, gb = compute_linear_per_example(acts.reshape(n, -1, acts.shape[-1]),
                                                g.reshape(n, -1, g.shape[-1]), module.bias is not None)
            if module in linear:  # a layer called twice: its per-example gradients add up
                w0, b0 = linear[module]
                gw, gb = w0 + gw, (None if gb is None or b0 is None else b0 + gb)
            linear[module] = (gw, gb)
        for gw, gb in linear.values():
            norm_sq += (gw * gw).sum((1, 2)) + (0.0 if gb is None else (gb * gb).sum(1))
        # each table's distinct (example, row) gradient rows, for its norms and then its clipped sum
        rows: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for module, (ids_list, g_list) in emb.items():
            assert isinstance(module, nn.Embedding)
            rows[module] = compute_embedding_row_sums(_join(ids_list), _join(g_list), module.num_embeddings)
            norm_sq += compute_row_norm_sq(rows[module][0], rows[module][2], n)
        factors = compute_clip_factors(norm_sq, max_grad_norm)
        for module, (gw, gb) in linear.items():
            assert isinstance(module, nn.Linear)
            self._put(module.weight, torch.einsum("b,boi->oi", factors, gw), into)
            if module.bias is not None and gb is not None:
                self._put(module.bias, factors @ gb, into)
        for module, (example, table_row, summed) in rows.items():
            assert isinstance(module, nn.Embedding)
            weighted = summed.mul_(factors[example, None])  # clip_b * (b's summed row j): the sum's terms, in place
            if into is None:
                module.weight.grad = torch.zeros_like(module.weight).index_add_(0, table_row, weighted)
            else:
                into[module.weight].index_add_(0, table_row, weighted)
        self._records = {}
        return norm_sq.sqrt()

    @staticmethod
    def _put(param: torch.Tensor, value: torch.Tensor, into: dict[torch.Tensor, torch.Tensor] | None) -> None:
        if into is None:
            param.grad = value
        else:
            into[param].add_(value)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._records, self._buffers = [], {}, {}
