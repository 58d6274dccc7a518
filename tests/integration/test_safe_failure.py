"""Safe failure: a node whose data is damaged, gone or out of space refuses to start (or stops
taking writes) with a message naming the file or directory, never silently starts empty,
never acknowledges a write it did not store, and the other two nodes keep serving.
Recovery paths are the ones docs/recovery.md describes, and each is exercised here.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import plyvel
import pytest

from raftkv.procs import engine_command, sidecar_command
from tests.cluster import HOST, Cluster, Node, get, http_post, put, wait_until

pytestmark = pytest.mark.timeout(300)


# -- helpers ----------------------------------------------------------------------------------------

def write_keys(c: Cluster, prefix: str, n: int, value_size: int = 16) -> dict[str, str]:
    """n acknowledged writes through the current leader; returns what was acknowledged."""
    acked = {}
    for i in range(n):
        key, value = f"{prefix}{i}", f"{prefix}-{i}-" + "x" * value_size
        r = put(c.leader().http_url, key, value)
        assert (r.status_code, r.text) == (200, "ok"), r.text
        acked[key] = value
    return acked


def assert_serving(c: Cluster, survivors: list[Node]) -> None:
    """The other nodes take a write and serve it back, linearizably, through each of them."""
    key, value = f"serving-{uuid.uuid4().hex[:8]}", "yes"
    leader = c.leader(nodes=survivors)
    assert put(leader.http_url, key, value).text == "ok"
    for n in survivors:
        r = get(n.http_url, key)
        assert (r.status_code, r.text) == (200, value), f"{n.node_id} does not serve: {r.status_code} {r.text}"


def assert_has(node: Node, acked: dict[str, str], timeout: float = 30.0) -> None:
    """Every acknowledged write is in this node's own copy (consistency=local)."""
    def ok():
        return all(node.local(k).text == v for k, v in acked.items())
    wait_until(ok, timeout, what=f"{node.node_id} holds all {len(acked)} acknowledged writes")
    assert not node.duplicate_applies(), f"{node.node_id} applied raft entries twice"


def wipe_engine_store(node: Node) -> None:
    """Removes the engine's store, and its apply audit: the empty store legitimately applies
    every entry again, which the audit would count as double applies."""
    shutil.rmtree(node.dir / "kv.db", ignore_errors=True)
    if node.audit_path.exists():
        node.audit_path.rename(node.audit_path.with_name(f"audit.before-wipe-{node.starts}.log"))


def _log_offset(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def start_refused(node: Node, which: str, timeout: float = 60.0) -> tuple[int, str]:
    """Starts `which` ("engine": the engine alone; "sidecar": both, the sidecar must exit);
    returns (exit code, what that process logged during this start). Fails if it keeps running."""
    log_path = node.engine_log if which == "engine" else node.sidecar_log
    offset = _log_offset(log_path)
    node.starts += 1
    node.engine = node._spawn(node.engine_cmd(), node.engine_log)
    proc = node.engine
    if which == "sidecar":
        node.sidecar = node._spawn(node.sidecar_cmd(), node.sidecar_log)
        proc = node.sidecar
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{node.node_id} {which} did not refuse to start within {timeout}s\n{node.log_tail()}")
    text = log_path.read_text(errors="replace")[offset:]
    node.stop()
    return code, text


def follower_victim(c: Cluster) -> tuple[Node, list[Node]]:
    """A follower that was started with -join (node1 bootstrapped the cluster), and the others."""
    victim = [n for n in c.followers() if n.join][-1]
    return victim, [n for n in c.nodes if n is not victim]


# -- 1. corrupt engine LevelDB --------------------------------------------------------------------------

def _corrupt_mid(path: Path) -> None:
    data = bytearray(path.read_bytes())
    assert len(data) > 200, f"{path} too small to corrupt in the middle"
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def _one(db: Path, pattern: str) -> Path:
    found = sorted(p for p in db.glob(pattern) if p.stat().st_size > 0)
    assert found, f"no non-empty {pattern} in {db}: {sorted(os.listdir(db))}"
    return found[-1]


def test_corrupt_engine_leveldb_is_refused_naming_the_file(cluster: Cluster) -> None:
    c = cluster
    acked = write_keys(c, "a", 150, value_size=200)
    victim, survivors = follower_victim(c)
    assert_has(victim, acked)
    db = victim.dir / "kv.db"
    # A table file (.ldb) from a recovery at open, then a non-empty write-ahead log after it.
    victim.stop()
    plyvel.DB(str(db)).close()
    victim.start().wait_healthy(30)
    acked |= write_keys(c, "b", 150, value_size=200)
    assert_has(victim, acked)
    victim.stop()
    pristine = victim.dir / "kv.db.pristine"
    shutil.copytree(db, pristine)

    cases = {
        "garbage in the middle of the write-ahead log": (lambda: _corrupt_mid(_one(db, "*.log")), "*.log"),
        "table file overwritten at its end": (lambda: _truncate(_one(db, "*.ldb"), 100), "*.ldb"),
        "garbage in a table's data block": (lambda: _corrupt_mid(_one(db, "*.ldb")), "*.ldb"),
        "garbage in the manifest": (lambda: _one(db, "MANIFEST-*").write_bytes(b"\x00garbage" * 20), "MANIFEST-*"),
        "garbage in CURRENT": (lambda: (db / "CURRENT").write_bytes(b"MANIF\xff\xff\n"), "CURRENT"),
        "CURRENT missing": (lambda: (db / "CURRENT").unlink(), "CURRENT"),
    }
    messages = {}
    for what, (corrupt, pattern) in cases.items():
        shutil.rmtree(db)
        shutil.copytree(pristine, db)
        named = str(_one(db, pattern)) if pattern != "CURRENT" else str(db / "CURRENT")
        corrupt()
        code, text = start_refused(victim, "engine")
        assert code == 2, f"{what}: engine exit code {code}\n{text}"
        assert "refusing to start" in text and named in text, f"{what}: message does not name {named}:\n{text}"
        assert "serving" not in text, f"{what}: the engine served from a corrupt store\n{text}"
        messages[what] = next(line for line in text.splitlines() if "refusing to start" in line)
        assert_serving(c, survivors)
    print("\n".join(f"{k}: {v}" for k, v in messages.items()))

    # Recovery (docs/recovery.md): move the engine's store aside; the sidecar rebuilds it.
    wipe_engine_store(victim)
    victim.start().wait_healthy(40)
    assert_has(victim, acked)


def _truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n])


# -- 2. corrupt / torn Raft journal ----------------------------------------------------------------------

def test_corrupt_journal_is_refused_and_a_torn_tail_is_truncated(cluster: Cluster) -> None:
    c = cluster
    acked = write_keys(c, "j", 80)
    victim, survivors = follower_victim(c)
    assert_has(victim, acked)
    victim.stop()
    journal = victim.dir / "raft" / "raft.journal"
    good = journal.read_bytes()

    _corrupt_mid(journal)
    code, text = start_refused(victim, "sidecar")
    assert code == 2 and "refusing to start" in text and str(journal) in text, text
    assert "mid-file corruption" in text, text
    print(next(line for line in text.splitlines() if "refusing to start" in line))
    assert_serving(c, survivors)

    # A torn tail (the last record cut short, as a crash mid-write leaves it) is dropped with a
    # warning naming the file, and the node catches up from the leader.
    journal.write_bytes(good[:-7])
    offset = _log_offset(victim.sidecar_log)
    victim.start().wait_healthy(40)
    text = victim.sidecar_log.read_text(errors="replace")[offset:]
    warning = next((line for line in text.splitlines() if "torn tail" in line), None)
    assert warning is not None and str(journal) in warning and "WARNING" in warning, text[-3000:]
    print(warning)
    acked |= write_keys(c, "k", 20)
    assert_has(victim, acked)


# -- 3. missing data dirs ----------------------------------------------------------------------------------

def test_member_that_lost_its_data_is_refused_until_it_left(cluster: Cluster) -> None:
    c = cluster
    acked = write_keys(c, "m", 60)
    victim, survivors = follower_victim(c)
    assert_has(victim, acked)
    victim.stop()
    raft_dir = victim.dir / "raft"

    # Raft state gone, engine data kept: the engine's stored index cannot be matched to a log.
    shutil.rmtree(raft_dir)
    code, text = start_refused(victim, "sidecar")
    assert code == 2 and "refusing to start" in text and str(raft_dir) in text, text
    assert "holds data up to raft index" in text, text
    print(next(line for line in text.splitlines() if "refusing to start" in line))
    assert_serving(c, survivors)

    # Both gone, started again with -join while still listed as a member: refused, pointing at /leave.
    wipe_engine_store(victim)
    shutil.rmtree(raft_dir, ignore_errors=True)
    code, text = start_refused(victim, "sidecar")
    assert code == 2 and "already a member" in text and str(raft_dir) in text, text
    assert f"/leave?peerID={victim.node_id}" in text, text
    print(next(line for line in text.splitlines() if "refusing to start" in line))
    assert_serving(c, survivors)
    members = {m["address"] for m in c.leader(nodes=survivors).status()["members"]}
    assert victim.raft_addr in members, "the refused node must not have changed the membership"

    # The documented recovery: /leave, wipe, start with -join; it catches up.
    leader = c.leader(nodes=survivors)
    r = http_post(f"{leader.mgmt_url}/leave", params={"peerID": victim.node_id}, timeout=20)
    assert r.status_code == 200, r.text
    wipe_engine_store(victim)
    shutil.rmtree(raft_dir, ignore_errors=True)
    victim.start().wait_healthy(60)
    c.wait_members(3, timeout=30)
    assert_has(victim, acked)


def test_bootstrap_node_that_lost_its_data_does_not_form_a_second_cluster(cluster: Cluster) -> None:
    c = cluster
    acked = write_keys(c, "b", 40)
    first = c.nodes[0]
    assert first.bootstrap
    others = c.nodes[1:]
    first.stop()
    shutil.rmtree(first.dir / "raft")
    wipe_engine_store(first)
    first.env = {**first.env, "RAFTKV_PEERS": ",".join(n.mgmt_addr for n in others)}
    code, text = start_refused(first, "sidecar")
    assert code == 2 and "refusing to start" in text and "already serves one" in text, text
    assert str(first.dir / "raft") in text and f"/leave?peerID={first.node_id}" in text, text
    print(next(line for line in text.splitlines() if "refusing to start" in line))
    assert_serving(c, others)
    for n in others:
        assert len(n.status()["members"]) == 3

    # Recovery: /leave the old member, then start the node with -join instead of -bootstrap.
    via = c.leader(nodes=others)
    assert http_post(f"{via.mgmt_url}/leave", params={"peerID": first.node_id}, timeout=20).status_code == 200
    first.bootstrap, first.join = False, via.mgmt_addr
    first.start().wait_healthy(60)
    c.wait_members(3, timeout=30)
    assert_has(first, acked)


@pytest.mark.parametrize("compacted", [False, True], ids=["log-replay", "snapshot"])
def test_engine_store_vanished_is_rebuilt_by_the_sidecar(cluster_factory, compacted: bool) -> None:
    """Engine data gone, Raft data intact: safe to start; the sidecar replays its log (or loads
    its snapshot, then the tail) into the empty engine, so nothing acknowledged is missing."""
    c = cluster_factory(3, sidecar_args=["--compact-entries", "40"] if compacted else [])
    acked = write_keys(c, "v", 90)
    victim, survivors = follower_victim(c)
    assert_has(victim, acked)
    if compacted:
        wait_until(lambda: (victim.dir / "raft" / "raft.dump").exists(), 30, what="a snapshot on the victim")
    victim.stop()
    wipe_engine_store(victim)
    offset = _log_offset(victim.sidecar_log)
    victim.start().wait_healthy(40)
    assert_has(victim, acked)
    keys = {n.node_id: n.stats()["keys"] for n in c.nodes}
    assert len(set(keys.values())) == 1, keys
    text = victim.sidecar_log.read_text(errors="replace")[offset:]
    if compacted:
        assert "installed snapshot" in text, text[-2000:]


# -- 4. full disk ---------------------------------------------------------------------------------------

@dataclass(eq=False)
class DiskNode(Node):
    """A node whose engine store or Raft dir lives on its own (small) filesystem at `disk`."""
    disk: Path | None = None
    on_disk: str = "engine"          # "engine": DB_PATH on the disk; "raft": the sidecar's -data

    @property
    def db_path(self) -> Path:
        return self.disk / "kv.db" if self.on_disk == "engine" else self.dir / "kv.db"

    @property
    def raft_dir(self) -> Path:
        return self.disk / "raft" if self.on_disk == "raft" else self.dir / "raft"

    def engine_cmd(self) -> list[str]:
        p = self.ports
        return engine_command(sys.executable, p.http, p.app_grpc, p.side_grpc, self.db_path, HOST,
                              extra=["--apply-audit", str(self.audit_path), *self.engine_args])

    def sidecar_cmd(self) -> list[str]:
        p = self.ports
        return sidecar_command(sys.executable, self.node_id, p.raft, p.side_grpc, f"{HOST}:{p.app_grpc}",
                               p.mgmt, self.raft_dir, HOST, HOST, bootstrap=self.bootstrap,
                               join=self.join, extra=self.sidecar_args)


class Tmpfs:
    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, where: Path, size: str = "8m") -> Path:
        where.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
        self.mounted.append(where)
        return where

    def unmount_all(self) -> None:
        for where in reversed(self.mounted):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
        self.mounted.clear()


@pytest.fixture
def tmpfs(cluster_factory) -> Iterator[Tmpfs]:
    t = Tmpfs()
    try:
        yield t
    finally:
        cluster_factory.shutdown()   # nothing may hold files on the mounts
        t.unmount_all()


def fill(disk: Path) -> Path:
    """Fills the filesystem at `disk` to the last byte (unbuffered writes of shrinking size);
    returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    if os.write(fd, b"\0" * size) == 0:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def add_disk_node(c: Cluster, tmpfs: Tmpfs, on_disk: str, sidecar_args: list[str]) -> DiskNode:
    node = DiskNode("node3", c.base_dir, join=c.nodes[0].mgmt_addr, sidecar_args=sidecar_args,
                    engine_args=c.engine_args, env=dict(c.env), on_disk=on_disk)
    node.disk = tmpfs.mount(node.dir / "disk")
    c.nodes.append(node)
    node.start().wait_healthy(60)
    c.wait_members(3, timeout=30)
    return node


def writes_while_full(c: Cluster, full: Node, survivors: list[Node], n: int) -> tuple[dict[str, str], list]:
    """First writes through the full node (it must not acknowledge what it cannot store; the
    first one runs while its sidecar still lives), then n writes through the healthy nodes,
    which must succeed. Returns (acknowledged, answers of the full node)."""
    answers = []
    for i in range(2):
        # Larger than a page: it cannot fit in what is left of a file's last allocated page.
        key = f"via-full-{i}"
        try:
            r = put(full.http_url, key, "z" * 6000, timeout=20)
            answers.append((key, r.status_code, r.text))
        except Exception as exc:  # noqa: BLE001 - a node going down may drop the connection
            answers.append((key, None, repr(exc)))
    acked = {}
    for i in range(n):
        key, value = f"full{i}", f"value-{i}-" + "y" * 2000
        via = c.leader(nodes=survivors)
        r = put(via.http_url, key, value, timeout=15)
        assert (r.status_code, r.text) == (200, "ok"), f"a healthy node refused a write: {r.status_code} {r.text}"
        acked[key] = value
    return acked, answers


def test_engine_disk_full_stops_the_node_and_it_catches_up_after(cluster_factory, tmpfs: Tmpfs) -> None:
    c = cluster_factory(2)
    node = add_disk_node(c, tmpfs, "engine", ["--apply-fail-timeout", "3"])
    survivors = c.nodes[:2]
    acked = write_keys(c, "pre", 30)
    assert_has(node, acked)
    filler = fill(node.disk)
    offset = _log_offset(node.sidecar_log)

    more, answers = writes_while_full(c, node, survivors, 60)
    acked |= more
    code = node.sidecar.wait(timeout=60)
    text = node.sidecar_log.read_text(errors="replace")[offset:]
    fail_stop = next((line for line in text.splitlines() if "FAIL-STOP" in line), "")
    assert code == 3 and "No space left on device" in fail_stop and str(node.db_path) in fail_stop, text[-3000:]
    assert "disk is full" in fail_stop, fail_stop
    print(fail_stop)
    for key, status, body in answers:
        assert status != 200, f"the full node acknowledged {key} it could not store: {body}"
        if node.engine.poll() is None:
            assert node.local(key).status_code == 404, f"{key} is in the full node's store after all"
    print("writes through the full node:", answers)
    assert_serving(c, survivors)

    # Free space, restart the whole node: it replays from the engine's stored index.
    filler.unlink()
    node.stop()
    node.start().wait_healthy(60)
    assert_has(node, acked, timeout=60)


def test_journal_disk_full_stops_the_sidecar_and_it_catches_up_after(cluster_factory, tmpfs: Tmpfs) -> None:
    c = cluster_factory(2)
    node = add_disk_node(c, tmpfs, "raft", [])
    survivors = c.nodes[:2]
    acked = write_keys(c, "pre", 30)
    assert_has(node, acked)
    filler = fill(node.disk)
    offset = _log_offset(node.sidecar_log)

    more, answers = writes_while_full(c, node, survivors, 60)
    acked |= more
    code = node.sidecar.wait(timeout=60)
    text = node.sidecar_log.read_text(errors="replace")[offset:]
    journal = node.raft_dir / "raft.journal"
    fatal = next((line for line in text.splitlines() if "fail-stop" in line), "")
    assert code == 70 and str(journal) in fatal and "No space left on device" in fatal, text[-3000:]
    assert "disk holding the Raft journal is full" in fatal, fatal
    print(fatal)
    for key, status, body in answers:
        assert status != 200, f"the node with a full journal acknowledged {key}: {body}"
    print("writes through the full node:", answers)
    assert_serving(c, survivors)

    filler.unlink()
    node.stop()
    offset = _log_offset(node.sidecar_log)
    node.start().wait_healthy(60)
    assert_has(node, acked, timeout=60)
    text = node.sidecar_log.read_text(errors="replace")[offset:]
    torn = [line for line in text.splitlines() if "torn tail" in line]
    print(torn[0] if torn else "no torn tail at restart")
