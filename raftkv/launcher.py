"""Local cluster launcher: N RaftKV nodes on one machine, no Docker.

Every node is one run of ``entrypoint.sh`` (the same script the Docker image uses), with the
environment a container would get plus distinct ports:

=========  ==========================  ===========================
node K     (i = K - 1)                  defaults for 3 nodes
=========  ==========================  ===========================
client     ``http_port + i``            8080, 8081, 8082
mgmt       ``mgmt_port + i``            6000, 6001, 6002
raft       ``raft_port + i``            8088, 8089, 8090
engine     ``grpc_port + 2i``           50051, 50053, 50055
sidecar    ``grpc_port + 2i + 1``       50052, 50054, 50056
=========  ==========================  ===========================

node1 bootstraps, the others join through node1's management port. Each node keeps its data
in ``base_dir/nodeK`` and logs to ``base_dir/nodeK.log``; the layout is saved in
``base_dir/cluster.json`` so that starting again on the same folder restarts the same nodes
on their existing data (the sidecars then ignore bootstrap/join).

Use from code (tests)::

    with launch(3, tmp_path, http_port=..., mgmt_port=..., raft_port=..., grpc_port=...) as c:
        c.nodes[0].http_url
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import procs
from .procs import signal_group

DEFAULT_DIR = ".raftkv-cluster"
DEFAULT_NODES = 3
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8080
DEFAULT_MGMT_PORT = 6000
DEFAULT_RAFT_PORT = 8088
DEFAULT_GRPC_PORT = 50051
DEFAULT_READY_TIMEOUT = 90.0
DEFAULT_STOP_TIMEOUT = 30.0
LAYOUT_FILE = "cluster.json"

_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class LauncherError(RuntimeError):
    """The cluster could not be started (bad options, busy port, a node died, timeout)."""


@dataclass(frozen=True)
class NodeSpec:
    """Where one node listens and keeps its files."""

    index: int  # 0-based
    node_id: str
    host: str
    http_port: int
    mgmt_port: int
    raft_port: int
    app_port: int  # engine StateMachine gRPC (loopback)
    side_port: int  # sidecar RaftNode gRPC (loopback)
    data_dir: Path
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.http_port}"

    @property
    def mgmt_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.mgmt_port}"

    @property
    def mgmt_addr(self) -> str:
        return f"{_url_host(self.host)}:{self.mgmt_port}"

    def ports(self) -> dict[str, int]:
        return {"http": self.http_port, "mgmt": self.mgmt_port, "raft": self.raft_port,
                "engine gRPC": self.app_port, "sidecar gRPC": self.side_port}


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Layout:
    """Port bases and node count; everything per node derives from it (see module doc)."""

    nodes: int = DEFAULT_NODES
    host: str = DEFAULT_HOST
    http_port: int = DEFAULT_HTTP_PORT
    mgmt_port: int = DEFAULT_MGMT_PORT
    raft_port: int = DEFAULT_RAFT_PORT
    grpc_port: int = DEFAULT_GRPC_PORT

    def node_specs(self, base_dir: Path) -> list[NodeSpec]:
        specs = []
        for i in range(self.nodes):
            node_id = f"node{i + 1}"
            specs.append(NodeSpec(
                index=i, node_id=node_id, host=self.host,
                http_port=self.http_port + i, mgmt_port=self.mgmt_port + i,
                raft_port=self.raft_port + i,
                app_port=self.grpc_port + 2 * i, side_port=self.grpc_port + 2 * i + 1,
                data_dir=base_dir / node_id, log_path=base_dir / f"{node_id}.log"))
        return specs

    def validate(self) -> None:
        if self.nodes < 1:
            raise LauncherError("--nodes must be at least 1")
        if not self.host:
            raise LauncherError("host must not be empty")
        used: dict[int, str] = {}
        for spec in self.node_specs(Path(".")):
            for what, port in spec.ports().items():
                if not 1 <= port <= 65535:
                    raise LauncherError(f"{spec.node_id} {what} port {port} is outside 1-65535")
                if port in used:
                    raise LauncherError(
                        f"port {port} would be used twice ({used[port]} and {spec.node_id} {what}); "
                        "choose port bases that are at least the node count apart")
                used[port] = f"{spec.node_id} {what}"

    def to_json(self) -> dict:
        return {"nodes": self.nodes, "host": self.host, "http_port": self.http_port,
                "mgmt_port": self.mgmt_port, "raft_port": self.raft_port, "grpc_port": self.grpc_port}


def find_entrypoint(explicit: str | os.PathLike | None = None) -> Path:
    """entrypoint.sh: the argument, $RAFTKV_ENTRYPOINT, the source checkout holding this
    package, the current directory, or /app (the Docker image), in that order."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("RAFTKV_ENTRYPOINT"):
        candidates.append(Path(os.environ["RAFTKV_ENTRYPOINT"]))
    else:
        candidates += [_PACKAGE_PARENT / "entrypoint.sh", Path.cwd() / "entrypoint.sh",
                       Path("/app/entrypoint.sh")]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise LauncherError("entrypoint.sh not found (looked at " + ", ".join(map(str, candidates))
                        + "); run from a checkout of raftkv or set RAFTKV_ENTRYPOINT")


def http_status(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET; (0, error) when nothing answered. Never uses a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        try:
            body = e.read().decode("utf-8", "replace")
        except Exception:  # noqa: BLE001
            body = ""
        return e.code, body
    except (OSError, ValueError) as e:
        return 0, repr(e)


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text[-lines:])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunningNode:
    """One entrypoint.sh process (leader of its own process group) and its children."""

    def __init__(self, spec: NodeSpec, proc: subprocess.Popen) -> None:
        self.spec = spec
        self.proc = proc
        self.pgid = proc.pid  # start_new_session: the script leads a new group
        self._termed_script = False
        self._termed_group = False
        self.reported_dead = False

    def __getattr__(self, name):  # node.http_url, node.node_id, ... come from the spec
        if name == "spec":
            raise AttributeError(name)
        return getattr(self.spec, name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def group_alive(self) -> bool:
        """The script or any process it started (same group) still runs."""
        self.proc.poll()  # reap the script so its zombie does not count
        return _group_alive(self.pgid)

    def terminate(self) -> None:
        """SIGTERM to the script, once (it forwards it to the engine and the sidecar, like
        `docker stop`); processes left behind by a script that is gone get one SIGTERM as a
        group. Never twice: a second SIGTERM can turn a clean shutdown into a kill."""
        if self.alive():
            if not self._termed_script:
                self._termed_script = True
                try:
                    self.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        elif not self._termed_group and self.group_alive():
            self._termed_group = True
            signal_group(self.pgid, signal.SIGTERM)

    def kill(self) -> None:
        signal_group(self.pgid, signal.SIGKILL)
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.spec.log_path, lines)


class LocalCluster:
    """Nodes started by :func:`launch`. Use as a context manager or call :meth:`stop`."""

    def __init__(self, base_dir: Path, layout: Layout, nodes: list[RunningNode]) -> None:
        self.base_dir = base_dir
        self.layout = layout
        self.nodes = nodes

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def http_urls(self) -> list[str]:
        return [n.http_url for n in self.nodes]

    @property
    def mgmt_urls(self) -> list[str]:
        return [n.mgmt_url for n in self.nodes]

    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes]

    def dead_nodes(self) -> list[RunningNode]:
        return [n for n in self.nodes if not n.alive()]

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> dict[str, int | None]:
        """SIGTERM every node, SIGKILL every process group still alive after `timeout`.
        Returns each script's exit status (None if it had to be killed). Idempotent."""
        for n in self.nodes:
            n.terminate()
        deadline = time.monotonic() + timeout
        killed: set[str] = set()
        try:
            while time.monotonic() < deadline:
                pending = [n for n in self.nodes if n.group_alive()]
                if not pending:
                    break
                for n in pending:
                    n.terminate()  # covers a script that is gone but left children behind
                time.sleep(0.1)
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait any longer
            pass
        for n in self.nodes:
            if n.group_alive():
                killed.add(n.node_id)
                n.kill()
        codes: dict[str, int | None] = {}
        for n in self.nodes:
            try:
                rc = n.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                rc = None
            codes[n.node_id] = None if n.node_id in killed else rc
        # Wait (briefly) for SIGKILLed groups to disappear.
        end = time.monotonic() + 5
        while time.monotonic() < end and any(n.group_alive() for n in self.nodes):
            time.sleep(0.05)
        return codes


def _load_saved_layout(base_dir: Path) -> Layout | None:
    path = base_dir / LAYOUT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LauncherError(f"cannot read {path}: {e}") from None
    try:
        return Layout(**{k: data[k] for k in Layout.__dataclass_fields__ if k in data})
    except TypeError as e:
        raise LauncherError(f"bad {path}: {e}") from None


def resolve_layout(base_dir: Path, nodes: int | None = None, host: str | None = None,
                   http_port: int | None = None, mgmt_port: int | None = None,
                   raft_port: int | None = None, grpc_port: int | None = None) -> Layout:
    """Options given win; options left out come from base_dir/cluster.json (an existing
    cluster), else the defaults. Refuses changes an existing cluster cannot survive: the Raft
    and management addresses are stored in every member's membership, and starting fewer nodes
    than before could leave the cluster without a quorum."""
    saved = _load_saved_layout(base_dir)
    base = saved or Layout()
    layout = Layout(
        nodes=nodes if nodes is not None else base.nodes,
        host=host if host is not None else base.host,
        http_port=http_port if http_port is not None else base.http_port,
        mgmt_port=mgmt_port if mgmt_port is not None else base.mgmt_port,
        raft_port=raft_port if raft_port is not None else base.raft_port,
        grpc_port=grpc_port if grpc_port is not None else base.grpc_port,
    )
    layout.validate()
    if saved is not None:
        for field_name, what in (("host", "host"), ("raft_port", "Raft port base"),
                                 ("mgmt_port", "management port base")):
            old, new = getattr(saved, field_name), getattr(layout, field_name)
            if old != new:
                raise LauncherError(
                    f"the cluster in {base_dir} was created with {what} {old}, not {new}: its members "
                    f"know each other by these addresses. Leave the option out (or use {old}), "
                    "or use another --dir for a new cluster")
        if layout.nodes < saved.nodes:
            raise LauncherError(
                f"the cluster in {base_dir} has {saved.nodes} nodes; starting only {layout.nodes} "
                "could leave it without a quorum (remove members with /leave first)")
    return layout


def node_env(spec: NodeSpec, join_addr: str | None, *, python: str, token: str | None,
             base_env: Mapping[str, str], extra_env: Mapping[str, str] | None = None,
             engine_args: Sequence[str] | None = None, sidecar_args: Sequence[str] | None = None,
             node_stop_timeout: int = 15) -> dict[str, str]:
    env = dict(base_env)
    env.update({
        "NODE_ID": spec.node_id,
        "BOOTSTRAP": "true" if join_addr is None else "false",
        "JOIN_ADDR": join_addr or "",
        "HTTP_PORT": str(spec.http_port),
        "MGMT_PORT": str(spec.mgmt_port),
        "RAFT_PORT": str(spec.raft_port),
        "APP_PORT": str(spec.app_port),
        "SIDE_PORT": str(spec.side_port),
        "DATA_DIR": str(spec.data_dir),
        "ADVERTISE": spec.host,
        "BIND_HOST": spec.host,
        "PYTHON": python,
        "PYTHONUNBUFFERED": "1",
        "STOP_TIMEOUT": str(node_stop_timeout),
    })
    # Make storage_engine/raft_sidecar importable from the tree this package comes from,
    # also when it is not installed (python -m raftkv from a checkout).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_PARENT), env.get("PYTHONPATH")) if p)
    if token is not None:
        env["CLUSTER_TOKEN"] = token
    if engine_args is not None:
        env["ENGINE_ARGS"] = " ".join(engine_args)
    if sidecar_args is not None:
        env["SIDECAR_ARGS"] = " ".join(sidecar_args)
    if extra_env:
        env.update(extra_env)
    return env


def _start_node(spec: NodeSpec, entrypoint: Path, env: Mapping[str, str]) -> RunningNode:
    spec.data_dir.mkdir(parents=True, exist_ok=True)
    bash = shutil.which("bash") or "/bin/bash"
    with open(spec.log_path, "ab") as log:
        log.write(f"\n===== raftkv cluster up: {spec.node_id} started {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  f" =====\n".encode())
        log.flush()
        proc = subprocess.Popen([bash, str(entrypoint)], env=dict(env), cwd=str(spec.data_dir.parent),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return RunningNode(spec, proc)


def _node_ready(node: RunningNode) -> tuple[bool, str]:
    code, body = http_status(f"{node.mgmt_url}/health")
    if code != 200:
        return False, f"management /health: {code or 'no answer'} {body.strip()[:200]}"
    code, body = http_status(f"{node.http_url}/health")
    if code != 200:
        return False, f"client /health: {code or 'no answer'} {body.strip()[:200]}"
    return True, "ready"


def wait_ready(cluster: LocalCluster, timeout: float) -> None:
    """Poll every node until management and client /health answer 200. Raises LauncherError
    with the log tail of a node whose script exited, or of the nodes not ready in time."""
    deadline = time.monotonic() + timeout
    status: dict[str, str] = {}
    while True:
        for n in cluster.nodes:
            if not n.alive():
                raise LauncherError(
                    f"{n.node_id} exited with status {n.proc.returncode} while starting; "
                    f"last lines of {n.log_path}:\n{n.log_tail()}")
        not_ready = []
        for n in cluster.nodes:
            ok, why = _node_ready(n)
            status[n.node_id] = why
            if not ok:
                not_ready.append(n)
        if not not_ready:
            return
        if time.monotonic() >= deadline:
            details = "\n".join(
                f"--- {n.node_id}: {status[n.node_id]}; last lines of {n.log_path}:\n{n.log_tail(20)}"
                for n in not_ready)
            raise LauncherError(f"cluster not ready after {timeout:.0f}s:\n{details}")
        time.sleep(0.25)


def launch(n: int | None = None, base_dir: str | os.PathLike = DEFAULT_DIR, *,
           http_port: int | None = None, mgmt_port: int | None = None,
           raft_port: int | None = None, grpc_port: int | None = None,
           host: str | None = None, token: str | None = None,
           timeout: float = DEFAULT_READY_TIMEOUT, python: str | None = None,
           entrypoint: str | os.PathLike | None = None,
           env: Mapping[str, str] | None = None,
           engine_args: Sequence[str] | None = None, sidecar_args: Sequence[str] | None = None,
           check_ports: bool = True) -> LocalCluster:
    """Start an n-node cluster under base_dir and wait until every node is ready.

    Options left as None come from base_dir/cluster.json when the folder holds a cluster,
    else from the defaults (3 nodes, 127.0.0.1, ports 8080/6000/8088/50051). `token` becomes
    CLUSTER_TOKEN of every node (environment only). `env` adds variables for every node.
    On any failure all started nodes are stopped before the exception propagates.
    """
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    layout = resolve_layout(base, n, host, http_port, mgmt_port, raft_port, grpc_port)
    ep = find_entrypoint(entrypoint)
    specs = layout.node_specs(base)
    if check_ports:
        busy = [f"{spec.node_id} {what} {spec.host}:{port}" for spec in specs
                for what, port in spec.ports().items() if not procs.port_is_free(port, spec.host)]
        if busy:
            raise LauncherError("ports in use: " + ", ".join(busy)
                                + " (another cluster running? choose other ports with the options)")
    python = python or sys.executable
    join_addr = specs[0].mgmt_addr
    nodes: list[RunningNode] = []
    cluster = LocalCluster(base, layout, nodes)
    try:
        for spec in specs:
            e = node_env(spec, None if spec.index == 0 else join_addr, python=python, token=token,
                         base_env=os.environ, extra_env=env, engine_args=engine_args,
                         sidecar_args=sidecar_args)
            nodes.append(_start_node(spec, ep, e))
        wait_ready(cluster, timeout)
        (base / LAYOUT_FILE).write_text(json.dumps(layout.to_json(), indent=2) + "\n")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def describe(cluster: LocalCluster) -> Iterable[str]:
    """Human-readable lines: one per node with its URLs and log file."""
    yield f"RaftKV cluster of {len(cluster.nodes)} nodes is ready (data in {cluster.base_dir})"
    for n in cluster.nodes:
        yield (f"  {n.node_id}  client {n.http_url}  management {n.mgmt_url}  "
               f"raft {n.spec.host}:{n.spec.raft_port}  log {n.log_path}  pid {n.pid}")
