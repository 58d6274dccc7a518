"""The `raftkv` command line against real clusters: every command, its output (text and
--json), its error messages and exit statuses.

Each command runs as `python -m raftkv ...` in a subprocess from an empty folder, with the
node URLs given by --nodes/--mgmt, RAFTKV_NODES or a cluster.json, like a user would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from raftkv import backup as backup_format
from raftkv import cli
from tests.cluster import ROOT, Cluster, free_ports, wait_until

pytestmark = pytest.mark.timeout(300)

TOKEN = "cli-cluster-token-" + "x" * 16


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes | None = None,
        timeout: float = 90.0) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("RAFTKV_") and k != "CLUSTER_TOKEN"}
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "raftkv", *args], cwd=cwd, env=e, input=stdin,
                          capture_output=True, timeout=timeout)


def out(p: subprocess.CompletedProcess) -> str:
    return p.stdout.decode("utf-8", "replace")


def err(p: subprocess.CompletedProcess) -> str:
    return p.stderr.decode("utf-8", "replace")


def explain(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\nstdout: {out(p)!r}\nstderr: {err(p)!r}"


class CLI:
    """`raftkv` pointed at one cluster through --nodes and --mgmt."""

    def __init__(self, c: Cluster, cwd: Path) -> None:
        self.cluster = c
        self.cwd = cwd
        self.nodes = ",".join(n.http_url for n in c.nodes)
        self.mgmt = ",".join(n.mgmt_url for n in c.nodes)

    def __call__(self, cmd: str, *args: str, ok: bool = True, **kw) -> subprocess.CompletedProcess:
        p = run(cmd, *args, "--nodes", self.nodes, "--mgmt", self.mgmt, cwd=self.cwd, **kw)
        if ok:
            assert p.returncode == 0, explain(p)
        return p


@pytest.fixture(scope="module")
def rk(module_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> CLI:
    return CLI(module_cluster, tmp_path_factory.mktemp("cli-cwd"))


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}/"


# -- keys -------------------------------------------------------------------------------------------------

def test_put_get_del(rk: CLI):
    k = fresh("cli") + "greeting"
    p = rk("put", k, "hello world")
    assert out(p).startswith("OK (revision ") and "version 1" in out(p)
    assert out(rk("get", k)) == "hello world\n"
    doc = json.loads(out(rk("get", k, "--json")))
    assert doc["key"] == k and doc["value"] == "hello world" and doc["version"] == 1
    assert {"create_revision", "mod_revision", "revision"} <= doc.keys()
    doc = json.loads(out(rk("put", k, "-", "--json", stdin=b"from stdin")))
    assert doc["version"] == 2
    assert out(rk("get", k, "--consistency", "leader")) == "from stdin\n"
    assert out(rk("del", k)).startswith("deleted (revision ")
    p = rk("del", k)
    assert "did not exist" in out(p)
    assert json.loads(out(rk("del", k, "--json")))["deleted"] == 0


def test_get_missing_key(rk: CLI):
    k = fresh("cli") + "nothing-here"
    p = rk("get", k, ok=False)
    assert p.returncode == cli.EXIT_NOT_FOUND == 1, explain(p)
    assert out(p) == ""
    assert err(p).strip() == f"raftkv get: key {k!r} not found"
    p = rk("get", k, "--json", ok=False)
    assert p.returncode == 1 and json.loads(out(p))["error"]["code"] == "not_found", explain(p)


def test_binary_values_print_as_bytes(rk: CLI, module_cluster: Cluster):
    import raftkv

    k = fresh("cli") + "bin"
    with raftkv.Client([n.http_url for n in module_cluster.nodes]) as kv:
        kv.put(k, b"\xff\x00\x01")
    assert rk("get", k).stdout == b"\xff\x00\x01"
    doc = json.loads(out(rk("get", k, "--json")))
    assert doc["value_b64"] == "/wAB" and "value" not in doc


def test_cas(rk: CLI):
    k = fresh("cli") + "counter"
    assert "version 1" in out(rk("cas", k, "1", "--create"))
    p = rk("cas", k, "1", "--create", ok=False)
    assert p.returncode == cli.EXIT_COMPARE_FAILED == 3, explain(p)
    assert "compare failed" in err(p) and "it has version 1" in err(p) and "nothing was written" in err(p)
    rk("cas", k, "2", "--expect-value", "1")
    p = rk("cas", k, "3", "--expect-version", "1", ok=False)
    assert p.returncode == 3 and "it has version 2" in err(p), explain(p)
    p = rk("cas", k, "3", "--expect-version", "1", "--json", ok=False)
    doc = json.loads(out(p))
    assert doc["error"]["code"] == "compare_failed" and doc["error"]["exit"] == 3, doc
    assert doc["current"]["exists"] is True and doc["current"]["version"] == 2, doc
    rev = json.loads(out(rk("get", k, "--json")))["mod_revision"]
    doc = json.loads(out(rk("cas", k, "3", "--expect-mod-revision", str(rev), "--json")))
    assert doc["version"] == 3
    p = rk("cas", k + "-missing", "x", "--expect-version", "2", ok=False)
    assert p.returncode == 3 and "it does not exist" in err(p), explain(p)
    p = rk("cas", k, "4", ok=False)
    assert p.returncode == cli.EXIT_USAGE and "needs a condition" in err(p), explain(p)
    p = rk("del", k, "--expect-version", "7", ok=False)
    assert p.returncode == 3, explain(p)
    assert out(rk("get", k)) == "3\n"


def test_scan(rk: CLI, module_cluster: Cluster):
    import raftkv

    p = fresh("cliscan")
    keys = [f"{p}{i:03d}" for i in range(250)]
    with raftkv.Client([n.http_url for n in module_cluster.nodes]) as kv:
        kv.txn([raftkv.PutOp(k, f"v{i}") for i, k in enumerate(keys)])
    lines = out(rk("scan", "--prefix", p, "--page-size", "64")).splitlines()
    assert lines == [f"{k}\tv{i}" for i, k in enumerate(keys)]
    assert out(rk("scan", keys[5], keys[9], "--keys-only")).splitlines() == keys[5:9]
    assert len(out(rk("scan", "--prefix", p, "--limit", "17")).splitlines()) == 17
    docs = [json.loads(line) for line in out(rk("scan", "--prefix", p, "--json", "--limit", "3")).splitlines()]
    assert [d["key"] for d in docs] == keys[:3] and docs[0]["value"] == "v0" and docs[0]["version"] == 1


def test_scan_bad_range(rk: CLI):
    p = rk("scan", "b", "a", ok=False)
    assert p.returncode == cli.EXIT_USAGE == 2, explain(p)
    assert err(p).startswith("raftkv scan: ") and "start" in err(p) and "end" in err(p)
    assert "http://" not in err(p), "a refused request is the user's mistake, not a node's"
    p = rk("scan", "b", "a", "--json", ok=False)
    assert json.loads(out(p))["error"]["code"] == "bad_range", explain(p)
    p = rk("scan", "a", "--prefix", "x", ok=False)
    assert p.returncode == 2 and "not both" in err(p), explain(p)
    p = rk("scan", "--limit", "0", ok=False)
    assert p.returncode == 2 and "--limit" in err(p), explain(p)


# -- cluster ------------------------------------------------------------------------------------------------

def test_status_and_members(rk: CLI, module_cluster: Cluster):
    leader = module_cluster.leader()
    text = out(rk("status"))
    lines = text.splitlines()
    assert lines[0].startswith(f"leader: {leader.node_id}") and "members: 3" in lines[0]
    assert lines[1].split() == ["NODE", "MANAGEMENT", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG"]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert set(rows) == {n.node_id for n in module_cluster.nodes}
    assert rows[leader.node_id][2] == "leader"
    assert sorted(r[2] for r in rows.values()) == ["follower", "follower", "leader"]
    doc = json.loads(out(rk("status", "--json")))
    assert doc["leader"] == leader.node_id and len(doc["nodes"]) == 3 and len(doc["members"]) == 3
    assert all(n["ok"] and n["lag"] >= 0 and n["applied_index"] > 0 for n in doc["nodes"])
    members = json.loads(out(rk("members", "--json")))
    assert {m["id"] for m in members} == {n.node_id for n in module_cluster.nodes}
    assert [m["id"] for m in members if m["leader"]] == [leader.node_id]
    assert {m["address"] for m in members} == {n.raft_addr for n in module_cluster.nodes}
    text = out(rk("members"))
    assert text.splitlines()[0].split() == ["ID", "RAFT", "ADDRESS", "MANAGEMENT", "ROLE"]


def test_node_sources_env_and_cluster_json(module_cluster: Cluster, tmp_path: Path):
    n1 = module_cluster.nodes[0]
    k = fresh("env") + "k"
    p = run("put", k, "v", cwd=tmp_path, env={"RAFTKV_NODES": n1.http_url})
    assert p.returncode == 0, explain(p)
    # cluster.json as `raftkv cluster up` writes it (here describing one node of the cluster).
    d = tmp_path / "cdir"
    d.mkdir()
    (d / "cluster.json").write_text(json.dumps({"nodes": 1, "host": "127.0.0.1", "http_port": n1.ports.http,
                                                "mgmt_port": n1.ports.mgmt, "raft_port": n1.ports.raft,
                                                "grpc_port": n1.ports.app_grpc}))
    p = run("get", k, "--cluster-dir", str(d), cwd=tmp_path)
    assert p.returncode == 0 and out(p) == "v\n", explain(p)
    p = run("status", "--json", cwd=tmp_path, env={"RAFTKV_CLUSTER_DIR": str(d)})
    assert p.returncode == 0, explain(p)
    assert [x["node_id"] for x in json.loads(out(p))["nodes"]] == [n1.node_id]
    # ./.raftkv-cluster/cluster.json is the default when nothing else is given.
    shutil.copytree(d, tmp_path / ".raftkv-cluster")
    p = run("get", k, cwd=tmp_path)
    assert p.returncode == 0 and out(p) == "v\n", explain(p)


def test_unreachable_cluster(tmp_path: Path):
    ports = free_ports(3)
    nodes = ",".join(f"http://127.0.0.1:{p}" for p in ports)
    for args in (("get", "k"), ("put", "k", "v"), ("scan",)):
        p = run(*args, "--nodes", nodes, cwd=tmp_path)
        assert p.returncode == cli.EXIT_UNAVAILABLE == 4, explain(p)
        assert "cannot reach the cluster" in err(p) and "connection refused" in err(p)
        assert "--nodes" in err(p) and nodes.split(",")[0] in err(p)
    p = run("status", "--nodes", nodes, "--mgmt", nodes, cwd=tmp_path)
    assert p.returncode == 4 and "unreachable" in out(p) and "no node answered" in err(p), explain(p)
    # Nothing given and nothing running on the defaults' ports is not tested here: a
    # developer's own `raftkv cluster up` may be using them.
    p = run("get", "k", "--nodes", "not a url::", cwd=tmp_path)
    assert p.returncode == cli.EXIT_USAGE and "bad node list" in err(p), explain(p)


def test_join_and_leave_with_token_and_replace_a_dead_node(cluster_factory, tmp_path: Path):
    """docs/operations.md "replace a dead node": leave + wipe + start with -join."""
    c = cluster_factory(3, env={"CLUSTER_TOKEN": TOKEN}, name="cli-members")
    rk = CLI(c, tmp_path)
    k = fresh("members") + "k"
    rk("put", k, "before")
    leader = c.leader()
    victim = next(n for n in c.nodes if n is not leader and n.join)
    victim.kill9()

    p = rk("leave", victim.node_id, ok=False)
    assert p.returncode == cli.EXIT_AUTH == 6 and "cluster token" in err(p), explain(p)
    p = rk("leave", victim.node_id, "--token", "wrong-token-wrong-token", ok=False)
    assert p.returncode == 6, explain(p)
    p = rk("leave", victim.node_id, env={"CLUSTER_TOKEN": TOKEN})
    assert f"{victim.node_id} removed" in out(p)
    p = rk("leave", victim.node_id, env={"CLUSTER_TOKEN": TOKEN})
    assert "was not a member" in out(p)
    survivors = [n for n in c.nodes if n is not victim]
    c.wait_members(2, nodes=survivors)
    rk("put", k, "while-two")  # two of two: the cluster works without the dead node

    shutil.rmtree(victim.dir / "kv.db")
    shutil.rmtree(victim.dir / "raft")
    victim.start().wait_healthy(90)  # started with -join: it asks a member to add it
    c.wait_members(3)
    assert {m["id"] for m in json.loads(out(rk("members", "--json")))} == {n.node_id for n in c.nodes}
    wait_until(lambda: victim.local(k).text == "while-two", 30, what="the new node to catch up")

    # Manual join/leave of an id through the CLI (token from a file), then remove it again.
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    ghost_raft = f"127.0.0.1:{free_ports(1)[0]}"
    p = rk("join", "ghost", ghost_raft, "--token-file", str(token_file), "--json")
    assert "ghost" in {m["id"] for m in json.loads(out(p))["members"]}
    p = rk("join", "ghost", ghost_raft, "--token-file", str(token_file))
    assert "ghost is a member" in out(p), "joining again is idempotent"
    other_raft = f"127.0.0.1:{free_ports(1)[0]}"
    p = rk("join", "ghost", other_raft, "--token-file", str(token_file), ok=False)
    assert p.returncode == cli.EXIT_USAGE and "already belongs" in err(p), explain(p)
    p = rk("leave", "ghost", "--token-file", str(token_file))
    assert "ghost removed" in out(p)
    c.wait_members(3)


# -- backup / restore ---------------------------------------------------------------------------------------

def test_backup_restore_and_refusals(rk: CLI, cluster_factory, tmp_path: Path):
    import raftkv

    p = fresh("clibk")
    with raftkv.Client(rk.nodes) as kv:
        kv.txn([raftkv.PutOp(f"{p}{i:04d}", f"value {i}") for i in range(600)])
        total = kv.count()
    f = tmp_path / "c.rkvb"
    b = rk("backup", str(f), "--progress")
    assert out(b).startswith(f"wrote {f}: {total:,} keys"), explain(b)
    assert "backup:" in err(b), "--progress draws a progress line on stderr"
    p2 = rk("backup", str(f), ok=False)
    assert p2.returncode == cli.EXIT_USAGE and "exists" in err(p2), explain(p2)
    doc = json.loads(out(rk("backup", str(f), "--overwrite", "--json")))
    assert doc["keys"] == total and doc["bytes"] == f.stat().st_size
    assert backup_format.verify(str(f))[1] == total

    target = CLI(cluster_factory(1, name="cli-restore"), tmp_path)
    r = target("restore", str(f), "--json")
    doc = json.loads(out(r))
    assert doc["keys"] == total and doc["keys_after"] == total and doc["txns"] >= 2, explain(r)
    assert err(r) == "", "no progress line when stderr is not a terminal"
    assert out(target("get", f"{p}0042")) == "value 42\n"

    r = target("restore", str(f), ok=False)
    assert r.returncode == cli.EXIT_BACKUP == 7 and "not empty" in err(r) and "--force" in err(r), explain(r)
    r = target("restore", str(f), "--force", "--progress", "--txn-ops", "100")
    assert f"restored {total:,} keys" in out(r) and "restore:" in err(r), explain(r)

    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.rkvb"
    bad.write_bytes(bytes(data))
    r = target("restore", str(bad), "--force", ok=False)
    assert r.returncode == 7 and "bad backup file" in err(r), explain(r)
    r = target("restore", str(tmp_path / "missing.rkvb"), ok=False)
    assert r.returncode == cli.EXIT_USAGE and "no such file" in err(r), explain(r)


# -- bench -------------------------------------------------------------------------------------------------

def test_bench(rk: CLI):
    p = rk("bench", "-c", "4", "-d", "1", "--warmup", "0.2", "--keys", "20", "--json",
           "--prefix", fresh("bench"))
    doc = json.loads(out(p))
    assert doc["ok"] > 0 and doc["errors"] == 0 and doc["ops_per_s"] > 0 and doc["p50_ms"] > 0, doc
    p = rk("bench", "--workload", "mixed", "-c", "4", "-d", "1", "--warmup", "0", "--keys", "20",
           "--prefix", fresh("bench"))
    assert "mixed c=4" in out(p) and "0 errors" in out(p), explain(p)
    p = rk("bench", "--suite=--help")
    assert "bench.run" in out(p) or "usage" in out(p).lower(), explain(p)
