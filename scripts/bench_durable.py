#!/usr/bin/env python3
"""Throughput cost of raft_sidecar.durable: stock PySyncObj vs durable, same run.

Three node processes on 127.0.0.1 with journal + dump files on the real disk, a
replicated dict set(key, 16-byte value). The callers run in the leader's process
and make synchronous calls for --seconds. Scenarios (alternating stock/durable
order per pass, so drift hits both):

  nobatch-1    appendEntriesUseBatch=False, 1 caller
  nobatch-64   appendEntriesUseBatch=False, 64 callers
  batch-64     appendEntriesUseBatch=True (default), 64 callers

Variants (--variants, default stock,durable): stock (no install, TCPTransport),
durable (install() + DurableTCPTransport, group commit), durable-nocoalesce
(sync inside each send), durable-parallel (leader does not wait for its own
sync before sending AppendEntries; see DurableTCPTransport.sync_before).

    python scripts/bench_durable.py [--seconds 5] [--passes 2] [--dir /var/tmp]
        [--variants stock,durable,durable-nocoalesce,durable-parallel] [--only nobatch-1,...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from raftkv.procs import free_ports

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

SCENARIOS = [("nobatch-1", False, 1), ("nobatch-64", False, 64), ("batch-64", True, 64)]


# -- node process -------------------------------------------------------------------------
def run_node(a: argparse.Namespace) -> int:
    from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
    from pysyncobj.transport import TCPTransport

    from raft_sidecar import durable

    class KV(SyncObjConsumer):
        def __init__(self):
            super().__init__()
            self.data = {}

        @replicated
        def set(self, k, v):
            self.data[k] = v

    class NoCoalesce(durable.DurableTCPTransport):
        coalesce = False

    class LeaderParallel(durable.DurableTCPTransport):
        sync_before = durable.SYNC_BEFORE_TYPES - {"append_entries"}

    transport = {"stock": TCPTransport, "durable": durable.DurableTCPTransport,
                 "durable-nocoalesce": NoCoalesce, "durable-parallel": LeaderParallel}[a.variant]
    if a.variant != "stock":
        durable.install()
    addrs = [f"127.0.0.1:{p}" for p in a.ports.split(",")]
    me = addrs[a.node]
    conf = SyncObjConf(journalFile=os.path.join(a.dir, f"n{a.node}.journal"),
                       fullDumpFile=os.path.join(a.dir, f"n{a.node}.dump"), useFork=False,
                       appendEntriesUseBatch=bool(a.batch), commandsQueueSize=100000)
    kv = KV()
    node = SyncObj(me, [x for x in addrs if x != me], conf, consumers=[kv], transportClass=transport)
    status = os.path.join(a.dir, f"status-{a.node}.json")
    go = os.path.join(a.dir, f"go-{a.node}")
    while not os.path.exists(go):
        with open(status + ".tmp", "w") as f:
            json.dump({"leader": node._isLeader(), "ready": node.isReady()}, f)
        os.replace(status + ".tmp", status)
        time.sleep(0.05)

    counts = [0] * a.callers
    lats: list[list[float]] = [[] for _ in range(a.callers)]
    errors = [0]
    value = b"v" * 16
    stop_at = [0.0]

    def caller(c: int) -> None:
        n = 0
        while time.monotonic() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                kv.set(f"k{c}.{n % 1000}", value, sync=True, timeout=5.0)
            except Exception:
                errors[0] += 1
                continue
            lats[c].append(time.perf_counter() - t0)
            counts[c] += 1
            n += 1

    journal = node._SyncObj__raftLog
    syncs0 = getattr(journal, "sync_count", 0)
    commit0 = node.raftCommitIndex
    stop_at[0] = time.monotonic() + a.seconds
    threads = [threading.Thread(target=caller, args=(c,)) for c in range(a.callers)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start
    all_lats = sorted(x for ls in lats for x in ls)
    res = {
        "ops": sum(counts), "seconds": elapsed, "errors": errors[0],
        "commits": node.raftCommitIndex - commit0,
        "p50_ms": 1000 * all_lats[len(all_lats) // 2] if all_lats else None,
        "p99_ms": 1000 * all_lats[int(len(all_lats) * 0.99)] if all_lats else None,
        "leader_syncs": getattr(journal, "sync_count", 0) - syncs0,
    }
    with open(os.path.join(a.dir, "result.json.tmp"), "w") as f:
        json.dump(res, f)
    os.replace(os.path.join(a.dir, "result.json.tmp"), os.path.join(a.dir, "result.json"))
    node.destroy_synchronous()
    return 0


# -- controller ---------------------------------------------------------------------------
def one_run(base: str, variant: str, batch: bool, callers: int, seconds: float) -> dict | None:
    d = tempfile.mkdtemp(prefix=f"bench-{variant}-", dir=base)
    ports = ",".join(map(str, free_ports(3)))
    procs = []
    try:
        for i in range(3):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--node", str(i), "--ports", ports, "--dir", d, "--variant", variant,
                 "--batch", str(int(batch)), "--callers", str(callers), "--seconds", str(seconds)],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, f"err{i}.log"), "w")))
        deadline = time.monotonic() + 20
        leader = None
        while time.monotonic() < deadline and leader is None:
            for i in range(3):
                try:
                    with open(os.path.join(d, f"status-{i}.json")) as f:
                        st = json.load(f)
                except (FileNotFoundError, ValueError):
                    continue
                if st["leader"] and st["ready"]:
                    leader = i
            time.sleep(0.05)
        if leader is None:
            return None
        time.sleep(0.5)  # let the followers settle
        open(os.path.join(d, f"go-{leader}"), "w").close()
        deadline = time.monotonic() + seconds + 30
        while time.monotonic() < deadline:
            if os.path.exists(os.path.join(d, "result.json")):
                with open(os.path.join(d, "result.json")) as f:
                    return json.load(f)
            time.sleep(0.1)
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--node", type=int)
    ap.add_argument("--ports")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--variant", choices=["stock", "durable", "durable-nocoalesce", "durable-parallel"])
    ap.add_argument("--variants", default="stock,durable")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--callers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--only", help="comma-separated scenario names")
    a = ap.parse_args()
    if a.node is not None:
        return run_node(a)

    results: dict[tuple[str, str], list[dict]] = {}
    scenarios = [s for s in SCENARIOS if not a.only or s[0] in a.only.split(",")]
    for p in range(a.passes):
        for name, batch, callers in scenarios:
            variants = a.variants.split(",")
            order = variants if p % 2 == 0 else variants[::-1]
            for variant in order:
                r = one_run(a.dir, variant, batch, callers, a.seconds)
                if r is None:
                    print(f"pass {p} {name} {variant}: no result (no leader?)", flush=True)
                    continue
                rate = r["ops"] / r["seconds"]
                results.setdefault((name, variant), []).append(r | {"rate": rate})
                print(f"pass {p} {name:11s} {variant:8s} {rate:8.1f} ops/s  p50 {r['p50_ms']:.2f} ms  "
                      f"p99 {r['p99_ms']:.2f} ms  errors {r['errors']}  leader syncs {r['leader_syncs']}",
                      flush=True)

    print("\nmedians over passes; ratio = variant ops/s / stock ops/s")
    for name, _, _ in scenarios:
        s = results.get((name, "stock"), [])
        if not s:
            continue
        sr = statistics.median(x["rate"] for x in s)
        sp = statistics.median(x["p50_ms"] for x in s)
        line = f"{name:11s} stock {sr:7.1f} ops/s (p50 {sp:.2f} ms)"
        for v in a.variants.split(","):
            d = results.get((name, v), [])
            if v == "stock" or not d:
                continue
            dr = statistics.median(x["rate"] for x in d)
            dp = statistics.median(x["p50_ms"] for x in d)
            line += f" | {v} {dr:7.1f} ops/s = {dr / sr:.2f}x (p50 {dp:.2f} ms)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
