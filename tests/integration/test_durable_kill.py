"""kill -9 chaos against three real PySyncObj processes with raft_sidecar.durable.

Heavy writes (no-batch mode, 3 writer threads per node, forwarded by the
followers), log compaction every ~50 entries, and a dozen kill -9 cycles:
kills aimed at the window in the middle of a compaction (the `.compact` file
exists: written, not yet renamed, H7), kills of the leader followed by a kill
of the first node that records a vote (a restart mid-election), and kills of
all three nodes at once (nothing survives but the files). After each restart the
node must load its journal and the cluster must make progress. At the end:

* every acknowledged id is in the final state of every node (no acknowledged
  write lost), and the counter equals the number of ids;
* from every node's meta-store history (votes-<i>.log, across all its
  incarnations), a node never votes for two candidates in one term and its term
  never goes backwards.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from raftkv.procs import free_ports

NODE = Path(__file__).with_name("durable_node.py")
N = 3
CYCLES = 12


class Cluster:
    def __init__(self, d: Path, ports: list[int]) -> None:
        self.d = d
        self.ports = ",".join(map(str, ports))
        self.procs: dict[int, subprocess.Popen] = {}
        self.starts = 0

    def event(self, msg: str) -> None:
        with open(self.d / "events.log", "a") as f:
            f.write(f"{time.time():.3f} {msg}\n")

    def start(self, i: int) -> None:
        log = open(self.d / f"proc{i}.out", "ab")
        self.procs[i] = subprocess.Popen(
            [sys.executable, str(NODE), str(self.d), str(i), self.ports, "--compact-delay", "0.03"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.starts += 1
        self.event(f"start {i} pid {self.procs[i].pid}")

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        st = {k: v for k, v in (self.status(i) or {}).items() if k != "ops"}
        self.event(f"killed {i} pid {p.pid} last status {json.dumps(st)}")

    def status(self, i: int) -> dict | None:
        try:
            with open(self.d / f"status-{i}.json") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def check_alive(self) -> None:
        for i, p in self.procs.items():
            if p.poll() is not None:
                out = (self.d / f"proc{i}.out").read_text()[-3000:]
                logs = (self.d / f"node{i}.log").read_text()[-3000:] if (self.d / f"node{i}.log").exists() else ""
                raise AssertionError(f"node {i} exited with {p.returncode} (journal did not load?)\n{out}\n{logs}")

    def wait_started(self, i: int, timeout: float = 15.0) -> None:
        """The new process loaded its journal and is running (status with its pid)."""
        pid = self.procs[i].pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            st = self.status(i)
            if st and st["pid"] == pid:
                return
            time.sleep(0.02)
        raise AssertionError(f"node {i} did not come up")

    def acks(self) -> int:
        n = 0
        for i in range(N):
            try:
                n += (self.d / f"ack-{i}.log").read_bytes().count(b"\n")
            except FileNotFoundError:
                pass
        return n

    def wait_progress(self, delta: int = 20, timeout: float = 20.0) -> None:
        """New writes are acknowledged (a restarted cluster elected a leader)."""
        base = self.acks()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.acks() >= base + delta:
                return
            time.sleep(0.05)
        raise AssertionError(f"no new acknowledged writes for {timeout} s after the restart")

    def converged(self) -> list[dict] | None:
        """With the writers stopped: one leader known to all, its whole log
        committed (its no-op included), and every node applied all of it."""
        sts = [self.status(i) for i in range(N)]
        if not all(st and "ops" in st for st in sts):
            return None
        leaders = [st for st in sts if st["is_leader"]]
        if len(leaders) != 1:
            return None
        ld = leaders[0]
        addr = ld["leader"]
        if ld["commit"] != ld["last_index"] or any(st["leader"] != addr for st in sts):
            return None
        if any(st["last_applied"] != ld["commit"] or st["counter"] != ld["counter"] for st in sts):
            return None
        return sts

    def leader(self) -> int | None:
        for i in range(N):
            st = self.status(i)
            if st and st["is_leader"] and self.procs[i].poll() is None and st["pid"] == self.procs[i].pid:
                return i
        return None

    def max_vote_term(self, i: int) -> int:
        """Highest term in which node i stored a vote (for itself or another)."""
        best = 0
        for ln in read_lines(self.d / f"votes-{i}.log"):
            term, voted, _ = ln.split(" ")
            if voted != "None":
                best = max(best, int(term))
        return best


def read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = path.read_text()
    lines = data.split("\n")
    return [ln for ln in lines[:-1] if ln]  # the last element is '' or a partial line


@pytest.mark.slow
def test_kill9_chaos_loses_no_acknowledged_write_and_never_double_votes(tmp_path):
    rnd = random.Random(int(os.environ.get("DURABLE_CHAOS_SEED", "0")) or None)
    c = Cluster(tmp_path, free_ports(N))
    compaction_hits = 0
    compaction_tries = 0
    full_kills = 0
    voter_kills = 0
    try:
        for i in range(N):
            c.start(i)
        for i in range(N):
            c.wait_started(i)
        c.wait_progress(delta=100, timeout=30)

        for cycle in range(CYCLES):
            kind = cycle % 3
            if kind == 0:
                # Kill a node in the middle of a compaction (after the new file
                # is written, before it is renamed over the journal).
                i = rnd.randrange(N)
                compact = tmp_path / f"n{i}.journal.compact"
                deadline = time.monotonic() + 3.0
                while not compact.exists() and time.monotonic() < deadline:
                    time.sleep(0.001)
                c.kill(i)
                compaction_tries += 1
                compaction_hits += compact.exists()
                time.sleep(rnd.uniform(0.0, 0.3))
                c.start(i)
                c.wait_started(i)
            elif kind == 1:
                # Kill the leader, then the first node that records a vote:
                # it restarts in the middle of the election.
                ld = c.leader()
                if ld is None:
                    ld = rnd.randrange(N)
                time.sleep(rnd.uniform(0.05, 0.4))
                before = {j: c.max_vote_term(j) for j in range(N) if j != ld}
                c.kill(ld)
                voter = None
                deadline = time.monotonic() + 3.0
                while voter is None and time.monotonic() < deadline:
                    for j, t in before.items():
                        if c.max_vote_term(j) > t:  # voted in the new election
                            voter = j
                            break
                    time.sleep(0.002)
                if voter is not None:
                    c.kill(voter)
                    voter_kills += 1
                    c.start(voter)
                time.sleep(rnd.uniform(0.1, 0.5))
                c.start(ld)
                for j in {ld, voter} - {None}:
                    c.wait_started(j)
            else:
                # Kill everything at a random moment of heavy writes and compactions.
                time.sleep(rnd.uniform(0.1, 0.8))
                for i in range(N):
                    c.kill(i)
                full_kills += 1
                for i in range(N):
                    c.start(i)
                for i in range(N):
                    c.wait_started(i)
            c.wait_progress()

        # Quiesce: writers stop, all nodes converge on the same state.
        (tmp_path / "stop").touch()
        deadline = time.monotonic() + 30
        final = None
        while time.monotonic() < deadline and final is None:
            c.check_alive()
            sts = c.converged()
            if sts is not None:
                time.sleep(0.5)
                again = c.converged()
                if again is not None and [s["last_applied"] for s in again] == [s["last_applied"] for s in sts]:
                    final = again
            time.sleep(0.1)
        assert final is not None, [{k: v for k, v in (c.status(i) or {}).items() if k != "ops"} for i in range(N)]
    finally:
        for i in list(c.procs):
            p = c.procs[i]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in c.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # No acknowledged write lost, on any node.
    acked: set[str] = set()
    for i in range(N):
        acked.update(ln.split(" ")[0] for ln in read_lines(tmp_path / f"ack-{i}.log"))
    assert len(acked) > 200, f"too few writes to mean anything ({len(acked)})"
    for st in final:
        ops = set(st["ops"])
        lost = acked - ops
        assert not lost, f"{len(lost)} acknowledged ids lost, e.g. {sorted(lost)[:5]}"
        assert st["counter"] == len(ops)

    # Never two votes in one term; terms never go backwards across restarts.
    votes_checked = 0
    for i in range(N):
        by_term: dict[int, set[str]] = {}
        last_term = 0
        for ln in read_lines(tmp_path / f"votes-{i}.log"):
            term_s, voted, _pid = ln.split(" ")
            term = int(term_s)
            assert term >= last_term, f"node {i}: term went back from {last_term} to {term} ({ln})"
            last_term = term
            if voted != "None":
                by_term.setdefault(term, set()).add(voted)
                votes_checked += 1
        double = {t: v for t, v in by_term.items() if len(v) > 1}
        assert not double, f"node {i} voted for two candidates in one term: {double}"
    assert votes_checked > 0

    # Nothing refused to start. (A torn tail is possible even after kill -9: a
    # write can stop at a page boundary when the signal lands; it is truncated.)
    torn = completed = 0
    for i in range(N):
        text = (tmp_path / f"node{i}.log").read_text() if (tmp_path / f"node{i}.log").exists() else ""
        assert "refusing" not in text and "Traceback" not in text, text[-2000:]
        torn += text.count("torn tail")
        completed += text.count("compaction was interrupted")
    assert compaction_hits >= 1, f"no kill landed mid-compaction in {compaction_tries} tries"
    print(f"\nchaos: {CYCLES} cycles, {c.starts} process starts, {full_kills} full-cluster kills, "
          f"{voter_kills} voters killed right after voting, "
          f"{compaction_hits}/{compaction_tries} kills mid-compaction ({completed} completed at restart), "
          f"{torn} torn tails, {len(acked)} acknowledged ids, final counter {final[0]['counter']}, "
          f"{votes_checked} vote records checked")
