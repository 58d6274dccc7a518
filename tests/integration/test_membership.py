"""Membership through the sidecars' management API: join via a follower, idempotent
join, leave, and the cluster token."""
from __future__ import annotations

import time

import pytest

from tests.cluster import Cluster, free_ports, get, http_get, http_post, put, wait_until

pytestmark = pytest.mark.timeout(240)

TOKEN = "s3cret-token"


def member_ids(status: dict) -> set[str]:
    return {m["id"] for m in status["members"]}


def pairs(status: dict) -> set[tuple[str, str]]:
    return {(m["id"], m["address"]) for m in status["members"]}


def settled_commit_index(c: Cluster, leader) -> int:
    """The leader's commit index once every node lists every member by id and has applied it all."""
    expected = {(n.node_id, n.raft_addr) for n in c.nodes}

    def settled():
        idx = leader.status()["commit_index"]
        ok = all(pairs(s) == expected and s["applied_index"] == idx for s in (n.status() for n in c.nodes))
        return idx if ok and leader.status()["commit_index"] == idx else None
    return wait_until(settled, 20.0, what="a settled membership")


def test_join_via_follower_gets_all_data_then_leave(cluster: Cluster):
    c = cluster
    data = {f"m/{i:03d}": f"val-{i}" for i in range(60)}
    for i, (k, v) in enumerate(data.items()):
        r = put(c.nodes[i % 3].http_url, k, v)
        assert r.text == "ok", r.text
    leader = c.leader()
    follower = next(n for n in c.nodes if n is not leader)

    node4 = c.add_node(via=follower, node_id="node4", timeout=90.0)
    assert node4.sidecar_cmd()[node4.sidecar_cmd().index("-join") + 1] == follower.mgmt_addr

    # It received everything written before it joined (its own copy, no barrier).
    def has_all() -> bool:
        return all(node4.local(k).text == v for k, v in data.items())
    wait_until(has_all, 30.0, interval=0.5, what="node4 to hold all data written before it joined")

    expected = {(n.node_id, n.raft_addr) for n in c.nodes}
    wait_until(lambda: all(pairs(n.status()) == expected for n in c.nodes), 20.0,
               what=f"/status on every node listing {sorted(expected)}")
    # A full member: writes through it commit, everyone reads them.
    assert put(node4.http_url, "m/from-node4", "hello").text == "ok"
    for n in c.nodes:
        assert get(n.http_url, "m/from-node4").text == "hello"

    # Joining again with the same id and address: 200 and nothing changes,
    # through a follower (forwarded) and through the leader.
    for via in (follower, leader):
        r = http_post(f"{via.mgmt_url}/join", params={"peerID": "node4", "peerAddress": node4.raft_addr}, timeout=20)
        assert r.status_code == 200, f"repeated /join via {via.node_id}: {r.status_code} {r.text!r}"
        r = http_post(f"{via.mgmt_url}/join", params={"peerID": "node2", "peerAddress": c.node("node2").raft_addr},
                      timeout=20)
        assert r.status_code == 200, f"/join of existing node2 via {via.node_id}: {r.status_code} {r.text!r}"
    for n in c.nodes:
        assert len(n.status()["members"]) == 4, f"{n.node_id} after repeated joins: {n.status()['members']}"

    # /leave through a node that is neither the leader nor node4.
    via = next(n for n in c.nodes if n is not leader and n is not node4)
    r = http_post(f"{via.mgmt_url}/leave", params={"peerID": "node4"}, timeout=30)
    assert r.status_code == 200, f"/leave?peerID=node4 via {via.node_id}: {r.status_code} {r.text!r}"
    rest = [n for n in c.nodes if n is not node4]
    c.wait_members(3, nodes=rest, timeout=20.0)
    for n in rest:
        assert member_ids(n.status()) == {"node1", "node2", "node3"}, f"{n.node_id}: {n.status()['members']}"
    node4.kill9()

    # The three go on without it (a quorum of 2 out of 3, not 3 out of 4).
    for i, n in enumerate(rest):
        r = put(n.http_url, f"m/after-leave/{i}", str(i))
        assert (r.status_code, r.text) == (200, "ok"), f"write via {n.node_id} after node4 left: {r.text!r}"
    c.wait_converged("m/after-leave/2", "2", nodes=rest)


def test_cluster_token_guards_join_and_leave(cluster_factory):
    # The joining nodes read the same token from their environment: the cluster
    # forming at all proves an authorized /join works.
    c = cluster_factory(3, env={"CLUSTER_TOKEN": TOKEN})
    leader = c.leader()
    follower = next(n for n in c.nodes if n is not leader)
    ghost = f"127.0.0.1:{free_ports(1)[0]}"
    bad_auth = [
        ({}, {}),                                                   # no token at all
        ({"Authorization": "Bearer wrong"}, {}),                    # wrong bearer token
        ({}, {"token": "wrong"}),                                   # wrong query token
        ({"Authorization": TOKEN}, {}),                             # right token, not a Bearer header
    ]
    before_index = settled_commit_index(c, leader)
    for via in (leader, follower):
        for headers, extra in bad_auth:
            r = http_post(f"{via.mgmt_url}/join", params={"peerID": "ghost", "peerAddress": ghost, **extra},
                          headers=headers, timeout=20)
            assert r.status_code == 401, f"/join via {via.node_id} with {headers or extra or 'no token'}: " \
                                         f"{r.status_code} {r.text!r}"
            r = http_post(f"{via.mgmt_url}/leave", params={"peerID": "node3", **extra}, headers=headers, timeout=20)
            assert r.status_code == 401, f"/leave via {via.node_id} with {headers or extra or 'no token'}: " \
                                         f"{r.status_code} {r.text!r}"
        # GET is the original's method for /join; it is guarded the same way.
        r = http_get(f"{via.mgmt_url}/join", params={"peerID": "ghost", "peerAddress": ghost}, timeout=20)
        assert r.status_code == 401, f"GET /join without token: {r.status_code} {r.text!r}"

    # Nothing changed: same members on every node, no membership entry committed,
    # observed for a while (a refused change must not sneak in later).
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        for n in c.nodes:
            s = n.status()
            assert member_ids(s) == {"node1", "node2", "node3"}, f"{n.node_id} after refused calls: {s['members']}"
            assert all(m["address"] != ghost for m in s["members"])
        time.sleep(0.2)
    after_index = leader.status()["commit_index"]
    assert after_index == before_index, \
        f"refused /join,/leave calls committed entries: commit index {before_index} -> {after_index}"

    # The right token, as a header and as a query parameter: accepted (an idempotent re-join).
    n2 = c.node("node2")
    r = http_post(f"{follower.mgmt_url}/join", params={"peerID": "node2", "peerAddress": n2.raft_addr},
                  headers={"Authorization": f"Bearer {TOKEN}"}, timeout=20)
    assert r.status_code == 200, f"/join with the right bearer token: {r.status_code} {r.text!r}"
    r = http_post(f"{leader.mgmt_url}/join", params={"peerID": "node2", "peerAddress": n2.raft_addr, "token": TOKEN},
                  timeout=20)
    assert r.status_code == 200, f"/join with the right query token: {r.status_code} {r.text!r}"
    for n in c.nodes:
        assert len(n.status()["members"]) == 3
    # Status and health stay open.
    for n in c.nodes:
        assert n.health()[0] == 200
