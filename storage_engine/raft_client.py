"""The engine's side of the RaftNode gRPC contract: batched proposals, shared read barriers."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Awaitable, Callable, Union

import grpc

from raftkv import grpc_tls
from raftkv.pb import consensus_pb2 as pb
from raftkv.pb import consensus_pb2_grpc as pb_grpc

from .commands import Item, TxnRequest, Write, encode_batch
from .config import EngineConfig
from .errors import ErrorKind, KVError
from .sidecar_pipeline import PipelineError, SidecarPipeline
from .txn import RequestIdentity, Txn, TxnResult, outcome_from_wire

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

_CODE_KIND = {
    pb.BAD_REQUEST: ErrorKind.BAD_INPUT,
    pb.NO_LEADER: ErrorKind.NO_LEADER,
    pb.OVERLOADED: ErrorKind.OVERLOADED,
    pb.NOT_APPLIED: ErrorKind.NOT_APPLIED,
    pb.OUTCOME_UNKNOWN: ErrorKind.OUTCOME_UNKNOWN,
    pb.INTERNAL: ErrorKind.INTERNAL,
}

# Definite failures worth retrying with the same seq until the deadline:
# nothing was appended, and the dedup table makes any retry safe anyway.
_RETRYABLE = (ErrorKind.NO_LEADER, ErrorKind.NOT_APPLIED, ErrorKind.OUTCOME_UNKNOWN)

# Proposals on the wire at once. While one is busy, new writes pile up and leave
# together as the next entry. Measured on 2 cores with the streamed pipeline
# (writes/s at 16 and 64 clients, two alternating rounds): 1 -> 2157/3774 and
# 1886/3661, 2 -> 1895/3809 and 1848/2969. One slot makes entries about twice as
# large (26 writes instead of 13-16 at 64 clients), so every per-entry cost (Raft
# messages, fsyncs, apply calls on three nodes) is paid half as often.
MAX_CONCURRENT_PROPOSALS = 1


# One proposal's keys and values; a single larger request still goes alone.
MAX_BATCH_BYTES = 4 << 20


def _item_bytes(item: Item) -> int:
    if isinstance(item, Write):
        return len(item.key) + len(item.value) + 16
    return sum(len(op.key) + len(op.value) + len(op.expect_value or b"") + 16 for op in item.txn.ops)


def error_from_response(code: int, error: str) -> KVError:
    kind = _CODE_KIND.get(code, ErrorKind.INTERNAL)
    if kind is ErrorKind.OUTCOME_UNKNOWN and "outcome unknown" not in error:
        error = f"outcome unknown: {error}"
    return KVError(kind, error or kind.value)


def error_from_rpc(exc: PipelineError, what: str) -> KVError:
    """A failed request to the local sidecar. Once the request may have left, the outcome is unknown."""
    code = exc.code
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return KVError(ErrorKind.OUTCOME_UNKNOWN, f"outcome unknown: {what} timed out; it may still commit")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return KVError(ErrorKind.OUTCOME_UNKNOWN,
                       f"outcome unknown: the local Raft sidecar is unreachable ({exc.details})")
    return KVError(ErrorKind.INTERNAL, f"{what} failed: {code.name} {exc.details}")


# What a request's future resolves to: the raft index for a Write, a TxnResult for a txn.
_Waiter = tuple[Item, "asyncio.Future[Union[int, TxnResult]]"]


class RaftClient:
    def __init__(self, cfg: EngineConfig, store: Store | None = None) -> None:
        self._cfg = cfg
        self._store = store
        self._channel = grpc_tls.aio_channel(cfg.sidecar_target, cfg.grpc_tls)
        self._stub = pb_grpc.RaftNodeStub(self._channel)
        self._pipeline = SidecarPipeline(self._stub)
        self._pending: list[_Waiter] = []
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_PROPOSALS)
        self._sender: asyncio.Task[None] | None = None
        self._last_batch = 0
        self._fill_target = 0  # while > 0, the send loop waits for this many pending writes
        self._filled: asyncio.Future[None] | None = None
        self._inflight = 0
        # Exactly-once identity of this engine process as a Raft client (note H4).
        # "engine:" keeps it apart from v1 client ids, which cannot contain ':'.
        self.client_id = "engine:" + uuid.uuid4().hex
        self._next_seq = 1
        self._open_seqs: set[int] = set()
        # seq -> per-request outcomes, recorded by the store when it applies our entry.
        self._outcomes: dict[int, tuple[list, int]] = {}
        self._batches: dict[int, list[_Waiter]] = {}
        self.barrier = SharedBarrier(self._read_barrier_rpc)
        if store is not None:
            store.set_outcome_sink(self.client_id, self._on_applied)

    async def start(self) -> None:
        self._sender = asyncio.create_task(self._send_loop())

    async def close(self) -> None:
        if self._sender:
            self._sender.cancel()
        await self._pipeline.close()
        await self._channel.close()

    def abandon(self, reason: str) -> None:
        """Answers every waiting write now (shutdown): those never sent were not
        applied; those sent may still commit, so their outcome is unknown."""
        pending, self._pending = self._pending, []
        for _, fut in pending:
            if not fut.done():
                fut.set_exception(KVError(ErrorKind.NOT_APPLIED, f"not applied: {reason}"))
        for batch in self._batches.values():
            self._settle(batch, KVError(ErrorKind.OUTCOME_UNKNOWN,
                                        f"outcome unknown: {reason}; the write may still commit"), None)

    # -- writes -----------------------------------------------------------------
    async def write(self, w: Write) -> int:
        """Replicates one original /insert-val write; returns its raft index once applied on this node."""
        index = await self._enqueue(w)
        assert isinstance(index, int)
        return index

    async def submit(self, txn: Txn, identity: RequestIdentity | None = None) -> TxnResult:
        """Replicates one v1 txn (a single put/delete is a one-op txn) in the batched pipeline.

        Returns the outcome computed when this engine applied it, or, for a
        duplicate of an applied (client, seq), the first outcome with
        duplicate=True. Raises KVError as write() does (no leader, overloaded,
        outcome unknown), and BAD_INPUT for a retry whose seq is below the
        client's floor (applied before, outcome forgotten: it is not applied again).
        """
        result = await self._enqueue(TxnRequest(txn, identity))
        assert isinstance(result, TxnResult)
        return result

    async def _enqueue(self, item: Item) -> Union[int, TxnResult]:
        if self._inflight >= self._cfg.max_inflight_writes:
            raise KVError(ErrorKind.OVERLOADED, "too many writes in flight on this node; retry later")
        fut: asyncio.Future[Union[int, TxnResult]] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        self._inflight += 1
        self._wakeup.set()
        if self._fill_target and len(self._pending) >= self._fill_target:
            self._end_fill()
        try:
            return await fut
        finally:
            self._inflight -= 1

    def _on_applied(self, seq: int, index: int, outcomes: list) -> None:
        """Store hook: our proposal `seq` was applied at `index` (first copy only).

        Applied here means committed and visible to this node's reads, so the
        requests are answered now, without waiting for Propose's reply to travel back
        from the sidecar (about a third of a write's latency at concurrency 1)."""
        if seq in self._open_seqs:
            self._outcomes[seq] = (outcomes, index)
            batch = self._batches.get(seq)
            if batch is not None and len(outcomes) == len(batch):
                self._settle(batch, index, outcomes)

    async def _send_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._slots.acquire()
                await self._fill_batch()
                batch = self._take_batch()
                self._last_batch = len(batch)
                asyncio.create_task(self._propose(batch))

    async def _fill_batch(self) -> None:
        """Under load, waits up to batch_window for as many writes as the last
        proposal held. Most of a write's CPU is paid per Raft entry (messages, journal
        writes and fsyncs, apply calls, on three nodes), so fuller entries are what
        lets a saturated 2-core machine go faster: measured at 64 clients, 24 writes
        an entry without the wait and 37-51 with it, 0.39 -> 0.20-0.30 ms of CPU per
        write. The light-load path (last entry under batch_wait_min) never waits."""
        window = self._cfg.batch_window
        target = min(self._last_batch, self._cfg.max_batch_commands)
        if window <= 0 or target < self._cfg.batch_wait_min or len(self._pending) >= target:
            return
        loop = asyncio.get_running_loop()
        self._filled = loop.create_future()
        self._fill_target = target
        timer = loop.call_later(window, self._end_fill)
        try:
            await self._filled
        finally:
            timer.cancel()
            self._fill_target = 0
            self._filled = None

    def _end_fill(self) -> None:
        if self._filled is not None and not self._filled.done():
            self._filled.set_result(None)

    def _take_batch(self) -> list[_Waiter]:
        """The next proposal: at most max_batch_commands requests and about
        MAX_BATCH_BYTES of keys and values (always at least one request), so that
        concurrent large values never make one message beyond gRPC's limits."""
        size = 0
        n = 0
        for item, _ in self._pending[: self._cfg.max_batch_commands]:
            size += _item_bytes(item)
            if n and size > MAX_BATCH_BYTES:
                break
            n += 1
        batch = self._pending[:n]
        del self._pending[:n]
        return batch

    async def _propose(self, batch: list[_Waiter]) -> None:
        seq = self._next_seq
        self._next_seq += 1
        self._open_seqs.add(seq)
        self._batches[seq] = batch
        try:
            result = await self._propose_until_known(encode_batch(item for item, _ in batch), seq)
            recorded = self._outcomes.pop(seq, None)
            if recorded is not None and isinstance(result, KVError):
                result = recorded[1]  # the last attempt failed, but an earlier one was applied here
            outcomes = recorded[0] if recorded is not None and len(recorded[0]) == len(batch) else None
            self._settle(batch, result, outcomes)
        finally:
            self._open_seqs.discard(seq)
            self._outcomes.pop(seq, None)
            self._batches.pop(seq, None)
            self._slots.release()

    def _settle(self, batch: list[_Waiter], result: int | KVError, outcomes: list | None) -> None:
        """Answers every request of a batch not answered yet (at apply, or after Propose)."""
        for n, (item, fut) in enumerate(batch):
            if fut.done():
                continue
            if isinstance(result, KVError):
                fut.set_exception(result)
            elif isinstance(item, Write):
                fut.set_result(result)
            else:
                out = outcomes[n] if outcomes is not None else self._lost_outcome(item, result)
                if isinstance(out, KVError):
                    fut.set_exception(out)
                else:
                    fut.set_result(out)

    def _lost_outcome(self, item: TxnRequest, index: int) -> TxnResult | KVError:
        """Committed and applied, but not through ApplyEntries here: a snapshot from the
        leader covered the entry. A request with an identity finds its outcome in the
        restored sessions table; one without cannot know whether its compare held."""
        ident = item.identity
        if ident is not None and self._store is not None:
            raw = self._store.sessions.outcome(ident.client_id, ident.seq)
            if raw is not None:
                return outcome_from_wire(raw, item.txn, index, duplicate=False)
        return KVError(ErrorKind.OUTCOME_UNKNOWN,
                       f"outcome unknown: committed at index {index}, but this node installed a snapshot "
                       "covering it, so the result of its conditions is not known here")

    async def _propose_until_known(self, cmd: pb.Command, seq: int) -> int | KVError:
        """Retries one proposal under the same (client_id, seq) until it is known
        applied or the deadline passes. Once any attempt was ambiguous, a later
        definite failure does not make the whole write definite."""
        cmd.client_id, cmd.seq = self.client_id, seq
        deadline = time.monotonic() + self._cfg.propose_timeout
        ambiguous: KVError | None = None
        delay = 0.05
        while True:
            cmd.floor = min(self._open_seqs)
            left = deadline - time.monotonic()
            epoch = self.barrier.begin()
            try:
                resp = await self._pipeline.propose(cmd, timeout=max(left, 0.05))
            except PipelineError as exc:
                err = error_from_rpc(exc, "write")
            else:
                if resp.success:
                    self.barrier.committed(epoch, resp.index)
                    return resp.index
                err = error_from_response(resp.code, resp.error)
            applied = self._outcomes.get(seq)
            if applied is not None:  # an earlier, ambiguous attempt has been applied here meanwhile
                return applied[1]
            if err.kind is ErrorKind.OUTCOME_UNKNOWN:
                ambiguous = err
            if err.kind not in _RETRYABLE or time.monotonic() + delay >= deadline:
                return ambiguous or err
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- reads ------------------------------------------------------------------
    async def _read_barrier_rpc(self, mode: int) -> int:
        """A barrier has no effect of its own, so a failed one (no leader yet, a
        leader change) is simply tried again until the read timeout: an election
        costs readers latency, not errors."""
        deadline = time.monotonic() + self._cfg.read_timeout
        delay = 0.05
        while True:
            left = deadline - time.monotonic()
            try:
                resp = await self._pipeline.read_barrier(pb.ReadBarrierRequest(mode=mode), timeout=max(left, 0.05))
            except PipelineError as exc:
                if exc.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    raise KVError(ErrorKind.NO_QUORUM,
                                  f"could not confirm leadership with a majority: {exc.code.name}") from None
                raise error_from_rpc(exc, "read barrier") from None
            if resp.success:
                return resp.index
            err = error_from_response(resp.code, resp.error)
            if err.kind not in _RETRYABLE or time.monotonic() + delay >= deadline:
                if err.kind is ErrorKind.OUTCOME_UNKNOWN:
                    err = KVError(ErrorKind.NO_QUORUM, f"could not confirm leadership with a majority: {resp.error}")
                raise err
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


class SharedBarrier:
    """One barrier RPC in flight at a time; every reader joins the next one.

    A reader may only use a round trip that started after it arrived (otherwise a
    write acknowledged just before the read could be missed), so a reader that comes
    while a barrier is in flight waits for the following one. N concurrent readers
    cost two round trips at most, not N.

    A write of this engine that commits proves the same thing as a barrier: a
    current leader with a live majority appended it after it was sent, and this
    node applied everything before it. So readers are released by whichever comes
    first, a barrier or a write, as long as it started after the last of them
    arrived (`need`, counted in round trips started).
    """

    def __init__(self, rpc: Callable[[int], Awaitable[int]]) -> None:
        self._rpc = rpc
        self._epoch = 0                                    # round trips started
        self._next: dict[int, tuple[asyncio.Future[int], int]] = {}     # mode -> (readers, need)
        self._current: dict[int, tuple[asyncio.Future[int], int]] = {}  # barrier in flight
        self._running: set[int] = set()

    def begin(self) -> int:
        """Call right before sending a round trip (barrier or write); returns its epoch."""
        self._epoch += 1
        return self._epoch

    def committed(self, epoch: int, index: int) -> None:
        """A write sent at `epoch` is committed and applied here: release readers it covers."""
        for table in (self._current, self._next):
            for mode, (fut, need) in list(table.items()):
                if epoch >= need and not fut.done():
                    fut.set_result(index)
                    if table is self._next:
                        del table[mode]

    async def wait(self, mode: int = 0) -> int:
        entry = self._next.get(mode)
        fut = entry[0] if entry else asyncio.get_running_loop().create_future()
        self._next[mode] = (fut, self._epoch + 1)
        if mode not in self._running:
            self._running.add(mode)
            asyncio.create_task(self._run(mode))
        return await asyncio.shield(fut)

    async def _run(self, mode: int) -> None:
        try:
            while (entry := self._next.pop(mode, None)) is not None:
                fut = entry[0]
                self._current[mode] = entry
                self.begin()
                try:
                    index = await self._rpc(mode)
                    if not fut.done():
                        fut.set_result(index)
                except Exception as exc:
                    if not fut.done():
                        fut.set_exception(exc)
                        fut.exception()  # consumed: readers may all have gone
                finally:
                    del self._current[mode]
        finally:
            self._running.discard(mode)
