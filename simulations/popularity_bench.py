"""What the DP popularity release alone ranks like: MostPop from the federation's noisy histogram.

``python -m fedsocial.simulations.popularity_bench --config configs/lastfm_dp.toml --data-dir ../shared/datasets
--partners 5 --sigmas 0,2,3,4,6 --seeds 0,1,2``

For each ``privacy.popularity_noise_multiplier`` sigma (0: the exact histogram, i.e. MostPop of the
clipped counts) and seed, every partner of the config's partition releases its histogram as the
federation does (shared/privacy/popularity.py: each user's distinct training items weighted to unit L2
norm, Gaussian noise sigma on every item), the releases are summed, and each partner's test users are
ranked by :func:`compute_popularity_prior` of the sum (training items excluded). Prints, per sigma, the
epsilon of the release alone at the config's delta and NDCG@10 / Recall@10 over all partners' test users
(mean and standard deviation over the seeds), as JSON lines. This is the floor the popularity prior gives
the DP model, at no other cost than the release.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from fedsocial.simulations.common import add_config_arguments, config_from_args, user_errors


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not (v >= 0 and np.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"noise multipliers must be finite and >= 0, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="popularity_bench", description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--partners", type=int, default=5)
    p.add_argument("--sigmas", type=_floats, default=_floats("0,2,3,4,6"), help="comma-separated, >= 0")
    p.add_argument("--seeds", type=_ints, default=_ints("0,1,2"), help="comma-separated noise seeds")
    return p


def compute_pooled(per_partner: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Metrics over all partners' evaluated users (each partner's mean weighted by its user count)."""
    total = sum(n for _, n in per_partner)
    return {k: sum(m[k] * n for m, n in per_partner) / max(1, total) for k in ("ndcg@10", "recall@10")}


@user_errors
def main(argv: list[str] | None = None) -> int:
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.metrics import evaluate_model
    from fedsocial.shared.models.mostpop import MostPop
    from fedsocial.shared.partition import partition_users, partner_split
    from fedsocial.shared.privacy.accounting import compute_epsilon
    from fedsocial.shared.privacy.popularity import (
        compute_noisy_histogram,
        compute_popularity_histogram,
        compute_popularity_prior,
    )
    from fedsocial.shared.split import split_dataset

    args, extra = _parser().parse_known_args(argv)
    cfg = config_from_args(args, extra)
    sigmas, seeds = args.sigmas, args.seeds
    dataset = load_dataset(cfg.data, args.data_dir)
    split = split_dataset(dataset, cfg.split)
    assignment = partition_users(dataset, args.partners, cfg.partition)
    parts = [partner_split(split, assignment, p) for p in range(args.partners)]
    hists = [compute_popularity_histogram(s.train_users, s.train_items, s.n_users, s.n_items) for s in parts]
    for sigma in sigmas:
        rows = []
        for seed in seeds if sigma > 0 else seeds[:1]:
            rng = np.random.default_rng(seed)
            total = np.sum([compute_noisy_histogram(h, sigma, rng) if sigma > 0 else h for h in hists], axis=0)
            prior = compute_popularity_prior(total).astype(np.float32)
            rows.append(compute_pooled([evaluate_model(MostPop(s.n_users, s.n_items, cfg.model, item_counts=prior), s,
                                                       "test") for s in parts]))
        ndcg = np.array([r["ndcg@10"] for r in rows])
        recall = np.array([r["recall@10"] for r in rows])
        eps = compute_epsilon([(sigma, 1.0, 1)], cfg.privacy.target_delta) if sigma > 0 else float("inf")
        print(json.dumps({"popularity_noise_multiplier": sigma, "epsilon_of_release": round(eps, 4),
                          "seeds": len(rows), "ndcg@10": round(float(ndcg.mean()), 4),
                          "ndcg@10_std": round(float(ndcg.std()), 4), "recall@10": round(float(recall.mean()), 4)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
