"""The coordinator's bootstrap does not wait for Flower's polling (issue 14 item 6: short rounds).

Flower's legacy workflow refreshes its node list on ``all``/``num_available``/``sample`` and otherwise
every 5 s; :class:`RefreshingClientManager` makes the first round's ``wait_for`` see partners that are
already connected at once. :func:`query_partners` asks every partner in one batch, so that deployed
partners answer in parallel. The grid below is Flower's :class:`Grid` interface answering from a
table (the transport is not under test; the client manager, Flower's own refresh thread and the
bootstrap code are).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import Message
from flwr.common import Code, GetPropertiesRes, Status
from flwr.compat.common import recorddict_compat as compat
from flwr.server import SimpleClientManager
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsocial.server.federation import QuorumError, RefreshingClientManager, query_partners


class TableGrid(Grid):
    """Nodes that are connected, answering each GET_PROPERTIES with their partner id; records batches."""

    def __init__(self, node_ids: Iterable[int], silent: Iterable[int] = ()) -> None:
        self.node_ids = sorted(node_ids)
        self.silent = set(silent)
        self.batches: list[list[int]] = []
        self._run = Run.create_empty(run_id=7)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        batch = list(messages)
        self.batches.append([m.metadata.dst_node_id for m in batch])
        res = [GetPropertiesRes(Status(Code.OK, ""), {"partner_id": f"partner-{m.metadata.dst_node_id}"})
               for m in batch]
        return [Message(compat.getpropertiesres_to_recorddict(r), reply_to=m)
                for m, r in zip(batch, res, strict=True) if m.metadata.dst_node_id not in self.silent]


@pytest.fixture
def server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity Flower gives a ServerApp process (a Message needs its run id)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _wait_seconds(manager: SimpleClientManager, grid: Grid, n: int, timeout: int) -> tuple[bool, float]:
    thread, stop, done = start_update_client_manager_thread(grid, manager)  # Flower's own refresh thread
    done.wait()
    t0 = time.monotonic()
    ok = manager.wait_for(n, timeout=timeout)
    elapsed = time.monotonic() - t0
    stop.set()
    thread.join()
    return ok, elapsed


def test_plain_client_manager_does_not_see_connected_nodes_before_flowers_refresh() -> None:
    # Prepare: three connected nodes, Flower's SimpleClientManager (what LegacyContext builds by default)
    grid = TableGrid([11, 12, 13])
    # Execute: wait for them for 1 s, less than the refresh thread's 5 s period
    ok, _ = _wait_seconds(SimpleClientManager(), grid, 3, timeout=1)
    # Assert: the wait times out although every node is connected (the delay the fix removes)
    assert not ok


def test_refreshing_client_manager_sees_connected_nodes_at_once() -> None:
    # Prepare
    grid = TableGrid([11, 12, 13])
    # Execute
    ok, elapsed = _wait_seconds(RefreshingClientManager(), grid, 3, timeout=10)
    # Assert
    assert ok
    assert elapsed < 1.0


@pytest.mark.usefixtures("server_task")
def test_query_partners_asks_every_node_in_one_batch() -> None:
    # Prepare
    grid = TableGrid([5, 3, 9])
    # Execute
    props = query_partners(grid, [3, 5, 9])
    # Assert: one send_and_receive for all three nodes, each reply attributed to its own node
    assert grid.batches == [[3, 5, 9]]
    assert {nid: p["partner_id"] for nid, p in props.items()} == {3: "partner-3", 5: "partner-5", 9: "partner-9"}


@pytest.mark.usefixtures("server_task")
def test_query_partners_names_the_node_that_did_not_answer() -> None:
    # Prepare
    grid = TableGrid([3, 5, 9], silent=[5])
    # Execute / Assert
    with pytest.raises(QuorumError, match="node 5 did not answer"):
        query_partners(grid, [3, 5, 9])
