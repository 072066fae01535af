"""Checks a run's data and config before anything starts (Ray, Flower, training), so that a mistake is
one clear line and exit code 2, never a worker's traceback or a half-made run folder.

``fedsocial simulate`` loads, splits and partitions the data exactly as each partner will, and checks
what would otherwise fail inside a partner: a partner without users, a federation without a single
user to evaluate, a ``privacy.target_delta`` not below 1/n for a partner of n users, a
``privacy.max_epsilon`` that no noise can meet. ``fedsocial train``
uses :func:`check_evaluable` on its split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fedsocial.shared.config import Config, ConfigError
from fedsocial.shared.data import DataError, SplitData


@dataclass(frozen=True)
class Preflight:
    """What the checks found: each partner's users and users with test interactions."""

    partner_users: tuple[int, ...]
    partner_test_users: tuple[int, ...]


def compute_evaluable_users(split: SplitData) -> int:
    """Users with at least one test interaction (the users a full-ranking evaluation averages over)."""
    return int(np.unique(split.test_users).size)


def check_evaluable(split: SplitData, where: str, min_interactions: int) -> None:
    """Refuse a split with no user to evaluate: its metrics would be 0.0 for no reason anyone could see."""
    if compute_evaluable_users(split) == 0:
        raise DataError(f"{where}: no user has a test interaction ({split.n_users} users); a user needs at "
                        f"least split.min_interactions = {min_interactions} interactions to be split into "
                        "train/val/test, so there is nothing to evaluate: use more data or lower "
                        "split.min_interactions")


def run_preflight(cfg: Config, data_dir: str | os.PathLike[str] | None) -> Preflight:
    """Load, split and partition the data as the partners will; raise DataError / ConfigError on a problem."""
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.partition import partition_users, partner_split
    from fedsocial.shared.split import split_dataset

    dataset = load_dataset(cfg.data, data_dir)
    split = split_dataset(dataset, cfg.split)
    where = f"data ({cfg.data.format}{': ' + cfg.data.path if cfg.data.path else ''})"
    check_evaluable(split, where, cfg.split.min_interactions)
    n = cfg.federation.partners
    if dataset.n_users < n:
        raise ConfigError(f"federation.partners: {n} partners for {dataset.n_users} users")
    assignment = partition_users(dataset, n, cfg.partition)
    parts = [partner_split(split, assignment, p) for p in range(n)]
    users = tuple(int(p.n_users) for p in parts)
    empty = [f"partner-{i}" for i, u in enumerate(users) if u == 0]
    if empty:
        raise ConfigError(f"partition.method = {cfg.partition.method}: {', '.join(empty)} would have no users; "
                          "use fewer partners or another partition method")
    if cfg.privacy.enabled:
        from fedsocial.shared.privacy.accounting import PrivacyConfigError, check_delta

        for i, u in enumerate(users):
            try:
                check_delta(cfg.privacy.target_delta, u)
            except PrivacyConfigError as exc:
                raise ConfigError(f"privacy.target_delta: partner-{i} has {u} users: {exc}") from None
        for u in sorted(set(users)):
            check_reachable_budget(cfg, u)
    return Preflight(users, tuple(compute_evaluable_users(p) for p in parts))


# The largest noise calibrate_noise_multiplier evaluates (it doubles from 1 up to its bound of 1e4):
# a budget out of reach there fails inside every partner.
MAX_NOISE_MULTIPLIER = 8192.0


def check_reachable_budget(cfg: Config, n_users: int) -> None:
    """Refuse a ``privacy.max_epsilon`` that no noise can meet for a partner of ``n_users`` users.

    Epsilon falls as the noise grows: a cap met at sigma 8 is reachable (one cheap evaluation, the
    usual case); otherwise it is reachable only if ``MAX_NOISE_MULTIPLIER`` meets it over all rounds.
    """
    from fedsocial.shared.privacy.accounting import compute_epsilon
    from fedsocial.shared.privacy.round import compute_federation_prefix, compute_sample_rate, compute_steps

    pc, fc = cfg.privacy, cfg.federation
    prefix = compute_federation_prefix(cfg)  # what each partner's calibration composes
    if prefix and compute_epsilon(prefix, pc.target_delta, pc.accountant) >= pc.max_epsilon:
        raise ConfigError(f"privacy.max_epsilon: {pc.max_epsilon:g} is already spent by the releases besides "
                          f"training (epsilon {compute_epsilon(prefix, pc.target_delta, pc.accountant):.3g}: "
                          f"privacy.popularity_noise_multiplier = {pc.popularity_noise_multiplier:g}, "
                          f"federation.eval_noise_multiplier = {fc.eval_noise_multiplier:g}, "
                          f"privacy.selection_noise_multiplier = {pc.selection_noise_multiplier:g}); raise their noise")
    if pc.noise_multiplier > 0:
        return
    batch = fc.local_batch_size or cfg.train.batch_size
    q = compute_sample_rate(n_users, batch)
    steps = compute_steps(q, fc.local_epochs) * fc.rounds
    for sigma in (8.0, MAX_NOISE_MULTIPLIER):
        eps = compute_epsilon([*prefix, (sigma, q, steps)], pc.target_delta, pc.accountant)
        if eps <= pc.max_epsilon:
            return
    raise ConfigError(f"privacy.max_epsilon: {pc.max_epsilon:g} is out of reach for a partner of {n_users} users "
                      f"(sample rate {q:.3g}, {steps} steps over federation.rounds = {fc.rounds}): even "
                      f"noise_multiplier {MAX_NOISE_MULTIPLIER:g} spends epsilon {eps:.3g}; raise it, or train "
                      "fewer rounds or epochs")
