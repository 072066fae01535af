"""One partner platform: its data, one local training round, its evaluation, its privacy ledger.

Nothing here imports Flower; :mod:`client.flower` adapts it to a NumPyClient. What a partner returns
from :meth:`Partner.fit` is its *new* shared parameters (the clipping mod turns them into a clipped
update before the message leaves) plus whitelisted scalar metrics; its user and social tables stay
in ``state_dir`` on its own disk.

Where a partner's data comes from:

* simulation (node config ``partition-id`` / ``num-partitions``): every client loads the same
  dataset, splits and partitions it with the config's seeds, and keeps its own partition;
* deployment (node config ``partner-id``, ``data-dir``): the data folder holds only this partner's
  users (item ids from the shared catalogue), loaded and split as is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.client.state import (
    list_snapshots,
    load_local_state,
    load_or_create_noise_key,
    load_release,
    save_local_state,
    save_release,
    write_local_fit,
)
from fedsocial.shared.config import Config, ConfigError, load_config
from fedsocial.shared.data import SplitData
from fedsocial.shared.events import compute_grown_local_state, load_split_with_events
from fedsocial.shared.faults import fault_point
from fedsocial.shared.fileio import write_json_atomic
from fedsocial.shared.privacy.round import RoundPlan
from fedsocial.shared.protocol import EVAL_METRIC_KEYS as EVAL_METRIC_KEYS
from fedsocial.shared.protocol import FIT_METRIC_KEYS as FIT_METRIC_KEYS
from fedsocial.shared.protocol import INTENT_KEYS, METRIC_KEYS, REGISTRATION_KEYS

log = logging.getLogger("fedsocial.client")

# Everything a partner's replies may carry besides shared-parameter arrays (scalars about the round,
# never user ids, per-user values, interactions or social edges) is defined by shared/protocol.py.
PROPERTY_KEYS = REGISTRATION_KEYS | INTENT_KEYS  # get_properties: the registration, or an intent


class PartnerError(RuntimeError):
    """The partner cannot take part in this round (the message says why)."""


@dataclass(frozen=True)
class PartnerSettings:
    """Where one partner's config, data, state and ledger are (from run config + node config)."""

    config_path: Path
    data_dir: str | None
    run_dir: Path
    partner_id: str
    partner_index: int
    num_partitions: int | None  # None: the data folder holds only this partner's users (deployment)
    state_dir: Path
    ledger_dir: Path
    device: str | None
    signing_key: Path | None
    num_threads: int
    max_epsilon: float | None = None  # the partner's own budget cap (node config), tighter than the run's
    target_delta: float | None = None  # the partner's own delta (node config)
    require_dp: bool = False  # node config require-dp: refuse a run config without privacy.enabled


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value == "" else value


def resolve_config_path(text: str) -> Path:
    """A config path as given, else relative to the project root (where ``flwr run .`` installs the app)."""
    p = Path(text)
    if p.is_absolute() or p.is_file():
        return p.resolve()
    beside_app = Path(__file__).resolve().parents[1] / p
    if beside_app.is_file():
        return beside_app
    raise ConfigError(f"run config config-path: no such config file {text!r}")


def settings_from_context(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> PartnerSettings:
    """Read the run config (``config-path``, ``data-dir``, ``run-dir``) and the node config."""
    if not _get(run_config, "config-path"):
        raise ConfigError("run config: config-path is required")
    run_dir = Path(str(_get(run_config, "run-dir", "runs/flwr-run"))).resolve()
    if _get(node_config, "partner-id") is not None:  # deployment: this node is one named partner
        pid = str(node_config["partner-id"])
        index, num = zlib.crc32(pid.encode()) & 0x7FFFFFFF, None
        data_dir = _get(node_config, "data-dir", _get(run_config, "data-dir"))
    elif _get(node_config, "partition-id") is not None:  # simulation: one partition of the shared data
        index, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        pid, data_dir = f"partner-{index}", _get(run_config, "data-dir")
    else:
        raise ConfigError("node config: needs partner-id (deployment) or partition-id/num-partitions (simulation)")
    state_dir = Path(str(_get(node_config, "state-dir", run_dir / "partners" / pid)))
    key = _get(node_config, "signing-key")
    return PartnerSettings(
        config_path=resolve_config_path(str(run_config["config-path"])),
        data_dir=None if data_dir is None else str(data_dir),
        run_dir=run_dir, partner_id=pid, partner_index=index, num_partitions=num,
        state_dir=state_dir.resolve(),
        ledger_dir=Path(str(_get(node_config, "ledger-dir", run_dir / "ledgers"))).resolve(),
        device=_get(node_config, "device"),
        signing_key=None if key is None else Path(str(key)),
        num_threads=int(_get(node_config, "num-threads", _get(run_config, "num-threads", 0))),
        max_epsilon=_optional_float(node_config, "max-epsilon"),
        target_delta=_optional_float(node_config, "target-delta"),
        require_dp=_optional_bool(node_config, "require-dp"),
    )


def _optional_bool(node_config: Mapping[str, Any], key: str) -> bool:
    value = _get(node_config, key)
    if value is None or isinstance(value, bool):
        return bool(value)
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"node config {key}: expected true or false, got {value!r}")


def _optional_float(node_config: Mapping[str, Any], key: str) -> float | None:
    value = _get(node_config, key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key}: expected a number, got {value!r}") from None


def compute_partner_config(cfg: Config, s: PartnerSettings) -> Config:
    """The partner's own privacy settings win over the coordinator's: a partner enforces its budget.

    A cap above the run's is refused (the coordinator's config is the federation's agreement), a
    tighter one is applied; the noise is then calibrated to the partner's cap.
    """
    pc = cfg.privacy
    if s.require_dp and not pc.enabled:  # a coordinator's config must not turn the partner's DP off (found in review)
        raise ConfigError(f"{s.partner_id}: node config require-dp = true (the partner agreed to a DP federation), but "
                          f"the run's config {s.config_path} has privacy.enabled = false; refusing to train or "
                          "evaluate without DP")
    if s.max_epsilon is not None and s.max_epsilon > pc.max_epsilon:
        raise ConfigError(f"node config max-epsilon: {s.max_epsilon} exceeds the run's privacy.max_epsilon "
                          f"{pc.max_epsilon}")
    if s.target_delta is not None and s.target_delta > pc.target_delta:
        raise ConfigError(f"node config target-delta: {s.target_delta} exceeds the run's privacy.target_delta "
                          f"{pc.target_delta}")
    return cfg.replace("privacy", max_epsilon=s.max_epsilon if s.max_epsilon is not None else pc.max_epsilon,
                       target_delta=s.target_delta if s.target_delta is not None else pc.target_delta)


def compute_round_seed(base_seed: int, partner_index: int, round_: int) -> int:
    """A seed for (partner, round): the same on a re-run or a resume, distinct across partners and rounds."""
    return int(np.random.SeedSequence([base_seed, partner_index, round_]).generate_state(1)[0])


def compute_weight(num_users: int, weight_cap: int) -> int:
    """The partner's aggregation weight: its user count, capped (SecAgg+ uses it as is, so cap it here)."""
    return min(num_users, weight_cap) if weight_cap > 0 else num_users


_SPLITS: dict[str, Any] = {}

# A deployed partner answers each SecAgg+ intent (:meth:`Partner.will_train`) in a fresh process, where
# ``would_exceed`` costs about 4 CPU s, nearly all of it importing Opacus for one RDP number. The answers
# are kept in ``state_dir/intents.json`` keyed by everything they depend on (the exact history, the next
# event, delta, cap, accountant); the processes that register and train (Opacus already loaded) answer
# the next round's intent ahead. An intent only says whether the partner will take part; the fit's own
# admission still decides what is trained and charged.
INTENTS_FILE = "intents.json"
INTENTS_KEPT = 8


def load_partner_split(cfg: Config, s: PartnerSettings) -> SplitData:
    """This partner's split (cached per process: a simulation actor serves several partners)."""
    from fedsocial.shared.loaders import load_dataset
    from fedsocial.shared.split import split_dataset

    sections = {k: v for k, v in cfg.to_dict().items() if k in ("data", "split", "partition")}
    base = json.dumps([sections, s.data_dir], sort_keys=True)
    key = f"{base}|{s.partner_index}|{s.num_partitions}"
    if s.num_partitions is None:  # checked on every call: a cached split does not outlive its schema file
        _check_user_schema(cfg, s)
    if key in _SPLITS:
        return _SPLITS[key]  # type: ignore[no-any-return]
    if s.num_partitions is None:
        part = split_dataset(load_dataset(cfg.data, s.data_dir), cfg.split)
    else:
        from fedsocial.shared.partition import partition_users, partner_split

        full_key = f"{base}|{s.num_partitions}|full"
        if full_key not in _SPLITS:
            dataset = load_dataset(cfg.data, s.data_dir)
            _SPLITS[full_key] = (split_dataset(dataset, cfg.split),
                                 partition_users(dataset, s.num_partitions, cfg.partition))
        split, assignment = _SPLITS[full_key]
        if not 0 <= s.partner_index < s.num_partitions:
            raise ConfigError(f"node config partition-id: {s.partner_index} not in [0, {s.num_partitions})")
        part = partner_split(split, assignment, s.partner_index)
    _SPLITS[key] = part
    return part


def _check_user_schema(cfg: Config, s: PartnerSettings) -> None:
    """A deployed partner with ``model.use_user_features`` codes its users.csv by the federation's schema: without
    ``user_feature_values.json`` beside it the loader would code each value by its rank among this partner's own
    users' values, so a value's shared vector would be another value's on other partners (silently, where the
    sizes happen to agree)."""
    from fedsocial.shared.config import resolve_data_path
    from fedsocial.shared.data import DataError
    from fedsocial.shared.loaders import USER_VALUES_FILE

    if cfg.data.format != "csv" or not cfg.model.use_user_features:
        return
    folder = resolve_data_path(cfg.data, s.data_dir)
    if (folder / "users.csv").is_file() and not (folder / USER_VALUES_FILE).is_file():
        raise DataError(f"{folder / USER_VALUES_FILE}: no such file: with model.use_user_features every partner "
                        "codes users.csv by the federation's schema (fedsocial partition writes it; partners that "
                        "bring their own data copy the one they agreed on)")


def compute_local_config(cfg: Config) -> Config:
    """The config a partner trains with: ``federation.local_batch_size`` (when > 0) replaces
    ``train.batch_size``. A partner holds about 1/partners of the users, so at the centralized batch
    size it takes that many times fewer steps per epoch; a smaller local batch restores the step count."""
    size = cfg.federation.local_batch_size
    return cfg if size <= 0 or size == cfg.train.batch_size else cfg.replace("train", batch_size=size)


@functools.lru_cache(maxsize=64)
def _calibrate(max_epsilon: float, delta: float, sample_rate: float, steps: int, rounds: int, accountant: str,
               prefix: tuple[tuple[float, float, int], ...] = ()) -> float:
    """Memoised per process: a simulation actor serving partners of equal size calibrates once."""
    from fedsocial.shared.privacy.accounting import calibrate_noise_multiplier

    return calibrate_noise_multiplier(max_epsilon, delta, sample_rate, steps, rounds, accountant=accountant,
                                      tolerance=1e-3, prefix=prefix)


def compute_is_calibration(sigma: Any, max_epsilon: float, delta: float, sample_rate: float, total_steps: int,
                           accountant: str, prefix: tuple[tuple[float, float, int], ...] = ()) -> bool:
    """Whether ``sigma`` is what :func:`_calibrate` returns for this plan, up to its tolerance: a finite number > 0
    whose epsilon is within the cap while 0.2 % less noise exceeds it (the calibration's invariant, tolerance
    0.1 %). A cached value edited down would make the partner refuse every round as out of budget, one edited up
    would waste its budget; neither is taken on trust."""
    from fedsocial.shared.privacy.accounting import compute_epsilon

    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma <= 0:
        return False
    try:
        within = compute_epsilon([*prefix, (float(sigma), sample_rate, total_steps)], delta, accountant) <= max_epsilon
        tight = compute_epsilon([*prefix, (float(sigma) * (1 - 2e-3), sample_rate, total_steps)], delta,
                                accountant) > max_epsilon
    except (ValueError, ArithmeticError):
        return False
    return within and tight


def compute_all_finite(a: Any) -> bool:
    """Whether ``a`` is a real-valued numeric array with only finite values."""
    arr = np.asarray(a)
    return arr.dtype.kind in "fiu" and bool(np.isfinite(arr).all())


def compute_non_finite(arrays: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point arrays that hold a NaN or an infinity (integer arrays cannot)."""
    return sorted(n for n, a in arrays.items()
                  if np.asarray(a).dtype.kind in "fc" and not bool(np.isfinite(np.asarray(a)).all()))


class Partner:
    """One partner's round logic; holds config and data, never model state (that lives on disk)."""

    def __init__(self, settings: PartnerSettings) -> None:
        self.settings = settings
        self.cfg = compute_partner_config(compute_local_config(load_config(settings.config_path)), settings)
        if settings.num_threads > 0 or self.cfg.train.num_threads > 0:
            import torch

            torch.set_num_threads(settings.num_threads or self.cfg.train.num_threads)
        # the served users' feedback (fedsocial serve, shared/events.py) trains with the next round
        self.split = load_split_with_events(load_partner_split(self.cfg, settings), settings.state_dir)
        self.seed = compute_round_seed(self.cfg.train.seed, settings.partner_index, 0)
        self._plan: RoundPlan | None = None

    @property
    def partner_id(self) -> str:
        return self.settings.partner_id

    @property
    def num_users(self) -> int:
        return int(self.split.n_users)

    @property
    def distributed_noise(self) -> bool:
        """privacy.distributed_noise: each round is this partner's Skellam share of one DP-GD step."""
        return bool(self.cfg.privacy.enabled and self.cfg.privacy.distributed_noise)

    def new_trainer(self) -> Any:
        from fedsocial.shared.trainer import LocalTrainer

        trainer = LocalTrainer(self.cfg, self.split, device=self.settings.device or self.cfg.train.device,
                               seed=self.seed)
        if self.cfg.privacy.enabled:  # the noise is the partner's secret, not a function of the public config
            self.settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            trainer.noise_key = load_or_create_noise_key(self.settings.state_dir)
        return trainer

    def initial_parameters(self) -> tuple[list[str], list[np.ndarray]]:
        """The shared parameters as this partner initialises them (the config's seed, so all agree)."""
        from fedsocial.shared.trainer import LocalTrainer

        trainer = LocalTrainer(self.cfg, self.split, device="cpu", seed=self.cfg.train.seed)
        params = trainer.get_shared()
        names = trainer.shared_names()
        return names, [params[n] for n in names]

    # --- privacy -----------------------------------------------------------------------------
    def privacy_plan(self) -> RoundPlan:
        """(sigma, q, steps) of one round (:func:`shared.privacy.round.plan_round`); sigma calibrated to
        max_epsilon over all rounds when not set.

        The calibration (a bisection over the accountant, seconds of CPU) is done once per partner and
        kept in ``state_dir/privacy_plan.json``, keyed by everything it depends on.
        """
        if self._plan is None:
            from fedsocial.shared.privacy.round import PARTNER_BATCH_KEY, compute_federation_prefix, plan_round

            pc, fc = self.cfg.privacy, self.cfg.federation
            # distributed noise: one step over every user a round (sample rate 1), whatever the batch size
            batch = self.num_users if self.distributed_noise else self.cfg.train.batch_size
            self._plan = plan_round(pc, n_users=self.num_users, batch_size=batch,
                                    epochs=fc.local_epochs, rounds=fc.rounds,
                                    batch_key="all users (privacy.distributed_noise)" if self.distributed_noise
                                    else PARTNER_BATCH_KEY,
                                    calibrate=self._cached_calibration,
                                    prefix=compute_federation_prefix(self.cfg))
        return self._plan

    def _cached_calibration(self, max_epsilon: float, delta: float, q: float, steps: int, rounds: int,
                            accountant: str, prefix: tuple[tuple[float, float, int], ...] = ()) -> float:
        key = json.dumps([max_epsilon, delta, q, steps, rounds, accountant, *([list(prefix)] if prefix else [])],
                         sort_keys=True)
        path = self.settings.state_dir / "privacy_plan.json"
        try:
            cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            cached = {}  # a damaged cache only costs a recalibration
        if isinstance(cached, dict) and cached.get("key") == key:
            sigma = cached.get("noise_multiplier")
            if compute_is_calibration(sigma, max_epsilon, delta, q, steps * rounds, accountant, tuple(prefix)):
                return float(sigma)  # type: ignore[arg-type]
            log.warning("%s: the cached noise multiplier %r is not the calibration of this plan (edited or damaged); "
                        "calibrating again", path, sigma)
        sigma = _calibrate(max_epsilon, delta, q, steps, rounds, accountant, tuple(prefix))
        write_json_atomic(path, {"key": key, "noise_multiplier": sigma})
        return sigma

    def open_ledger(self) -> Any:
        """This partner's ledger, with its signing key (created in the state dir on first use)."""
        from fedsocial.shared import signing
        from fedsocial.shared.privacy.ledger import Ledger

        s = self.settings
        if s.signing_key is not None:
            key = signing.load_private_key(s.signing_key)
        else:
            key = signing.load_or_create_keypair(s.state_dir / "ledger_signing.key")
        s.ledger_dir.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(s.ledger_dir / f"{s.partner_id}.jsonl", key, s.partner_id)
        # one key per ledger: the audit verifies every entry with the one public key beside it, so entries under a
        # new key (fedsocial keys --force mid-run) would make an honest run read as tampered (found in review)
        other = sorted({str(e.get("public_key_fingerprint")) for e in ledger.entries()} - {ledger.fingerprint})
        if other:
            raise PartnerError(f"{self.partner_id}: the ledger {ledger.path} was signed with the key "
                               f"{other[0][:16]}..., the signing key now given is {ledger.fingerprint[:16]}...: "
                               "refusing to append under another key (restore the run's key, or start a new run "
                               "with a new ledger)")
        signing.save_public_key(key.public_key(), s.ledger_dir / f"{s.partner_id}.pub")
        return ledger

    # --- rounds ------------------------------------------------------------------------------
    def _prepared_trainer(self, arrays: list[np.ndarray], local_round: int) -> tuple[Any, list[str]]:
        trainer = self.new_trainer()
        names = trainer.shared_names()
        if len(arrays) != len(names):
            raise PartnerError(f"{self.partner_id}: received {len(arrays)} arrays for {len(names)} shared parameters")
        bad = [n for n, a in zip(names, arrays, strict=True) if not compute_all_finite(a)]
        if bad:  # refused before training: a hostile or broken server must not make the partner spend budget
            raise PartnerError(f"{self.partner_id}: the global parameters hold non-finite or non-numeric values "
                               f"({', '.join(bad)}); refusing to train or evaluate on them (nothing charged)")
        trainer.set_shared(dict(zip(names, arrays, strict=True)))
        state = self._local_state_upto(local_round)
        if state is not None:
            trainer.set_local_state(compute_grown_local_state(state, self.num_users))  # users added by events
        elif local_round > 0:
            log.warning("%s: no local state for round %d; starting from the initial tables",
                        self.partner_id, local_round)
        return trainer, names

    def _local_state_upto(self, round_: int) -> dict[str, np.ndarray] | None:
        for r in range(round_, 0, -1):
            state = load_local_state(self.settings.state_dir, r)
            if state is not None:
                return state
        return None

    def fit(self, arrays: list[np.ndarray], round_: int, contributors: tuple[str, ...] | None = None
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train one round from the global ``arrays``; returns (new shared arrays, weight, metrics).

        With DP, the order is what makes every release charged exactly once (DESIGN.md, integrity of
        the accounting): train; save the local state and the release itself (arrays, weight, reply
        metrics) on the partner's disk; append the signed ledger entry that charges it, naming the
        release's digest; only then return it. A round the ledger already charged is never trained
        again: its saved release is sent again, bit-for-bit, or the partner refuses.

        ``contributors``: under distributed noise, the partner ids whose shares the round's secure sum is
        formed over (the fit instruction names them): a fresh share needs a named set of at least ``t``
        partners with this one, is saved with it, and is never sent into a second sum
        (:meth:`_refuse_second_sum`).
        """
        trainer, names = self._prepared_trainer(arrays, round_ - 1)
        metrics: dict[str, Any] = {"round": round_, "partner_id": self.partner_id, "param_names": ",".join(names),
                                   "num_users": self.num_users, "budget_exhausted": 0}
        private = self.cfg.privacy.enabled and trainer.model.trainable
        if not private:
            result = self._train(trainer, round_, None)
            self._check_finite(trainer, round_)
            save_local_state(self.settings.state_dir, round_, trainer.get_local_state())
            new = trainer.get_shared()
            metrics.update(train_loss=float(result.train_loss), fit_time_s=float(result.wall_time_s))
            return [new[n] for n in names], compute_weight(self.num_users, self.cfg.federation.weight_cap), metrics
        ledger, pround, recorded = self._ledger_before(round_)
        if recorded is not None:
            return self._resend(ledger, pround, recorded, names, metrics, contributors)
        if self.distributed_noise:  # before anything is drawn or charged
            self._check_summed_set(round_, contributors)
        if self._releases_popularity(round_):
            released = self._popularity_release(ledger, pround)
            if released is None:  # the release alone would pass the cap: neither it nor training leaves
                save_local_state(self.settings.state_dir, round_, trainer.get_local_state())
                metrics.update(self._refuse(ledger, round_, pround.admit()))
                return list(arrays), 0, metrics
            trainer.set_item_popularity(released / max(1, self.num_users))  # the server averages it by users
        admission = pround.admit()
        if not admission.admitted:
            save_local_state(self.settings.state_dir, round_, trainer.get_local_state())
            metrics.update(self._refuse(ledger, round_, admission))
            return list(arrays), 0, metrics
        share: dict[str, Any] = {}
        if self.distributed_noise:
            result, out, share = self._distributed_share(trainer, round_, pround.plan.noise_multiplier, names)
            weight = 1  # the share is of a sum: SecAgg+ adds it as it is (server/secagg.py)
            save_local_state(self.settings.state_dir, round_, trainer.get_local_state())
        else:
            result = self._train(trainer, round_, pround.plan.noise_multiplier)
            self._check_finite(trainer, round_)
            save_local_state(self.settings.state_dir, round_, trainer.get_local_state())
            new = trainer.get_shared()
            out, weight = [new[n] for n in names], compute_weight(self.num_users, self.cfg.federation.weight_cap)
        # the loss and the time are functions of the users' data that no DP mechanism covers: they stay here
        write_local_fit(self.settings.state_dir, round_, float(result.train_loss), float(result.wall_time_s))
        reply: dict[str, Any] = {}
        # distributed noise: the share is saved with the set it is released into (it never enters a second sum)
        summed = {"contributors": sorted(contributors or ())} if self.distributed_noise else {}
        digest = save_release(self.settings.state_dir, round_, names, out, {"weight": weight, "reply": reply,
                                                                            **summed})
        fault_point("before_ledger_append", round_, self.partner_id)
        used = (float(result.noise_multiplier), float(result.sample_rate), int(result.steps))
        entry = pround.record(ledger, round_, used, self.num_users, self.cfg.privacy.secure_rng,
                              extra={"release_sha256": digest, **share})
        fault_point("after_ledger_append", round_, self.partner_id)
        metrics.update(reply)
        metrics.update(self._accounting(pround, entry))
        if self.cfg.secagg.enabled and round_ < self.cfg.federation.rounds:
            try:  # the release is charged and saved: nothing here may lose it
                self.will_train(round_ + 1)  # answered ahead, while the accountant is loaded (INTENTS_FILE)
            except (OSError, ValueError) as exc:
                log.warning("%s: round %d's intent not answered ahead: %s", self.partner_id, round_ + 1, exc)
        return out, weight, metrics

    def _distributed_share(self, trainer: Any, round_: int, noise_multiplier: float, names: list[str]
                           ) -> tuple[Any, list[np.ndarray], dict[str, Any]]:
        """This partner's share of one DP-GD step: its users' clipped gradient sum at the global parameters,
        rounded to the grid, plus Skellam noise of 1/t of the variance the calibrated noise needs, encoded
        for the modular secure sum (shared/privacy/distributed.py). Returns (fit result, arrays, the ledger
        entry's description of the mechanism)."""
        import time

        from fedsocial.shared.privacy import distributed as dn
        from fedsocial.shared.trainer import FitResult, compute_dp_seeds

        pc, t0 = self.cfg.privacy, time.perf_counter()
        seed = compute_round_seed(self.cfg.train.seed, self.settings.partner_index, round_)
        sums, loss = trainer.clipped_gradient_sum(pc.max_grad_norm, seed)
        values = {n: v for n, v in trainer.get_shared().items() if n not in sums}
        unknown = sorted(set(values) - set(dn.VALUE_PARAMS))
        if unknown:
            raise PartnerError(f"{self.partner_id}: untrained shared parameters {unknown} are neither a gradient nor "
                               "a released value; distributed noise cannot send them")
        dim = sum(int(a.size) for a in sums.values())
        plan = dn.compute_share_plan(noise_multiplier, pc.max_grad_norm, pc.grid_bits, dim,
                                     dn.compute_assumed_contributors(self.cfg.federation.min_partners,
                                                                     self.cfg.secagg.reconstruction_threshold),
                                     self.cfg.federation.partners)
        rng = np.random.default_rng(compute_dp_seeds(seed, trainer.noise_key)[1])  # the partner's secret
        out = [dn.compute_encoded(dn.compute_rounded(sums[n], plan.grid_step)
                                  + dn.compute_skellam_share(sums[n].shape, plan.share_variance, rng), plan.sum_bits)
               if n in sums else  # a released value, weighted by this partner's users (the server's mean)
               dn.compute_encoded(dn.compute_rounded(values[n].astype(np.float64) * self.num_users, dn.VALUE_GRID),
                                  plan.sum_bits)
               for n in names]
        result = FitResult(self.num_users, 1, 1.0, noise_multiplier, pc.max_grad_norm, loss, 0.0, [loss])
        result.wall_time_s = time.perf_counter() - t0
        return result, out, plan.to_record()

    def _check_finite(self, trainer: Any, round_: int) -> None:
        """Refuse a round whose training diverged (global parameters of absurd size make NaN tables) before
        anything is saved, charged or sent: the state of earlier rounds stays as it was, and nothing left."""
        bad = compute_non_finite({**trainer.get_shared(), **trainer.get_local_state()})
        if bad:
            raise PartnerError(f"{self.partner_id}: round {round_}'s training diverged (non-finite {', '.join(bad)}); "
                               "nothing saved, charged or sent")

    def _train(self, trainer: Any, round_: int, noise_multiplier: float | None) -> Any:
        return trainer.fit(self.cfg.federation.local_epochs, noise_multiplier=noise_multiplier,
                           rng_seed=compute_round_seed(self.cfg.train.seed, self.settings.partner_index, round_),
                           refit=False)  # evaluate() refits p_u against the new global parameters

    def _ledger_before(self, round_: int) -> tuple[Any, Any, dict[str, Any] | None]:
        """The ledger, the round's :class:`PrivacyRound` (history = entries of earlier rounds) and the
        round's own entry when the ledger already charged it."""
        from fedsocial.shared.privacy.accounting import check_delta
        from fedsocial.shared.privacy.ledger import entries_before_training, history_of, training_entries
        from fedsocial.shared.privacy.round import PrivacyRound

        check_delta(self.cfg.privacy.target_delta, self.num_users)
        ledger = self.open_ledger()
        entries = ledger.entries()
        prior = entries_before_training(entries, round_)
        recorded = next((dict(e) for e in training_entries(entries) if int(e["round"]) == round_), None)
        later = [int(e["round"]) for e in entries if int(e["round"]) > round_]
        if recorded is None and later:
            raise PartnerError(f"{self.partner_id}: asked to train round {round_}, but the ledger already charged "
                               f"round {later[0]}; the coordinator is behind this partner")
        return ledger, PrivacyRound(self.privacy_plan(), history_of(prior)), recorded

    def _releases_popularity(self, round_: int) -> bool:
        """The popularity histogram is released once, with the first round (shared/privacy/popularity.py)."""
        from fedsocial.shared.privacy.popularity import uses_popularity_release

        return round_ == 1 and uses_popularity_release(self.cfg)

    def _popularity_release(self, ledger: Any, pround: Any) -> np.ndarray | None:
        """The noisy popularity histogram: the one already charged (re-sent, never drawn again), or a new
        release admitted against the cap, saved, then charged (``release = "popularity"``, event
        (sigma, 1, 1)) and added to ``pround``'s history; None when the cap refuses it."""
        from fedsocial.shared.privacy.ledger import history_of
        from fedsocial.shared.privacy.popularity import (
            POPULARITY_SENSITIVITY,
            compute_noisy_histogram,
            compute_popularity_histogram,
            load_popularity_release,
            popularity_event,
            save_popularity_release,
        )
        from fedsocial.shared.privacy.round import PrivacyRound

        entries = ledger.entries()
        recorded = next((e for e in entries if int(e["round"]) == 1 and e.get("release") == "popularity"), None)
        if recorded is not None:  # already in pround's history (_ledger_before)
            saved = load_popularity_release(self.settings.state_dir)
            if saved is None or saved[1].get("digest") != recorded.get("release_sha256"):
                raise PartnerError(f"{self.partner_id}: the popularity release was charged, but that release is "
                                   "not on this partner's disk (missing or altered); refusing a second one")
            return saved[0]
        sigma = float(self.cfg.privacy.popularity_noise_multiplier)
        base = pround.plan
        plan = dataclasses.replace(base, noise_multiplier=sigma, sample_rate=1.0, steps=1,
                                   max_grad_norm=POPULARITY_SENSITIVITY)
        pop_round = PrivacyRound(plan, history_of(entries))
        if not pop_round.admit().admitted:
            return None
        sp = self.split
        histogram = compute_popularity_histogram(sp.train_users, sp.train_items, sp.n_users, sp.n_items)
        # OS entropy, never a seed from the (public) config: whoever knew the seed could remove the noise
        noisy = compute_noisy_histogram(histogram, sigma, np.random.default_rng())
        digest = save_popularity_release(self.settings.state_dir, noisy, {"round": 1, "sigma": sigma})
        pop_round.record(ledger, 1, popularity_event(sigma), self.num_users, False,
                         extra={"release": "popularity", "release_sha256": digest})
        pround.history.append(popularity_event(sigma))
        return noisy

    def _check_summed_set(self, round_: int, contributors: tuple[str, ...] | None) -> None:
        """Refuse (PartnerError, nothing drawn or charged) a distributed-noise round whose instruction does not
        name the partners the secure sum is formed over, leaves this partner out, or names fewer than the ``t``
        shares the noise is calibrated for."""
        from fedsocial.shared.privacy import distributed as dn

        t = dn.compute_assumed_contributors(self.cfg.federation.min_partners, self.cfg.secagg.reconstruction_threshold)
        if contributors is None:
            problem = "does not name the partners whose shares the secure sum is formed over"
        elif self.partner_id not in contributors:
            problem = f"names a sum over {_set_text(contributors)} without this partner"
        elif len(contributors) < t:
            problem = f"names a sum over {_set_text(contributors)}, fewer than the {t} shares the noise assumes"
        else:
            return
        raise PartnerError(f"{self.partner_id}: round {round_}'s instruction {problem}; under distributed noise "
                           "a share is released into a known set of at least t partners only; refusing (nothing "
                           "trained or charged)")

    def _refuse_second_sum(self, ledger: Any, pround: Any, recorded: dict[str, Any], meta: Mapping[str, Any],
                           contributors: tuple[str, ...] | None) -> None:
        """Distributed noise: a charged share enters one secure sum only, so asking again is always refused.

        A share carries ``mu / t`` of the round's noise. Two released sums holding it differ by the contributions
        that are in one and not the other (a partner left out of the second set, or one SecAgg+ unmasked as a
        dropout in one session only, which a server can force), each with its share's noise alone: a release
        nobody charged. Secure aggregation hides an input within one session; no rule about sets makes two
        sessions over one input safe. So the request is logged beside the ledger as a refusal (nothing new
        charged) and raised (nothing sent, nothing drawn again): the round is lost, its charge stays."""
        from fedsocial.shared.privacy.ledger import record_refusal

        round_ = int(recorded["round"])
        saved = meta.get("contributors")
        was = (_set_text(saved) if isinstance(saved, list) and saved and all(isinstance(x, str) for x in saved)
               else "a secure sum")
        asked = _set_text(contributors) if contributors is not None else "no named set"
        reason = (f"round {round_}'s share was released and charged into the sum over {was}; asked again (a sum "
                  f"over {asked}): refusing, a share enters one secure sum only (two sums holding it release "
                  "their difference with a fraction of the charged noise); nothing sent, nothing charged")
        spent = pround.epsilon_of(recorded)
        record_refusal(ledger.path, partner_id=self.partner_id, round=round_, epsilon_spent=spent, epsilon_next=spent,
                       max_epsilon=self.cfg.privacy.max_epsilon, reason=reason)
        log.warning("%s: %s", self.partner_id, reason)
        raise PartnerError(f"{self.partner_id}: {reason}")

    def released_share(self, round_: int) -> bool:
        """Whether this partner already released (and charged) a distributed-noise share for ``round_``: it then
        declines the round's SecAgg+ intent and refuses its fit (:meth:`_refuse_second_sum`)."""
        from fedsocial.shared.privacy.ledger import training_entries

        if not (self.cfg.privacy.enabled and self.distributed_noise):
            return False
        return any(int(e["round"]) == round_ for e in training_entries(self.open_ledger().entries()))

    def _resend(self, ledger: Any, pround: Any, recorded: dict[str, Any], names: list[str],
                metrics: dict[str, Any], contributors: tuple[str, ...] | None = None
                ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Send the release a charged round already released, or refuse (never a second, uncharged one).

        Without distributed noise the release carries its full noise, so sending it again is post-processing;
        a distributed share is never sent twice (:meth:`_refuse_second_sum`)."""
        from fedsocial.shared.privacy.round import compute_plan_mismatches

        round_ = int(recorded["round"])
        changed = compute_plan_mismatches(pround.plan, recorded)
        if changed:
            raise PartnerError(f"{self.partner_id}: round {round_} was already released and charged; this run's "
                               f"settings would change what it used, refusing: {'; '.join(changed)}")
        saved = load_release(self.settings.state_dir, round_)
        if saved is None or saved[0] != names or recorded.get("release_sha256") != saved[2].get("digest"):
            raise PartnerError(f"{self.partner_id}: round {round_} was already released and charged, but the "
                               "release it charged is not on this partner's disk (missing or altered); refusing "
                               "to release a second update the ledger does not charge")
        _, arrays, meta = saved
        if self.distributed_noise or recorded.get("mechanism") == "skellam":
            self._refuse_second_sum(ledger, pround, recorded, meta, contributors)
        log.info("%s: round %d was already released and charged; sending that release again", self.partner_id,
                 round_)
        reply = meta.get("reply")
        metrics.update(reply if isinstance(reply, dict) else {})
        metrics.update(self._accounting(pround, recorded))
        return arrays, int(meta["weight"]), metrics  # type: ignore[call-overload]

    def _refuse(self, ledger: Any, round_: int, admission: Any) -> dict[str, Any]:
        from fedsocial.shared.privacy.ledger import record_refusal

        pc = self.cfg.privacy
        record_refusal(ledger.path, partner_id=self.partner_id, round=round_, epsilon_spent=admission.epsilon_spent,
                       epsilon_next=admission.epsilon_next, max_epsilon=pc.max_epsilon)
        log.warning("%s: round %d would take epsilon to %.3f > %.3f; not training", self.partner_id, round_,
                    admission.epsilon_next, pc.max_epsilon)
        return {"budget_exhausted": 1, "epsilon": float(admission.epsilon_spent), "delta": float(pc.target_delta)}

    def _accounting(self, pround: Any, entry: dict[str, Any]) -> dict[str, Any]:
        """The reply's privacy accounting: the entry that charges this release, and its hash."""
        from fedsocial.shared.privacy.ledger import entry_hash

        return {"epsilon": pround.epsilon_of(entry), "delta": float(entry["target_delta"]),
                "noise_multiplier": float(entry["noise_multiplier"]), "sample_rate": float(entry["sample_rate"]),
                "steps": int(entry["steps"]), "max_grad_norm": float(entry["max_grad_norm"]),
                "ledger_round": int(entry["round"]), "ledger_head": entry_hash(entry)}

    def will_train(self, round_: int) -> bool:
        """Whether :meth:`fit` of ``round_`` would train rather than refuse for budget; records nothing.

        Asked before a SecAgg+ round, so that a partner out of budget is not counted as a contributor.
        """
        if not self.cfg.privacy.enabled:
            return True
        if self.released_share(round_):  # a share enters one secure sum only (_refuse_second_sum)
            return False
        from fedsocial.shared.privacy.accounting import would_exceed
        from fedsocial.shared.privacy.ledger import entries_before_training, history_of
        from fedsocial.shared.privacy.popularity import popularity_event

        pc, plan = self.cfg.privacy, self.privacy_plan()
        entries = self.open_ledger().entries()
        history = history_of(entries_before_training(entries, round_))
        if self._releases_popularity(round_) and not any(e.get("release") == "popularity" for e in entries):
            history.append(popularity_event(pc.popularity_noise_multiplier))
        event = (plan.noise_multiplier, plan.sample_rate, plan.steps)
        key = json.dumps([[list(e) for e in history], list(event), pc.target_delta, pc.max_epsilon, pc.accountant])
        cached = self._intent_cache().get(key)
        if isinstance(cached, bool):
            return cached
        answer = not would_exceed(history, event, pc.target_delta, pc.max_epsilon, pc.accountant)
        self._save_intent(key, answer)
        return answer

    def _intent_cache(self) -> dict[str, Any]:
        path = self.settings.state_dir / INTENTS_FILE
        try:
            cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            cached = {}  # a damaged cache only costs the computation
        return cached if isinstance(cached, dict) else {}

    def _save_intent(self, key: str, answer: bool) -> None:
        kept = {k: v for k, v in self._intent_cache().items() if k != key}
        kept = dict(list(kept.items())[-(INTENTS_KEPT - 1):])
        self.settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(self.settings.state_dir / INTENTS_FILE, {**kept, key: answer})

    def evaluate(self, arrays: list[np.ndarray], round_: int) -> tuple[dict[str, float] | None, int]:
        """Score this partner's test users (its local tables after ``round_``, the global parameters), keep
        the result in its own folder, and return what may leave (:mod:`shared.privacy.evaluation`):
        the exact metrics without DP; under DP ``(None, 0)`` (nothing) by default, or the Gaussian
        release of the metric sums, charged in the ledger, when ``federation.eval_noise_multiplier > 0``.
        """
        from fedsocial.shared.privacy.evaluation import compute_release_mode, write_local_evaluation

        metrics, n, elapsed, dp_model = self._evaluate_locally(arrays, round_)
        write_local_evaluation(self.settings.state_dir, round_, metrics, n, elapsed)
        mode = compute_release_mode(self.cfg.privacy.enabled, self.cfg.federation.eval_noise_multiplier)
        if mode == "clear":
            return {**metrics, "eval_time_s": elapsed}, n
        if mode == "local":
            return None, 0
        # The release's sensitivity (one user moves each sum by <= 1) holds for the DP model only: in partner
        # scope the served model also learnt from every user's data without DP, so it is never released.
        return self._dp_evaluation(round_, dp_model[0], dp_model[1])

    def evaluation_accounting(self, round_: int) -> Any:
        """The :class:`shared.protocol.EvalAccounting` of the newest release round ``round_``'s evaluation
        charged (its DP selection and/or its DP evaluation release; None when there is none): the evaluation
        reply names it, kept or released, so that the server's signed head covers it (the hash chain covers
        every entry before it) and the run's epsilon includes it."""
        from fedsocial.shared import protocol
        from fedsocial.shared.privacy.ledger import entry_hash

        if not self.cfg.privacy.enabled:
            return None
        entry = next((e for e in reversed(self.open_ledger().entries())
                      if int(e["round"]) == round_ and e.get("release") in ("evaluation", "selection")), None)
        if entry is None:
            return None
        epsilon = entry["epsilon_prv"] if entry["accountant"] == "prv" else entry["epsilon_rdp"]
        return protocol.EvalAccounting(float(epsilon), int(entry["round"]), entry_hash(entry))

    def _dp_evaluation(self, round_: int, metrics: dict[str, float], n: int) -> tuple[dict[str, float] | None, int]:
        """The Gaussian release of the evaluation sums: planned, admitted against the cap, saved, charged
        (an entry with ``release = "evaluation"``, event (sigma, 1, 1)), then returned; a re-run re-sends it."""
        import hashlib

        from fedsocial.shared.privacy.evaluation import (
            EVAL_SENSITIVITY,
            compute_noisy_release,
            compute_planned_eval_rounds,
            eval_event,
            load_eval_release,
            save_eval_release,
        )
        from fedsocial.shared.privacy.ledger import canonical_json

        sigma = float(self.cfg.federation.eval_noise_multiplier)
        ledger = self.open_ledger()
        entries = ledger.entries()
        recorded = next((e for e in entries if int(e["round"]) == round_ and e.get("release") == "evaluation"), None)
        if recorded is not None:
            saved = load_eval_release(self.settings.state_dir, round_)
            if saved is None or saved.get("digest") != recorded.get("release_sha256"):
                raise PartnerError(f"{self.partner_id}: the evaluation of round {round_} was released and charged, "
                                   "but that release is not on this partner's disk; refusing a second one")
            return dict(saved["metrics"]), int(saved["evaluated_users"])
        if round_ not in compute_planned_eval_rounds(self.cfg):
            raise PartnerError(f"{self.partner_id}: asked to release an evaluation of round {round_}, which the "
                               f"plan does not evaluate (rounds {compute_planned_eval_rounds(self.cfg)}); refusing "
                               "a release its calibration did not count (nothing charged)")
        if not any(r >= round_ for r, _ in list_snapshots(self.settings.state_dir)):
            # a release of a round this partner has not reached would, in the ledger's round order, refuse
            # every training round before it; kept local (as a partner whose fit of that round failed does)
            log.warning("%s: asked to release an evaluation of round %d before its fit of that round; kept local",
                        self.partner_id, round_)
            return None, 0
        from fedsocial.shared.privacy.ledger import RELEASE_KINDS, order_key

        if any(order_key(e) > (round_, RELEASE_KINDS.index("evaluation")) for e in entries):
            # the ledger would refuse its entry after the noise was drawn and saved (found in review): asked too late
            log.warning("%s: asked to release the evaluation of round %d after a later release is in the ledger; "
                        "kept local (nothing drawn or charged)", self.partner_id, round_)
            return None, 0
        pround = self._admitted_release(entries, round_, sigma, EVAL_SENSITIVITY, "federation.eval_noise_multiplier",
                                        "releasing the evaluation", "kept local")
        if pround is None:
            return None, 0
        # OS entropy, never a seed from the (public) config: whoever knew the seed could remove the noise
        means, count = compute_noisy_release(metrics, n, sigma, self.num_users, np.random.default_rng())
        release = {"round": round_, "metrics": means, "evaluated_users": count}
        digest = hashlib.sha256(canonical_json(release).encode("ascii")).hexdigest()
        save_eval_release(self.settings.state_dir, round_, {**release, "digest": digest})
        pround.record(ledger, round_, eval_event(sigma), self.num_users, False,
                      extra={"release": "evaluation", "release_sha256": digest})
        return means, count

    def _admitted_release(self, entries: list[dict[str, Any]], round_: int, sigma: float, sensitivity: float,
                          key: str, what: str, otherwise: str) -> Any:
        """The :class:`PrivacyRound` of a one-shot Gaussian release of round ``round_`` (event (sigma, 1, 1), L2
        sensitivity ``sensitivity``, noise set by config ``key``) when the cap admits it after ``entries``;
        else None, logged as ``what`` would exceed the cap and ``otherwise`` is done instead."""
        from fedsocial.shared.privacy.ledger import history_of
        from fedsocial.shared.privacy.round import PrivacyRound

        base = self.privacy_plan()
        plan = dataclasses.replace(base, noise_multiplier=sigma, sample_rate=1.0, steps=1, max_grad_norm=sensitivity,
                                   settings={**base.settings, key: sigma})
        pround = PrivacyRound(plan, history_of(entries))
        admission = pround.admit()
        if admission.admitted:
            return pround
        log.warning("%s: %s of round %d would take epsilon to %.3f > %.3f; %s", self.partner_id, what, round_,
                    admission.epsilon_next, self.cfg.privacy.max_epsilon, otherwise)
        return None

    def _dp_selection(self, round_: int, trainer: Any) -> str | None:
        """Joint scope, after the last round: the DP choice of the served model (shared/privacy/selection.py).

        The ledger's selection entry of ``round_`` when there is one (its saved release re-used, never drawn
        again); else admitted against the cap, the noisy differences computed (or an uncharged saved release of the
        same sigma re-used), saved, charged (``release = "selection"``, event (sigma, 1, 1)), and only then
        recorded as served. None (the DP model is served) when the cap or the ledger's order refuses it."""
        from fedsocial.shared.privacy.ledger import RELEASE_KINDS, order_key
        from fedsocial.shared.privacy.selection import (
            SelectionError,
            compute_noisy_differences,
            compute_selection_differences,
            compute_selection_release,
            compute_selection_sensitivity,
            load_charged_release,
            load_selection_release,
            save_selection_release,
            selection_candidates,
            selection_event,
            write_served_choice,
        )

        pc, state_dir = self.cfg.privacy, self.settings.state_dir
        sigma, candidates = float(pc.selection_noise_multiplier), selection_candidates(self.cfg)
        ledger = self.open_ledger()
        entries = ledger.entries()
        recorded = next((e for e in entries if int(e["round"]) == round_ and e.get("release") == "selection"), None)
        if recorded is not None:
            try:
                saved = load_charged_release(state_dir, recorded, f"{self.partner_id}'s ledger")
            except SelectionError:
                raise PartnerError(f"{self.partner_id}: the selection of round {round_} was released and charged, "
                                   "but that release is not on this partner's disk (missing or altered); refusing "
                                   "a second one") from None
            write_served_choice(state_dir, saved)  # idempotent: a kill between the charge and this line
            return str(saved["choice"])
        if not any(r >= round_ for r, _ in list_snapshots(state_dir)):
            log.warning("%s: asked for the selection of round %d before its fit of that round; serving the model",
                        self.partner_id, round_)
            return None
        if any(order_key(e) > (round_, RELEASE_KINDS.index("selection")) for e in entries):
            log.warning("%s: the ledger already holds a later release than round %d's selection; serving the model",
                        self.partner_id, round_)
            return None
        pround = self._admitted_release(entries, round_, sigma, compute_selection_sensitivity(candidates),
                                        "privacy.selection_noise_multiplier", "the selection", "serving the model")
        if pround is None:
            return None
        release = load_selection_release(state_dir, round_)  # saved, never charged (killed before the charge)
        if release is None or release.get("sigma") != sigma or tuple(release["candidates"]) != candidates:
            from fedsocial.shared.trainer import compute_selection_per_user

            per_user = compute_selection_per_user(trainer, self.split)
            differences = compute_selection_differences(per_user, candidates)
            # OS entropy, never a seed from the (public) config: whoever knew the seed could remove the noise
            noisy = compute_noisy_differences(differences, sigma, np.random.default_rng(), candidates)
            release = compute_selection_release(round_, sigma, noisy, len(per_user["model"]), candidates)
            save_selection_release(state_dir, release)
        fault_point("before_selection_append", round_, self.partner_id)
        pround.record(ledger, round_, selection_event(sigma), self.num_users, False,
                      extra={"release": "selection", "release_sha256": release["digest"]})
        fault_point("after_selection_append", round_, self.partner_id)
        write_served_choice(state_dir, release)
        log.info("%s: DP selection after round %d serves %s", self.partner_id, round_, release["choice"])
        return str(release["choice"])

    def _evaluate_locally(self, arrays: list[np.ndarray], round_: int
                          ) -> tuple[dict[str, float], int, float, tuple[dict[str, float], int]]:
        """(served metrics, users, seconds, (the DP model's metrics, users)): the two differ in partner scope."""
        t0 = time.perf_counter()
        trainer, _ = self._prepared_trainer(arrays, round_)
        trainer.refit_local()  # p_u from the user's own items against the new global (no-op unless local)
        dp_metrics, dp_n = trainer.evaluate("test")
        dp_model = ({k: float(dp_metrics[k]) for k in METRIC_KEYS}, int(dp_n))
        if self.cfg.privacy.scope == "joint" and round_ == self.cfg.federation.rounds:
            from fedsocial.shared.privacy.selection import uses_selection_release

            choice = self._dp_selection(round_, trainer) if uses_selection_release(self.cfg) else None
            if choice is not None and choice != "model":
                from fedsocial.shared.metrics import evaluate_model
                from fedsocial.shared.models.prior import candidate_model

                # what the partner serves from now on (fedsocial recommend / serve read the same choice); its
                # metrics are still each user's own under DP parameters, so a DP evaluation release holds
                chosen, chosen_n = evaluate_model(candidate_model(choice, trainer.model), self.split, "test",
                                                  builder=trainer.builder, device=trainer.device)
                dp_model = ({k: float(chosen[k]) for k in METRIC_KEYS}, int(chosen_n))
        if self.cfg.privacy.scope != "partner" or round_ < self.cfg.federation.rounds:
            # partner scope personalises once, after the last round (and `serve` at serve time): it never feeds
            # the DP update, so an earlier one (minutes each: a fine-tune and the alone model) is only a record
            return dp_model[0], dp_model[1], time.perf_counter() - t0, dp_model
        from fedsocial.client.personalize import evaluate_personalised  # + local non-DP learning, never sent

        metrics, n = evaluate_personalised(self.cfg, self.split, trainer.model, self.settings.state_dir, round_,
                                           compute_round_seed(self.cfg.train.seed, self.settings.partner_index,
                                                              round_) + 1)
        return {k: float(metrics[k]) for k in METRIC_KEYS}, int(n), time.perf_counter() - t0, dp_model


def _set_text(ids: tuple[str, ...] | list[str]) -> str:
    """A set of partner ids as messages name it: ``{a, b, c}``."""
    return "{" + ", ".join(sorted(ids)) + "}"


_PARTNERS: dict[tuple[PartnerSettings, bytes], Partner] = {}


def get_partner(settings: PartnerSettings) -> Partner:
    """One :class:`Partner` per settings and config content per process (it holds only config and data)."""
    key = (settings, settings.config_path.read_bytes())
    if key not in _PARTNERS:
        _PARTNERS[key] = Partner(settings)
    return _PARTNERS[key]

