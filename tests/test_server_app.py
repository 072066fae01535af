"""What the coordinator's ServerApp leaves in Flower's log when the run stops for a reason it can act on."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.common.logger import log

from fedsocial.server.app import StopsWithoutTraceback
from fedsocial.server.strategy import QuorumError
from tests.test_flwr_run import BIN, copy_app, flwr_env  # noqa: F401  (the fixture)


@pytest.fixture()
def flwr_output() -> Iterator[io.StringIO]:
    """What Flower's logger prints while the ServerApp's filter is on (the records as a handler formats them)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger, stop_filter = logging.getLogger("flwr"), StopsWithoutTraceback()
    logger.addHandler(handler)
    logger.addFilter(stop_filter)
    try:
        yield out
    finally:
        logger.removeFilter(stop_filter)
        logger.removeHandler(handler)


def _raise(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:  # with its traceback, as Flower catches it
        return caught


def test_a_lost_quorum_is_one_line_in_flowers_log_without_a_traceback(flwr_output: io.StringIO) -> None:
    # Regression: a deployed run that lost its quorum ended in a 30-line traceback of the workflow's frames
    # Prepare: the exception as the ServerApp raises it
    exc = _raise(QuorumError("round 2: only 1 valid replies, federation.min_partners is 2 (partner_2: no reply)"))

    # Execute: Flower's own call (flwr/superlink/runtime/run_serverapp.py)
    log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=exc)

    # Assert
    assert flwr_output.getvalue() == ("ERROR ServerApp stopped: QuorumError: round 2: only 1 valid replies, "
                                      "federation.min_partners is 2 (partner_2: no reply)\n")


def test_any_other_exception_keeps_its_traceback(flwr_output: io.StringIO) -> None:
    # Prepare: a bug, not a stop: whoever debugs it needs the frames
    exc = _raise(RuntimeError("a bug"))
    # Execute
    log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=exc)
    # Assert
    text = flwr_output.getvalue()
    assert text.startswith("ERROR ServerApp raised an exception\nTraceback (most recent call last):")
    assert text.rstrip().endswith("RuntimeError: a bug")


@pytest.mark.slow  # starts Flower's local SuperLink
def test_flwr_run_with_a_missing_config_fails_in_one_line(tmp_path: Path, flwr_env: dict[str, str]) -> None:  # noqa: F811
    # Prepare: the app, and a run config naming a config file that does not exist
    app = copy_app(tmp_path / "app")
    missing = tmp_path / "no-such.toml"

    # Execute
    proc = subprocess.run([str(BIN / "flwr"), "run", ".", "local-simulation", "--stream", "--run-config",
                           f'config-path="{missing}" run-dir="{tmp_path / "run"}"'],
                          cwd=app, env=flwr_env, capture_output=True, text=True, timeout=300)

    # Assert: the reason in one line, no traceback, and the run marked failed
    text = proc.stdout + proc.stderr
    assert f"ServerApp stopped: ConfigError: {missing}: no such config file" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    deadline = time.monotonic() + 30
    status = ""
    while "failed" not in status and time.monotonic() < deadline:
        ls = subprocess.run([str(BIN / "flwr"), "ls", "local-simulation", "--format", "json"], cwd=app,
                            env=flwr_env, capture_output=True, text=True, timeout=60)
        status = " ".join(str(r.get("status", "")) for r in json.loads(ls.stdout or "{}").get("runs", []))
        time.sleep(0.5)
    assert "failed" in status, (status, ls.stdout[-2000:], ls.stderr[-2000:])
