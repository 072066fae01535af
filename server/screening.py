"""Replies screened before Flower's workflows read them.

Flower's legacy workflows (``DefaultWorkflow``, ``SecAggPlusWorkflow``) convert each reply with
``recorddict_compat`` and index its records directly: a reply without its ``fitres.*`` records, with a
list where a scalar belongs, a status code that is none, SecAgg+ lists of unequal length, masked arrays
of another shape or shares for a node that was never sampled raised inside the workflow and ended the
run on one partner's reply. :class:`ScreenedGrid` wraps the ServerApp's grid: a reply that
:func:`compute_reply_problem` cannot accept becomes its sender's error reply, which the workflows count
as a failure (SecAgg+ as a dropout) and the strategy records with its reason.

The screen checks what the workflows will read, not whether it is honest: the strategy and
:mod:`shared.protocol` judge the content of a readable reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import Error, Message
from flwr.app.message_type import MessageType
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsocial.server.aggregation import ParamSpec, compute_npy_header
from fedsocial.server.deadline import MISSED_DEADLINE_CODE, POLL_S, collect_replies

log = logging.getLogger("fedsocial.server")

SCREEN_ERROR_CODE = 4242  # a reply refused by the screen (Flower's own codes are below 1000)


def _records(msg: Message, name: str) -> Any:
    return msg.content.config_records.get(name)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list_of(v: object, kind: type) -> bool:
    return isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)


def _legacy_problem(message_type: str, reply: Message) -> str | None:
    """Why Flower's legacy conversion of ``reply`` would raise (or give a count that is no count)."""
    convert: dict[str, Callable[[Any], Any]] = {
        MessageType.TRAIN: lambda c: compat.recorddict_to_fitres(c, keep_input=True),
        MessageType.EVALUATE: compat.recorddict_to_evaluateres,
        MessageTypeLegacy.GET_PROPERTIES: compat.recorddict_to_getpropertiesres,
        MessageTypeLegacy.GET_PARAMETERS: lambda c: compat.recorddict_to_getparametersres(c, keep_input=True),
    }
    if message_type not in convert:
        return None
    try:
        res = convert[message_type](reply.content)
    except (KeyError, TypeError, ValueError) as exc:  # a missing record, a list for a scalar, no such code
        return f"unreadable {message_type} reply: {type(exc).__name__}: {exc}"
    count = getattr(res, "num_examples", 0)
    if not _is_int(count):
        return f"unreadable {message_type} reply: num_examples {count!r} is not an integer"
    return None


def _secagg_problem(request: Message, reply: Message, expected: Sequence[ParamSpec]) -> str | None:
    """Why ``SecAggPlusWorkflow`` could not read ``reply`` to the stage ``request`` asked for."""
    asked = _records(request, RECORD_KEY_CONFIGS)
    got = _records(reply, RECORD_KEY_CONFIGS)
    stage = asked.get(Key.STAGE) if asked is not None else None
    if got is None:
        return f"SecAgg+ {stage}: the reply has no {RECORD_KEY_CONFIGS} record"
    if stage == Stage.SETUP:
        if not all(isinstance(got.get(k), bytes) for k in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2)):
            return "SecAgg+ setup: public keys missing or not bytes"
    elif stage == Stage.SHARE_KEYS:
        dsts, ctxts = got.get(Key.DESTINATION_LIST), got.get(Key.CIPHERTEXT_LIST)
        if not (_list_of(dsts, int) and _list_of(ctxts, bytes) and len(dsts) == len(ctxts)):  # type: ignore[arg-type]
            return "SecAgg+ share_keys: destinations and ciphertexts are not two lists of equal length"
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        masked = got.get(Key.MASKED_PARAMETERS)
        if not _list_of(masked, bytes):
            return "SecAgg+ collect_masked_vectors: masked parameters are not a list of bytes"
        shapes = [(1,), *(s.shape for s in expected)]  # the weight factor, then each shared parameter
        if len(masked) != len(shapes):  # type: ignore[arg-type]
            return f"SecAgg+ collect_masked_vectors: {len(masked)} masked arrays, expected {len(shapes)}"  # type: ignore[arg-type]
        for i, (raw, shape) in enumerate(zip(masked, shapes, strict=True)):  # type: ignore[arg-type]
            header = compute_npy_header(raw)
            if isinstance(header, str) or header[0] != shape or header[2].kind not in "iu":
                return f"SecAgg+ collect_masked_vectors: masked array {i} is not an integer array of shape {shape}"
        return _legacy_problem(MessageType.TRAIN, reply)
    elif stage == Stage.UNMASK:
        nids, shares = got.get(Key.NODE_ID_LIST), got.get(Key.SHARE_LIST)
        if not (_list_of(nids, int) and _list_of(shares, bytes) and len(nids) == len(shares)):  # type: ignore[arg-type]
            return "SecAgg+ unmask: node ids and shares are not two lists of equal length"
        known = set(asked.get(Key.ACTIVE_NODE_ID_LIST, [])) | set(asked.get(Key.DEAD_NODE_ID_LIST, []))
        if not set(nids) <= known:  # type: ignore[arg-type]
            return "SecAgg+ unmask: shares for nodes this node was not asked about"
    return None


def compute_reply_problem(request: Message, reply: Message, expected: Sequence[ParamSpec] = ()) -> str | None:
    """Why the workflow that sent ``request`` cannot read ``reply`` (None: it can, or it is an error reply).

    ``expected``: the shared parameters (the masked vectors of SecAgg+ have their shapes).
    """
    if reply.has_error():
        return None
    if not reply.has_content():
        return "a reply with neither content nor error"
    message_type = request.metadata.message_type
    if reply.metadata.message_type != message_type:
        return f"a {reply.metadata.message_type!r} reply to a {message_type!r} request"
    if message_type == MessageType.TRAIN and _records(request, RECORD_KEY_CONFIGS) is not None:
        return _secagg_problem(request, reply, expected)
    return _legacy_problem(message_type, reply)


def compute_screened(request: Message | None, reply: Message, expected: Sequence[ParamSpec] = ()) -> Message:
    """``reply``, or its sender's error reply naming why the workflow could not read it. An error reply is
    given its sender's node id (Flower's legacy workflows keep only the error's text, so the run's record could not
    say whose reply failed)."""
    if request is not None and reply.has_error() and not (reply.error.reason or "").startswith("node "):
        return Message(Error(reply.error.code, f"node {reply.metadata.src_node_id}: {reply.error.reason or ''}"),
                       reply_to=request)
    problem = None if request is None else compute_reply_problem(request, reply, expected)
    if problem is None or request is None:
        return reply
    reason = f"refused by the server: node {reply.metadata.src_node_id}: {problem}"
    return Message(Error(SCREEN_ERROR_CODE, reason), reply_to=request)


class ScreenedGrid(Grid):
    """The ServerApp's grid, with every reply of ``send_and_receive`` screened (:func:`compute_screened`).

    ``expected`` gives the shared parameters once known (the bootstrap learns them from a registration).
    Replies are collected by :func:`server.deadline.collect_replies`: ``quorum`` and ``grace`` (seconds) are
    the straggler deadline, set from the config by :meth:`set_deadline` (until then: wait for every reply).
    A node that missed the deadline is out of the rest of that round (the messages' ``group_id``), as a
    device that drops out is in Bonawitz et al. 2019: later requests of the round get its error reply at
    once instead of a second wait (the federated evaluation after a training stage it missed).
    """

    def __init__(self, grid: Grid, expected: Callable[[], Sequence[ParamSpec]] = lambda: ()) -> None:
        self.inner, self.expected = grid, expected
        self.quorum, self.grace = 1, 0.0
        self.missed: tuple[str, set[int]] = ("", set())  # (round's group_id, nodes that missed its deadline)
        self.on_missed: Callable[[int], None] = lambda nid: None

    def set_deadline(self, quorum: int, grace: float, on_missed: Callable[[int], None] = lambda nid: None) -> None:
        """Once ``quorum`` partners have answered a request, the others have ``grace`` s (0: no deadline);
        ``on_missed(node_id)`` for each node that missed it (the round's record names it)."""
        self.quorum, self.grace, self.on_missed = quorum, grace, on_missed

    def __getattr__(self, name: str) -> Any:  # anything else a runtime's grid has
        return getattr(self.inner, name)

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    def _collect(self, sent: list[Message], timeout: float | None) -> list[Message]:
        """The replies within the deadline; a node that missed it earlier in the round is not asked again."""
        group = sent[0].metadata.group_id if sent else ""
        if self.missed[0] != group:
            self.missed = (group, set())
        skipped = [Message(Error(MISSED_DEADLINE_CODE, f"node {m.metadata.dst_node_id} missed the straggler deadline "
                                 f"earlier in round {group}"), reply_to=m)
                   for m in sent if m.metadata.dst_node_id in self.missed[1]]
        ask = [m for m in sent if m.metadata.dst_node_id not in self.missed[1]]
        poll = min(POLL_S, float(getattr(self.inner, "pull_interval", POLL_S)))  # in-memory grid: its own
        replies = collect_replies(self.inner, ask, timeout=timeout, quorum=self.quorum, grace=self.grace,
                                  poll=poll) if ask else []
        if self.grace > 0:
            late = {m.metadata.dst_node_id for m in ask} - {r.metadata.src_node_id for r in replies}
            for nid in sorted(late):
                log.warning("round %s: node %d missed the straggler deadline (%.1f s after %d partners answered); "
                            "it is out of the rest of the round", group, nid, self.grace, self.quorum)
                self.on_missed(nid)
            self.missed[1].update(late)
        return [*replies, *skipped]

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # type: ignore[override]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        by_node = {m.metadata.dst_node_id: m for m in sent}
        if isinstance(self.inner, ScreenedGrid):  # a screen over the run's grid: its deadline and screen first
            replies = list(self.inner.send_and_receive(sent, timeout=timeout))
        else:
            replies = self._collect(sent, timeout)
        expected = self.expected()
        return [compute_screened(by_node.get(r.metadata.src_node_id), r, expected) for r in replies]
