"""gRPC RaftNode service: the engine's way into the replicated log."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable

import grpc
from pysyncobj import FAIL_REASON

from raftkv.pb import consensus_pb2 as pb
from raftkv.pb import consensus_pb2_grpc as pb_grpc

from .applier import Applier
from .config import SidecarConfig
from .node import RaftKVNode

log = logging.getLogger(__name__)

# PySyncObj outcomes, split into definite failures and ambiguous ones (note §3):
# an ambiguous command may still commit, so it must never be reported as failed.
_OUTCOME = {
    FAIL_REASON.QUEUE_FULL: (pb.OVERLOADED, "the Raft queue is full"),
    FAIL_REASON.MISSING_LEADER: (pb.NO_LEADER, "no Raft leader is known (election in progress or no quorum)"),
    FAIL_REASON.DISCARDED: (pb.NOT_APPLIED, "the entry was overwritten by a new leader; not applied"),
    FAIL_REASON.NOT_LEADER: (pb.NOT_APPLIED, "the forward reached a node that is no longer leader; not applied"),
    FAIL_REASON.REQUEST_DENIED: (pb.BAD_REQUEST, "request denied"),
    FAIL_REASON.LEADER_CHANGED: (pb.OUTCOME_UNKNOWN, "outcome unknown: the leader changed; it may still commit"),
    FAIL_REASON.UNKNOWN_OUTCOME: (pb.OUTCOME_UNKNOWN, "outcome unknown: stale reply from a former leader"),
}


# A read index changes nothing, so every failure is safe to retry (the engine does).
_READ_OUTCOME = {
    FAIL_REASON.MISSING_LEADER: (pb.NO_LEADER, "no Raft leader is known (election in progress or no quorum)"),
    FAIL_REASON.NOT_LEADER: (pb.NO_LEADER, "the read reached a node that is no longer leader"),
    FAIL_REASON.LEADER_CHANGED: (pb.OUTCOME_UNKNOWN, "the leader changed or lost its majority during the read"),
}


class RaftOutcome(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


async def call_replicated(method: Callable[..., Any], *args: Any, timeout: float,
                          outcomes: dict = _OUTCOME,
                          late: str = "outcome unknown: not committed within {timeout:.1f}s; it may still commit",
                          ) -> Any:
    """Runs a call that answers on PySyncObj's tick thread through `callback(result,
    FAIL_REASON)` (a replicated method, a read index) from asyncio; returns its result
    or raises RaftOutcome, with `outcomes` and `late` saying what a failure means."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[tuple[Any, int]] = loop.create_future()

    def done(res: Any, err: int) -> None:
        loop.call_soon_threadsafe(_settle, fut, (res, err))

    try:
        method(*args, callback=done)
    except Exception as exc:  # raised after the command may have been queued (note §7)
        raise RaftOutcome(pb.OUTCOME_UNKNOWN, f"outcome unknown: {exc!r}") from None
    try:
        res, err = await asyncio.wait_for(asyncio.shield(fut), timeout)
    except asyncio.TimeoutError:
        raise RaftOutcome(pb.OUTCOME_UNKNOWN, late.format(timeout=timeout)) from None
    if err != FAIL_REASON.SUCCESS:
        code, message = outcomes.get(err, (pb.OUTCOME_UNKNOWN, f"outcome unknown: reason {err}"))
        raise RaftOutcome(code, message)
    return res


def _settle(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


class RaftNodeService(pb_grpc.RaftNodeServicer):
    def __init__(self, cfg: SidecarConfig, node: RaftKVNode, applier: Applier) -> None:
        self._cfg = cfg
        self._node = node
        self._applier = applier

    async def Propose(self, request: pb.Command, context: grpc.aio.ServicerContext) -> pb.ProposeResponse:
        return await self._propose(request)

    async def ReadBarrier(self, request: pb.ReadBarrierRequest,
                          context: grpc.aio.ServicerContext) -> pb.ReadBarrierResponse:
        return await self._read_barrier(request)

    async def Pipeline(self, request_iterator: AsyncIterator[pb.PipelineRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PipelineReply]:
        """Propose and ReadBarrier on one stream; each request runs as its own task,
        so a slow proposal never holds up a barrier behind it."""
        replies: asyncio.Queue[pb.PipelineReply | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.PipelineRequest) -> None:
            kind = request.WhichOneof("body")
            if kind == "propose":
                reply = pb.PipelineReply(call=request.call, propose=await self._propose(request.propose))
            elif kind == "read_barrier":
                reply = pb.PipelineReply(call=request.call,
                                         read_barrier=await self._read_barrier(request.read_barrier))
            else:
                reply = pb.PipelineReply(call=request.call, propose=pb.ProposeResponse(
                    success=False, code=pb.BAD_REQUEST, error="empty pipeline request"))
            replies.put_nowait(reply)

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _propose(self, request: pb.Command) -> pb.ProposeResponse:
        if not request.batch and request.op.upper() not in ("SET", "DELETE"):
            return pb.ProposeResponse(success=False, code=pb.BAD_REQUEST, error=f"unknown op {request.op!r}")
        started = time.monotonic()
        try:
            with self._applier.expecting():
                index = await call_replicated(self._node.propose, request.SerializeToString(),
                                              timeout=self._cfg.propose_timeout)
                await self._wait_applied(index, started)
        except RaftOutcome as out:
            return pb.ProposeResponse(success=False, code=out.code, error=str(out))
        return pb.ProposeResponse(success=True, index=index)

    async def _read_barrier(self, request: pb.ReadBarrierRequest) -> pb.ReadBarrierResponse:
        started = time.monotonic()
        try:
            with self._applier.expecting():
                if request.mode == pb.LEADER:
                    index = await self._leader_index(started)
                else:
                    # ReadIndex: the leader's commit index, confirmed by a majority that
                    # still follows it after the read arrived (raft_sidecar/read_index.py).
                    index = await call_replicated(
                        self._node.read_index.request, timeout=self._cfg.propose_timeout, outcomes=_READ_OUTCOME,
                        late="the leader could not confirm its leadership with a majority within {timeout:.1f}s")
                await self._wait_applied(index, started)
        except RaftOutcome as out:
            return pb.ReadBarrierResponse(success=False, code=out.code, error=str(out))
        return pb.ReadBarrierResponse(success=True, index=index)

    async def _leader_index(self, started: float) -> int:
        """What this node last heard the leader had committed; no round trip."""
        if self._node.leader_address() is None:
            raise RaftOutcome(pb.NO_LEADER, "no Raft leader is known")
        commit = self._node.raftCommitIndex
        while self._node.raftLastApplied < commit:
            if time.monotonic() - started > self._cfg.propose_timeout:
                raise RaftOutcome(pb.OUTCOME_UNKNOWN, "timed out catching up with the leader's commit index")
            await asyncio.sleep(0.002)
        return self._applier.submitted

    async def _wait_applied(self, index: int, started: float) -> None:
        left = self._cfg.propose_timeout - (time.monotonic() - started)
        try:
            await asyncio.wait_for(self._applier.wait_async(index), max(left, 0.5))
        except asyncio.TimeoutError:
            raise RaftOutcome(pb.OUTCOME_UNKNOWN,
                              f"outcome unknown: committed at {index} but not applied by the engine in time") from None
