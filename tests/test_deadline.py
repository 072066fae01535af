"""The straggler deadline (server/deadline.py): who is waited for, and for how long, on a fake clock."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsocial.server import deadline
from fedsocial.server.deadline import MISSED_DEADLINE_CODE, collect_replies, compute_wait_s
from fedsocial.server.screening import SCREEN_ERROR_CODE, ScreenedGrid
from fedsocial.shared.config import Config, ConfigError, FederationConfig
from fedsocial.simulations.simulate import compute_straggler_note
from tests.stub_grid import StubGrid


class Clock:
    """Simulated time: ``sleep`` moves it on and records each sleep."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []  # type: ignore[var-annotated]

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


class TimedGrid(StubGrid):
    """Node n's reply is ready ``delay[n]`` s after the push (never where it is None); ``failing`` nodes
    answer with an error, as the SuperLink does for a node it declared offline."""

    def __init__(self, delay: dict[int, float | None], clock: Clock, failing: Iterable[int] = ()) -> None:
        super().__init__(delay)
        self.delay, self.clock, self.failing = delay, clock, set(failing)
        self.ready: list[tuple[float, Message]] = []
        self.pulls = 0
        self.pushed: list[int] = []  # destination of every message pushed

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self.pushed.append(msg.metadata.dst_node_id)
            msg.metadata.__dict__["_message_id"] = f"m{len(self.pushed)}"
            ids.append(msg.metadata.message_id)
            d = self.delay[msg.metadata.dst_node_id]
            if d is not None:
                failed = msg.metadata.dst_node_id in self.failing
                reply = Message(Error(0, "offline"), reply_to=msg) if failed else Message(RecordDict(), reply_to=msg)
                self.ready.append((self.clock.now + d, reply))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        out = [r for t, r in self.ready if t <= self.clock.now and r.metadata.reply_to_message_id in wanted]
        self.ready = [(t, r) for t, r in self.ready if r not in out]
        return out


@pytest.fixture(autouse=True)
def _run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)  # the identity Flower gives a ServerApp process
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _messages(nodes: Iterable[int], message_type: str = "train", group: str = "1") -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type=message_type, group_id=group) for n in nodes]


def _senders(replies: Iterable[Message]) -> list[int]:
    return sorted(r.metadata.src_node_id for r in replies)


def _collect(delay: dict[int, float | None], grace: float, poll: float = 0.1, timeout: float | None = None,
             quorum: int = 2, failing: Iterable[int] = ()) -> tuple[list[Message], Clock]:
    """collect_replies over a TimedGrid of ``delay`` on a fresh fake clock: the replies, and the clock after."""
    clock = Clock()
    grid = TimedGrid(delay, clock, failing)
    got = collect_replies(grid, _messages(delay), timeout=timeout, quorum=quorum, grace=grace, poll=poll,
                          clock=clock, sleep=clock.sleep)
    return got, clock


def test_compute_wait_s_known_values() -> None:
    # Execute / Assert: a poll, clipped to the nearer limit; None once a limit has passed
    assert compute_wait_s(0.0, None, None, 0.1) == 0.1
    assert compute_wait_s(5.0, 5.05, None, 0.1) == pytest.approx(0.05)
    assert compute_wait_s(5.0, 9.0, 5.02, 0.1) == pytest.approx(0.02)
    assert compute_wait_s(5.0, 5.0, None, 0.1) is None
    assert compute_wait_s(6.0, None, 5.5, 0.1) is None


def test_no_grace_waits_for_every_reply() -> None:
    # Prepare: the third node answers 40 s after the others (a SuperLink's offline verdict comes this late)
    delay: dict[int, float | None] = {1: 1.0, 2: 2.0, 3: 42.0}
    # Execute
    got, clock = _collect(delay, grace=0.0, poll=0.5)
    # Assert: all three, no earlier than the last one was ready, polled every 0.5 s
    assert _senders(got) == [1, 2, 3]
    assert 42.0 <= clock.now <= 42.5
    assert max(clock.sleeps) == 0.5


def test_grace_closes_after_the_quorum() -> None:
    # Prepare: two answer within 2 s, the third in 60 s (or never)
    for late in (60.0, None):
        delay: dict[int, float | None] = {1: 1.0, 2: 2.0, 3: late}
        # Execute
        got, clock = _collect(delay, grace=5.0)
        # Assert: the round closes 5 s after the second reply, without the straggler
        assert _senders(got) == [1, 2]
        assert clock.now == pytest.approx(7.0, abs=0.11)


def test_a_straggler_within_the_grace_is_kept() -> None:
    # Prepare
    delay: dict[int, float | None] = {1: 1.0, 2: 2.0, 3: 6.0}
    # Execute
    got, clock = _collect(delay, grace=5.0)
    # Assert: it answered 4 s into a 5 s grace; nothing waits once every reply is in
    assert _senders(got) == [1, 2, 3]
    assert clock.now == pytest.approx(6.0, abs=0.11)


def test_errors_do_not_count_towards_the_quorum() -> None:
    # Prepare: node 2 fails at once; the quorum of 2 successes is met only when node 3 answers at 30 s
    delay: dict[int, float | None] = {1: 1.0, 2: 0.5, 3: 30.0}
    # Execute
    got, clock = _collect(delay, grace=5.0, failing=[2])
    # Assert: the error reply is returned (the workflow counts its failure), and node 3 was waited for
    assert _senders(got) == [1, 2, 3]
    assert [r.has_error() for r in sorted(got, key=lambda r: r.metadata.src_node_id)] == [False, True, False]
    assert clock.now == pytest.approx(30.0, abs=0.11)


def test_timeout_is_respected() -> None:
    # Prepare: only one node ever answers, quorum 2
    delay: dict[int, float | None] = {1: 1.0, 2: None, 3: None}
    # Execute
    got, clock = _collect(delay, grace=5.0, poll=0.5, timeout=12.0)
    # Assert: it gives up at the timeout, not a poll later
    assert _senders(got) == [1]
    assert clock.now == pytest.approx(12.0)


def test_a_single_request_is_waited_for_in_full() -> None:
    # Prepare: one message (a bootstrap query of one node), quorum 2: the quorum is never met, no deadline
    delay: dict[int, float | None] = {1: 20.0}
    # Execute
    got, _ = _collect(delay, grace=1.0, poll=0.5)
    # Assert
    assert _senders(got) == [1]


def test_screened_grid_applies_its_deadline_and_still_screens(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the screen over a timed grid whose third node is a straggler; real time is patched away
    clock = Clock()
    monkeypatch.setattr(deadline, "time", SimpleNamespace(monotonic=clock, sleep=clock.sleep))
    grid = ScreenedGrid(TimedGrid({1: 1.0, 2: 2.0, 3: 100.0}, clock))
    grid.set_deadline(2, 3.0)
    # Execute
    got = list(grid.send_and_receive(_messages([1, 2, 3])))
    # Assert: closed 3 s after the quorum; the replies went through the screen (an empty reply cannot be
    # read by a workflow: it becomes its sender's error, code 4242)
    assert _senders(got) == [1, 2]
    assert all(r.has_error() and r.error.code == SCREEN_ERROR_CODE for r in got)
    assert clock.now == pytest.approx(5.0, abs=0.11)


def test_a_node_that_missed_the_deadline_is_out_of_the_rest_of_its_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: node 3 misses round 1's training deadline
    clock = Clock()
    monkeypatch.setattr(deadline, "time", SimpleNamespace(monotonic=clock, sleep=clock.sleep))
    inner = TimedGrid({1: 1.0, 2: 2.0, 3: 100.0}, clock)
    grid = ScreenedGrid(inner)
    grid.set_deadline(2, 3.0)
    list(grid.send_and_receive(_messages([1, 2, 3], "train", "1")))
    inner.delay[3] = 1.0  # from now on it would answer at once
    # Execute: round 1's evaluation, then round 2's training
    t0 = clock.now
    evaluation = sorted(grid.send_and_receive(_messages([1, 2, 3], "evaluate", "1")),
                        key=lambda r: r.metadata.src_node_id)
    pushed_in_round_1 = list(inner.pushed)
    round_2 = list(grid.send_and_receive(_messages([1, 2, 3], "train", "2")))
    # Assert: node 3 got its error reply without being asked or waited for; round 2 asks it again
    assert _senders(evaluation) == [1, 2, 3]
    assert evaluation[2].has_error() and evaluation[2].error.code == MISSED_DEADLINE_CODE
    assert "missed the straggler deadline" in str(evaluation[2].error.reason)
    assert pushed_in_round_1 == [1, 2, 3, 1, 2]
    assert clock.now - t0 < 2.0 + 3.0  # no grace was spent on node 3 in the evaluation
    assert _senders(round_2) == [1, 2, 3] and inner.pushed[5:] == [1, 2, 3]
    assert not any(r.has_error() and r.error.code == MISSED_DEADLINE_CODE for r in round_2)


def test_no_grace_keeps_every_node_in_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: no deadline; node 3 does not answer the first request within its timeout
    clock = Clock()
    monkeypatch.setattr(deadline, "time", SimpleNamespace(monotonic=clock, sleep=clock.sleep))
    inner = TimedGrid({1: 1.0, 2: 1.0, 3: None}, clock)
    grid = ScreenedGrid(inner)
    grid.set_deadline(2, 0.0)
    # Execute
    first = list(grid.send_and_receive(_messages([1, 2, 3], "train", "1"), timeout=5.0))
    inner.delay[3] = 0.5
    again = list(grid.send_and_receive(_messages([1, 2, 3], "evaluate", "1"), timeout=5.0))
    # Assert: without a deadline nothing is marked missed; node 3 is asked again and answers
    assert _senders(first) == [1, 2] and _senders(again) == [1, 2, 3]
    assert inner.pushed == [1, 2, 3, 1, 2, 3]


def test_straggler_grace_is_validated() -> None:
    # Execute / Assert: a typed error naming the field
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="federation.straggler_grace"):
            FederationConfig(straggler_grace=bad)
    assert FederationConfig(straggler_grace=20.0).straggler_grace == 20.0


def test_a_simulation_with_fewer_actors_than_partners_is_warned_of_the_deadline() -> None:
    # Prepare: 5 partners, quorum 2, a 10 s grace
    cfg = Config(federation=FederationConfig(partners=5, min_partners=2, straggler_grace=10.0))
    # Execute
    queued, enough, off = (compute_straggler_note(cfg, 2), compute_straggler_note(cfg, 5),
                           compute_straggler_note(cfg.replace("federation", straggler_grace=0.0), 2))
    # Assert: queued partners would miss it; with an actor each, or no deadline, nothing to say
    assert "5 partners on 2 actor(s)" in queued and "miss the deadline" in queued and "set it to 0" in queued
    assert enough == "" and off == ""
