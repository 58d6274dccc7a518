"""The sidecar reaches an engine that comes up after it, promptly.

Runs the sidecar's side in a fresh interpreter with the sidecar's gRPC settings
(raftkv/grpc_env.py), which must be in place before grpc is imported, against a real
engine process started at the same moment (the way the launcher and entrypoint start
them). Applier.connect must reach the engine within a second of its gRPC port
accepting connections; when its calls failed at once instead of waiting for the
channel to connect, it took about 5 s, until gRPC's connect attempt timed out.
"""
from __future__ import annotations

import subprocess
import sys

from raftkv.procs import free_ports

_SCRIPT = r"""
from raftkv.grpc_env import use_iomgr_endpoints
use_iomgr_endpoints()
import socket, subprocess, sys, tempfile, threading, time
from raft_sidecar.applier import Applier

http, app, side = (int(p) for p in sys.argv[1:4])
data = tempfile.mkdtemp(prefix="raftkv-connect-")
engine = subprocess.Popen([sys.executable, "-m", "storage_engine", str(http), str(app), str(side),
                           data + "/kv.db", "--http-host", "127.0.0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
listening = []

def watch_port():
    while not listening:
        try:
            socket.create_connection(("127.0.0.1", app), timeout=0.05).close()
            listening.append(time.monotonic())
        except OSError:
            time.sleep(0.01)

try:
    applier = Applier(f"127.0.0.1:{app}", fail_timeout=30.0)
    threading.Thread(target=watch_port, daemon=True).start()
    index = applier.connect(time.monotonic() + 30)
    connected = time.monotonic()
    print("connected", index, round(connected - listening[0], 2) if listening else "unknown")
finally:
    engine.kill()
    engine.wait()
"""


def test_sidecar_reaches_an_engine_that_starts_after_it() -> None:
    ports = [str(p) for p in free_ports(3, "127.0.0.1")]
    out = subprocess.run([sys.executable, "-c", _SCRIPT, *ports], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    word, index, after_listen = out.stdout.split()[-3:]
    assert (word, index) == ("connected", "0"), out.stdout
    assert float(after_listen) < 1.0, f"reached the engine {after_listen} s after its port accepted connections"
