"""AdamW as one fused kernel call per step, without ``torch.optim.Optimizer``.

Same update as ``torch.optim.AdamW(params, lr, weight_decay=..., fused=True)`` (Loshchilov and Hutter
2019, "Decoupled weight decay regularization"), bit for bit (tests/test_optim.py), through the same
kernel, ``torch._fused_adamw_``. Why not torch's class: the first ``Optimizer.__init__`` of a process
imports ``torch._dynamo`` (its ``_disable_dynamo`` decorator), 1.7 s of CPU for a compiler this
project never uses, in every partner process of every federation and every deployed ClientApp start
(BENCHMARKS.md 9.6). Where the kernel is missing (another torch), :func:`make_adamw` returns torch's
class. Only what the trainers use: one parameter group, ``step``, ``zero_grad``; dense gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class FusedAdamW:
    """AdamW over ``params`` with torch's defaults (betas 0.9 / 0.999, eps 1e-8, no amsgrad)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), betas, float(eps)
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # index -> (m, v, step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (state created on its first gradient, as torch's)."""
        live = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        grads: list[torch.Tensor] = [p.grad for _, p in live if p.grad is not None]
        for (i, p), grad in zip(live, grads, strict=True):
            if grad.is_sparse:
                raise RuntimeError("FusedAdamW: sparse gradients are not supported")
            if i not in self.state:  # float32 step counters on the parameter's device, as fused AdamW keeps them
                self.state[i] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros((), dtype=torch.float32, device=p.device))
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}  # the kernel takes one device and dtype
        for k, (_, p) in enumerate(live):
            groups.setdefault((p.device, p.dtype), []).append(k)
        for members in groups.values():
            params = [live[k][1] for k in members]
            m, v, steps = ([self.state[live[k][0]][j] for k in members] for j in range(3))
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, [grads[k] for k in members], m, v, [], steps, amsgrad=False, lr=self.lr,
                                beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay,
                                eps=self.eps, maximize=False, grad_scale=None, found_inf=None)


def make_adamw(params: Iterable[torch.Tensor], lr: float, weight_decay: float = 1e-2) -> Any:
    """:class:`FusedAdamW`, or torch's fused AdamW where this torch has no ``_fused_adamw_`` kernel."""
    if hasattr(torch, "_fused_adamw_"):
        return FusedAdamW(params, lr, weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
