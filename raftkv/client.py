"""RaftKV client library: :class:`Client` (blocking, urllib3) and :class:`AsyncClient` (asyncio,
aiohttp), both over the /v1 HTTP API with msgpack bodies.

    import raftkv
    with raftkv.Client(["http://127.0.0.1:8080", "http://127.0.0.1:8081"]) as kv:
        kv.put("greeting", "hello")
        kv.get("greeting").value                      # b"hello"
        kv.cas("counter", b"2", expect_version=1)     # raises CompareFailed if someone was first

Both classes share one core (raftkv/_core.py): leader discovery through the management API,
reads spread over the nodes, writes retried through other nodes under one request identity
so that a retry is never applied twice, and OutcomeUnknown when no attempt got a definite
answer. Errors are the typed exceptions of raftkv/_errors.py (re-exported here).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence

import urllib3

from . import _transfer, _wire
from ._core import (MGMT, READ, WRITE, Answer, ClientOptions, Core, Failure, Request, run_async,
                    run_sync)
from . import _CLIENT_NAMES
from ._endpoints import resolve as resolve_endpoints
from ._errors import (BadRange, BadRequest, CompareFailed, CurrentMeta, Forbidden, InternalError,
                      NotFound, OutcomeUnknown, Overloaded, ProtocolError, RaftKVError,
                      RestoreError, TooLarge, Unauthorized, Unavailable)
from ._types import (BackupInfo, Bytesish, DeleteOp, DeleteResult, KeyValue, Member, NodeStatus,
                     Page, PutOp, PutResult, RestoreInfo, TxnOp, TxnResult)

__all__ = sorted(_CLIENT_NAMES)  # the names `raftkv` exports lazily

Progress = Callable[[int, "int | None"], None]  # (done, total) for backup bytes / restore keys

CONNECT_TIMEOUT = 3.0
CHUNK = 256 * 1024
RESTORE_TXN_OPS = 500
RESTORE_TXN_BYTES = 512 * 1024  # stays well under the engines' 1 MiB + 64 KiB body limit
RESTORE_PARALLEL = 4
BACKUP_ATTEMPTS = 3

# urllib3 warns when more threads than `maxsize` share a pool; extra connections are fine.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _options(options: ClientOptions | None, **kw: Any) -> ClientOptions:
    if options is not None:
        if any(v is not None for v in kw.values()):
            raise TypeError("pass either options=ClientOptions(...) or keyword settings, not both")
        return options
    return ClientOptions(**{k: v for k, v in kw.items() if v is not None})


def _endpoints(urls: Sequence[str] | str | None, mgmt_urls: Sequence[str] | str | None,
               cluster_dir: str | os.PathLike | None) -> tuple[Sequence[str] | str, Sequence[str] | str | None]:
    """No URLs given: RAFTKV_NODES / RAFTKV_MGMT, cluster.json, or the default local cluster."""
    if urls is None:
        ep = resolve_endpoints(None, None if mgmt_urls is None else ",".join(
            [mgmt_urls] if isinstance(mgmt_urls, str) else mgmt_urls), cluster_dir)
        return ep.urls, ep.mgmt_urls
    if mgmt_urls is None and cluster_dir is not None:
        from ._endpoints import layout_endpoints
        layout = layout_endpoints(cluster_dir)
        if layout is not None:
            return urls, layout.mgmt_urls
    return urls, mgmt_urls


def _check_cas(expect_value: Any, expect_version: Any, expect_mod_revision: Any) -> None:
    if expect_value is None and expect_version is None and expect_mod_revision is None:
        raise ValueError("cas needs at least one of expect_value, expect_version, expect_mod_revision")


def _scan_limits(limit: int | None, page_size: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BadRange(f"limit must be a positive number of keys, not {limit!r}")
    if not 1 <= page_size <= 10000:
        raise BadRange(f"page_size must be 1-10000, not {page_size!r}")


class _Base:
    """Argument handling shared by both clients (no I/O)."""

    def __init__(self, urls: Sequence[str] | str | None = None, mgmt_urls: Sequence[str] | str | None = None,
                 *, token: str | None = None, cluster_token: str | None = None,
                 timeout: float | None = None, retry_for: float | None = None,
                 consistency: str | None = None, page_size: int | None = None,
                 mgmt_timeout: float | None = None, down_grace: float | None = None,
                 ca_file: str | None = None,
                 client_id: str | None = None, cluster_dir: str | os.PathLike | None = None,
                 options: ClientOptions | None = None) -> None:
        urls, mgmt_urls = _endpoints(urls, mgmt_urls, cluster_dir)
        opts = _options(options, token=token, cluster_token=cluster_token, timeout=timeout,
                        retry_for=retry_for, consistency=consistency, page_size=page_size,
                        mgmt_timeout=mgmt_timeout, down_grace=down_grace)
        self._core = Core(urls, mgmt_urls, opts, client_id)
        self._ca_file = ca_file

    @property
    def urls(self) -> list[str]:
        return list(self._core.urls)

    @property
    def mgmt_urls(self) -> list[str]:
        return list(self._core.mgmt_urls)

    @property
    def client_id(self) -> str:
        return self._core.identity.client_id

    @property
    def options(self) -> ClientOptions:
        return self._core.options

    def _consistency(self, consistency: str | None) -> str:
        return _wire.check_consistency(consistency) or self._core.options.consistency

    def _get_path(self, key: Bytesish, consistency: str | None) -> str:
        return _wire.kv_path(key) + _wire.query([("consistency", self._consistency(consistency))])

    def _range_path(self, start, end, prefix, n, after, keys_only, consistency) -> str:  # noqa: ANN001
        return _wire.range_query(start=start, end=end, prefix=prefix, limit=n, after=after,
                                 keys_only=keys_only, consistency=self._consistency(consistency))

    @staticmethod
    def members_from(statuses: list[NodeStatus]) -> list[Member]:
        """The membership in a status() round: as the leader sees it, else any answering node."""
        ok = [s for s in statuses if s.ok]
        if not ok:
            raise Unavailable("no management API answered: " + "; ".join(
                f"{s.mgmt_url}: {s.error}" for s in statuses) if statuses else "no management URLs are known")
        best = next((s for s in ok if s.is_leader), ok[0])
        return best.members

    def stats(self) -> dict[str, int]:
        """Counters since the client was made: operations, attempts, retries, and retries after
        an attempt that may have been applied (those rely on the engines' deduplication)."""
        with self._core._lock:
            return dict(self._core.stats)

    @staticmethod
    def _doc(a: Answer) -> dict[str, Any]:
        return _wire.doc_of(a.status, a.body, a.headers.get("content-type", ""), a.node)

    @staticmethod
    def _dup(a: Answer) -> bool:
        return a.headers.get("x-raftkv-duplicate") == "1"


# == blocking client =========================================================================================

class _SyncTransport:
    def __init__(self, ca_file: str | None, maxsize: int = 32) -> None:
        kw: dict[str, Any] = {"num_pools": 32, "maxsize": maxsize, "block": False, "retries": False}
        if ca_file:
            kw["ca_certs"] = ca_file
        self._pool = urllib3.PoolManager(**kw)

    def send(self, req: Request) -> Answer | Failure:
        try:
            r = self._pool.request(
                req.method, req.url, body=req.body, headers=req.headers, retries=False, redirect=False,
                timeout=urllib3.Timeout(connect=min(CONNECT_TIMEOUT, req.timeout), read=req.timeout),
                preload_content=not req.stream)
        except urllib3.exceptions.ConnectTimeoutError as exc:  # incl. refused, name resolution
            return Failure(False, _reason(exc))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Failure(True, _reason(exc))
        headers = {k.lower(): v for k, v in r.headers.items()}
        if req.stream:
            if 200 <= r.status < 300:
                return Answer(r.status, headers, b"", req.node, stream=r)
            try:
                body = r.read()
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                return Failure(True, _reason(exc))
            finally:
                r.release_conn()
            return Answer(r.status, headers, body, req.node)
        return Answer(r.status, headers, r.data, req.node)

    def close(self) -> None:
        self._pool.clear()


def _reason(exc: BaseException) -> str:
    """A short reason without urllib3's object reprs: 'connection refused', 'read timed out'."""
    text = str(exc)
    low = text.lower()
    for needle, short in (("refused", "connection refused"), ("timed out", "timed out"),
                          ("reset", "connection reset"), ("remote end closed", "connection closed by the node"),
                          ("aborted", "connection aborted"), ("name or service", "unknown host"),
                          ("no route", "no route to host")):
        if needle in low:
            return short
    return f"{type(exc).__name__}: {text}"[:200]


class Client(_Base):
    """Blocking client; safe to share between threads.

    urls: node client URLs ("http://host:8080", "host:8080"); None -> $RAFTKV_NODES, the
    cluster.json of `raftkv cluster up`, or 127.0.0.1:8080-8082. mgmt_urls: the same nodes'
    management URLs, in the same order (used to find the leader, for status/members/join/leave).
    token: client bearer token; cluster_token: for join/leave. timeout: seconds per attempt;
    retry_for: seconds an operation keeps retrying through the nodes; down_grace: seconds after
    which it gives up early when every node refuses connections (nothing is listening).
    """

    def __init__(self, urls: Sequence[str] | str | None = None, mgmt_urls: Sequence[str] | str | None = None,
                 **kw: Any) -> None:
        super().__init__(urls, mgmt_urls, **kw)
        self._http = _SyncTransport(self._ca_file)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, method: str, path: str, body: bytes | None = None, kind: str = READ,
             stream: bool = False) -> Answer:
        return run_sync(self._core.call(method, path, body, kind=kind, stream=stream), self._http.send)

    # -- keys ---------------------------------------------------------------------------------------------
    def get(self, key: Bytesish, *, consistency: str | None = None) -> KeyValue:
        """The key with its value and metadata; raises NotFound."""
        return _wire.key_value(self._doc(self._run("GET", self._get_path(key, consistency))))

    def get_value(self, key: Bytesish, default: bytes | None = None, *, consistency: str | None = None) -> bytes | None:
        try:
            return self.get(key, consistency=consistency).value
        except NotFound:
            return default

    def put(self, key: Bytesish, value: Bytesish, *, expect_value: Bytesish | None = None,
            expect_version: int | None = None, expect_mod_revision: int | None = None) -> PutResult:
        """Writes the key (conditionally when expect_* are given: raises CompareFailed).
        expect_version=0 means "only if the key does not exist"."""
        body = _wire.put_body(value, expect_value, expect_version, expect_mod_revision)
        a = self._run("PUT", _wire.kv_path(key), body, WRITE)
        return _wire.put_result(self._doc(a), self._dup(a))

    def cas(self, key: Bytesish, value: Bytesish, *, expect_value: Bytesish | None = None,
            expect_version: int | None = None, expect_mod_revision: int | None = None) -> PutResult:
        """Compare-and-set: put with at least one condition; raises CompareFailed (with the
        key's current metadata in .current) when a condition does not hold."""
        _check_cas(expect_value, expect_version, expect_mod_revision)
        return self.put(key, value, expect_value=expect_value, expect_version=expect_version,
                        expect_mod_revision=expect_mod_revision)

    def delete(self, key: Bytesish, *, expect_value: Bytesish | None = None,
               expect_version: int | None = None, expect_mod_revision: int | None = None) -> DeleteResult:
        """Deletes the key; .deleted is 0 when it did not exist. Conditions as for put."""
        body = _wire.delete_body(expect_value, expect_version, expect_mod_revision)
        a = self._run("DELETE", _wire.kv_path(key), body, WRITE)
        return _wire.delete_result(self._doc(a), self._dup(a))

    def txn(self, ops: Iterable[TxnOp | Mapping[str, Any]]) -> TxnResult:
        """All ops as one Raft entry, all or nothing. Raises CompareFailed (.failed = indices of
        the ops whose condition did not hold) and applies nothing when any condition fails."""
        body, _ = _wire.txn_body(ops)
        a = self._run("POST", "/v1/txn", body, WRITE)
        return _wire.txn_result(self._doc(a), self._dup(a))

    # -- ranges ----------------------------------------------------------------------------------------------
    def scan_pages(self, start: Bytesish | None = None, end: Bytesish | None = None, *,
                   prefix: Bytesish | None = None, limit: int | None = None, keys_only: bool = False,
                   page_size: int | None = None, consistency: str | None = None) -> Iterator[Page]:
        """Pages of keys in bytewise order from start (inclusive) to end (exclusive), or under
        prefix; at most `limit` keys in all. Each page is its own linearizable read."""
        size = page_size or self._core.options.page_size
        _scan_limits(limit, size)
        after: str | None = None
        left = limit
        while True:
            n = size if left is None else min(size, left)
            p = _wire.page(self._doc(self._run("GET", self._range_path(start, end, prefix, n, after, keys_only,
                                                                         consistency))))
            if left is not None:
                left -= len(p.kvs)
            yield p
            if not p.more or not p.next or (left is not None and left <= 0):
                return
            after = p.next

    def scan(self, start: Bytesish | None = None, end: Bytesish | None = None, **kw: Any) -> Iterator[KeyValue]:
        """Like scan_pages, one KeyValue at a time."""
        for p in self.scan_pages(start, end, **kw):
            yield from p.kvs

    def count(self, start: Bytesish | None = None, end: Bytesish | None = None, *,
              prefix: Bytesish | None = None, consistency: str | None = None) -> int:
        """Number of keys in the range (a keys-only scan)."""
        return sum(len(p.kvs) for p in self.scan_pages(start, end, prefix=prefix, keys_only=True,
                                                        page_size=10000, consistency=consistency))

    # -- backup / restore -----------------------------------------------------------------------------------
    def backup(self, path: str | os.PathLike, *, consistency: str | None = None,
               progress: Progress | None = None) -> BackupInfo:
        """Streams a consistent snapshot of the cluster into `path` (written to a temporary file,
        verified, fsync'd, then renamed). Raises BackupError if what arrived does not verify."""
        t0 = time.monotonic()
        q = "/v1/backup" + _wire.query([("consistency", self._consistency(consistency))])
        last: Exception | None = None
        for _ in range(BACKUP_ATTEMPTS):
            a = self._run("GET", q, stream=True)
            tmp = _transfer.partial_path(path)
            try:
                with open(tmp, "wb") as f:
                    done = 0
                    try:
                        for chunk in a.stream.stream(CHUNK, decode_content=True):
                            f.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(done, None)
                    except (urllib3.exceptions.HTTPError, OSError) as exc:
                        last = Unavailable(f"{a.node}: backup stream broke after {done} bytes: {_reason(exc)}",
                                           node=a.node)
                        continue
                    finally:
                        a.stream.release_conn()
                    _transfer.fsync(f)
                return _transfer.finish_backup(tmp, path, a.node, t0)
            finally:
                _transfer.remove_quietly(tmp)
        assert last is not None
        raise last

    def restore(self, path: str | os.PathLike, *, force: bool = False, txn_ops: int = RESTORE_TXN_OPS,
                parallel: int = RESTORE_PARALLEL, progress: Progress | None = None) -> RestoreInfo:
        """Writes every record of a backup file into the cluster (values, not revisions), as txns
        of at most `txn_ops` ops, each with its request identity. The whole file is verified
        first (BackupError: nothing written). Refuses a cluster holding any key unless force
        (then keys of the backup overwrite, other keys stay). Verifies the key count at the end."""
        t0 = time.monotonic()
        _transfer.check_txn_ops(txn_ops)
        total = _transfer.verify(path)
        before = 0 if not force else self.count()
        if not force:
            self._refuse_non_empty()
        txns = 0
        done = 0
        pending: deque[tuple[Future, int]] = deque()
        batches = _transfer.batches(path, txn_ops, RESTORE_TXN_BYTES)
        with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="raftkv-restore") as ex:
            try:
                for ops in batches:
                    if len(pending) >= max(1, parallel):
                        fut, n = pending.popleft()
                        fut.result()
                        done += n
                        if progress:
                            progress(done, total)
                    pending.append((ex.submit(self._restore_txn, ops), len(ops)))
                    txns += 1
                while pending:
                    fut, n = pending.popleft()
                    fut.result()
                    done += n
                    if progress:
                        progress(done, total)
            except BaseException:
                for fut, _ in pending:
                    fut.cancel()
                raise
            finally:
                batches.close()
        after = self.count()
        _transfer.check_count(total, before, after, force)
        return RestoreInfo(str(path), total, txns, after, time.monotonic() - t0)

    def _restore_txn(self, ops: list[dict[str, Any]]) -> None:
        for attempt in range(_transfer.RESTORE_TXN_ATTEMPTS):
            try:
                self.txn(ops)
                return
            except OutcomeUnknown:
                # Unconditional puts of the backup's values: sending them again (under a new
                # identity) can only write the same values.
                if attempt == _transfer.RESTORE_TXN_ATTEMPTS - 1:
                    raise

    def _refuse_non_empty(self) -> None:
        first = next(iter(self.scan_pages(keys_only=True, page_size=1, limit=1)), None)
        if first is not None and first.kvs:
            _transfer.refuse_non_empty(first.kvs[0].key)

    # -- management -------------------------------------------------------------------------------------------
    def status(self) -> list[NodeStatus]:
        """/status of every node's management API (unreachable ones with ok=False and the reason)."""
        reqs = self._core.status_requests()
        if not reqs:
            raise BadRequest("no management URLs are known: pass mgmt_urls (or use cluster.json)")
        with ThreadPoolExecutor(max_workers=len(reqs)) as ex:
            outs = list(ex.map(self._http.send, reqs))
        statuses = [Core.status_from(r, o) for r, o in zip(reqs, outs)]
        self._core.learn_leader(statuses)
        return statuses

    def members(self) -> list[Member]:
        """The Raft members as the leader (or any answering node) sees them."""
        return self.members_from(self.status())

    def join(self, node_id: str, raft_address: str, mgmt_address: str | None = None) -> dict[str, Any]:
        """Adds a member (idempotent). Normally a node started with -join does this itself."""
        a = self._run("POST", "/join" + _wire.query([("peerID", node_id), ("peerAddress", raft_address),
                                                      ("mgmtAddress", mgmt_address)]), None, MGMT)
        return _transfer.json_doc(a)

    def leave(self, node_id: str) -> dict[str, Any]:
        """Removes a member (idempotent: "not a member" when it already left)."""
        a = self._run("POST", "/leave" + _wire.query([("peerID", node_id)]), None, MGMT)
        return _transfer.json_doc(a)


# == asyncio client ===============================================================================================

class _AsyncTransport:
    def __init__(self, ca_file: str | None, limit: int = 64) -> None:
        self._ca_file = ca_file
        self._limit = limit
        self._session: Any = None

    def _get_session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            ssl: Any = None
            if self._ca_file:
                import ssl as ssl_mod
                ssl = ssl_mod.create_default_context(cafile=self._ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, ssl=ssl if ssl is not None else True),
                trust_env=False, auto_decompress=True)
        return self._session

    async def send(self, req: Request) -> Answer | Failure:
        import aiohttp

        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=None if req.stream else req.timeout,
                                        sock_connect=min(CONNECT_TIMEOUT, req.timeout), sock_read=req.timeout)
        not_sent: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,)
        if hasattr(aiohttp, "ConnectionTimeoutError"):
            not_sent += (aiohttp.ConnectionTimeoutError,)
        try:
            resp = await session.request(req.method, req.url, data=req.body, headers=req.headers,
                                         timeout=timeout, allow_redirects=False)
        except not_sent as exc:
            return Failure(False, _reason(exc))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return Failure(True, _reason(exc) if str(exc) else type(exc).__name__)
        headers = {k.lower(): v for k, v in resp.headers.items()}
        if req.stream and 200 <= resp.status < 300:
            return Answer(resp.status, headers, b"", req.node, stream=resp)
        try:
            body = await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return Failure(True, _reason(exc) if str(exc) else type(exc).__name__)
        finally:
            resp.release()
        return Answer(resp.status, headers, body, req.node)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


def _forget_if_ok(tasks: set[asyncio.Task]) -> Callable[[asyncio.Task], None]:
    def done(t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is None:
            tasks.discard(t)
    return done


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client` (same arguments, same errors, methods are coroutines;
    scan/scan_pages are async iterators). Use `async with AsyncClient(...) as kv:` or call
    `await kv.close()`."""

    def __init__(self, urls: Sequence[str] | str | None = None, mgmt_urls: Sequence[str] | str | None = None,
                 **kw: Any) -> None:
        super().__init__(urls, mgmt_urls, **kw)
        self._http = _AsyncTransport(self._ca_file)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def _run(self, method: str, path: str, body: bytes | None = None, kind: str = READ,
                   stream: bool = False) -> Answer:
        return await run_async(self._core.call(method, path, body, kind=kind, stream=stream), self._http.send)

    # -- keys -------------------------------------------------------------------------------------------------
    async def get(self, key: Bytesish, *, consistency: str | None = None) -> KeyValue:
        return _wire.key_value(self._doc(await self._run("GET", self._get_path(key, consistency))))

    async def get_value(self, key: Bytesish, default: bytes | None = None, *,
                        consistency: str | None = None) -> bytes | None:
        try:
            return (await self.get(key, consistency=consistency)).value
        except NotFound:
            return default

    async def put(self, key: Bytesish, value: Bytesish, *, expect_value: Bytesish | None = None,
                  expect_version: int | None = None, expect_mod_revision: int | None = None) -> PutResult:
        body = _wire.put_body(value, expect_value, expect_version, expect_mod_revision)
        a = await self._run("PUT", _wire.kv_path(key), body, WRITE)
        return _wire.put_result(self._doc(a), self._dup(a))

    async def cas(self, key: Bytesish, value: Bytesish, *, expect_value: Bytesish | None = None,
                  expect_version: int | None = None, expect_mod_revision: int | None = None) -> PutResult:
        _check_cas(expect_value, expect_version, expect_mod_revision)
        return await self.put(key, value, expect_value=expect_value, expect_version=expect_version,
                              expect_mod_revision=expect_mod_revision)

    async def delete(self, key: Bytesish, *, expect_value: Bytesish | None = None,
                     expect_version: int | None = None, expect_mod_revision: int | None = None) -> DeleteResult:
        body = _wire.delete_body(expect_value, expect_version, expect_mod_revision)
        a = await self._run("DELETE", _wire.kv_path(key), body, WRITE)
        return _wire.delete_result(self._doc(a), self._dup(a))

    async def txn(self, ops: Iterable[TxnOp | Mapping[str, Any]]) -> TxnResult:
        body, _ = _wire.txn_body(ops)
        a = await self._run("POST", "/v1/txn", body, WRITE)
        return _wire.txn_result(self._doc(a), self._dup(a))

    # -- ranges -------------------------------------------------------------------------------------------------
    async def scan_pages(self, start: Bytesish | None = None, end: Bytesish | None = None, *,
                         prefix: Bytesish | None = None, limit: int | None = None, keys_only: bool = False,
                         page_size: int | None = None, consistency: str | None = None) -> AsyncIterator[Page]:
        size = page_size or self._core.options.page_size
        _scan_limits(limit, size)
        after: str | None = None
        left = limit
        while True:
            n = size if left is None else min(size, left)
            a = await self._run("GET", self._range_path(start, end, prefix, n, after, keys_only, consistency))
            p = _wire.page(self._doc(a))
            if left is not None:
                left -= len(p.kvs)
            yield p
            if not p.more or not p.next or (left is not None and left <= 0):
                return
            after = p.next

    async def scan(self, start: Bytesish | None = None, end: Bytesish | None = None,
                   **kw: Any) -> AsyncIterator[KeyValue]:
        async for p in self.scan_pages(start, end, **kw):
            for kv in p.kvs:
                yield kv

    async def count(self, start: Bytesish | None = None, end: Bytesish | None = None, *,
                    prefix: Bytesish | None = None, consistency: str | None = None) -> int:
        n = 0
        async for p in self.scan_pages(start, end, prefix=prefix, keys_only=True, page_size=10000,
                                       consistency=consistency):
            n += len(p.kvs)
        return n

    # -- backup / restore ---------------------------------------------------------------------------------------
    async def backup(self, path: str | os.PathLike, *, consistency: str | None = None,
                     progress: Progress | None = None) -> BackupInfo:
        import aiohttp

        t0 = time.monotonic()
        q = "/v1/backup" + _wire.query([("consistency", self._consistency(consistency))])
        last: Exception | None = None
        for _ in range(BACKUP_ATTEMPTS):
            a = await self._run("GET", q, stream=True)
            tmp = _transfer.partial_path(path)
            try:
                with open(tmp, "wb") as f:
                    done = 0
                    try:
                        async for chunk in a.stream.content.iter_chunked(CHUNK):
                            f.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(done, None)
                    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                        last = Unavailable(f"{a.node}: backup stream broke after {done} bytes: {_reason(exc)}",
                                           node=a.node)
                        continue
                    finally:
                        a.stream.release()
                    _transfer.fsync(f)
                return await asyncio.to_thread(_transfer.finish_backup, tmp, path, a.node, t0)
            finally:
                _transfer.remove_quietly(tmp)
        assert last is not None
        raise last

    async def restore(self, path: str | os.PathLike, *, force: bool = False, txn_ops: int = RESTORE_TXN_OPS,
                      parallel: int = RESTORE_PARALLEL, progress: Progress | None = None) -> RestoreInfo:
        t0 = time.monotonic()
        _transfer.check_txn_ops(txn_ops)
        total = await asyncio.to_thread(_transfer.verify, path)
        before = await self.count() if force else 0
        if not force:
            async for p in self.scan_pages(keys_only=True, page_size=1, limit=1):
                if p.kvs:
                    _transfer.refuse_non_empty(p.kvs[0].key)
        batches = _transfer.batches(path, txn_ops, RESTORE_TXN_BYTES)
        sem = asyncio.Semaphore(max(1, parallel))
        txns = 0
        done = 0
        tasks: set[asyncio.Task] = set()

        async def one(ops: list[dict[str, Any]]) -> None:
            nonlocal done
            try:
                for attempt in range(_transfer.RESTORE_TXN_ATTEMPTS):
                    try:
                        await self.txn(ops)
                        break
                    except OutcomeUnknown:
                        if attempt == _transfer.RESTORE_TXN_ATTEMPTS - 1:
                            raise
                done += len(ops)
                if progress:
                    progress(done, total)
            finally:
                sem.release()

        try:
            while True:
                ops = await asyncio.to_thread(next, batches, None)
                if ops is None:
                    break
                await sem.acquire()
                failed = [t for t in tasks if t.done()]  # finished tasks that succeeded left the set
                if failed:
                    sem.release()
                    await failed[0]  # raises its error
                task = asyncio.create_task(one(ops))
                tasks.add(task)
                task.add_done_callback(_forget_if_ok(tasks))
                txns += 1
            if tasks:
                await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            batches.close()  # closes the backup file also when the restore failed
        after = await self.count()
        _transfer.check_count(total, before, after, force)
        return RestoreInfo(str(path), total, txns, after, time.monotonic() - t0)

    # -- management ------------------------------------------------------------------------------------------------
    async def status(self) -> list[NodeStatus]:
        reqs = self._core.status_requests()
        if not reqs:
            raise BadRequest("no management URLs are known: pass mgmt_urls (or use cluster.json)")
        outs = await asyncio.gather(*(self._http.send(r) for r in reqs))
        statuses = [Core.status_from(r, o) for r, o in zip(reqs, outs)]
        self._core.learn_leader(statuses)
        return statuses

    async def members(self) -> list[Member]:
        return self.members_from(await self.status())

    async def join(self, node_id: str, raft_address: str, mgmt_address: str | None = None) -> dict[str, Any]:
        a = await self._run("POST", "/join" + _wire.query([("peerID", node_id), ("peerAddress", raft_address),
                                                            ("mgmtAddress", mgmt_address)]), None, MGMT)
        return _transfer.json_doc(a)

    async def leave(self, node_id: str) -> dict[str, Any]:
        a = await self._run("POST", "/leave" + _wire.query([("peerID", node_id)]), None, MGMT)
        return _transfer.json_doc(a)
