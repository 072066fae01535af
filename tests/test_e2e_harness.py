"""The e2e harness's waiting and concurrency helpers (simulations/e2e.py; ``make e2e`` runs the scenario)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from fedsocial.simulations.e2e import Cluster, E2EError, flwr_env, wait_for


def test_wait_for_calls_a_costly_condition_only_on_its_hint_or_slowly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a condition that would succeed at once but must not be called while the hint is false
    calls: list[float] = []
    hint = {"ready": False}

    def cond() -> bool:
        calls.append(time.monotonic())
        return hint["ready"]

    # Execute: 0.6 s of polling every 0.05 s with a 10 s slow period, then the hint turns true
    t0 = time.monotonic()
    with pytest.raises(E2EError, match="timed out"):
        wait_for("x", cond, 0.6, every=0.05, hint=lambda: hint["ready"], slow_every=10.0)
    hint["ready"] = True
    value = wait_for("x", cond, 5.0, every=0.05, hint=lambda: hint["ready"])
    # Assert: one call (the first, unconditional) in the silent phase, then success on the hint
    assert len(calls) == 2 and calls[0] - t0 < 0.1
    assert value is True


def test_run_many_runs_commands_side_by_side_in_order(tmp_path: Path) -> None:
    # Prepare: three commands of 1 s each
    c = Cluster(tmp_path, flwr_env(tmp_path / "flwr"))
    argvs = [[sys.executable, "-c", f"import time; time.sleep(1); print({i})"] for i in range(3)]
    # Execute
    t0 = time.monotonic()
    results = c.run_many(argvs)
    elapsed = time.monotonic() - t0
    # Assert: the outputs in the order asked, in about the time of one
    assert [r.stdout.strip() for r in results] == ["0", "1", "2"]
    assert elapsed < 2.5


def test_run_many_names_a_failing_command(tmp_path: Path) -> None:
    # Prepare
    c = Cluster(tmp_path, flwr_env(tmp_path / "flwr"))
    argvs = [[sys.executable, "-c", "pass"], [sys.executable, "-c", "import sys; sys.exit(7)"]]
    # Execute / Assert
    with pytest.raises(E2EError, match="exited with 7"):
        c.run_many(argvs)
    assert [r.returncode for r in c.run_many(argvs, check=False)] == [0, 7]
