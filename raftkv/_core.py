"""Node choice, retries and request identity, without I/O (shared by Client and AsyncClient).

An operation is a generator (:meth:`Core.call`) that yields what it needs done: a
:class:`Request` to send or a :class:`Sleep`; the client's transport does it and sends back an
:class:`Answer` or a :class:`Failure`. The generator returns the successful Answer or raises
the typed error. So the retry rules exist once, and the unit tests drive them with scripted
answers instead of servers.

Retry rules (why a retry can never apply a write twice): every write carries this client's
id, a sequence number that is the same in all of its attempts, and the floor = the lowest
sequence number still in flight in this client. The engines admit a (client, seq) once at
apply time, through any node, and answer a retry of an applied one with the first outcome.
So a write is retried on 503 (no leader, no quorum, outcome unknown), 429, 500 and any
connection failure, through the other nodes, until the retry budget (`retry_for`) runs out.
If one of its attempts may have reached Raft (a connection lost after sending, a timeout, an
"outcome unknown" answer) and no later attempt got a definite answer, the caller gets
OutcomeUnknown, never a plain failure.
"""
from __future__ import annotations

import itertools
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Generator, Mapping, Sequence, Union
from urllib.parse import urlsplit

from ._errors import (BadRequest, InternalError, OutcomeUnknown, Overloaded, ProtocolError,
                      RaftKVError, Unavailable)
from ._wire import MSGPACK, check_consistency, error_from_answer, node_status
from ._types import NodeStatus

DEFAULT_TIMEOUT = 10.0  # one attempt; above the engine's 5 s propose/read timeouts
DEFAULT_RETRY_FOR = 20.0  # a leader election here takes 1-3 s; a restart up to ~10 s
DEFAULT_MGMT_TIMEOUT = 3.0  # /status
# /join and /leave answer once the membership change is committed; the sidecar waits up to 15 s
# for that (and a leaving leader first hands leadership over).
MEMBERSHIP_TIMEOUT = 35.0
LEADER_REFRESH_INTERVAL = 0.5  # at most one /status round per this many seconds
DOWN_FOR = 1.0  # a node that refused a connection goes to the back of the line for this long
# When every node keeps refusing connections (nothing listens: the cluster is down, or the
# URLs are wrong), an operation gives up after this long instead of the whole retry_for.
DEFAULT_DOWN_GRACE = 3.0

READ, WRITE, MGMT = "read", "write", "mgmt"


@dataclass(frozen=True)
class ClientOptions:
    """Settings of one client (sync or async)."""

    timeout: float = DEFAULT_TIMEOUT
    retry_for: float = DEFAULT_RETRY_FOR
    consistency: str = "linearizable"
    token: str | None = None  # client token: Authorization: Bearer on /v1
    cluster_token: str | None = None  # management token for join/leave
    mgmt_timeout: float = DEFAULT_MGMT_TIMEOUT
    page_size: int = 1000
    down_grace: float = DEFAULT_DOWN_GRACE

    def __post_init__(self) -> None:
        check_consistency(self.consistency)
        if self.timeout <= 0 or self.retry_for < 0 or self.mgmt_timeout <= 0:
            raise ValueError("timeout and mgmt_timeout must be > 0, retry_for >= 0")
        if not 1 <= self.page_size <= 10000:
            raise ValueError("page_size must be 1-10000")


# -- what the generator asks for, and what it gets back ---------------------------------------

@dataclass
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    timeout: float
    node: str  # base URL of the node
    stream: bool = False  # 2xx answers: hand the body over unread (backup)


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    node: str
    stream: Any = None  # transport object with the unread body when Request.stream


@dataclass
class Failure:
    """No HTTP answer. `sent` False: the connection was never made, so the server cannot have
    seen the request (a definite not-applied); True: it may have (ambiguous for a write)."""

    sent: bool
    detail: str


@dataclass
class Sleep:
    seconds: float


Step = Union[Request, Sleep]
Outcome = Union[Answer, Failure, None]


# -- request identity -------------------------------------------------------------------------------

class Identity:
    """This client's id and sequence numbers (see the module doc). Thread-safe."""

    def __init__(self, client_id: str | None = None) -> None:
        self.client_id = client_id or f"py-{uuid.uuid4().hex}"
        if not 1 <= len(self.client_id) <= 64 or not all(c.isalnum() or c in "-_" for c in self.client_id):
            raise ValueError("client id: 1-64 characters of A-Z a-z 0-9 - _")
        self._lock = threading.Lock()
        self._next = 1
        self._open: set[int] = set()

    def begin(self) -> int:
        with self._lock:
            seq = self._next
            self._next += 1
            self._open.add(seq)
            return seq

    def end(self, seq: int) -> None:
        with self._lock:
            self._open.discard(seq)

    def floor(self) -> int:
        """Lowest seq this client may still retry (the engines forget every seq below it)."""
        with self._lock:
            return min(self._open) if self._open else self._next

    def headers(self, seq: int) -> dict[str, str]:
        return {"X-RaftKV-Client": self.client_id, "X-RaftKV-Seq": str(seq),
                "X-RaftKV-Floor": str(self.floor())}


# -- URLs ------------------------------------------------------------------------------------------------

def normalize_url(url: str) -> str:
    """'host:port', 'http://host:port/' or a bare port -> 'http://host:port'."""
    u = url.strip().rstrip("/")
    if not u:
        raise ValueError("empty node URL")
    if u.isdigit():
        u = f"127.0.0.1:{u}"
    if "://" not in u:
        u = "http://" + u
    parts = urlsplit(u)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http URL: {url!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"a node URL is scheme://host:port, not {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


def netloc(url: str) -> str:
    return urlsplit(url).netloc


# -- the core ----------------------------------------------------------------------------------------------

class Core:
    """State shared by all operations of one client: nodes, leader hint, identity."""

    def __init__(self, urls: Sequence[str] | str, mgmt_urls: Sequence[str] | str | None = None,
                 options: ClientOptions | None = None, client_id: str | None = None) -> None:
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if isinstance(mgmt_urls, str):
            mgmt_urls = [u for u in mgmt_urls.split(",") if u.strip()]
        self.urls = [normalize_url(u) for u in urls]
        if not self.urls:
            raise ValueError("at least one node URL is needed")
        self.mgmt_urls = [normalize_url(u) for u in (mgmt_urls or [])]
        self.options = options or ClientOptions()
        self.identity = Identity(client_id)
        self._rr = itertools.count(random.randrange(len(self.urls)))
        self._lock = threading.Lock()
        self._leader: int | None = None  # index into urls
        self._sticky = 0  # last node a write succeeded on (no management URLs)
        self._leader_checked = 0.0
        self._down_until = [0.0] * len(self.urls)
        # Counters for tests and diagnostics (Client.stats()).
        self.stats = {"operations": 0, "attempts": 0, "retries": 0, "retries_after_ambiguous": 0}

    # -- node order ------------------------------------------------------------------------------
    def _paired(self) -> bool:
        """mgmt_urls[i] is the management API of the node serving urls[i]."""
        return len(self.mgmt_urls) == len(self.urls)

    def leader_url(self) -> str | None:
        i = self._leader
        return None if i is None else self.urls[i]

    def _order(self, kind: str) -> list[int]:
        n = len(self.urls)
        if kind == WRITE:
            first = self._leader if self._leader is not None else self._sticky
        else:
            first = next(self._rr) % n
        order = [(first + k) % n for k in range(n)]
        now = time.monotonic()
        up = [i for i in order if self._down_until[i] <= now]
        down = [i for i in order if self._down_until[i] > now]
        return up + down

    def _note_failure(self, idx: int, connect_failed: bool) -> None:
        with self._lock:
            if connect_failed:
                self._down_until[idx] = time.monotonic() + DOWN_FOR
            if self._leader == idx:
                self._leader = None
                self._leader_checked = 0.0

    def _note_write_ok(self, idx: int) -> None:
        with self._lock:
            self._sticky = idx
            self._down_until[idx] = 0.0

    # -- leader discovery ----------------------------------------------------------------------------
    def _leader_stale(self) -> bool:
        return bool(self.mgmt_urls) and self._leader is None and \
            time.monotonic() - self._leader_checked >= LEADER_REFRESH_INTERVAL

    def _leader_index(self, asked: int, st: NodeStatus) -> int | None:
        if not self._paired():
            return None
        if st.is_leader:
            return asked
        if not st.leader_id:
            return None
        for m in st.members:
            if m.id == st.leader_id and m.mgmt:
                for i, u in enumerate(self.mgmt_urls):
                    if netloc(u) == m.mgmt:
                        return i
        return None

    def refresh_leader(self) -> Generator[Step, Outcome, None]:
        """Ask the management APIs who leads (one answer with a leader is enough)."""
        self._leader_checked = time.monotonic()
        start = next(self._rr)
        for k in range(len(self.mgmt_urls)):
            i = (start + k) % len(self.mgmt_urls)
            base = self.mgmt_urls[i]
            out = yield Request("GET", base + "/status", {"Accept": "application/json"}, None,
                                min(self.options.mgmt_timeout, self.options.timeout), base)
            if not isinstance(out, Answer) or out.status != 200:
                continue
            try:
                st = node_status(base, json.loads(out.body))
            except (ValueError, AttributeError):
                continue
            idx = self._leader_index(i, st)
            if idx is not None:
                with self._lock:
                    self._leader = idx
                return

    # -- one operation ----------------------------------------------------------------------------------
    def _headers(self, kind: str, has_body: bool, seq: int | None) -> dict[str, str]:
        h: dict[str, str] = {}
        if kind == MGMT:
            h["Accept"] = "application/json"
            if self.options.cluster_token:
                h["Authorization"] = f"Bearer {self.options.cluster_token}"
            return h
        h["Accept"] = MSGPACK
        if has_body:
            h["Content-Type"] = MSGPACK
        if self.options.token:
            h["Authorization"] = f"Bearer {self.options.token}"
        if seq is not None:
            h.update(self.identity.headers(seq))
        return h

    @staticmethod
    def _retryable(err: RaftKVError, kind: str) -> bool:
        if isinstance(err, (Unavailable, Overloaded, OutcomeUnknown)):
            return True
        # A 500 on a write may come after the proposal left: retrying under the same identity
        # turns it into a definite answer. On a read it is just an error.
        return isinstance(err, InternalError) and kind == WRITE

    def call(self, method: str, path: str, body: bytes | None = None, *, kind: str = READ,
             stream: bool = False) -> Generator[Step, Outcome, Answer]:
        """One operation with retries (see the module doc); returns the 2xx Answer."""
        bases = self.mgmt_urls if kind == MGMT else self.urls
        if not bases:
            raise BadRequest("no management URLs are known: pass mgmt_urls (or use cluster.json)")
        seq = self.identity.begin() if kind == WRITE else None
        self._count("operations")
        try:
            opt = self.options
            deadline = time.monotonic() + opt.retry_for
            ambiguous: RaftKVError | None = None
            last: RaftKVError | None = None
            if kind == WRITE and self._leader_stale():
                yield from self.refresh_leader()
            order = list(range(len(bases))) if kind == MGMT else self._order(kind)
            attempt = 0
            rounds = 0
            refused_since: float | None = None  # every attempt since then was refused
            refused_count = 0
            while True:
                idx = order[attempt % len(order)]
                base = bases[idx]
                out = yield Request(method, base + path, self._headers(kind, body is not None, seq), body,
                                    MEMBERSHIP_TIMEOUT if kind == MGMT else opt.timeout, base, stream)
                attempt += 1
                self._count("attempts")
                quick = False
                amb_now = False  # this attempt may have been applied
                if isinstance(out, Failure) and not out.sent:
                    if refused_since is None:
                        refused_since, refused_count = time.monotonic(), 0
                    refused_count += 1
                else:
                    refused_since = None
                if isinstance(out, Failure):
                    if kind != MGMT:
                        self._note_failure(idx, connect_failed=not out.sent)
                    err: RaftKVError = Unavailable(f"{base}: {out.detail}", code="connection", node=base)
                    if kind == WRITE and out.sent:
                        amb_now = True
                        ambiguous = OutcomeUnknown(
                            f"{base}: {out.detail} after the request was sent; it may have been applied",
                            node=base)
                    quick = not out.sent
                elif isinstance(out, Answer):
                    if 200 <= out.status < 300:
                        if kind == WRITE:
                            self._note_write_ok(idx)
                        return out
                    err = error_from_answer(out.status, out.headers, out.body, base)
                    if not self._retryable(err, kind):
                        raise err
                    if kind == WRITE and isinstance(err, (OutcomeUnknown, InternalError)):
                        amb_now = True
                        ambiguous = err
                    if kind != MGMT and isinstance(err, Unavailable):
                        self._note_failure(idx, connect_failed=False)
                else:
                    raise ProtocolError(f"transport returned {out!r}")
                last = err
                if attempt % len(order) == 0:
                    rounds += 1
                    quick = False
                delay = 0.0 if quick else min(0.05 * (2 ** min(rounds, 5)), 1.0) * random.uniform(0.5, 1.0)
                if isinstance(err, Overloaded) and err.retry_after:
                    delay = max(delay, min(err.retry_after, 2.0))
                if time.monotonic() + delay >= deadline:
                    break
                if refused_since is not None and refused_count >= len(order) and \
                        time.monotonic() - refused_since >= opt.down_grace:
                    break
                self._count("retries")
                if amb_now:  # this retry is safe only thanks to the engines' dedup
                    self._count("retries_after_ambiguous")
                if delay:
                    yield Sleep(delay)
                if kind == WRITE and self._leader_stale():
                    yield from self.refresh_leader()
                    if self._leader is not None:
                        order = self._order(kind)
                        attempt = 0
            assert last is not None
            if ambiguous is not None:
                raise OutcomeUnknown(
                    f"outcome unknown: {ambiguous.message}; no definite answer after retrying for "
                    f"{opt.retry_for:g}s (last error: {last.message})",
                    node=ambiguous.node, status=ambiguous.status)
            raise last
        finally:
            if seq is not None:
                self.identity.end(seq)

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    # -- management fan-out ----------------------------------------------------------------------------------
    def status_requests(self) -> list[Request]:
        return [Request("GET", base + "/status", {"Accept": "application/json"}, None,
                        self.options.mgmt_timeout, base) for base in self.mgmt_urls]

    @staticmethod
    def status_from(req: Request, out: Outcome) -> NodeStatus:
        if isinstance(out, Failure):
            return NodeStatus(mgmt_url=req.node, ok=False, error=out.detail)
        assert isinstance(out, Answer)
        if out.status != 200:
            return NodeStatus(mgmt_url=req.node, ok=False,
                              error=f"HTTP {out.status}: {out.body[:200].decode('utf-8', 'replace')}")
        try:
            return node_status(req.node, json.loads(out.body))
        except (ValueError, AttributeError) as exc:
            return NodeStatus(mgmt_url=req.node, ok=False, error=f"bad /status answer: {exc}")

    def learn_leader(self, statuses: Sequence[NodeStatus]) -> None:
        """Use a status() round to update the leader hint for free."""
        for i, st in enumerate(statuses):
            if st.ok:
                idx = self._leader_index(i, st)
                if idx is not None:
                    with self._lock:
                        self._leader = idx
                        self._leader_checked = time.monotonic()
                    return


def run_sync(gen: Generator[Step, Outcome, Any], send) -> Any:
    """Drive an operation generator with a blocking transport: send(Request) -> Answer|Failure."""
    try:
        step = next(gen)
        while True:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                out: Outcome = None
            else:
                out = send(step)
            step = gen.send(out)
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()


async def run_async(gen: Generator[Step, Outcome, Any], send) -> Any:
    """Same with an asyncio transport: await send(Request) -> Answer|Failure."""
    import asyncio

    try:
        step = next(gen)
        while True:
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                out: Outcome = None
            else:
                out = await send(step)
            step = gen.send(out)
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()


__all__ = ["ClientOptions", "Core", "Request", "Answer", "Failure", "Sleep", "Identity",
           "normalize_url", "run_sync", "run_async", "READ", "WRITE", "MGMT"]
