"""The engine's Pipeline stream client against a real gRPC server on 127.0.0.1.

The server is a scripted RaftNode that answers out of order, stays silent, or
breaks the stream, so that each test shows what the engine's callers see.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from raftkv.pb import consensus_pb2 as pb
from raftkv.pb import consensus_pb2_grpc as pb_grpc
from storage_engine.raft_client import error_from_rpc
from storage_engine.errors import ErrorKind
from storage_engine.sidecar_pipeline import PipelineError, SidecarPipeline


class ScriptedNode(pb_grpc.RaftNodeServicer):
    """Answers a proposal with index = its seq; seq 0 gets no answer; seq 99 aborts the stream;
    seq 1 is answered only after seq 2 (out of order)."""

    def __init__(self) -> None:
        self.streams = 0

    async def Pipeline(self, request_iterator, context):
        self.streams += 1
        held: list[pb.PipelineRequest] = []
        async for req in request_iterator:
            if req.WhichOneof("body") == "read_barrier":
                yield pb.PipelineReply(call=req.call, read_barrier=pb.ReadBarrierResponse(success=True, index=7))
                continue
            seq = req.propose.seq
            if seq == 0:
                continue
            if seq == 99:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "sidecar went away")
            if seq == 1:
                held.append(req)
                continue
            yield pb.PipelineReply(call=req.call, propose=pb.ProposeResponse(success=True, index=seq))
            for h in held:
                yield pb.PipelineReply(call=h.call, propose=pb.ProposeResponse(success=True, index=h.propose.seq))
            held.clear()


async def _with_pipeline(body):
    node = ScriptedNode()
    server = grpc.aio.server()
    pb_grpc.add_RaftNodeServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    pipeline = SidecarPipeline(pb_grpc.RaftNodeStub(channel))
    try:
        await body(pipeline, node)
    finally:
        await pipeline.close()
        await channel.close()
        await server.stop(0)


def test_replies_out_of_order_reach_their_callers():
    async def body(pipeline: SidecarPipeline, node: ScriptedNode) -> None:
        first = asyncio.create_task(pipeline.propose(pb.Command(op="SET", seq=1), timeout=5))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(pipeline.propose(pb.Command(op="SET", seq=2), timeout=5))
        barrier = await pipeline.read_barrier(pb.ReadBarrierRequest(), timeout=5)
        assert (await first).index == 1
        assert (await second).index == 2
        assert barrier.success and barrier.index == 7
        assert node.streams == 1  # all of it on one stream
    asyncio.run(_with_pipeline(body))


def test_broken_stream_fails_open_calls_and_the_next_call_reopens():
    async def body(pipeline: SidecarPipeline, node: ScriptedNode) -> None:
        waiting = asyncio.create_task(pipeline.propose(pb.Command(op="SET", seq=0), timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(PipelineError) as broke:
            await pipeline.propose(pb.Command(op="SET", seq=99), timeout=5)
        assert broke.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(PipelineError) as also:
            await waiting
        assert also.value.code == grpc.StatusCode.UNAVAILABLE
        # Sent before the break: the engine must treat it as possibly applied.
        assert error_from_rpc(also.value, "write").kind is ErrorKind.OUTCOME_UNKNOWN
        resp = await pipeline.propose(pb.Command(op="SET", seq=5), timeout=5)
        assert resp.success and resp.index == 5
        assert node.streams == 2
    asyncio.run(_with_pipeline(body))


def test_silent_sidecar_times_out_without_breaking_the_stream():
    async def body(pipeline: SidecarPipeline, node: ScriptedNode) -> None:
        with pytest.raises(PipelineError) as late:
            await pipeline.propose(pb.Command(op="SET", seq=0), timeout=0.2)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_from_rpc(late.value, "write").kind is ErrorKind.OUTCOME_UNKNOWN
        resp = await pipeline.propose(pb.Command(op="SET", seq=3), timeout=5)
        assert resp.index == 3
        assert node.streams == 1
    asyncio.run(_with_pipeline(body))


def test_closed_pipeline_refuses_new_calls():
    async def body(pipeline: SidecarPipeline, node: ScriptedNode) -> None:
        await pipeline.close()
        with pytest.raises(PipelineError) as refused:
            await pipeline.propose(pb.Command(op="SET", seq=4), timeout=1)
        assert refused.value.code == grpc.StatusCode.CANCELLED
    asyncio.run(_with_pipeline(body))
