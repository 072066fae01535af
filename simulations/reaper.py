"""Stops what a killed simulation driver leaves behind (Linux).

Ray's raylet starts its ``DashboardAgent`` and ``RuntimeEnvAgent`` as its own children; when the driver
(``fedsocial simulate``) is SIGKILLed, or dies of OOM, nothing runs its ``ray.shutdown()`` and those two agents
outlive it, re-parented to init, for good. :func:`start_reaper` starts one small watcher per driver process
(``python -m fedsocial.simulations.reaper DRIVER_PID``, in a session of its own): every second it records the
driver's descendants with their start times; once the driver is gone it stops (SIGTERM, then SIGKILL) every
recorded process still running with the same start time (a pid reused by another program is left alone), and
exits. On a normal exit Ray has stopped its processes already and there is nothing left to stop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping

from fedsocial.simulations.proctree import compute_descendants, read_process_table, stop_processes

POLL_S = 1.0  # how often the descendants are recorded (a process that lives less is not Ray's)
_STARTED: dict[int, subprocess.Popen[bytes]] = {}  # driver pid -> its watcher (one per process)


def read_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of ``/proc/PID/stat``); None if it is gone
    or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # from the state on: state is field 3, starttime field 22
    return None if fields[0] in ("Z", "X") else int(fields[19])


def compute_leftovers(recorded: Mapping[int, int], now: Mapping[int, int | None]) -> list[int]:
    """The recorded processes still running as themselves: the same pid with the same start time."""
    return sorted(pid for pid, start in recorded.items() if now.get(pid) == start)


def watch(driver: int, poll_s: float = POLL_S) -> list[int]:
    """Record ``driver``'s descendants until it is gone, then stop those still running; returns their pids."""
    me, started = os.getpid(), read_start_time(driver)
    recorded: dict[int, int] = {}
    while started is not None and read_start_time(driver) == started:
        parents = {pid: ppid for pid, (ppid, _) in read_process_table().items()}
        for pid in compute_descendants(parents, driver) - {driver, me}:
            if pid not in recorded:
                start = read_start_time(pid)
                if start is not None:
                    recorded[pid] = start
        time.sleep(poll_s)
    leftovers = compute_leftovers(recorded, {pid: read_start_time(pid) for pid in recorded})
    stop_processes(leftovers, grace_s=3.0)
    return leftovers


def start_reaper() -> subprocess.Popen[bytes] | None:
    """Start this process's watcher (once; Linux only, elsewhere None)."""
    driver = os.getpid()
    if not sys.platform.startswith("linux") or driver in _STARTED:
        return _STARTED.get(driver)
    _STARTED[driver] = subprocess.Popen(  # noqa: S603 - our own module, no shell
        [sys.executable, "-m", "fedsocial.simulations.reaper", str(driver)], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return _STARTED[driver]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m fedsocial.simulations.reaper DRIVER_PID", file=sys.stderr)
        return 2
    watch(int(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
