"""Raw ceilings, measured in the same run as the cluster benchmarks, to see where RaftKV's time goes.

- `pysyncobj`: 3 PySyncObj nodes (subprocesses, TCP on 127.0.0.1) with the sidecar's settings
  (appendEntriesUseBatch=False, 100 ms heartbeat, no batching), no engine, no gRPC, no HTTP.
  The leader keeps many replicated calls in flight and counts commits (callback = applied on
  the leader). Run with the in-memory journal and with PySyncObj's file journal.
- `plyvel`: LevelDB write batches in one process (keys/s and batches/s), batch sizes 1 and 64,
  without and with sync=True.
- `aiohttp`: a trivial in-memory key-value server with RaftKV's own HTTP API (msgpack
  /insert-val, /get-val), driven by the same load generator as the clusters; plus, when `wrk`
  is installed, the same server and RaftKV/etcd driven by wrk (no Python client in the way).

    python -m bench.ceilings [--quick]              # all ceilings, JSON on stdout
    python -m bench.ceilings trivial-server --port P
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import loadgen
from .cluster import HOST, Proc, free_ports, http, wait_until

BENCH_DIR = Path(__file__).resolve().parent

# -- the trivial aiohttp server --------------------------------------------------------------------


def trivial_server(port: int, host: str = HOST) -> None:
    """An aiohttp server with RaftKV's client API over a dict: the HTTP+msgpack ceiling."""
    import msgpack
    from aiohttp import web

    data: dict[str, str] = {}

    async def insert_val(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            doc = msgpack.unpackb(body)
            key, op = doc["key"], doc["op"]
        except Exception:  # noqa: BLE001
            return web.Response(status=400, text="error: bad body")
        if op == "SET":
            data[key] = doc["value"]
        else:
            data.pop(key, None)
        return web.Response(text="ok")

    async def get_val(request: web.Request) -> web.Response:
        key = request.query.get("key")
        if key is None:
            return web.Response(status=400, text="error: key missing")
        if key not in data:
            return web.Response(status=404, text="Key Not Found")
        return web.Response(text=data[key])

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_post("/insert-val", insert_val)
    app.router.add_get("/get-val", get_val)
    app.router.add_get("/health", health)
    web.run_app(app, host=host, port=port, access_log=None, print=None)


class TrivialServer:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_ports(1)[0]
        self.proc = Proc("aiohttp-trivial-server",
                         [sys.executable, "-m", "bench.ceilings", "trivial-server", "--port", str(self.port)],
                         log_dir / "trivial-server.log")
        self.url = f"http://{HOST}:{self.port}"
        wait_until(lambda: http("GET", f"{self.url}/health", timeout=1)[0] == 200, 30, "trivial server")

    def stop(self) -> None:
        self.proc.stop()


# -- PySyncObj ---------------------------------------------------------------------------------------


def pysyncobj_node(idx: int, ports: list[int], duration: float, warmup: float, inflight: int,
                   value_size: int, keys: int, journal_dir: str | None, out: str | None) -> None:
    """One PySyncObj node; node 0 is the driver (short election timeout so that it leads)."""
    import logging

    from pysyncobj import SyncObj, SyncObjConf, replicated

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    class KV(SyncObj):
        def __init__(self, self_addr, partners, conf):
            super().__init__(self_addr, partners, conf)
            self._data: dict = {}

        @replicated
        def set(self, key, value):
            self._data[key] = value
            return True

    driver = idx == 0
    # Diagnostic: count how often a follower deletes log entries it already holds
    # (PySyncObj truncates after prevLogIdx whenever its log is longer, even without a
    # term conflict), and how often those entries were already applied.
    truncations = {"delete_calls": 0, "deleted_applied": 0}
    original_delete = SyncObj._SyncObj__deleteEntriesFrom

    def counting_delete(self, entry_from):
        truncations["delete_calls"] += 1
        if entry_from <= self.raftLastApplied:
            truncations["deleted_applied"] += 1
        return original_delete(self, entry_from)
    SyncObj._SyncObj__deleteEntriesFrom = counting_delete
    conf = SyncObjConf(
        appendEntriesUseBatch=False,          # as in the sidecar: send each entry at once
        appendEntriesPeriod=0.1,
        raftMinTimeout=0.4 if driver else 2.0,
        raftMaxTimeout=0.6 if driver else 3.0,
        commandsWaitLeader=False,
        commandsQueueSize=20000,
        connectionTimeout=3.5,
        connectionRetryTime=1.0,
        dynamicMembershipChange=False,
        journalFile=os.path.join(journal_dir, f"node{idx}.journal") if journal_dir else None,
        fullDumpFile=os.path.join(journal_dir, f"node{idx}.dump") if journal_dir else None,
    )
    addrs = [f"{HOST}:{p}" for p in ports]
    obj = KV(addrs[idx], [a for i, a in enumerate(addrs) if i != idx], conf)
    if not driver:
        # On SIGTERM a follower leaves its counters next to the driver's result.
        stats_path = Path(out or ".").parent / f"node{idx}.stats.json"

        def on_term(_sig, _frame):
            stats_path.write_text(json.dumps({**truncations, "commit_index": obj.raftCommitIndex}))
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
        while True:
            time.sleep(3600)

    deadline = time.monotonic() + 60
    while not (obj.isReady() and obj._isLeader()):  # noqa: SLF001
        if time.monotonic() > deadline:
            raise SystemExit("driver did not become leader within 60 s")
        time.sleep(0.05)
    # Wait for both followers to be reachable (a leader can be elected with one).
    time.sleep(0.5)

    sem = threading.BoundedSemaphore(inflight)
    lock = threading.Lock()
    lat_ms: list[float] = []
    errors: dict[str, int] = {}
    t_warm = time.perf_counter() + warmup
    t_end = t_warm + duration
    value = "v" * value_size
    rng = random.Random(1)

    def callback(t0: float, result, error) -> None:
        t1 = time.perf_counter()
        with lock:
            if t0 >= t_warm and t1 <= t_end:
                if error == 0 and result is True:   # FAIL_REASON.SUCCESS == 0
                    lat_ms.append((t1 - t0) * 1000.0)
                else:
                    errors[str(error)] = errors.get(str(error), 0) + 1
        sem.release()

    while True:
        sem.acquire()
        t0 = time.perf_counter()
        if t0 >= t_end:
            sem.release()
            break
        obj.set(f"k{rng.randrange(keys)}", value, callback=lambda r, e, t0=t0: callback(t0, r, e))
    # Let the calls in flight finish (their results fall outside the window anyway).
    for _ in range(inflight):
        if not sem.acquire(timeout=10):
            break
    lat_ms.sort()
    res = {
        "ok": len(lat_ms),
        "commits_per_s": round(len(lat_ms) / duration, 1),
        "p50_ms": round(loadgen.percentile(lat_ms, 50) or 0, 2),
        "p99_ms": round(loadgen.percentile(lat_ms, 99) or 0, 2),
        "max_ms": round(lat_ms[-1], 2) if lat_ms else None,
        "errors_by_kind": errors,
        "raft_commit_index": obj.raftCommitIndex,
    }
    text = json.dumps(res)
    if out:
        Path(out).write_text(text)
    else:
        print(text)
    obj.destroy()


def run_pysyncobj(work: Path, duration: float, warmup: float, inflight: int = 1000, value_size: int = 100,
                  keys: int = 1000, file_journal: bool = False) -> dict:
    ports = free_ports(3)
    tag = "file" if file_journal else "mem"
    jdir = work / f"pysyncobj-{tag}"
    jdir.mkdir(parents=True, exist_ok=True)
    out = jdir / "result.json"
    procs = []

    def cmd(i: int) -> list[str]:
        c = [sys.executable, "-m", "bench.ceilings", "pysyncobj-node", "--idx", str(i),
             "--ports", ",".join(map(str, ports)), "--duration", str(duration), "--warmup", str(warmup),
             "--inflight", str(inflight), "--value-size", str(value_size), "--keys", str(keys)]
        if file_journal:
            c += ["--journal-dir", str(jdir)]
        c += ["--out", str(out if i == 0 else jdir / f"node{i}.out")]
        return c
    try:
        for i in (1, 2, 0):
            procs.append(Proc(f"pysyncobj-{tag}-node{i}", cmd(i), jdir / f"node{i}.log"))
        driver = procs[-1]
        deadline = time.monotonic() + duration + warmup + 90
        memory = []
        while driver.alive() and time.monotonic() < deadline:
            dead = [p for p in procs[:2] if not p.alive()]
            if dead:
                return {"error": f"{dead[0].name} exited with {dead[0].popen.returncode}\n{dead[0].log_tail()}"}
            memory = [p.memory() for p in procs[:2]]
            time.sleep(0.2)
        if not out.exists():
            return {"error": f"driver produced no result (exit {driver.popen.returncode})\n{driver.log_tail()}"}
        res = json.loads(out.read_text())
        res["follower_memory"] = memory
    finally:
        for p in procs:
            p.stop(timeout=5)
    crit = []
    for p in procs:
        try:
            crit += [line for line in p.log_path.read_text(errors="replace").splitlines()
                     if "CRITICAL" in line or "Traceback" in line]
        except OSError:
            pass
    for i in (1, 2):
        try:
            res[f"follower{i}_truncations"] = json.loads((jdir / f"node{i}.stats.json").read_text())
        except (OSError, ValueError):
            res[f"follower{i}_truncations"] = None
    res["critical_log_lines"] = len(crit)
    res["critical_examples"] = crit[:3]
    res.update({"journal": tag, "inflight": inflight, "value_size": value_size, "duration_s": duration})
    return res


# -- plyvel ------------------------------------------------------------------------------------------


def run_plyvel(work: Path, duration: float, batch: int, sync: bool, value_size: int = 100,
               keys: int = 1000) -> dict:
    import plyvel
    path = work / f"plyvel-b{batch}-{'sync' if sync else 'nosync'}"
    db = plyvel.DB(str(path), create_if_missing=True)
    value = b"v" * value_size
    rng = random.Random(1)
    batches = 0
    lat: list[float] = []
    t_end = time.perf_counter() + duration
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            with db.write_batch(transaction=True, sync=sync) as wb:
                for _ in range(batch):
                    wb.put(f"k{rng.randrange(keys)}".encode(), value)
            batches += 1
            lat.append((time.perf_counter() - t0) * 1000.0)
    finally:
        db.close()
        shutil.rmtree(path, ignore_errors=True)
    lat.sort()
    return {"batch": batch, "sync": sync, "batches_per_s": round(batches / duration, 1),
            "keys_per_s": round(batches * batch / duration, 1),
            "p50_ms": round(loadgen.percentile(lat, 50) or 0, 3), "p99_ms": round(loadgen.percentile(lat, 99) or 0, 3)}


# -- wrk ---------------------------------------------------------------------------------------------


def wrk_binary() -> str | None:
    return shutil.which("wrk")


_WRK_JSON = re.compile(r"^WRK_JSON (\{.*\})\s*$", re.M)


def run_wrk(url: str, script: str, concurrency: int, duration: float, keys: int = 1000, value_size: int = 100,
            threads: int = 1, timeout_s: int = 10) -> dict:
    """Runs wrk with one of the bench/*.lua scripts; returns its summary (ops/s, latency, errors)."""
    exe = wrk_binary()
    if not exe:
        return {"error": "wrk is not installed (Debian: apt-get install wrk)"}
    env = dict(os.environ, WRK_KEYS=str(keys), WRK_VALUE_SIZE=str(value_size))
    cmd = [exe, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, int(round(duration)))}s",
           f"--timeout={timeout_s}s", "-s", str(BENCH_DIR / script), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + timeout_s + 30)
    m = _WRK_JSON.search(proc.stdout)
    if proc.returncode != 0 or not m:
        return {"error": f"wrk exit {proc.returncode}: {proc.stdout[-500:]} {proc.stderr[-500:]}"}
    raw = json.loads(m.group(1))
    secs = raw["duration_us"] / 1e6
    errors = raw["errors_verify"] + raw["socket_errors"] + raw["timeouts"]
    ok = max(0, raw["requests"] - raw["errors_verify"])
    return {"tool": "wrk", "script": script, "url": url, "concurrency": concurrency, "threads": threads,
            "ops_per_s": round(ok / secs, 1) if secs else None,
            "p50_ms": round(raw["p50_us"] / 1000, 2), "p99_ms": round(raw["p99_us"] / 1000, 2),
            "max_ms": round(raw["max_us"] / 1000, 2), "errors": errors,
            "errors_by_kind": {k: v for k, v in (("verify (status/body)", raw["errors_verify"]),
                                                 ("socket", raw["socket_errors"]),
                                                 ("timeout", raw["timeouts"])) if v},
            "requests": raw["requests"], "duration_s": round(secs, 2)}


# -- all ceilings ------------------------------------------------------------------------------------


def run_all(work: Path, quick: bool, value_size: int = 100, keys: int = 1000, use_wrk: bool = True,
            log=print) -> dict:
    dur, warm = (3.0, 1.0) if quick else (10.0, 2.0)
    out: dict = {"pysyncobj": [], "plyvel": [], "aiohttp": [], "wrk": []}
    for file_journal in (False, True):
        log(f"  ceiling: PySyncObj 3 nodes, {'file' if file_journal else 'memory'} journal ...")
        r = run_pysyncobj(work, dur, warm, value_size=value_size, keys=keys, file_journal=file_journal)
        out["pysyncobj"].append(r)
    for batch, sync in ((1, False), (64, False), (1, True)):
        log(f"  ceiling: plyvel batch={batch} sync={sync} ...")
        out["plyvel"].append(run_plyvel(work, 1.0 if quick else 3.0, batch, sync, value_size, keys))
    log("  ceiling: aiohttp trivial server ...")
    server = TrivialServer(work)

    def with_cpu(fn) -> dict:
        ru0, cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), server.proc.cpu_seconds(), time.monotonic()
        r = fn()
        ru1, cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), server.proc.cpu_seconds(), time.monotonic() - t0
        r["client_cpu_cores"] = round((ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime) / wall, 2)
        r["server_cpu_cores"] = round((cpu1 - cpu0) / wall, 2)
        return r
    try:
        spec = loadgen.LoadSpec("write", 64, dur, warm, keys, value_size)
        r = with_cpu(lambda: loadgen.run_load_sync("trivial", [server.url], spec))
        out["aiohttp"].append({"workload": "write", **r})
        expected = loadgen.preload_sync("trivial", [server.url], keys, value_size, concurrency=64)
        rspec = loadgen.LoadSpec("read", 64, dur, warm, keys, value_size, consistency="local")
        r = with_cpu(lambda: loadgen.run_load_sync("trivial", [server.url], rspec, expected))
        out["aiohttp"].append({"workload": "read", **r})
        if use_wrk and wrk_binary():
            log("  ceiling: wrk -> aiohttp trivial server ...")
            r = with_cpu(lambda: run_wrk(f"{server.url}/insert-val", "wrk_insert.lua", 64, dur, keys, value_size))
            r.pop("client_cpu_cores", None)
            out["wrk"].append({"target": "aiohttp trivial /insert-val", **r})
        out["trivial_server_memory"] = server.proc.memory()
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    ts = sub.add_parser("trivial-server")
    ts.add_argument("--port", type=int, required=True)
    pn = sub.add_parser("pysyncobj-node")
    pn.add_argument("--idx", type=int, required=True)
    pn.add_argument("--ports", required=True)
    pn.add_argument("--duration", type=float, default=5)
    pn.add_argument("--warmup", type=float, default=1)
    pn.add_argument("--inflight", type=int, default=1000)
    pn.add_argument("--value-size", type=int, default=100)
    pn.add_argument("--keys", type=int, default=1000)
    pn.add_argument("--journal-dir")
    pn.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "trivial-server":
        trivial_server(args.port)
        return 0
    if args.cmd == "pysyncobj-node":
        pysyncobj_node(args.idx, [int(p) for p in args.ports.split(",")], args.duration, args.warmup,
                       args.inflight, args.value_size, args.keys, args.journal_dir, args.out)
        return 0
    work = Path(tempfile.mkdtemp(prefix="raftkv-ceilings-"))
    try:
        res = run_all(work, args.quick, log=lambda m: print(m, file=sys.stderr))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
