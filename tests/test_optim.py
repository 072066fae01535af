"""shared/optim.py: the fused AdamW without torch.optim.Optimizer gives torch's update bit for bit, and a
process that uses it never imports torch's compiler."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedsocial.shared.optim import FusedAdamW


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)  # one float64 tensor among float32 ones: two kernel groups
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
            for shape, dtype in (((17, 8), torch.float32), ((8,), torch.float32), ((3, 4, 5), torch.float64))]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.3])
def test_fused_adamw_is_torch_fused_adamw_bit_for_bit(weight_decay: float) -> None:
    # Prepare: two copies of the same parameters; the middle one gets no gradient on some steps
    ours, theirs = _params(0), _params(0)
    opt_ours = FusedAdamW(ours, lr=0.01, weight_decay=weight_decay)
    opt_theirs = torch.optim.AdamW(theirs, lr=0.01, weight_decay=weight_decay, fused=True)
    g = torch.Generator().manual_seed(1)
    # Execute: 25 steps with the same gradients
    for step in range(25):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ours]
        for params in (ours, theirs):
            for k, (p, grad) in enumerate(zip(params, grads, strict=True)):
                p.grad = None if (k == 1 and step % 3 == 0) else grad.clone().to(p.dtype)
        opt_ours.step()
        opt_theirs.step()
        opt_ours.zero_grad()
        opt_theirs.zero_grad(set_to_none=True)
    # Assert
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in ours)


def test_zero_grad_without_set_to_none_zeroes_in_place_and_sparse_is_refused() -> None:
    # Prepare
    (p,) = _params(2)[:1]
    opt = FusedAdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    grad = p.grad
    # Execute / Assert
    opt.zero_grad(set_to_none=False)
    assert p.grad is grad and torch.count_nonzero(grad) == 0
    p.grad = torch.ones_like(p).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_training_with_it_never_imports_torch_dynamo() -> None:
    # Prepare: a fresh interpreter (this one may have imported the compiler already)
    code = ("import sys, torch; from fedsocial.shared.optim import make_adamw; "
            "p = torch.nn.Parameter(torch.ones(4)); opt = make_adamw([p], 0.1); "
            "(p * p).sum().backward(); opt.step(); print('torch._dynamo' in sys.modules, float(p[0]) < 1.0)")
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    # Assert: the step moved the parameter, and torch's compiler (1.7 s of imports) was never loaded
    assert out.split() == ["False", "True"]
