"""Test-run order: files that hold a ``slow`` test (a federation, Flower's runtime) are collected first.

``make test`` runs pytest-xdist with ``--dist loadfile``, which hands whole files to the workers in
collection order; the federations started last used to run alone at the end while the other worker was
idle. Started first, the short files fill in around them. Within a file the order is unchanged.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each group keeps its order
