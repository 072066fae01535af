"""Flower ServerApp of the coordinator (``[tool.flwr.app.components] serverapp = "fedsocial.server.app:app"``).

Legacy path (``LegacyContext`` + ``DefaultWorkflow``, with ``SecAggPlusWorkflow`` as the fit step when
``secagg.enabled``), so that client-side clipping, SecAgg+ and DP compose. Logic: :mod:`server.federation`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsocial.server.federation import run_server


def make_server_app(settings: Mapping[str, Any] | None = None,
                    on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """The ServerApp; ``settings`` override the run config (the in-process simulation passes them here)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, settings, on_round)

    return app


app = make_server_app()
