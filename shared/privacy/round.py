"""The privacy round: plan it from the config, admit or refuse it against the cap, record its release.

Every DP trainer (a federated partner, the centralized DP trainer, the canary audit) goes through
:func:`plan_round` and :class:`PrivacyRound`, so the sample rate, the step count and the calibrated
noise are computed in exactly one place.

A plan also keeps the config settings it was derived from (``settings``, keyed by their config
names). A ledger entry records them, so a resumed run whose settings would change what an already
released round used is refused with a message naming the setting (:func:`compute_plan_mismatches`),
instead of training that round again under different parameters and charging it once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsocial.shared.privacy.accounting import (
    Event,
    PrivacyConfigError,
    calibrate_noise_multiplier,
    check_delta,
    compute_epsilon,
    validate_event,
)

# What a released round used, as the ledger entry names it, and the settings that determine each.
PLAN_FIELDS = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "target_delta")
# A partner trains at federation.local_batch_size when set, else at train.batch_size: one setting.
PARTNER_BATCH_KEY = "federation.local_batch_size or train.batch_size"
_REL_TOL = 1e-12  # recorded floats are written by repr: equal plans compare equal exactly


def compute_sample_rate(n_users: int, batch_size: int) -> float:
    """Opacus's Poisson rate: 1 / len(data_loader) = 1 / ceil(n / batch_size)."""
    if n_users < 1 or batch_size < 1:
        raise PrivacyConfigError(f"sample rate needs n_users >= 1 and batch_size >= 1, got {n_users}, {batch_size}")
    return 1.0 / max(1, -(-n_users // batch_size))


def compute_steps(sample_rate: float, epochs: int) -> int:
    """DP-SGD steps of ``epochs`` epochs: one epoch is 1/q expected batches (Opacus's loader length)."""
    return int(epochs) * int(round(1.0 / sample_rate))


@dataclass(frozen=True)
class RoundPlan:
    """(sigma, q, steps) of one round and what they were derived from."""

    noise_multiplier: float
    sample_rate: float
    steps: int  # per round
    max_grad_norm: float
    target_delta: float
    max_epsilon: float
    accountant: str
    rounds: int
    scope: str
    settings: Mapping[str, Any] = field(default_factory=dict)  # config key -> value the plan depends on

    @property
    def event(self) -> Event:
        return (self.noise_multiplier, self.sample_rate, self.steps)


Calibrator = Callable[[float, float, float, int, int, str, tuple[Event, ...]], float]


def _default_calibrator(max_epsilon: float, delta: float, q: float, steps: int, rounds: int, accountant: str,
                        prefix: tuple[Event, ...] = ()) -> float:
    return calibrate_noise_multiplier(max_epsilon, delta, q, steps, rounds, accountant=accountant, tolerance=1e-3,
                                      prefix=prefix)


def plan_round(
    privacy: Any, *, n_users: int, batch_size: int, epochs: int, rounds: int,
    epochs_key: str = "federation.local_epochs", rounds_key: str = "federation.rounds",
    batch_key: str = "train.batch_size", calibrate: Calibrator = _default_calibrator,
    prefix: Sequence[Event] = (),
) -> RoundPlan:
    """The plan of each of ``rounds`` equal rounds of ``epochs`` DP epochs over ``n_users`` users.

    ``privacy`` is a :class:`shared.config.PrivacyConfig`. The noise is ``privacy.noise_multiplier``,
    or (when 0) the smallest that keeps all ``rounds`` rounds within ``privacy.max_epsilon``. The
    ``*_key`` arguments name the config settings the plan came from, for refusal messages.
    ``prefix``: the releases charged before the first round (:func:`shared.privacy.popularity.compute_release_prefix`),
    which the calibration composes with the rounds.
    """
    if not math.isfinite(privacy.max_epsilon):
        raise PrivacyConfigError(f"privacy.max_epsilon: must be finite with DP on, got {privacy.max_epsilon!r}")
    check_delta(privacy.target_delta, int(n_users))  # every DP trainer: delta >= 1/n would permit a whole record
    q = compute_sample_rate(int(n_users), int(batch_size))
    steps = compute_steps(q, epochs)
    fixed = tuple(validate_event(e) for e in prefix)
    sigma = privacy.noise_multiplier or calibrate(privacy.max_epsilon, privacy.target_delta, q, steps, int(rounds),
                                                  privacy.accountant, fixed)
    settings = {**compute_settings(privacy, {epochs_key: epochs, rounds_key: rounds, batch_key: batch_size}),
                "population": int(n_users)}
    return RoundPlan(float(sigma), q, steps, float(privacy.max_grad_norm), float(privacy.target_delta),
                     float(privacy.max_epsilon), str(privacy.accountant), int(rounds), str(privacy.scope), settings)


def compute_federation_prefix(cfg: Any) -> list[Event]:
    """The releases a federated partner makes besides its training rounds: the popularity release, the
    planned DP evaluations and the DP selection of the served model; the calibration composes them (RDP
    composition does not depend on order)."""
    from fedsocial.shared.privacy.evaluation import compute_planned_eval_events
    from fedsocial.shared.privacy.popularity import compute_release_prefix
    from fedsocial.shared.privacy.selection import compute_planned_selection_events

    return [*compute_release_prefix(cfg), *compute_planned_eval_events(cfg), *compute_planned_selection_events(cfg)]


def compute_settings(privacy: Any, schedule: Mapping[str, int]) -> dict[str, Any]:
    """The config settings a plan depends on, by config key (``schedule``: epochs, rounds, batch size keys)."""
    return {"privacy.noise_multiplier": float(privacy.noise_multiplier),
            "privacy.max_grad_norm": float(privacy.max_grad_norm),
            "privacy.target_delta": float(privacy.target_delta), "privacy.max_epsilon": float(privacy.max_epsilon),
            "privacy.accountant": str(privacy.accountant), "privacy.scope": str(privacy.scope),
            "privacy.popularity_noise_multiplier": float(privacy.popularity_noise_multiplier),
            "privacy.distributed_noise": bool(getattr(privacy, "distributed_noise", False)),
            **({"privacy.grid_bits": int(privacy.grid_bits)} if getattr(privacy, "distributed_noise", False) else {}),
            **{k: int(v) for k, v in schedule.items()}}


def compute_federation_settings(cfg: Any) -> dict[str, Any]:
    """:func:`compute_settings` of a federated config, as every partner's plan records them."""
    fc = cfg.federation
    batch = fc.local_batch_size if fc.local_batch_size > 0 else cfg.train.batch_size
    return compute_settings(cfg.privacy, {"federation.local_epochs": fc.local_epochs, "federation.rounds": fc.rounds,
                                          PARTNER_BATCH_KEY: batch})


def compute_resume_conflicts(ledgers: Mapping[str, Sequence[Mapping[str, Any]]], checkpoint_round: int,
                             settings: Mapping[str, Any]) -> list[str]:
    """Settings of a resume that differ from what a round it will re-run was released with.

    A resume from the checkpoint of ``checkpoint_round`` re-runs every later round; a partner whose
    ledger already charged one of them re-sends that release, which is only the same release if
    nothing it was planned from changed. ``settings``: :func:`compute_federation_settings` of the
    resumed config. A partner's own tighter cap (node config) is its own business: not compared.
    """
    out = []
    for partner, entries in sorted(ledgers.items()):
        for entry in entries:
            recorded = entry.get("settings")
            if int(entry.get("round", 0)) <= checkpoint_round or not isinstance(recorded, Mapping):
                continue
            for key, value in settings.items():
                if key in recorded and key != "privacy.max_epsilon" and recorded[key] != value:
                    out.append(f"{key}: {partner} already released round {entry['round']} with {recorded[key]!r}, "
                               f"the resume asks {value!r}")
    return out


@dataclass(frozen=True)
class Admission:
    admitted: bool
    epsilon_spent: float  # before this round
    epsilon_next: float  # after this round, if trained


def compute_plan_mismatches(plan: RoundPlan, entry: Mapping[str, Any]) -> list[str]:
    """What differs between ``plan`` and the ledger ``entry`` of an already released round, each naming
    the config setting (or, for an entry without recorded settings, the mechanism parameter)."""
    raw = entry.get("settings")
    recorded: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    out = [f"{key}: round {entry.get('round')} was released with {recorded[key]!r}, this run has {value!r}"
           for key, value in plan.settings.items() if key in recorded and recorded[key] != value]
    for name in PLAN_FIELDS:
        mine, theirs = getattr(plan, name), entry.get(name)
        if not _same(mine, theirs):
            out.append(f"{name}: round {entry.get('round')} was released with {theirs!r}, this run would use {mine!r}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, float(b), rel_tol=_REL_TOL, abs_tol=0.0)
    return bool(a == b)


class PrivacyRound:
    """One round's privacy bookkeeping: the plan, the history before it, the decision, the record."""

    def __init__(self, plan: RoundPlan, history: Sequence[Event] = ()) -> None:
        self.plan = plan
        self.history: list[Event] = [validate_event(e) for e in history]

    def epsilon_spent(self) -> float:
        return compute_epsilon(self.history, self.plan.target_delta, self.plan.accountant) if self.history else 0.0

    def admit(self) -> Admission:
        """Admit the round when its epsilon after training stays within the cap (DESIGN.md: refuse, say so)."""
        after = compute_epsilon([*self.history, self.plan.event], self.plan.target_delta, self.plan.accountant)
        return Admission(after <= self.plan.max_epsilon, self.epsilon_spent(), after)

    def entry_fields(self, round_: int, used: Event, population: int, secure_rng: bool,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The keyword arguments of :meth:`Ledger.append_round` for a release that used ``used``
        = (sigma, q, steps) as the trainer reports them: a ledger records what really ran."""
        sigma, q, steps = validate_event(used)
        fields = {"scope": self.plan.scope, "settings": dict(self.plan.settings), **dict(extra or {})}
        return {"round": int(round_), "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
                "max_grad_norm": self.plan.max_grad_norm, "target_delta": self.plan.target_delta,
                "population": int(population), "secure_rng": bool(secure_rng), "accountant": self.plan.accountant,
                "extra": fields}

    def record(self, ledger: Any, round_: int, used: Event, population: int, secure_rng: bool,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Append the signed entry of the release to ``ledger`` (before the release leaves)."""
        entry: dict[str, Any] = ledger.append_round(**self.entry_fields(round_, used, population, secure_rng, extra))
        self.history.append(validate_event(used))
        return entry

    def epsilon_of(self, entry: Mapping[str, Any]) -> float:
        """The cumulative epsilon of record of a ledger entry (its accountant's)."""
        return float(entry["epsilon_prv"] if self.plan.accountant == "prv" else entry["epsilon_rdp"])


def check_resume(run_dir: Any, checkpoint_round: int, cfg: Any) -> None:
    """Refuse (``ConfigError`` naming the settings) a resume of ``run_dir`` from ``checkpoint_round``
    whose config would change what an already released round used (:func:`compute_resume_conflicts`)."""
    import warnings
    from pathlib import Path

    from fedsocial.shared.config import ConfigError
    from fedsocial.shared.privacy.ledger import LedgerError, TornTailWarning, read_ledger

    ledgers: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((Path(run_dir) / "ledgers").glob("*.jsonl")):
        if path.name.endswith(".refusals.jsonl"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TornTailWarning)  # the partner removes it at its next open
                ledgers[path.name[: -len(".jsonl")]] = read_ledger(path)
        except LedgerError as exc:
            raise ConfigError(f"--resume {run_dir}: {exc}") from None
    conflicts = compute_resume_conflicts(ledgers, checkpoint_round, compute_federation_settings(cfg))
    if conflicts:
        raise ConfigError(f"--resume {run_dir}: the resumed config would change what already released rounds "
                          f"used (set them back, or start a new run): {'; '.join(conflicts)}")
