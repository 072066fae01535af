"""Flower ClientApp of a partner platform (``[tool.flwr.app.components] clientapp = "fedsocial.client.app:app"``).

Settings come from the run config (``config-path``, ``data-dir``, ``run-dir``) and the node config
(simulation: ``partition-id``/``num-partitions``; deployment: ``partner-id``, ``data-dir``,
``state-dir``, ``device``, ``signing-key``). The logic is in :mod:`client.flower` and :mod:`client.partner`.
"""

from fedsocial.client.flower import make_client_app

app = make_client_app()
