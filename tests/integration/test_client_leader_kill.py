"""Exactly-once through the client library while leaders are killed with SIGKILL.

Threads share one raftkv.Client (one client id, concurrent sequence numbers). Twice during
the load the current leader is killed -9 and restarted. The client retries through the other
nodes under the same request identity, so:

- CAS counter: every increment the client acknowledged was applied, none twice; increments
  that ended OutcomeUnknown may or may not be. So the final counter (= increments applied:
  each CAS is conditioned on the version it read) lies between the acknowledged count and
  that plus the unknown count, and no two acknowledged increments wrote the same value.
- unique keys: every acknowledged put exists exactly once (version 1: applied once), keys
  whose put ended OutcomeUnknown exist at most once, and nothing else exists.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import pytest

import raftkv
from tests.cluster import Cluster, wait_until

pytestmark = pytest.mark.timeout(300)

THREADS = 6
KILLS = 2


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: list = field(default_factory=list)
    unknown: list = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    retried_ok: int = 0  # acknowledged writes that needed more than one attempt


def client_for(c: Cluster) -> raftkv.Client:
    # retry_for above the time a leader election plus a restart can take here.
    return raftkv.Client([n.http_url for n in c.nodes], [n.mgmt_url for n in c.nodes], retry_for=30.0)


def kill_leaders(c: Cluster, stop: threading.Event, progress: dict) -> list[str]:
    """Kill -9 the leader KILLS times (each time once the load has made progress), restart it."""
    killed = []
    for _ in range(KILLS):
        start = progress["ops"]
        wait_until(lambda: progress["ops"] >= start + 30, 60, what="load progress before a kill")
        leader = c.leader(timeout=30)
        leader.kill9()
        killed.append(leader.node_id)
        # Survivors elect a new leader while the load continues, then the old one comes back.
        c.leader(timeout=30, nodes=[n for n in c.nodes if n is not leader])
        start = progress["ops"]
        wait_until(lambda: progress["ops"] >= start + 20, 60, what="load progress without the old leader")
        leader.start().wait_healthy(60)
    start = progress["ops"]
    wait_until(lambda: progress["ops"] >= start + 30, 60, what="load progress after the restarts")
    stop.set()
    return killed


def test_cas_counter_exactly_once_across_leader_kills(cluster: Cluster):
    kv = client_for(cluster)
    kv.put("counter", b"0")
    tally = Tally()
    stop = threading.Event()
    progress = {"ops": 0}

    def worker() -> None:
        while not stop.is_set():
            try:
                cur = kv.get("counter")
            except raftkv.RaftKVError as exc:
                with tally.lock:
                    tally.errors[f"get {type(exc).__name__}"] += 1
                continue
            new = int(cur.value) + 1
            try:
                kv.cas("counter", str(new), expect_version=cur.version)
            except raftkv.CompareFailed:
                continue  # another thread was first; read again
            except raftkv.OutcomeUnknown:
                with tally.lock:
                    tally.unknown.append(new)
                continue
            except raftkv.RaftKVError as exc:  # definite failures (Unavailable...): not applied
                with tally.lock:
                    tally.errors[type(exc).__name__] += 1
                continue
            with tally.lock:
                tally.acked.append(new)
                progress["ops"] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    try:
        killed = kill_leaders(cluster, stop, progress)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    final = int(kv.get("counter").value)
    acked, unknown = len(tally.acked), len(tally.unknown)
    report = (f"killed {killed}; final counter {final}, acknowledged {acked}, outcome unknown {unknown}, "
              f"definite errors {dict(tally.errors)}, client {kv.stats()}")
    print(report)
    dup = [v for v, n in Counter(tally.acked).items() if n > 1]
    assert not dup, f"two acknowledged increments wrote the same value {dup[:5]}: {report}"
    assert acked <= final <= acked + unknown, report
    assert max(tally.acked) <= final, report
    assert acked >= 80, f"too little progress to mean anything: {report}"
    assert kv.stats()["retries"] > 0, f"the kills never made the client retry: {report}"
    for n in cluster.nodes:
        assert not n.duplicate_applies(), f"{n.node_id} applied a raft index twice"
    kv.close()


def test_unique_keys_exactly_once_across_leader_kills(cluster: Cluster):
    kv = client_for(cluster)
    tally = Tally()
    stop = threading.Event()
    progress = {"ops": 0}

    def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"u/{w:02d}/{i:06d}"
            i += 1
            try:
                r = kv.put(key, key)
            except raftkv.OutcomeUnknown:
                with tally.lock:
                    tally.unknown.append(key)
                continue
            except raftkv.RaftKVError as exc:  # definite failures (Unavailable...): not applied
                with tally.lock:
                    tally.errors[type(exc).__name__] += 1
                continue
            with tally.lock:
                tally.acked.append(key)
                progress["ops"] += 1
                if r.duplicate:
                    tally.retried_ok += 1

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(THREADS)]
    for t in threads:
        t.start()
    try:
        killed = kill_leaders(cluster, stop, progress)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    stored = {x.key.decode(): x for x in kv.scan(prefix="u/")}
    acked, unknown = set(tally.acked), set(tally.unknown)
    report = (f"killed {killed}; stored {len(stored)}, acknowledged {len(acked)}, outcome unknown "
              f"{len(unknown)} ({len(unknown & stored.keys())} of them applied), answered as duplicates "
              f"{tally.retried_ok}, definite errors {dict(tally.errors)}, client {kv.stats()}")
    print(report)
    assert len(acked) == len(tally.acked)
    missing = acked - stored.keys()
    assert not missing, f"acknowledged puts lost: {sorted(missing)[:5]}: {report}"
    extra = stored.keys() - acked - unknown
    assert not extra, f"keys nobody may have written: {sorted(extra)[:5]}: {report}"
    twice = {k: x.version for k, x in stored.items() if x.version != 1}
    assert not twice, f"puts applied more than once (version > 1): {list(twice.items())[:5]}: {report}"
    assert all(x.value == k.encode() for k, x in stored.items())
    assert len(acked) >= 80, f"too little progress to mean anything: {report}"
    assert kv.stats()["retries"] > 0, f"the kills never made the client retry: {report}"
    for n in cluster.nodes:
        assert not n.duplicate_applies(), f"{n.node_id} applied a raft index twice"
    kv.close()
