"""Real-size partners (issue 14, item 5): one DP federated round as the users per partner grow.

``fedsocial bench scale --users-per-partner 10000 50000 200000 [--partners 5] [--items 100000]
[--config configs/scale_round.toml] [--set section.key=value ...] [--cpus N] [--timeout S] --out DIR [--json]``

For each size it runs the real path, ``fedsocial simulate`` (Flower's simulation on Ray: preflight,
each partner generating, splitting and partitioning the data, one round of DP local training,
aggregation, federated evaluation, ledgers), as a child process, and measures from outside:

- wall time of the whole command;
- peak memory of the whole process tree (the driver, Ray's raylet / GCS / agents and the ClientApp
  actors), polled from ``/proc`` every ``--poll`` seconds: the peak of the summed RSS (counts shared
  pages, such as torch's libraries, once per process: an upper bound) and of the summed PSS (shared
  pages split between the processes that map them: what the tree really holds);
- CPU seconds of the tree (user + system of every process seen, at its last sample), which does not
  count other people's jobs on a shared machine;
- what ``metrics.json`` says: the partners' training and evaluation seconds, epsilon, NDCG@10.

Each size prints one JSON line as it finishes; the last line is the whole result, with each figure's
growth relative to the first size. A size's run folder is ``DIR/users_N`` (``N`` users per partner).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsocial.shared.config import ConfigError, load_config
from fedsocial.shared.fileio import write_json_atomic
from fedsocial.simulations.common import user_errors
from fedsocial.simulations.proctree import compute_descendants, compute_running, read_process_table, stop_processes

DEFAULT_CONFIG = "configs/scale_round.toml"
STEPS_PER_EPOCH = 100  # batch = users per partner / 100: Poisson rate 0.01 at every size
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def compute_scale_overrides(users_per_partner: int, partners: int, items: int) -> list[str]:
    """The ``--set`` overrides of one size: the data set, the partners and the batch (q = 1 / 100)."""
    if users_per_partner < STEPS_PER_EPOCH:
        raise ConfigError(f"--users-per-partner: {users_per_partner} is below {STEPS_PER_EPOCH} (the batch is "
                          f"users per partner / {STEPS_PER_EPOCH})")
    batch = users_per_partner // STEPS_PER_EPOCH
    return [f"data.n_users={users_per_partner * partners}", f"data.n_items={items}",
            f"federation.partners={partners}", f"federation.min_partners={partners}",
            f"train.batch_size={batch}", f"federation.local_batch_size={batch}"]


def parse_smaps_rollup(text: str) -> tuple[int, int]:
    """(RSS, PSS) in kB from ``/proc/PID/smaps_rollup``."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0])
    return values.get("Rss", 0), values.get("Pss", 0)


def read_memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) kB of one process; (0, 0) once it has ended."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as fh:
            return parse_smaps_rollup(fh.read())
    except (OSError, ValueError):
        try:  # smaps_rollup needs a newer kernel: RSS from statm, PSS unknown (taken as RSS)
            with open(f"/proc/{pid}/statm", encoding="utf-8") as fh:
                rss = int(fh.read().split()[1]) * PAGE_KB
            return rss, rss
        except (OSError, ValueError, IndexError):
            return 0, 0


@dataclass
class TreeSampler:
    """Polls the memory and CPU time of a process tree in a background thread until :meth:`stop`."""

    root: int
    interval: float = 0.5
    peak_rss_kb: int = 0
    peak_pss_kb: int = 0
    peak_processes: int = 0
    peak_at_s: float = 0.0
    cpu_s: dict[int, float] = field(default_factory=dict)  # last CPU seconds seen per pid
    seen: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def sample(self) -> None:
        table = read_process_table()
        tree = compute_descendants({pid: ppid for pid, (ppid, _) in table.items()}, self.root) & table.keys()
        self.seen |= tree
        rss = pss = 0
        for pid in tree:
            self.cpu_s[pid] = table[pid][1]
            r, p = read_memory_kb(pid)
            rss, pss = rss + r, pss + p
        if pss > self.peak_pss_kb:
            self.peak_pss_kb, self.peak_at_s = pss, time.perf_counter() - self._t0
        self.peak_rss_kb, self.peak_processes = max(self.peak_rss_kb, rss), max(self.peak_processes, len(tree))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> TreeSampler:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def live(self) -> list[int]:
        """Processes of the tree still running (for a clean stop after a timeout)."""
        return sorted(pid for pid in self.seen if compute_running(pid))


def run_point(config: str, users_per_partner: int, partners: int, items: int, overrides: list[str],
              out: Path, cpus: int, timeout_s: float, poll_s: float, data_dir: str | None) -> dict[str, Any]:
    """One size: ``fedsocial simulate`` as a child process, measured from outside (see the module docstring)."""
    run_dir = out / f"users_{users_per_partner}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: already holds a run; remove it or choose another --out")
    sets = [*compute_scale_overrides(users_per_partner, partners, items), *overrides]
    load_config(config, sets)  # a bad --set is one line here, not a child's traceback
    cmd = [sys.executable, "-m", "fedsocial.simulations.cli", "simulate", "--config", config, "--out", str(run_dir)]
    cmd += [*(["--data-dir", data_dir] if data_dir else []), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "FEDSOCIAL_SIM_CPUS": str(cpus), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_HOME": os.environ.get("FLWR_HOME", str(Path(".flwr").resolve()))}
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"users_{users_per_partner}.log"
    load = os.getloadavg()[0]
    with open(log_path, "w", encoding="utf-8") as log:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(child.pid, poll_s).start()
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        wall = time.perf_counter() - t0
        sampler.stop()
        if code is None:
            stop_processes(sampler.live())
            child.wait()
        left = sampler.live()  # Ray's processes must not outlive the run they belong to (a few s to exit)
        for _ in range(100):
            if not left:
                break
            time.sleep(0.1)
            left = sampler.live()
    point: dict[str, Any] = {
        "users_per_partner": users_per_partner, "users": users_per_partner * partners, "items": items,
        "partners": partners, "batch_size": users_per_partner // STEPS_PER_EPOCH, "cpus": cpus,
        "exit_code": code, "timed_out": code is None, "wall_s": wall,
        "peak_pss_gb": sampler.peak_pss_kb / 2**20, "peak_rss_gb": sampler.peak_rss_kb / 2**20,
        "peak_at_s": sampler.peak_at_s, "peak_processes": sampler.peak_processes,
        "tree_cpu_s": sum(sampler.cpu_s.values()), "processes_left": len(left), "load_average_at_start": load,
        "run_dir": str(run_dir), "log": str(log_path)}
    metrics_path = run_dir / "metrics.json"
    if code == 0 and metrics_path.is_file():
        doc = json.loads(metrics_path.read_text(encoding="utf-8"))
        keep = ("simulation_wall_time_s", "federation_time_s", "partner_fit_time_s", "partner_eval_time_s",
                "epsilon", "delta", "ndcg@10", "recall@10", "rounds_completed")
        point.update({k: doc[k] for k in keep if k in doc})
    return point


def compute_growth(points: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, list[float]]:
    """Each figure of each size divided by the first size's (the users per partner grow by the same key)."""
    growth: dict[str, list[float]] = {}
    for key in ("users_per_partner", *keys):
        if all(isinstance(p.get(key), (int, float)) and p.get(key) for p in points):
            growth[key] = [float(p[key]) / float(points[0][key]) for p in points]
    return growth


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsocial bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users-per-partner", type=int, nargs="+", default=[10000, 50000, 200000])
    parser.add_argument("--partners", type=int, default=5)
    parser.add_argument("--items", type=int, default=100000)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--cpus", type=int, default=max(1, min(os.cpu_count() or 1, 2)),
                        help="FEDSOCIAL_SIM_CPUS: partner processes at once (default: the cores, at most 2)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per size before it is stopped")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--out", default="runs/bench_scale")
    parser.add_argument("--json", action="store_true", help="the final object on one line")


def run(args: argparse.Namespace) -> int:
    if args.partners < 1 or args.items < 2 or args.cpus < 1 or args.timeout <= 0 or args.poll <= 0:
        raise ConfigError("--partners, --items (>= 2), --cpus, --timeout and --poll must be positive")
    out, points = Path(args.out), []
    for n in args.users_per_partner:
        point = run_point(args.config, n, args.partners, args.items, args.overrides, out, args.cpus, args.timeout,
                          args.poll, args.data_dir)
        points.append(point)
        print(json.dumps(point), flush=True)
        if point["exit_code"] != 0:
            break  # a larger size would not do better; the log says why this one failed
    result = {"config": args.config, "overrides": args.overrides, "points": points,
              "growth": compute_growth(points, ("wall_s", "peak_pss_gb", "peak_rss_gb", "tree_cpu_s",
                                                "partner_fit_time_s", "partner_eval_time_s"))}
    write_json_atomic(out / "scale.json", result)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
    return 0 if all(p["exit_code"] == 0 for p in points) else 1


@user_errors
def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main(None))
