"""Start and stop benchmark clusters on 127.0.0.1: 3 RaftKV nodes, or 3 etcd members.

Every process is started in its own session (so its own process group) with its
output in a log file; stopping sends SIGTERM to the group, then SIGKILL to
whatever is left in it. A registry plus an atexit hook kill every group this
module started, also when the benchmark fails half-way, so no stray process is
left behind.

    python -m bench.cluster raftkv     # start 3 RaftKV nodes, print URLs, stop on Ctrl-C
    python -m bench.cluster etcd       # same with 3 etcd members
"""
from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from raftkv.procs import engine_command, sidecar_command, signal_group
from raftkv.procs import free_ports as _free_ports

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# Loopback traffic must never go through a proxy configured in the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, body: bytes | None = None, timeout: float = 3.0,
         headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_json(method: str, url: str, doc: dict | None = None, timeout: float = 3.0) -> dict:
    body = None if doc is None else json.dumps(doc).encode()
    status, data = http(method, url, body, timeout, {"Content-Type": "application/json"})
    if status != 200:
        raise RuntimeError(f"{method} {url} -> {status} {data[:200]!r}")
    return json.loads(data)


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            val = pred()
            if val:
                return val
        except Exception as exc:  # noqa: BLE001 - polling a starting process
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


_handed_out: set[int] = set()


def free_ports(n: int) -> list[int]:
    """Distinct ports the kernel handed out for port 0 on 127.0.0.1 (never twice per run)."""
    return _free_ports(n, HOST, handed_out=_handed_out)


# -- processes --------------------------------------------------------------------------------

def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def _kb(value: str | None) -> int | None:
    if not value:
        return None
    return int(value.split()[0])


def group_pids(pgid: int) -> list[int]:
    """Every live process whose process group is `pgid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces) in parentheses.
        rest = stat.rsplit(")", 1)[1].split()
        if int(rest[2]) == pgid and rest[0] != "Z":
            pids.append(int(entry))
    return pids


_live: list["Proc"] = []
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Proc:
    """One subprocess, leader of its own process group, output in `log_path`."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict | None = None,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        with open(log_path, "ab") as log:
            log.write(f"===== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid
        self.exit_code: int | None = None
        self.final_rss: dict | None = None
        _live.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def memory(self) -> dict:
        """Peak (VmHWM) and current (VmRSS) resident memory of the process and of any child
        in its group, in KiB. Must be read while the process runs."""
        per_pid = {}
        pids = group_pids(self.pid) if self.alive() else []
        for pid in pids:
            st = _proc_status(pid)
            if st:
                per_pid[pid] = {"vmhwm_kb": _kb(st.get("VmHWM")), "vmrss_kb": _kb(st.get("VmRSS")),
                                "threads": int(st.get("Threads", "0") or 0)}
        main = per_pid.get(self.pid, {})
        return {"name": self.name, "pid": self.pid, "alive": self.alive(),
                "peak_rss_kb": main.get("vmhwm_kb"), "rss_kb": main.get("vmrss_kb"),
                "threads": main.get("threads"),
                "group_peak_rss_kb_sum": sum((v["vmhwm_kb"] or 0) for v in per_pid.values()) or None,
                "group_pids": sorted(per_pid)}

    def cpu_seconds(self) -> float:
        """User+system CPU time used so far by the live processes of its group."""
        total = 0
        for pid in group_pids(self.pid) if self.alive() else []:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                total += int(rest[11]) + int(rest[12])      # utime, stime (fields 14, 15)
            except (OSError, IndexError, ValueError):
                pass
        return total / _CLK_TCK

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL it after `timeout`; then SIGKILL any straggler in the group."""
        if self.alive():
            self.final_rss = self.memory()
            signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        self.exit_code = self.popen.returncode
        # Children that outlived the group leader still hold the group id (so it cannot
        # have been reused): kill them too.
        if group_pids(self.pid):
            signal_group(self.pid, signal.SIGKILL)
        if self in _live:
            _live.remove(self)
        return self.exit_code

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = ["(no log)"]
        return "\n".join([f"--- {self.name} {self.log_path} ---", *text])


def kill_everything() -> None:
    for p in list(_live):
        try:
            p.stop(timeout=3)
        except Exception:  # noqa: BLE001 - last-resort cleanup
            pass


atexit.register(kill_everything)


def install_signal_cleanup() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so that `finally` blocks and atexit run."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# -- RaftKV --------------------------------------------------------------------------------------

@dataclass
class RaftKVNode:
    node_id: str
    dir: Path
    http: int
    app: int
    side: int
    raft: int
    mgmt: int
    engine: Proc | None = None
    sidecar: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http}"

    @property
    def mgmt_url(self) -> str:
        return f"http://{HOST}:{self.mgmt}"

    def engine_cmd(self) -> list[str]:
        return engine_command(sys.executable, self.http, self.app, self.side, self.dir / "kv.db", HOST)

    def sidecar_cmd(self, bootstrap: bool, join: str | None) -> list[str]:
        return sidecar_command(sys.executable, self.node_id, self.raft, self.side, f"{HOST}:{self.app}",
                               self.mgmt, self.dir / "raft", HOST, HOST, bootstrap=bootstrap, join=join)

    def status(self) -> dict:
        return http_json("GET", f"{self.mgmt_url}/status")

    def healthy(self) -> bool:
        for p in (self.engine, self.sidecar):
            if p is not None and not p.alive():
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}\n{p.log_tail()}")
        return http("GET", f"{self.url}/health", timeout=2)[0] == 200 and \
            http("GET", f"{self.mgmt_url}/health", timeout=2)[0] == 200

    def procs(self) -> list[Proc]:
        return [p for p in (self.engine, self.sidecar) if p is not None]


class RaftKVCluster:
    kind = "raftkv"

    def __init__(self, base_dir: Path | str | None = None, n: int = 3) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="raftkv-bench-"))
        self.n = n
        self.nodes: list[RaftKVNode] = []

    def start(self, timeout: float = 60.0) -> "RaftKVCluster":
        for i in range(1, self.n + 1):
            d = self.base_dir / f"node{i}"
            d.mkdir(parents=True, exist_ok=True)
            node = RaftKVNode(f"node{i}", d, *free_ports(5))
            join = None if i == 1 else f"{HOST}:{self.nodes[0].mgmt}"
            node.engine = Proc(f"raftkv-node{i}-engine", node.engine_cmd(), d / "engine.log")
            node.sidecar = Proc(f"raftkv-node{i}-sidecar", node.sidecar_cmd(i == 1, join), d / "sidecar.log")
            self.nodes.append(node)
            # The next node starts only once this one's management /health answers 200.
            wait_until(node.healthy, timeout, f"{node.node_id} /health")
        wait_until(lambda: all(len(n.status().get("members", [])) == self.n for n in self.nodes),
                   timeout, f"{self.n} members on every node")
        return self

    def leader(self, timeout: float = 30.0) -> RaftKVNode:
        def find():
            for n in self.nodes:
                if n.status().get("is_leader"):
                    return n
            return None
        return wait_until(find, timeout, "a RaftKV leader")

    def followers(self) -> list[RaftKVNode]:
        lead = self.leader()
        return [n for n in self.nodes if n is not lead]

    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def procs(self) -> list[Proc]:
        return [p for n in self.nodes for p in n.procs()]

    def memory(self) -> list[dict]:
        return [p.memory() for p in self.procs()]

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(p.log_tail(lines) for p in self.procs())

    def grep_logs(self, words: tuple[str, ...] = ("ERROR", "Traceback", "WARNING", "CRITICAL"),
                  limit: int = 40) -> list[str]:
        hits = []
        for p in self.procs():
            try:
                for line in p.log_path.read_text(errors="replace").splitlines():
                    if any(w in line for w in words):
                        hits.append(f"{p.name}: {line[:300]}")
            except OSError:
                pass
        return hits[-limit:]

    def stop(self, keep_dir: bool = False) -> dict[str, int | None]:
        codes = {}
        for p in reversed(self.procs()):
            codes[p.name] = p.stop()
        if self._own_dir and not keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        return codes


# -- etcd ----------------------------------------------------------------------------------------

def etcd_binary() -> str | None:
    return shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd") or None


def etcd_version() -> str | None:
    exe = etcd_binary()
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except Exception:  # noqa: BLE001
        return None
    return out.splitlines()[0].replace("etcd Version: ", "").strip() if out else None


@dataclass
class EtcdMember:
    name: str
    dir: Path
    client: int
    peer: int
    proc: Proc | None = None
    member_id: str | None = field(default=None)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.client}"

    def status(self) -> dict:
        return http_json("POST", f"{self.url}/v3/maintenance/status", {})

    def healthy(self) -> bool:
        if self.proc is not None and not self.proc.alive():
            raise RuntimeError(f"{self.proc.name} exited with {self.proc.popen.returncode}\n{self.proc.log_tail()}")
        status, body = http("GET", f"{self.url}/health", timeout=2)
        return status == 200 and json.loads(body).get("health") in ("true", True)


class EtcdCluster:
    """3 etcd members, all URLs on 127.0.0.1, data in a temporary directory."""

    kind = "etcd"

    def __init__(self, base_dir: Path | str | None = None, n: int = 3) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="etcd-bench-"))
        self.n = n
        self.members: list[EtcdMember] = []
        self.exe = etcd_binary()
        if not self.exe:
            raise FileNotFoundError("etcd is not installed (Debian: apt-get install etcd-server)")

    def start(self, timeout: float = 60.0) -> "EtcdCluster":
        for i in range(1, self.n + 1):
            d = self.base_dir / f"m{i}"
            d.mkdir(parents=True, exist_ok=True)
            self.members.append(EtcdMember(f"m{i}", d, *free_ports(2)))
        initial = ",".join(f"{m.name}=http://{HOST}:{m.peer}" for m in self.members)
        for m in self.members:
            cmd = [self.exe, "--name", m.name, "--data-dir", str(m.dir / "data"),
                   "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
                   "--listen-peer-urls", f"http://{HOST}:{m.peer}",
                   "--initial-advertise-peer-urls", f"http://{HOST}:{m.peer}",
                   "--initial-cluster", initial, "--initial-cluster-state", "new",
                   "--initial-cluster-token", f"bench-{os.getpid()}",
                   "--logger", "zap", "--log-level", "warn"]
            # etcd reads ETCD_* variables as flags: start from a clean slate.
            env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
            m.proc = Proc(f"etcd-{m.name}", cmd, m.dir / "etcd.log", env=env)
        # Members of a new cluster wait for each other, so they start together.
        for m in self.members:
            wait_until(m.healthy, timeout, f"etcd {m.name} /health")
        for m in self.members:
            m.member_id = str(m.status()["header"]["member_id"])
        return self

    def leader(self, timeout: float = 30.0) -> EtcdMember:
        def find():
            for m in self.members:
                st = m.status()
                if str(st.get("leader")) == str(st["header"]["member_id"]):
                    return m
            return None
        return wait_until(find, timeout, "an etcd leader")

    def followers(self) -> list[EtcdMember]:
        lead = self.leader()
        return [m for m in self.members if m is not lead]

    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def procs(self) -> list[Proc]:
        return [m.proc for m in self.members if m.proc is not None]

    def memory(self) -> list[dict]:
        return [p.memory() for p in self.procs()]

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(p.log_tail(lines) for p in self.procs())

    def stop(self, keep_dir: bool = False) -> dict[str, int | None]:
        codes = {}
        for p in self.procs():
            codes[p.name] = p.stop()
        if self._own_dir and not keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        return codes


def b64(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["raftkv", "etcd"])
    ap.add_argument("--dir", help="base directory (default: a new temporary one, removed at exit)")
    args = ap.parse_args(argv)
    install_signal_cleanup()
    cluster = RaftKVCluster(args.dir) if args.kind == "raftkv" else EtcdCluster(args.dir)
    try:
        cluster.start()
        lead = cluster.leader()
        for url in cluster.urls():
            print(url, "(leader)" if url == lead.url else "")
        print("Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping:", cluster.stop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
