"""``fedsocial init --data DIR --out CONFIG [--private [--distributed]] [--partners N]``: a config for a CSV data set.

Reads the data set in the generic CSV format (``interactions.csv``, ``social.csv``, optional
``items.csv`` / ``users.csv``; every loader rule applies, errors name file and line), measures it,
and writes a TOML config whose size-dependent settings follow from the data: embedding size, batch
size (the DP sample rate), sampled negatives, evaluation cadence and patience, epochs and rounds,
and the DP noise plan (delta below 1 / users, fixed schedule, calibrated noise). Each such setting
carries a comment saying what it was derived from. ``data.path`` is written as an absolute path, so
``fedsocial train --config CONFIG --out RUN`` and ``fedsocial simulate --config CONFIG --out RUN``
need no other flag. A non-private config lists the exact keys that DP changes, and the ``--set``
line that applies them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsocial.shared.config import ConfigError, DataConfig, load_config
from fedsocial.shared.data import Dataset
from fedsocial.simulations.common import user_errors

Settings = dict[str, dict[str, tuple[Any, str]]]  # section -> key -> (value, why)


@dataclass(frozen=True)
class DataStats:
    users: int
    items: int
    interactions: int
    edges: int
    has_category: bool
    has_price: bool
    has_text: bool
    user_features: int


def compute_stats(ds: Dataset) -> DataStats:
    """The sizes that the settings depend on (a users.csv column counts only where some user has a value)."""
    import numpy as np

    feats = ds.user_features
    used = 0 if feats is None or not len(feats) else int((np.asarray(feats) > 0).any(axis=0).sum())  # 0: missing
    return DataStats(ds.n_users, ds.n_items, ds.n_interactions, ds.n_edges, ds.item_category is not None,
                     ds.item_price_bin is not None, ds.item_text is not None, used)


def compute_clip_pow2(x: float, lo: int, hi: int) -> int:
    """The power of two nearest ``x`` (in log scale), clipped to [lo, hi]."""
    return int(min(hi, max(lo, 2 ** round(math.log2(max(x, 1.0))))))


def compute_delta(n_users: int) -> float:
    """A power of ten at most 1e-5 and at most 1 / (10 n): delta must be well below 1 / users."""
    return float(min(1e-5, 10.0 ** math.floor(math.log10(0.1 / max(n_users, 1)))))


def compute_settings(s: DataStats, private: bool, partners: int) -> Settings:
    """Size-dependent settings for non-private (``private`` False) or user-level DP training.

    Reasons (DESIGN.md, BENCHMARKS.md): small catalogues overfit large embeddings; sampled-softmax
    negatives beyond ~1/20 of the catalogue add cost, not signal; a full-ranking evaluation costs
    users x items, so large data sets evaluate less often with proportionally longer patience;
    epochs follow a budget of interactions processed. Under DP the per-user vector is reconstructed
    locally (a DP-trained per-user table is mostly noise), the MLP is off, the sample rate is about
    1/4 (LastFM's measured setting) or the batch is capped at 1024 users, the schedule is fixed and
    the noise multiplier calibrated to reach ``max_epsilon`` at its end.
    """
    dim = compute_clip_pow2(math.sqrt(s.items) / 2, 16, 64)
    negatives = int(min(128, max(8, s.items // 20)))
    cost = s.users * s.items  # score entries per full-ranking evaluation
    eval_every = int(min(10, max(1, math.ceil(cost / 5e7))))
    epochs = int(min(100, max(10, round(2e6 / max(s.interactions, 1)))))
    eval_note = f"full ranking costs {s.users} x {s.items} scores: every ~5e7 scores"
    if private:  # a fixed DP schedule: more steps need more noise per step; 40 epochs measured on LastFM
        epochs = min(epochs, 40)
        # a validation pass first refits every user's local p_u (50 Adam steps: about 11 epochs of training on
        # FilmTrust); the alone and fine-tuned models select on it, the federation evaluates with it
        if math.ceil(epochs / 10) > eval_every:
            eval_every, eval_note = int(math.ceil(epochs / 10)), "DP: each pass refits every user's p_u: 10 passes"
    epochs = int(math.ceil(epochs / eval_every) * eval_every)
    per_partner = max(1, s.users // partners)
    rounds = int(min(20, max(5, epochs // 5)))
    model: dict[str, tuple[Any, str]] = {
        "name": ("social", "behaviour bag + social term (DESIGN.md)"),
        "dim": (dim, f"~sqrt({s.items} items)/2 as a power of two in [16, 64]"),
        "num_negatives": (negatives, f"~{s.items} items / 20, in [8, 128]"),
        "loss": ("softmax", "sampled softmax"),
        "temperature": (0.2, "cosine scores / 0.2"),
        "max_targets": (64, "targets per user example"),
        "max_neighbors": (20, "K sampled out-neighbours"),
        "use_category": (s.has_category, "items.csv has a category column" if s.has_category else "no categories"),
        "use_price": (s.has_price, "items.csv has a price column" if s.has_price else "no prices"),
        "use_text": (s.has_text, "items.csv has a title/text column" if s.has_text else "no texts"),
        "use_user_features": (s.user_features > 0, f"users.csv has {s.user_features} feature column(s) with values"
                              if s.user_features else "no users.csv feature column with a value"),
    }
    train: dict[str, tuple[Any, str]] = {
        "epochs": (epochs, f"~2e6 / {s.interactions} interactions, in [10, {40 if private else 100}], "
                           "a multiple of eval_every"),
        "eval_every": (eval_every, eval_note),
        "patience": (max(10, 3 * eval_every), f"early stopping after {max(10, 3 * eval_every)} epochs without a "
                                               "better validation NDCG@10 (at least 3 evaluations, 10 epochs)"),
        "lr": (0.005, "Adam"),
        "seed": (0, "fixed seed"),
        "device": ("auto", "cuda when available, else cpu"),
    }
    fed: dict[str, tuple[Any, str]] = {
        "partners": (partners, "partner platforms in a simulation"),
        "min_partners": (max(1, min(partners, partners - 1)), "quorum"),
        "rounds": (rounds, "epochs / 5 in [5, 20]: each round has a fixed coordination cost"),
        "local_epochs": (max(1, round(epochs / rounds)), "rounds x local_epochs ~ the centralized epochs"),
        "eval_every": (max(1, eval_every // 2), "federated evaluation cadence, in rounds"),
    }
    privacy: dict[str, tuple[Any, str]] = {"enabled": (private, "user-level DP-SGD")}
    if private:
        batch = int(min(1024, max(16, round(s.users / 4))))
        local_batch = int(min(1024, max(8, round(per_partner / 4))))
        model["user_embedding"] = ("local", "DP: p_u reconstructed from the user's own items, not DP-trained")
        model["use_mlp"] = (False, "DP: the residual MLP costs clipping norm and measured no gain")
        model["learned_scale"] = (True, "DP: a learnt weight on the noisy user-item term, so that the model falls "
                                        "back on popularity where DP noise drowns it (BENCHMARKS.md 10.2)")
        rate = "1: every user, every step" if batch >= s.users else f"~{batch}/{s.users} users"
        train["batch_size"] = (batch, f"DP: sample rate {rate} (about 1/4, at least 16, at most 1024 users)")
        train["patience"] = (0, "DP: a fixed schedule (choosing the epoch on validation spends privacy)")
        privacy.update({
            "max_epsilon": (8.0, "budget cap"),
            "target_delta": (compute_delta(s.users), f"a power of ten below 1 / (10 x {s.users} users)"),
            "noise_multiplier": (0.0, "0: calibrated so that epsilon reaches max_epsilon at the end"),
            "max_grad_norm": (0.1, "per-user clipping bound (per-user gradient norms measured ~0.1)"),
            "epochs": (epochs, "fixed DP schedule"),
            "accountant": ("rdp", "RDP accountant, cross-checked by PRV in the audit"),
            "popularity_noise_multiplier": (3.0, "one DP release of item popularity as a fixed item prior "
                                                 "(epsilon 1.39 alone; below epsilon 2 use 6): keeps DP from "
                                                 "ranking below popularity (docs/BENCHMARKS.md 10.1)"),
            # sigma 8: epsilon 0.48 alone at delta 1e-5, about +0.03 on top of an epsilon-8 training history (the
            # calibration composes it); noise std 8 on the difference of the sums, so on ~400 validation users a
            # 0.06 NDCG@10 gap (24 in the sums) is told apart 99.9 % of the time, a 0.017 gap (LastFM) 79 %
            "selection_noise_multiplier": (8.0, "joint scope: one DP release of the difference of the validation "
                                                "NDCG@10 sums of the DP popularity prior alone and of the DP model, "
                                                "after the last round; the partner serves the better (epsilon "
                                                "0.48 alone)"),
        })
        if s.has_category:
            privacy["selection_candidates"] = ("model,prior,product", "categories: the selection may also serve "
                                               "the DP model times the prior personalised by the user's own "
                                               "category shares (Ciao: docs/BENCHMARKS.md 10.11)")
        fed["local_batch_size"] = (local_batch, f"DP: ~1/4 of a partner's ~{per_partner} users")
        fed["clipping_norm"] = (100.0, "DP: a partner-update bound that does not cut the noisy signal")
    else:
        batch = compute_clip_pow2(s.users / 32, 32, 512)
        model["user_embedding"] = ("trained", "non-private: a trained per-user vector")
        model["use_mlp"] = (True, "residual MLP, starts at zero")
        train["batch_size"] = (batch, f"~{s.users} users / 32 as a power of two in [32, 512]")
        fed["local_batch_size"] = (0, "0: train.batch_size")
        fed["clipping_norm"] = (10.0, "bound on a partner's update norm")
    return {"model": model, "train": train, "privacy": privacy, "federation": fed}


def compute_distributed_settings(settings: Settings, partners: int) -> Settings:
    """DP settings with the noise split over the partners under SecAgg+ (``--distributed``; docs/PRIVACY.md
    section 6): one full-batch DP-GD step a round, 80 rounds at the server's AdamW rate 0.01 (measured on
    LastFM, docs/BENCHMARKS.md 10.7), every partner one of the SecAgg+ neighbours, one dropout tolerated."""
    if partners < 3:
        raise ConfigError(f"--distributed: needs at least 3 partners (SecAgg+ shares among 3 or more), got {partners}")
    threshold = partners // 2 + 1  # more than half (Bonawitz et al. 2017), and recoverable after one dropout
    out = {section: dict(values) for section, values in settings.items()}
    out["train"]["lr"] = (0.01, "distributed noise: the server's AdamW, one step a round")
    out["privacy"].update({
        "accountant": ("rdp_int", "distributed noise: the Skellam bound holds at integer RDP orders"),
        "distributed_noise": (True, "each round one full-batch DP-GD step; the partners split its noise as integer "
                                    "Skellam shares under SecAgg+ (assumes SecAgg+ hides each share and at least "
                                    f"{max(2, partners - 1)} honest partners per sum)"),
        "grid_bits": (16, "the clipped sum on steps of max_grad_norm / 2**16"),
    })
    out["federation"].update({
        "rounds": (80, "distributed noise: 80 full-batch DP-GD steps"),
        "local_epochs": (1, "distributed noise: one step a round"),
        "eval_every": (80, "one federated evaluation, after the last round"),
        "min_partners": (max(2, partners - 1), "quorum: one dropout tolerated (t, the shares' divisor)"),
    })
    out["secagg"] = {
        "enabled": (True, "distributed noise needs the secure sum: a share alone carries 1/t of the noise"),
        "num_shares": (partners, "every partner is every other's SecAgg+ neighbour"),
        "reconstruction_threshold": (threshold, "more than half of the shares, recoverable after one dropout"),
    }
    return out


def compute_dp_changes(current: Settings, private: Settings) -> list[str]:
    """The ``section.key=value`` overrides that turn the non-private settings into the DP ones."""
    out = []
    for section, values in private.items():
        for key, (value, _) in values.items():
            if current.get(section, {}).get(key, (None, ""))[0] != value:
                out.append(f"{section}.{key}={value if isinstance(value, str) else _toml(value)}")
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


DATA_KEYS = ("min_value", "strict", "price_bins", "text_dim")  # [data] keys that change what init measures


def compute_data_config(data_dir: Path, overrides: list[str]) -> DataConfig:
    """The [data] section init reads the data set with: ``--set data.KEY=VALUE`` for the keys of DATA_KEYS
    (``data.min_value=4``: the settings follow from the interactions that remain positives)."""
    from fedsocial.shared.config import apply_overrides, config_from_dict

    for text in overrides:
        section, key = text.split("=", 1)[0].strip().partition(".")[::2]
        if section != "data" or key not in DATA_KEYS:
            raise ConfigError(f"--set {text!r}: fedsocial init takes only {', '.join('data.' + k for k in DATA_KEYS)}"
                              " (they change what it measures); set other keys where the config is used "
                              "(fedsocial train/simulate/partition --set)")
    raw = apply_overrides({"data": {"format": "csv", "path": str(data_dir)}}, overrides)
    return config_from_dict(raw, "--set").data


def render_config(data_dir: Path, stats: DataStats, settings: Settings, dp_changes: list[str],
                  data: DataConfig | None = None) -> str:
    """The TOML text: data and split first, then each section with each value's reason."""
    lines = [f"# Written by `fedsocial init` for {data_dir.name}: {stats.users} users, {stats.items} items, "
             f"{stats.interactions} interactions, {stats.edges} social edges.",
             "# Size-dependent settings say what they follow from; every other key keeps its default "
             "(shared/config.py)."]
    if dp_changes:
        lines += ["# User-level DP: rerun `fedsocial init` with --private, or change exactly these keys:",
                  "#   " + " ".join(f"--set {c}" for c in dp_changes)]
    lines += ["", "[data]", 'format = "csv"', f"path = {json.dumps(str(data_dir))}  # absolute: no --data-dir needed",
              (f"min_value = {_toml(float(data.min_value))}  # interactions with a value >= {data.min_value:g} are the "
               "positives (--set data.min_value)" if data is not None and data.min_value > 0 else
               "min_value = 0.0  # every interaction is a positive; explicit ratings: init with data.min_value=4 "
               "keeps those >= 4 and sizes the settings by them")]
    lines += [f"{k} = {_toml(getattr(data, k))}  # --set data.{k}" for k in DATA_KEYS[1:]
              if data is not None and getattr(data, k) != getattr(DataConfig(), k)]
    lines += ["", "[split]", "seed = 2024", "", "[partition]", 'method = "random"', ""]
    for section in ("model", "train", "privacy", "federation", "secagg"):
        if section not in settings:
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}  # {why}" for k, (v, why) in settings[section].items()]
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsocial init", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with interactions.csv and social.csv")
    parser.add_argument("--out", required=True, help="config file to write (TOML)")
    parser.add_argument("--private", action="store_true", help="settings for user-level DP training")
    parser.add_argument("--distributed", action="store_true",
                        help="with --private: the partners split each DP step's noise under SecAgg+ "
                             "(docs/PRIVACY.md section 6)")
    parser.add_argument("--partners", type=int, default=3, help="partners of a simulation (default 3)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                        help=f"read the data with this [data] setting ({', '.join(DATA_KEYS)}), e.g. "
                             "data.min_value=4: ratings of 4 and 5 are the positives; repeatable")
    return parser


def _check_evaluable(dataset: Dataset, data_dir: Path) -> None:
    """Refuse, here rather than at the first train or simulate, data whose split would leave no user to
    evaluate (every user below split.min_interactions: nothing to hold out)."""
    from fedsocial.shared.config import SplitConfig
    from fedsocial.shared.split import split_dataset
    from fedsocial.simulations.preflight import check_evaluable

    split = SplitConfig()
    check_evaluable(split_dataset(dataset, split), str(data_dir), split.min_interactions)


def write_init_config(data: Path, out: Path, private: bool, partners: int, force: bool = False,
                      distributed: bool = False, overrides: list[str] | None = None) -> DataStats:
    """Inspect ``data``, write the config to ``out`` (checked by reading it back); returns the stats."""
    from fedsocial.shared.loaders import load_dataset

    if partners < 1:
        raise ConfigError(f"--partners: must be >= 1, got {partners}")
    if out.exists() and not force:
        raise ConfigError(f"--out {out}: exists; choose another name or pass --force")
    data_dir = data.resolve()
    data_cfg = compute_data_config(data_dir, list(overrides or []))
    dataset = load_dataset(data_cfg)
    stats = compute_stats(dataset)
    if stats.users < 2 * partners:
        fix = (f"pass --partners {stats.users // 2} or fewer" if stats.users >= 2
               else "the data needs at least 2 users with interactions")
        raise ConfigError(f"{data_dir}: {stats.users} user(s) cannot be split into {partners} partner(s): each "
                          f"partner needs at least 2 users ({fix})")
    _check_evaluable(dataset, data_dir)
    if distributed and not private:
        raise ConfigError("--distributed: distributed noise is a DP setting; pass --private too")
    settings = compute_settings(stats, private, partners)
    if distributed:
        settings = compute_distributed_settings(settings, partners)
    dp_changes = [] if private else compute_dp_changes(settings, compute_settings(stats, True, partners))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_config(data_dir, stats, settings, dp_changes, data_cfg), encoding="utf-8")
    load_config(tmp)  # the written file must be a valid config
    tmp.replace(out)
    return stats


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    stats = write_init_config(Path(args.data), out, args.private, args.partners, args.force, args.distributed,
                              args.overrides)
    kind = ("user-level DP, distributed noise" if args.distributed else "user-level DP") if args.private \
        else "non-private"
    print(f"{out}: {kind} config for {stats.users} users, {stats.items} items, {stats.interactions} interactions, "
          f"{stats.edges} social edges", file=sys.stderr)
    if args.distributed:  # a federation setting: the centralized trainer has no partners to split the noise over
        print(f"next: fedsocial simulate --config {out} --out runs/{out.stem}", file=sys.stderr)
    else:
        print(f"next: fedsocial train --config {out} --out runs/{out.stem}   (or: fedsocial simulate ...)",
              file=sys.stderr)
    return 0


def compute_dp_advice(cfg: Any) -> list[str]:
    """The ``section.key=value`` changes a DP run of ``cfg`` needs because its settings are the
    non-private ones (DESIGN.md, docs/PRIVACY.md): empty when DP is off or the settings already fit."""
    if not cfg.privacy.enabled or cfg.model.name != "social":
        return []
    advice = []
    if cfg.model.user_embedding == "trained":
        advice.append("model.user_embedding=local")  # a DP-trained per-user table is mostly noise
    if cfg.model.use_mlp:
        advice.append("model.use_mlp=false")  # the MLP takes clipping norm and measured no gain under DP
    if cfg.privacy.max_grad_norm > 0.5:
        advice.append("privacy.max_grad_norm=0.1")  # per-user gradient norms measured ~0.1
    return advice


def dp_advice_line(cfg: Any) -> str | None:
    """One line for the terminal when :func:`compute_dp_advice` has something to say."""
    advice = compute_dp_advice(cfg)
    if not advice:
        return None
    return ("note: DP is on with settings for non-private training; for DP use "
            + " ".join(f"--set {a}" for a in advice)
            + " (or write a DP config: fedsocial init --data DIR --out CONFIG --private)")
