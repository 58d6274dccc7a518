"""`python -m raftkv cluster up` (the local launcher) with real processes on 127.0.0.1.

Starts the command as a subprocess with free ports and a tmp folder, waits for it to print
the URLs, writes and reads, stops it with SIGINT (Ctrl-C) and checks that nothing it started
is left running; then restarts the same folder through the Python API on its existing data.
"""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raftkv import launcher
from tests.helpers_proc import (HOST, ProcessGroups, cmdline, free_port_block, get,
                                group_pids, http_get, log_tails, pids_matching, put_ok, python_env,
                                wait_pids_gone)

N = 3
START_TIMEOUT = 120.0


class OutputReader:
    """Collects a subprocess's stdout lines in a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._t = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self._t.start()

    def _run(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)  # EOF marker
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> str | None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line is not None and rx.search(line):
                        return line
                if None in self.lines:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def text(self) -> str:
        with self._cond:
            return "\n".join(l for l in self.lines if l is not None)


def port_bases() -> dict[str, int]:
    return {"http": free_port_block(N), "mgmt": free_port_block(N), "raft": free_port_block(N),
            "grpc": free_port_block(2 * N)}


def node_logs(base: Path) -> list[Path]:
    return [base / f"node{i + 1}.log" for i in range(N)]


def test_layout_refuses_overlapping_ports():
    with pytest.raises(launcher.LauncherError, match="twice"):
        launcher.Layout(nodes=3, http_port=8080, mgmt_port=8081).validate()
    with pytest.raises(launcher.LauncherError, match="outside"):
        launcher.Layout(nodes=3, http_port=65534).validate()
    launcher.Layout().validate()  # the documented defaults do not collide


def test_cluster_up_refuses_a_busy_port(tmp_path):
    bases = port_bases()
    blocker = socket.socket()
    blocker.bind((HOST, bases["mgmt"] + 1))
    blocker.listen()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "raftkv", "cluster", "up", "--dir", str(tmp_path / "c"),
             "--http-port", str(bases["http"]), "--mgmt-port", str(bases["mgmt"]),
             "--raft-port", str(bases["raft"]), "--grpc-port", str(bases["grpc"])],
            cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=60)
    finally:
        blocker.close()
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"{HOST}:{bases['mgmt'] + 1}" in r.stderr and "in use" in r.stderr
    assert not pids_matching(str(tmp_path)), "nothing may be started when a port is busy"


def test_cluster_up_serves_stops_on_ctrl_c_and_restarts_on_its_data(tmp_path):
    base = tmp_path / "cluster"
    bases = port_bases()
    cmd = [sys.executable, "-m", "raftkv", "cluster", "up", "--nodes", str(N), "--dir", str(base),
           "--http-port", str(bases["http"]), "--mgmt-port", str(bases["mgmt"]),
           "--raft-port", str(bases["raft"]), "--grpc-port", str(bases["grpc"])]
    with ProcessGroups() as groups:
        proc = groups.start(cmd, env=python_env(), cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        out = OutputReader(proc)
        if out.wait_for(r"Press Ctrl-C to stop", START_TIMEOUT) is None:
            pytest.fail(f"cluster up did not become ready (exit {proc.poll()}):\n{out.text()}\n"
                        f"{log_tails(node_logs(base))}")

        # It printed one line per node with the client and management URLs, the log and pid.
        node_lines = [l for l in out.text().splitlines() if re.match(r"\s+node\d+\s", l)]
        assert len(node_lines) == N, out.text()
        clients = [re.search(r"client (http://\S+)", l).group(1) for l in node_lines]
        mgmts = [re.search(r"management (http://\S+)", l).group(1) for l in node_lines]
        pids = [int(re.search(r"pid (\d+)", l).group(1)) for l in node_lines]
        assert clients == [f"http://{HOST}:{bases['http'] + i}" for i in range(N)]
        assert mgmts == [f"http://{HOST}:{bases['mgmt'] + i}" for i in range(N)]
        for i, l in enumerate(node_lines):
            assert str(base / f"node{i + 1}.log") in l

        put_ok(clients[-1], "launcher-key", "launcher-value")
        for url in clients:
            assert get(url, "launcher-key") == (200, b"launcher-value"), url
        code, _ = http_get(f"{mgmts[0]}/health")
        assert code == 200

        # The engines and sidecars are the launcher's grandchildren, in the nodes' groups.
        started = sorted({p for pgid in pids for p in group_pids(pgid)})
        assert len(started) == 3 * N, [cmdline(p) for p in started]
        # engine + sidecar of every node name the folder (and so does the launcher itself)
        assert len(set(pids_matching(str(base))) - {proc.pid}) == 2 * N

        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cluster up did not exit after SIGINT:\n{out.text()}")
        out.wait_for(r"Stopped", 5)
        assert rc == 0, f"exit {rc}\n{out.text()}"
        assert "Stopped." in out.text(), out.text()  # every node exited cleanly
        left = wait_pids_gone(started, 10)
        assert not left, f"left running: {[cmdline(p) for p in left]}"
        assert not pids_matching(str(base))

    # Same folder again, through the Python API, options left out: the saved layout (ports)
    # is reused and the nodes come back on their data (the sidecars ignore bootstrap/join).
    with launcher.launch(base_dir=base, timeout=START_TIMEOUT) as cluster:
        assert cluster.http_urls == clients
        for url in cluster.http_urls:
            assert get(url, "launcher-key") == (200, b"launcher-value"), url
        put_ok(cluster.http_urls[0], "after-restart", "yes")
        pids = cluster.pids()
        restarted = sorted({p for pgid in pids for p in group_pids(pgid)})
        assert len(restarted) == 3 * N
        codes = cluster.stop()
    assert codes == {f"node{i + 1}": 0 for i in range(N)}, f"{codes}\n{log_tails(node_logs(base))}"
    assert not wait_pids_gone(restarted, 10)

    # A changed Raft port base would strand the members' saved addresses: refused.
    with pytest.raises(launcher.LauncherError, match="Raft port"):
        launcher.launch(base_dir=base, raft_port=bases["raft"] + 100, timeout=5)
