"""Session set-up shared by every test file.

- Test-run order: files that hold a ``slow`` test (a federation, Flower's runtime) are collected first.
  ``make test`` runs pytest-xdist with ``--dist loadfile``, which hands whole files to the workers in
  collection order; the federations started last used to run alone at the end while the other worker was
  idle. Started first, the short files fill in around them. Within a file the order is unchanged.
- One Ray runtime per test process (``kept_ray_runtime``, simulations/ray_runtime.py): the in-process
  federations of a worker share it instead of starting and stopping Ray for each (about 7 s a federation).
  Ray starts at the first federation only and is shut down when the session ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedsocial.simulations.ray_runtime import kept_ray_runtime


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each group keeps its order


@pytest.fixture(scope="session", autouse=True)
def _one_ray_runtime_per_worker() -> Iterator[None]:
    with kept_ray_runtime():
        yield
