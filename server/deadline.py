"""Replies collected with a reporting deadline for stragglers.

A round closes at its reporting deadline with the partners that reported (Bonawitz et al. 2019, "Towards
Federated Learning at Scale: System Design", MLSys, the reporting phase: the server waits for the selected devices
to report until a deadline, and the round goes on without the stragglers if enough have reported).

Flower 1.42's ``Grid.send_and_receive`` waits until every message has a reply (or ``timeout``), pulling
from the SuperLink every 3 s: a partner that died costs the round until the SuperLink declares it offline
(30 s heartbeats, patience 2: 36-60 s), and every message hop up to 3 s of sleep. :func:`collect_replies`
pulls every ``poll`` seconds and, once ``quorum`` messages have a successful reply, waits at most ``grace``
seconds more for the rest (``federation.straggler_grace``; 0 waits for every reply, as Flower does). A
reply left behind is never read: the workflows count its sender as a failure (SecAgg+: a dropout), and
what the partner charged for it stays in its ledger, which is the safe side of "every release charged".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

MISSED_DEADLINE_CODE = 4243  # the error reply of a node out of the round (screening.py's refusals: 4242)
POLL_S = 0.1  # a pull is one small RPC to the SuperLink (in simulation, a lookup); Flower's in-memory grid: 0.1


def compute_wait_s(now: float, end: float | None, cutoff: float | None, poll: float) -> float | None:
    """How long to sleep before the next pull (None: the wait is over at ``now``).

    ``end``: the caller's timeout as a clock time (None: none); ``cutoff``: the straggler deadline once
    the quorum has answered (None: not yet, or no grace).
    """
    limits = [t for t in (end, cutoff) if t is not None]
    if limits and now >= min(limits):
        return None
    return poll if not limits else max(0.0, min(poll, min(limits) - now))


def collect_replies(grid: Grid, messages: Iterable[Message], *, timeout: float | None, quorum: int,
                    grace: float, poll: float = POLL_S, clock: Callable[[], float] | None = None,
                    sleep: Callable[[float], None] | None = None) -> list[Message]:
    """``grid.send_and_receive(messages, timeout=timeout)`` with a ``poll`` s pull and the straggler
    deadline: once ``quorum`` replies without an error are in, the rest have ``grace`` s (0: no deadline).
    ``clock`` and ``sleep``: ``time.monotonic`` and ``time.sleep`` unless given."""
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    pending = set(grid.push_messages(messages))
    start = clock()
    end = None if timeout is None else start + timeout
    got: list[Message] = []
    answered, cutoff = 0, None
    while pending:
        new = list(grid.pull_messages(sorted(pending)))
        got.extend(new)
        pending.difference_update(m.metadata.reply_to_message_id for m in new)
        answered += sum(not m.has_error() for m in new)
        now = clock()
        if cutoff is None and grace > 0 and answered >= quorum:
            cutoff = now + grace
        wait = compute_wait_s(now, end, cutoff, poll)
        if not pending or wait is None:
            break
        sleep(wait)
    return got
