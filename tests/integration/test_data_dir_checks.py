"""A node whose Raft data is inconsistent refuses to start, naming the file, and the
cluster keeps serving from the others (never a silent empty start and rejoin)."""
from __future__ import annotations

import os

import pytest

from tests.cluster import Cluster, get, put, wait_until

pytestmark = pytest.mark.timeout(240)


def _start_refused(node) -> str:
    node.engine = node._spawn(node.engine_cmd(), node.engine_log)
    node.sidecar = node._spawn(node.sidecar_cmd(), node.sidecar_log)
    code = node.sidecar.wait(timeout=30)
    assert code != 0, "the sidecar started on a bad data dir"
    node.stop()
    return node.sidecar_log.read_text()


@pytest.fixture
def compacted(cluster_factory) -> Cluster:
    c = cluster_factory(3, sidecar_args=["--compact-entries", "30"])
    leader = c.leader()
    for i in range(120):
        assert put(leader.http_url, f"k{i}", f"v{i}").text == "ok"
    wait_until(lambda: all((n.dir / "raft" / "raft.dump").exists() for n in c.nodes), 30, what="dumps")
    return c


def test_compacted_journal_without_its_dump_is_refused(compacted: Cluster):
    victim = compacted.followers()[0]
    victim.stop()
    dump = victim.dir / "raft" / "raft.dump"
    os.remove(dump)
    log = _start_refused(victim)
    assert "refusing to start" in log and str(dump) in log
    assert put(compacted.leader().http_url, "still", "serving").text == "ok"


def test_corrupt_journal_is_refused(compacted: Cluster):
    victim = compacted.followers()[0]
    victim.stop()
    journal = victim.dir / "raft" / "raft.journal"
    data = bytearray(journal.read_bytes())
    assert len(data) > 200
    mid = len(data) // 2
    data[mid:mid + 8] = b"\xff" * 8
    journal.write_bytes(bytes(data))
    log = _start_refused(victim)
    assert "refusing to start" in log and str(journal) in log
    assert put(compacted.leader().http_url, "still", "serving").text == "ok"


def test_torn_dump_is_refused_and_wipe_and_rejoin_recovers(compacted: Cluster):
    victim = compacted.followers()[0]
    victim.stop()
    dump = victim.dir / "raft" / "raft.dump"
    dump.write_bytes(dump.read_bytes()[:-10])
    log = _start_refused(victim)
    assert "refusing to start" in log and str(dump) in log
    # documented recovery: remove the node, wipe its data, join again
    leader = compacted.leader()
    from tests.cluster import http_post
    assert http_post(f"{leader.mgmt_url}/leave", params={"peerID": victim.node_id}).status_code == 200
    import shutil
    shutil.rmtree(victim.dir / "raft")
    shutil.rmtree(victim.dir / "kv.db")
    victim.join = leader.mgmt_addr
    victim.bootstrap = False
    victim.start().wait_healthy(40)
    wait_until(lambda: get(victim.http_url, "k119", consistency="local").text == "v119", 30,
               what="rejoined node has the data")
