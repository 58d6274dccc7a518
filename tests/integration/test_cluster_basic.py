"""Issue 2 acceptance on a real 3-node cluster: writes through any node, linearizable
default reads, delete, 404/400, /status and /health.

The tests share one module-scoped cluster: each uses its own keys.
"""
from __future__ import annotations

import pytest

from tests.cluster import Cluster, delete, get, http_get, put, wait_until

pytestmark = pytest.mark.timeout(180)

STATUS_FIELDS = ("is_leader", "leader_addr", "node_id", "term", "commit_index", "applied_index", "members")


def test_writes_through_every_node_are_readable_everywhere_at_once(module_cluster: Cluster):
    c = module_cluster
    leader = c.leader()
    writers = [leader] + [n for n in c.nodes if n is not leader]
    for round_ in range(5):
        for w in writers:
            key, value = f"basic/{w.node_id}", f"v{round_}-via-{w.node_id}"
            r = put(w.http_url, key, value)
            assert (r.status_code, r.text) == (200, "ok"), \
                f"write via {w.node_id} ({'leader' if w is leader else 'follower'}): {r.status_code} {r.text!r}"
            # No sleep: the default read mode is linearizable, so every node must
            # already return the acknowledged value, followers included.
            for reader in c.nodes:
                g = get(reader.http_url, key)
                assert (g.status_code, g.text) == (200, value), \
                    f"round {round_}: read of {key} via {reader.node_id} right after a write via " \
                    f"{w.node_id}: {g.status_code} {g.text!r}, expected {value!r}"


def test_explicit_linearizable_and_leader_reads(module_cluster: Cluster):
    c = module_cluster
    leader = c.leader()
    for i, w in enumerate(c.nodes):
        key, value = f"modes/{i}", f"m{i}"
        assert put(w.http_url, key, value).text == "ok"
        for reader in c.nodes:
            r = get(reader.http_url, key, consistency="linearizable")
            assert (r.status_code, r.text) == (200, value), f"linearizable via {reader.node_id}"
        r = get(leader.http_url, key, consistency="leader")
        assert (r.status_code, r.text) == (200, value), "leader read on the leader"


def test_delete_and_missing_keys(module_cluster: Cluster):
    c = module_cluster
    leader = c.leader()
    follower = next(n for n in c.nodes if n is not leader)
    key = "basic/to-delete"
    assert put(leader.http_url, key, "doomed").text == "ok"
    for n in c.nodes:
        assert get(n.http_url, key).text == "doomed"

    r = delete(follower.http_url, key)
    assert (r.status_code, r.text) == (200, "ok"), f"DELETE via a follower: {r.status_code} {r.text!r}"
    for n in c.nodes:
        g = get(n.http_url, key)
        assert (g.status_code, g.text) == (404, "Key Not Found"), \
            f"{n.node_id} still answers {g.status_code} {g.text!r} for a deleted key"

    # Deleted through the leader too, after writing it back through a follower.
    assert put(follower.http_url, key, "again").text == "ok"
    assert get(leader.http_url, key).text == "again"
    assert delete(leader.http_url, key).text == "ok"
    for n in c.nodes:
        assert get(n.http_url, key).status_code == 404

    for n in c.nodes:
        g = get(n.http_url, "basic/never-written")
        assert (g.status_code, g.text) == (404, "Key Not Found"), f"{n.node_id}: {g.status_code} {g.text!r}"
        for mode in ("linearizable", "leader", "local"):
            g = get(n.http_url, "basic/never-written", consistency=mode)
            assert g.status_code == 404, f"{n.node_id} consistency={mode}: {g.status_code} {g.text!r}"


def test_missing_key_parameter_is_400(module_cluster: Cluster):
    for n in module_cluster.nodes:
        r = http_get(f"{n.http_url}/get-val")
        assert r.status_code == 400, f"{n.node_id}: GET /get-val without key -> {r.status_code} {r.text!r}"
        assert r.text.startswith("error:"), r.text
        r = http_get(f"{n.http_url}/get-val", params={"k": "x"})
        assert r.status_code == 400, f"{n.node_id}: GET /get-val?k=x -> {r.status_code} {r.text!r}"


def test_status_and_health(module_cluster: Cluster):
    c = module_cluster
    statuses = {n.node_id: n.status() for n in c.nodes}
    expected_members = {(n.node_id, n.raft_addr) for n in c.nodes}
    for n in c.nodes:
        s = statuses[n.node_id]
        missing = [f for f in STATUS_FIELDS if f not in s]
        assert not missing, f"{n.node_id} /status lacks {missing}: {s}"
        assert s["node_id"] == n.node_id
        assert isinstance(s["is_leader"], bool)
        assert isinstance(s["leader_addr"], str) and s["leader_addr"]
        for f in ("term", "commit_index", "applied_index"):
            assert isinstance(s[f], int) and not isinstance(s[f], bool), f"{n.node_id} {f}={s[f]!r}"
        assert s["term"] >= 1
        assert 0 < s["applied_index"] <= s["commit_index"], s
        assert len(s["members"]) == 3, f"{n.node_id} members: {s['members']}"
        for m in s["members"]:
            assert {"id", "address"} <= set(m), m
        assert {(m["id"], m["address"]) for m in s["members"]} == expected_members, \
            f"{n.node_id} members {s['members']} != {sorted(expected_members)}"

    leaders = [nid for nid, s in statuses.items() if s["is_leader"]]
    assert len(leaders) == 1, f"is_leader on {leaders}"
    leader = c.node(leaders[0])
    assert {s["leader_addr"] for s in statuses.values()} == {leader.raft_addr}
    assert c.leader() is leader

    for n in c.nodes:
        r = http_get(f"{n.mgmt_url}/health")
        assert (r.status_code, r.text) == (200, "OK"), f"{n.node_id} sidecar /health: {r.status_code} {r.text!r}"
        r = http_get(f"{n.http_url}/health")
        assert (r.status_code, r.text) == (200, "OK"), f"{n.node_id} engine /health: {r.status_code} {r.text!r}"


def test_commit_and_applied_index_advance_with_writes(module_cluster: Cluster):
    c = module_cluster
    leader = c.leader()
    before = leader.status()
    for i in range(5):
        assert put(c.nodes[i % 3].http_url, f"basic/adv{i}", str(i)).text == "ok"
    after = leader.status()
    # The leader committed all five before any of them was acknowledged.
    assert after["commit_index"] >= before["commit_index"] + 5, (before, after)
    # Applying is asynchronous on the nodes that did not answer: every node gets there.
    target = after["commit_index"]
    for n in c.nodes:
        wait_until(lambda: n.status()["applied_index"] >= target, 10.0,
                   what=f"{n.node_id} applied_index >= {target}")


def test_demo_client_runs_against_every_node(module_cluster: Cluster):
    """The original's demo flow (test_client.py): one msgpack write, read back at once."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "test_client.py"
    for n in module_cluster.nodes:
        out = subprocess.run([sys.executable, str(script), n.http_url], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Response Body: ok" in out.stdout
        assert "msgpack_optimization_active" in out.stdout
