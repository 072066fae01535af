"""Deterministic fault injection at named crash boundaries (for crash-recovery tests).

``FEDSOCIAL_FAULT=NAME[:ROUND[:PARTNER]]`` makes :func:`fault_point` end the process with
``os._exit(137)`` (what a SIGKILL leaves: no cleanup, no flush, no ``finally``) when a boundary of that
name is reached in that round (and, with PARTNER, by that partner). Unset, it costs one dict lookup.

Boundaries: ``before_ledger_append`` and ``after_ledger_append`` (a partner, after training, before
its reply leaves), ``before_selection_append`` and ``after_selection_append`` (a joint-scope partner's DP
selection of its served model, after the last round: its release saved, before / after its ledger entry),
``before_checkpoint`` (the server, after it aggregated the round's replies and before it writes the round's
checkpoint), ``before_metrics_record`` (a writer of metrics.json, after its rename and before the signed
record's; the round is the run's ``rounds_completed``), ``before_canary_record`` (``fedsocial canary-audit``,
after canary_audit.json's rename and before its signed record's; round 0).
"""

from __future__ import annotations

import os

ENV = "FEDSOCIAL_FAULT"
BOUNDARIES = ("before_ledger_append", "after_ledger_append", "before_selection_append", "after_selection_append",
              "before_checkpoint", "before_metrics_record", "before_canary_record")
KILLED = 137  # 128 + SIGKILL, the status a shell reports for a killed process


def fault_point(name: str, round_: int, partner: str | None = None) -> None:
    """End the process now when ``FEDSOCIAL_FAULT`` names this boundary (see the module docstring)."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    want = spec.split(":")
    if want[0] != name:
        return
    if len(want) > 1 and want[1] and int(want[1]) != round_:
        return
    if len(want) > 2 and want[2] and want[2] != partner:
        return
    os._exit(KILLED)
