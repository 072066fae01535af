"""Flower ServerApp of the coordinator (``[tool.flwr.app.components] serverapp = "fedsocial.server.app:app"``).

Legacy path (``LegacyContext`` + ``DefaultWorkflow``, with ``SecAggPlusWorkflow`` as the fit step when
``secagg.enabled``), so that client-side clipping, SecAgg+ and DP compose. Logic: :mod:`server.federation`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsocial.server.checkpoint import CheckpointError
from fedsocial.server.federation import run_server
from fedsocial.server.strategy import QuorumError
from fedsocial.shared.config import ConfigError

# what ends a run for a reason the coordinator can act on (the quorum lost, a bad run config or run-dir, a
# checkpoint that cannot be resumed): the message says it all, a traceback of the workflow's frames would bury it
STOPS: tuple[type[Exception], ...] = (QuorumError, ConfigError, CheckpointError)


class StopsWithoutTraceback(logging.Filter):
    """Flower logs an exception out of the ServerApp with its traceback (``ServerApp raised an exception``),
    then marks the run failed (exit code 201). For :data:`STOPS` keep the record, the failed status and the
    exit code, and drop the traceback: one line ``ServerApp stopped: QuorumError: round 2: only 1 valid
    replies, ...`` in ``flwr log`` and the SuperLink's output. Every other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, STOPS):
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = "ServerApp stopped: %s: %s", (type(exc).__name__, exc)
        return True


_STOP_FILTER = StopsWithoutTraceback()


def make_server_app(settings: Mapping[str, Any] | None = None,
                    on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """The ServerApp; ``settings`` override the run config (the in-process simulation passes them here)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        flwr_logger = logging.getLogger("flwr")
        if _STOP_FILTER not in flwr_logger.filters:
            flwr_logger.addFilter(_STOP_FILTER)
        run_server(grid, context, settings, on_round)

    return app


app = make_server_app()
