"""The watcher that stops what a SIGKILLed simulation driver leaves behind (simulations/reaper.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedsocial.simulations.proctree import compute_running
from fedsocial.simulations.reaper import compute_leftovers, read_start_time

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")


def test_only_recorded_processes_with_their_own_start_time_are_left_over() -> None:
    # Prepare: 10 still runs as itself, 11 ended, 12's pid now belongs to another program (another start time)
    recorded = {10: 500, 11: 600, 12: 700}
    now = {10: 500, 11: None, 12: 900}
    # Execute / Assert
    assert compute_leftovers(recorded, now) == [10]
    assert compute_leftovers({}, now) == []


def test_the_start_time_of_this_process_and_of_none() -> None:
    # Execute / Assert: this process started after boot, before now; an unused pid has none
    start = read_start_time(os.getpid())
    assert start is not None and start > 0 and read_start_time(os.getpid()) == start
    assert read_start_time(2**22 + 7) is None


def _wait_for(path: Path, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.1)
    raise AssertionError(f"{path}: not written in {timeout_s} s")


def test_a_sigkilled_driver_leaves_no_detached_descendant(tmp_path: Path) -> None:
    # Prepare: a driver that starts its watcher, then a grandchild in a session of its own (as Ray's raylet starts
    # its agents), and is SIGKILLed (was: Ray's DashboardAgent and RuntimeEnvAgent ran on for good)
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        from fedsocial.simulations.reaper import start_reaper
        watcher = start_reaper()
        assert start_reaper() is watcher  # one per process
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        open({str(tmp_path / "pids")!r}, "w").write(f"{{child.pid}} {{watcher.pid}}")
        time.sleep(300)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    child, watcher = (int(x) for x in _wait_for(tmp_path / "pids").split())
    time.sleep(1.5)  # the watcher records the grandchild within a poll
    try:
        # Execute
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (compute_running(child) or compute_running(watcher)):
            time.sleep(0.2)
        # Assert: the grandchild was stopped and the watcher ended
        assert not compute_running(child) and not compute_running(watcher)
    finally:
        for pid in (child, watcher):
            if compute_running(pid):
                os.kill(pid, signal.SIGKILL)
