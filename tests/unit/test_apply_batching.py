"""The sidecar's applier holds back entries nobody on its node waits for, and only those.

A real engine process takes the ApplyStream; the Applier runs on this test's event loop
and entries are submitted from another thread, as PySyncObj's tick thread does. What is
checked is what the engine stored (its AppliedIndex) and how many apply requests it
accepted, against the clock.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from typing import Awaitable, Callable

import grpc
import pytest

from raft_sidecar.applier import Applier
from raftkv.pb import consensus_pb2 as pb
from raftkv.pb import consensus_pb2_grpc as pb_grpc
from raftkv.procs import free_ports


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real storage engine; its sidecar port has nothing behind it (only ApplyStream is used)."""
    http, app, side = free_ports(3, "127.0.0.1")
    data = tmp_path_factory.mktemp("apply-batching")
    proc = subprocess.Popen([sys.executable, "-m", "storage_engine", str(http), str(app), str(side),
                             str(data / "kv.db"), "--http-host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"127.0.0.1:{app}"
    finally:
        proc.kill()
        proc.wait()


class Harness:
    def __init__(self, applier: Applier, engine: str) -> None:
        self.applier = applier
        self._channel = grpc.insecure_channel(engine)
        self._engine = pb_grpc.StateMachineStub(self._channel)
        self.next_index = applier.engine_applied + 1

    async def submit(self, count: int) -> int:
        """Hands `count` SET entries to the applier from another thread; returns the last index."""
        first = self.next_index
        self.next_index += count

        def tick_thread() -> None:
            for i in range(first, first + count):
                cmd = pb.Command(op="SET", bkey=f"k{i}".encode(), bvalue=b"v")
                self.applier.submit(i, cmd.SerializeToString())

        await asyncio.get_running_loop().run_in_executor(None, tick_thread)
        return first + count - 1

    def engine_index(self) -> int:
        """What the engine has stored (asked on a channel of our own: stop() closes the applier's)."""
        return self._engine.AppliedIndex(pb.Empty(), timeout=5, wait_for_ready=True).applied_index

    def close(self) -> None:
        self._channel.close()

    async def until(self, check: Callable[[], bool], timeout: float) -> float:
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not reached within {timeout} s")
            await asyncio.sleep(0.005)
        return time.monotonic() - started


def run(engine: str, delay: float, scenario: Callable[[Harness], Awaitable[None]]) -> None:
    """Runs `scenario` on a fresh event loop with an Applier started on it, and stops it."""
    async def main() -> None:
        applier = Applier(engine, fail_timeout=30.0, batch_delay=delay)
        applier.connect(time.monotonic() + 30)
        applier.start()
        await asyncio.sleep(0.05)  # idle first: entries found on waking from idle go at once
        harness = Harness(applier, engine)
        try:
            await scenario(harness)
        finally:
            await applier.stop(1.0)
            harness.close()

    asyncio.run(main())


def test_entries_nobody_waits_for_are_held_then_delivered_together(engine: str) -> None:
    run(engine, 0.5, _entries_nobody_waits_for_are_held_then_delivered_together)


async def _entries_nobody_waits_for_are_held_then_delivered_together(h: Harness) -> None:
    before = h.engine_index()
    last = await h.submit(5)
    await asyncio.sleep(0.2)
    assert h.engine_index() == before, "delivered before the batch delay ran out"
    waited = await h.until(lambda: h.applier.processed >= last, timeout=5)
    assert h.engine_index() == last
    assert (h.applier.deliveries, h.applier.delivered_entries) == (1, 5)
    assert waited < 2.0


def test_a_request_waiting_on_this_node_ends_the_hold_at_once(engine: str) -> None:
    run(engine, 5.0, _a_request_waiting_on_this_node_ends_the_hold_at_once)


async def _a_request_waiting_on_this_node_ends_the_hold_at_once(h: Harness) -> None:
    last = await h.submit(3)
    started = time.monotonic()
    await asyncio.wait_for(h.applier.wait_async(last), 2.0)
    assert time.monotonic() - started < 1.0
    assert h.engine_index() == last


def test_a_blocking_waiter_ends_the_hold(engine: str) -> None:
    """Snapshots wait from a thread (Applier.wait) for the engine to catch up."""
    run(engine, 5.0, _a_blocking_waiter_ends_the_hold)


async def _a_blocking_waiter_ends_the_hold(h: Harness) -> None:
    last = await h.submit(2)
    result: list[tuple[bool, float]] = []

    def snapshot_thread() -> None:
        started = time.monotonic()
        result.append((h.applier.wait(last, 3.0), time.monotonic() - started))

    t = threading.Thread(target=snapshot_thread)
    t.start()
    await h.until(lambda: bool(result), timeout=5)
    t.join()
    ok, took = result[0]
    assert ok and took < 1.0
    assert h.engine_index() == last


def test_zero_delay_delivers_each_entry_at_once(engine: str) -> None:
    run(engine, 0.0, _zero_delay_delivers_each_entry_at_once)


async def _zero_delay_delivers_each_entry_at_once(h: Harness) -> None:
    for _ in range(3):
        last = await h.submit(1)
        await h.until(lambda: h.applier.processed >= last, timeout=1.0)
    assert h.applier.deliveries == 3
    assert h.engine_index() == last


def test_stop_ends_the_hold_without_claiming_entries_applied(engine: str) -> None:
    run(engine, 5.0, _stop_ends_the_hold_without_claiming_entries_applied)


async def _stop_ends_the_hold_without_claiming_entries_applied(h: Harness) -> None:
    before = h.engine_index()
    last = await h.submit(2)
    started = time.monotonic()
    await h.applier.stop(2.0)
    assert time.monotonic() - started < 1.0
    assert h.applier.processed < last
    assert h.engine_index() == before


def test_a_request_expecting_an_entry_lets_it_through_unheld(engine: str) -> None:
    """A proposal or read in progress on this node (Applier.expecting) will wait for entries
    before it can register for one: nothing is held while it is open, and after it the
    hold is back."""
    run(engine, 5.0, _a_request_expecting_an_entry_lets_it_through_unheld)


async def _a_request_expecting_an_entry_lets_it_through_unheld(h: Harness) -> None:
    with h.applier.expecting():
        last = await h.submit(2)
        took = await h.until(lambda: h.applier.processed >= last, timeout=2.0)
    assert took < 1.0
    assert h.engine_index() == last
    await asyncio.sleep(0.05)  # idle again
    held = await h.submit(1)
    await asyncio.sleep(0.3)
    assert h.applier.processed < held, "held back while no request expects an entry"
