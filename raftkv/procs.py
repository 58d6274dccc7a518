"""Process and port helpers shared by the launcher, the test harnesses and the benchmarks.

Free ports from the kernel, signals to whole process groups (every RaftKV process is started
with ``start_new_session=True``, so it leads a group whose id is its pid), and the command
lines of the storage engine and the Raft sidecar as started by hand (without entrypoint.sh).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Sequence

__all__ = ["free_ports", "port_is_free", "signal_group", "kill_group",
           "engine_command", "sidecar_command"]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_ports(n: int, host: str = "127.0.0.1", handed_out: set[int] | None = None) -> list[int]:
    """n distinct ports the kernel handed out for port 0 on `host`.

    All sockets stay bound until every port is found (so the kernel cannot hand out one port
    twice in this call), then they are released. Callers that must never hand out a port twice
    keep a set of their own and pass it as `handed_out`: ports in it are skipped, and the ports
    returned are added to it.
    """
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(_family(host), socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in ports and (handed_out is None or port not in handed_out):
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    if handed_out is not None:
        handed_out.update(ports)
    return ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on host:port now (like the servers: SO_REUSEADDR)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def signal_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to process group `pgid`; a group that is gone (or not ours) is ignored."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to the process group led by `proc` (started with start_new_session=True).

    Nothing is sent once `proc` has been reaped: its pid, and so the group id, may belong
    to another process by now.
    """
    if proc.poll() is not None:
        return
    signal_group(proc.pid, sig)


def engine_command(python: str, http: int, app: int, side: int, db_path: str | os.PathLike,
                   http_host: str, extra: Sequence[str] = ()) -> list[str]:
    """``python -m storage_engine HTTP APP SIDE DB --http-host HOST [extra...]``."""
    return [python, "-m", "storage_engine", str(http), str(app), str(side), str(db_path),
            "--http-host", http_host, *extra]


def sidecar_command(python: str, node_id: str, raft: int, side: int, app_addr: str, mgmt: int,
                    data_dir: str | os.PathLike, advertise: str, bind_host: str,
                    bootstrap: bool = False, join: str | None = None,
                    extra: Sequence[str] = ()) -> list[str]:
    """``python -m raft_sidecar`` for one node: `side` is its RaftNode gRPC port, `app_addr`
    the engine's StateMachine address, `join` a member's HOST:MGMT (-join), `extra` goes last."""
    cmd = [python, "-m", "raft_sidecar", "-id", node_id, "-raft", str(raft), "-srv", str(side),
           "-app", app_addr, "-mgmt", str(mgmt), "-data", str(data_dir),
           "-advertise", advertise, "--bind-host", bind_host]
    if bootstrap:
        cmd.append("-bootstrap")
    if join:
        cmd += ["-join", join]
    return cmd + list(extra)
