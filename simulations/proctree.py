"""The process tree from ``/proc`` (Linux): descendants, liveness, CPU time, stopping by pid.

Shared by ``make e2e`` (stopping Flower's processes, which detach children into new sessions) and
``fedsocial bench scale`` (summing the memory and CPU of a simulation's whole tree).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def compute_descendants(parents: dict[int, int], root: int) -> set[int]:
    """``root`` and every process below it in a {pid: parent pid} table."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def parse_stat(text: str) -> tuple[int, float]:
    """(parent pid, CPU seconds user + system) from a ``/proc/PID/stat`` line (the name may hold spaces)."""
    fields = text[text.rindex(")") + 2:].split()  # fields from the state on: state ppid ... utime stime
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def read_process_table() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, CPU seconds)} of every process readable now."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                table[int(entry)] = parse_stat(fh.read())
        except (OSError, ValueError, IndexError):
            continue  # the process ended between listdir and open
    return table


def compute_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, ended but not yet reaped by its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")


def stop_processes(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM each of these (our own) processes by pid, then SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # it has ended already
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(compute_running(p) for p in pids):
            time.sleep(0.1)


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` now (children detached into new sessions included), sorted."""
    parents = {p: ppid for p, (ppid, _) in read_process_table().items()}
    return sorted(compute_descendants(parents, pid) - {pid})
