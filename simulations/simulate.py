"""``fedsocial simulate``: the Flower federation in-process (the same ServerApp and ClientApp as ``flwr run .``).

``fedsocial simulate --config configs/NAME.toml [--data-dir DIR] [--partners N] [--rounds R]
[--set section.key=value ...] [--resume DIR] --out DIR``

The run directory gets ``config.toml`` (the resolved config, which a resume reuses), ``metrics.json``
(with ``metrics_record.json``, the server's signature of it: what the driver adds, it re-signs),
``rounds.jsonl``, ``checkpoints/``, ``partners/<id>/`` (each partner's local state), ``ledgers/`` (DP)
and ``report.html``. ``run_simulation`` does not read ``[tool.flwr.app.config]``, so the settings reach
the apps as constructor arguments (the module-level apps read the same keys from the run config).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from fedsocial.shared.config import Config, ConfigError, load_config, resolve_data_dir
from fedsocial.simulations.common import format_table, user_errors
from fedsocial.simulations.preflight import run_preflight
from fedsocial.simulations.tracking import add_track_argument

METRIC_KEYS = ("recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20")
CONFIG_NAME = "config.toml"
# Sections that fix the data, the partition and the model: a resume must not change them.
FROZEN_SECTIONS = ("data", "split", "partition", "model", "train", "privacy", "secagg")


EXIT_NOTHING_TRAINED = 3


class FederationError(RuntimeError):
    """The federation ran but did not finish (a partner or the server failed); the log says why."""


def compute_why_untrained(doc: dict[str, Any]) -> str:
    """One line: why no partner's update went into the model (budget refusals, dropped replies, skips)."""
    rounds = doc.get("rounds", [])
    refused = sorted({p for r in rounds for p in r.get("budget_exhausted", [])})
    dropped = sorted({d.get("partner", "?") for r in rounds for d in r.get("dropped", [])})
    skipped = sum(1 for r in rounds if "skipped" in r)
    parts = [f"out of privacy budget: {', '.join(refused)}" if refused else "",
             f"replies dropped: {', '.join(dropped)}" if dropped else "",
             f"{skipped} rounds skipped by secure aggregation" if skipped else ""]
    return "; ".join(p for p in parts if p) or "no round completed"


def compute_outcome(doc: dict[str, Any]) -> tuple[int, str]:
    """The exit code of a finished run and its error line: a run where no partner trained is a failure."""
    if doc.get("partners_trained", ["?"]):  # every partner refused (budget) or was dropped, every round
        return 0, ""
    why = compute_why_untrained(doc)
    return EXIT_NOTHING_TRAINED, f"no partner trained in any round ({why}); the model is the initial one"


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: cannot write the non-finite value {value!r}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (JSON escapes are valid TOML escapes)
    raise ConfigError(f"{key}: cannot write a {type(value).__name__} to TOML")


def config_to_toml(cfg: Config) -> str:
    """Every field of ``cfg`` as TOML; :func:`shared.config.load_config` reads it back to an equal config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(f'{section}.{k}', v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def write_config(cfg: Config, run_dir: Path) -> Path:
    path = run_dir / CONFIG_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg), encoding="utf-8")
    if load_config(path) != cfg:  # the apps read this file: it must be exactly the config of record
        raise ConfigError(f"{path}: the written config does not read back identically")
    return path


def check_resumable(saved: Config, cfg: Config, run_dir: Path) -> None:
    """A resume may change rounds and federation settings, not what defines the data, model or privacy."""
    for section in FROZEN_SECTIONS:
        if getattr(saved, section) != getattr(cfg, section):
            raise ConfigError(f"{run_dir / CONFIG_NAME}: [{section}] differs from the run being resumed")
    if saved.federation.partners != cfg.federation.partners:
        raise ConfigError("federation.partners: a resumed run must keep its number of partners")


GPU_DEVICE_NODES = ("nvidiactl", "nvidia0", "kfd", "dxg")  # NVIDIA's driver, AMD ROCm, WSL 2's GPU bridge


def compute_gpu_possible(dev: Path = Path("/dev"), system: str = sys.platform) -> bool:
    """Whether torch could find a GPU here: on Linux only through a GPU driver's device node in ``dev``;
    macOS has no CUDA; elsewhere it cannot be told without asking torch (True)."""
    if system.startswith("linux"):
        return any((dev / name).exists() for name in GPU_DEVICE_NODES)
    return system != "darwin"


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray settings: one CPU per ClientApp actor, as many actors as cores, no dashboard, quiet workers.

    ``FEDSOCIAL_SIM_CPUS=N`` caps the actors (N = 1: partners train one after another, so the
    simulation uses one core and its wall time is comparable with the sum of the partners' fit times).
    """
    n_cpus = max(1, min(os.cpu_count() or 1, cfg.federation.partners))
    cap = os.environ.get("FEDSOCIAL_SIM_CPUS", "").strip()
    if cap:
        if not cap.isdigit() or int(cap) < 1:
            raise ConfigError(f"environment FEDSOCIAL_SIM_CPUS: expected a positive integer, got {cap!r}")
        n_cpus = min(n_cpus, int(cap))
    gpu = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and compute_gpu_possible())
    n_gpus = 0.0
    if gpu:  # torch's import is about 3 s before Ray starts: only where a GPU can be there
        import torch

        n_gpus = 1.0 / max(1, cfg.federation.partners) if torch.cuda.is_available() else 0.0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": n_gpus},
        "init_args": {"num_cpus": n_cpus, "include_dashboard": False, "log_to_driver": False,
                      "logging_level": "error"},
    }


def compute_straggler_note(cfg: Config, actors: int) -> str:
    """Why ``federation.straggler_grace`` would drop partners that are not late in a simulation ("": it will
    not): with fewer actors than partners they train one batch of actors after another, and those still
    queued when the grace ends miss the deadline."""
    fed = cfg.federation
    if fed.straggler_grace <= 0 or actors >= fed.partners:
        return ""
    return (f"federation.straggler_grace = {fed.straggler_grace:g} s: the simulation runs {fed.partners} partners on "
            f"{actors} actor(s), one group after another, so partners still queued {fed.straggler_grace:g} s after "
            f"{fed.min_partners} have answered miss the deadline and drop out of that round; set it to 0 for a "
            "simulation, or above a round's whole training time")


# What a start that failed before any round completed leaves in --out (the apps' own files only).
FAILED_START_LEFTOVERS = frozenset({CONFIG_NAME, "partners", "ledgers", "run_manifest.json", "server.pub", "server"})


def compute_failed_start(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a start that failed before any release left behind.

    No checkpoint, no metrics, no line in any ledger (a ledger line is a release or a refusal on
    record: that run must be resumed, never wiped), and nothing but the apps' own files.
    """
    if not run_dir.is_dir():
        return False
    names = {p.name for p in run_dir.iterdir()}
    if not names or names - FAILED_START_LEFTOVERS:
        return False
    return not compute_has_ledger_lines(run_dir)


def compute_has_ledger_lines(run_dir: Path) -> bool:
    """Whether any ledger of ``run_dir`` holds a line (a release or a refusal on record)."""
    ledgers = run_dir / "ledgers"
    return ledgers.is_dir() and any(f.stat().st_size > 0 for f in ledgers.glob("*.jsonl"))


def _clear_keeping_noise_keys(partners: Path) -> None:
    """Empty each partner folder but keep its DP noise secret: no release was made with it (no ledger line),
    and keeping it lets a partner (or a test) provision its secret before the first start."""
    for folder in partners.iterdir():
        if not folder.is_dir() or folder.is_symlink():
            folder.unlink()
            continue
        _clear_folder_keeping_noise_key(folder)
    if not any(partners.iterdir()):
        partners.rmdir()


def _clear_folder_keeping_noise_key(folder: Path) -> None:
    """Empty ``folder`` but its DP noise secret (a partner's, or the server's ``server/dp_noise.key``);
    remove it when nothing is left."""
    import shutil

    from fedsocial.shared.privacy.noise_key import NOISE_KEY

    for path in folder.iterdir():
        if path.name == NOISE_KEY and path.is_file() and not path.is_symlink():
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def clear_failed_start_inplace(run_dir: Path) -> None:
    """Remove a failed start's leftovers (see :func:`compute_failed_start`) so that --out is reusable."""
    import shutil

    for name in sorted(FAILED_START_LEFTOVERS):
        path = run_dir / name
        if name == "partners" and path.is_dir() and not path.is_symlink():
            _clear_keeping_noise_keys(path)
        elif name == "server" and path.is_dir() and not path.is_symlink():
            _clear_folder_keeping_noise_key(path)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class OneLineErrors(logging.Filter):
    """Flower logs a partner's failed ClientApp as whole Ray tracebacks (hundreds of lines per round), and a
    partner process that died as Ray's paragraph on the dead actor: keep one line with the partner's own error
    (or that its process died), once per distinct error, and Flower's header line once."""

    HEADER = "An exception was raised when processing a message by RayBackend"

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        from fedsocial.server.strategy import ACTOR_DIED_MARKERS, compute_failure_reason

        message = record.getMessage()
        if message == self.HEADER:  # the same line before each partner's failure: once says it
            if message in self.seen:
                return False
            self.seen.add(message)
            return True
        died = any(marker in message for marker in ACTOR_DIED_MARKERS)
        if not died and ("\n" not in message or not ("Traceback" in message or 'File "' in message)):
            return True
        reason = compute_failure_reason(message)
        if reason in self.seen:
            return False
        self.seen.add(reason)
        record.msg, record.args = f"a partner's ClientApp failed: {reason}", None
        return True


class RoundPrinter:
    """One line per completed round: metrics, replies, privacy, time."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled

    def __call__(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"round {rec['round']}/{self.total}"]
        parts += [f"{k} {rec[k]:.4f}" for k in ("ndcg@10", "recall@10") if k in rec]
        parts.append(f"partners {len(rec.get('accepted', []))} ok")
        if rec.get("dropped"):
            parts.append(f"{len(rec['dropped'])} dropped")
        if rec.get("budget_exhausted"):
            parts.append(f"{len(rec['budget_exhausted'])} out of budget")
        if "skipped" in rec:
            parts.append("not aggregated (the reason is in rounds.jsonl)")
        if "epsilon_max" in rec:
            parts.append(f"eps {rec['epsilon_max']:.3f}")
        parts.append(f"{rec.get('round_time_s', 0.0):.1f} s")
        print("  ".join(parts), file=sys.stderr, flush=True)


def run_simulation_from_config(cfg: Config, data_dir: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str],
                               resume: bool = False, progress: bool = True, *, stop_after: int = 0,
                               client_mods: list[Any] | None = None, track: str = "none") -> dict[str, Any]:
    """Run (or resume) the federation of ``cfg`` in-process; writes the run directory, returns metrics.json.

    ``stop_after`` > 0 ends the run after that round as an interruption would (resume it later);
    ``client_mods`` are extra Flower mods placed outermost in every ClientApp (e.g. an egress recorder).
    """
    from flwr.simulation import run_simulation

    from fedsocial.client.flower import make_client_app
    from fedsocial.server.app import make_server_app
    from fedsocial.server.checkpoint import latest_checkpoint
    from fedsocial.shared.privacy.records import METRICS_RECORD, RecordError, resign_metrics
    from fedsocial.simulations.quiet import quiet_simulation_notices
    from fedsocial.simulations.ray_runtime import ensure_ray_inplace
    from fedsocial.simulations.reaper import start_reaper
    from fedsocial.simulations.tracking import TrackedRounds, compute_final_scalars, make_tracker

    quiet_simulation_notices()  # Ray's FutureWarning and Flower's run_simulation banner (see quiet.py)
    t0 = time.perf_counter()
    run_dir = Path(out_dir).resolve()
    metrics_path = run_dir / "metrics.json"
    before = 0.0  # wall time of earlier processes of this run (a resume adds to it)
    run_preflight(cfg, data_dir)  # data and config mistakes: one line and exit 2, before Ray starts
    if resume and latest_checkpoint(run_dir) is None and compute_failed_start(run_dir):
        resume = False  # a start that failed before any release: nothing to continue, start afresh
    if not resume and run_dir.is_dir() and compute_failed_start(run_dir):
        clear_failed_start_inplace(run_dir)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if not (run_dir / CONFIG_NAME).is_file():
            raise ConfigError(f"--resume {run_dir}: no {CONFIG_NAME} there, so no run to resume")
        if ckpt is None and not compute_has_ledger_lines(run_dir):  # e.g. a `fedsocial train` run folder
            raise ConfigError(f"--resume {run_dir}: no federated round to continue there (no checkpoints/, no "
                              "ledger entry); it is not a simulation run: start one with --config and a new --out")
        # no checkpoint yet: a start that failed after a partner's release; resume from round 0, the
        # partners' ledgers and saved releases carry what was charged
        check_resumable(load_config(run_dir / CONFIG_NAME), cfg, run_dir)
        from fedsocial.shared.privacy.round import check_resume

        check_resume(run_dir, ckpt.round if ckpt is not None else 0, cfg)  # released rounds keep their settings
        if metrics_path.is_file():
            before = float(json.loads(metrics_path.read_text(encoding="utf-8")).get("simulation_wall_time_s", 0.0))
        if ckpt is not None and ckpt.round >= cfg.federation.rounds and metrics_path.is_file() \
                and (run_dir / METRICS_RECORD).is_file():  # else the ServerApp rebuilds and signs it
            print(f"{run_dir}: already complete ({ckpt.round} of {cfg.federation.rounds} rounds)", file=sys.stderr)
            return json.loads(metrics_path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    config_path = write_config(cfg, run_dir)
    settings = {"config-path": str(config_path), "data-dir": str(resolve_data_dir(data_dir).resolve()),
                "run-dir": str(run_dir), "resume": bool(resume), "stop-after": int(stop_after)}
    tracker = make_tracker(track, run_dir)  # --track: TensorBoard events under RUN/tensorboard (tracking.py)
    tracker.log_config(cfg.to_dict())
    printer = TrackedRounds(RoundPrinter(cfg.federation.rounds, progress), tracker)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # our per-round line replaces Flower's INFO chatter
    one_line = OneLineErrors()
    flwr_logger.addFilter(one_line)
    ray_config = backend_config(cfg)
    note = compute_straggler_note(cfg, int(ray_config["init_args"]["num_cpus"]))
    if note:
        print(f"warning: {note}", file=sys.stderr)
    start_reaper()  # Ray's agents outlive a SIGKILLed driver: its watcher stops them (reaper.py)
    ensure_ray_inplace(ray_config["init_args"])  # inside kept_ray_runtime() only (tests, grids): one Ray for all runs
    try:
        run_simulation(server_app=make_server_app(settings, printer), client_app=make_client_app(settings, client_mods),
                       num_supernodes=cfg.federation.partners, backend_config=ray_config)  # type: ignore[arg-type]
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(one_line)
    if not metrics_path.is_file():
        raise FederationError(f"the federation ended without writing {metrics_path} (see the log above)")
    doc: dict[str, Any] = json.loads(metrics_path.read_text(encoding="utf-8"))
    from fedsocial.shared.privacy.evaluation import merge_local_evaluations_inplace, merge_local_fit_times_inplace

    merge_local_evaluations_inplace(doc, run_dir / "partners")  # DP: evaluations stay on partners; we play them all
    merge_local_fit_times_inplace(doc, run_dir / "partners")  # likewise the training loss and time
    doc["simulation_wall_time_s"] = before + time.perf_counter() - t0  # over all processes of this run
    fit = float(doc.get("partner_fit_time_s", 0.0))
    work = fit + float(doc.get("partner_eval_time_s", 0.0))
    doc["federation_overhead"] = doc["simulation_wall_time_s"] / fit if fit > 0 else None
    doc["federation_overhead_incl_eval"] = doc["simulation_wall_time_s"] / work if work > 0 else None
    if cfg.federation.compare_alone:  # each partner alone, non-private, same budget (compare_alone.py)
        from fedsocial.simulations.compare_alone import add_alone_metrics_inplace

        add_alone_metrics_inplace(doc, cfg, str(settings["data-dir"]), run_dir)
    try:  # the driver plays the server's operator: what it adds is re-signed with the run's server key
        resign_metrics(run_dir, doc, "simulate")
    except RecordError as exc:
        raise FederationError(f"{metrics_path}: cannot re-sign it: {exc}") from None
    from fedsocial.simulations.report import write_report

    write_report(run_dir, doc)
    tracker.log_scalars(compute_final_scalars(doc), int(doc.get("rounds_completed") or cfg.federation.rounds))
    tracker.close()
    return doc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsocial simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="TOML config, e.g. configs/demo.toml "
                        "(default with --resume: the run's own config.toml)")
    parser.add_argument("--data-dir", default=None,
                        help="folder that dataset paths are relative to (default: $FEDSOCIAL_DATA_DIR or ./data)")
    parser.add_argument("--partners", type=int, default=None, help="number of partners (federation.partners)")
    parser.add_argument("--rounds", type=int, default=None, help="number of rounds (federation.rounds)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key with a typed value (repeatable)")
    parser.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its last round")
    parser.add_argument("--out", default=None, help="run directory (required unless --resume)")
    add_track_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no per-round lines")
    parser.add_argument("--compare-alone", action="store_true",
                        help="also train each partner alone, non-private, same budget (federation.compare_alone)")
    return parser


def config_from_cli(args: argparse.Namespace) -> tuple[Config, Path, bool]:
    if args.resume and args.out and Path(args.resume).resolve() != Path(args.out).resolve():
        raise ConfigError("--resume DIR and --out DIR must name the same run directory")
    run_dir = Path(args.resume or args.out or "")
    if not (args.resume or args.out):
        raise ConfigError("--out DIR is required (or --resume DIR)")
    extra = list(args.overrides)
    if args.partners is not None:
        extra.append(f"federation.partners={args.partners}")
        if args.partners < 2:
            extra.append("federation.min_partners=1")
    if args.rounds is not None:
        extra.append(f"federation.rounds={args.rounds}")
    if getattr(args, "compare_alone", False):
        extra.append("federation.compare_alone=true")
    if args.config is None and not args.resume:
        raise ConfigError("--config is required (or --resume DIR)")
    source = args.config if args.config is not None else run_dir / CONFIG_NAME
    cfg = load_config(source, extra)
    if cfg.federation.min_partners > cfg.federation.partners:
        raise ConfigError(f"federation.min_partners {cfg.federation.min_partners} exceeds federation.partners "
                          f"{cfg.federation.partners}")
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()) and not compute_failed_start(run_dir):
        raise ConfigError(f"--out {run_dir}: not empty; choose a new folder, or --resume {run_dir}")
    return cfg, run_dir, bool(args.resume)


def summary(doc: dict[str, Any], run_dir: Path) -> str:
    rows = [(k, f"{doc[k]:.4f}") for k in METRIC_KEYS]
    if "epsilon" in doc:
        rows.append(("epsilon", f"{doc['epsilon']:.3f} (delta {doc['delta']:g}, max over partners)"))
    rows.append(("rounds", str(doc.get("rounds_completed"))))
    rows.append(("wall time", f"{doc['simulation_wall_time_s']:.1f} s (federation {doc['federation_time_s']:.1f} s, "
                              f"partners' training {doc['partner_fit_time_s']:.1f} s)"))
    if doc.get("federation_overhead") is not None:  # metrics.json keeps both ratios
        incl = doc.get("federation_overhead_incl_eval")
        rows.append(("overhead", f"{doc['federation_overhead']:.2f} x the partners' training"
                                 + (f" ({incl:.2f} x with their evaluation)" if incl is not None else "")))
    rows.append(("run folder", str(run_dir)))
    return format_table(rows, title="federated test metrics (weighted over partners' test users)")


@user_errors
def main(argv: list[str] | None = None) -> int:
    from fedsocial.server.checkpoint import CheckpointError
    from fedsocial.server.strategy import QuorumError

    args = build_parser().parse_args(argv)
    try:
        cfg, run_dir, resume = config_from_cli(args)
        from fedsocial.simulations.init_cmd import dp_advice_line

        advice = dp_advice_line(cfg)  # DP turned on for a non-private config: say which keys to change
        if advice:
            print(advice, file=sys.stderr)
        doc = run_simulation_from_config(cfg, args.data_dir, run_dir, resume=resume, progress=not args.no_progress,
                                         track=args.track)
    except (QuorumError, CheckpointError, FederationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(doc, run_dir))
    code, message = compute_outcome(doc)
    if message:
        print(f"error: {message}", file=sys.stderr)
    return code
