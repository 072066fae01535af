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
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message
from flwr.common import Code, GetPropertiesRes, Status
from flwr.compat.common import recorddict_compat as compat
from flwr.server import SimpleClientManager
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsocial.server.federation import (
    RefreshingClientManager,
    compute_admitted,
    parse_partner_nodes,
    query_partners,
)
from fedsocial.shared.config import ConfigError
from tests.stub_grid import StubGrid


class TableGrid(StubGrid):
    """Nodes that are connected, answering each GET_PROPERTIES with their partner id; records batches."""

    def __init__(self, node_ids: Iterable[int], silent: Iterable[int] = ()) -> None:
        super().__init__(node_ids)
        self.silent = set(silent)
        self.batches: list[list[int]] = []

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
    props, failed = query_partners(grid, [3, 5, 9])
    # Assert: one send_and_receive for all three nodes, each reply attributed to its own node
    assert grid.batches == [[3, 5, 9]]
    assert {nid: p["partner_id"] for nid, p in props.items()} == {3: "partner-3", 5: "partner-5", 9: "partner-9"}
    assert failed == {}


@pytest.mark.usefixtures("server_task")
def test_query_partners_names_the_node_that_did_not_answer_and_keeps_the_others() -> None:
    # Prepare
    grid = TableGrid([3, 5, 9], silent=[5])
    # Execute
    props, failed = query_partners(grid, [3, 5, 9])
    # Assert: one silent node is that node's refusal, not the end of the run (the quorum decides)
    assert sorted(props) == [3, 9]
    assert list(failed) == [5] and "did not answer get_properties" in failed[5]


def _registration(pid: str, names: str = "a,b", users: int = 10) -> dict[str, Any]:
    return {"partner_id": pid, "param_names": names, "num_users": users}


def test_the_bootstrap_admits_valid_unique_registrations_with_the_names_most_declare() -> None:
    # Prepare: node 1 (first) declares other parameter names, nodes 4 and 5 one id, node 6 garbage
    props = {1: _registration("p1", "x"), 2: _registration("p2"), 3: _registration("p3"), 4: _registration("p4"),
             5: _registration("p4"), 6: {"partner_id": "../etc", "num_users": [1]}}
    # Execute
    admitted, refused = compute_admitted(props)
    # Assert: the run's names are the majority's, not the first node's; each refusal says why
    assert {nid: r.partner_id for nid, r in admitted.items()} == {2: "p2", 3: "p3"}
    assert all(r.param_names == ("a", "b") for r in admitted.values())
    assert "declares other shared parameters" in refused[1]
    assert "declared by two nodes" in refused[4] and "declared by two nodes" in refused[5]
    assert "partner_id" in refused[6] and "num_users" in refused[6]


def test_a_partner_whose_data_give_other_parameter_shapes_is_refused_at_registration_naming_the_parameter() -> None:
    # Prepare: was: registrations named the shared parameters only, so a partner whose items.csv held one
    # more item (or that lacked user_feature_values.json) registered, the run started from one node's shapes,
    # and the first round failed with a trainer shape error on one side and lost its quorum with "?" as the
    # culprit; here p3 has 401 items where p1 and p2 have 400, and p4 declares no shapes for two names
    shapes = "400x16,400"
    props = {1: {**_registration("p1"), "param_shapes": shapes}, 2: {**_registration("p2"), "param_shapes": shapes},
             3: {**_registration("p3"), "param_shapes": "401x16,401"},
             4: {**_registration("p4"), "param_shapes": "400x16"}, 5: {**_registration("p5"), "param_shapes": "4x-1,2"}}
    # Execute
    admitted, refused = compute_admitted(props)
    # Assert: the majority's shapes start the run; the odd partner is refused naming the first parameter that
    # differs and the files that decide it; malformed shape lists are refused by the protocol
    assert sorted(admitted) == [1, 2] and admitted[1].param_shapes == ((400, 16), (400,))
    assert "p3 declares other shared parameters: a has shape (401, 16), the other partners' (400, 16)" in refused[3]
    assert "items.csv" in refused[3] and "user_feature_values.json" in refused[3]
    assert "param_shapes: 1 shapes for 2 parameter names" in refused[4]
    assert "param_shapes: '4x-1' is not a shape" in refused[5]


def test_partner_nodes_parses_pins_and_refuses_malformed_ones() -> None:
    # Execute / Assert
    assert parse_partner_nodes("") == {}
    assert parse_partner_nodes(" partner_0=17, partner_1=4 ,") == {"partner_0": 17, "partner_1": 4}
    for bad in ("partner_0", "partner_0=x", "=5", "a=1,a=2", "a=1,b=1"):
        with pytest.raises(ConfigError, match="run config partner-nodes"):
            parse_partner_nodes(bad)
    with pytest.raises(ConfigError, match="expected a string"):
        parse_partner_nodes(5)


def test_a_node_declaring_a_partner_pinned_to_another_node_is_refused_at_the_bootstrap() -> None:
    # Prepare: node auth proves only that a node holds a registered key (was: a SuperNode started with another
    # partner's node config ran as that partner, its data path and ledger, when the real one was offline);
    # p1 is pinned to node 1, node 7 declares it; p9 is pinned to no node
    props = {2: _registration("p2"), 3: _registration("p3"), 7: _registration("p1"), 9: _registration("p9")}
    pins = {"p1": 1, "p2": 2, "p3": 3}
    # Execute
    admitted, refused = compute_admitted(props, pins)
    unpinned, _ = compute_admitted(props)
    # Assert
    assert sorted(admitted) == [2, 3] and sorted(unpinned) == [2, 3, 7, 9]
    assert refused[7] == "registration refused: node 7 declares p1, whose SuperNode the run config pins to node 1"
    assert "'p9' is not among the run config's partner-nodes" in refused[9]


def test_a_late_registration_is_held_to_the_pins_too(tmp_path: Path) -> None:
    # Prepare: the strategy registers a node first sampled after the start
    import numpy as np

    from fedsocial.server.strategy import FedSocialStrategy
    from fedsocial.shared.config import Config
    from tests.test_strategy import NAMES

    cfg = Config().replace("federation", partners=2, rounds=1, min_partners=1, clipping_norm=1.0)
    initial = [np.zeros((5, 3), np.float32), np.zeros(5, np.float32)]
    strategy = FedSocialStrategy(cfg, tmp_path, NAMES, initial, partner_nodes={"partner-0": 10, "partner-1": 11})
    reg = {"param_names": ",".join(NAMES), "num_users": 10}
    # Execute
    strategy.register_all({12: {**reg, "partner_id": "partner-0"}, 11: {**reg, "partner_id": "partner-1"}})
    # Assert
    assert strategy.node_partner == {11: "partner-1"}
    assert "whose SuperNode the run config pins to node 10" in strategy.refused_nodes[12]
