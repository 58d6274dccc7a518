"""Network namespaces, partitions and RaftKV node processes for the fault-injection tests.

Topology (``NetNS``): one Linux bridge in the root namespace with the address
10.213.X.1/24 (X is picked per run among the /24s not in use), and one namespace
per node, attached by a veth pair, holding 10.213.X.(10+i)/24 and its own
loopback. The namespaces get no default route and nothing forwards or NATs, so
their traffic can only reach each other and the test process in the root
namespace (through the bridge address); it never leaves the machine.

Partitions are blackhole routes inside the namespaces (``ip -n NS route add
blackhole PEER/32``), added on both sides of every cut link; ``heal`` deletes
them. The test process keeps reaching every node, as a Jepsen client does.
``link_down``/``link_up`` take a node's veth down entirely (clients too).

Every name carries the pid of the test process (``rk*<pid hex>g<n>``) so that
parallel runs do not clash and leftovers of a crashed run are recognised and
removed by ``cleanup_stale`` (only when that pid is gone).

Processes (``Node``/``Cluster``): each node is a storage engine and a Raft
sidecar, each started as ``ip netns exec NS python -m ...`` in its own process
group (or straight on 127.0.0.1 with free ports when no namespaces are used),
logs appended to files in the node's directory so restarts keep the history.
"""
from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import requests

from raftkv.procs import engine_command, kill_group, sidecar_command
from raftkv.procs import free_ports as _free_ports

ROOT = Path(__file__).resolve().parents[2]
SUBNET_PREFIX = "10.213"
NS_PREFIX = "rkns-"          # namespaces: rkns-<pid>-<run>-<node>
_IF_RE = re.compile(r"^rk[bhp]([0-9a-f]+)g(\d+)")
_NS_RE = re.compile(r"^rkns-(\d+)-(\d+)-(\d+)$")
_runs = itertools.count(1)


# -- small helpers ------------------------------------------------------------------------------

def _ip(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_unavailable_reason() -> str | None:
    """None when namespaces, veths and bridges can be made here; otherwise why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{NS_PREFIX}{os.getpid()}-0-0"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    try:
        br = f"rkb{os.getpid():x}g0"
        res = _ip("link", "add", br, "type", "bridge", check=False)
        if res.returncode != 0:
            return f"cannot create a bridge: {res.stderr.strip()}"
        _ip("link", "del", br, check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def cleanup_stale() -> list[str]:
    """Removes namespaces and links of earlier runs whose test process is gone."""
    removed = []
    res = _ip("netns", "list", check=False)
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        for p in pids:
            try:
                os.kill(int(p), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", name, check=False)
        removed.append(name)
    res = _ip("-o", "link", "show", check=False)
    for line in res.stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _IF_RE.match(name)
        if not m or _pid_alive(int(m.group(1), 16)):
            continue
        _ip("link", "del", name, check=False)
        removed.append(name)
    return removed


# -- namespaces and partitions -----------------------------------------------------------------

class NetNS:
    """N namespaces on one bridge; ``partition``, ``isolate`` and ``heal`` cut and restore links."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.run = next(_runs)
        pid = os.getpid()
        tag = f"{pid:x}g{self.run}"
        self.bridge = f"rkb{tag}"
        self.host_veths = [f"rkh{tag}n{i}" for i in range(n)]
        self.ns_veths = [f"rkp{tag}n{i}" for i in range(n)]
        self.namespaces = [f"{NS_PREFIX}{pid}-{self.run}-{i}" for i in range(n)]
        self.subnet: str | None = None
        self._cuts: set[tuple[int, int]] = set()
        self._down: set[int] = set()
        self._lock = threading.Lock()
        self._up = False

    # addresses
    @property
    def bridge_ip(self) -> str:
        return f"{self.subnet}.1"

    def ip_of(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def _pick_subnet(self) -> str:
        used = set(re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.",
                              _ip("-4", "-o", "addr", "show", check=False).stdout))
        start = os.getpid() % 200
        for k in range(250):
            x = 1 + (start + k) % 250
            if str(x) not in used:
                return f"{SUBNET_PREFIX}.{x}"
        raise RuntimeError(f"no free /24 left in {SUBNET_PREFIX}.0.0/16")

    def setup(self) -> "NetNS":
        cleanup_stale()
        self.subnet = self._pick_subnet()
        self._up = True
        _live_nets.append(self)
        try:
            # Safety net: anything in 10.213.0.0/16 that is not one of our live bridges'
            # /24s (e.g. a straggling client after teardown) is refused locally instead
            # of following the default route off the machine.
            _ip("route", "replace", "unreachable", f"{SUBNET_PREFIX}.0.0/16")
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(self.n):
                ns, host, peer = self.namespaces[i], self.host_veths[i], self.ns_veths[i]
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", ns=ns)
                _ip("link", "add", host, "type", "veth", "peer", "name", peer)
                _ip("link", "set", peer, "netns", ns)
                _ip("link", "set", host, "master", self.bridge)
                _ip("link", "set", host, "up")
                _ip("addr", "add", f"{self.ip_of(i)}/24", "dev", peer, ns=ns)
                _ip("link", "set", peer, "up", ns=ns)
        except Exception:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        if not self._up:
            return
        self._up = False
        for ns in self.namespaces:
            for p in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        for host in self.host_veths:
            _ip("link", "del", host, check=False)   # normally gone with its namespace
        _ip("link", "del", self.bridge, check=False)
        if self in _live_nets:
            _live_nets.remove(self)
        others = [line for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines()
                  if re.search(r": rkb[0-9a-f]+g\d+", line)]
        if not others:
            _ip("route", "del", "unreachable", f"{SUBNET_PREFIX}.0.0/16", check=False)

    # faults
    def _idx(self, node: "int | Node") -> int:
        return node if isinstance(node, int) else node.index

    def cut(self, a: "int | Node", b: "int | Node") -> None:
        """Drops all traffic between two nodes, both directions."""
        a, b = self._idx(a), self._idx(b)
        with self._lock:
            for x, y in ((a, b), (b, a)):
                if (x, y) not in self._cuts:
                    _ip("route", "add", "blackhole", f"{self.ip_of(y)}/32", ns=self.namespaces[x])
                    self._cuts.add((x, y))

    def partition(self, groups: Sequence[Iterable["int | Node"]]) -> None:
        """Cuts every link between nodes of different groups (nodes in no group are cut off from all)."""
        idx_groups = [{self._idx(x) for x in g} for g in groups]
        member = {i: gi for gi, g in enumerate(idx_groups) for i in g}
        for a in range(self.n):
            for b in range(a + 1, self.n):
                ga, gb = member.get(a, -1 - a), member.get(b, -1 - b)
                if ga != gb:
                    self.cut(a, b)

    def isolate(self, node: "int | Node") -> None:
        i = self._idx(node)
        self.partition([[i], [j for j in range(self.n) if j != i]])

    def link_down(self, node: "int | Node") -> None:
        """Takes the node's veth down: nobody reaches it, the test process neither."""
        i = self._idx(node)
        with self._lock:
            _ip("link", "set", self.host_veths[i], "down")
            self._down.add(i)

    def link_up(self, node: "int | Node") -> None:
        i = self._idx(node)
        with self._lock:
            _ip("link", "set", self.host_veths[i], "up")
            self._down.discard(i)

    def heal(self) -> None:
        with self._lock:
            for x, y in sorted(self._cuts):
                _ip("route", "del", "blackhole", f"{self.ip_of(y)}/32", ns=self.namespaces[x], check=False)
            self._cuts.clear()
            for ns in self.namespaces:
                _ip("route", "flush", "type", "blackhole", ns=ns, check=False)
            for i in sorted(self._down):
                _ip("link", "set", self.host_veths[i], "up", check=False)
            self._down.clear()

    def cuts(self) -> list[tuple[int, int]]:
        with self._lock:
            return sorted(self._cuts)

    def __enter__(self) -> "NetNS":
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()


# -- processes ---------------------------------------------------------------------------------

_live_procs: set[subprocess.Popen] = set()
_live_nets: list[NetNS] = []
_live_clusters: list["Cluster"] = []
_handed_out: set[int] = set()


def _last_resort_cleanup() -> None:
    for c in list(_live_clusters):
        try:
            c.shutdown(graceful=False)
        except Exception:  # noqa: BLE001 - interpreter exit
            pass
    for p in list(_live_procs):
        kill_group(p)
    for net in list(_live_nets):
        try:
            net.teardown()
        except Exception:  # noqa: BLE001
            pass


atexit.register(_last_resort_cleanup)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Free ports on `host`, never the same one twice in this test session."""
    return _free_ports(n, host, handed_out=_handed_out)


_tls = threading.local()


def session() -> requests.Session:
    """A per-thread requests session that never uses proxies from the environment."""
    s = getattr(_tls, "session", None)
    if s is None:
        s = requests.Session()
        s.trust_env = False
        _tls.session = s
    return s


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - polling through restarts
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} "
                               f"(last value {last!r}, last error {last_exc!r})")
        time.sleep(interval)


class Node:
    """One RaftKV node: storage engine + Raft sidecar, in namespace ``netns`` or on 127.0.0.1."""

    def __init__(self, cluster: "Cluster", index: int, host: str, netns: str | None) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"n{index + 1}"
        self.host = host
        self.netns = netns
        if netns:   # a namespace has a port space of its own: the original's ports
            self.http_port, self.app_port, self.side_port, self.raft_port, self.mgmt_port = \
                8080, 50051, 50052, 8088, 6000
        else:
            self.http_port, self.app_port, self.side_port, self.raft_port, self.mgmt_port = free_ports(5)
        self.dir = Path(cluster.base_dir) / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.engine: subprocess.Popen | None = None
        self.sidecar: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0

    # addresses
    def _guard(self) -> None:
        """No request to a namespace address once its network is gone (it would leave the machine)."""
        net = self.cluster.net
        if self.netns and (net is None or not net._up):
            raise RuntimeError(f"{self.name}: the test network {self.netns} is torn down")

    @property
    def url(self) -> str:
        self._guard()
        return f"http://{self.host}:{self.http_port}"

    @property
    def mgmt_url(self) -> str:
        self._guard()
        return f"http://{self.host}:{self.mgmt_port}"

    @property
    def mgmt_addr(self) -> str:
        return f"{self.host}:{self.mgmt_port}"

    @property
    def raft_addr(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def engine_log(self) -> Path:
        return self.dir / "engine.log"

    @property
    def sidecar_log(self) -> Path:
        return self.dir / "sidecar.log"

    @property
    def audit_path(self) -> Path:
        return self.dir / "apply-audit.log"

    # commands
    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def engine_cmd(self) -> list[str]:
        return self._prefix() + engine_command(
            sys.executable, self.http_port, self.app_port, self.side_port, self.dir / "kv.db", self.host,
            extra=["--apply-audit", str(self.audit_path), *self.cluster.engine_args])

    def sidecar_cmd(self) -> list[str]:
        extra: list[str] = []
        if self.cluster.election_timeout:
            lo, hi = self.cluster.election_timeout
            extra += ["--election-timeout", str(lo), str(hi)]
        return self._prefix() + sidecar_command(
            sys.executable, self.name, self.raft_port, self.side_port, f"127.0.0.1:{self.app_port}",
            self.mgmt_port, self.dir / "raft", self.host, self.host, bootstrap=self.index == 0,
            join=None if self.index == 0 else self.cluster.nodes[0].mgmt_addr,
            extra=extra + list(self.cluster.sidecar_args))

    def _spawn(self, cmd: list[str], log_path: Path) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} at {time.strftime('%H:%M:%S')} "
                      f"(mono {time.monotonic():.3f}): {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        _live_procs.add(proc)
        return proc

    # lifecycle
    def start_engine(self) -> None:
        self.starts += 1
        self.sidecar = None          # the previous run's processes are history now
        self.engine = self._spawn(self.engine_cmd(), self.engine_log)

    def start_sidecar(self) -> None:
        self.sidecar = self._spawn(self.sidecar_cmd(), self.sidecar_log)

    def _check_running(self) -> None:
        for p, what in ((self.engine, "engine"), (self.sidecar, "sidecar")):
            if p is not None and p.poll() is not None:
                raise ProcessExited(f"{self.name} {what} exited with {p.returncode}\n{self.log_tail()}")

    def engine_healthy(self) -> bool:
        return session().get(f"{self.url}/health", timeout=1.0).status_code == 200

    def healthy(self) -> bool:
        """Sidecar /health: a leader is known and the engine answers."""
        return session().get(f"{self.mgmt_url}/health", timeout=1.0).status_code == 200

    def wait_engine(self, timeout: float = 30.0) -> None:
        def ready():
            self._check_running()
            return self.engine_healthy()
        wait_until(ready, timeout, what=f"{self.name} engine /health")

    def wait_sidecar(self, timeout: float = 30.0, need_leader: bool = True) -> None:
        """need_leader: /health 200; otherwise only that the management API answers."""
        def ready():
            self._check_running()
            if need_leader:
                return self.healthy()
            return session().get(f"{self.mgmt_url}/status", timeout=1.0).status_code == 200
        wait_until(ready, timeout, what=f"{self.name} sidecar {'/health' if need_leader else '/status'}")

    def start(self, need_leader: bool = True, timeout: float = 60.0) -> None:
        """Engine, wait for it, sidecar, wait for it. The same commands on every (re)start."""
        assert not self.alive_any(), f"{self.name} is still running"
        self.start_engine()
        self.wait_engine(timeout)
        self.start_sidecar()
        self.wait_sidecar(timeout, need_leader)

    def procs(self) -> list[subprocess.Popen]:
        return [p for p in (self.engine, self.sidecar) if p is not None]

    def alive_any(self) -> bool:
        return any(p.poll() is None for p in self.procs())

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.engine, self.sidecar))

    def kill9(self) -> None:
        """SIGKILL both process groups at once: a crash, as far as this node is concerned."""
        self.kills += 1
        for p in self.procs():
            kill_group(p, signal.SIGKILL)
        for p in self.procs():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _live_procs.discard(p)

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.procs():
            kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(p, signal.SIGKILL)
                p.wait(timeout=10)
            _live_procs.discard(p)

    # state
    def status(self, timeout: float = 1.5) -> dict:
        r = session().get(f"{self.mgmt_url}/status", timeout=timeout)
        r.raise_for_status()
        return r.json()

    def get_local(self, key: str, timeout: float = 3.0) -> tuple[int, str | None]:
        r = session().get(f"{self.url}/get-val", params={"key": key, "consistency": "local"}, timeout=timeout)
        if r.status_code == 200:
            return 200, r.content.decode("utf-8")
        return r.status_code, None

    def stats(self) -> dict:
        r = session().get(f"{self.url}/debug/stats", timeout=2.0)
        r.raise_for_status()
        return r.json()

    def audit_indices(self) -> list[int]:
        try:
            return [int(x) for x in self.audit_path.read_text().split()]
        except FileNotFoundError:
            return []

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for path in (self.engine_log, self.sidecar_log):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                text = ["(no log)"]
            out.append(f"--- {self.name} {path.name} (last {lines} lines) ---")
            out.extend(text)
        return "\n".join(out)

    def __repr__(self) -> str:
        where = f"netns {self.netns}" if self.netns else "loopback"
        return f"Node({self.name} {self.host} http={self.http_port} mgmt={self.mgmt_port}, {where})"


class ProcessExited(RuntimeError):
    pass


class Cluster:
    """N RaftKV nodes; in the namespaces of ``net`` when given, else on 127.0.0.1."""

    def __init__(self, base_dir: str | Path, n: int = 3, net: NetNS | None = None,
                 election_timeout: tuple[float, float] | None = None,
                 engine_args: Sequence[str] = (), sidecar_args: Sequence[str] = ()) -> None:
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.net = net
        self.election_timeout = election_timeout
        self.engine_args = list(engine_args)
        self.sidecar_args = list(sidecar_args)
        if net is not None:
            assert net.n >= n, "the network has fewer namespaces than nodes"
            self.nodes = [Node(self, i, net.ip_of(i), net.namespaces[i]) for i in range(n)]
        else:
            self.nodes = [Node(self, i, "127.0.0.1", None) for i in range(n)]
        _live_clusters.append(self)

    def start(self, timeout: float = 60.0) -> "Cluster":
        """Bootstraps n1, then joins the others through n1, one after another."""
        first = self.nodes[0]
        first.start(need_leader=True, timeout=timeout)
        for node in self.nodes[1:]:
            node.start(need_leader=True, timeout=timeout)
        self.wait_members(timeout)
        return self

    def wait_members(self, timeout: float = 60.0) -> None:
        want = {n.raft_addr for n in self.nodes}

        def all_in():
            for n in self.nodes:
                got = {m["address"] for m in n.status()["members"]}
                if got != want:
                    return False
            return True
        wait_until(all_in, timeout, what=f"every node to list members {sorted(want)}")

    def restart_all_after_crash(self, timeout: float = 90.0) -> None:
        """Starts every dead node: engines first, then all sidecars together (quorum needs them)."""
        dead = [n for n in self.nodes if not n.alive()]
        for n in dead:
            if n.alive_any():
                n.kill9()
            n.start_engine()
        for n in dead:
            n.wait_engine(timeout)
        for n in dead:
            n.start_sidecar()
        for n in dead:
            n.wait_sidecar(timeout, need_leader=True)

    def node_by_raft_addr(self, addr: str) -> Node | None:
        for n in self.nodes:
            if n.raft_addr == addr:
                return n
        return None

    def leader(self) -> Node | None:
        """The node that says it leads with the highest term (a stale ex-leader may still claim it)."""
        best: tuple[int, Node] | None = None
        for n in self.nodes:
            if not n.alive():
                continue
            try:
                st = n.status(timeout=1.0)
            except Exception:  # noqa: BLE001
                continue
            if st.get("is_leader") and (best is None or st.get("term", 0) > best[0]):
                best = (st.get("term", 0), n)
        return best[1] if best else None

    def wait_leader(self, timeout: float = 30.0, among: Sequence[Node] | None = None) -> Node:
        """A leader on whose identity the nodes in ``among`` (default: all alive) agree."""
        def agreed():
            nodes = [n for n in (among or self.nodes) if n.alive()]
            leaders = set()
            for n in nodes:
                st = n.status(timeout=1.0)
                leaders.add(st.get("leader_addr") or None)
            if len(leaders) == 1 and None not in leaders:
                return self.node_by_raft_addr(leaders.pop())
            return None
        return wait_until(agreed, timeout, what="an agreed leader")

    def shutdown(self, graceful: bool = False) -> None:
        for n in self.nodes:
            if graceful:
                n.stop()
            else:
                n.kill9()
        if self in _live_clusters:
            _live_clusters.remove(self)

    def logs_tail(self, lines: int = 30) -> str:
        return "\n".join(n.log_tail(lines) for n in self.nodes)

    def save_artifacts(self, dest: str | Path) -> Path:
        """Copies every node's logs and audit files to ``dest`` (data dirs are left out)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            for f in (n.engine_log, n.sidecar_log, n.audit_path):
                if f.exists():
                    shutil.copy2(f, dest / f"{n.name}-{f.name}")
        return dest
