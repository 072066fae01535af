"""Where a flat DP clipping norm goes: each parameter's share of the per-user squared gradient norm.

``python -m fedsocial.simulations.grad_share --config configs/ciao_dp.toml --data-dir ../shared/datasets
[--users 60] [--set ...]``

DP-SGD clips each user's whole gradient to ``max_grad_norm`` and adds the same noise to every
coordinate, so a parameter whose gradient is a small part of the per-user norm gets a small part of
the signal against the full noise (McMahan et al. 2018 on flat vs per-layer clipping). This prints,
for the model as the config builds it (at initialisation), the mean over sampled users of
|g_param|^2 / |g|^2 and the median per-user norm: use it to choose ``model.temperature`` or
``model.bias_scale`` before spending a budget. Non-private: it reads the data in the clear.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fedsocial.shared.config import Config
from fedsocial.shared.trainer import LocalTrainer
from fedsocial.simulations.common import add_config_arguments, config_from_args, user_errors


def compute_gradient_shares(trainer: LocalTrainer, users: np.ndarray, seed: int = 0) -> tuple[dict[str, float], float]:
    """(mean share of each parameter in each user's squared gradient norm, median per-user norm)."""
    model, rng = trainer.model, np.random.default_rng(seed)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shares: dict[str, list[float]] = {n: [] for n, _ in params}
    norms = []
    for u in users:
        model.zero_grad(set_to_none=True)
        model(trainer._batch(np.array([u]), rng)).sum().backward()  # one DP example alone
        sq = {n: float((p.grad * p.grad).sum()) if p.grad is not None else 0.0 for n, p in params}
        total = sum(sq.values())
        norms.append(total ** 0.5)
        for n in shares:
            shares[n].append(sq[n] / total if total > 0 else 0.0)
    model.zero_grad(set_to_none=True)
    return {n: float(np.mean(v)) for n, v in shares.items()}, float(np.median(norms))


def measure(cfg: Config, data_dir: str | None, n_users: int) -> tuple[dict[str, float], float]:
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.split import split_dataset

    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    split = split_dataset(load_dataset(cfg.data, data_dir), cfg.split)
    trainer = LocalTrainer(cfg.replace("privacy", enabled=False), split, device="cpu", seed=cfg.train.seed)
    candidates = trainer._example_users()
    users = candidates[:: max(1, len(candidates) // n_users)][:n_users]  # spread over the id range
    return compute_gradient_shares(trainer, users)


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grad_share", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--users", type=int, default=60, help="users sampled (one backward pass each)")
    args = parser.parse_args(argv)
    shares, norm = measure(config_from_args(args), args.data_dir, args.users)
    print(f"median per-user gradient norm {norm:.4g} over {args.users} users")
    print("| parameter | share of the squared norm |\n|---|---|")
    for name, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {share:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
