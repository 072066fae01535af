"""Empirical check of the privacy guarantee: canary users and one-run auditing.

``fedsocial-canary`` (``python -m fedsocial.simulations.canary_audit``) plants ``m`` canary users, each a
record of random items, in one partner; each canary's record is included in training
independently with probability 1/2 (the canary users exist either way; excluded ones have an empty
record). The partner trains with the federation's schedule (``federation.rounds`` DP fits of
``federation.local_epochs`` epochs, fresh optimizer and PrivacyEngine per round, noise calibrated
to ``privacy.max_epsilon``) — the mechanism its users' guarantee is about: other partners'
updates do not depend on this partner's users. The attack scores each canary with the released
shared parameters only: the average percentile rank of each of its items among all items, for
the leave-one-out bag of its other items. Steinke, Nasr and Jagielski (2023) turn the guesses into
a lower bound on epsilon that must stay below the accounted epsilon.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsocial.shared.config import Config
from fedsocial.shared.data import SplitData
from fedsocial.shared.privacy.one_run import compute_audit_from_scores
from fedsocial.shared.privacy.records import RecordError, load_run_signer, write_signed_canary
from fedsocial.simulations.common import add_config_arguments, config_from_args, format_table, user_errors


def plant_canaries(split: SplitData, m: int, items_each: int, rng: np.random.Generator
                   ) -> tuple[SplitData, np.ndarray, np.ndarray]:
    """Add ``m`` users with ``items_each`` random items; include each record with probability 1/2.

    Returns the new split (canaries train-only, no social edges), the canaries' items [m, k] and
    the inclusion flags [m].
    """
    ds, n = split.dataset, split.n_users
    items = np.stack([rng.choice(ds.n_items, size=items_each, replace=False) for _ in range(m)])
    included = rng.random(m) < 0.5
    users = np.repeat(n + np.arange(m), items_each)[np.repeat(included, items_each)]
    features = ds.user_features  # canaries have no user features: code 0, "missing", in every column
    if features is not None:
        features = np.concatenate([features, np.zeros((m, features.shape[1]), dtype=features.dtype)])
    new_ds = dataclasses.replace(ds, n_users=n + m, user_ids=None, user_features=features)
    planted = dataclasses.replace(
        split, dataset=new_ds,
        train_users=np.concatenate([split.train_users, users]),
        train_items=np.concatenate([split.train_items, items[included].reshape(-1)]))
    return planted, items, included


def compute_canary_batch(canary_users: np.ndarray, canary_items: np.ndarray) -> dict[str, torch.Tensor]:
    """One example per (canary, item): the canary's other items as its bag, no neighbours.

    ``canary_items`` [m, k]; the result has m * k rows, row ``c * k + j`` leaving item j out.
    """
    m, k = canary_items.shape
    keep = ~np.eye(k, dtype=bool)  # row j: every item but the j-th
    bags = np.repeat(canary_items, k, axis=0)[np.tile(keep, (m, 1))].reshape(m * k, k - 1)
    return {"users": torch.as_tensor(np.repeat(canary_users, k).astype(np.int64)),
            "bag": torch.as_tensor(bags.astype(np.int64)), "bag_mask": torch.ones(m * k, k - 1),
            "nbrs": torch.zeros(m * k, 1, dtype=torch.int64), "nbr_mask": torch.zeros(m * k, 1)}


@torch.no_grad()
def compute_canary_percentiles(model: Any, canary_users: np.ndarray, canary_items: np.ndarray) -> np.ndarray:
    """[m, k]: the percentile rank of canary item j among all items, for the bag of the canary's other items.

    Scored by the model's own scoring function (``score_all``: temperature, bias scale, category,
    price and text vectors, MLP residual), so the attack sees exactly what the released model
    ranks. Only released parameters take part: canaries have no neighbours, and their local p_u is
    never refitted (the canary run trains with ``refit=False``; p_u would not be released anyway).
    """
    m, k = canary_items.shape
    was_training = model.training
    model.eval()
    try:
        scores = model.score_all(compute_canary_batch(canary_users, canary_items), model.item_side())
    finally:
        model.train(was_training)
    own = scores.gather(1, torch.as_tensor(canary_items.reshape(-1, 1).astype(np.int64)))
    percentile = (scores < own).float().mean(-1)  # 1.0 = ranked above every other item
    return percentile.reshape(m, k).cpu().numpy()


def compute_canary_scores(model: Any, canary_users: np.ndarray, canary_items: np.ndarray) -> np.ndarray:
    """Each canary's score: the mean of :func:`compute_canary_percentiles` over its items."""
    return compute_canary_percentiles(model, canary_users, canary_items).mean(1)


BACKGROUNDS = ("real", "synthetic")


def compute_synthetic_background(cfg: Config, split: SplitData, seed: int) -> SplitData:
    """The canary run's other users, generated instead of the partner's own: as many users, the same catalogue
    (its items, categories, price bins and text features: public, like the catalogue), the same mean
    interactions and friends per user, and user-feature codes drawn uniformly within each column's size (sizes,
    not records); nothing of a real user's record is used.

    DP is a guarantee for every pair of neighbouring datasets, so a lower bound measured on any background is a
    valid test of the mechanism; on a generated one, publishing it costs the partner's users nothing."""
    from fedsocial.shared.config import DataConfig
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.synthetic import generate

    real = split.dataset
    n_users, n_items = max(2, int(split.n_users)), max(2, int(split.n_items))
    per_user = max(1.0, len(split.train_users) / max(1, int(split.n_users)))
    friends = float(len(real.social_src)) / max(1, real.n_users)
    ds = generate(DataConfig(n_users=n_users, n_items=n_items, interactions_per_user=per_user,
                             friends_per_user=friends, synthetic_seed=seed))
    rng = np.random.default_rng(seed)
    users = None
    if real.user_features is not None and real.user_feature_sizes:
        users = np.stack([rng.integers(0, max(1, size), size=n_users) for size in real.user_feature_sizes], axis=1)
    catalogue = n_items == real.n_items  # the real catalogue's features go with its items
    ds = dataclasses.replace(
        ds, name="canary-background",
        item_category=real.item_category if catalogue and real.item_category is not None else ds.item_category,
        item_price_bin=real.item_price_bin if catalogue else None, item_text=real.item_text if catalogue else None,
        user_features=users, user_feature_names=real.user_feature_names if users is not None else (),
        user_feature_sizes=real.user_feature_sizes if users is not None else ())
    return split_dataset(ds, cfg.split)


def compute_canary_cost(cfg: Config, background: str, partner: int, epsilon: float) -> dict[str, Any]:
    """What publishing the canary audit's result costs real users: the canary run trains a DP model on its
    background users, a second use of their data composing with the federation's (the ledgers do not hold it)."""
    if background == "synthetic" or cfg.data.format == "synthetic":
        return {"real_users": False, "epsilon": 0.0,
                "note": "the canary run's other users are generated: publishing its result costs no real user "
                        "anything"}
    return {"real_users": True, "epsilon": epsilon, "delta": cfg.privacy.target_delta if cfg.privacy.enabled else None,
            "partner": partner,
            "note": f"the canary run trained on partner {partner}'s real users: publishing its result is a second use "
                    "of their data that composes with the federation's epsilon (not in any ledger); "
                    "the default --background synthetic avoids it"}


def run_canary_audit(cfg: Config, data_dir: str | None, m: int, items_each: int, partner: int,
                     seed: int = 0, background: str = "synthetic") -> dict[str, Any]:
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.partition import partition_users, partner_split
    from fedsocial.shared.privacy.round import PrivacyRound, compute_sample_rate, plan_round
    from fedsocial.shared.split import split_dataset
    from fedsocial.shared.trainer import LocalTrainer

    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    sigma = 0.0
    split = split_dataset(load_dataset(cfg.data, data_dir), cfg.split)
    fc = cfg.federation
    if fc.partners > 1:
        split = partner_split(split, partition_users(split.dataset, fc.partners, cfg.partition), partner)
    if background == "synthetic" and cfg.data.format != "synthetic":
        split = compute_synthetic_background(cfg, split, seed)
    planted, items, included = plant_canaries(split, m, items_each, np.random.default_rng(seed))
    trainer = LocalTrainer(cfg, planted, device=cfg.train.device, seed=cfg.train.seed)
    pc = cfg.privacy
    pround = None
    if pc.enabled:  # the federation's schedule: rounds x local epochs, planned as every partner plans it
        pround = PrivacyRound(plan_round(pc, n_users=planted.n_users, batch_size=cfg.train.batch_size,
                                         epochs=fc.local_epochs, rounds=fc.rounds))
        sigma = pround.plan.noise_multiplier
    for _ in range(fc.rounds):
        fit = trainer.fit(fc.local_epochs, noise_multiplier=sigma if pc.enabled else None, refit=False)
        if pround is not None:
            pround.history.append((fit.noise_multiplier, fit.sample_rate, fit.steps))
    q = pround.plan.sample_rate if pround is not None else compute_sample_rate(planted.n_users, cfg.train.batch_size)
    epsilon = pround.epsilon_spent() if pround is not None else float("inf")
    scores = compute_canary_scores(trainer.model, split.n_users + np.arange(m), items)
    audit = compute_audit_from_scores(scores, included, delta=pc.target_delta)
    return {
        "method": "one-run audit (Steinke, Nasr and Jagielski 2023), canary users of random items",
        "epsilon_lower_bound": audit.epsilon_lower_bound, "confidence": audit.confidence,
        "reported_epsilon": epsilon, "delta": pc.target_delta, "private": pc.enabled,
        "noise_multiplier": sigma, "sample_rate": q, "rounds": fc.rounds, "local_epochs": fc.local_epochs,
        "canaries": m, "canary_items": items_each, "included": int(included.sum()), "guesses": audit.guesses,
        "correct": audit.correct, "partner": partner, "partner_users": split.n_users,
        "score_gap": float(scores[included].mean() - scores[~included].mean()),
        "background": "synthetic" if background == "synthetic" or cfg.data.format == "synthetic" else "real",
        "privacy_cost": compute_canary_cost(cfg, background, partner, epsilon),
    }


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsocial canary-audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--canary-items", type=int, default=10)
    parser.add_argument("--partner", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--background", choices=BACKGROUNDS, default="synthetic",
                        help="the canary run's other users: generated ones of the partner's sizes with its catalogue "
                             "(synthetic, the default: publishing the result costs its users nothing) or the "
                             "partner's own (real: then it costs them a second epsilon, stated in the file, the "
                             "audit and the report). On the synthetic data of configs/demo.toml both are generated")
    parser.add_argument("--out", required=True, help="run folder: writes canary_audit.json there")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    out = Path(args.out)
    try:
        load_run_signer(out)  # a folder whose key cannot sign is refused before the audit's training
    except RecordError as exc:
        print(f"error: {out}: {exc}", file=sys.stderr)
        return 2
    result = run_canary_audit(cfg, args.data_dir, args.canaries, args.canary_items, args.partner, args.seed,
                              args.background)
    out.mkdir(parents=True, exist_ok=True)
    signed = write_signed_canary(out, result)
    print(format_table([(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in result.items()
                        if k not in ("method", "privacy_cost")], title=result["method"]))
    print(f"privacy cost: {result['privacy_cost']['note']}")
    print("canary_audit.json: " + ("signed with the run's server key (canary_record.json)" if signed
                                   else "unsigned (no run key in this folder: the audit will warn)"))
    return 0
