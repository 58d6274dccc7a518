"""Versioned client API under /v1/ (docs/api.md): binary-safe keys, CAS, txns, ranges, backup.

The HTTP layer only: bodies are decoded by `formats`, validated by `v1_requests`,
writes become one `Txn` for `raft.submit` (one Raft entry, all or nothing), reads
wait for the barrier the consistency level asks for and then read the store.
Every failure answers the /v1 error document; nothing malformed is proposed.
"""
from __future__ import annotations

import logging
import socket
from typing import Any, Awaitable, Callable
from urllib.parse import unquote_to_bytes

from aiohttp import web

from raftkv import backup as backup_format
from raftkv.pb import consensus_pb2 as pb

from . import formats, v1_requests
from .config import EngineConfig
from .errors import KVError
from .formats import Query, V1Error, bad
from .raft_client import RaftClient
from .store import Store
from .txn import DELETE, PUT, RequestIdentity, Txn, TxnOp, TxnResult
from .v1_requests import Identity, Limits, OpSpec, RangeSpec

log = logging.getLogger(__name__)

PREFIX = "/v1/"
KV_PREFIX = "/v1/kv/"
BARRIER_MODE = {"linearizable": pb.LINEARIZABLE, "leader": pb.LEADER, "local": None}
DUPLICATE_HEADER = "X-RaftKV-Duplicate"
RETRY_AFTER_SECONDS = "1"
# A page also stops once its keys and values pass this many bytes (at least one key
# per page): limit=10000 of 1 MiB values would otherwise be a 10 GB answer.
PAGE_BYTES = 4 << 20
# The store is read in slices of this many keys while a page fills up. All slices of
# one page are read without yielding to the event loop, which is also where entries
# are applied, so a page is one consistent moment.
SCAN_SLICE = 256
# Backup: one write to the socket per this many bytes, each awaiting the client.
BACKUP_FLUSH_BYTES = 256 << 10
STREAMING = "v1_streaming"   # request key: the answer's headers are sent, errors cannot be answered

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class V1API:
    def __init__(self, cfg: EngineConfig, store: Store, raft: RaftClient) -> None:
        self._cfg = cfg
        self._store = store
        self._raft = raft
        self._limits = Limits(cfg.max_key_bytes, cfg.max_value_bytes, cfg.max_scan_limit, cfg.max_txn_ops)
        # The backup header names the node; the engine knows no node id, so host and port.
        self._node_name = f"{socket.gethostname()}:{cfg.http_port}"

    def register(self, app: web.Application) -> None:
        """Adds the /v1/ routes, and a middleware that gives every /v1 failure (also
        aiohttp's own 404/405/413) the /v1 error document."""
        app.middlewares.append(self._error_middleware)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/v1/kv/{key:[\\s\\S]*}", self.kv_get)
        app.router.add_put("/v1/kv/{key:[\\s\\S]*}", self.kv_put)
        app.router.add_delete("/v1/kv/{key:[\\s\\S]*}", self.kv_delete)
        app.router.add_get("/v1/range", self.range)
        app.router.add_post("/v1/txn", self.txn)
        app.router.add_get("/v1/backup", self.backup)

    # -- plumbing -----------------------------------------------------------------------------------
    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(PREFIX):
            return await handler(request)
        try:
            return await handler(request)
        except V1Error as err:
            return self._error(request, err)
        except KVError as err:
            return self._error(request, V1Error.from_kv(err))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 413: "too_large"}.get(exc.status, "bad_request")
            message = exc.reason if exc.status != 404 else f"no such /v1 endpoint: {request.method} {request.path}"
            if exc.status == 405:
                allowed = exc.headers.get("Allow", "")
                message = f"method {request.method} is not allowed on {request.path}; allowed: {allowed}"
            resp = self._error(request, V1Error(code, message), status=exc.status)
            if exc.status == 405 and "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        except Exception as exc:
            if request.get(STREAMING) or isinstance(exc, ConnectionError):
                raise  # the status line is out: aiohttp cuts the connection, the reader sees no trailer
            log.exception("%s %s failed", request.method, request.path)
            return self._error(request, V1Error("internal", f"internal error: {type(exc).__name__}: {exc}"))

    def _render(self, request: web.Request, doc: Any, status: int = 200,
                headers: dict[str, str] | None = None) -> web.Response:
        body, ctype = formats.encode(doc, formats.wants_json(request.headers.get("Accept"),
                                                             Query(request.raw_path)))
        resp = web.Response(status=status, body=body, headers=headers)
        resp.content_type = ctype
        return resp

    def _error(self, request: web.Request, err: V1Error, status: int | None = None) -> web.Response:
        headers = {}
        if err.code == "overloaded" or (status or err.status) == 503:
            headers["Retry-After"] = RETRY_AFTER_SECONDS
        doc = formats.error_doc(err)
        resp = self._render(request, doc, status or err.status, headers)
        if err.code == "too_large" and request.can_read_body and not request.content.at_eof():
            resp.force_close()  # the unread body must not be parsed as the next request
        return resp

    def _query(self, request: web.Request) -> Query:
        q = Query(request.raw_path)
        q.check()
        formats.check_format_param(q)
        return q

    def _path_key(self, request: web.Request) -> bytes:
        """The key is the percent-decoded RAW path after /v1/kv/, so any byte string works
        (aiohttp's own path is decoded as UTF-8 and normalized)."""
        raw = request.raw_path.split("?", 1)[0].split("#", 1)[0]
        if not raw.startswith(KV_PREFIX):
            raise bad(f"the key must follow {KV_PREFIX} in the path")
        return unquote_to_bytes(raw[len(KV_PREFIX):])

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, refused from Content-Length alone when announced too large."""
        limit = self._cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise V1Error("too_large", f"body is {request.content_length} bytes; the limit is {limit}")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise V1Error("too_large", f"body exceeds the limit of {limit} bytes") from None

    async def _barrier(self, level: str) -> None:
        mode = BARRIER_MODE[level]
        if mode is not None:
            await self._raft.barrier.wait(mode)

    async def _submit(self, ops: list[OpSpec], ident: Identity | None) -> TxnResult:
        txn = Txn(tuple(_txn_op(op) for op in ops))
        rid = RequestIdentity(ident.client_id, ident.seq, ident.floor) if ident else None
        return await self._raft.submit(txn, rid)

    @staticmethod
    def _dup_headers(result: TxnResult) -> dict[str, str]:
        return {DUPLICATE_HEADER: "1"} if result.duplicate else {}

    # -- endpoints ------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return self._render(request, {"ok": True})

    async def kv_get(self, request: web.Request) -> web.Response:
        q = self._query(request)
        level = v1_requests.consistency(q)
        key = v1_requests.check_key(self._path_key(request), self._limits)
        await self._barrier(level)
        meta = self._store.get_entry(key)
        revision = self._store.revision
        if meta is None:
            raise V1Error("not_found", f"key not found: {_show(key)}", {"revision": revision})
        return self._render(request, {"key": key, "value": meta.value, "create_revision": meta.create_revision,
                                      "mod_revision": meta.mod_revision, "version": meta.version,
                                      "revision": revision})

    async def kv_put(self, request: web.Request) -> web.Response:
        q = self._query(request)
        ident = v1_requests.identity(request.headers)
        fmt = formats.body_format(request.headers.get("Content-Type"), raw_allowed=True)
        key = v1_requests.check_key(self._path_key(request), self._limits)
        body = await self._read_body(request)
        doc = None if fmt == "raw" else formats.decode_doc(body, fmt)
        spec = v1_requests.parse_put(key, fmt, body, doc, q, self._limits)
        result = await self._submit([spec], ident)
        if not result.succeeded:
            return self._compare_failed_single(request, result)
        r = result.results[0]
        return self._render(request, {"revision": result.revision, "key": r.key, "version": r.version,
                                      "create_revision": r.create_revision, "mod_revision": r.mod_revision},
                            headers=self._dup_headers(result))

    async def kv_delete(self, request: web.Request) -> web.Response:
        q = self._query(request)
        ident = v1_requests.identity(request.headers)
        key = v1_requests.check_key(self._path_key(request), self._limits)
        doc = None
        if request.body_exists:
            fmt = formats.body_format(request.headers.get("Content-Type"))
            body = await self._read_body(request)
            doc = formats.decode_doc(body, fmt) if body else None
        spec = v1_requests.parse_delete(key, doc, q, self._limits)
        result = await self._submit([spec], ident)
        if not result.succeeded:
            return self._compare_failed_single(request, result)
        r = result.results[0]
        return self._render(request, {"deleted": r.deleted, "revision": result.revision},
                            headers=self._dup_headers(result))

    def _compare_failed_single(self, request: web.Request, result: TxnResult) -> web.Response:
        extra: dict[str, Any] = {"succeeded": False, "revision": result.revision}
        if result.current:
            c = result.current[0]
            extra["current"] = {"exists": c.exists, "version": c.version, "mod_revision": c.mod_revision,
                                "create_revision": c.create_revision}
        err = V1Error("compare_failed", "the condition did not hold; nothing was written", extra)
        resp = self._error(request, err)
        resp.headers.update(self._dup_headers(result))
        return resp

    async def txn(self, request: web.Request) -> web.Response:
        self._query(request)
        ident = v1_requests.identity(request.headers)
        fmt = formats.body_format(request.headers.get("Content-Type"))
        body = await self._read_body(request)
        ops = v1_requests.parse_txn(formats.decode_doc(body, fmt), self._limits)
        result = await self._submit(ops, ident)
        if not result.succeeded:
            failed = list(result.failed)
            err = V1Error("compare_failed",
                          f"the condition of op(s) {', '.join(map(str, failed))} did not hold; nothing was written",
                          {"succeeded": False, "revision": result.revision, "failed": failed})
            resp = self._error(request, err)
            resp.headers.update(self._dup_headers(result))
            return resp
        results: list[dict[str, Any]] = []
        for r in result.results:
            if r.op == DELETE:
                results.append({"key": r.key, "deleted": r.deleted})
            else:
                results.append({"key": r.key, "version": r.version, "mod_revision": r.mod_revision})
        return self._render(request, {"succeeded": True, "revision": result.revision, "results": results},
                            headers=self._dup_headers(result))

    async def range(self, request: web.Request) -> web.Response:
        q = self._query(request)
        level = v1_requests.consistency(q)
        spec = v1_requests.parse_range(q, self._limits)
        await self._barrier(level)
        kvs, more = self._read_page(spec)
        revision = self._store.revision
        items = []
        for m in kvs:
            item: dict[str, Any] = {"key": m.key}
            if not spec.keys_only:
                item["value"] = m.value
            item.update(create_revision=m.create_revision, mod_revision=m.mod_revision, version=m.version)
            items.append(item)
        token = v1_requests.make_token(kvs[-1].key) if more and kvs else None
        return self._render(request, {"kvs": items, "more": bool(more and kvs), "next": token,
                                      "revision": revision})

    def _read_page(self, spec: RangeSpec) -> tuple[list[Any], bool]:
        """At most spec.limit keys and about PAGE_BYTES, in bounded store.scan slices.

        No await in here: applies run on this event loop, so the page is one moment."""
        start, end = spec.start, spec.end
        out: list[Any] = []
        size = 0
        while True:
            if end is not None and start >= end:
                return out, False
            want = min(SCAN_SLICE, spec.limit - len(out))
            chunk, more = self._store.scan(start, end, want, spec.keys_only)
            for m in chunk:
                out.append(m)
                size += len(m.key) + len(m.value or b"")
                if len(out) >= spec.limit or size >= PAGE_BYTES:
                    # More keys may follow this one: in this slice, or after it.
                    return out, (m is not chunk[-1]) or more
            if not more or not chunk:
                return out, False
            start = chunk[-1].key + b"\x00"

    async def backup(self, request: web.Request) -> web.StreamResponse:
        """The backup file (raftkv/backup.py) of one LevelDB snapshot, streamed in pieces of
        about BACKUP_FLUSH_BYTES; each write waits while the socket's buffer is full, so
        memory does not grow with the key count (or with a slow client)."""
        q = self._query(request)
        level = v1_requests.consistency(q)
        await self._barrier(level)
        view = self._store.iter_backup(self._node_name)  # the snapshot: taken before anything awaits
        try:
            enc = backup_format.BackupEncoder(view.applied_index, view.revision, self._node_name)
            resp = web.StreamResponse(status=200, headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="raftkv-r{view.revision}.backup"',
            })
            request[STREAMING] = True
            await resp.prepare(request)
            await resp.write(enc.begin())
            batch: list[tuple[bytes, bytes, int, int, int]] = []
            size = 0
            # Records, not the view's own byte chunks: those are cut by record count,
            # and 1000 records of 1 MiB values would be one 1 GB piece.
            for rec in view.records():
                batch.append(rec)
                size += len(rec[0]) + len(rec[1])
                if size >= BACKUP_FLUSH_BYTES or len(batch) >= 1000:
                    await resp.write(enc.records(batch))
                    batch, size = [], 0
            await resp.write(enc.records(batch))
            await resp.write(enc.end())
            await resp.write_eof()
        except ConnectionError:
            log.info("backup: %s went away before the end", request.remote)
            raise
        finally:
            view.close()  # releases the LevelDB snapshot, also when the client left early
        log.info("backup: %d keys at revision %d (applied index %d) sent to %s",
                 enc.count, view.revision, view.applied_index, request.remote)
        return resp


def _txn_op(spec: OpSpec) -> TxnOp:
    return TxnOp(op=PUT if spec.op == "put" else DELETE, key=spec.key,
                 value=spec.value if spec.value is not None else b"",
                 expect_value=spec.expect_value, expect_version=spec.expect_version,
                 expect_mod_revision=spec.expect_mod_revision)


def _show(key: bytes, limit: int = 64) -> str:
    """A key for a message: its repr, cut short (keys may be 4 KiB of binary)."""
    return repr(key[:limit]) + ("..." if len(key) > limit else "")
