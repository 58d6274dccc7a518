"""The engine's read-barrier bookkeeping (pure asyncio, no processes)."""
import asyncio

from storage_engine.raft_client import SharedBarrier


class SlowRPC:
    """A barrier RPC we complete by hand."""

    def __init__(self) -> None:
        self.calls: list[asyncio.Future[int]] = []

    async def __call__(self, mode: int) -> int:
        fut = asyncio.get_running_loop().create_future()
        self.calls.append(fut)
        return await fut


def test_concurrent_readers_share_at_most_two_barriers():
    async def main():
        rpc = SlowRPC()
        b = SharedBarrier(rpc)
        first = [asyncio.create_task(b.wait()) for _ in range(10)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(rpc.calls) == 1
        later = [asyncio.create_task(b.wait()) for _ in range(10)]  # arrive while one is in flight
        await asyncio.sleep(0)
        rpc.calls[0].set_result(7)
        assert await asyncio.gather(*first) == [7] * 10
        await asyncio.sleep(0)
        assert not any(t.done() for t in later), "later readers must not use a barrier older than them"
        assert len(rpc.calls) == 2
        rpc.calls[1].set_result(9)
        assert await asyncio.gather(*later) == [9] * 10
    asyncio.run(main())


def test_a_write_sent_after_the_reader_arrived_releases_it():
    async def main():
        rpc = SlowRPC()
        b = SharedBarrier(rpc)
        reader = asyncio.create_task(b.wait())
        await asyncio.sleep(0)
        epoch = b.begin()          # a write sent after the reader arrived
        b.committed(epoch, 42)
        assert await reader == 42
    asyncio.run(main())


def test_a_write_sent_before_the_reader_arrived_does_not_release_it():
    async def main():
        rpc = SlowRPC()
        b = SharedBarrier(rpc)
        epoch = b.begin()          # write in flight before the read
        reader = asyncio.create_task(b.wait())
        await asyncio.sleep(0)
        b.committed(epoch, 5)
        await asyncio.sleep(0)
        assert not reader.done()
        await asyncio.sleep(0)
        rpc.calls[-1].set_result(6)
        assert await reader == 6
    asyncio.run(main())


def test_a_reader_joining_late_raises_the_bar_for_everyone_waiting():
    async def main():
        rpc = SlowRPC()
        b = SharedBarrier(rpc)
        blocker = asyncio.create_task(b.wait())      # barrier #1 in flight
        await asyncio.sleep(0)
        early = asyncio.create_task(b.wait())        # waits for the next one
        await asyncio.sleep(0)
        epoch = b.begin()                            # write sent between the two readers
        late = asyncio.create_task(b.wait())
        await asyncio.sleep(0)
        b.committed(epoch, 11)                       # fine for `blocker` and `early`, not for `late`
        assert await blocker == 11                   # the write started after it arrived
        await asyncio.sleep(0)
        assert not late.done() and not early.done()  # they share one wait, bounded by `late`
        rpc.calls[0].set_result(1)
        await asyncio.sleep(0)
        rpc.calls[1].set_result(12)
        assert await early == 12 and await late == 12
    asyncio.run(main())


def test_barrier_failure_reaches_its_readers():
    async def main():
        rpc = SlowRPC()
        b = SharedBarrier(rpc)
        reader = asyncio.create_task(b.wait())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        rpc.calls[0].set_exception(RuntimeError("no quorum"))
        try:
            await reader
        except RuntimeError as exc:
            assert "no quorum" in str(exc)
        else:
            raise AssertionError("the reader must see the failure")
    asyncio.run(main())
