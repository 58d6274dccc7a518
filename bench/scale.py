"""Does a write cost more when the store is big? And how long does a big node take to come back?

    python -m bench.scale [--big-keys 1000000] [--small-keys 10000] [--rounds 3] [--duration 5]
                          [--out bench/results/scale.json]

Two 3-node RaftKV clusters run side by side on 127.0.0.1: one holding `--small-keys`, one
holding `--big-keys` keys of `--value-size` bytes (loaded through `POST /v1/txn`, 1,000 puts
per Raft entry). Write rows at concurrency 64 alternate between the two clusters for
`--rounds` rounds, so that the ratio big/small compares measurements taken seconds apart on
this shared machine. Writes overwrite random existing keys of each cluster (verified `ok`).

Then, on the big cluster: every process's RSS; a follower killed with SIGKILL and restarted
(time until its engine and sidecar answer /health and a linearizable read through it returns
the value last written); and all three nodes killed with SIGKILL and restarted (time until a
write through any node succeeds and reads return the preloaded values).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import msgpack

from . import loadgen
from .cluster import Proc, RaftKVCluster, http, install_signal_cleanup, wait_until

TXN_OPS = 1000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def _load(url: str, keys: int, value_size: int, inflight: int = 4) -> float:
    """Puts every key once through /v1/txn; returns keys/s."""
    started = time.monotonic()
    starts = iter(range(0, keys, TXN_OPS))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def worker() -> None:
            for first in starts:
                ops = [{"op": "put", "key": loadgen.key_name(i).encode(),
                        "value": loadgen.preload_value(loadgen.key_name(i), value_size).encode()}
                       for i in range(first, min(first + TXN_OPS, keys))]
                body = msgpack.packb({"ops": ops})
                for attempt in range(5):
                    async with session.post(f"{url}/v1/txn", data=body,
                                            headers={"Content-Type": "application/msgpack"}) as resp:
                        text = await resp.read()
                        if resp.status == 200:
                            break
                    if attempt == 4:
                        raise RuntimeError(f"txn at {first} failed: {resp.status} {text[:200]!r}")
                    await asyncio.sleep(0.5)
        await asyncio.gather(*(worker() for _ in range(inflight)))
    return keys / (time.monotonic() - started)


def _stats(node) -> dict:
    status, body = http("GET", f"{node.url}/debug/stats", timeout=5)
    return json.loads(body) if status == 200 else {}


def load(cluster: RaftKVCluster, keys: int, value_size: int) -> dict:
    leader = cluster.leader()
    rate = asyncio.run(_load(leader.url, keys, value_size))
    started = time.monotonic()
    wait_until(lambda: all(_stats(n).get("keys", 0) >= keys for n in cluster.nodes), 600,
               f"{keys} keys on every node")
    return {"keys": keys, "load_keys_per_s": round(rate), "all_nodes_applied_after_s":
            round(time.monotonic() - started, 2)}


def write_row(cluster: RaftKVCluster, keys: int, duration: float, value_size: int) -> dict:
    spec = loadgen.LoadSpec(workload="write", concurrency=64, duration=duration, warmup=1.0,
                            keys=keys, value_size=value_size)
    return loadgen.run_load_sync("raftkv", [cluster.leader().url], spec)


def rss_mb(cluster: RaftKVCluster) -> dict[str, float]:
    return {m["name"]: round((m["rss_kb"] or 0) / 1024, 1) for m in cluster.memory()}


def _restart(node, cluster: RaftKVCluster) -> None:
    node.engine = Proc(node.engine.name, node.engine_cmd(), node.dir / "engine.log")
    # Membership is persisted: a restarted sidecar ignores -bootstrap/-join.
    node.sidecar = Proc(node.sidecar.name, node.sidecar_cmd(False, None), node.dir / "sidecar.log")


def _read_ok(node, key: str, value: str) -> bool:
    try:
        status, body = http("GET", f"{node.url}/get-val?key={key}&consistency=linearizable", timeout=5)
    except OSError:
        return False
    return status == 200 and body.decode() == value


def restart_follower(cluster: RaftKVCluster, value_size: int) -> dict:
    leader = cluster.leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    key = loadgen.key_name(0)
    value = loadgen.make_value("restart-probe", value_size)
    for p in victim.procs():
        p.popen.kill()
        p.popen.wait()
    started = time.monotonic()
    _restart(victim, cluster)
    wait_until(lambda: _healthy(victim), 300, f"{victim.node_id} healthy")
    healthy = time.monotonic() - started
    status, _ = http("POST", f"{leader.url}/insert-val",
                     msgpack.packb({"op": "SET", "key": key, "value": value}), timeout=10)
    assert status == 200, status
    wait_until(lambda: _read_ok(victim, key, value), 300, f"{victim.node_id} serves reads")
    return {"node": victim.node_id, "healthy_after_s": round(healthy, 2),
            "serving_after_s": round(time.monotonic() - started, 2)}


def _healthy(node) -> bool:
    try:
        return node.healthy()
    except OSError:
        return False


def restart_all(cluster: RaftKVCluster, keys: int, value_size: int) -> dict:
    for node in cluster.nodes:
        for p in node.procs():
            p.popen.kill()
            p.popen.wait()
    started = time.monotonic()
    for node in cluster.nodes:
        _restart(node, cluster)
    probe = loadgen.make_value("restart-all", value_size)

    def write_ok() -> bool:
        try:
            status, _ = http("POST", f"{cluster.nodes[0].url}/insert-val",
                             msgpack.packb({"op": "SET", "key": "restart-all", "value": probe}), timeout=5)
        except OSError:
            return False
        return status == 200
    wait_until(write_ok, 300, "a write after restarting all nodes")
    writable = time.monotonic() - started
    last = loadgen.key_name(keys - 1)
    for node in cluster.nodes:
        wait_until(lambda: _read_ok(node, last, loadgen.preload_value(last, value_size)), 300,
                   f"{node.node_id} serves the preloaded data")
    return {"writable_after_s": round(writable, 2), "all_serving_after_s": round(time.monotonic() - started, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-keys", type=int, default=1_000_000)
    ap.add_argument("--small-keys", type=int, default=10_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out", default="bench/results/scale.json")
    a = ap.parse_args(argv)
    install_signal_cleanup()
    small, big = RaftKVCluster(), RaftKVCluster()
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "value_size": a.value_size}
    try:
        log("starting two clusters")
        small.start()
        big.start()
        log(f"loading {a.small_keys} keys")
        result["small_load"] = load(small, a.small_keys, a.value_size)
        log(f"loading {a.big_keys} keys")
        result["big_load"] = load(big, a.big_keys, a.value_size)
        log(f"loaded: {result['big_load']}")
        result["rss_mb_small"] = rss_mb(small)
        result["rss_mb_big"] = rss_mb(big)
        rows: dict[str, list[dict]] = {"small": [], "big": []}
        for r in range(a.rounds):
            order = [("small", small, a.small_keys), ("big", big, a.big_keys)]
            for name, cluster, keys in (order if r % 2 == 0 else order[::-1]):
                row = write_row(cluster, keys, a.duration, a.value_size)
                log(f"round {r} {name}: {row['ops_per_s']} writes/s, errors {row.get('errors')}")
                rows[name].append(row)
        result["write_rows"] = rows
        med = {k: statistics.median(x["ops_per_s"] for x in v) for k, v in rows.items()}
        result["writes_per_s_median"] = med
        result["big_over_small"] = round(med["big"] / med["small"], 3) if med["small"] else None
        log(f"big/small write throughput: {result['big_over_small']}")
        result["restart_follower"] = restart_follower(big, a.value_size)
        log(f"follower restart: {result['restart_follower']}")
        result["restart_all"] = restart_all(big, a.big_keys, a.value_size)
        log(f"all-node restart: {result['restart_all']}")
        result["rss_mb_big_after_restart"] = rss_mb(big)
    finally:
        small.stop()
        big.stop()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("big_load", "writes_per_s_median", "big_over_small",
                                             "restart_follower", "restart_all", "rss_mb_big")
                      if k in result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
