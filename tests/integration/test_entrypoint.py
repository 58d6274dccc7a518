"""Three copies of entrypoint.sh side by side on 127.0.0.1 (SPEC §3): the real engine and
sidecar processes, free ports found at run time, one data directory per node.

Every entrypoint runs in its own process group; the fixture SIGKILLs every group at teardown,
also after a failure.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers_proc import (HOST, REPO_ROOT, ProcessGroups, cmdline, free_ports, get,
                                group_pids, http_get, http_request, is_running, log_tails,
                                put_ok, python_env, wait_for, wait_http, wait_pids_gone)

ENTRYPOINT = REPO_ROOT / "entrypoint.sh"
TOKEN = "entrypoint-test-token-7f3a"
READY_TIMEOUT = 90.0


@dataclass
class EpNode:
    node_id: str
    http: int
    mgmt: int
    raft: int
    app: int
    side: int
    data_dir: Path
    log: Path
    proc: object = None

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http}"

    @property
    def mgmt_url(self) -> str:
        return f"http://{HOST}:{self.mgmt}"

    def env(self, join: str | None) -> dict[str, str]:
        return python_env({
            "NODE_ID": self.node_id,
            "BOOTSTRAP": "true" if join is None else "false",
            "JOIN_ADDR": join or "",
            "HTTP_PORT": str(self.http), "MGMT_PORT": str(self.mgmt), "RAFT_PORT": str(self.raft),
            "APP_PORT": str(self.app), "SIDE_PORT": str(self.side),
            "DATA_DIR": str(self.data_dir), "ADVERTISE": HOST, "BIND_HOST": HOST,
            "PYTHON": sys.executable, "CLUSTER_TOKEN": TOKEN, "STOP_TIMEOUT": "15",
        })

    def children(self) -> list[int]:
        """Running processes of this node's group other than the script itself."""
        return [p for p in group_pids(self.proc.pid) if p != self.proc.pid]


def _start(groups: ProcessGroups, node: EpNode, join: str | None):
    node.proc = groups.start(["bash", str(ENTRYPOINT)], env=node.env(join), log_path=node.log,
                             cwd=node.data_dir.parent)
    return node.proc


@pytest.fixture(scope="module")
def ep_cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("entrypoint")
    groups = ProcessGroups()
    nodes = []
    for i in range(3):
        http, mgmt, raft, app, side = free_ports(5)
        nid = f"node{i + 1}"
        nodes.append(EpNode(nid, http, mgmt, raft, app, side, base / nid, base / f"{nid}.log"))
    try:
        join = f"{HOST}:{nodes[0].mgmt}"
        for i, n in enumerate(nodes):
            _start(groups, n, None if i == 0 else join)
        logs = [n.log for n in nodes]
        procs = [n.proc for n in nodes]
        for n in nodes:
            wait_http(f"{n.mgmt_url}/health", READY_TIMEOUT, procs=procs, logs=logs)
            wait_http(f"{n.http_url}/health", READY_TIMEOUT, procs=procs, logs=logs)
        yield nodes
    finally:
        groups.kill_all()


def _tails(nodes) -> str:
    return log_tails([n.log for n in nodes])


def test_data_layout_and_processes(ep_cluster):
    for n in ep_cluster:
        assert (n.data_dir / "kv.db").is_dir(), f"{n.node_id}: engine data not in DATA_DIR/kv.db"
        assert (n.data_dir / "raft").is_dir(), f"{n.node_id}: raft data not in DATA_DIR/raft"
        cmds = [cmdline(p) for p in n.children()]
        engine = [c for c in cmds if "-m storage_engine" in c]
        sidecar = [c for c in cmds if "-m raft_sidecar" in c]
        assert len(engine) == 1 and len(sidecar) == 1, cmds
        assert f"-advertise {HOST}:{n.raft}" in sidecar[0]
        assert f"-app 127.0.0.1:{n.app}" in sidecar[0]
        assert f"{n.http} {n.app} {n.side} {n.data_dir / 'kv.db'}" in engine[0]


def test_write_on_one_node_read_on_all(ep_cluster):
    key, value = "entrypoint-key", f"value-{time.time_ns()}"
    put_ok(ep_cluster[1].http_url, key, value)  # node2: a follower at first, writes are forwarded
    for n in ep_cluster:
        status, body = get(n.http_url, key)
        assert (status, body) == (200, value.encode()), f"{n.node_id}: {(status, body)}\n{_tails(ep_cluster)}"


def test_status_lists_three_members(ep_cluster):
    want = {n.node_id: f"{HOST}:{n.raft}" for n in ep_cluster}
    for n in ep_cluster:
        def members():
            code, body = http_get(f"{n.mgmt_url}/status")
            assert code == 200, (code, body)
            st = json.loads(body)
            return {m["id"]: m["address"] for m in st["members"]} == want and st
        st = wait_for(members, 30, interval=0.2, what=f"{n.node_id} /status with 3 members",
                      details=lambda: _tails(ep_cluster))
        assert st["node_id"] == n.node_id
        assert isinstance(st["is_leader"], bool) and "leader_addr" in st
    assert sum(json.loads(http_get(f"{n.mgmt_url}/status")[1])["is_leader"] for n in ep_cluster) == 1


def test_token_is_required_and_never_on_a_command_line(ep_cluster):
    for n in ep_cluster:
        for pid in group_pids(n.proc.pid):
            assert TOKEN not in cmdline(pid), f"token visible in ps: {cmdline(pid)}"
    # The sidecar got the token through the environment: /join without it is refused.
    code, body = http_request("POST", f"{ep_cluster[0].mgmt_url}/join?peerID=ghost&peerAddress={HOST}:1")
    assert code == 401, (code, body)
    code, _ = http_request("POST", f"{ep_cluster[0].mgmt_url}/join?peerID=ghost&peerAddress={HOST}:1",
                           headers={"Authorization": "Bearer wrong-token"})
    assert code == 401


def test_sigterm_stops_both_children_and_the_script(ep_cluster):
    node = ep_cluster[2]
    children = node.children()
    assert len(children) == 2, [cmdline(p) for p in children]
    node.proc.send_signal(signal.SIGTERM)
    try:
        rc = node.proc.wait(timeout=45)
    except Exception:
        pytest.fail(f"entrypoint did not exit after SIGTERM\n{log_tails([node.log])}")
    left = wait_pids_gone(children, 5)
    assert not left, f"children still running after the script exited: {[cmdline(p) for p in left]}"
    assert rc == 0, f"requested stop should exit 0, got {rc}\n{log_tails([node.log])}"
    assert "received SIGTERM" in node.log.read_text()
    # The two remaining nodes keep serving.
    put_ok(ep_cluster[0].http_url, "after-sigterm", "still-up")


def test_engine_death_stops_the_sidecar_and_the_script(ep_cluster):
    node = ep_cluster[1]
    assert node.proc.poll() is None
    by_role = {("engine" if "-m storage_engine" in cmdline(p) else "sidecar"): p for p in node.children()}
    assert set(by_role) == {"engine", "sidecar"}
    os.kill(by_role["engine"], signal.SIGKILL)
    try:
        rc = node.proc.wait(timeout=45)
    except Exception:
        pytest.fail(f"entrypoint did not exit after its engine died\n{log_tails([node.log])}")
    assert rc == 128 + signal.SIGKILL, f"script should exit with the engine's status, got {rc}"
    assert not wait_pids_gone([by_role["sidecar"]], 5), "sidecar still running"
    assert not is_running(by_role["engine"])


def test_engine_failing_at_startup_fails_fast(tmp_path):
    """A node whose engine cannot start exits with an error and leaves nothing running."""
    data = tmp_path / "node"
    data.mkdir()
    (data / "kv.db").write_text("not a LevelDB directory")
    http, mgmt, raft, app, side = free_ports(5)
    node = EpNode("nodeX", http, mgmt, raft, app, side, data, tmp_path / "nodeX.log")
    with ProcessGroups() as groups:
        proc = _start(groups, node, None)
        start = time.monotonic()
        try:
            rc = proc.wait(timeout=60)
        except Exception:
            pytest.fail(f"entrypoint still running with a broken engine\n{log_tails([node.log])}")
        assert rc != 0, log_tails([node.log])
        assert time.monotonic() - start < 60
        left = wait_pids_gone(group_pids(proc.pid), 5)
        assert not left, [cmdline(p) for p in left]
