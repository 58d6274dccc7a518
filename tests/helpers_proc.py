"""Process and network helpers for tests that start real processes on 127.0.0.1.

Free ports, polling with deadlines (never fixed sleeps), small HTTP calls without proxies,
the client API's msgpack writes, and process groups: every group started through
:class:`ProcessGroups` is SIGKILLed at teardown, and as a last resort at interpreter exit.
Linux only where it reads /proc (group membership, command lines).
"""
from __future__ import annotations

import atexit
import os
import random
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import msgpack

from raftkv.procs import free_ports as _free_ports
from raftkv.procs import port_is_free, signal_group

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- ports ----------------------------------------------------------------------------------------

_handed_out: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n distinct ports the kernel handed out for port 0 (all bound at once, then released);
    never the same port twice in one test session."""
    return _free_ports(n, HOST, handed_out=_handed_out)


def free_port() -> int:
    return free_ports(1)[0]


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port_block(n: int, tries: int = 500) -> int:
    """First port of n consecutive free ports (for tools that take a base port). Picked
    below the kernel's ephemeral range, so outgoing connections do not grab them meanwhile."""
    lo_eph, hi_eph = _ephemeral_range()
    lo, hi = (20000, lo_eph - n) if lo_eph - n > 20000 else (hi_eph + 1, 65535 - n)
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(lo, hi)
        block = range(base, base + n)
        if any(p in _handed_out for p in block):
            continue
        if all(port_is_free(p) for p in block):
            _handed_out.update(block)
            return base
    raise RuntimeError(f"no block of {n} free consecutive ports found")


# -- polling --------------------------------------------------------------------------------------

class PollAbort(AssertionError):
    """Raised by a polled predicate to end wait_for at once (a definite failure, not "not yet")."""


class ProcessExitedError(PollAbort):
    """A process a poll depends on has exited."""


def wait_for(pred: Callable[[], object], timeout: float, *, interval: float = 0.1,
             what: str = "condition", details: Callable[[], str] | None = None):
    """Poll pred() until it returns something truthy and return that. Exceptions count as
    "not yet", except PollAbort, which ends the wait. On timeout raise TimeoutError with the last value/error and details()."""
    deadline = time.monotonic() + timeout
    last_val: object = None
    last_exc: BaseException | None = None
    while True:
        try:
            last_val = pred()
            if last_val:
                return last_val
        except PollAbort:
            raise
        except Exception as exc:  # noqa: BLE001 - polling through restarts
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = ""
            if details is not None:
                try:
                    extra = "\n" + details()
                except Exception as exc:  # noqa: BLE001
                    extra = f"\n(details failed: {exc!r})"
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}; last value "
                               f"{last_val!r}, last error {last_exc!r}{extra}")
        time.sleep(interval)


# -- HTTP -----------------------------------------------------------------------------------------

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for loopback


def http_request(method: str, url: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body). HTTP error statuses are returned, not raised; connection errors raise."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with _opener.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_get(url: str, timeout: float = 5.0, **params: str) -> tuple[int, bytes]:
    if params:
        url = f"{url}?{urllib.parse.urlencode(params)}"
    return http_request("GET", url, timeout=timeout)


def http_status(url: str, timeout: float = 2.0) -> int:
    """Status of a GET, 0 when nothing answered."""
    try:
        return http_request("GET", url, timeout=timeout)[0]
    except OSError:
        return 0


def wait_http(url: str, timeout: float = 60.0, expect: int = 200,
              procs: Sequence[subprocess.Popen] = (), logs: Sequence[Path] = ()) -> None:
    """Poll url until it answers `expect`. Fails at once when one of procs has exited,
    with the tails of logs in the message."""
    def check() -> bool:
        for p in procs:
            if p.poll() is not None:
                raise ProcessExitedError(f"process {p.args!r} exited with {p.returncode} while "
                                         f"waiting for {url}\n{log_tails(logs)}")
        return http_status(url) == expect
    wait_for(check, timeout, interval=0.2, what=f"{url} -> {expect}", details=lambda: log_tails(logs))


def put(http_url: str, key: str, value: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """SET through the client API: POST /insert-val with a msgpack body."""
    body = msgpack.packb({"op": "SET", "key": key, "value": value})
    return http_request("POST", f"{http_url}/insert-val", body,
                        {"Content-Type": "application/msgpack"}, timeout)


def get(http_url: str, key: str, consistency: str | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    params = {"key": key}
    if consistency:
        params["consistency"] = consistency
    return http_get(f"{http_url}/get-val", timeout=timeout, **params)


def put_ok(http_url: str, key: str, value: str, timeout: float = 20.0) -> None:
    """put() until it answers 200 `ok`; 503 (no leader yet) is retried, anything else fails."""
    last: tuple[int, bytes] | None = None

    def attempt() -> bool:
        nonlocal last
        last = put(http_url, key, value)
        if last[0] == 503:
            return False
        if last != (200, b"ok"):
            raise PollAbort(f"write {key!r} via {http_url}: {last!r}")
        return True
    wait_for(attempt, timeout, interval=0.2, what=f"write of {key!r} via {http_url}",
             details=lambda: f"last answer {last!r}")


# -- processes -------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
    return data[data.rindex(")") + 2:].split()


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def is_running(pid: int) -> bool:
    """Exists and is not a zombie."""
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def group_pids(pgid: int) -> list[int]:
    """Running (non-zombie) processes of process group pgid."""
    out = []
    for pid in _all_pids():
        f = _stat_fields(pid)
        if f is not None and f[0] not in ("Z", "X") and int(f[2]) == pgid:
            out.append(pid)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_matching(substring: str) -> list[int]:
    """Running processes whose command line contains substring (a pgrep -f that skips
    zombies and this process)."""
    me = os.getpid()
    return [pid for pid in _all_pids() if pid != me and is_running(pid) and substring in cmdline(pid)]


def wait_pids_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of pids runs; returns those still running at the deadline."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if is_running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def terminate_group(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM the group led by proc, SIGKILL it after `grace` s; returns proc's exit status."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    signal_group(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None


def log_tails(paths: Iterable[Path], lines: int = 40) -> str:
    out = []
    for p in paths:
        try:
            text = Path(p).read_text(errors="replace").splitlines()[-lines:]
        except OSError as e:
            text = [f"(cannot read: {e})"]
        out.append(f"--- {p} (last {lines} lines) ---")
        out.extend(text)
    return "\n".join(out)


_registry: set[subprocess.Popen] = set()


def _kill_registered() -> None:
    for proc in list(_registry):
        signal_group(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _registry.discard(proc)


atexit.register(_kill_registered)


class ProcessGroups:
    """Starts commands each in a new session (own process group) and kills all of them.

    Use as a context manager or call kill_all() in a fixture's finally block. Groups are
    SIGKILLed as a whole, so the children of a killed script go too.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
              log_path: Path | None = None, cwd: Path | str | None = None,
              stdout=None, text: bool = False) -> subprocess.Popen:
        out = stdout
        log = None
        if log_path is not None:
            log = open(log_path, "ab")
            out = log
        try:
            proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None,
                                    cwd=str(cwd) if cwd else None, stdin=subprocess.DEVNULL,
                                    stdout=out if out is not None else subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT, start_new_session=True, text=text)
        finally:
            if log is not None:
                log.close()
        self.procs.append(proc)
        _registry.add(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            signal_group(proc.pid)  # the group outlives its leader while children remain
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _registry.discard(proc)
        for proc in self.procs:
            left = wait_pids_gone(group_pids(proc.pid), 10)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> "ProcessGroups":
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus the repo root on PYTHONPATH (the packages need not be installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env
