"""End-to-end deployment check (``make e2e``): real Flower processes on loopback.

What it runs, in one work folder (default ``runs/e2e``), every process stopped by PID at the end:

1. ``fedsocial partition`` of a small synthetic config into 3 partner folders, ``fedsocial certs``
   and ``fedsocial keys`` (3 partners and one unregistered "rogue" key);
2. a SuperLink with TLS, SuperNode authentication and a state database, on free ports; the 3
   partners' public keys registered with ``flwr supernode register``;
3. 3 SuperNodes, each with its own partner folder, and, started with them, two that must be refused:
   one with the unregistered key, one without TLS (each exits non-zero, none comes online);
4. ``flwr run`` of a 2-round federation with DP and SecAgg+ during whose second round one SuperNode is
   killed: it must still finish with the other two (quorum 2), the killed partner's ledger must still
   verify, and ``fedsocial audit`` of the partners' ledgers must pass, holding each partner to the cap
   it declared (the server's signed manifest); in copies of the run, a signed ledger entry over the
   cap must exit 4 and a deleted ledger must fail.

Independent commands run side by side and the ``flwr`` CLI (a Python start-up per call) is polled
only when a cheap sign (a log line, a file) says the state may have changed, so that the harness does
not take a core from the federation it watches (``make e2e``, docs/BENCHMARKS.md section 9.8).

Flower's own processes detach some children into new sessions (SuperExec), so stopping walks the
process tree from ``/proc`` and signals every descendant as well as the process group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsocial.simulations.proctree import children_of, compute_running

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "fedsocial-e2e"
SUPEREXEC_POLL_S = 0.2


class E2EError(RuntimeError):
    """A deployment step did not behave as required (the message says which and where the log is)."""


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port that is free on loopback right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


@dataclass
class Cluster:
    """Owns every process it starts; :meth:`stop_all` (also on exit) stops them and their children."""

    work: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as fh:
            popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=self.work, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, grace: float = 8.0) -> None:
        """Signal the process, its group and all its descendants; SIGKILL whatever outlives ``grace``."""
        kids = children_of(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        _signal([proc.pid, *kids], sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.popen.poll() is None or any(compute_running(k) for k in kids)):
            time.sleep(0.1)
        kids = sorted(set(kids) | set(children_of(proc.pid)))
        if proc.popen.poll() is None or any(compute_running(k) for k in kids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            _signal([proc.pid, *kids], signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()

    def run(self, argv: Sequence[str], timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A short command (flwr CLI, fedsocial): its own session, killed with its children on timeout."""
        popen = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=self.env, cwd=self.work, start_new_session=True)
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(Proc(Path(argv[0]).name, popen, self.work / "logs" / "none"), grace=2)  # type: ignore[arg-type]
            raise E2EError(f"{shlex.join(argv)}: no answer within {timeout:.0f} s") from None
        res = subprocess.CompletedProcess(list(argv), popen.returncode, out, err)
        if check and res.returncode != 0:
            raise E2EError(f"{shlex.join(argv)} exited with {res.returncode}:\n{out[-2000:]}\n{err[-2000:]}")
        return res

    def run_many(self, argvs: Sequence[Sequence[str]], timeout: float = 120.0,
                 check: bool = True) -> list[subprocess.CompletedProcess[str]]:
        """Independent short commands at the same time (most of their time is Python start-up and
        imports, which two cores run side by side), each as :meth:`run`; results in order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(argvs))) as pool:
            futures = [pool.submit(self.run, argv, timeout, check) for argv in argvs]
            return [f.result() for f in futures]


@contextlib.contextmanager
def cluster(work: Path, env: dict[str, str]) -> Iterator[Cluster]:
    """A :class:`Cluster` whose processes are stopped whatever happens (errors, Ctrl-C, SIGTERM)."""
    c = Cluster(work, env)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        yield c
    finally:
        c.stop_all()
        signal.signal(signal.SIGTERM, previous)


def wait_for(what: str, cond: Any, timeout: float, proc: Proc | None = None, every: float = 0.5,
             hint: Any = None, slow_every: float = 5.0) -> Any:
    """Poll ``cond()`` until truthy; fail naming ``what`` (and the log of ``proc`` if it died).

    ``hint``: a cheap check (a file, a log line) that ``cond`` may now hold. When given, ``cond`` (a
    ``flwr`` CLI call: a Python process start, about a CPU second) runs only when ``hint()`` is true or
    ``slow_every`` seconds after its last call, so polling does not take a core from the federation.
    """
    deadline = time.monotonic() + timeout
    last = -math.inf
    while time.monotonic() < deadline:
        if hint is None or hint() or time.monotonic() - last >= slow_every:
            last = time.monotonic()
            value = cond()
            if value:
                return value
        if proc is not None and proc.popen.poll() is not None:
            raise E2EError(f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}:\n{proc.tail()}")
        time.sleep(every)
    tail = f"\n{proc.name} log ({proc.log}):\n{proc.tail()}" if proc is not None else ""
    raise E2EError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


# ----------------------------------------------------------------------------------------------
# Flower deployment steps
# ----------------------------------------------------------------------------------------------

def flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    # Each SuperExec (one beside the SuperLink, one per SuperNode) asks for a new task every second by
    # default before it starts the ClientApp / ServerApp process: a fifth of that per message hop.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_S))
    return env


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection (TLS verified against our CA)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
                    f'root-certificates = "{root_certificates.resolve()}"\n', encoding="utf-8")
    return path


def superlink_argv(certs: Path, port: int, database: Path) -> list[str]:
    return [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth", "--database", str(database),
            "--host", "127.0.0.1", "--port", str(port)]


def format_node_config(values: dict[str, Any]) -> str:
    from fedsocial.simulations.partition_cmd import format_node_config as fmt

    return fmt(values)


def supernode_argv(superlink: str, port: int, *, ca: Path | None, key: Path | None,
                   node_config: dict[str, Any] | None = None, max_wait: float | None = None) -> list[str]:
    argv = [str(BIN / "flower-supernode"), "--superlink", superlink, "--port", str(port)]
    argv += ["--root-certificates", str(ca)] if ca is not None else ["--insecure"]
    if key is not None:
        argv += ["--auth-supernode-private-key", str(key)]
    if node_config:
        argv += ["--node-config", format_node_config(node_config)]
    if max_wait is not None:
        argv += ["--max-retries", "3", "--max-wait-time", f"{max_wait:g}"]
    return argv


def register(c: Cluster, public_key: Path, name: str) -> int:
    """``flwr supernode register KEY.pub CONNECTION``; returns the node id the SuperLink assigned."""
    return register_all(c, [(public_key, name)])[0]


def register_all(c: Cluster, keys: Sequence[tuple[Path, str]]) -> list[int]:
    """:func:`register` for several (public key, name) pairs at once; the node ids in order."""
    results = c.run_many([[str(BIN / "flwr"), "supernode", "register", str(key), CONNECTION, "--name", name,
                           "--format", "json"] for key, name in keys])
    return [int(_last_json(res.stdout)["node-id"]) for res in results]


ACTIVATED = '/v1/fleet/activate-node HTTP/1.1" 200'


def count_activations(superlink: Proc) -> int:
    """SuperNodes the SuperLink's access log shows activated (a cheap hint before ``flwr supernode list``)."""
    return superlink.log.read_text(errors="replace").count(ACTIVATED)


def list_nodes(c: Cluster) -> list[dict[str, Any]]:
    res = c.run([str(BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"], check=False)
    if res.returncode != 0:
        return []
    nodes = _last_json(res.stdout).get("nodes", [])
    return list(nodes)


def online_nodes(c: Cluster) -> set[int]:
    return {int(n["node-id"]) for n in list_nodes(c) if n.get("status") == "online"}


def _last_json(text: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` command prints (after any banner lines)."""
    start = text.find("{")
    if start < 0:
        raise E2EError(f"no JSON in flwr output:\n{text[-2000:]}")
    return dict(json.loads(text[start:]))


def flwr_run(c: Cluster, app: Path, run_config: dict[str, Any]) -> int:
    """``flwr run APP CONNECTION --run-config ...``; returns the run id."""
    argv = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--format", "json"]
    if run_config:
        argv += ["--run-config", format_node_config(run_config)]
    res = c.run(argv, timeout=180)
    return int(_last_json(res.stdout)["run-id"])


def run_status(c: Cluster, run_id: int) -> dict[str, Any]:
    res = c.run([str(BIN / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], check=False)
    if res.returncode != 0:
        return {}
    runs = _last_json(res.stdout).get("runs", [])
    return dict(runs[0]) if runs else {}


# ----------------------------------------------------------------------------------------------
# the scenario
# ----------------------------------------------------------------------------------------------

# Small and quick: 2 rounds, 1 local epoch, DP on (fixed schedule), SecAgg+ on.
E2E_OVERRIDES = [
    "data.n_users=150", "data.n_items=200", "data.interactions_per_user=10.0", "data.friends_per_user=4.0",
    "federation.rounds=2", "federation.local_epochs=1", "federation.partners=3", "federation.min_partners=2",
    "privacy.enabled=true", "privacy.epochs=2", "train.epochs=2", "train.batch_size=25",
    "secagg.enabled=true", "model.dim=16", "model.num_negatives=16",
    # the straggler deadline: the round with the killed partner closes 15 s after the other two answered,
    # where the SuperLink's offline verdict takes 36-60 s (a ClientApp start-up is about 3.5 s of skew)
    "federation.straggler_grace=15",
]
NODE_REFUSED = "No SuperNode found with the given public key"


@dataclass
class Timings:
    t0: float = field(default_factory=time.monotonic)
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.t0))
        print(f"[e2e {self.marks[-1][1]:6.1f} s] {what}", flush=True)


def fedsocial(*args: str) -> list[str]:
    return [str(BIN / "fedsocial"), *args]


def round_train_messages(log: Path, round_: int) -> int:
    """How many train messages of ``round_`` a SuperNode has received (its log has one block per
    message, headed ``[RUN <id>, ROUND <r>]``)."""
    blocks = log.read_text(errors="replace").split("[RUN ")[1:]
    return sum(1 for b in blocks if f"ROUND {round_}]" in b[:60] and "Receiving: train message" in b[:300])


def expect_refused(c: Cluster, procs: dict[str, Proc], superlink: Proc, markers: dict[str, str],
                   registered: set[int], timeout: float = 60.0) -> list[str]:
    """SuperNodes (already started, side by side with the real ones to save time) that must fail to
    connect: each exits non-zero, no node outside the ``registered`` ones shows up online, and the
    SuperLink log shows the refusals named in ``markers``."""
    out = []
    for name, proc in procs.items():
        wait_for(f"{name} to give up", lambda proc=proc: proc.popen.poll() is not None, timeout)
        if proc.popen.returncode == 0:
            raise E2EError(f"{name}: expected to be refused, but exited 0:\n{proc.tail()}")
        reason = next((ln.strip() for ln in reversed(proc.tail(40).splitlines()) if ln.startswith("[code")
                       or "Failed" in ln or "disconnected" in ln), "")
        out.append(f"{name} refused (exit {proc.popen.returncode}: {reason})")
    intruders = online_nodes(c) - registered
    if intruders:
        raise E2EError(f"a refused SuperNode came online: {sorted(intruders)}")
    for name, marker in markers.items():
        if marker not in superlink.log.read_text(errors="replace"):
            raise E2EError(f"{name}: the SuperLink log does not show the refusal ({marker!r})")
    return out


def collect_ledgers(partners: Path, n: int, dest: Path) -> None:
    """What an auditor receives from the partners: each ledger and its public key, in one folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in range(n):
        pid = f"partner_{p}"
        shutil.copy2(partners / pid / "ledger" / f"{pid}.jsonl", dest / f"{pid}.jsonl")
        shutil.copy2(partners / pid / "keys" / "ledger_signing.pub", dest / f"{pid}.pub")


def verify_partner_ledgers(partners: Path, n: int) -> dict[str, int]:
    """verify_ledger on every partner's own ledger with its own public key; entries per partner."""
    from fedsocial.shared import signing
    from fedsocial.shared.privacy.ledger import read_ledger, verify_ledger

    counts = {}
    for p in range(n):
        folder = partners / f"partner_{p}"
        pid = f"partner_{p}"
        entries = read_ledger(folder / "ledger" / f"{pid}.jsonl")
        key = signing.load_public_key(folder / "keys" / "ledger_signing.pub")
        problems = verify_ledger(entries, key, partner_id=pid)
        if problems:
            raise E2EError(f"{pid}: ledger does not verify: {problems}")
        counts[pid] = len(entries)
    return counts


APP_FILES = ("pyproject.toml", "fedsocial", "client", "server", "shared", "simulations", "configs")


def copy_app(dest: Path) -> Path:
    """A copy of the Flower app to ``flwr run``: Flower 1.42's ``flwr run APP`` migrates a legacy
    ``[tool.flwr.federations]`` table by rewriting ``APP/pyproject.toml``, which must not touch the repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in APP_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            symlinks=True)  # fedsocial/<name> are links to the top-level folders
        else:
            shutil.copy2(src, dest / name)
    return dest


def run_scenario(work: Path, kill: bool = True, app: Path | None = None) -> dict[str, Any]:
    """The whole deployment check (module docstring); returns a summary with timings."""
    tm = Timings()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    flwr_home, partners, certs_dir = work / "flwr_home", work / "partners", work / "certs"
    env = flwr_env(flwr_home)
    summary: dict[str, Any] = {"work": str(work)}
    with cluster(work, env) as c:
        # independent set-up commands side by side (each is mostly a Python start-up)
        c.run_many([fedsocial("partition", "--config", str(REPO / "configs" / "demo.toml"),
                              *[a for s in E2E_OVERRIDES for a in ("--set", s)], "--partners", "3",
                              "--out", str(partners)),
                    fedsocial("certs", "--out", str(certs_dir), "--hosts", "localhost,127.0.0.1"),
                    fedsocial("keys", "--partner", "rogue", "--out", str(work / "rogue"), "--no-ledger-key")])
        c.run_many([fedsocial("keys", "--partner", f"partner_{p}", "--out", str(partners / f"partner_{p}" / "keys"))
                    for p in range(3)])  # into the partner folders the partition made
        tm.mark("partitioned; certificates and keys made")

        port = free_port()
        address = f"127.0.0.1:{port}"
        write_connection(flwr_home, CONNECTION, address, certs_dir / "ca.crt")
        sl = c.start("superlink", superlink_argv(certs_dir, port, work / "superlink-state.db"))
        wait_for("the SuperLink to listen", lambda: "Uvicorn running" in sl.log.read_text(errors="replace"), 60, sl)
        ids = register_all(c, [(partners / f"partner_{p}" / "keys" / "supernode.key.pub", f"partner_{p}")
                               for p in range(3)])
        nodes = {nid: p for p, nid in enumerate(ids)}
        tm.mark(f"SuperLink on {address} (TLS, node auth, database); registered nodes {sorted(nodes)}")

        # The refused attempts and the three real SuperNodes start together: a refused node would show up
        # online under an id outside the registered ones, which expect_refused checks.
        ca = certs_dir / "ca.crt"
        attempts = {name: c.start(name, argv) for name, argv in {
            "rogue-supernode": supernode_argv(address, free_port(), ca=ca, key=work / "rogue" / "supernode.key",
                                              max_wait=8),
            "plaintext-supernode": supernode_argv(address, free_port(), ca=None, key=None, max_wait=8),
        }.items()}
        from fedsocial.simulations.partition_cmd import node_config

        sns = [c.start(f"supernode-partner_{p}",
                       supernode_argv(address, free_port(), ca=ca,
                                      key=partners / f"partner_{p}" / "keys" / "supernode.key",
                                      node_config=node_config(partners / f"partner_{p}" / "partner.toml")))
               for p in range(3)]
        wait_for("3 SuperNodes online", lambda: online_nodes(c) >= set(nodes), 90, sl,
                 hint=lambda: count_activations(sl) >= 3)
        tm.mark("3 SuperNodes online")

        def check_refusals() -> None:  # while the run's first round starts: a refused node exits within seconds
            summary["refusals"] = expect_refused(c, attempts, sl, {"rogue-supernode": NODE_REFUSED}, set(nodes))
            tm.mark("; ".join(summary["refusals"]))

        # One 2-round run: round 1 with all three partners; partner_2 is SIGKILLed while it trains in
        # round 2, which must still complete with the other two (quorum 2). Two separate runs would
        # cost twice the ClientApp start-ups (a fresh process per message) and not fit in 10 minutes.
        run_dir = work / "run"
        app = app if app is not None else copy_app(work / "app")
        victim = sns[2] if kill else None
        pins = ",".join(f"partner_{p}={nid}" for nid, p in sorted(nodes.items(), key=lambda kv: kv[1]))
        summary["run"] = federated_run(c, app, partners / "federation.toml", run_dir, tm,
                                       "federated run", victim=victim, cluster_=c, after_submit=check_refusals,
                                       partner_nodes=pins)  # each registered key's node is one partner
        rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line]
        summary["accepted"] = {r["round"]: r["accepted"] for r in rounds}
        summary["missed_deadline"] = {r["round"]: r["missed_deadline"] for r in rounds if r.get("missed_deadline")}
        tm.mark(f"rounds' records: accepted {summary['accepted']}, missed the straggler deadline "
                f"{summary['missed_deadline'] or 'none'}")
        if sorted(summary["accepted"].get(1, [])) != ["partner_0", "partner_1", "partner_2"]:
            raise E2EError(f"round 1 should aggregate all three partners, got {summary['accepted']}")
        if kill and sorted(summary["accepted"].get(2, [])) != ["partner_0", "partner_1"]:
            raise E2EError(f"round 2 should aggregate partner_0 and partner_1 only, got {summary['accepted']}")
        counts = verify_partner_ledgers(partners, 3)
        if counts["partner_2"] < 1:
            raise E2EError("the killed partner's ledger lost its round-1 entry")
        summary["ledger_entries"] = counts
        tm.mark(f"partner ledgers verify (entries {counts}; partner_2 killed in round 2)")
        collect_ledgers(partners, 3, run_dir / "ledgers")
        res = c.run(fedsocial("audit", str(run_dir), "--public-keys", str(run_dir / "ledgers")), timeout=120)
        summary["audit"] = res.stdout[-2000:]
        tm.mark("fedsocial audit passed")
        summary["audit_catches"] = check_audit_catches(c, run_dir, partners, work)
        tm.mark(f"audit exits {summary['audit_catches']} (cap from the signed manifest; a ledger over it; "
                "a ledger deleted from a copy)")
    tm.mark("all processes stopped")
    summary["timings"] = dict(tm.marks)
    write_json_summary(work / "e2e.json", summary)
    return summary


def check_audit_catches(c: Cluster, run_dir: Path, partners: Path, work: Path) -> dict[str, int]:
    """The deployed run's audit holds each partner to the cap it declared, with no flags (issue 11
    item 3): the cap comes from the server's signed run_manifest.json; a correctly signed ledger
    entry above the cap, in a copy of the run, exits 4; a ledger deleted from another copy fails."""
    from fedsocial.shared import signing
    from fedsocial.shared.privacy.accounting import compute_epsilon
    from fedsocial.shared.privacy.ledger import Ledger

    report = json.loads((run_dir / "audit.json").read_text())
    sources = {p["partner_id"]: p["cap_source"] for p in report["partners"]}
    if not sources or not all(str(src).startswith("run_manifest.json") for src in sources.values()):
        raise E2EError(f"the deployed run's audit did not take its caps from the signed manifest: {sources}")
    over = work / "audit-over-cap"
    shutil.copytree(run_dir, over)
    key = signing.load_private_key(partners / "partner_0" / "keys" / "ledger_signing.key")
    ledger = Ledger(over / "ledgers" / "partner_0.jsonl", key, "partner_0")
    last = ledger.entries()[-1]
    cap = float(report["partners"][0]["max_epsilon"])
    event = (float(last["noise_multiplier"]), float(last["sample_rate"]), int(last["steps"]))
    steps = event[2]  # one more round of the same mechanism, longer until the ledger ends 1.5-2x over the cap
    while compute_epsilon([*ledger.history(), (event[0], event[1], steps)], float(last["target_delta"])) < 1.5 * cap:
        steps *= 2
    ledger.append_round(round=int(last["round"]) + 1, noise_multiplier=event[0], sample_rate=event[1], steps=steps,
                        max_grad_norm=last["max_grad_norm"], target_delta=last["target_delta"],
                        population=last["population"], secure_rng=False,
                        extra={"scope": last["scope"]} if "scope" in last else None)  # as the partner writes it
    gone = work / "audit-deleted-ledger"
    shutil.copytree(run_dir, gone)
    for name in ("partner_1.jsonl", "partner_1.pub"):
        (gone / "ledgers" / name).unlink()
    over_cap, deleted = c.run_many([fedsocial("audit", str(over)), fedsocial("audit", str(gone))], check=False)
    codes = {"over_cap": over_cap.returncode, "deleted_ledger": deleted.returncode}
    if codes["over_cap"] != 4:
        raise E2EError(f"a signed ledger above its declared cap should fail the audit with exit 4, got {codes}")
    if codes["deleted_ledger"] == 0:
        raise E2EError(f"a ledger deleted from a copy of the run should fail the audit, got {codes}")
    return codes


def _not_json(name: str) -> None:
    raise E2EError(f"metrics.json holds {name}, which is not JSON (RFC 8259): strict parsers refuse the file")


def federated_run(c: Cluster, app: Path, config: Path, run_dir: Path, tm: Timings, label: str,
                  victim: Proc | None = None, cluster_: Cluster | None = None,
                  after_submit: Callable[[], None] = lambda: None, partner_nodes: str = "") -> dict[str, Any]:
    """``flwr run``; ``after_submit()``; optionally SIGKILL ``victim`` while it trains in the last round;
    wait for the end."""
    run_config = {"config-path": str(config.resolve()), "run-dir": str(run_dir.resolve())}
    rid = flwr_run(c, app, {**run_config, **({"partner-nodes": partner_nodes} if partner_nodes else {})})
    tm.mark(f"{label}: submitted run {rid}")
    after_submit()
    if victim is not None and cluster_ is not None:
        wait_for("partner_2 to train in round 2", lambda: round_train_messages(victim.log, 2) >= 3, 420, victim)
        time.sleep(1.0)
        cluster_.stop(victim, sig=signal.SIGKILL)
        tm.mark(f"{label}: SIGKILLed {victim.name} during round 2 training")
    # the ServerApp writes metrics.json as its last step: until then ask `flwr ls` (about 1.5 CPU s a call)
    # only every 15 s, where polling every 0.5 s kept most of a core busy (a failed run never writes the
    # file; the slow poll sees its status)
    status = wait_for(f"run {rid} to finish",
                      lambda: (s := run_status(c, rid)) and str(s.get("status", "")).startswith("finished") and s,
                      420, hint=(run_dir / "metrics.json").is_file, slow_every=15.0)
    if status["status"] != "finished:completed":
        log = c.run([str(BIN / "flwr"), "log", str(rid), CONNECTION], check=False, timeout=60).stdout
        raise E2EError(f"{label}: run {rid} ended {status['status']}:\n{log[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text(), parse_constant=_not_json)  # strict: no NaN
    if metrics.get("rounds_completed") != 2:
        raise E2EError(f"{label}: rounds_completed {metrics.get('rounds_completed')} != 2")
    ndcg = metrics.get("ndcg@10")  # null where the run published no metrics (DP without an evaluation release)
    tm.mark(f"{label}: completed, ndcg@10 {'not published' if ndcg is None else f'{ndcg:.4f}'}, "
            f"epsilon {metrics.get('epsilon')}")
    return {"run_id": rid, "status": status["status"], "ndcg@10": metrics.get("ndcg@10"),
            "epsilon": metrics.get("epsilon"), "dropped_replies": metrics.get("dropped_replies")}


def write_json_summary(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedsocial.simulations.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "e2e"), help="work folder (replaced)")
    p.add_argument("--no-kill", action="store_true", help="do not kill partner_2 during round 2")
    args = p.parse_args(argv)
    try:
        summary = run_scenario(Path(args.work).resolve(), kill=not args.no_kill)
    except E2EError as exc:
        print(f"e2e FAILED: {exc}", file=sys.stderr)
        print(f"logs: {Path(args.work) / 'logs'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("e2e interrupted; all processes stopped", file=sys.stderr)
        return 130
    print(f"e2e passed in {summary['timings']['all processes stopped']:.0f} s; summary {args.work}/e2e.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
