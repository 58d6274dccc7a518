"""Graceful stop of the sidecar (SIGTERM): hand leadership over, let the engine drain, stop.

A leader that simply vanishes leaves the cluster without a leader for a whole election
timeout plus the time followers need to notice. Handing over first (Raft's TimeoutNow, which
PySyncObj offers as transferLeadership) makes the most up-to-date follower start an election
at once, so a new leader exists within a few round trips. The local engine usually receives
SIGTERM at the same time and finishes its in-flight requests through this sidecar, so the
RaftNode service keeps serving until the engine is gone (bounded). Every step is bounded:
the whole stop never takes longer than ShutdownConfig.total.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from pysyncobj import FAIL_REASON

from .applier import Applier
from .node import RaftKVNode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShutdownConfig:
    handover: float = 3.0        # trying to hand leadership over
    new_leader_wait: float = 0.5  # after one accepted transfer request, waiting for its election
    engine_drain: float = 5.0    # keep serving the local engine until it is gone
    total: float = 9.5           # everything, including closing servers and threads
    retry_every: float = 0.01    # the target was a few entries behind: try again soon


class TickRunner:
    """Runs callables on PySyncObj's tick thread, where Raft state may be touched safely.

    PySyncObj's tick callbacks run under a plain lock, so a callback cannot remove itself;
    this one stays registered and drains a queue.
    """

    def __init__(self, node: RaftKVNode) -> None:
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        node.addOnTickCallback(self._drain)

    def _drain(self) -> None:
        while self._queue:
            fn = self._queue.popleft()
            try:
                fn()
            except Exception:  # noqa: BLE001 - never break the tick thread
                log.exception("tick-thread call failed")

    def submit(self, fn: Callable[[], None]) -> None:
        """fn() on the tick thread, soon; in submission order with call()."""
        self._queue.append(fn)

    async def call(self, fn: Callable[[Callable[[Any, int], None]], None], timeout: float) -> int:
        """fn(callback) on the tick thread; returns the FAIL_REASON its callback reports."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def done(_res: Any, err: int) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(err))

        self._queue.append(lambda: fn(done))
        return await asyncio.wait_for(fut, timeout)


class AppendPause:
    """Keeps the leader from appending new commands while leadership is handed over.

    The target must have every entry of the leader when it asks for votes: the outgoing
    leader only votes for a log at least as long as its own, and the other followers ignore
    vote requests while they still hear the leader (leader stickiness, node.py). Commands
    that arrive meanwhile stay in PySyncObj's queue; once this node is a follower they are
    forwarded to the new leader (its own engine's) or answered NOT_LEADER (forwarded ones,
    which their engines retry under the same sequence number).
    Shadowing the method on the instance is enough: the tick loop calls it through self.
    """

    def __init__(self, node: RaftKVNode) -> None:
        self._node = node

    def pause(self) -> None:  # on the tick thread
        self._node._checkCommandsToApply = lambda: None  # type: ignore[method-assign]

    def resume(self) -> None:  # on the tick thread
        self._node.__dict__.pop("_checkCommandsToApply", None)


async def hand_over_leadership(node: RaftKVNode, cfg: ShutdownConfig) -> str | None:
    """If this node leads, make an up-to-date follower take over. Returns the new leader's
    address, or None (not the leader, no follower could take over in time)."""
    if not node._isLeader():
        return None
    me = node.selfNode.address
    runner = TickRunner(node)
    pause = AppendPause(node)
    started = time.monotonic()
    deadline = started + cfg.handover
    attempts = denied = 0
    runner.submit(pause.pause)
    try:
        while time.monotonic() < deadline and node._isLeader():
            attempts += 1
            try:
                err = await runner.call(lambda cb: node.transferLeadership(callback=cb),
                                        timeout=max(deadline - time.monotonic(), 0.05))
            except asyncio.TimeoutError:
                break
            if err == FAIL_REASON.SUCCESS:
                wait_until = min(time.monotonic() + cfg.new_leader_wait, deadline)
                while time.monotonic() < wait_until:
                    leader = node.leader_address()
                    if not node._isLeader() and leader and leader != me:
                        log.info("handed leadership to %s in %.0f ms (%d attempts, %d until a follower "
                                 "had every entry)", leader, (time.monotonic() - started) * 1000, attempts, denied)
                        return leader
                    await asyncio.sleep(0.005)
            elif err == FAIL_REASON.REQUEST_DENIED:
                denied += 1  # no connected follower, or none has every entry yet
                if not _any_peer_connected(node):
                    break  # the others are gone or stopping too: nobody to hand over to
                await asyncio.sleep(cfg.retry_every)
            else:
                break  # NOT_LEADER: no longer the leader
    finally:
        runner.submit(pause.resume)
    leader = node.leader_address()
    if leader and leader != me and not node._isLeader():
        log.info("leadership moved to %s while stopping", leader)
        return leader
    log.warning("could not hand leadership over within %.1fs (%d attempts, %d denied); "
                "the others will elect a leader after their election timeout", cfg.handover, attempts, denied)
    return None


def _any_peer_connected(node: RaftKVNode) -> bool:
    try:
        return any(node.isNodeConnected(n) for n in list(node.otherNodes))
    except Exception:  # noqa: BLE001 - a membership change raced with us: assume yes
        return True


async def wait_engine_gone(applier: Applier, timeout: float) -> bool:
    """True once the local engine's StateMachine no longer answers (it stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await applier.engine_applied_index(timeout=0.5)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return True
        await asyncio.sleep(0.05)
    return False
