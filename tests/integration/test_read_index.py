"""Linearizable reads by ReadIndex (raft_sidecar/read_index.py) on a real 3-node cluster.

A read confirms the leader with one round of messages instead of a log entry, so
it must (a) still see every write acknowledged before it, on any node, (b) add
nothing to the Raft log, and (c) refuse to answer on a leader that has lost its
majority, which is the case a log-free read could get wrong.
"""
from __future__ import annotations

import time

import pytest

from tests.cluster import Cluster, get, put

pytestmark = pytest.mark.timeout(180)


def test_reads_see_the_last_write_and_append_nothing_to_the_log(cluster: Cluster):
    leader = cluster.leader()
    followers = [n for n in cluster.nodes if n is not leader]
    for i in range(20):
        writer = cluster.nodes[i % 3]
        value = f"v{i}"
        assert put(writer.http_url, "ri/key", value).text == "ok"
        for reader in followers + [leader]:
            r = get(reader.http_url, "ri/key", consistency="linearizable")
            assert (r.status_code, r.text) == (200, value), \
                f"round {i}: write via {writer.node_id}, linearizable read via {reader.node_id}"

    before = {n.node_id: n.status()["commit_index"] for n in cluster.nodes}
    for _ in range(30):
        for reader in cluster.nodes:
            r = get(reader.http_url, "ri/key")  # the default mode is linearizable
            assert (r.status_code, r.text) == (200, "v19")
    after = {n.node_id: n.status()["commit_index"] for n in cluster.nodes}
    assert after == before, f"90 reads moved the commit index: {before} -> {after}"


def test_one_follower_down_reads_still_confirm(cluster: Cluster):
    leader = cluster.leader()
    victim, survivor = [n for n in cluster.nodes if n is not leader]
    victim.kill9()
    assert put(leader.http_url, "ri/after-kill", "fresh").text == "ok"
    for reader in (survivor, leader):
        r = get(reader.http_url, "ri/after-kill", consistency="linearizable")
        assert (r.status_code, r.text) == (200, "fresh"), f"read via {reader.node_id} with one follower down"


def test_leader_without_a_majority_refuses_linearizable_reads(cluster: Cluster):
    leader = cluster.leader()
    assert put(leader.http_url, "ri/cut", "before").text == "ok"
    assert get(leader.http_url, "ri/cut", consistency="linearizable").text == "before"
    for n in cluster.nodes:
        if n is not leader:
            n.kill9()
    # At once: PySyncObj still calls itself leader for a few seconds, and it is the
    # probe round that has to fail here, not the leader's step-down.
    started = time.monotonic()
    r = get(leader.http_url, "ri/cut", consistency="linearizable", timeout=30)
    assert r.status_code != 200, f"a leader with no majority answered a linearizable read: {r.text!r}"
    assert r.status_code == 503, (r.status_code, r.text)
    assert time.monotonic() - started < 20
    # control: the engine is up and holds the value; only the confirmation is missing
    local = get(leader.http_url, "ri/cut", consistency="local")
    assert (local.status_code, local.text) == (200, "before")
