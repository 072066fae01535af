"""``fedsocial recommend RUN_DIR --partner ID --k K --out FILE [--users U ...]``: batch top-K lists.

Loads the model a partner serves (:func:`load_recommender`): the global shared parameters of the
run's last checkpoint, the partner's local state of that round (social table, per-user tables), the
partner's data (re-derived from the run's config, as its client does) with its recorded events
(``partners/ID/events.jsonl``) replayed. A deployed partner works too: RUN_DIR is then its folder as
``fedsocial partition`` writes it (``partner.toml``: config, data and state paths) or its bare data folder
(with ``--config`` and ``--state-dir``), and ``--checkpoint`` gives the global parameters it received.
Writes one row per (user, rank): ``user, rank, item, score, probability, explanation`` as JSON Lines
(``.jsonl``) or CSV (``.csv``, the explanation as a JSON string).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsocial.client.state import StateError
from fedsocial.server.checkpoint import CheckpointError
from fedsocial.shared.config import Config, ConfigError, load_config
from fedsocial.shared.data import SplitData
from fedsocial.shared.events import (
    EVENTS_FILE,
    PER_USER_STATE,
    EventError,
    compute_grown_local_state,
    load_split_with_events,
)
from fedsocial.shared.fileio import json_default, write_text_atomic
from fedsocial.shared.models.social import SocialRec
from fedsocial.shared.privacy.selection import SelectionError
from fedsocial.shared.serving import (
    CALIBRATIONS,
    MAX_K,
    Recommender,
    ServingError,
    UnknownUserError,
    compute_calibration_method,
    compute_serving_scope,
)
from fedsocial.shared.trainer import TrainerError
from fedsocial.simulations.common import EXIT_USER_ERROR, USER_ERRORS, compute_error_line

# ... and the files a partner's served model is read from: a checkpoint or local state that is unreadable
# or belongs to another model (TrainerError names the mismatched parameter)
SERVING_ERRORS: tuple[type[BaseException], ...] = (*USER_ERRORS, ServingError, EventError, CheckpointError,
                                                   StateError, TrainerError, SelectionError)
# partner scope (DESIGN.md): a hook that returns the locally adapted model to serve (client/personalize.py)
Adapter = Callable[[Config, SplitData, SocialRec, Path], SocialRec]


@dataclass(frozen=True)
class ServedSource:
    """Where a partner's served model comes from."""

    config_path: Path
    checkpoint: Path | None  # None: the run's last checkpoint
    state_dir: Path
    run_dir: Path | None  # simulation run folder, or None for a deployed partner
    partner_id: str
    data_dir: str | None
    config: Config | None = None  # a deployed partner's partner.toml carries its config
    ledger_path: Path | None = None  # the partner's privacy ledger (decides its charged selection); None: unknown


def resolve_source(path: Path, partner_id: str, data_dir: str | None = None, config: str | None = None,
                   checkpoint: str | None = None, state_dir: str | None = None,
                   ledger_dir: str | None = None) -> ServedSource:
    """A simulation run folder (``config.toml``, ``checkpoints/``, ``partners/ID``, ``ledgers/ID.jsonl``), or a
    deployed partner (its ledger in ``partner.toml``'s ledger-dir, or ``ledger_dir``)."""
    from fedsocial.shared.protocol import PARTNER_ID

    if PARTNER_ID.fullmatch(partner_id) is None:  # "../partners/partner-0" was taken as a path (found in review)
        raise ConfigError(f"--partner {partner_id[:80]!r}: a partner id is 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit (e.g. partner-0), not a path")
    ledger = None if ledger_dir is None else Path(ledger_dir) / f"{partner_id}.jsonl"
    if (path / "config.toml").is_file() and config is None:
        sd = Path(state_dir) if state_dir else path / "partners" / partner_id
        if not sd.is_dir():
            if not (path / "partners").is_dir() and state_dir is None:  # e.g. a `fedsocial train` run folder
                raise ConfigError(f"{path}: not a federated run (no partners/ folder): recommend serves a partner of a "
                                  "`fedsocial simulate` run, or a deployed partner's folder with --checkpoint")
            known = sorted(p.name for p in (path / "partners").iterdir()) if (path / "partners").is_dir() else []
            raise ConfigError(f"--partner {partner_id}: no folder {sd} (partners of this run: {', '.join(known)})")
        return ServedSource(path / "config.toml", Path(checkpoint) if checkpoint else None, sd, path, partner_id,
                            data_dir, ledger_path=ledger or path / "ledgers" / f"{partner_id}.jsonl")
    if (path / "partner.toml").is_file() and config is None:  # a folder written by `fedsocial partition`
        from fedsocial.simulations.partition_cmd import read_partner_toml

        if checkpoint is None:
            raise ConfigError(f"{path}: a deployed partner: pass --checkpoint (the global parameters it received)")
        table, cfg = read_partner_toml(path / "partner.toml")
        if partner_id != str(table.get("id", partner_id)):
            raise ConfigError(f"--partner {partner_id}: {path / 'partner.toml'} is partner {table.get('id')!r}")
        sd = Path(state_dir) if state_dir else Path(str(table.get("state-dir", path / "state")))
        ledger = ledger or Path(str(table.get("ledger-dir", path / "ledger"))) / f"{partner_id}.jsonl"
        return ServedSource(path / "partner.toml", Path(checkpoint), sd, None, partner_id,
                            str(table.get("data-dir", path)), cfg, ledger)
    if config is None or checkpoint is None or state_dir is None:
        raise ConfigError(f"{path}: neither a simulation run folder (config.toml) nor a partner folder "
                          "(partner.toml); for a deployed partner's data folder pass --config, --checkpoint "
                          "and --state-dir")
    return ServedSource(Path(config), Path(checkpoint), Path(state_dir), None, partner_id, str(path),
                        ledger_path=ledger)


def load_partner_data(cfg: Config, src: ServedSource) -> SplitData:
    """The partner's split exactly as its client derives it (client.partner.load_partner_split)."""
    from fedsocial.client.partner import PartnerSettings, load_partner_split

    if src.run_dir is not None:
        try:
            index = int(src.partner_id.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            raise ConfigError(f"--partner {src.partner_id!r}: simulation partners are named partner-N") from None
        num: int | None = cfg.federation.partners
        data_dir = src.data_dir
    else:
        index, num, data_dir = 0, None, src.data_dir
    settings = PartnerSettings(config_path=src.config_path, data_dir=data_dir, run_dir=src.run_dir or src.state_dir,
                               partner_id=src.partner_id, partner_index=index, num_partitions=num,
                               state_dir=src.state_dir, ledger_dir=src.state_dir, device="cpu", signing_key=None,
                               num_threads=0)
    return load_partner_split(cfg, settings)


def _parameters(src: ServedSource) -> tuple[int, dict[str, Any]]:
    from fedsocial.server.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = load_checkpoint(src.checkpoint) if src.checkpoint else latest_checkpoint(src.run_dir)  # type: ignore[arg-type]
    if ckpt is None:
        raise ConfigError(f"{src.run_dir}: the run has no checkpoint yet (no finished round)")
    return ckpt.round, dict(zip(ckpt.names, ckpt.arrays, strict=True))


def _local_state(state_dir: Path, round_: int) -> dict[str, Any] | None:
    from fedsocial.client.state import LATEST, load_local_state, load_npz

    for r in range(round_, 0, -1):
        state = load_local_state(state_dir, r)
        if state is not None:
            return state
    latest = state_dir / LATEST
    return {k: v for k, v in load_npz(latest).items() if k != "__round__"} if latest.is_file() else None


def check_alone_cache(path: Path) -> None:
    """Refuse, naming it, a cached alone model (``STATE_DIR/personal/alone.npz``) that is torn, replaced or not such a
    cache: client/personalize.py would load it with a raw numpy / zipfile / KeyError traceback."""
    from fedsocial.client.personalize import read_alone_cache

    if path.is_file():
        read_alone_cache(path)


def serve_personalised(cfg: Config, split: SplitData, shared: SocialRec, state_dir: Path) -> SocialRec:
    """Partner scope: the model client/personalize.py chooses on the partner's validation data (shared,
    alone, fine-tuned; models cached under STATE_DIR/personal/). A score mixture is not one model's sum
    of terms, so explanations could not be exact: then the best single candidate on validation is served."""
    import torch

    from fedsocial.client.personalize import (
        PERSONAL_DIR,
        choose_on_validation,
        compute_alone_config,
        personalise,
        train_alone_model,
    )
    from fedsocial.shared.privacy.popularity import uses_popularity_release
    from fedsocial.shared.trainer import LocalTrainer

    check_alone_cache(state_dir / PERSONAL_DIR / "alone.npz")
    result = personalise(cfg, split, shared, state_dir, cfg.train.seed)
    if isinstance(result.model, SocialRec):
        return result.model
    single = {k: v["ndcg@10"] for k, v in result.val.items() if k in ("shared", "alone", "finetune")}
    name = choose_on_validation(single)
    print(f"partner scope: {result.choice} is a score mixture (no exact explanation); serving {name}, the best "
          f"single model on validation", file=sys.stderr)
    if name == "alone":
        model = train_alone_model(cfg, split, state_dir / PERSONAL_DIR)[0]
    elif name == "finetune":
        trainer = LocalTrainer(compute_alone_config(cfg), split, device="cpu", seed=cfg.train.seed,
                               popularity_prior=uses_popularity_release(cfg))  # the fine-tune keeps the DP prior
        path = state_dir / PERSONAL_DIR / "finetune.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                trainer.model.load_state_dict({k: torch.as_tensor(z[k]) for k in z.files})
        except (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{path}: unreadable fine-tuned model ({type(exc).__name__}: {str(exc)[:200]}); "
                              "run the partner's personalisation again") from None
        model = trainer.model
    else:
        model = shared
    if not isinstance(model, SocialRec):
        raise ConfigError(f"partner scope: the {name} model is not the social model")
    return model


def check_state_fits_data(state: dict[str, Any], data_users: int, served_users: int, src: ServedSource,
                          round_: int) -> None:
    """The local state's per-user rows are the partner's users by index: refuse a state whose row count is not
    between the users of the data (as it reads now) and those plus the users its events created. The data
    changed since the run otherwise (rows added or removed move every user to another partner and split), and the
    rows would silently belong to other users."""
    for name in PER_USER_STATE:
        table = state.get(name)
        rows = 0 if table is None else int(np.shape(table)[0])
        if rows and not data_users <= rows <= served_users:
            raise ConfigError(f"{src.state_dir}: {src.partner_id}'s local state of round {round_} holds {rows} "
                              f"users, its data (data.path of {src.config_path}) now gives it {data_users}: the data "
                              "changed since the run; serve the data the run trained on, or train again")


def load_recommender(src: ServedSource, calibration: str = "auto", adapt: Adapter | None = None,
                     refit_on_event: str = "sync") -> Recommender:
    """The partner's served model: shared parameters + local state of the same round + its data and events.

    The run's privacy decides what serving may learn from the partner's records (``compute_serving_scope``): in
    joint scope under DP, cold users are ranked by the DP popularity prior and ``calibration`` must be ``auto``
    or ``none`` (platt or isotonic is refused, before anything is loaded)."""
    from fedsocial.shared.trainer import LocalTrainer

    cfg = src.config if src.config is not None else load_config(src.config_path)
    check_served_privacy(cfg, src)  # an edited config must not turn a DP run's serving into non-DP serving
    privacy_scope = compute_serving_scope(cfg.privacy.enabled, cfg.privacy.scope)
    compute_calibration_method(calibration, privacy_scope)  # a refused calibration fails fast
    data = load_partner_data(cfg, src)
    split = load_split_with_events(data, src.state_dir)
    round_, shared = _parameters(src)
    trainer = LocalTrainer(cfg, split, device="cpu", seed=cfg.train.seed)
    trainer.set_shared(shared)
    state = _local_state(src.state_dir, round_)
    if state is not None:
        check_state_fits_data(state, data.n_users, split.n_users, src, round_)
        trainer.set_local_state(compute_grown_local_state(state, split.n_users))
    trainer.refit_local()  # p_u from training items, for calibration on validation data
    model = trainer.model
    if not isinstance(model, SocialRec):
        raise ConfigError(f"{src.config_path}: model.name = {cfg.model.name}: serving needs the social model")
    ranking = "model"
    if cfg.privacy.scope == "partner":  # the local, non-DP adaptation stays inside the partner
        model = (adapt or serve_personalised)(cfg, split, model, src.state_dir)
    elif cfg.privacy.enabled:  # joint scope: what the partner's charged DP selection chose (else the model)
        from fedsocial.shared.privacy.selection import read_served_choice

        ranking = read_served_choice(src.state_dir, read_selection_charges(src.ledger_path), src.ledger_path)
    return Recommender(model, split, calibration=calibration, events_path=src.state_dir / EVENTS_FILE,
                       refit_on_event=refit_on_event, seed=cfg.train.seed, ranking=ranking,
                       privacy_scope=privacy_scope)


def check_served_privacy(cfg: Config, src: ServedSource) -> None:
    """Refuse a config whose privacy (``privacy.enabled``, ``privacy.scope``) is not the one the partner's releases
    were charged under (its ledger entries' ``scope``) or the run recorded (the signed ``run_manifest.json``'s
    ``privacy``): the config decides what serving learns from the partner's records without DP (calibration on
    validation records, exact counts for cold users, the charged DP selection), so an edited ``config.toml`` of a
    joint-scope DP run would serve non-DP statistics of other users' records."""
    import warnings

    from fedsocial.shared.privacy.ledger import LedgerError, TornTailWarning, read_ledger

    recorded: list[tuple[str, bool, str]] = []  # (where, DP on, scope)
    if src.ledger_path is not None and src.ledger_path.is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TornTailWarning)
                entries = read_ledger(src.ledger_path)
        except LedgerError as exc:
            raise ConfigError(f"the partner's ledger: {exc}") from None
        recorded += [(str(src.ledger_path), True, str(scope))
                     for scope in sorted({str(e.get("scope", "joint")) for e in entries})]
    manifest = src.run_dir / "run_manifest.json" if src.run_dir is not None else None
    if manifest is not None and manifest.is_file():
        try:
            privacy = json.loads(manifest.read_text(encoding="utf-8"))["privacy"]
            recorded.append((str(manifest), bool(privacy["enabled"]), str(privacy.get("scope", "joint"))))
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{manifest}: unreadable run manifest (fedsocial audit {src.run_dir} says what is "
                              "wrong with the run's records)") from None
    for where, enabled, scope in recorded:
        if enabled != cfg.privacy.enabled or (enabled and scope != cfg.privacy.scope):
            said = f"DP in {scope} scope" if enabled else "no DP"
            now = f"DP in {cfg.privacy.scope} scope" if cfg.privacy.enabled else "no DP"
            raise ConfigError(f"{src.config_path}: privacy.enabled / privacy.scope say {now}, but {where} records "
                              f"{said}: serving follows the privacy the partner's releases were made and charged "
                              "under; serve with the run's own config")


def read_selection_charges(ledger_path: Path | None) -> list[dict[str, Any]] | None:
    """The selection charges of the partner's ledger; None where there is no ledger file to read."""
    import warnings

    from fedsocial.shared.privacy.ledger import LedgerError, TornTailWarning, read_ledger
    from fedsocial.shared.privacy.selection import selection_charges

    if ledger_path is None or not ledger_path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TornTailWarning)  # a torn last line is an interrupted write, not a charge
            return [dict(e) for e in selection_charges(read_ledger(ledger_path))]
    except LedgerError as exc:
        raise SelectionError(f"the partner's ledger: {exc}") from None


def describe_calibration(rec: Recommender) -> str:
    """One line for the operator: the calibration served, and why where privacy or the data decided it."""
    cal = rec.calibrator
    return f"calibration: {cal.method}" + (f" ({cal.reason})" if cal.reason else "")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="simulation run folder (or a deployed partner's data)")
    parser.add_argument("--partner", required=True, help="partner id, e.g. partner-0")
    parser.add_argument("--data-dir", default=None, help="data folder of the run's config (default: "
                        "$FEDSOCIAL_DATA_DIR or ./data); for a deployed partner, its data folder is RUN_DIR")
    parser.add_argument("--config", default=None, help="deployed partner: the federation's config")
    parser.add_argument("--checkpoint", default=None, help="global shared parameters (a checkpoint .npz)")
    parser.add_argument("--state-dir", default=None, help="the partner's state folder")
    parser.add_argument("--ledger-dir", default=None, help="the partner's ledger folder (default: the run's "
                        "ledgers/, or partner.toml's ledger-dir)")
    parser.add_argument("--calibration", default="auto", choices=CALIBRATIONS,
                        help="score -> probability: platt or isotonic, fitted on the partner's validation data, or "
                        "none (sigmoid of the score); auto (default): platt, except none in privacy.scope = joint "
                        "under DP, where platt and isotonic are refused (they are not DP)")


def source_from_args(args: argparse.Namespace) -> ServedSource:
    return resolve_source(Path(args.run_dir), args.partner, args.data_dir, args.config, args.checkpoint,
                          args.state_dir, args.ledger_dir)


def _partner_user(rec: Recommender, user: str, partner: str) -> Any:
    """The partner's id of ``user``; unknown: the error says whose users were searched (a user of another partner
    is not in this one's data)."""
    try:
        return rec.users[rec.index_of(user)]
    except UnknownUserError:
        raise UnknownUserError(f"--users: unknown user {user!r}: not among {partner}'s {len(rec.users)} users "
                               "(each partner serves only its own users)") from None


def compute_rows(rec: Recommender, users: list[Any], k: int, category: int | str | None = None
                 ) -> list[dict[str, Any]]:
    rows = []
    for user in users:
        for rank, item in enumerate(rec.recommend(user, k, category=category), start=1):
            rows.append({"user": user, "rank": rank, **item})
    return rows


def format_rows(rows: list[dict[str, Any]], suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r, default=json_default) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LIST_HEADER.split(","))
    for r in rows:
        writer.writerow([compute_csv_cell(r["user"]), r["rank"], compute_csv_cell(r["item"]), repr(r["score"]),
                         repr(r["probability"]), json.dumps(r["explanation"], default=json_default)])
    return buf.getvalue()


_FORMULA_START = ("=", "+", "@", "\t", "\r")  # what a spreadsheet evaluates; "-" is left: "-3" is a plain id


def compute_csv_cell(value: Any) -> Any:
    """An id as a CSV cell a spreadsheet shows as text: one starting like a formula (``=cmd|...``, an id an event
    created; found by a red team) gets a leading apostrophe (OWASP's CSV-injection advice); others unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


LIST_HEADER = "user,rank,item,score,probability,explanation"  # the first line of a .csv list (format_rows)


def check_replaceable_output(out: Path) -> None:
    """``--out`` may replace an empty file or an earlier list (lists are rerun after each round), never another file:
    found in review, ``--out interactions.csv`` silently overwrote the partner's own training data."""
    if not out.exists():
        return
    if not out.is_file():
        raise ConfigError(f"--out {out}: exists and is not a file")
    try:
        with out.open("rb") as fh:
            first = fh.readline(1 << 16).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--out {out}: exists and cannot be read as an earlier list ({exc}); not replaced") from None
    if not first:
        return
    if out.suffix == ".csv" and first == LIST_HEADER:
        return
    if out.suffix == ".jsonl":
        try:
            doc = json.loads(first)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and {"user", "rank", "item"} <= doc.keys():
            return
    raise ConfigError(f"--out {out}: exists and is not an earlier list of fedsocial recommend; not replaced "
                      "(remove it, or choose another path)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsocial recommend", description=__doc__.splitlines()[0])
    add_source_arguments(parser)
    parser.add_argument("--k", type=int, default=10, help="list length (default 10)")
    parser.add_argument("--out", required=True, help="output file: .jsonl (JSON Lines) or .csv")
    parser.add_argument("--users", nargs="+", default=None, help="only these users (default: all of the partner's)")
    parser.add_argument("--category", default=None, help="only items of this catalogue category (its code, or its "
                        "name where items.csv names the categories)")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.suffix not in (".jsonl", ".csv"):
            raise ConfigError(f"--out {out}: the file must end in .jsonl or .csv")
        if not 1 <= args.k <= MAX_K:  # before the model is loaded (a minute or more), as the service checks it
            raise ConfigError(f"--k: must be an integer in [1, {MAX_K}], got {args.k}")
        check_replaceable_output(out)  # before the model is loaded
        out.parent.mkdir(parents=True, exist_ok=True)  # a blocked --out fails before the model is loaded
        rec = load_recommender(source_from_args(args), args.calibration)
        users = list(rec.users) if args.users is None else [_partner_user(rec, u, args.partner) for u in args.users]
        rows = compute_rows(rec, users, args.k, args.category)
        write_text_atomic(out, format_rows(rows, out.suffix))
    except SERVING_ERRORS as exc:
        print(f"error: {compute_error_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(describe_calibration(rec), file=sys.stderr)
    print(f"{len(rows)} recommendations for {len(users)} users of {args.partner} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
