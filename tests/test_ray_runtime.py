"""One Ray runtime for the federations of one process (simulations/ray_runtime.py).

Flower's own backend is driven here as ``run_simulation`` drives it; the in-process federations of
the suite (test_federation.py, ...) run inside the session's kept runtime and check their results.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fedsocial.simulations.ray_runtime import ensure_ray_inplace
from fedsocial.simulations.simulate import backend_config
from tests.test_federation import tiny_config


def _wait_all_cpus_free(timeout_s: float = 30.0) -> bool:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) == ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow  # starts Ray twice and two of Flower's actors
def test_flowers_terminate_kills_the_runs_actors_and_keeps_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: Ray up with one CPU (FEDSOCIAL_SIM_CPUS=1); the backend config a 2-partner federation asks for
    import ray
    from flwr.clientapp import ClientApp
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    monkeypatch.setenv("FEDSOCIAL_SIM_CPUS", "1")
    assert ensure_ray_inplace(backend_config(tiny_config(partners=2))["init_args"])
    one_cpu = ray.cluster_resources()["CPU"]
    monkeypatch.delenv("FEDSOCIAL_SIM_CPUS")
    ray_config = backend_config(tiny_config(partners=2))

    # Execute: other args restart Ray, the same args again do not; then Flower's backend as run_simulation drives it
    restarted = ensure_ray_inplace(ray_config["init_args"])
    again = ensure_ray_inplace(ray_config["init_args"])
    backend = RayBackend(ray_config)
    backend.build(lambda: ClientApp())
    actors = backend.num_workers
    backend.terminate()

    # Assert: one CPU, then two actors; Ray still up after terminate and every CPU free again (left up for
    # this worker's federations)
    assert one_cpu == 1.0
    assert restarted and not again
    assert actors == 2
    assert ray.is_initialized()
    assert _wait_all_cpus_free()


def test_outside_the_context_nothing_starts_and_the_context_restores_flower() -> None:
    # Prepare: a fresh interpreter (this session keeps a runtime of its own)
    script = (
        "import sys\n"
        "from fedsocial.simulations import ray_runtime as rt\n"
        "assert rt.ensure_ray_inplace({'num_cpus': 1}) is False\n"
        "assert 'ray' not in sys.modules  # nothing imported, nothing started\n"
        "from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend\n"
        "original = RayBackend.terminate\n"
        "with rt.kept_ray_runtime():\n"
        "    with rt.kept_ray_runtime():  # nested: the inner exit keeps the stand-in\n"
        "        rt.patch_flower_terminate_inplace()\n"
        "    assert RayBackend.terminate is rt._end_actors_only\n"
        "assert RayBackend.terminate is original\n"
        "import ray\n"
        "assert not ray.is_initialized()\n"
        "print('ok')\n"
    )

    # Execute
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
