"""Test helper: an in-memory stand-in for the ServerApp's grid (the transport is not under test).

Subclasses answer ``send_and_receive``; ``push_messages``/``pull_messages`` serve those answers the way a
SuperLink does; everything else a runtime's grid does is either trivial (the run, the node ids) or not used
by the code under test (it raises).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class StubGrid(Grid):
    """Connected nodes ``node_ids``, run id 7; ``send_and_receive`` is the subclass's."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = sorted(node_ids)
        self._run = Run.create_empty(run_id=7)
        self._waiting: list[Message] = []  # replies not pulled yet

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Ids given as a SuperLink does; the subclass's ``send_and_receive`` answers at once, and the replies
        wait for :meth:`pull_messages` (how server.deadline.collect_replies reaches the nodes)."""
        sent = list(messages)
        for msg in sent:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        self._waiting.extend(self.send_and_receive(sent))
        return [m.metadata.message_id for m in sent]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        out = [m for m in self._waiting if m.metadata.reply_to_message_id in wanted]
        self._waiting = [m for m in self._waiting if m.metadata.reply_to_message_id not in wanted]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError
