"""SIGTERM is a graceful stop: the engine drains its in-flight requests, a leading sidecar
hands leadership over first, both exit 0 within their bounds."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass

import requests

from tests.cluster import Cluster, Node, get, http_get, put, wait_until
from tests.integration.test_metrics import scrape

STOP_BOUND = 10.0          # both processes gone within this after SIGTERM
NEW_LEADER_BOUND = 1.0     # below the minimum election timeout (1 s): only a handover is this fast
WRITE_TIMEOUT = 15.0       # a client request still open after this counts as a hang
ENGINE_DRAIN = 5.0         # the engine waits this long for in-flight requests


@dataclass
class Result:
    writer: int
    node: str
    value: int
    started: float
    took: float
    outcome: str           # "200", another status, or the exception class name


class Writers:
    """Clients that each increment their own counter key as fast as they can, round robin
    over the nodes, and remember every answer (acknowledged values included)."""

    def __init__(self, nodes: list[Node], count: int) -> None:
        self._nodes = nodes
        self._count = count
        self._stop = threading.Event()
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def start(self) -> "Writers":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(WRITE_TIMEOUT + 5)

    def _run(self, i: int) -> None:
        value = 0
        node = self._nodes[i % len(self._nodes)]
        while not self._stop.is_set():
            value += 1
            started = time.monotonic()
            try:
                outcome = str(put(node.http_url, f"writer-{i}", str(value), timeout=WRITE_TIMEOUT).status_code)
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            with self._lock:
                self.results.append(Result(i, node.node_id, value, started, time.monotonic() - started, outcome))
            if outcome != "200":
                time.sleep(0.01)  # a stopped node refuses at once: do not spin

    def last_acked(self) -> dict[int, int]:
        acked: dict[int, int] = {}
        for r in self.results:
            if r.outcome == "200":
                acked[r.writer] = max(acked.get(r.writer, 0), r.value)
        return acked


def wait_exit(p: subprocess.Popen, since: float, bound: float) -> tuple[int | None, float]:
    try:
        code = p.wait(timeout=max(since + bound - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - since
    return code, time.monotonic() - since


def test_sigterm_of_the_leader_under_write_load_hands_over_and_exits_cleanly(cluster: Cluster):
    c = cluster
    leader = c.leader()
    survivors = [n for n in c.nodes if n is not leader]
    before = {n.node_id: scrape(n.mgmt_url) for n in survivors}
    writers = Writers(c.nodes, 6).start()
    wait_until(lambda: sum(r.outcome == "200" for r in writers.results) >= 100, 20, what="writes flowing")

    t_term = time.monotonic()
    leader.terminate()  # SIGTERM to the engine and the sidecar, like entrypoint.sh and `docker stop`

    def new_leader() -> Node | None:
        for n in survivors:
            try:
                if n.status(timeout=0.5)["is_leader"]:
                    return n
            except requests.RequestException:
                pass
        return None
    successor = wait_until(new_leader, 10, interval=0.01, what="a new leader among the survivors")
    took_leader = time.monotonic() - t_term
    engine_code, engine_took = wait_exit(leader.engine, t_term, STOP_BOUND)
    sidecar_code, sidecar_took = wait_exit(leader.sidecar, t_term, STOP_BOUND)
    # Keep writing a little with the new leader, then stop the clients.
    time.sleep(1.0)
    writers.stop()

    summary = (f"new leader {successor.node_id} after {took_leader:.3f}s; engine exit {engine_code} after "
               f"{engine_took:.2f}s, sidecar exit {sidecar_code} after {sidecar_took:.2f}s; outcomes after SIGTERM "
               f"{Counter((r.node, r.outcome) for r in writers.results if r.started + r.took >= t_term)}")
    print(summary)
    assert took_leader < NEW_LEADER_BOUND, summary
    assert (engine_code, sidecar_code) == (0, 0), f"{summary}\n{leader.log_tail()}"
    assert "handed leadership to" in leader.sidecar_log.read_text(), leader.log_tail()

    # Every request got an answer well within the bound: a 2xx, a clean error status, or a
    # refused/closed connection of the stopped node. No timeouts.
    for r in writers.results:
        assert r.outcome in ("200", "503", "ConnectionError"), (r, summary)
        assert r.took < ENGINE_DRAIN + 3.0, (r, summary)
    # The survivors kept serving: their writes after the SIGTERM succeeded.
    after = [r for r in writers.results if r.node != leader.node_id and r.started >= t_term]
    assert after and sum(r.outcome == "200" for r in after) >= len(after) * 0.9, summary
    # Nothing acknowledged was lost: each counter reads back at least its last acknowledged value.
    for writer, acked in writers.last_acked().items():
        r = get(successor.http_url, f"writer-{writer}")
        assert r.status_code == 200 and int(r.text) >= acked, (writer, acked, r.status_code, r.text)
    # The metrics saw it: the survivors counted a leader change, the successor became leader.
    now = {n.node_id: scrape(n.mgmt_url) for n in survivors}
    for n in survivors:
        assert now[n.node_id].value("raftkv_raft_leader_changes_total") >= \
            before[n.node_id].value("raftkv_raft_leader_changes_total") + 1, n.node_id
    assert now[successor.node_id].value("raftkv_raft_became_leader_total") >= \
        before[successor.node_id].value("raftkv_raft_became_leader_total") + 1


def _post_in_thread(node: Node, key: str, value: str) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            box["status"] = put(node.http_url, key, value, timeout=WRITE_TIMEOUT).status_code
        except requests.RequestException as exc:
            box["status"] = type(exc).__name__
        box["took"] = time.monotonic() - t0
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _wait_engine_in_flight(node: Node, n: int) -> None:
    wait_until(lambda: scrape(node.http_url).value("raftkv_engine_writes_in_flight") >= n, 5,
               interval=0.02, what=f"{n} write(s) in flight on {node.node_id}")


def test_sigterm_of_an_engine_finishes_its_in_flight_request_and_refuses_new_ones(cluster: Cluster):
    c = cluster
    node = c.followers()[0]
    # Freeze the node's sidecar so that a write is surely in flight when the engine gets SIGTERM.
    os.kill(node.sidecar.pid, signal.SIGSTOP)
    try:
        t, box = _post_in_thread(node, "drained", "yes")
        _wait_engine_in_flight(node, 1)
        t_term = time.monotonic()
        node.engine.send_signal(signal.SIGTERM)
        # New connections are refused at once, while the old request still waits.
        wait_until(lambda: _refused(node), 3, interval=0.02, what="the engine to stop accepting connections")
        assert "status" not in box, box
        time.sleep(0.5)
    finally:
        os.kill(node.sidecar.pid, signal.SIGCONT)
    t.join(WRITE_TIMEOUT)
    code, took = wait_exit(node.engine, t_term, ENGINE_DRAIN + 3.0)
    assert box.get("status") == 200, box  # the in-flight write completed
    assert code == 0 and took < ENGINE_DRAIN + 3.0, (code, took)
    r = get(c.leader().http_url, "drained")
    assert r.status_code == 200 and r.text == "yes"


def test_sigterm_of_an_engine_with_a_stuck_request_exits_within_its_bound(cluster: Cluster):
    c = cluster
    node = c.followers()[0]
    os.kill(node.sidecar.pid, signal.SIGSTOP)  # never resumed before the engine is gone
    try:
        t, box = _post_in_thread(node, "stuck", "x")
        _wait_engine_in_flight(node, 1)
        t_term = time.monotonic()
        node.engine.send_signal(signal.SIGTERM)
        code, took = wait_exit(node.engine, t_term, STOP_BOUND)
        t.join(WRITE_TIMEOUT)
    finally:
        os.kill(node.sidecar.pid, signal.SIGCONT)
    assert code == 0, (code, took, node.log_tail())
    assert took < ENGINE_DRAIN + 3.0, took
    # The client got an answer (a clean error) or a closed connection, not a hang.
    assert box.get("status") in (503, "ConnectionError"), box
    assert box["took"] < ENGINE_DRAIN + 3.0, box


def _refused(node: Node) -> bool:
    try:
        http_get(f"{node.http_url}/health", timeout=1.0)
    except requests.ConnectionError:
        return True
    return False
