"""``flwr run . local-simulation`` completes on the project's own federation (3 supernodes in pyproject).

``flwr run`` starts a detached local SuperLink that outlives the CLI. The test gives it a private
FLWR_HOME and free ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``),
then finds that SuperLink by its command line (its log file lives in this FLWR_HOME) and stops it and
its descendants by PID. Flower 1.42's ``flwr run`` migrates ``[tool.flwr.federations]`` into
``$FLWR_HOME/config.toml`` and comments that section out of ``pyproject.toml``, so the test runs a copy
of the app, never the checkout itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsocial.shared.privacy.audit import audit_run
from fedsocial.simulations.simulate import write_config
from tests.test_federation import tiny_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of flower-superlink processes whose command line names this FLWR_HOME."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if "flower-superlink" in (cmd := _cmdline(pid)) and str(flwr_home) in cmd]


def descendants(root: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    children: dict[int, list[int]] = {}
    for pid in pids:
        children.setdefault(_ppid(pid), []).append(pid)
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def stop(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _ppid(p) != -1 for p in pids):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture()
def flwr_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    try:
        yield env
    finally:
        for pid in superlink_pids(home):
            stop([*descendants(pid), pid])


def copy_app(dest: Path) -> Path:
    """The Flower app as ``flwr build`` sees it: pyproject, README and the packages (no caches)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("client", "server", "shared", "simulations", "configs"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    shutil.copytree(REPO / "fedsocial", dest / "fedsocial", ignore=ignore, symlinks=True)  # links to the folders
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.slow  # runs a federation (or Flower's local runtime)
def test_flwr_run_on_the_local_simulation_federation_completes(tmp_path: Path, flwr_env: dict[str, str]) -> None:
    app = copy_app(tmp_path / "app")
    # under DP a partner's evaluation leaves it only as a Gaussian release (shared/privacy/evaluation.py):
    # turn that on so the ServerApp's metrics.json has federated metrics to report
    config_path = write_config(tiny_config(server_noise_multiplier=0.0, eval_noise_multiplier=2.0), tmp_path / "cfg")
    run_dir = tmp_path / "run"
    overrides = f'config-path="{config_path}" run-dir="{run_dir}"'

    proc = subprocess.run([str(BIN / "flwr"), "run", ".", "local-simulation", "--stream", "--run-config", overrides],
                          cwd=app, env=flwr_env, capture_output=True, text=True, timeout=540)

    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert superlink_pids(Path(flwr_env["FLWR_HOME"])), "flwr run should have left its detached SuperLink"
    deadline = time.monotonic() + 60  # --stream returns when the run ends; give the files a moment
    while not (run_dir / "metrics_record.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)  # the ServerApp writes metrics.json, then the record signing it
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["rounds_completed"] == 2
    audited = audit_run(run_dir)  # the deployed path: the ServerApp alone signs its metrics.json
    assert audited.exit_code == 0, [str(f) for f in audited.findings]
    assert audited.records["metrics"] == {"verified": True, "note": "verified by the server's signature "
                                          "(metrics_record.json, round 2, written by server)"}
    assert set(doc["partners"]) == {"partner-0", "partner-1", "partner-2"}
    assert 0.0 <= doc["ndcg@10"] <= 1.0 and doc["epsilon"] > 0
