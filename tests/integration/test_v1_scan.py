"""Bounded range scans over 100,000 keys: every key once, in bytewise order, pages never
larger than `limit`, and the engine's memory does not grow with the number of pages read."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import requests

from raftkv import backup
from tests.cluster import Cluster, Node

KEYS = 100_000
TXN_OPS = 1000
PAGE = 1000
VALUE_BYTES = 100
# RSS may move by allocator noise between two points of one scan; a leak of what the
# pages hold would be ~90 pages x ~140 KB = 12 MB between page 10 and page 100.
RSS_TOLERANCE_KB = 4096


def key_of(i: int) -> bytes:
    # Big-endian bytes in the key make bytewise order differ from string order of the
    # decimal form, and put non-UTF-8 bytes in some keys.
    return b"scan/" + i.to_bytes(3, "big") + b"/" + str(i).encode()


def value_of(i: int) -> bytes:
    return (str(i).encode() + b":") * (VALUE_BYTES // 8) + bytes([i % 256])


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and its parts: RssAnon (heap) and RssFile (LevelDB's mmapped tables)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0])
    assert "VmRSS" in out, f"no VmRSS for pid {pid}"
    return out


def post(session: requests.Session, node: Node, path: str, doc: dict) -> dict:
    r = session.post(node.http_url + path, data=msgpack.packb(doc, use_bin_type=True),
                     headers={"Content-Type": "application/msgpack"}, timeout=60)
    assert r.status_code == 200, r.content[:300]
    return msgpack.unpackb(r.content)


def load(c: Cluster) -> float:
    """100 txns of 1000 puts, a few at a time through every node; returns seconds."""
    t0 = time.monotonic()

    def one(t: int) -> None:
        with requests.Session() as s:
            s.trust_env = False
            ops = [{"op": "put", "key": key_of(i), "value": value_of(i)}
                   for i in range(t * TXN_OPS, (t + 1) * TXN_OPS)]
            doc = post(s, c.nodes[t % len(c.nodes)], "/v1/txn", {"ops": ops})
            assert doc["succeeded"] and len(doc["results"]) == TXN_OPS

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(KEYS // TXN_OPS)))
    return time.monotonic() - t0


def scan_pass(node: Node, expected: list[bytes], probes: tuple[int, ...]) -> tuple[dict[int, dict], float]:
    """Reads every page once, checking each; returns memory at the probed page counts."""
    pid = node.engine.pid
    seen: list[bytes] = []
    mem: dict[int, dict] = {}
    pages = 0
    after = ""
    t0 = time.monotonic()
    with requests.Session() as s:
        s.trust_env = False
        while True:
            r = s.get(f"{node.http_url}/v1/range?prefix=scan%2F&limit={PAGE}{after}", timeout=30)
            assert r.status_code == 200, r.content[:300]
            doc = msgpack.unpackb(r.content)
            pages += 1
            kvs = doc["kvs"]
            assert len(kvs) <= PAGE
            for kv in kvs:
                i = int(kv["key"].rsplit(b"/", 1)[1])
                assert kv["value"] == value_of(i) and kv["version"] == 1
            seen += [kv["key"] for kv in kvs]
            if pages in probes:
                mem[pages] = memory_kb(pid)
            if not doc["more"]:
                assert doc["next"] is None
                break
            assert len(kvs) == PAGE  # a full page whenever more follow (values are small)
            after = f"&after={doc['next']}"
    assert seen == expected  # every key once, in bytewise order
    assert pages == KEYS // PAGE
    return mem, time.monotonic() - t0


def test_scan_100k_keys_in_bounded_pages(cluster: Cluster):
    load_s = load(cluster)
    node = cluster.nodes[1]
    pid = node.engine.pid
    expected = sorted(key_of(i) for i in range(KEYS))

    # The first pass also fills LevelDB's block cache (8 MB) and maps its table files:
    # memory that tops out with the data read once, not with the pages served.
    first, first_s = scan_pass(node, expected, (10, 100))
    second, second_s = scan_pass(node, expected, (10, 50, 100))
    growth = second[100]["VmRSS"] - second[10]["VmRSS"]
    print(f"\nload {KEYS} keys in {load_s:.1f}s; 100 pages in {first_s:.1f}s / {second_s:.1f}s; "
          f"engine memory (kB) pass 1 after 10/100 pages: {first[10]} / {first[100]}; "
          f"pass 2 after 10/50/100 pages: {second[10]} / {second[50]} / {second[100]}; "
          f"VmRSS growth pages 10->100 of pass 2: {growth} kB")
    assert growth <= RSS_TOLERANCE_KB, second
    assert second[100]["RssAnon"] - second[10]["RssAnon"] <= RSS_TOLERANCE_KB, second

    # The largest page allowed holds at most that many keys; one more is refused.
    with requests.Session() as s:
        s.trust_env = False
        r = s.get(f"{node.http_url}/v1/range?prefix=scan%2F&limit=10000&keys_only=true", timeout=30)
        doc = msgpack.unpackb(r.content)
        assert r.status_code == 200 and len(doc["kvs"]) == 10000 and doc["more"] is True
        assert "value" not in doc["kvs"][0]
        assert [kv["key"] for kv in doc["kvs"]] == expected[:10000]
        r = s.get(f"{node.http_url}/v1/range?prefix=scan%2F&limit=10001", timeout=30)
        assert r.status_code == 400 and msgpack.unpackb(r.content)["error"]["code"] == "bad_range"
    # 200 pages served in all: the engine is not bigger than after page 10 of the second pass.
    assert memory_kb(pid)["VmRSS"] - second[10]["VmRSS"] <= RSS_TOLERANCE_KB * 2

    # The backup of all 100,000 keys is streamed: the engine's memory while it sends the
    # whole file stays within a few MB of where it was (the file is ~14 MB).
    path = cluster.base_dir / "scan.backup"
    before = memory_kb(pid)["VmRSS"]
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], memory_kb(pid)["VmRSS"])
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    try:
        with requests.Session() as s:
            s.trust_env = False
            with s.get(f"{node.http_url}/v1/backup", stream=True, timeout=60) as r:
                assert r.status_code == 200
                with open(path, "wb") as f:
                    for chunk in r.iter_content(64 << 10):
                        f.write(chunk)
    finally:
        done.set()
        sampler.join()
    backup_s = time.monotonic() - t0
    header, count = backup.verify(str(path))
    size_kb = path.stat().st_size // 1024
    print(f"backup: {count} keys, {size_kb} kB in {backup_s:.2f}s; engine VmRSS {before} kB before, "
          f"peak {peak[0]} kB while streaming (+{peak[0] - before} kB)")
    assert count == KEYS and header.revision >= KEYS // TXN_OPS
    assert peak[0] - before <= size_kb // 2, (before, peak[0], size_kb)
