"""ReadIndex (Raft dissertation §6.4): a linearizable read point without a log entry.

A read barrier used to be a no-op entry: a journal write and fdatasync on every node
and an apply round trip to every engine, for each barrier. ReadIndex gets the same
guarantee from one round of messages:

1. the leader takes its commit index as the read index, once an entry of its own
   term is committed (before that its commit index may lag the previous leader's);
2. it confirms it is still the leader: a majority acknowledges a probe sent after
   the read arrived, in the leader's term. A node that acks in term T has voted in
   no later term, so no newer leader can have existed when the majority acked;
3. the asking node answers once it has applied up to the read index.

Every read that arrives while a probe is in flight joins the next probe, so one
round serves any number of reads. All state here lives on PySyncObj's tick thread:
requests come in through a queue and the pipe notifier, answers go out through
callbacks that the caller must make thread-safe.
"""
from __future__ import annotations

import collections
import itertools
import logging
from dataclasses import dataclass, field
from time import monotonic as monotonic_time
from typing import TYPE_CHECKING, Any, Callable

from pysyncobj import FAIL_REASON

if TYPE_CHECKING:
    from .node import RaftKVNode

log = logging.getLogger(__name__)

# Message types; PySyncObj's own handler never sees them.
REQUEST = "ri_request"    # follower -> leader: {"id"}
PROBE = "ri_probe"        # leader -> all: {"term", "seq"}
ACK = "ri_ack"            # all -> leader: {"term", "seq"}
ANSWER = "ri_answer"      # leader -> follower: {"id", "index"} or {"id", "error"}
MESSAGE_TYPES = frozenset((REQUEST, PROBE, ACK, ANSWER))

# callback(index, FAIL_REASON): index is the last index handed to the applier once
# the node has applied through the read index, so waiting for the engine to have
# applied it is enough.
Callback = Callable[[Any, int], None]


@dataclass
class _Probe:
    seq: int
    term: int
    index: int
    started: float
    acks: set = field(default_factory=set)
    waiting: list = field(default_factory=list)  # (node or None, request id or callback)


class ReadIndex:
    """The tick-thread half. The node routes ri_* messages here and calls tick()."""

    def __init__(self, node: "RaftKVNode", probe_timeout: float, give_up: float) -> None:
        self._node = node
        self._probe_timeout = probe_timeout
        self._give_up = give_up  # the asking side forgets a read after this long
        self._incoming: collections.deque[Callback] = collections.deque()
        self._ids = itertools.count(1)
        self._seqs = itertools.count(1)
        # leader side
        self._queued: list[tuple[Any, Any]] = []  # (node or None, request id or callback)
        self._probe: _Probe | None = None
        # asking side
        self._asked: dict[int, tuple[Callback, float, Any]] = {}  # id -> (callback, sent, leader asked)
        self._to_apply: list[tuple[int, Callback, float]] = []  # (read index, callback, since)

    # -- any thread -----------------------------------------------------------------------
    def request(self, callback: Callback) -> None:
        self._incoming.append(callback)
        self._node.wake()

    # -- tick thread ------------------------------------------------------------------------
    def tick(self) -> None:
        if not (self._incoming or self._asked or self._queued or self._probe or self._to_apply):
            return  # the common case: PySyncObj ticks for every message batch
        node = self._node
        now = monotonic_time()
        leader = node._isLeader()
        while self._incoming:
            callback = self._incoming.popleft()
            if leader:
                self._queued.append((None, callback))
            elif (leader_node := node._getLeader()) is not None:
                request_id = next(self._ids)
                self._asked[request_id] = (callback, now, leader_node)
                if not node.send(leader_node, {"type": REQUEST, "id": request_id}):
                    del self._asked[request_id]
                    callback(None, FAIL_REASON.MISSING_LEADER)  # no connection to the leader
            else:
                callback(None, FAIL_REASON.MISSING_LEADER)
        if self._asked:
            # An answer from a leader that crashed or was replaced never comes: fail
            # such reads at once (the engine retries them) rather than at the timeout.
            current = node._getLeader()
            for request_id, (callback, sent, asked) in list(self._asked.items()):
                if asked != current or now - sent > self._give_up:
                    del self._asked[request_id]
                    callback(None, FAIL_REASON.LEADER_CHANGED)
        if leader:
            self._lead(now)
        elif self._probe is not None or self._queued:
            self._fail_leader_side(FAIL_REASON.NOT_LEADER)
        if self._to_apply:
            self._answer_applied()
            if self._to_apply and now - self._to_apply[0][2] > self._give_up:
                stale = [entry for entry in self._to_apply if now - entry[2] > self._give_up]
                self._to_apply = [entry for entry in self._to_apply if now - entry[2] <= self._give_up]
                for _, callback, _ in stale:
                    callback(None, FAIL_REASON.LEADER_CHANGED)

    def on_message(self, sender: Any, message: dict) -> None:
        node = self._node
        kind = message["type"]
        if kind == PROBE:
            # Ack only the leader of our own term; a stale or newer term gets silence.
            if message.get("term") == node.raftCurrentTerm and not node._isLeader():
                node.send(sender, {"type": ACK, "term": message["term"], "seq": message.get("seq")})
        elif kind == ACK:
            probe = self._probe
            if probe is not None and message.get("seq") == probe.seq \
                    and message.get("term") == probe.term == node.raftCurrentTerm:
                probe.acks.add(sender)
                self._lead(monotonic_time())
        elif kind == REQUEST:
            if node._isLeader():
                self._queued.append((sender, message.get("id")))
                self._lead(monotonic_time())
            else:
                node.send(sender, {"type": ANSWER, "id": message.get("id"), "error": FAIL_REASON.NOT_LEADER})
        elif kind == ANSWER:
            entry = self._asked.pop(message.get("id"), None)
            if entry is None:
                return
            callback = entry[0]
            if "error" in message:
                callback(None, message["error"])
            else:
                self._to_apply.append((int(message["index"]), callback, monotonic_time()))
                self._answer_applied()

    # -- leader side ------------------------------------------------------------------------
    def _lead(self, now: float) -> None:
        node = self._node
        probe = self._probe
        if probe is not None:
            voters = len(node.otherNodes) + 1
            if probe.term != node.raftCurrentTerm:
                self._fail_leader_side(FAIL_REASON.LEADER_CHANGED)
                return
            if 2 * (len(probe.acks & set(node.otherNodes)) + 1) > voters:
                self._probe = None
                for sender, handle in probe.waiting:
                    self._answer(sender, handle, probe.index)
            elif now - probe.started > self._probe_timeout:
                # A probe or its acks were lost (a reconnect), or this leader is cut off:
                # probe again. A cut-off leader steps down after leaderFallbackTimeout,
                # which fails the reads; the askers' own timeouts bound the wait.
                self._probe = None
                self._queued = probe.waiting + self._queued
            else:
                return
        if not self._queued or not node.committed_in_own_term():
            return
        probe = _Probe(seq=next(self._seqs), term=node.raftCurrentTerm,
                       index=node.raftCommitIndex, started=now, waiting=self._queued)
        self._queued = []
        self._probe = probe
        others = list(node.otherNodes)
        if not others:
            self._lead(now)
            return
        for other in others:
            node.send(other, {"type": PROBE, "term": probe.term, "seq": probe.seq})

    def _answer(self, sender: Any, handle: Any, index: int) -> None:
        if sender is None:
            self._to_apply.append((index, handle, monotonic_time()))
            self._answer_applied()
        else:
            self._node.send(sender, {"type": ANSWER, "id": handle, "index": index})

    def _refuse(self, sender: Any, handle: Any, reason: int) -> None:
        if sender is None:
            handle(None, reason)
        else:
            self._node.send(sender, {"type": ANSWER, "id": handle, "error": reason})

    def _fail_leader_side(self, reason: int) -> None:
        waiting = list(self._queued)
        if self._probe is not None:
            waiting += self._probe.waiting
        self._queued = []
        self._probe = None
        for sender, handle in waiting:
            self._refuse(sender, handle, reason)

    # -- asking side ------------------------------------------------------------------------
    def _answer_applied(self) -> None:
        applied = self._node.raftLastApplied
        ready = [entry[1] for entry in self._to_apply if entry[0] <= applied]
        if not ready:
            return
        self._to_apply = [entry for entry in self._to_apply if entry[0] > applied]
        submitted = self._node.applier_submitted()
        for callback in ready:
            callback(submitted, FAIL_REASON.SUCCESS)
