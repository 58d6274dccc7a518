"""--max-concurrent-requests: excess client requests are refused at once, not queued.

"Slow" requests are made slow by the client: each sends its headers, and its body only
later, so an admitted request holds its slot inside the handler (waiting for the body)
for as long as the test wants. With a limit of 4 and 50 such requests, exactly 4 get in;
the other 46 must be answered 503 (429 on /v1) with Retry-After within 100 ms, and
nothing they carried may be stored. Then the 4 finish their bodies and succeed.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import msgpack
import pytest

from tests.cluster import HOST, Cluster, _session, get, http_get, put

pytestmark = pytest.mark.timeout(180)

LIMIT = 4
CLIENTS = 50
FAST_ANSWER = 0.100       # seconds: a refusal must come this fast
RESPONSE_WAIT = 3.0       # seconds to wait for refusals before judging


@pytest.fixture(scope="module")
def limited(module_cluster_factory) -> Cluster:
    # One node is enough: the limit is per node and no Raft behaviour is under test.
    return module_cluster_factory(1, engine_args=["--max-concurrent-requests", str(LIMIT)], name="limited")


class SlowRequest:
    """One HTTP/1.1 request on its own connection: headers now, body when told."""

    def __init__(self, port: int, method: str, target: str, body: bytes, content_type: str,
                 extra_headers: dict[str, str] | None = None) -> None:
        self.port = port
        self.method = method
        self.target = target
        self.body = body
        self.content_type = content_type
        self.extra = extra_headers or {}
        self.sent_at = 0.0
        self.answered_at: float | None = None
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.payload = b""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.answer: asyncio.Task | None = None

    async def send_headers(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
        head = [f"{self.method} {self.target} HTTP/1.1", f"Host: {HOST}:{self.port}",
                f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in self.extra.items()]
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await self._writer.drain()
        self.sent_at = time.monotonic()
        self.answer = asyncio.create_task(self._read_answer())

    async def _read_answer(self) -> None:
        assert self._reader is not None
        status_line = await self._reader.readline()
        self.answered_at = time.monotonic()
        if not status_line:
            raise ConnectionError(f"{self.target}: connection closed without an answer")
        self.status = int(status_line.split()[1])
        while True:
            line = (await self._reader.readline()).decode().rstrip("\r\n")
            if not line:
                break
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.payload = await self._reader.read()   # Connection: close -> until EOF

    async def send_body(self) -> None:
        assert self._writer is not None
        self._writer.write(self.body)
        await self._writer.drain()

    def abort(self) -> None:
        if self.answer is not None:
            self.answer.cancel()
        if self._writer is not None:
            self._writer.transport.abort()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    @property
    def latency(self) -> float | None:
        return None if self.answered_at is None else self.answered_at - self.sent_at


def insert_request(port: int, key: str, value: str) -> SlowRequest:
    body = msgpack.packb({"op": "SET", "key": key, "value": value})
    return SlowRequest(port, "POST", "/insert-val", body, "application/msgpack")


async def wait_answers(reqs: list[SlowRequest], expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(r.answered_at is not None for r in reqs) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def finish(reqs: list[SlowRequest], timeout: float = 20.0) -> None:
    await asyncio.wait_for(asyncio.gather(*(r.answer for r in reqs)), timeout)


def test_excess_requests_are_refused_at_once_and_change_nothing(limited: Cluster):
    node = limited.nodes[0]
    port = node.ports.http

    async def scenario() -> tuple[list[SlowRequest], list[SlowRequest], list[SlowRequest]]:
        reqs = [insert_request(port, f"lim-{i}", f"v{i}") for i in range(CLIENTS)]
        # All 50 connect and send their headers at once.
        await asyncio.gather(*(r.send_headers() for r in reqs))
        await wait_answers(reqs, CLIENTS - LIMIT, RESPONSE_WAIT)
        refused = [r for r in reqs if r.answered_at is not None]
        admitted = [r for r in reqs if r.answered_at is None]
        # The refused ones' bodies are sent too (late), so nothing differs from a normal
        # client except timing; they must still not be applied.
        await asyncio.gather(*(r.send_body() for r in refused), return_exceptions=True)
        await asyncio.gather(*(r.send_body() for r in admitted))
        await finish(reqs)
        for r in reqs:
            r.close()
        return reqs, refused, admitted

    reqs, refused, admitted = asyncio.run(scenario())
    assert len(admitted) == LIMIT, f"{len(admitted)} requests were held, expected exactly {LIMIT}"
    assert len(refused) == CLIENTS - LIMIT
    slow = sorted(r.latency for r in refused if r.latency > FAST_ANSWER)
    assert not slow, f"{len(slow)} refusals took longer than {FAST_ANSWER * 1000:.0f} ms: {slow}"
    for r in refused:
        assert r.status == 503, (r.status, r.payload)
        assert r.headers.get("retry-after") == "1"
        assert r.payload.startswith(b"error: overloaded"), r.payload
    for r in admitted:
        assert (r.status, r.payload) == (200, b"ok")
    # Only the admitted writes exist.
    for r in reqs:
        key = msgpack.unpackb(r.body)["key"]
        got = get(node.http_url, key)
        if r in admitted:
            assert (got.status_code, got.text) == (200, f"v{key.split('-')[1]}")
        else:
            assert got.status_code == 404, f"refused write {key} was applied: {got.status_code} {got.text}"
    lat = sorted(r.latency for r in refused)
    print(f"refusal latency: median {lat[len(lat) // 2] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")


def test_v1_gets_429_health_stays_open_and_slots_are_freed(limited: Cluster):
    node = limited.nodes[0]
    port = node.ports.http

    async def scenario() -> dict:
        holders = [insert_request(port, f"hold-{i}", "h") for i in range(LIMIT)]
        for h in holders:
            await h.send_headers()
        await asyncio.sleep(0.3)
        assert all(h.answered_at is None for h in holders), "the slot holders were answered early"
        loop = asyncio.get_running_loop()
        # /v1 answers 429 in the /v1 error shape (JSON when asked for, msgpack otherwise),
        # whether or not the /v1 routes exist yet: the limit runs before routing.
        v1_json = await loop.run_in_executor(None, lambda: _raw_put_v1(port, accept_json=True))
        v1_msgpack = await loop.run_in_executor(None, lambda: _raw_put_v1(port, accept_json=False))
        read = await loop.run_in_executor(None, lambda: get(node.http_url, "hold-0", consistency="local"))
        health = await loop.run_in_executor(None, lambda: http_get(f"{node.http_url}/health"))
        # A client that gives up mid-body frees its slot: a new request then gets in.
        holders[0].abort()
        late = insert_request(port, "after-abort", "x")

        async def admitted_late() -> bool:
            await late.send_headers()
            await asyncio.sleep(0.3)
            if late.answered_at is None:
                return True
            late.close()
            return False
        deadline = time.monotonic() + 5.0
        got_in = False
        while not got_in and time.monotonic() < deadline:
            got_in = await admitted_late()
            if not got_in:
                late = insert_request(port, "after-abort", "x")
        for r in holders[1:] + ([late] if got_in else []):
            await r.send_body()
        await finish(holders[1:] + ([late] if got_in else []))
        return {"v1_json": v1_json, "v1_msgpack": v1_msgpack, "read": read, "health": health,
                "got_in": got_in, "late": late, "holders": holders}

    out = asyncio.run(scenario())
    status, headers, body = out["v1_json"]
    assert status == 429 and headers.get("retry-after") == "1"
    assert json.loads(body)["error"]["code"] == "overloaded"
    status, headers, body = out["v1_msgpack"]
    assert status == 429 and headers.get("content-type", "").startswith("application/msgpack")
    assert msgpack.unpackb(body)["error"]["code"] == "overloaded"
    assert out["read"].status_code == 503 and out["read"].headers.get("Retry-After") == "1"
    assert (out["health"].status_code, out["health"].text) == (200, "OK")
    assert out["got_in"], "the slot of an aborted request was never freed"
    assert (out["late"].status, out["late"].payload) == (200, b"ok")
    for h in out["holders"][1:]:
        assert (h.status, h.payload) == (200, b"ok")
    # Nothing leaked: LIMIT sequential requests at a time all succeed afterwards.
    for i in range(3 * LIMIT):
        assert put(node.http_url, f"after-{i}", "v").status_code == 200


def _raw_put_v1(port: int, accept_json: bool) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/octet-stream"}
    if accept_json:
        headers["Accept"] = "application/json"
    with _session() as s:
        r = s.put(f"http://{HOST}:{port}/v1/kv/limited-key", data=b"value", headers=headers, timeout=5)
    return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content


def test_concurrent_writes_within_the_value_limit_all_succeed(cluster_factory):
    node = cluster_factory(1, name="bigwrites").nodes[0]
    value = "x" * 1_000_000          # below --max-value-bytes (1 MiB)
    results: list[tuple[int, str]] = []

    def write(i: int) -> None:
        r = put(node.http_url, f"big-{i}", value, timeout=30)
        results.append((r.status_code, r.text[:200]))
    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r for r in results if r[0] != 200] == [], results
