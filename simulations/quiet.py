"""Known third-party notices that a ``fedsocial`` user cannot act on, handled at their cause.

Each entry here is deliberate and as narrow as the library allows:

- Ray 2.55 warns (``FutureWarning``) at ``ray.init`` that a later release will stop overriding
  ``CUDA_VISIBLE_DEVICES`` for actors with ``num_gpus=0``. Setting
  ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` opts into that future behaviour now, which is the fix Ray
  names in the warning; it is harmless here because a CPU actor never selects a CUDA device
  (``train.device = cpu``), and GPU actors get a fractional ``num_gpus`` so Ray still sets their devices.
- Flower 1.42 logs a "DEPRECATED FEATURE" banner from ``flwr.simulation.run_simulation``, the only
  public in-process simulation entry point (``flwr run`` needs a SuperLink process and cannot take
  the app objects, the progress callback or the stop hook ``fedsocial simulate`` passes). Flower
  offers no non-deprecated replacement for that use, so one logging filter drops exactly that
  record and nothing else of Flower's.
"""

from __future__ import annotations

import logging
import os

RAY_OVERRIDE_ENV = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"
_RUN_SIMULATION_DEPRECATION = "The `run_simulation` function is deprecated"


class RunSimulationDeprecationFilter(logging.Filter):
    """Drops Flower's deprecation record for ``run_simulation``; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _RUN_SIMULATION_DEPRECATION not in record.getMessage()


_FILTER = RunSimulationDeprecationFilter()


def quiet_simulation_notices() -> None:
    """Apply both fixes above (idempotent); call before ``flwr.simulation.run_simulation``."""
    os.environ.setdefault(RAY_OVERRIDE_ENV, "0")
    flwr_logger = logging.getLogger("flwr")
    if _FILTER not in flwr_logger.filters:
        flwr_logger.addFilter(_FILTER)
