"""Configuration: frozen dataclasses loaded from TOML in one place, validated in ``__post_init__``.

Every section of a config file maps to one dataclass below. ``load_config`` reads a TOML file,
applies ``--set section.key=value`` overrides (typed: the value is parsed as TOML and must match
the field's type) and returns a :class:`Config`. Unknown sections or keys, and wrong types, raise
:class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


SEED_MAX = 2**32 - 1  # numpy's SeedSequence takes non-negative integers; torch's manual_seed fits 64 bits


def _check_seed(value: Any, key: str) -> None:
    """A seed is an integer in [0, 2**32 - 1] (a negative one is a numpy traceback deep in the run)."""
    _check(isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX, key,
           f"must be an integer in [0, {SEED_MAX}] (2**32 - 1), got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    format: str = "synthetic"  # synthetic|filmtrust|lastfm|douban|ciao|csv
    path: str = ""  # the dataset's folder, relative to the data dir unless absolute
    # synthetic generator (ignored for real data)
    n_users: int = 600
    n_items: int = 800
    n_communities: int = 6
    interactions_per_user: float = 20.0  # mean of the per-user count (power law)
    friends_per_user: float = 8.0  # mean out-degree
    homophily: float = 0.8  # share of a user's tastes drawn from the community profile
    item_popularity_exponent: float = 1.0  # Zipf exponent of item popularity
    synthetic_seed: int = 7
    # true: refuse social edges whose user has no interactions, listing every line; false: drop them, one warning
    strict: bool = False
    price_bins: int = 8  # items.csv price: quantile bins over the catalogue (a shared vector per bin)
    text_dim: int = 32  # items.csv title/text: size of the offline text features (hashed TF-IDF + SVD)
    # csv, > 0: keep only interactions whose value column is >= this (4: ratings of 4 and 5 are the positives);
    # 0 keeps every row, with or without a value column (as implicit positives)
    min_value: float = 0.0

    def __post_init__(self) -> None:
        _check_seed(self.synthetic_seed, "data.synthetic_seed")
        _check(self.price_bins >= 1, "data.price_bins", "must be >= 1")
        _check(math.isfinite(self.min_value) and self.min_value >= 0, "data.min_value",
               "must be a finite number >= 0 (0 keeps every interaction)")
        _check(self.min_value == 0 or self.format == "csv", "data.min_value",
               "applies to data.format = csv (its value column)")
        _check(self.text_dim >= 1, "data.text_dim", "must be >= 1")
        formats = ("synthetic", "filmtrust", "lastfm", "douban", "ciao", "csv")
        _check(self.format in formats, "data.format", f"must be one of {formats}, got {self.format!r}")
        _check(self.format == "synthetic" or bool(self.path), "data.path", "required for real data")
        _check(self.n_users >= 2, "data.n_users", "must be >= 2")
        _check(self.n_items >= 2, "data.n_items", "must be >= 2")
        _check(self.n_communities >= 1, "data.n_communities", "must be >= 1")
        _check(self.interactions_per_user >= 1, "data.interactions_per_user", "must be >= 1")
        _check(self.friends_per_user >= 0, "data.friends_per_user", "must be >= 0")
        _check(0.0 <= self.homophily <= 1.0, "data.homophily", "must be in [0, 1]")
        _check(self.item_popularity_exponent >= 0, "data.item_popularity_exponent", "must be >= 0")


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    min_interactions: int = 3  # users with fewer are train-only
    seed: int = 2024

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"split.{name}", "must be in [0, 1]")
        _check(abs(self.train + self.val + self.test - 1.0) < 1e-9, "split", "train + val + test must be 1")
        _check(self.min_interactions >= 1, "split.min_interactions", "must be >= 1")
        _check_seed(self.seed, "split.seed")


@dataclass(frozen=True)
class PartitionConfig:
    method: str = "random"  # random|community|dirichlet
    alpha: float = 0.5  # Dirichlet concentration (dirichlet only)
    seed: int = 11

    def __post_init__(self) -> None:
        methods = ("random", "community", "dirichlet")
        _check(self.method in methods, "partition.method", f"must be one of {methods}, got {self.method!r}")
        _check(self.alpha > 0, "partition.alpha", "must be > 0")
        _check_seed(self.seed, "partition.seed")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "social"  # social|bpr|mostpop
    dim: int = 64  # embedding size d
    use_social: bool = True  # the social term r_u
    use_history: bool = True  # the behaviour term b_u
    use_category: bool = False  # add a vector per catalogue category to item and history vectors
    prior_by_category: bool = True  # the joint-scope prior x the user's own category shares (models/prior.py)
    use_price: bool = False  # add a vector per price bin (items.csv price) to item and history vectors
    use_text: bool = False  # add a shared projection of the items' offline text features to item vectors
    use_user_features: bool = False  # users.csv: a shared vector per (column, value), summed into the user's vector
    user_embedding: str = "trained"  # trained|local|none: how p_u is obtained (see DESIGN.md)
    use_mlp: bool = True  # residual MLP refinement, output layer starts at zero
    mlp_hidden: int = 64
    aggregator: str = "mean"  # mean|gcn|attention
    max_neighbors: int = 20  # K
    max_targets: int = 64  # H: targets per user example
    num_negatives: int = 8  # sampled negatives per target
    max_history: int = 256  # cap on the history bag of a training example
    temperature: float = 0.0  # > 0: score = cos(h_u, q_i) / temperature (+ c_i); 0: dot product
    loss: str = "bce"  # bce|bpr|softmax
    init_std: float = 0.01
    bias_scale: float = 1.0  # c_i = bias_scale * b_i: > 1 gives the biases more of a flat DP clipping norm
    local_refit_steps: int = 50  # local reconstruction of p_u (user_embedding = local)
    local_refit_l2: float = 1.0
    # a learned inverse temperature on the user-item term: score = exp(w) h.q (+ c_i), w one shared scalar
    # trained like every other shared parameter (DP-SGD under privacy); lets a noisy model fall back on
    # its item biases and the DP popularity prior instead of ranking by noise (shared/models/social.py)
    learned_scale: bool = False

    def __post_init__(self) -> None:
        _check(self.name in ("social", "bpr", "mostpop"), "model.name", "must be social|bpr|mostpop")
        _check(self.dim >= 1, "model.dim", "must be >= 1")
        _check(self.user_embedding in ("trained", "local", "none"), "model.user_embedding",
               "must be trained|local|none")
        _check(self.aggregator in ("mean", "gcn", "attention"), "model.aggregator", "must be mean|gcn|attention")
        _check(self.max_neighbors >= 1, "model.max_neighbors", "must be >= 1")
        _check(self.max_targets >= 1, "model.max_targets", "must be >= 1")
        _check(self.num_negatives >= 1, "model.num_negatives", "must be >= 1")
        _check(self.max_history >= 1, "model.max_history", "must be >= 1")
        _check(self.temperature >= 0, "model.temperature", "must be >= 0")
        _check(self.loss in ("bce", "bpr", "softmax"), "model.loss", "must be bce|bpr|softmax")
        _check(self.init_std > 0, "model.init_std", "must be > 0")
        _check(self.bias_scale > 0, "model.bias_scale", "must be > 0")
        _check(self.mlp_hidden >= 1, "model.mlp_hidden", "must be >= 1")
        _check(self.local_refit_steps >= 0, "model.local_refit_steps", "must be >= 0")
        _check(self.local_refit_l2 >= 0, "model.local_refit_l2", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100  # upper bound; early stopping may end sooner
    batch_size: int = 256  # expected users per batch (DP: sample_rate = batch_size / n_users)
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam|sgd
    patience: int = 20  # epochs without validation improvement; 0 disables early stopping
    eval_every: int = 1
    seed: int = 0
    device: str = "cpu"  # auto|cpu|cuda|cuda:N
    num_threads: int = 0  # torch threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.optimizer in ("adam", "sgd"), "train.optimizer", "must be adam|sgd")
        _check(self.patience >= 0, "train.patience", "must be >= 0")
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        _check(self.num_threads >= 0, "train.num_threads", "must be >= 0")
        _check_seed(self.seed, "train.seed")
        dev = self.device
        ok = dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
        _check(ok, "train.device", f"must be auto|cpu|cuda|cuda:N, got {dev!r}")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = False
    noise_multiplier: float = 0.0  # 0: calibrate from max_epsilon
    max_grad_norm: float = 0.1  # per-user clipping bound C
    target_delta: float = 1e-5
    max_epsilon: float = 8.0  # the budget cap
    accountant: str = "rdp"  # rdp|prv|rdp_int (RDP at integer orders only; what distributed_noise needs)
    secure_rng: bool = False
    epochs: int = 0  # fixed DP schedule (0: use train.epochs); DP runs do not early-stop by default
    select_on_validation: bool = False  # choosing the epoch on validation data uses private data
    scope: str = "joint"  # joint: billboard joint DP; partner: DP for all that leaves a partner (DESIGN.md)
    clipping: str = "onepass"  # onepass: ghost norms + book-keeping in one backward; ghost: Opacus's (two)
    # > 0: before DP training, one Gaussian release of the item-popularity histogram (each user's items
    # weighted 1/sqrt(count), so a user moves it by at most 1 in L2) with this noise multiplier, charged in
    # the ledger; the model adds its log as a fixed item prior (shared/privacy/popularity.py). 0: off
    popularity_noise_multiplier: float = 0.0
    # scope joint, > 0: after the federation's last round, one Gaussian release of the difference of the
    # validation users' NDCG@10 sums under the candidates (each minus "model"; the prior: the DP popularity
    # release or the model's item biases), charged in the ledger; the partner serves the best by the noisy
    # differences (shared/privacy/selection.py). 0: off
    selection_noise_multiplier: float = 0.0
    # the selection's candidates, comma-separated, "model" first: model, prior, product (the model's score plus
    # the prior's); K candidates release K - 1 differences, L2 sensitivity sqrt(K - 1), noise sigma sqrt(K - 1)
    selection_candidates: str = "model,prior"
    # true: one full-batch DP-GD step per round, the noise split over the partners under SecAgg+ as integer
    # Skellam shares whose sum is one central step's noise (shared/privacy/distributed.py; PRIVACY.md 6)
    distributed_noise: bool = False
    grid_bits: int = 16  # distributed_noise: the clipped sum is rounded to steps of max_grad_norm / 2**grid_bits

    def __post_init__(self) -> None:
        _check(self.scope in ("joint", "partner"), "privacy.scope", "must be joint|partner")
        _check(self.clipping in ("onepass", "ghost"), "privacy.clipping", "must be onepass|ghost")
        _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
        _check(self.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
        _check(0 < self.target_delta < 1, "privacy.target_delta", "must be in (0, 1)")
        _check(self.max_epsilon > 0, "privacy.max_epsilon", "must be > 0")
        # An infinite cap is no budget: every round would be admitted, whatever it costs.
        _check(not self.enabled or math.isfinite(self.max_epsilon), "privacy.max_epsilon",
               f"must be finite when privacy.enabled (got {self.max_epsilon}); turn privacy off instead")
        _check(math.isfinite(self.noise_multiplier), "privacy.noise_multiplier", "must be finite")
        _check(math.isfinite(self.max_grad_norm), "privacy.max_grad_norm", "must be finite")
        _check(self.accountant in ("rdp", "prv", "rdp_int"), "privacy.accountant", "must be rdp|prv|rdp_int")
        _check(1 <= self.grid_bits <= 24, "privacy.grid_bits", "must be in [1, 24]")
        # the Skellam bound is proved at integer orders (Agarwal, Kairouz, Liu 2021, Thm 3.5)
        _check(not (self.enabled and self.distributed_noise) or self.accountant == "rdp_int",
               "privacy.accountant", 'must be "rdp_int" with privacy.distributed_noise (the Skellam '
               "mechanism's RDP bound holds at integer orders)")
        _check(self.epochs >= 0, "privacy.epochs", "must be >= 0")
        _check(math.isfinite(self.popularity_noise_multiplier) and self.popularity_noise_multiplier >= 0,
               "privacy.popularity_noise_multiplier", "must be a finite number >= 0 (0: no popularity release)")
        _check(math.isfinite(self.selection_noise_multiplier) and self.selection_noise_multiplier >= 0,
               "privacy.selection_noise_multiplier", "must be a finite number >= 0 (0: no DP selection)")
        try:
            from fedsocial.shared.privacy.selection import parse_selection_candidates

            parse_selection_candidates(self.selection_candidates)
        except ValueError as exc:
            raise ConfigError(f"privacy.selection_candidates: {exc}") from None


@dataclass(frozen=True)
class FederationConfig:
    partners: int = 3
    rounds: int = 5
    local_epochs: int = 1
    clipping_norm: float = 10.0  # bound on the L2 norm of a partner's shared-parameter update
    min_partners: int = 2  # quorum
    weight_cap: int = 0  # cap on a partner's aggregation weight (user count); 0: no cap
    weight_cap_ratio: float = 4.0  # a weight is at most this x the median declared user count; 0: off
    server_noise_multiplier: float = 0.0  # optional partner-level DP noise added by the server
    norm_tolerance: float = 1e-3  # relative slack when validating update norms
    local_batch_size: int = 0  # a partner's batch size in local training; 0: train.batch_size
    eval_every: int = 1  # federated evaluation every k rounds, and always after the last round
    # privacy.scope = partner: non-private local adaptation epochs on a separate copy (client/personalize.py);
    # 0: the alone budget, rounds x local_epochs
    personal_epochs: int = 0
    compare_alone: bool = False  # also train each partner alone, non-private, same budget (metrics.json alone)
    # under DP: 0 keeps each partner's evaluation on the partner; > 0 releases Gaussian-noised metric sums,
    # charged in its ledger (shared/privacy/evaluation.py)
    eval_noise_multiplier: float = 0.0
    # the straggler deadline (server/deadline.py): once min_partners (t under SecAgg+) have answered, the others have
    # this many seconds more; 0 waits for every reply (or the SuperLink's offline verdict, 36-60 s)
    straggler_grace: float = 0.0

    def __post_init__(self) -> None:
        _check(self.partners >= 1, "federation.partners", "must be >= 1")
        _check(self.rounds >= 1, "federation.rounds", "must be >= 1")
        _check(self.local_epochs >= 1, "federation.local_epochs", "must be >= 1")
        _check(self.clipping_norm > 0, "federation.clipping_norm", "must be > 0")
        _check(1 <= self.min_partners <= self.partners, "federation.min_partners", "must be in [1, partners]")
        _check(self.weight_cap >= 0, "federation.weight_cap", "must be >= 0")
        _check(self.weight_cap_ratio == 0 or self.weight_cap_ratio >= 1, "federation.weight_cap_ratio",
               "must be 0 (off) or >= 1")
        _check(self.server_noise_multiplier >= 0, "federation.server_noise_multiplier", "must be >= 0")
        _check(self.norm_tolerance >= 0, "federation.norm_tolerance", "must be >= 0")
        _check(self.local_batch_size >= 0, "federation.local_batch_size", "must be >= 0 (0: train.batch_size)")
        _check(self.eval_every >= 1, "federation.eval_every", "must be >= 1")
        _check(math.isfinite(self.eval_noise_multiplier) and self.eval_noise_multiplier >= 0,
               "federation.eval_noise_multiplier", "must be finite and >= 0")
        _check(self.personal_epochs >= 0, "federation.personal_epochs", "must be >= 0 (0: rounds x local_epochs)")
        _check(math.isfinite(self.straggler_grace) and self.straggler_grace >= 0, "federation.straggler_grace",
               "must be finite and >= 0 seconds (0: wait for every reply)")


@dataclass(frozen=True)
class SecAggConfig:
    enabled: bool = False
    num_shares: int = 3
    reconstruction_threshold: int = 2
    quantization_range: int = 4194304
    clipping_range: float = 0.0  # 0: derived from federation.clipping_norm
    max_weight: float = 0.0  # 0: derived from the weights used
    precision: float = 1e-4  # largest per-coordinate quantisation error of the aggregate, / clipping_norm

    def __post_init__(self) -> None:
        _check(self.num_shares >= 2, "secagg.num_shares", "must be >= 2")
        _check(2 <= self.reconstruction_threshold <= self.num_shares, "secagg.reconstruction_threshold",
               "must be in [2, num_shares]")
        _check(self.quantization_range >= 2, "secagg.quantization_range", "must be >= 2")
        _check(self.clipping_range >= 0, "secagg.clipping_range", "must be >= 0")
        _check(self.max_weight >= 0, "secagg.max_weight", "must be >= 0")
        _check(0 < self.precision < 1, "secagg.precision", "must be in (0, 1)")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def __post_init__(self) -> None:
        pc, fc = self.privacy, self.federation
        if pc.enabled and pc.distributed_noise:
            _check(self.secagg.enabled, "secagg.enabled", "must be true with privacy.distributed_noise: only the "
                   "secure sum hides each partner's share, which alone carries a fraction of the noise")
            _check(fc.local_epochs == 1, "federation.local_epochs", "must be 1 with privacy.distributed_noise "
                   "(a round is one full-batch DP-GD step; more rounds give more steps)")
            _check(fc.server_noise_multiplier == 0, "federation.server_noise_multiplier",
                   "must be 0 with privacy.distributed_noise (the partners' shares are the noise)")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with ``section``'s fields replaced (validated again)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]
_SECTION_TYPES = typing.get_type_hints(Config)


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(_SECTION_TYPES[section])


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the field type; ints are accepted where floats are expected."""
    if isinstance(typ, types.UnionType):  # not used yet; kept strict
        raise ConfigError(f"{key}: unsupported field type {typ}")
    if typ is bool:
        _check(isinstance(value, bool), key, f"expected a boolean, got {value!r}")
        return value
    if typ is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if typ is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ConfigError(f"{key}: {str(value)[:20]}... is too large for a float") from None
        # nan slips past every bound check, and no setting here means anything at infinity
        _check(math.isfinite(number), key, f"expected a finite number, got {value!r}")
        return number
    if typ is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {typ}")


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from nested dicts; errors name ``source`` and the key."""
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(_SECTION_TYPES)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        ftypes = _field_types(section)
        kwargs = {}
        for key, value in values.items():
            full = f"{section}.{key}"
            if key not in ftypes:
                raise ConfigError(f"{source}: unknown key {full}")
            try:
                kwargs[key] = _coerce(full, value, ftypes[key])
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        try:
            sections[section] = _SECTION_TYPES[section](**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return Config(**sections)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``; the value is read as a TOML value, else as a bare string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    rhs = rhs.strip()
    try:
        value = tomllib.loads(f"v = {rhs}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs  # a bare word such as cpu or lastfm
    return section, key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in _SECTION_TYPES:
            raise ConfigError(f"--set {text!r}: unknown section [{section}]")
        if key not in _field_types(section):
            raise ConfigError(f"--set {text!r}: unknown key {section}.{key}")
        merged.setdefault(section, {})[key] = value
    return merged


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        except UnicodeDecodeError as exc:  # found by tests/test_fuzz.py: a binary file gave a traceback
            raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:  # a directory, a file without read permission
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    return config_from_dict(apply_overrides(raw, overrides or []), source)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``--data-dir``, else ``$FEDSOCIAL_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("FEDSOCIAL_DATA_DIR", "data"))


def resolve_data_path(cfg: DataConfig, data_dir: str | os.PathLike[str] | None) -> Path:
    p = Path(cfg.path)
    return p if p.is_absolute() else resolve_data_dir(data_dir) / p
