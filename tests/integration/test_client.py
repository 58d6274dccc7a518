"""The client library (raftkv.Client and raftkv.AsyncClient) against a real 3-node cluster.

Every call goes through the real /v1 API of real engine + sidecar processes on 127.0.0.1.
The async tests run the same scenarios through AsyncClient with asyncio.run.
"""
from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import pytest

import raftkv
from raftkv._core import Request
from raftkv._wire import kv_path, put_body
from tests.cluster import Cluster, free_ports

pytestmark = pytest.mark.timeout(300)


def urls(c: Cluster) -> tuple[list[str], list[str]]:
    return [n.http_url for n in c.nodes], [n.mgmt_url for n in c.nodes]


@pytest.fixture(scope="module")
def kv(module_cluster: Cluster):
    u, m = urls(module_cluster)
    with raftkv.Client(u, m) as client:
        yield client


def fresh(prefix: str) -> str:
    """A key prefix no other test uses (they share one cluster)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}/"


# -- sync ---------------------------------------------------------------------------------------------

def test_put_get_delete_metadata(kv: raftkv.Client):
    p = fresh("basic")
    r1 = kv.put(p + "a", "hello")
    assert (r1.key, r1.version, r1.create_revision, r1.mod_revision) == ((p + "a").encode(), 1, r1.revision,
                                                                         r1.revision)
    got = kv.get(p + "a")
    assert (got.value, got.version, got.mod_revision) == (b"hello", 1, r1.revision)
    assert got.revision >= r1.revision
    r2 = kv.put(p + "a", b"again")
    assert r2.version == 2 and r2.create_revision == r1.revision and r2.revision > r1.revision
    d = kv.delete(p + "a")
    assert d.deleted == 1 and d.revision > r2.revision
    with pytest.raises(raftkv.NotFound) as ei:
        kv.get(p + "a")
    assert ei.value.status == 404 and ei.value.code == "not_found"
    assert kv.get_value(p + "a", b"dflt") == b"dflt"
    d2 = kv.delete(p + "a")
    assert d2.deleted == 0 and d2.revision == d.revision, "deleting a missing key changes nothing"
    r3 = kv.put(p + "a", "new")
    assert r3.version == 1, "a re-created key starts at version 1"


def test_binary_keys_and_values_on_every_node(kv: raftkv.Client, module_cluster: Cluster):
    key = b"bin\x00\xff /%?#&=+\x7f" + uuid.uuid4().bytes
    value = bytes(range(256)) * 10
    kv.put(key, value)
    for n in module_cluster.nodes:
        with raftkv.Client([n.http_url]) as one:
            assert one.get(key).value == value  # linearizable through each node
    assert [x.key for x in kv.scan(prefix=key)] == [key]


def test_cas_all_conditions(kv: raftkv.Client):
    k = fresh("cas") + "k"
    created = kv.cas(k, "1", expect_version=0)
    assert created.version == 1
    with pytest.raises(raftkv.CompareFailed) as ei:
        kv.cas(k, "x", expect_version=0)
    cur = ei.value.current
    assert cur is not None and cur.exists and cur.version == 1 and cur.mod_revision == created.revision
    kv.cas(k, "2", expect_value="1")
    with pytest.raises(raftkv.CompareFailed):
        kv.cas(k, "3", expect_value="1")
    r = kv.cas(k, "3", expect_mod_revision=kv.get(k).mod_revision)
    assert kv.get(k).value == b"3" and r.version == 3
    with pytest.raises(raftkv.CompareFailed) as ei:
        kv.cas(k + "-missing", "x", expect_version=1)
    assert ei.value.current is not None and not ei.value.current.exists
    with pytest.raises(raftkv.CompareFailed):
        kv.delete(k, expect_version=99)
    assert kv.delete(k, expect_version=3).deleted == 1
    with pytest.raises(ValueError):
        kv.cas(k, "x")  # no condition


def test_txn_all_or_nothing(kv: raftkv.Client):
    p = fresh("txn")
    kv.put(p + "x", "old")
    r = kv.txn([raftkv.PutOp(p + "a", "1"), raftkv.PutOp(p + "b", "2"), raftkv.DeleteOp(p + "x"),
                raftkv.PutOp(p + "a", "1b")])
    assert r.succeeded and len(r.results) == 4
    assert kv.get(p + "a").value == b"1b" and kv.get(p + "a").mod_revision == r.revision
    assert kv.get(p + "b").mod_revision == r.revision, "all keys of a txn share its revision"
    assert r.results[2]["deleted"] == 1
    with pytest.raises(raftkv.CompareFailed) as ei:
        kv.txn([raftkv.PutOp(p + "c", "3"), raftkv.PutOp(p + "a", "z", expect_value="nope"),
                raftkv.DeleteOp(p + "b", expect_version=7)])
    assert ei.value.failed == [1, 2]
    with pytest.raises(raftkv.NotFound):
        kv.get(p + "c")
    assert kv.get(p + "a").value == b"1b", "nothing of a failed txn is applied"


def test_scan_pages_prefix_range_limit(kv: raftkv.Client):
    p = fresh("scan")
    keys = [f"{p}{i:04d}".encode() for i in range(2345)]
    for i in range(0, len(keys), 500):
        kv.txn([raftkv.PutOp(k, k[::-1]) for k in keys[i:i + 500]])
    pages = list(kv.scan_pages(prefix=p, page_size=1000))
    assert [len(pg.kvs) for pg in pages] == [1000, 1000, 345]
    assert pages[-1].more is False and pages[0].next
    got = list(kv.scan(prefix=p, page_size=333))
    assert [x.key for x in got] == keys and all(x.value == x.key[::-1] for x in got)
    assert [x.key for x in kv.scan(keys[10], keys[20])] == keys[10:20]
    assert [x.key for x in kv.scan(prefix=p, limit=7, page_size=3)] == keys[:7]
    ko = list(kv.scan(prefix=p, keys_only=True, limit=5))
    assert [x.value for x in ko] == [None] * 5
    assert kv.count(prefix=p) == 2345
    with pytest.raises(raftkv.BadRange):
        list(kv.scan(keys[20], keys[10]))
    with pytest.raises(raftkv.BadRange):
        list(kv.scan(prefix=p, limit=0))
    with pytest.raises(ValueError):
        list(kv.scan(b"a", prefix=p))


def test_status_members_and_leader_hint(kv: raftkv.Client, module_cluster: Cluster):
    st = kv.status()
    assert all(s.ok for s in st) and sum(s.is_leader for s in st) == 1
    leader = next(s for s in st if s.is_leader)
    assert {s.node_id for s in st} == {n.node_id for n in module_cluster.nodes}
    assert all(s.leader_id == leader.node_id and s.term == leader.term for s in st)
    assert {m.id for m in kv.members()} == {n.node_id for n in module_cluster.nodes}
    lnode = module_cluster.leader()
    assert kv._core.leader_url() == lnode.http_url, "status() taught the client who leads"


def test_a_retried_write_is_applied_once_through_any_node(kv: raftkv.Client, module_cluster: Cluster):
    """What the client's retries rely on: the same identity sent to two nodes applies once,
    and the second answer repeats the first one's outcome."""
    k = fresh("dup") + "k"
    ident = kv._core.identity
    seq = ident.begin()
    try:
        headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack", **ident.headers(seq)}
        body = put_body("v", expect_version=0)
        answers = []
        for n in module_cluster.nodes:  # the first applies; the retries through other nodes do not
            a = kv._http.send(Request("PUT", n.http_url + kv_path(k), headers, body, 10.0, n.http_url))
            answers.append(a)
    finally:
        ident.end(seq)
    assert [a.status for a in answers] == [200, 200, 200], [a.body for a in answers]
    assert [a.headers.get("x-raftkv-duplicate") for a in answers[1:]] == ["1", "1"]
    assert kv.get(k).version == 1, "applied once although sent three times with expect_version=0"


def test_backup_and_restore_sync(kv: raftkv.Client, cluster_factory, tmp_path: Path):
    p = fresh("bk")
    data = {f"{p}{i:05d}".encode(): hashlib.sha256(str(i).encode()).digest() for i in range(1200)}
    items = list(data.items())
    for i in range(0, len(items), 400):
        kv.txn([raftkv.PutOp(k, v) for k, v in items[i:i + 400]])
    dest = tmp_path / "all.rkvb"
    seen: list[int] = []
    info = kv.backup(dest, progress=lambda done, total: seen.append(done))
    assert info.count == kv.count() and info.count >= 1200 and dest.stat().st_size == info.bytes
    assert seen and seen[-1] == info.bytes
    assert not list(tmp_path.glob(".*partial*")), "no temporary file left behind"

    target = cluster_factory(1, name="restore-sync")
    u, m = urls(target)
    with raftkv.Client(u, m) as t:
        done: list[int] = []
        r = t.restore(dest, txn_ops=250, progress=lambda d, total: done.append(d))
        assert (r.count, r.keys_after) == (info.count, info.count) and r.txns >= info.count // 250
        assert done[-1] == info.count
        assert {x.key: x.value for x in t.scan(prefix=p)} == data
        with pytest.raises(raftkv.RestoreError, match="not empty"):
            t.restore(dest)
        t.put(p + "extra", "x")
        r2 = t.restore(dest, force=True)
        assert r2.keys_after == info.count + 1


# -- async --------------------------------------------------------------------------------------------

def test_async_client_everything(module_cluster: Cluster, cluster_factory, tmp_path: Path):
    u, m = urls(module_cluster)
    p = fresh("async")

    async def main() -> None:
        async with raftkv.AsyncClient(u, m) as kv:
            r = await kv.put(p + "a", "1")
            assert r.version == 1
            assert (await kv.get(p + "a")).value == b"1"
            with pytest.raises(raftkv.CompareFailed) as ei:
                await kv.cas(p + "a", "2", expect_version=5)
            assert ei.value.current.version == 1
            assert (await kv.cas(p + "a", "2", expect_version=1)).version == 2
            # Concurrent writes share one client: each gets its own seq, all apply once.
            await asyncio.gather(*(kv.put(f"{p}c{i:03d}", str(i)) for i in range(100)))
            assert [x.key async for x in kv.scan(prefix=p + "c", page_size=17)] == \
                [f"{p}c{i:03d}".encode() for i in range(100)]
            assert await kv.count(prefix=p + "c") == 100
            t = await kv.txn([raftkv.PutOp(p + "t1", "x"), raftkv.DeleteOp(p + "a")])
            assert t.succeeded
            with pytest.raises(raftkv.NotFound):
                await kv.get(p + "a")
            assert (await kv.delete(p + "t1")).deleted == 1
            with pytest.raises(raftkv.BadRange):
                [x async for x in kv.scan(p + "z", p + "a")]
            st = await kv.status()
            assert sum(s.is_leader for s in st) == 1
            assert len(await kv.members()) == 3
            info = await kv.backup(tmp_path / "async.rkvb")
            assert info.count >= 100
        target = cluster_factory(1, name="restore-async")
        async with raftkv.AsyncClient([n.http_url for n in target.nodes]) as t:
            r = await t.restore(tmp_path / "async.rkvb", txn_ops=100, parallel=3)
            assert r.keys_after == info.count
            assert [x.key async for x in t.scan(prefix=p + "c")] == \
                [f"{p}c{i:03d}".encode() for i in range(100)]
            with pytest.raises(raftkv.RestoreError):
                await t.restore(tmp_path / "async.rkvb")

    asyncio.run(main())


def test_async_unreachable_is_unavailable_quickly():
    ports = free_ports(2)

    async def main() -> None:
        async with raftkv.AsyncClient([f"127.0.0.1:{p}" for p in ports], down_grace=0.5) as kv:
            with pytest.raises(raftkv.Unavailable) as ei:
                await kv.get("k")
            assert ei.value.code == "connection"
            with pytest.raises(raftkv.Unavailable):
                await kv.put("k", "v")  # refused: never sent, so definite, not OutcomeUnknown

    asyncio.run(main())


def test_client_token_is_sent(cluster_factory):
    """A cluster with a client token: without it 401, with it everything works."""
    token = "client-token-" + uuid.uuid4().hex
    c = cluster_factory(1, env={"RAFTKV_CLIENT_TOKEN": token}, name="token")
    u, m = urls(c)
    with raftkv.Client(u, m) as anon:
        with pytest.raises(raftkv.Unauthorized):
            anon.put("k", "v")
    with raftkv.Client(u, m, token="wrong-" + token) as wrong:
        with pytest.raises((raftkv.Unauthorized, raftkv.Forbidden)):
            wrong.get("k")
    with raftkv.Client(u, m, token=token) as kv:
        kv.put("k", "v")
        assert kv.get("k").value == b"v"
