"""Issue 3 guards on real processes: exactly-once proposals through Raft, fail-stop
when the engine is gone, a node joining after log compaction, serialized joins."""
from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import pytest
import requests

from raftkv.pb import consensus_pb2 as pb
from raftkv.pb import consensus_pb2_grpc as pb_grpc
from tests.cluster import Cluster, get, http_get, http_post, put, wait_until

pytestmark = pytest.mark.timeout(240)


def _propose(node, cmd: pb.Command) -> pb.ProposeResponse:
    with grpc.insecure_channel(f"127.0.0.1:{node.ports.side_grpc}") as ch:
        return pb_grpc.RaftNodeStub(ch).Propose(cmd, timeout=10)


def test_a_retried_proposal_is_applied_once(cluster: Cluster):
    """The same (client_id, seq) proposed twice, through two different nodes, commits
    twice in the log but changes the data once: a retry after an ambiguous outcome
    cannot apply a write twice."""
    leader, follower = cluster.leader(), cluster.followers()[0]

    def cmd(value: str) -> pb.Command:
        return pb.Command(op="BATCH", client_id="test-client", seq=7, floor=7,
                          batch=[pb.Command(op="SET", bkey=b"once", bvalue=value.encode())])

    first = _propose(leader, cmd("first"))
    assert first.success, first.error
    retry = _propose(follower, cmd("retry"))
    assert retry.success, retry.error
    assert retry.index > first.index
    for n in cluster.nodes:
        assert get(n.http_url, "once").text == "first"
        wait_until(lambda n=n: n.stats()["applied_index"] >= retry.index, 10, what="apply of the retry")
        assert n.stats()["keys"] >= 1
    # a new seq from the same client applies normally
    nxt = pb.Command(op="BATCH", client_id="test-client", seq=8, floor=8,
                     batch=[pb.Command(op="SET", bkey=b"once", bvalue=b"second")])
    assert _propose(leader, nxt).success
    assert get(follower.http_url, "once").text == "second"
    # and a copy below the floor (a write its client gave up on) is never applied
    late = pb.Command(op="BATCH", client_id="test-client", seq=6, floor=6,
                      batch=[pb.Command(op="SET", bkey=b"once", bvalue=b"late")])
    assert _propose(leader, late).success
    assert get(leader.http_url, "once").text == "second"


def test_sidecar_fail_stops_when_its_engine_is_gone(cluster_factory):
    c = cluster_factory(3, sidecar_args=["--apply-fail-timeout", "2"])
    victim = c.followers()[0]
    victim.engine.send_signal(signal.SIGKILL)
    victim.engine.wait(timeout=10)
    leader = c.leader()
    assert put(leader.http_url, "after-engine-death", "v").text == "ok"
    # The sidecar must not spin on the entry: it exits with a clear message.
    victim.sidecar.wait(timeout=20)
    assert victim.sidecar.returncode == 3
    log = victim.sidecar_log.read_text()
    assert "FAIL-STOP" in log and "engine unreachable" in log
    # the other two keep serving
    assert put(leader.http_url, "still-serving", "v").text == "ok"
    # restarting the node (engine + sidecar) brings it back with everything
    victim.stop()
    victim.start().wait_healthy(30)
    wait_until(lambda: get(victim.http_url, "still-serving", consistency="local").text == "v", 20,
               what="restarted node catches up")


def test_node_added_after_log_compaction_gets_all_data(cluster_factory):
    c = cluster_factory(3, sidecar_args=["--compact-entries", "40"])
    leader = c.leader()
    expected = {f"pre/{i}": f"v{i}" for i in range(150)}
    for k, v in expected.items():
        assert put(leader.http_url, k, v).text == "ok"
    # every member compacts well below 150 entries; the newcomer must get a snapshot
    wait_until(lambda: all((n.dir / "raft" / "raft.dump").exists() for n in c.nodes), 30,
               what="a dump on every node")
    newcomer = c.add_node(via=c.followers()[0], node_id="node4")
    c.wait_members(4, timeout=30)
    for k, v in expected.items():
        wait_until(lambda k=k, v=v: get(newcomer.http_url, k, consistency="local").text == v, 20,
                   what=f"{k} on the newcomer")
    applies = newcomer.stats()["applies"]
    assert applies < len(expected) // 2, f"newcomer replayed {applies} entries one by one; expected a snapshot"


def test_concurrent_joins_are_serialized(cluster: Cluster):
    """Two joins at once both succeed, one after the other (PySyncObj's own guard is dead code)."""
    via = cluster.followers()[0]
    n4 = cluster.new_node("node4")
    n5 = cluster.new_node("node5")

    def join(node):
        return http_post(f"{via.mgmt_url}/join", params={"peerID": node.node_id, "peerAddress": node.raft_addr,
                                                           "mgmtAddress": node.mgmt_addr}, timeout=40)

    # Start both nodes first (as the joiner does); a node refuses to start when it finds
    # itself already a member with an empty data dir, so the extra joins below are sent
    # only once both have passed that check (their management port answers). Their own
    # joiners and these two joins then all race for the leader's single-flight lock.
    for node in (n4, n5):
        node.join = cluster.nodes[0].mgmt_addr
        node.start()

    def mgmt_up(node) -> bool:
        try:
            return http_get(f"{node.mgmt_url}/status", timeout=2).status_code == 200
        except requests.RequestException:
            return False
    for node in (n4, n5):
        wait_until(lambda node=node: mgmt_up(node), 30, what=f"{node.node_id} management port")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(join, (n4, n5)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    cluster.wait_members(5, timeout=40)
    for node in (n4, n5):
        node.wait_healthy(40)
    assert put(cluster.leader().http_url, "five", "members").text == "ok"
    for node in (n4, n5):
        wait_until(lambda node=node: get(node.http_url, "five", consistency="local").text == "members", 20,
                   what="write reaches the joined nodes")


def test_leave_of_the_leader_hands_leadership_over(cluster: Cluster):
    old = cluster.leader()
    r = http_post(f"{cluster.followers()[0].mgmt_url}/leave", params={"peerID": old.node_id}, timeout=40)
    assert r.status_code == 200, r.text
    rest = [n for n in cluster.nodes if n is not old]
    cluster.wait_members(2, timeout=30, nodes=rest)
    new = cluster.leader(nodes=rest)
    assert new is not old
    assert put(new.http_url, "after-leave", "v").text == "ok"
    old.stop()
