#!/usr/bin/env python3
"""Soak test: a 3-node RaftKV cluster under steady mixed load with rolling restarts.

    python scripts/soak.py --minutes 30 --restart-every 120 --report docs/reports/soak-$(date +%F).json

Starts its own cluster on 127.0.0.1 (free ports, data in a temporary directory; needs no
root), then for --minutes:

* writers: each owns one counter key and SETs it to 1, 2, 3, ... through a random node,
  recording every answer (acknowledged, definitely failed, or of unknown outcome);
* readers: linearizable GETs of random counters through random nodes;
* every --restart-every seconds one node (rotating node1, node2, node3, ...) is stopped with
  SIGTERM (its exit codes and stop time recorded) or, with probability --kill9-fraction,
  kill -9, and restarted after --down seconds;
* the RSS of every engine and sidecar process is sampled every --rss-every seconds.

At the end it writes a JSON report and a short text summary next to it (same name, .txt):
throughput and errors per minute, the restarts, RSS per process over time, and the checks:

* rss: no process slot (nodeN engine/sidecar) grows more than --rss-growth-limit (10%)
  between the five minutes after the baseline (minute 5; a third of the run when it is
  shorter) and the last five minutes, comparing medians of the samples (windows longer than
  the LevelDB memtable's fill-and-flush sawtooth);
* counters: no acknowledged write lost: every node returns each counter at >= its last
  acknowledged value (a lower value is only excused when it is the value of a write whose
  outcome was unknown, i.e. that may legitimately land late);
* history: the whole history (writes with their outcomes, every read) is linearizable per key
  (raftkv.linearizability, writes of unknown outcome may take effect late or never);
* clean stops: every SIGTERM stop exits 0 within its bound, and no raft index was applied
  twice on any node (the engines' --apply-audit files);
* restarts: every restarted node became healthy again.

Exit status 0 when every check passes, 1 when one fails (the cluster directory is then kept
and named in the summary), 2 when the cluster could not be started.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raftkv.linearizability import Op, check_by_key  # noqa: E402
from tests.cluster import Cluster, Node, get, put, wait_until  # noqa: E402

WRITE_TIMEOUT = 10.0   # above the engine's 5 s propose deadline: the engine answers first
READ_TIMEOUT = 10.0
STOP_BOUND = 15.0      # a SIGTERM stop that takes longer is killed and reported


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 30.0
    restart_every: float = 120.0
    writers: int = 4
    readers: int = 4
    kill9_fraction: float = 0.33
    down: float = 2.0
    rss_every: float = 10.0
    rss_baseline_minute: float = 5.0
    rss_growth_limit: float = 0.10
    check_timeout: float = 600.0
    seed: int = 1
    nodes: int = 3


# -- the load ------------------------------------------------------------------------------------

@dataclass
class Write:
    writer: int
    value: int
    node: str
    call: float
    ret: float
    outcome: str   # ok | fail (definitely not applied) | info (unknown)
    detail: str    # status code or exception class


@dataclass
class Read:
    reader: int
    key: str
    node: str
    call: float
    ret: float
    value: int | None   # None: key absent
    ok: bool
    detail: str


def counter_key(writer: int) -> str:
    return f"soak-counter-{writer}"


def classify_write(resp: requests.Response | None, exc: Exception | None) -> tuple[str, str]:
    """ok / fail / info for one write answer. 'fail' only when the write surely did not apply."""
    if exc is not None:
        text = str(exc)
        if isinstance(exc, requests.ConnectionError) and ("refused" in text or "Errno 111" in text):
            return "fail", "ConnectionRefused"       # never reached a server
        return "info", type(exc).__name__            # sent; the answer was lost
    assert resp is not None
    if resp.status_code == 200:
        return "ok", "200"
    if resp.status_code == 503 and "outcome unknown" not in resp.text:
        return "fail", "503"                         # no leader / overloaded: definite
    if resp.status_code == 503:
        return "info", "503-unknown"
    if 400 <= resp.status_code < 500:
        return "fail", str(resp.status_code)
    return "info", str(resp.status_code)


class Load:
    """Writer and reader threads against the cluster's nodes (whichever are up)."""

    def __init__(self, cluster: Cluster, cfg: SoakConfig) -> None:
        self._nodes = cluster.nodes
        self._cfg = cfg
        self._stop = threading.Event()
        self.writes: list[Write] = []
        self.reads: list[Read] = []
        self._threads = [threading.Thread(target=self._writer, args=(i,), name=f"writer-{i}", daemon=True)
                         for i in range(cfg.writers)]
        self._threads += [threading.Thread(target=self._reader, args=(i,), name=f"reader-{i}", daemon=True)
                          for i in range(cfg.readers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(max(WRITE_TIMEOUT, READ_TIMEOUT) + 5)

    def _writer(self, i: int) -> None:
        rng = random.Random(self._cfg.seed * 1000 + i)
        value = 0
        while not self._stop.is_set():
            value += 1
            node = rng.choice(self._nodes)
            call = time.monotonic()
            resp, exc = None, None
            try:
                resp = put(node.http_url, counter_key(i), str(value), timeout=WRITE_TIMEOUT)
            except requests.RequestException as e:
                exc = e
            outcome, detail = classify_write(resp, exc)
            self.writes.append(Write(i, value, node.node_id, call, time.monotonic(), outcome, detail))
            if outcome != "ok":
                time.sleep(0.05)  # a stopped node refuses at once: do not spin on it

    def _reader(self, i: int) -> None:
        rng = random.Random(self._cfg.seed * 1000 + 500 + i)
        while not self._stop.is_set():
            key = counter_key(rng.randrange(self._cfg.writers))
            node = rng.choice(self._nodes)
            call = time.monotonic()
            try:
                r = get(node.http_url, key, timeout=READ_TIMEOUT)
                ok = r.status_code in (200, 404)
                value = int(r.text) if r.status_code == 200 else None
                detail = str(r.status_code)
            except (requests.RequestException, ValueError) as e:
                ok, value, detail = False, None, type(e).__name__
            self.reads.append(Read(i, key, node.node_id, call, time.monotonic(), value, ok, detail))
            if not ok:
                time.sleep(0.05)


# -- memory -----------------------------------------------------------------------------------------

def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class RssSampler(threading.Thread):
    """RSS of every engine and sidecar process, every `every` seconds."""

    def __init__(self, cluster: Cluster, t0: float, every: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self._cluster = cluster
        self._t0 = t0
        self._every = every
        self._halt = threading.Event()
        self.samples: list[dict] = []

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self._every)

    def sample(self) -> None:
        t = round(time.monotonic() - self._t0, 1)
        for node in self._cluster.nodes:
            for role, proc in (("engine", node.engine), ("sidecar", node.sidecar)):
                if proc is None or proc.poll() is not None:
                    continue
                kb = rss_kb(proc.pid)
                if kb is not None:
                    self.samples.append({"t": t, "slot": f"{node.node_id}.{role}", "pid": proc.pid, "rss_kb": kb})

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# -- restarts ---------------------------------------------------------------------------------------

@dataclass
class Restart:
    t: float
    node: str
    kind: str                     # sigterm | kill9
    was_leader: bool
    leader_gap_s: float | None    # until another node was leader (when it was the leader)
    stop_s: float                 # SIGTERM until both processes exited
    exit_codes: dict = field(default_factory=dict)
    healthy_after_s: float | None = None   # start until healthy again
    error: str = ""


def current_leader(cluster: Cluster, among: list[Node]) -> Node | None:
    for n in among:
        try:
            if n.alive() and n.status(timeout=1.0)["is_leader"]:
                return n
        except (requests.RequestException, ValueError, KeyError):
            pass
    return None


def restart_node(cluster: Cluster, node: Node, kind: str, down: float, t0: float) -> Restart:
    others = [n for n in cluster.nodes if n is not node]
    was_leader = current_leader(cluster, [node]) is node
    rec = Restart(t=round(time.monotonic() - t0, 1), node=node.node_id, kind=kind, was_leader=was_leader,
                  leader_gap_s=None, stop_s=0.0)
    started = time.monotonic()
    if kind == "kill9":
        node.kill9()
        rec.stop_s = round(time.monotonic() - started, 3)
        rec.exit_codes = {"engine": node.engine.returncode, "sidecar": node.sidecar.returncode}
    else:
        node.terminate()
    if was_leader:
        try:
            wait_until(lambda: current_leader(cluster, others), 20, interval=0.02, what="a new leader")
            rec.leader_gap_s = round(time.monotonic() - started, 3)
        except TimeoutError:
            rec.error = "no new leader within 20 s"
    if kind == "sigterm":
        rec.exit_codes = node.stop(timeout=STOP_BOUND)  # None for a process that had to be killed
        rec.stop_s = round(time.monotonic() - started, 3)
    time.sleep(down)
    restarted = time.monotonic()
    try:
        node.start().wait_healthy(90)
        rec.healthy_after_s = round(time.monotonic() - restarted, 3)
    except Exception as exc:  # noqa: BLE001 - reported, and the run goes on with the others
        rec.error = (rec.error + "; " if rec.error else "") + f"not healthy after restart: {exc}"[:2000]
    return rec


# -- analysis ---------------------------------------------------------------------------------------

def per_minute(load: Load, t0: float, minutes: int) -> list[dict]:
    rows = [{"minute": m, "writes_ok": 0, "writes_failed": 0, "writes_unknown": 0, "reads_ok": 0, "reads_failed": 0}
            for m in range(minutes)]
    for w in load.writes:
        m = min(int((w.ret - t0) // 60), minutes - 1)
        rows[m]["writes_" + {"ok": "ok", "fail": "failed", "info": "unknown"}[w.outcome]] += 1
    for r in load.reads:
        m = min(int((r.ret - t0) // 60), minutes - 1)
        rows[m]["reads_ok" if r.ok else "reads_failed"] += 1
    for row in rows:
        row["writes_per_s"] = round(row["writes_ok"] / 60, 1)
        row["reads_per_s"] = round(row["reads_ok"] / 60, 1)
    return rows


def rss_analysis(samples: list[dict], duration: float, cfg: SoakConfig) -> dict:
    baseline = cfg.rss_baseline_minute * 60
    note = ""
    if duration < baseline + 120:
        baseline = duration / 3
        note = f"run shorter than {cfg.rss_baseline_minute + 2:.0f} min: baseline at {baseline:.0f} s instead"
    # Five-minute windows: the engine's RSS is a sawtooth (LevelDB's 4 MiB memtable fills
    # for a few minutes at this write rate, then flushes), and a one-minute window samples
    # one phase of it: the first 30-minute run read +10.8% on one engine from 60 s medians
    # while its 5-minute peaks and means grew under 3%.
    window = min(300.0, duration / 6)
    by_slot: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_slot[s["slot"]].append(s)
    growth: dict[str, dict] = {}
    worst = 0.0
    for slot, ss in sorted(by_slot.items()):
        base = [s["rss_kb"] for s in ss if baseline <= s["t"] < baseline + window]
        end = [s["rss_kb"] for s in ss if s["t"] >= duration - window]
        if not base or not end:
            growth[slot] = {"baseline_mb": None, "end_mb": None, "growth": None}
            continue
        b, e = statistics.median(base), statistics.median(end)
        g = e / b - 1
        worst = max(worst, g)
        growth[slot] = {"baseline_mb": round(b / 1024, 1), "end_mb": round(e / 1024, 1), "growth": round(g, 4),
                        "restarted_between": len({s["pid"] for s in ss if s["t"] >= baseline}) > 1}
    totals: dict[float, int] = defaultdict(int)
    for s in samples:
        totals[s["t"]] += s["rss_kb"]
    return {"baseline_s": round(baseline, 1), "window_s": round(window, 1), "note": note,
            "limit": cfg.rss_growth_limit, "worst_growth": round(worst, 4),
            "ok": all(v["growth"] is not None for v in growth.values()) and worst <= cfg.rss_growth_limit,
            "per_slot": growth,
            "peak_mb": {slot: round(max(s["rss_kb"] for s in ss) / 1024, 1) for slot, ss in sorted(by_slot.items())},
            "total_mb_over_time": [[t, round(kb / 1024, 1)] for t, kb in sorted(totals.items())]}


def final_values(cluster: Cluster, writers: int) -> dict[str, dict[str, int | None | str]]:
    """Each counter as every node returns it (linearizable read), after the load stopped."""
    out: dict[str, dict[str, int | None | str]] = {}
    for i in range(writers):
        key = counter_key(i)
        out[key] = {}
        for n in cluster.nodes:
            try:
                r = get(n.http_url, key, timeout=READ_TIMEOUT)
                out[key][n.node_id] = int(r.text) if r.status_code == 200 else (None if r.status_code == 404
                                                                                 else f"HTTP {r.status_code}")
            except (requests.RequestException, ValueError) as exc:
                out[key][n.node_id] = type(exc).__name__
    return out


def counter_check(load: Load, finals: dict[str, dict], writers: int) -> dict:
    per_key = {}
    ok = True
    for i in range(writers):
        key = counter_key(i)
        mine = [w for w in load.writes if w.writer == i]
        acked = [w.value for w in mine if w.outcome == "ok"]
        unknown = {w.value for w in mine if w.outcome == "info"}
        last_acked = max(acked, default=0)
        problems = []
        excused = []
        for node_id, v in finals[key].items():
            if not isinstance(v, int) and v is not None:
                problems.append(f"{node_id}: could not read ({v})")
            elif (v or 0) < last_acked:
                if v in unknown:
                    excused.append(f"{node_id}: {v} < {last_acked}, a write of unknown outcome landed late")
                else:
                    problems.append(f"{node_id}: {v} < last acknowledged {last_acked}: acknowledged write lost")
            elif v is not None and v > max((w.value for w in mine), default=0):
                problems.append(f"{node_id}: {v} was never written")
        ok = ok and not problems
        per_key[key] = {"attempted": len(mine), "acknowledged": len(acked), "unknown": len(unknown),
                        "last_acknowledged": last_acked, "final": finals[key], "problems": problems,
                        "excused": excused}
    return {"ok": ok, "per_key": per_key}


def history_check(load: Load, finals: dict[str, dict], cfg: SoakConfig, end: float) -> dict:
    """The recorded history, plus the final reads, checked for per-key linearizability."""
    ops: list[Op] = []
    for w in load.writes:
        ops.append(Op(process=w.writer, kind="set", key=counter_key(w.writer), value=str(w.value), call=w.call,
                      ret=None if w.outcome == "info" else w.ret, status=w.outcome))
    for r in load.reads:
        if r.ok:
            ops.append(Op(process=10_000 + r.reader, kind="get", key=r.key,
                          value=None if r.value is None else str(r.value), call=r.call, ret=r.ret, status="ok"))
    for key, per_node in finals.items():
        for j, (node_id, v) in enumerate(per_node.items()):
            if isinstance(v, int) or v is None:
                ops.append(Op(process=20_000 + j, kind="get", key=key, value=None if v is None else str(v),
                              call=end, ret=end + 0.001 * (j + 1), status="ok"))
    started = time.monotonic()
    results = check_by_key(ops, timeout=cfg.check_timeout)
    verdicts = {k: res.ok for k, res in results.items()}
    bad = {k: res.explanation for k, res in results.items() if res.ok is False}
    undecided = [k for k, res in results.items() if res.ok is None]
    return {"ok": not bad and not undecided, "ops": len(ops), "seconds": round(time.monotonic() - started, 1),
            "verdicts": verdicts, "violations": bad, "undecided": undecided}


def error_counts(load: Load, t0: float) -> dict:
    """Totals by kind, and when and where they happened (per second and node: restarts show up)."""
    timeline: Counter = Counter()
    for w in load.writes:
        if w.outcome != "ok":
            timeline[(int(w.ret - t0), "write", f"{w.outcome}:{w.detail}", w.node)] += 1
    for r in load.reads:
        if not r.ok:
            timeline[(int(r.ret - t0), "read", r.detail, r.node)] += 1
    return {"writes": dict(Counter(f"{w.outcome}:{w.detail}" for w in load.writes if w.outcome != "ok")),
            "reads": dict(Counter(r.detail for r in load.reads if not r.ok)),
            "timeline": [{"second": t, "op": op, "error": e, "node": n, "count": c}
                         for (t, op, e, n), c in sorted(timeline.items())][:5000]}


class SetupError(RuntimeError):
    pass


# -- the run ------------------------------------------------------------------------------------------

def run(cfg: SoakConfig, base_dir: Path, log=print) -> tuple[dict, bool]:  # type: ignore[no-untyped-def]
    cluster = Cluster(base_dir, name="soak")
    rng = random.Random(cfg.seed)
    try:
        log(f"starting a {cfg.nodes}-node cluster in {base_dir}")
        try:
            cluster.start(cfg.nodes, timeout=90)
        except Exception as exc:  # noqa: BLE001 - ProcessExited, TimeoutError: the logs say why
            raise SetupError(f"the cluster did not start: {exc}") from exc
        t0 = time.monotonic()
        started_at = datetime.now(timezone.utc)
        load = Load(cluster, cfg)
        sampler = RssSampler(cluster, t0, cfg.rss_every)
        sampler.start()
        load.start()
        duration = cfg.minutes * 60
        restarts: list[Restart] = []
        next_restart = t0 + cfg.restart_every
        next_progress = t0 + 60
        victim = 0
        while time.monotonic() - t0 < duration:
            now = time.monotonic()
            if cfg.restart_every > 0 and now >= next_restart and now - t0 < duration - 30:
                node = cluster.nodes[victim % len(cluster.nodes)]
                victim += 1
                kind = "kill9" if rng.random() < cfg.kill9_fraction else "sigterm"
                rec = restart_node(cluster, node, kind, cfg.down, t0)
                restarts.append(rec)
                log(f"[{rec.t:7.1f}s] restart {rec.node} ({kind}{', leader' if rec.was_leader else ''}): "
                    f"stop {rec.stop_s}s codes {rec.exit_codes}"
                    + (f" new leader after {rec.leader_gap_s}s" if rec.leader_gap_s is not None else "")
                    + f" healthy after {rec.healthy_after_s}s {rec.error}")
                next_restart += cfg.restart_every
                continue
            if now >= next_progress:
                next_progress += 60
                ok = sum(w.outcome == "ok" for w in load.writes)
                log(f"[{now - t0:7.1f}s] {ok} writes acknowledged, {sum(r.ok for r in load.reads)} reads ok")
            time.sleep(min(1.0, max(0.05, next_restart - time.monotonic())))
        load.stop()
        end_load = time.monotonic()
        sampler.sample()
        sampler.stop()
        log("load stopped; checking")
        # Whatever is down (a restart that failed) gets one more chance before the final reads.
        for n in cluster.nodes:
            if not n.alive():
                try:
                    n.restart(timeout=90)
                except Exception as exc:  # noqa: BLE001
                    log(f"{n.node_id} could not be restarted for the final check: {exc}")
        cluster.leader(timeout=30)
        finals = final_values(cluster, cfg.writers)
        double_applies = {n.node_id: n.duplicate_applies() for n in cluster.nodes}
        final_stop = cluster.stop_all(timeout=STOP_BOUND)
        counters = counter_check(load, finals, cfg.writers)
        history = history_check(load, finals, cfg, time.monotonic())
        rss = rss_analysis(sampler.samples, end_load - t0, cfg)
        minutes = max(1, math.ceil(cfg.minutes - 1e-6))  # the last writes may return just after the end
        sigterm_codes_ok = all(all(code == 0 for code in r.exit_codes.values())
                               for r in restarts if r.kind == "sigterm") and \
            all(code == 0 for codes in final_stop.values() for code in codes.values())
        restarts_ok = all(r.healthy_after_s is not None and not r.error for r in restarts)
        checks = {
            "rss": rss["ok"],
            "counters": counters["ok"],
            "history": history["ok"],
            "clean_stops": sigterm_codes_ok,
            "no_double_apply": not any(double_applies.values()),
            "restarts": restarts_ok,
        }
        acked = sum(w.outcome == "ok" for w in load.writes)
        report = {
            "ok": all(checks.values()),
            "checks": checks,
            "config": asdict(cfg),
            "started": started_at.isoformat(timespec="seconds"),
            "duration_s": round(end_load - t0, 1),
            "totals": {"writes_acknowledged": acked, "writes_attempted": len(load.writes),
                       "reads_ok": sum(r.ok for r in load.reads), "reads_attempted": len(load.reads),
                       "writes_per_s": round(acked / (end_load - t0), 1),
                       "reads_per_s": round(sum(r.ok for r in load.reads) / (end_load - t0), 1)},
            "throughput_per_minute": per_minute(load, t0, minutes),
            "errors": error_counts(load, t0),
            "restarts": [asdict(r) for r in restarts],
            "final_stop_exit_codes": final_stop,
            "double_applies": {k: {str(i): c for i, c in v.items()} for k, v in double_applies.items()},
            "rss": rss,
            "rss_samples": sampler.samples,
            "counters": counters,
            "history": history,
            "cluster_dir": str(base_dir),
        }
        return report, report["ok"]
    finally:
        cluster.shutdown()


def summary(report: dict) -> str:
    lines = [f"RaftKV soak {report['started']}: {report['duration_s'] / 60:.1f} min, "
             f"{'PASS' if report['ok'] else 'FAIL'}"]
    lines.append("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report["checks"].items()))
    t = report["totals"]
    lines.append(f"writes: {t['writes_acknowledged']} acknowledged of {t['writes_attempted']} "
                 f"({t['writes_per_s']}/s); reads: {t['reads_ok']} of {t['reads_attempted']} ({t['reads_per_s']}/s)")
    lines.append("per minute (writes/s, reads/s, failed+unknown writes, failed reads): " + "; ".join(
        f"{row['minute']}: {row['writes_per_s']} {row['reads_per_s']} "
        f"{row['writes_failed'] + row['writes_unknown']} {row['reads_failed']}"
        for row in report["throughput_per_minute"]))
    lines.append(f"errors: writes {report['errors']['writes'] or 'none'}; reads {report['errors']['reads'] or 'none'}")
    rs = report["restarts"]
    lines.append(f"restarts: {len(rs)} ({sum(r['kind'] == 'kill9' for r in rs)} kill -9, "
                 f"{sum(r['was_leader'] for r in rs)} of the leader)")
    for r in rs:
        lines.append(f"  {r['t']:7.1f}s {r['node']} {r['kind']:7s}{' leader' if r['was_leader'] else '       '} "
                     f"stop {r['stop_s']:.2f}s codes {r['exit_codes']}"
                     + (f" new leader after {r['leader_gap_s']}s" if r["leader_gap_s"] is not None else "")
                     + f" healthy after {r['healthy_after_s']}s {r['error']}".rstrip())
    rss = report["rss"]
    lines.append(f"RSS growth from {rss['baseline_s']:.0f}s to the end (medians over {rss['window_s']:.0f}s, "
                 f"limit {rss['limit']:.0%}): worst {rss['worst_growth']:+.1%} {rss['note']}")
    for slot, g in rss["per_slot"].items():
        if g["growth"] is None:
            lines.append(f"  {slot}: not enough samples")
        else:
            lines.append(f"  {slot}: {g['baseline_mb']} -> {g['end_mb']} MB ({g['growth']:+.1%}), "
                         f"peak {rss['peak_mb'][slot]} MB{' (restarted between)' if g['restarted_between'] else ''}")
    c = report["counters"]
    lines.append("counters: " + "; ".join(
        f"{k}: last acked {v['last_acknowledged']}, final {sorted(set(map(str, v['final'].values())))}"
        + (f" PROBLEMS {v['problems']}" if v["problems"] else "") + (f" excused {v['excused']}" if v["excused"] else "")
        for k, v in c["per_key"].items()))
    h = report["history"]
    lines.append(f"history: {h['ops']} ops checked in {h['seconds']}s: "
                 + ("linearizable" if h["ok"] else f"violations {h['violations']} undecided {h['undecided']}"))
    if any(report["double_applies"].values()):
        lines.append(f"DOUBLE APPLIES: {report['double_applies']}")
    if not report["ok"]:
        lines.append(f"cluster data and logs kept in {report['cluster_dir']}")
    return "\n".join(lines)


def recheck(path: Path, cfg: SoakConfig) -> int:
    """Recomputes the RSS check of a finished run from its recorded samples; the earlier
    evaluation is kept in the report under `rss_previous`."""
    report = json.loads(path.read_text())
    report.setdefault("rss_previous", report["rss"])
    report["rss"] = rss_analysis(report["rss_samples"], report["duration_s"], cfg)
    report["checks"]["rss"] = report["rss"]["ok"]
    report["ok"] = all(report["checks"].values())
    prev = report["rss_previous"]
    text = summary(report) + (f"\n(RSS re-evaluated from the recorded samples with {report['rss']['window_s']:.0f} s "
                              f"windows; the first evaluation used {prev['window_s']:.0f} s windows and read "
                              f"worst {prev['worst_growth']:+.1%})")
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    path.with_suffix(".txt").write_text(text + "\n")
    print(text)
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SoakConfig()
    p.add_argument("--minutes", type=float, default=d.minutes, help="minutes of load (30)")
    p.add_argument("--restart-every", type=float, default=d.restart_every,
                   help="seconds between two node restarts; 0 = none (120)")
    p.add_argument("--report", default=f"docs/reports/soak-{date.today().isoformat()}.json",
                   help="JSON report path; the text summary goes next to it with .txt")
    p.add_argument("--writers", type=int, default=d.writers, help="writer threads, one counter each (4)")
    p.add_argument("--readers", type=int, default=d.readers, help="reader threads (4)")
    p.add_argument("--kill9-fraction", type=float, default=d.kill9_fraction,
                   help="share of restarts done with kill -9 instead of SIGTERM (0.33)")
    p.add_argument("--down", type=float, default=d.down, help="seconds a stopped node stays down (2)")
    p.add_argument("--rss-every", type=float, default=d.rss_every, help="RSS sampling period, seconds (10)")
    p.add_argument("--rss-baseline-minute", type=float, default=d.rss_baseline_minute,
                   help="RSS growth is measured from this minute to the end (5)")
    p.add_argument("--rss-growth-limit", type=float, default=d.rss_growth_limit,
                   help="fail when a process slot's RSS grows more than this fraction (0.10)")
    p.add_argument("--check-timeout", type=float, default=d.check_timeout,
                   help="seconds for the linearizability check (600)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dir", default=None, help="cluster directory (default: a new temporary one)")
    p.add_argument("--recheck", metavar="REPORT", default=None,
                   help="re-evaluate the RSS check of an existing report from its samples (no run)")
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.writers < 1 or a.readers < 0:
        p.error("--minutes must be > 0, --writers >= 1, --readers >= 0")
    cfg = SoakConfig(minutes=a.minutes, restart_every=a.restart_every, writers=a.writers, readers=a.readers,
                     kill9_fraction=a.kill9_fraction, down=a.down, rss_every=a.rss_every,
                     rss_baseline_minute=a.rss_baseline_minute, rss_growth_limit=a.rss_growth_limit,
                     check_timeout=a.check_timeout, seed=a.seed)
    if a.recheck:
        return recheck(Path(a.recheck), cfg)
    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="raftkv-soak-"))
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        report, ok = run(cfg, base, log)
    except SetupError as exc:
        log(f"soak could not run: {exc}\nlogs in {base}")
        return 2
    text = summary(report)
    out = Path(a.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"report: {out.resolve()} and {out.with_suffix('.txt').resolve()}")
    if ok and not a.dir:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
