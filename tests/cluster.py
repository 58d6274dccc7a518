"""A real-process test harness: RaftKV nodes (engine + sidecar) on 127.0.0.1.

Every node is two subprocesses, each the leader of its own process group, with
stdout/stderr in log files inside the node's directory. Readiness is always a
poll with a deadline, never a fixed sleep. Every process started here is kept in
a module-level registry so that a fixture teardown (or, as a last resort, the
interpreter's exit) can SIGKILL whatever is left, also after a failed test.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import msgpack
import requests

from raftkv.procs import engine_command, kill_group, sidecar_command
from raftkv.procs import free_ports as _free_ports

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
HTTP_TIMEOUT = 5.0


# -- HTTP helpers -----------------------------------------------------------------

def _session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # never route loopback traffic through a proxy from the environment
    return s


def http_get(url: str, timeout: float = HTTP_TIMEOUT, **kw) -> requests.Response:
    with _session() as s:
        return s.get(url, timeout=timeout, **kw)


def http_post(url: str, timeout: float = HTTP_TIMEOUT, **kw) -> requests.Response:
    with _session() as s:
        return s.post(url, timeout=timeout, **kw)


def insert_body(op: str, key: str, value: str | None = None) -> bytes:
    doc = {"op": op, "key": key}
    if value is not None:
        doc["value"] = value
    return msgpack.packb(doc)


def post_insert(url: str, body: bytes, timeout: float = HTTP_TIMEOUT) -> requests.Response:
    return http_post(f"{url}/insert-val", data=body, timeout=timeout,
                     headers={"Content-Type": "application/msgpack"})


def put(url: str, key: str, value: str, timeout: float = HTTP_TIMEOUT) -> requests.Response:
    """SET through a node's client API (`url` = the node's http_url)."""
    return post_insert(url, insert_body("SET", key, value), timeout)


def delete(url: str, key: str, timeout: float = HTTP_TIMEOUT) -> requests.Response:
    return post_insert(url, insert_body("DELETE", key), timeout)


def get(url: str, key: str, consistency: str | None = None, timeout: float = HTTP_TIMEOUT) -> requests.Response:
    params = {"key": key}
    if consistency is not None:
        params["consistency"] = consistency
    return http_get(f"{url}/get-val", params=params, timeout=timeout)


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"):
    """Polls `pred` until it returns something truthy; returns that value.

    Exceptions from `pred` count as "not yet" (a node may be restarting); the last
    one is reported if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_val: object = None
    while True:
        try:
            last_val = pred()
            if last_val:
                return last_val
        except ProcessExited:
            raise  # waiting longer cannot help
        except Exception as exc:  # noqa: BLE001 - polling through restarts
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}; "
                               f"last value {last_val!r}, last error {last_exc!r}")
        time.sleep(interval)


# -- ports ------------------------------------------------------------------------------

_handed_out: set[int] = set()


def free_ports(n: int) -> list[int]:
    """Ports the kernel gave us for port 0 on 127.0.0.1, never the same one twice a session."""
    return _free_ports(n, HOST, handed_out=_handed_out)


# -- process registry (last-resort cleanup) -------------------------------------------

_live: set[subprocess.Popen] = set()
_active_clusters: list["Cluster"] = []


def kill_all_processes() -> None:
    for proc in list(_live):
        kill_group(proc)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _live.discard(proc)


atexit.register(kill_all_processes)


def active_clusters() -> list["Cluster"]:
    return list(_active_clusters)


# -- one node ---------------------------------------------------------------------------------

@dataclass
class Ports:
    http: int
    app_grpc: int
    side_grpc: int
    raft: int
    mgmt: int

    @classmethod
    def allocate(cls) -> "Ports":
        return cls(*free_ports(5))


@dataclass(eq=False)
class Node:
    """One RaftKV node: storage engine + Raft sidecar, started with the manual-start commands."""

    node_id: str
    base_dir: Path
    bootstrap: bool = False
    join: str | None = None                     # HOST:MGMT of a member, for -join
    sidecar_args: Sequence[str] = ()
    engine_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    ports: Ports = field(default_factory=Ports.allocate)
    engine: subprocess.Popen | None = field(default=None, init=False)
    sidecar: subprocess.Popen | None = field(default=None, init=False)
    starts: int = field(default=0, init=False)
    _terminated: set = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.base_dir) / self.node_id
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- addresses ------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.ports.http}"

    @property
    def mgmt_url(self) -> str:
        return f"http://{HOST}:{self.ports.mgmt}"

    @property
    def mgmt_addr(self) -> str:
        return f"{HOST}:{self.ports.mgmt}"

    @property
    def raft_addr(self) -> str:
        return f"{HOST}:{self.ports.raft}"

    @property
    def audit_path(self) -> Path:
        return self.dir / "audit.log"

    @property
    def engine_log(self) -> Path:
        return self.dir / "engine.log"

    @property
    def sidecar_log(self) -> Path:
        return self.dir / "sidecar.log"

    # -- commands -----------------------------------------------------------------------------
    def engine_cmd(self) -> list[str]:
        p = self.ports
        return engine_command(sys.executable, p.http, p.app_grpc, p.side_grpc, self.dir / "kv.db", HOST,
                              extra=["--apply-audit", str(self.audit_path), *self.engine_args])

    def sidecar_cmd(self) -> list[str]:
        p = self.ports
        return sidecar_command(sys.executable, self.node_id, p.raft, p.side_grpc, f"{HOST}:{p.app_grpc}",
                               p.mgmt, self.dir / "raft", HOST, HOST, bootstrap=self.bootstrap,
                               join=self.join, extra=self.sidecar_args)

    def _spawn(self, cmd: list[str], log_path: Path) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        with open(log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        _live.add(proc)
        return proc

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "Node":
        assert not self.alive_any(), f"{self.node_id} is already running"
        self.starts += 1
        self.engine = self._spawn(self.engine_cmd(), self.engine_log)
        self.sidecar = self._spawn(self.sidecar_cmd(), self.sidecar_log)
        return self

    def procs(self) -> list[subprocess.Popen]:
        return [p for p in (self.engine, self.sidecar) if p is not None]

    def alive_any(self) -> bool:
        return any(p.poll() is None for p in self.procs())

    def alive(self) -> bool:
        """Both processes are running."""
        return self.engine is not None and self.sidecar is not None and \
            self.engine.poll() is None and self.sidecar.poll() is None

    def kill9(self) -> None:
        """SIGKILL both process groups at once (a machine crash, as far as this node is concerned)."""
        for p in self.procs():
            kill_group(p, signal.SIGKILL)
        for p in self.procs():
            p.wait(timeout=10)
            _live.discard(p)

    def terminate(self) -> None:
        """SIGTERM both process groups, once: a second SIGTERM could land after the
        process removed its handler while shutting down and turn a clean exit into -15."""
        for p in self.procs():
            if p.poll() is None and p not in self._terminated:
                self._terminated.add(p)
                kill_group(p, signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGTERM both, SIGKILL what is still running after `timeout`. Returns the exit codes
        (None for a process that had to be killed)."""
        self.terminate()
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for name, p in (("engine", self.engine), ("sidecar", self.sidecar)):
            if p is None:
                continue
            try:
                codes[name] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(p, signal.SIGKILL)
                p.wait(timeout=10)
                codes[name] = None
            _live.discard(p)
        return codes

    def restart(self, timeout: float = 30.0, wait: bool = True) -> "Node":
        if self.alive_any():
            self.stop()
        self.start()
        if wait:
            self.wait_healthy(timeout)
        return self

    # -- state -------------------------------------------------------------------------------------
    def health(self) -> tuple[int, str]:
        r = http_get(f"{self.mgmt_url}/health", timeout=2.0)
        return r.status_code, r.text

    def engine_health(self) -> tuple[int, str]:
        r = http_get(f"{self.http_url}/health", timeout=2.0)
        return r.status_code, r.text

    def status(self, timeout: float = 3.0) -> dict:
        r = http_get(f"{self.mgmt_url}/status", timeout=timeout)
        r.raise_for_status()
        return r.json()

    def stats(self) -> dict:
        r = http_get(f"{self.http_url}/debug/stats", timeout=3.0)
        r.raise_for_status()
        return r.json()

    def wait_healthy(self, timeout: float = 30.0) -> "Node":
        """Engine /health and sidecar /health both 200 (the latter: a leader is known)."""
        def ready() -> bool:
            for p, name in ((self.engine, "engine"), (self.sidecar, "sidecar")):
                if p is not None and p.poll() is not None:
                    raise ProcessExited(f"{self.node_id} {name} exited with {p.returncode}\n{self.log_tail()}")
            return self.engine_health()[0] == 200 and self.health()[0] == 200
        try:
            wait_until(ready, timeout, what=f"{self.node_id} healthy")
        except ProcessExited:
            raise
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None
        return self

    def audit_indices(self) -> list[int]:
        if not self.audit_path.exists():
            return []
        return [int(line) for line in self.audit_path.read_text().split() if line.strip()]

    def duplicate_applies(self) -> dict[int, int]:
        """Raft indices the audit log shows more than once (index -> count): each is a double apply."""
        seen: dict[int, int] = {}
        for i in self.audit_indices():
            seen[i] = seen.get(i, 0) + 1
        return {i: k for i, k in seen.items() if k > 1}

    def local(self, key: str) -> requests.Response:
        return get(self.http_url, key, consistency="local")

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in (self.engine_log, self.sidecar_log):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                text = ["(no log)"]
            out.append(f"--- {self.node_id} {path.name} (last {lines} lines) ---")
            out.extend(text)
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"Node({self.node_id}, http={self.ports.http}, mgmt={self.ports.mgmt}, raft={self.ports.raft})"


class ProcessExited(RuntimeError):
    pass


# -- a cluster ----------------------------------------------------------------------------------

class Cluster:
    """Nodes of one Raft cluster under one base directory."""

    _ids = itertools.count(1)

    def __init__(self, base_dir: Path | str, sidecar_args: Sequence[str] = (), engine_args: Sequence[str] = (),
                 env: dict[str, str] | None = None, name: str | None = None) -> None:
        self.base_dir = Path(base_dir)
        self.sidecar_args = list(sidecar_args)
        self.engine_args = list(engine_args)
        self.env = dict(env or {})
        self.name = name or f"cluster{next(self._ids)}"
        self.nodes: list[Node] = []
        _active_clusters.append(self)

    # -- building ---------------------------------------------------------------------------------
    def new_node(self, node_id: str | None = None, *, bootstrap: bool = False, join: str | None = None,
                 sidecar_args: Sequence[str] | None = None, env: dict[str, str] | None = None) -> Node:
        node = Node(node_id or f"node{len(self.nodes) + 1}", self.base_dir, bootstrap=bootstrap, join=join,
                    sidecar_args=self.sidecar_args if sidecar_args is None else list(sidecar_args),
                    engine_args=self.engine_args, env={**self.env, **(env or {})})
        self.nodes.append(node)
        return node

    def start(self, n: int = 3, timeout: float = 60.0) -> "Cluster":
        """Bootstraps node1, then joins the others one after another through node1."""
        first = self.new_node(bootstrap=True).start().wait_healthy(timeout)
        for _ in range(n - 1):
            self.new_node(join=first.mgmt_addr).start().wait_healthy(timeout)
        self.wait_members(n, timeout=timeout)
        return self

    def add_node(self, via: Node | None = None, node_id: str | None = None, timeout: float = 60.0,
                 wait: bool = True, **kw) -> Node:
        via = via or self.nodes[0]
        node = self.new_node(node_id, join=via.mgmt_addr, **kw).start()
        if wait:
            node.wait_healthy(timeout)
        return node

    # -- queries ------------------------------------------------------------------------------------
    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.alive()]

    def statuses(self, nodes: Iterable[Node] | None = None) -> dict[str, dict]:
        out = {}
        for n in (self.running() if nodes is None else nodes):
            try:
                out[n.node_id] = n.status()
            except Exception:  # noqa: BLE001 - a node may be down or busy
                pass
        return out

    def leader(self, timeout: float = 15.0, nodes: Iterable[Node] | None = None) -> Node:
        """The one node that says is_leader and that every other answering node agrees on."""
        pool = list(self.running() if nodes is None else nodes)

        def find() -> Node | None:
            st = self.statuses(pool)
            leaders = [n for n in pool if st.get(n.node_id, {}).get("is_leader")]
            if len(leaders) != 1:
                return None
            ldr = leaders[0]
            agree = all(s.get("leader_addr") == ldr.raft_addr for s in st.values())
            return ldr if agree and len(st) == len(pool) else None
        return wait_until(find, timeout, what="a single agreed leader")

    def followers(self, timeout: float = 15.0) -> list[Node]:
        ldr = self.leader(timeout)
        return [n for n in self.running() if n is not ldr]

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def wait_members(self, n: int, timeout: float = 30.0, nodes: Iterable[Node] | None = None) -> None:
        pool = list(self.running() if nodes is None else nodes)

        def ok() -> bool:
            st = self.statuses(pool)
            return len(st) == len(pool) and all(len(s["members"]) == n for s in st.values())
        wait_until(ok, timeout, what=f"{n} members on every node")

    def wait_healthy(self, timeout: float = 60.0, nodes: Iterable[Node] | None = None) -> None:
        for n in (self.running() if nodes is None else nodes):
            n.wait_healthy(timeout)

    def wait_converged(self, key: str, value: str | None, timeout: float = 30.0,
                       nodes: Iterable[Node] | None = None) -> None:
        """Every node's own copy (consistency=local) has `key` == `value` (None: absent)."""
        pool = list(self.running() if nodes is None else nodes)

        def ok() -> bool:
            for n in pool:
                r = n.local(key)
                if value is None:
                    if r.status_code != 404:
                        return False
                elif r.status_code != 200 or r.text != value:
                    return False
            return True
        wait_until(ok, timeout, what=f"{key}={value!r} on {[n.node_id for n in pool]}")

    # -- whole-cluster actions -------------------------------------------------------------------------
    def kill9_all(self) -> None:
        for n in self.nodes:
            n.kill9()

    def stop_all(self, timeout: float = 10.0) -> dict[str, dict[str, int | None]]:
        for n in self.nodes:  # SIGTERM everyone first, so no node outlives the others by a bound
            n.terminate()
        return {n.node_id: n.stop(timeout) for n in self.nodes}

    def start_all(self, timeout: float = 60.0) -> None:
        """Starts every stopped node at once (a restart: membership comes from the data dirs)."""
        for n in self.nodes:
            if not n.alive_any():
                n.start()
        for n in self.nodes:
            n.wait_healthy(timeout)

    def shutdown(self) -> None:
        for n in self.nodes:
            n.kill9()
        if self in _active_clusters:
            _active_clusters.remove(self)

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(n.log_tail(lines) for n in self.nodes)

    def describe(self) -> str:
        return json.dumps(self.statuses(), indent=1, default=str)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
