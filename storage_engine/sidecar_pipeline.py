"""One long-lived gRPC stream to the local sidecar for all proposals and read barriers.

A unary gRPC call in Python costs about twice the CPU and latency of a message on
an open stream (measured on 2 cores: 590 us against 280 us per round trip), and
every write and every shared read barrier crosses this link. Requests carry a
`call` id; replies may come back in any order and are matched by it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Union

import grpc

from raftkv.pb import consensus_pb2 as pb
from raftkv.pb import consensus_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_Reply = Union[pb.ProposeResponse, pb.ReadBarrierResponse]


class PipelineError(Exception):
    """The stream failed or the call timed out: the request may have reached the sidecar."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class SidecarPipeline:
    def __init__(self, stub: pb_grpc.RaftNodeStub) -> None:
        self._stub = stub
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        # call id -> (the caller's future, the stream its request went out on)
        self._waiting: dict[int, tuple[asyncio.Future[pb.PipelineReply], grpc.aio.StreamStreamCall]] = {}
        self._next_call = 1
        self._write_lock = asyncio.Lock()
        self._closed = False

    async def propose(self, command: pb.Command, timeout: float) -> pb.ProposeResponse:
        reply = await self._request(pb.PipelineRequest(propose=command), timeout)
        return reply.propose

    async def read_barrier(self, request: pb.ReadBarrierRequest, timeout: float) -> pb.ReadBarrierResponse:
        reply = await self._request(pb.PipelineRequest(read_barrier=request), timeout)
        return reply.read_barrier

    async def close(self) -> None:
        self._closed = True
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        self._fail_all(None, PipelineError(grpc.StatusCode.CANCELLED, "the engine is shutting down"))

    # -- internals -------------------------------------------------------------------
    def _open(self) -> grpc.aio.StreamStreamCall:
        if self._closed:
            raise PipelineError(grpc.StatusCode.CANCELLED, "the engine is shutting down")
        if self._call is None:
            call = self._stub.Pipeline()
            self._call = call
            self._reader = asyncio.create_task(self._read(call))
        return self._call

    async def _request(self, request: pb.PipelineRequest, timeout: float) -> pb.PipelineReply:
        call = self._open()
        call_id = self._next_call
        self._next_call += 1
        request.call = call_id
        fut: asyncio.Future[pb.PipelineReply] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = (fut, call)
        try:
            try:
                async with self._write_lock:
                    await call.write(request)
            except grpc.aio.AioRpcError as exc:
                self._broken(call, PipelineError(exc.code(), exc.details() or "stream closed"))
            except Exception as exc:  # noqa: BLE001 - a write on a finished or cancelled stream
                self._broken(call, PipelineError(grpc.StatusCode.UNAVAILABLE, f"stream closed ({exc!r})"))
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise PipelineError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout:.1f}s") from None
        finally:
            self._waiting.pop(call_id, None)

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise PipelineError(grpc.StatusCode.UNAVAILABLE, "the sidecar closed the stream")
                entry = self._waiting.get(reply.call)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(reply)
        except asyncio.CancelledError:
            return
        except grpc.aio.AioRpcError as exc:
            self._broken(call, PipelineError(exc.code(), exc.details() or "stream failed"))
        except PipelineError as exc:
            self._broken(call, exc)
        except Exception as exc:  # noqa: BLE001 - never leave callers waiting on a dead reader
            log.exception("pipeline reader failed")
            self._broken(call, PipelineError(grpc.StatusCode.INTERNAL, repr(exc)))

    def _broken(self, call: grpc.aio.StreamStreamCall, error: PipelineError) -> None:
        """The requests still open on this stream get the error; the next request opens a new stream."""
        if self._call is call:
            self._call = None
            call.cancel()
        self._fail_all(call, error)

    def _fail_all(self, call: grpc.aio.StreamStreamCall | None, error: PipelineError) -> None:
        """Fails the open requests of `call` (of every stream when None)."""
        for fut, on in self._waiting.values():
            if (call is None or on is call) and not fut.done():
                fut.set_exception(error)
                fut.exception()  # its caller may be gone (cancelled at shutdown): no "never retrieved" noise
