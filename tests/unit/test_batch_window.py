"""The engine's batching window (RaftClient._fill_batch) against a real gRPC server.

The server is a RaftNode that commits every proposal after a fixed delay and records
how many writes each one held, so the tests see the proposals the engine really sent.
Windows are long (0.3-1 s) so that a wait, or its absence, cannot be mistaken for
scheduling noise.
"""
from __future__ import annotations

import asyncio
import time

import grpc

from raftkv.pb import consensus_pb2 as pb
from raftkv.pb import consensus_pb2_grpc as pb_grpc
from storage_engine.commands import Write
from storage_engine.config import EngineConfig
from storage_engine.raft_client import RaftClient

COMMIT_DELAY = 0.05


class RecordingNode(pb_grpc.RaftNodeServicer):
    def __init__(self) -> None:
        self.proposals: list[int] = []  # writes per proposal, in arrival order
        self.index = 0

    async def Pipeline(self, request_iterator, context):
        replies: asyncio.Queue = asyncio.Queue()

        async def commit(req: pb.PipelineRequest) -> None:
            self.proposals.append(len(req.propose.batch))
            await asyncio.sleep(COMMIT_DELAY)
            self.index += 1
            await replies.put(pb.PipelineReply(call=req.call, propose=pb.ProposeResponse(success=True,
                                                                                          index=self.index)))

        async def read() -> None:
            async for req in request_iterator:
                asyncio.create_task(commit(req))

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await replies.get()
        finally:
            reader.cancel()


async def _with_client(window: float, wait_min: int, body) -> None:
    node = RecordingNode()
    server = grpc.aio.server()
    pb_grpc.add_RaftNodeServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = RaftClient(EngineConfig(sidecar_port=port, batch_window=window, batch_wait_min=wait_min))
    await client.start()
    try:
        await body(client, node)
    finally:
        await client.close()
        await server.stop(0)


def _write(i: int) -> Write:
    return Write("SET", f"k{i}".encode(), b"v")


def test_one_client_at_a_time_never_waits():
    async def body(client: RaftClient, node: RecordingNode) -> None:
        for i in range(10):
            started = time.monotonic()
            await client.write(_write(i))
            took = time.monotonic() - started
            assert took < 0.5, f"write {i} took {took:.3f}s: it waited for the 1 s window"
        assert node.proposals == [1] * 10
    asyncio.run(_with_client(1.0, 4, body))


def test_under_load_the_next_entry_waits_until_it_is_as_full_as_the_last():
    async def body(client: RaftClient, node: RecordingNode) -> None:
        await asyncio.gather(*(client.write(_write(i)) for i in range(10)))
        assert node.proposals == [10]
        # Ten more, 20 ms apart: without the window the first would leave alone.
        started = time.monotonic()

        async def later(i: int) -> None:
            await asyncio.sleep(0.02 * i)
            await client.write(_write(100 + i))
        await asyncio.gather(*(later(i) for i in range(10)))
        took = time.monotonic() - started
        assert node.proposals == [10, 10], node.proposals
        # released by the tenth write (at ~0.18 s), not by the 1 s window
        assert took < 0.8, f"the full batch waited for the window: {took:.3f}s"
    asyncio.run(_with_client(1.0, 4, body))


def test_when_load_drops_the_window_runs_out_and_the_writes_go():
    async def body(client: RaftClient, node: RecordingNode) -> None:
        await asyncio.gather(*(client.write(_write(i)) for i in range(10)))
        started = time.monotonic()
        await asyncio.gather(*(client.write(_write(100 + i)) for i in range(3)))
        took = time.monotonic() - started
        assert node.proposals == [10, 3]
        assert 0.25 <= took < 2.0, f"3 writes after a batch of 10 took {took:.3f}s; the window is 0.3 s"
        # an entry under batch_wait_min (4) ends the waiting: the next write leaves at once
        started = time.monotonic()
        await client.write(_write(200))
        assert time.monotonic() - started < 0.25
        assert node.proposals == [10, 3, 1]
    asyncio.run(_with_client(0.3, 4, body))


def test_window_zero_turns_it_off():
    async def body(client: RaftClient, node: RecordingNode) -> None:
        await asyncio.gather(*(client.write(_write(i)) for i in range(10)))
        started = time.monotonic()
        await asyncio.gather(*(client.write(_write(100 + i)) for i in range(3)))
        assert time.monotonic() - started < 0.25
        assert node.proposals == [10, 3]
    asyncio.run(_with_client(0.0, 2, body))
