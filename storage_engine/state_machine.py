"""gRPC StateMachine service: the sidecar delivers committed entries here.

Calls come from the one ordered applier of the local sidecar, so they never
overlap; each is idempotent by raft index (see store.py).
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from raftkv.pb import consensus_pb2 as pb
from raftkv.pb import consensus_pb2_grpc as pb_grpc

from .commands import decode_proposal
from .store import Store, error_text

log = logging.getLogger(__name__)


class StateMachineService(pb_grpc.StateMachineServicer):
    def __init__(self, store: Store) -> None:
        self._store = store
        self._restore_lock = asyncio.Lock()

    async def Apply(self, request: pb.Command, context: grpc.aio.ServicerContext) -> pb.ApplyResponse:
        if request.index == 0:
            return pb.ApplyResponse(success=False, applied_index=self._store.applied_index,
                                    error="Apply needs the raft index (field 7); unindexed applies cannot be fenced")
        index = self._store.apply([(request.index, [decode_proposal(request)])])
        return pb.ApplyResponse(success=True, applied_index=index)

    async def ApplyEntries(self, request: pb.ApplyEntriesRequest,
                           context: grpc.aio.ServicerContext) -> pb.ApplyResponse:
        return self._apply_entries(request)

    async def ApplyStream(self, request_iterator: AsyncIterator[pb.ApplyEntriesRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ApplyResponse]:
        async for request in request_iterator:
            yield self._apply_entries(request)

    def _apply_entries(self, request: pb.ApplyEntriesRequest) -> pb.ApplyResponse:
        entries = [(e.index, [decode_proposal(c) for c in e.commands]) for e in request.entries]
        try:
            index = self._store.apply(entries)
        except Exception as exc:  # a LevelDB failure must reach the sidecar, which fail-stops
            log.exception("apply failed")
            return pb.ApplyResponse(success=False, applied_index=self._store.applied_index, error=error_text(exc))
        return pb.ApplyResponse(success=True, applied_index=index)

    async def AppliedIndex(self, request: pb.Empty, context: grpc.aio.ServicerContext) -> pb.ApplyResponse:
        return pb.ApplyResponse(success=True, applied_index=self._store.applied_index)

    async def Snapshot(self, request: pb.SnapshotRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SnapshotChunk]:
        if self._store.applied_index < request.min_index:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"engine applied {self._store.applied_index} < requested {request.min_index}")
        chunks = self._store.iter_snapshot(with_sessions=True)
        index, (sessions, revision) = next(chunks)
        yield pb.SnapshotChunk(applied_index=index, sessions=sessions, revision=revision)
        for _, chunk in chunks:
            # records = metadata header + value, so a restored node serves the same metadata
            yield pb.SnapshotChunk(keys=[k for k, _ in chunk], records=[r for _, r in chunk])
        yield pb.SnapshotChunk(last=True)

    async def Restore(self, request_iterator: AsyncIterator[pb.SnapshotChunk],
                      context: grpc.aio.ServicerContext) -> pb.ApplyResponse:
        async with self._restore_lock:
            restore = self._store.begin_restore()
            index = None
            try:
                async for chunk in request_iterator:
                    if index is None:
                        index = chunk.applied_index
                        restore.set_sessions(chunk.sessions)
                        restore.set_revision(chunk.revision)
                    if len(chunk.keys) != max(len(chunk.records), len(chunk.values)):
                        raise ValueError(f"snapshot chunk has {len(chunk.keys)} keys but "
                                         f"{max(len(chunk.records), len(chunk.values))} values")
                    if chunk.values:  # a snapshot of the older format: plain values
                        restore.add_plain(zip(chunk.keys, chunk.values))
                    else:
                        restore.add(zip(chunk.keys, chunk.records))
                    if chunk.last:
                        break
                else:
                    raise ValueError("snapshot stream ended without its last chunk")
                restore.commit(index or 0)
            except Exception as exc:
                restore.abort()
                log.exception("restore failed; keeping the old state")
                return pb.ApplyResponse(success=False, applied_index=self._store.applied_index, error=error_text(exc))
        log.info("restored snapshot at index %d (%d keys)", self._store.applied_index, len(self._store))
        return pb.ApplyResponse(success=True, applied_index=self._store.applied_index)
