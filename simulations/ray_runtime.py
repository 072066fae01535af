"""One Ray runtime for the in-process federations of one process (a test session, a privacy grid).

Flower 1.42's simulation starts Ray for every ``run_simulation`` and shuts it down at the end:
``RayBackend.init_ray`` skips the start when Ray is already up, but ``RayBackend.terminate`` always
calls ``ray.shutdown()``. Starting and stopping Ray is about 7 s of a 20 s tiny federation
(docs/BENCHMARKS.md 9.8). Inside ``kept_ray_runtime()``:

- each federation finds Ray started with exactly the init args it asks for (``ensure_ray_inplace``:
  a Ray with other args is restarted, so ``FEDSOCIAL_SIM_CPUS`` and the actor count keep their meaning);
- Flower's backend, at the end of a run, kills that run's actors (idle and in-flight) but leaves Ray
  up. Actors are processes of their own, started afresh by every run, so nothing of one run's Python
  state reaches another.

Outside the context nothing changes: Flower starts and stops Ray itself.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class _Kept:
    depth: int = 0  # nesting of kept_ray_runtime()
    init_args: str = ""  # the running Ray's init args (canonical JSON), "" when none of ours runs
    terminate: Any = None  # Flower's RayBackend.terminate while ours stands in for it


_KEPT = _Kept()


def _end_actors_only(backend: Any) -> None:
    """Stands in for ``RayBackend.terminate`` while a runtime is kept: kill the run's actors, keep Ray."""
    import ray

    pool = backend.pool
    if pool is None:
        return
    actors = list(pool.pool) + list(getattr(pool, "_future_to_actor", {}).values())  # idle + in flight
    for actor in actors:
        ray.kill(actor, no_restart=True)
    pool.pool.clear()


def compute_ray_pythonpath() -> str:
    """What Flower's ``init_ray`` hands Ray's workers: this process's sys.path, then $PYTHONPATH."""
    path = os.pathsep.join(sys.path)
    return f"{path}{os.pathsep}{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else path


def patch_flower_terminate_inplace() -> None:
    """Have Flower's ``RayBackend.terminate`` end the run's actors only, until the context exits."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    if _KEPT.terminate is None:
        _KEPT.terminate = RayBackend.terminate
        RayBackend.terminate = _end_actors_only  # type: ignore[method-assign,assignment]


def ensure_ray_inplace(init_args: dict[str, Any]) -> bool:
    """Inside ``kept_ray_runtime``: have Ray up with ``init_args`` (start or restart it); True if it was started.

    A no-op returning False outside the context (Flower then starts Ray itself)."""
    if _KEPT.depth == 0:
        return False
    from fedsocial.simulations.quiet import quiet_simulation_notices

    quiet_simulation_notices()  # before ray.init: Ray's accelerator FutureWarning (quiet.py)
    import ray

    patch_flower_terminate_inplace()
    key = json.dumps(init_args, sort_keys=True, default=str)
    if ray.is_initialized() and _KEPT.init_args in ("", key):
        return False  # ours with these args, or a Ray the caller started (used as Flower would use it)
    if ray.is_initialized():
        ray.shutdown()
    args = {"include_dashboard": False, **init_args}  # as Flower's init_ray defaults it
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": compute_ray_pythonpath()}}, **args)
    _KEPT.init_args = key
    return True


def end_ray_inplace() -> None:
    """Shut a kept Ray down now (the next federation in the context starts it again); another's Ray stays."""
    if _KEPT.init_args and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    _KEPT.init_args = ""


@contextmanager
def kept_ray_runtime() -> Iterator[None]:
    """Keep one Ray runtime across the federations run inside; Ray is shut down and Flower restored at exit."""
    _KEPT.depth += 1
    try:
        yield
    finally:
        _KEPT.depth -= 1
        if _KEPT.depth == 0:
            if _KEPT.terminate is not None:
                from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

                RayBackend.terminate = _KEPT.terminate  # type: ignore[method-assign]
                _KEPT.terminate = None
            end_ray_inplace()
