"""The benchmark: RaftKV against etcd and against raw ceilings, in one invocation.

    python -m bench.run [--out bench/results/result.json] [--quick] [--etcd]

Runs, on 127.0.0.1 with free ports:
  1. a 3-node RaftKV cluster: writes at concurrency 1, 16, 64 on the leader; after a preload,
     reads at 64 through a follower (linearizable, leader, local); a mixed read/write run over
     all nodes; wrk against the leader when wrk is installed;
  2. with --etcd (and etcd installed), a 3-member etcd cluster with the same rows;
  3. the ceilings (bench/ceilings.py): PySyncObj alone, plyvel alone, a trivial aiohttp server.
Records peak RSS (VmHWM) and CPU of every node process, the machine and the date; prints a
table; writes JSON with ratios RaftKV/etcd for every comparable row. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import ceilings, loadgen
from .cluster import (ROOT, EtcdCluster, RaftKVCluster, etcd_binary, etcd_version, http_json,
                      install_signal_cleanup, wait_until)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- machine ---------------------------------------------------------------------------------------


def _meminfo() -> dict:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("MemTotal", "MemAvailable"):
                    out[k] = int(v.split()[0]) // 1024
    except OSError:
        pass
    return {"mem_total_mib": out.get("MemTotal"), "mem_available_mib": out.get("MemAvailable")}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict:
    wrk = ceilings.wrk_binary()
    wrk_version = None
    if wrk:
        try:
            p = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
            wrk_version = (p.stdout + p.stderr).splitlines()[0].strip()
        except Exception:  # noqa: BLE001
            pass
    status = _git("status", "--porcelain", "--", "storage_engine", "raft_sidecar", "raftkv")
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        **_meminfo(),
        "loadavg_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("aiohttp", "pysyncobj", "plyvel", "msgpack", "grpcio")}
        | {"etcd": etcd_version(), "wrk": wrk_version},
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "product_code_uncommitted_changes": bool(status) if status is not None else None,
    }


# -- measuring one row --------------------------------------------------------------------------------


class Runner:
    def __init__(self, quick: bool, keys: int, value_size: int, duration: float | None, warmup: float | None):
        self.quick = quick
        self.keys = keys
        self.value_size = value_size
        self.duration = duration if duration is not None else (3.0 if quick else 15.0)
        self.warmup = warmup if warmup is not None else (1.0 if quick else 3.0)
        self.rows: list[dict] = []
        self.problems: list[str] = []

    def spec(self, workload: str, concurrency: int, consistency: str = "linearizable") -> loadgen.LoadSpec:
        return loadgen.LoadSpec(workload, concurrency, self.duration, self.warmup, self.keys, self.value_size,
                                read_ratio=0.5, consistency=consistency, timeout=10.0)

    def measure(self, cluster, system: str, row_id: str, target: str, fn) -> dict:
        """Runs fn() and adds server CPU (all node processes) and client CPU to its result."""
        procs = cluster.procs() if cluster is not None else []
        cpu0 = sum(p.cpu_seconds() for p in procs)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        try:
            res = fn()
        except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu1 = sum(p.cpu_seconds() for p in procs)
        row = {"id": row_id, "system": system, "target": target, **res}
        if procs:
            row["server_cpu_s"] = round(cpu1 - cpu0, 2)
            row["server_cpu_cores"] = round((cpu1 - cpu0) / wall, 2) if wall else None
            ops = res.get("ok_all") or 0
            row["server_cpu_ms_per_op"] = round((cpu1 - cpu0) * 1000 / ops, 3) if ops else None
        client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if res.get("tool") != "wrk":
            row["client_cpu_cores"] = round(client_cpu / wall, 2) if wall else None
        self.rows.append(row)
        self._report(row)
        return row

    def _report(self, row: dict) -> None:
        if "error" in row:
            log(f"  {row['system']} {row['id']}: FAILED {row['error']}")
            if row["system"] == "raftkv":
                self.problems.append(f"raftkv {row['id']}: run failed: {row['error']}")
            return
        log(f"  {row['system']:7s} {row['id']:32s} {row.get('ops_per_s')!s:>8} ops/s  p50 {row.get('p50_ms')} ms"
            f"  p99 {row.get('p99_ms')} ms  max {row.get('max_ms')} ms  errors {row.get('errors')}")
        if row["system"] != "raftkv":
            return
        if row.get("errors"):
            self.problems.append(f"raftkv {row['id']}: {row['errors']} errors: {row.get('errors_by_kind')}; "
                                 f"examples: {row.get('error_examples')}")
        if row.get("warmup_errors_by_kind"):
            self.problems.append(f"raftkv {row['id']}: errors during warm-up: {row['warmup_errors_by_kind']}")
        if (row.get("max_ms") or 0) > 1000:
            self.problems.append(f"raftkv {row['id']}: latency spike, max {row['max_ms']} ms "
                                 f"(p99 {row.get('p99_ms')} ms); slow ops: {row.get('slow_ops_over_1s', [])[:5]}")


# -- settling --------------------------------------------------------------------------------------------


def settle_raftkv(cluster: RaftKVCluster, timeout: float = 20.0) -> None:
    """Waits until every engine has applied the same index twice in a row (nothing in flight)."""
    prev = [None]

    def same() -> bool:
        idx = tuple(http_json("GET", f"{n.url}/debug/stats")["applied_index"] for n in cluster.nodes)
        ok = len(set(idx)) == 1 and prev[0] == idx
        prev[0] = idx
        return ok
    wait_until(same, timeout, "all RaftKV engines at the same applied index", interval=0.2)


def settle_etcd(cluster: EtcdCluster, timeout: float = 20.0) -> None:
    def same() -> bool:
        revs = {int(m.status()["header"]["revision"]) for m in cluster.members}
        idx = {int(m.status().get("raftAppliedIndex", m.status().get("raftIndex", 0))) for m in cluster.members}
        return len(revs) == 1 and len(idx) == 1
    wait_until(same, timeout, "all etcd members at the same revision", interval=0.2)


# -- the cluster runs ------------------------------------------------------------------------------------


class System:
    """One cluster under test and what the rows need from it."""

    def __init__(self, name: str, cluster) -> None:
        self.name = name
        self.cluster = cluster
        self.info: dict = {}
        self.leader = self.follower = None
        self.expected: dict | None = None
        self.failed: str | None = None

    def start(self) -> None:
        log(f"{self.name}: starting 3 nodes ...")
        t = time.monotonic()
        self.cluster.start()
        self.info["startup_s"] = round(time.monotonic() - t, 2)
        self.leader = self.cluster.leader()
        self.follower = self.cluster.followers()[0]
        self.info["leader"], self.info["follower"] = self.leader.url, self.follower.url
        log(f"{self.name}: up in {self.info['startup_s']} s; leader {self.leader.url}, follower {self.follower.url}")

    def preload(self, runner: "Runner") -> None:
        log(f"{self.name}: preloading {runner.keys} keys ...")
        t = time.monotonic()
        self.expected = loadgen.preload_sync(self.name, [self.leader.url], runner.keys, runner.value_size,
                                             concurrency=64, generation=1)
        (settle_raftkv if self.name == "raftkv" else settle_etcd)(self.cluster)
        self.info["preload_s"] = round(time.monotonic() - t, 2)

    def finish(self) -> None:
        # Still the same leader? (a change during the run explains errors and spikes)
        try:
            self.info["leader_at_end"] = self.cluster.leader(timeout=5).url
        except Exception as exc:  # noqa: BLE001
            self.info["leader_at_end"] = f"unknown: {exc}"
        self.info["memory"] = self.cluster.memory()


def run_systems(runner: Runner, systems: list[System], use_wrk: bool) -> None:
    """The comparable rows, interleaved: each row runs on every system back to back (alternating
    which goes first), so that a ratio compares two runs made seconds apart on the same machine."""
    for sys_ in systems:
        try:
            sys_.start()
        except Exception as exc:  # noqa: BLE001
            sys_.failed = f"start failed: {exc}"
            sys_.info["error"] = sys_.failed
            sys_.info["logs"] = sys_.cluster.log_tails()
            log(f"{sys_.name}: FAILED to start: {exc}")
            if sys_.name == "raftkv":
                runner.problems.append(f"raftkv cluster failed to start: {exc}")
    live = [s for s in systems if not s.failed]

    def row(i: int, row_id: str, target: str, make, only: tuple = ("raftkv", "etcd")) -> None:
        order = live if i % 2 == 0 else list(reversed(live))
        for sys_ in order:
            if sys_.name not in only:
                continue
            fn = make(sys_)
            if fn is not None:
                runner.measure(sys_.cluster, sys_.name, row_id, target, fn)

    i = 0
    for c in (1, 16, 64):
        row(i, f"write c={c}", "leader",
            lambda s, c=c: (lambda: loadgen.run_load_sync(s.name, [s.leader.url], runner.spec("write", c))))
        i += 1
    for sys_ in live:
        sys_.preload(runner)
    for cons in ("linearizable", "leader", "local"):
        row(i, f"read {cons} c=64", "follower",
            lambda s, cons=cons: (lambda: loadgen.run_load_sync(s.name, [s.follower.url],
                                                                runner.spec("read", 64, cons), s.expected)),
            only=("raftkv",) if cons == "leader" else ("raftkv", "etcd"))
        i += 1
    row(i, "mixed 50% lin. reads c=64", "round-robin",
        lambda s: (lambda: loadgen.run_load_sync(s.name, s.cluster.urls(), runner.spec("mixed", 64), s.expected)))
    i += 1
    if use_wrk and ceilings.wrk_binary():
        def wrk_fn(s: System):
            if s.name == "raftkv":
                url, script = f"{s.leader.url}/insert-val", "wrk_insert.lua"
            else:
                url, script = f"{s.leader.url}/v3/kv/put", "wrk_etcd_put.lua"
            return lambda: ceilings.run_wrk(url, script, 64, runner.duration, runner.keys, runner.value_size)
        row(i, "wrk write c=64", "leader", wrk_fn)
    for sys_ in live:
        sys_.finish()


def note_raftkv_logs(cluster: RaftKVCluster, info: dict, problems: list[str]) -> None:
    findings = cluster.grep_logs(("CRITICAL", "ERROR", "Traceback"), limit=100000)
    info["log_findings_count"] = len(findings)
    info["log_findings"] = findings[:30]
    if not findings:
        return
    kinds: dict[str, int] = {}
    for line in findings:
        name, _, text = line.partition(": ")
        # "2026-.. 14:44:46,100 CRITICAL sidecar[node2] logger: message" -> "sidecar CRITICAL logger: message"
        parts = text.split(" ", 4)
        level, body = (parts[2], parts[4]) if len(parts) == 5 else ("", text)
        key = f"{name.rsplit('-', 1)[-1]} {level} {loadgen._DIGITS.sub('#', body)[:150]}"
        kinds[key] = kinds.get(key, 0) + 1
    info["log_findings_by_kind"] = kinds
    problems.append(f"raftkv logs: {len(findings)} CRITICAL/ERROR/Traceback lines: "
                    + "; ".join(f"{n}x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:5]))


def summarize_memory(mem: list[dict]) -> dict:
    peaks = {m["name"]: m["peak_rss_kb"] for m in mem}
    total = sum(v or 0 for v in peaks.values())
    return {"peak_rss_kb": peaks, "total_peak_rss_mib": round(total / 1024, 1),
            "per_node_peak_rss_mib": round(total / 1024 / 3, 1)}


def comparisons(rows: list[dict]) -> list[dict]:
    by = {}
    for r in rows:
        if "error" not in r:
            by[(r["system"], r["id"])] = r
    out = []
    for (system, rid), r in by.items():
        if system != "raftkv" or ("etcd", rid) not in by:
            continue
        e = by[("etcd", rid)]

        def ratio(a, b):
            return round(a / b, 3) if a is not None and b not in (None, 0) else None
        out.append({"id": rid, "raftkv_ops_per_s": r.get("ops_per_s"), "etcd_ops_per_s": e.get("ops_per_s"),
                    "throughput_ratio": ratio(r.get("ops_per_s"), e.get("ops_per_s")),
                    "p50_ratio": ratio(r.get("p50_ms"), e.get("p50_ms")),
                    "p99_ratio": ratio(r.get("p99_ms"), e.get("p99_ms")),
                    "cpu_per_op_ratio": ratio(r.get("server_cpu_ms_per_op"), e.get("server_cpu_ms_per_op"))})
    return out


# -- output -------------------------------------------------------------------------------------------------


def _f(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_table(result: dict) -> str:
    ratios = {c["id"]: c for c in result.get("comparisons", [])}
    lines = []
    hdr = (f"{'system':8s} {'row':28s} {'target':11s} {'ops/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
           f"{'max ms':>8s} {'err':>5s} {'srv cpu':>7s} {'cli cpu':>7s} {'x etcd':>7s}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['system']:8s} {r['id']:28s} {r['target']:11s} FAILED: {r['error'][:60]}")
            continue
        ratio = ""
        if r["system"] == "raftkv" and r["id"] in ratios:
            ratio = _f(ratios[r["id"]]["throughput_ratio"], 2)
        lines.append(f"{r['system']:8s} {r['id']:28s} {r['target']:11s} {_f(r.get('ops_per_s'), 0):>8s} "
                     f"{_f(r.get('p50_ms')):>8s} {_f(r.get('p99_ms')):>8s} {_f(r.get('max_ms')):>8s} "
                     f"{_f(r.get('errors')):>5s} {_f(r.get('server_cpu_cores'), 2):>7s} "
                     f"{_f(r.get('client_cpu_cores'), 2):>7s} {ratio:>7s}")
    c = result.get("ceilings") or {}
    if c:
        lines.append("")
        lines.append("ceilings")
        for r in c.get("pysyncobj", []):
            if "error" in r:
                lines.append(f"  pysyncobj: FAILED {r['error'][:100]}")
                continue
            lines.append(f"  PySyncObj 3 nodes, {r['journal']} journal, {r['inflight']} in flight: "
                         f"{_f(r['commits_per_s'], 0)} commits/s  p50 {_f(r['p50_ms'])} ms  p99 {_f(r['p99_ms'])} ms"
                         f"  errors {sum(r['errors_by_kind'].values())}")
            tr = [r.get(f"follower{i}_truncations") or {} for i in (1, 2)]
            lines.append(f"    followers' log truncations without a term conflict: "
                         f"{sum(t.get('delete_calls', 0) for t in tr)} "
                         f"({sum(t.get('deleted_applied', 0) for t in tr)} of already-applied entries)")
        for r in c.get("plyvel", []):
            lines.append(f"  plyvel batch={r['batch']:<3d} sync={str(r['sync']):5s}: {_f(r['batches_per_s'], 0)} batches/s"
                         f" = {_f(r['keys_per_s'], 0)} keys/s  p99 {_f(r['p99_ms'], 3)} ms")
        for r in c.get("aiohttp", []):
            if "error" in r:
                lines.append(f"  aiohttp trivial {r.get('workload')}: FAILED {r['error'][:100]}")
                continue
            lines.append(f"  aiohttp trivial server, {r['workload']} c=64 (Python load generator): "
                         f"{_f(r['ops_per_s'], 0)} req/s  p50 {_f(r['p50_ms'])} ms  p99 {_f(r['p99_ms'])} ms"
                         f"  errors {r['errors']}  srv cpu {_f(r.get('server_cpu_cores'), 2)}"
                         f"  cli cpu {_f(r.get('client_cpu_cores'), 2)}")
        for r in c.get("wrk", []):
            if "error" in r:
                lines.append(f"  wrk: FAILED {r['error'][:100]}")
                continue
            lines.append(f"  wrk -> {r['target']} c=64: {_f(r['ops_per_s'], 0)} req/s  p50 {_f(r['p50_ms'])} ms"
                         f"  p99 {_f(r['p99_ms'])} ms  errors {r['errors']}  srv cpu {_f(r.get('server_cpu_cores'), 2)}")
    mem = result.get("memory") or {}
    if mem:
        lines.append("")
        lines.append("peak RSS (VmHWM)")
        for system, m in mem.items():
            parts = ", ".join(f"{k} {v / 1024:.0f}" for k, v in m["peak_rss_kb"].items() if v)
            lines.append(f"  {system}: total {m['total_peak_rss_mib']} MiB, per node {m['per_node_peak_rss_mib']} MiB"
                         f"  ({parts} MiB)")
        if "raftkv" in mem and "etcd" in mem and mem["etcd"]["total_peak_rss_mib"]:
            lines.append(f"  RaftKV/etcd memory: {mem['raftkv']['total_peak_rss_mib'] / mem['etcd']['total_peak_rss_mib']:.2f}")
    meta = result["meta"]
    lines.append("")
    lines.append(f"machine: {meta['nproc']} CPUs ({meta['cpu_model']}), {meta['mem_total_mib']} MiB, "
                 f"Python {meta['python']}, etcd {meta['versions'].get('etcd')}; {meta['date_utc']}; "
                 f"load average {tuple(round(x, 2) for x in meta['loadavg_start'])} at start, "
                 f"{tuple(round(x, 2) for x in meta.get('loadavg_end', ()))} at end")
    lines.append(f"duration {meta['duration_s']} s per row after {meta['warmup_s']} s warm-up; "
                 f"{meta['keys']} keys, {meta['value_size']}-byte values; srv cpu = CPU cores used by all node "
                 f"processes, cli cpu = cores used by the Python load generator; x etcd = RaftKV ops/s / etcd ops/s")
    if result.get("problems"):
        lines.append("")
        lines.append("RaftKV problems seen:")
        lines.extend(f"  - {p[:400]}" for p in result["problems"])
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/result.json", help="JSON output (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="3 s per row after 1 s warm-up (< 2 minutes overall)")
    ap.add_argument("--etcd", action="store_true", help="also run etcd (needs /usr/bin/etcd: apt-get install etcd-server)")
    ap.add_argument("--keys", type=int, default=None, help="key space (default 1000 quick, 10000 full)")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per row")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per row")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--no-wrk", action="store_true")
    ap.add_argument("--no-raftkv", action="store_true", help="skip RaftKV (e.g. to look at etcd alone)")
    args = ap.parse_args(argv)
    install_signal_cleanup()

    keys = args.keys or (1000 if args.quick else 10000)
    runner = Runner(args.quick, keys, args.value_size, args.duration, args.warmup)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    meta = machine_info()
    meta.update({"quick": args.quick, "duration_s": runner.duration, "warmup_s": runner.warmup, "keys": keys,
                 "value_size": args.value_size})
    result: dict = {"meta": meta, "rows": runner.rows, "clusters": {}, "memory": {}, "ceilings": None,
                    "comparisons": [], "problems": runner.problems, "notes": []}
    work = Path(tempfile.mkdtemp(prefix="raftkv-bench-"))
    use_wrk = not args.no_wrk
    try:
        systems: list[System] = []
        if not args.no_raftkv:
            systems.append(System("raftkv", RaftKVCluster(work / "raftkv")))
        if args.etcd:
            if etcd_binary():
                systems.append(System("etcd", EtcdCluster(work / "etcd")))
            else:
                msg = "etcd is not installed: apt-get update && apt-get install -y etcd-server"
                result["notes"].append(msg)
                log(msg)
        try:
            run_systems(runner, systems, use_wrk)
        finally:
            for sys_ in systems:
                result["clusters"][sys_.name] = sys_.info
                if "memory" in sys_.info:
                    result["memory"][sys_.name] = summarize_memory(sys_.info.pop("memory"))
                if sys_.name == "raftkv":
                    note_raftkv_logs(sys_.cluster, sys_.info, runner.problems)
                    if runner.problems:
                        dest = out_path.parent / "raftkv-logs"
                        shutil.rmtree(dest, ignore_errors=True)
                        dest.mkdir(parents=True, exist_ok=True)
                        for p in sys_.cluster.procs():
                            shutil.copy(p.log_path, dest / f"{p.name}.log")
                        result["notes"].append(f"RaftKV node logs copied to {dest}")
                sys_.info["exit_codes"] = sys_.cluster.stop()
        if not args.no_ceilings:
            log("ceilings ...")
            cwork = work / "ceilings"
            cwork.mkdir()
            result["ceilings"] = ceilings.run_all(cwork, args.quick, args.value_size, min(keys, 1000), use_wrk,
                                                  log=log)
            for r in result["ceilings"].get("aiohttp", []):
                r.pop("per_second_ok", None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        meta["loadavg_end"] = os.getloadavg()
        meta["total_s"] = round(time.monotonic() - t_start, 1)
        result["comparisons"] = comparisons(runner.rows)
        out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(format_table(result))
    print(f"\nJSON: {out_path}  (total {meta['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
