"""A Jepsen-style workload, nemesis and checker run against a RaftKV cluster.

Clients: K threads, each a "process" of the history, doing random SET / DELETE /
GET on a few keys (values unique per write: "<process>-<n>"), every op to a
random node (or to the client's own node), with a client-side timeout. What a
client learns is recorded in a ``raftkv.linearizability.History``:

    write (SET/DELETE)                       read (GET)
    200 "ok"            -> ok                200 -> ok(value), 404 -> ok(None)
    400 / 413           -> fail              anything else -> fail
    503 "outcome unknown" -> info            (a read that failed or timed out had
    503 other (no leader, not applied,         no effect, so fail is exact)
        overloaded)     -> fail
    500, other statuses -> info
    connection refused / connect timeout -> fail (the request never left)
    any other error, client timeout      -> info

A process whose op ended "info" may still have that op in flight, so the client
continues under a fresh process id (as Jepsen does).

Nemesis: a thread running a schedule of faults, one at a time with a quiet period
between them: kill -9 of a random node then restart, kill -9 of the leader then
restart, isolating the leader, a 2/1 split with a random minority, and a partial
partition (only the link leader <-> one follower cut). Every fault is recorded
with its start and end.

After the run: heal, restart whatever is down, wait out in-flight proposals,
make one linearizable barrier write, read every key once more with the default
(linearizable) consistency (recorded in the history, so a lost acknowledged
write shows up as a violation), check the history, and check that every node
converges to the same data (``consistency=local`` reads on every node, polled
until equal or a deadline).
"""
from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import msgpack
import requests
import urllib3

from raftkv.linearizability import CheckResult, History, check

from .netns import Cluster, Node, session, wait_until

FAILURE_DIR = Path("/tmp/nemesis-failures")

FAULT_KINDS = ("kill_random", "kill_leader", "isolate_leader", "split", "partial")
PARTITION_KINDS = ("isolate_leader", "split", "partial")


# -- one client operation -------------------------------------------------------------------

def _never_sent(exc: BaseException) -> bool:
    """True when the request certainly never reached the server (refused / connect timeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError):
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)     # urllib3's MaxRetryError wraps the cause
        # NewConnectionError (refused, unreachable) is a ConnectTimeoutError in urllib3.
        return isinstance(reason, urllib3.exceptions.ConnectTimeoutError)
    return False


def classify_write(status: int | None, body: str, exc: BaseException | None) -> str:
    if exc is not None:
        return "fail" if _never_sent(exc) else "info"
    if status == 200:
        return "ok" if body == "ok" else "info"
    if status in (400, 413):
        return "fail"
    if status == 503:
        return "info" if "outcome unknown" in body else "fail"
    return "info"


def classify_read(status: int | None, exc: BaseException | None) -> str:
    if exc is None and status in (200, 404):
        return "ok"
    return "fail"


class Client:
    """Sends one op to one node and records invoke/outcome in the history."""

    def __init__(self, history: History, timeout: float = 10.0, connect_timeout: float = 2.0,
                 read_consistency: str | None = None) -> None:
        self.history = history
        self.timeout = (connect_timeout, timeout)
        self.read_consistency = read_consistency
        self.last_error: str = ""

    def write(self, process: int, node: Node, kind: str, key: str, value: str | None = None) -> str:
        assert kind in ("set", "delete")
        doc = {"op": kind.upper(), "key": key}
        if value is not None:
            doc["value"] = value
        body = msgpack.packb(doc)
        h = self.history.invoke(process, kind, key, value)
        status, text, exc = None, "", None
        try:
            r = session().post(f"{node.url}/insert-val", data=body, timeout=self.timeout,
                               headers={"Content-Type": "application/msgpack", "Connection": "close"})
            status, text = r.status_code, r.text
        except Exception as e:  # noqa: BLE001 - every failure is an outcome to record
            exc = e
        outcome = classify_write(status, text, exc)
        self.last_error = f"{status} {text[:200]}" if exc is None else repr(exc)[:200]
        getattr(self.history, outcome)(h)
        return outcome

    def read(self, process: int, node: Node, key: str, consistency: str | None = None) -> tuple[str, str | None]:
        params = {"key": key}
        consistency = consistency or self.read_consistency
        if consistency:
            params["consistency"] = consistency
        h = self.history.invoke(process, "get", key)
        status, content, exc = None, b"", None
        try:
            r = session().get(f"{node.url}/get-val", params=params, timeout=self.timeout,
                              headers={"Connection": "close"})
            status, content = r.status_code, r.content
        except Exception as e:  # noqa: BLE001
            exc = e
        outcome = classify_read(status, exc)
        self.last_error = f"{status} {content[:200]!r}" if exc is None else repr(exc)[:200]
        if outcome == "ok":
            value = content.decode("utf-8") if status == 200 else None
            self.history.ok(h, value)
            return "ok", value
        self.history.fail(h)
        return "fail", None


# -- configuration and report ---------------------------------------------------------------------

@dataclass
class Config:
    clients: int = 5
    keys: int = 5
    duration: float | None = None        # None: as long as the nemesis schedule takes
    schedule: Sequence[str] | None = None  # fault kinds in order; None: random, each kind once per round
    fault_kinds: Sequence[str] = FAULT_KINDS
    client_timeout: float = 10.0
    think: float = 0.01                  # pause between two ops of one client
    read_ratio: float = 0.5
    delete_ratio: float = 0.1            # of the writes
    read_consistency: str | None = None  # None: the default (linearizable)
    target: str = "random"               # "random" node per op, or "own" (client i -> node i % n)
    # One extra client pinned to each node. Random-node clients all end up waiting on
    # whichever node hangs (a cut-off follower holds a write up to the propose timeout),
    # which would make the whole cluster look down; pinned clients keep measuring the
    # nodes that do serve.
    pinned_clients: bool = True
    kill_down: float = 4.0               # seconds a killed node stays down
    partition_time: float = 8.0          # seconds a partition lasts
    quiet: float = 5.0                   # seconds between faults (and before the first one)
    settle: float = 7.0                  # after the run, before the barrier (in-flight proposals land)
    converge_timeout: float = 60.0
    check_timeout: float = 180.0
    gap_threshold: float = 1.0           # report spans longer than this without a successful op
    seed: int | None = None


@dataclass
class Fault:
    kind: str
    nodes: list[str]
    start: float
    end: float | None = None
    note: str = ""


@dataclass
class RunResult:
    report: dict[str, Any]
    history: History
    check: CheckResult | None
    converged: bool
    convergence: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.check is not None and self.check.ok is True and self.converged)


def summarize_ops(ops) -> dict[str, Any]:
    out: dict[str, Any] = {"total": len(ops), "ok": 0, "fail": 0, "info": 0, "by_kind": {}}
    for op in ops:
        out[op.status] += 1
        k = out["by_kind"].setdefault(op.kind, {"ok": 0, "fail": 0, "info": 0})
        k[op.status] += 1
    return out


def unavailability_windows(ops, t0: float, t1: float, threshold: float,
                           faults: Sequence[Fault] = ()) -> list[dict[str, Any]]:
    """Spans longer than ``threshold`` seconds in [t0, t1] in which no op completed ok."""
    times = [op.ret for op in ops if op.status == "ok" and op.ret is not None]
    return gap_windows(times, t0, t1, threshold, faults)


def gap_windows(ok_times: Sequence[float], t0: float, t1: float, threshold: float,
                faults: Sequence[Fault] = ()) -> list[dict[str, Any]]:
    """Spans longer than ``threshold`` in [t0, t1] that contain none of ``ok_times``."""
    times = sorted(t for t in ok_times if t0 <= t <= t1)
    points = [t0] + times + [t1]
    out = []
    for a, b in zip(points, points[1:]):
        if b - a > threshold:
            # a fault that was on when the window began (or ended shortly before:
            # recovery lags a heal or restart by an election) or started inside it
            during = [f"{f.kind}({','.join(f.nodes)})" for f in faults
                      if f.start <= b and (f.end if f.end is not None else t1) >= a - 2.0]
            out.append({"start": round(a - t0, 3), "end": round(b - t0, 3), "seconds": round(b - a, 3),
                        "faults": during})
    return out


# -- the run -------------------------------------------------------------------------------------------

class Runner:
    """Clients + nemesis against ``cluster`` (whose ``net`` is used for partitions)."""

    def __init__(self, cluster: Cluster, cfg: Config, log: Callable[[str], None] | None = None) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.history = History()
        self.keys = [f"k{i}" for i in range(cfg.keys)]
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._nemesis_done = threading.Event()
        self._pid_lock = threading.Lock()
        self._next_pid = cfg.clients
        self._node_log: list[tuple[str, float, str]] = []   # (node, completion time, outcome) per op
        self._log = log or (lambda msg: print(msg, flush=True))
        self.t0 = time.monotonic()
        self.t_end_load = self.t0

    def log(self, msg: str) -> None:
        self._log(f"[nemesis {time.monotonic() - self.t0:7.2f}s] {msg}")

    # clients
    def _new_pid(self) -> int:
        with self._pid_lock:
            pid = self._next_pid
            self._next_pid += 1
            return pid

    def _client(self, idx: int, pinned: Node | None = None) -> None:
        rng = random.Random(self.rng.random())
        client = Client(self.history, timeout=self.cfg.client_timeout, read_consistency=self.cfg.read_consistency)
        process = idx if pinned is None else self._new_pid()
        n = 0
        nodes = self.cluster.nodes
        while not self._stop.is_set():
            if pinned is not None:
                node = pinned
            else:
                node = nodes[idx % len(nodes)] if self.cfg.target == "own" else rng.choice(nodes)
            key = rng.choice(self.keys)
            if rng.random() < self.cfg.read_ratio:
                outcome, _ = client.read(process, node, key)
            else:
                n += 1
                if rng.random() < self.cfg.delete_ratio:
                    outcome = client.write(process, node, "delete", key)
                else:
                    outcome = client.write(process, node, "set", key, f"{process}-{n}")
                if outcome == "info":
                    process = self._new_pid()
            self._node_log.append((node.name, time.monotonic(), outcome))
            if self.cfg.think:
                self._stop.wait(rng.uniform(0, 2 * self.cfg.think))

    # nemesis
    def _schedule(self) -> list[str]:
        if self.cfg.schedule is not None:
            return list(self.cfg.schedule)
        have_net = self.cluster.net is not None
        kinds = [k for k in self.cfg.fault_kinds if have_net or k not in PARTITION_KINDS]
        if not kinds:
            raise ValueError("no fault kind is possible here")
        out: list[str] = []
        for _ in range(1000):   # rounds; the duration cuts it short
            r = list(kinds)
            self.rng.shuffle(r)
            out += r
        return out

    def _find_leader(self, timeout: float = 20.0) -> Node | None:
        try:
            return wait_until(self.cluster.leader, timeout, what="a leader")
        except TimeoutError:
            return None

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _restart(self, node: Node) -> None:
        try:
            node.start(need_leader=False, timeout=60.0)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            self.errors.append(f"restart of {node.name} failed: {exc}")
            self.log(f"restart of {node.name} FAILED: {exc}")

    def inject(self, kind: str) -> Fault:
        net = self.cluster.net
        nodes = self.cluster.nodes
        now = time.monotonic
        if kind in ("kill_random", "kill_leader"):
            if kind == "kill_leader":
                victim = self._find_leader()
                note = "" if victim else "no leader found; killed a random node"
                victim = victim or self.rng.choice(nodes)
            else:
                victim, note = self.rng.choice(nodes), ""
            f = Fault(kind, [victim.name], now(), note=note)
            self.faults.append(f)
            self.log(f"{kind}: kill -9 {victim.name} {note}")
            victim.kill9()
            self._sleep(self.cfg.kill_down)
            self.log(f"{kind}: restarting {victim.name}")
            self._restart(victim)
            f.end = now()
            return f
        assert net is not None, f"{kind} needs network namespaces"
        leader = self._find_leader()
        if kind == "isolate_leader":
            target = leader or self.rng.choice(nodes)
            f = Fault(kind, [target.name], now(), note="" if leader else "no leader found; isolated a random node")
            net.isolate(target)
        elif kind == "split":
            minority = self.rng.choice(nodes)
            rest = [n for n in nodes if n is not minority]
            f = Fault(kind, [minority.name], now(),
                      note=f"minority {minority.name} {'is' if minority is leader else 'is not'} the leader; "
                           f"majority {[n.name for n in rest]}")
            net.partition([[minority], rest])
        elif kind == "partial":
            a = leader or self.rng.choice(nodes)
            b = self.rng.choice([n for n in nodes if n is not a])
            f = Fault(kind, [a.name, b.name], now(), note=f"only the link {a.name}<->{b.name} is cut")
            net.cut(a, b)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        self.faults.append(f)
        self.log(f"{kind}: {f.nodes} {f.note} cuts={net.cuts()}")
        self._sleep(self.cfg.partition_time)
        net.heal()
        f.end = now()
        self.log(f"{kind}: healed")
        return f

    def _nemesis(self) -> None:
        try:
            deadline = None if self.cfg.duration is None else self.t0 + self.cfg.duration
            for kind in self._schedule():
                self._sleep(self.cfg.quiet)
                if self._stop.is_set():
                    break
                longest = max(self.cfg.kill_down + 15.0, self.cfg.partition_time)
                if deadline is not None and time.monotonic() + longest > deadline:
                    break
                self.inject(kind)
            if deadline is None:
                self._sleep(self.cfg.quiet)   # a quiet tail after the last fault
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"nemesis crashed: {exc!r}")
            self.log(f"nemesis crashed: {exc!r}")
        finally:
            if self.cluster.net is not None:
                self.cluster.net.heal()
            self._nemesis_done.set()

    # after the run
    def recover(self) -> None:
        """Heal, restart dead nodes, wait until every node is healthy."""
        if self.cluster.net is not None:
            self.cluster.net.heal()
        dead = [n for n in self.cluster.nodes if not n.alive()]
        if dead:
            self.log(f"restarting dead nodes {[n.name for n in dead]}")
            self.cluster.restart_all_after_crash()
        for n in self.cluster.nodes:
            n.wait_sidecar(60.0, need_leader=True)
        self.cluster.wait_leader(60.0)

    def barrier_and_final_reads(self) -> dict[str, Any]:
        """One linearizable barrier write, then one default-consistency read per key (recorded)."""
        client = Client(self.history, timeout=self.cfg.client_timeout)
        nodes = self.cluster.nodes
        value = f"barrier-{time.time_ns()}"
        deadline = time.monotonic() + 60.0
        pid = self._new_pid()
        while True:
            out = client.write(pid, self.rng.choice(nodes), "set", "__barrier__", value)
            if out == "ok":
                break
            if out == "info":
                pid = self._new_pid()
            if time.monotonic() > deadline:
                raise AssertionError(f"the final barrier write never succeeded: {client.last_error}")
            time.sleep(0.5)
        finals: dict[str, str | None] = {}
        pid = self._new_pid()
        for key in self.keys:
            while True:
                out, v = client.read(pid, self.rng.choice(nodes), key)
                if out == "ok":
                    finals[key] = v
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"final read of {key} never succeeded: {client.last_error}")
                time.sleep(0.5)
        return {"barrier": value, "final_values": finals}

    def convergence(self, barrier: str) -> tuple[bool, dict[str, Any]]:
        """Polls local reads of every key on every node until they agree (and include the barrier)."""
        keys = self.keys + ["__barrier__"]
        last: dict[str, dict[str, Any]] = {}

        def snapshot():
            snap = {}
            for n in self.cluster.nodes:
                data = {}
                for k in keys:
                    status, v = n.get_local(k)
                    if status not in (200, 404):
                        return False
                    data[k] = v
                snap[n.name] = data
            last.clear()
            last.update(snap)
            views = list(snap.values())
            return all(v == views[0] for v in views) and views[0]["__barrier__"] == barrier

        t = time.monotonic()
        try:
            wait_until(snapshot, self.cfg.converge_timeout, interval=0.5, what="nodes to converge")
            ok = True
        except TimeoutError:
            ok = False
        diff = {}
        if last:
            for k in keys:
                vals = {name: data.get(k) for name, data in last.items()}
                if len(set(vals.values())) > 1:
                    diff[k] = vals
        stats = {}
        for n in self.cluster.nodes:
            try:
                stats[n.name] = n.stats()
            except Exception as exc:  # noqa: BLE001
                stats[n.name] = repr(exc)
        return ok, {"converged": ok, "seconds": round(time.monotonic() - t, 2), "differences": diff,
                    "data": next(iter(last.values()), {}) if ok else last, "engine_stats": stats}

    # everything
    def run(self) -> RunResult:
        cfg = self.cfg
        self.t0 = time.monotonic()
        self.log(f"start: {cfg.clients} clients, {cfg.keys} keys, nodes {[n.name for n in self.cluster.nodes]}")
        clients = [threading.Thread(target=self._client, args=(i,), name=f"client-{i}", daemon=True)
                   for i in range(cfg.clients)]
        if cfg.pinned_clients:
            clients += [threading.Thread(target=self._client, args=(-1, n), name=f"pinned-{n.name}", daemon=True)
                        for n in self.cluster.nodes]
        nemesis = threading.Thread(target=self._nemesis, name="nemesis", daemon=True)
        for t in clients:
            t.start()
        nemesis.start()
        try:
            if cfg.duration is not None:
                self._nemesis_done.wait(cfg.duration)
            else:
                self._nemesis_done.wait()
        finally:
            self._stop.set()
            nemesis.join(timeout=120)
            for t in clients:
                t.join(timeout=cfg.client_timeout + 5)
        self.t_end_load = time.monotonic()
        self.log(f"load stopped after {self.t_end_load - self.t0:.1f}s, {len(self.history)} ops; recovering")

        self.recover()
        time.sleep(cfg.settle)
        final = self.barrier_and_final_reads()
        converged, conv = self.convergence(final["barrier"])
        self.log(f"convergence: {conv['converged']} in {conv['seconds']}s; checking {len(self.history)} ops")
        t = time.monotonic()
        ops = self.history.ops
        result = check(ops, timeout=cfg.check_timeout)
        check_seconds = time.monotonic() - t
        self.log(f"checker: ok={result.ok} in {check_seconds:.1f}s")

        by_kind: dict[str, int] = {}
        for f in self.faults:
            by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
        load_ops = [op for op in ops if op.key != "__barrier__"]
        windows = unavailability_windows(load_ops, self.t0, self.t_end_load, cfg.gap_threshold, self.faults)
        per_node = {}
        for node in self.cluster.nodes:
            node_ops = [(t, out) for name, t, out in self._node_log if name == node.name]
            w = gap_windows([t for t, out in node_ops if out == "ok"], self.t0, self.t_end_load,
                            cfg.gap_threshold, self.faults)
            per_node[node.name] = {
                "ops": len(node_ops), "ok": sum(1 for _, out in node_ops if out == "ok"),
                "windows": len(w), "total_seconds": round(sum(x["seconds"] for x in w), 2),
                "longest_seconds": max((x["seconds"] for x in w), default=0.0),
                "spans": [[x["start"], x["end"]] for x in w],
            }
        report = {
            "duration_seconds": round(time.monotonic() - self.t0, 2),
            "load_seconds": round(self.t_end_load - self.t0, 2),
            "config": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                       for k, v in dataclasses.asdict(cfg).items()},
            "nodes": [repr(n) for n in self.cluster.nodes],
            "ops": summarize_ops(ops),
            "faults": {
                "total": len(self.faults),
                "by_kind": by_kind,
                "timeline": [{"kind": f.kind, "nodes": f.nodes, "start": round(f.start - self.t0, 3),
                              "end": None if f.end is None else round(f.end - self.t0, 3), "note": f.note}
                             for f in self.faults],
            },
            "unavailability": {
                "threshold_seconds": cfg.gap_threshold,
                "windows": windows,
                "total_seconds": round(sum(w["seconds"] for w in windows), 2),
                "longest_seconds": max((w["seconds"] for w in windows), default=0.0),
                "per_node": per_node,
            },
            "checker": {"ok": result.ok, "bad_key": result.bad_key, "explanation": result.explanation,
                        "per_key_ops": result.per_key_ops, "seconds": round(check_seconds, 2)},
            "convergence": conv,
            "final": final,
            "errors": self.errors,
        }
        return RunResult(report, self.history, result, converged, conv)


def save_failure(name: str, result: RunResult | None, cluster: Cluster | None, history: History | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Keeps the history (jsonl), the report and every node's logs under /tmp/nemesis-failures/."""
    dest = FAILURE_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{id(result) % 10000}"
    dest.mkdir(parents=True, exist_ok=True)
    hist = history or (result.history if result else None)
    if hist is not None:
        hist.to_jsonl(dest / "history.jsonl")
    doc: dict[str, Any] = dict(result.report) if result else {}
    if extra:
        doc.update(extra)
    (dest / "report.json").write_text(json.dumps(doc, indent=2, default=str))
    if cluster is not None:
        cluster.save_artifacts(dest / "logs")
    return dest


def format_report(report: dict[str, Any]) -> str:
    """A short human summary; the full report is JSON."""
    ops, faults, un, ch = report["ops"], report["faults"], report["unavailability"], report["checker"]
    lines = [
        f"duration {report['duration_seconds']}s (load {report['load_seconds']}s)",
        f"ops: {ops['total']} total, {ops['ok']} ok, {ops['fail']} fail, {ops['info']} info; by kind {ops['by_kind']}",
        f"faults: {faults['total']} {faults['by_kind']}",
    ]
    for f in faults["timeline"]:
        lines.append(f"  {f['start']:8.2f}-{f['end'] if f['end'] is not None else '?':>8}  {f['kind']:<15}"
                     f" {','.join(f['nodes']):<8} {f['note']}")
    lines.append(f"unavailability (> {un['threshold_seconds']}s without an ok op): {len(un['windows'])} windows, "
                 f"{un['total_seconds']}s total, longest {un['longest_seconds']}s")
    for w in un["windows"]:
        lines.append(f"  {w['start']:8.2f}-{w['end']:8.2f} ({w['seconds']:.2f}s) during {w['faults']}")
    for name, pn in un.get("per_node", {}).items():
        lines.append(f"  node {name}: {pn['ok']}/{pn['ops']} ops ok, {pn['windows']} windows without an ok op, "
                     f"{pn['total_seconds']}s total, longest {pn['longest_seconds']}s")
    lines.append(f"linearizable: {ch['ok']} ({ch['seconds']}s): {ch['explanation'][:2000]}")
    lines.append(f"converged: {report['convergence']['converged']} "
                 f"differences: {report['convergence']['differences']}")
    if report["errors"]:
        lines.append(f"errors: {report['errors']}")
    return "\n".join(lines)


def run_nemesis(cfg: Config, nodes: int = 3, name: str = "nemesis", use_netns: bool = True,
                election_timeout: tuple[float, float] | None = None,
                log: Callable[[str], None] | None = None,
                save_failures: bool = True) -> tuple[RunResult, Path | None]:
    """Sets up namespaces and a cluster, runs the workload and nemesis, checks, tears everything down.

    Returns the result and, when the run failed (violation, no convergence, inconclusive
    check), the directory under /tmp/nemesis-failures/ that keeps its history and logs.
    Without namespaces only the kill faults are possible.
    """
    import shutil
    import tempfile

    from .netns import NetNS

    base = Path(tempfile.mkdtemp(prefix=f"raftkv-{name}-"))
    net = NetNS(nodes).setup() if use_netns else None
    cluster = None
    runner = None
    saved: Path | None = None
    try:
        if net is None and cfg.schedule is None:
            cfg = dataclasses.replace(cfg, fault_kinds=[k for k in cfg.fault_kinds if k not in PARTITION_KINDS])
        cluster = Cluster(base, nodes, net, election_timeout=election_timeout)
        cluster.start()
        runner = Runner(cluster, cfg, log)
        result = runner.run()
        if save_failures and (not result.ok or result.report["errors"]):
            saved = save_failure(name, result, cluster)
            result.report["saved_to"] = str(saved)
        return result, saved
    except BaseException as exc:
        if cluster is not None:
            saved = save_failure(f"{name}-aborted", None, cluster, runner.history if runner else None,
                                 extra={"error": repr(exc),
                                        "faults": [dataclasses.asdict(f) for f in runner.faults] if runner else []})
            if log:
                log(f"run aborted ({exc!r}); artifacts in {saved}")
        raise
    finally:
        if runner is not None:
            runner._stop.set()
        if cluster is not None:
            cluster.shutdown()
        if net is not None:
            net.teardown()
        if saved is None:
            shutil.rmtree(base, ignore_errors=True)
