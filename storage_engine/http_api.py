"""Client HTTP API: the original's endpoints with proper status codes (SPEC §4).

The HTTP layer never touches LevelDB: writes go through raft_client, reads come
from the store after the read barrier that the consistency level asks for.
"""
from __future__ import annotations

import json
import logging

from aiohttp import web, web_protocol

from raftkv.pb import consensus_pb2 as pb

from .commands import parse_insert
from . import auth, metrics
from .config import EngineConfig
from .errors import ErrorKind, KVError
from .raft_client import RaftClient
from .store import Store
from .v1_api import V1API

log = logging.getLogger(__name__)

STATUS_FOR = {
    ErrorKind.BAD_INPUT: 400,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.NO_LEADER: 503,
    ErrorKind.NO_QUORUM: 503,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.NOT_APPLIED: 503,
    ErrorKind.OUTCOME_UNKNOWN: 503,
    ErrorKind.INTERNAL: 500,
}

CONSISTENCY = {"linearizable": pb.LINEARIZABLE, "leader": pb.LEADER, "local": None}


def _install_protocol_errors() -> None:
    """Requests aiohttp's parser rejects (e.g. `Content-Length: abc`) never reach a
    handler; give them the same `error: <what>` body as every other 4xx, and log
    them as a warning, not a traceback."""
    original = web_protocol.RequestHandler.handle_error
    if getattr(original, "_raftkv", False):
        return

    def handle_error(self, request, status=500, exc=None, message=None):  # type: ignore[no-untyped-def]
        if not 400 <= status < 500:
            return original(self, request, status, exc, message)
        reason = getattr(exc, "message", None) or message or "malformed HTTP request"
        reason = str(reason).splitlines()[0]
        log.warning("rejected a malformed HTTP request from %s: %s", request.remote, reason)
        resp = web.Response(status=status, text=f"error: bad HTTP request: {reason}")
        resp.force_close()
        return resp

    handle_error._raftkv = True  # type: ignore[attr-defined]
    web_protocol.RequestHandler.handle_error = handle_error  # type: ignore[method-assign]


_install_protocol_errors()


def error_response(err: KVError) -> web.Response:
    status = STATUS_FOR[err.kind]
    resp = web.Response(status=status, text=f"error: {err.message}")
    if status == 503:
        resp.headers["Retry-After"] = "1"
    return resp


class ClientAPI:
    def __init__(self, cfg: EngineConfig, store: Store, raft: RaftClient) -> None:
        self._cfg = cfg
        self._store = store
        self._raft = raft

    def app(self) -> web.Application:
        # A binary key percent-encodes to 3 bytes a byte; the request line must fit the longest key.
        app = web.Application(client_max_size=self._cfg.max_body_bytes,
                              middlewares=auth.middlewares(self._cfg),
                              handler_args={"max_line_size": 3 * self._cfg.max_key_bytes + 8192})
        metrics.install(app, self._store, self._raft)
        V1API(self._cfg, self._store, self._raft).register(app)
        app.router.add_post("/insert-val", self.insert_val)
        app.router.add_get("/get-val", self.get_val)
        app.router.add_get("/health", self.health)
        app.router.add_get("/debug/stats", self.stats)
        return app

    async def insert_val(self, request: web.Request) -> web.Response:
        try:
            if request.content_length is not None and request.content_length > self._cfg.max_body_bytes:
                # Refused from the header alone: a 10 MiB body is never read into memory.
                resp = error_response(KVError(ErrorKind.TOO_LARGE,
                                              f"body is {request.content_length} bytes; "
                                              f"the limit is {self._cfg.max_body_bytes}"))
                resp.force_close()
                return resp
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                resp = error_response(KVError(ErrorKind.TOO_LARGE,
                                              f"body exceeds the limit of {self._cfg.max_body_bytes} bytes"))
                resp.force_close()
                return resp
            write = parse_insert(body, self._cfg.max_key_bytes, self._cfg.max_value_bytes)
            await self._raft.write(write)
        except KVError as err:
            return error_response(err)
        return web.Response(text="ok")

    async def get_val(self, request: web.Request) -> web.Response:
        key = request.query.get("key")
        try:
            if key is None or key == "":
                raise KVError(ErrorKind.BAD_INPUT, "missing query parameter 'key'")
            level = request.query.get("consistency", "linearizable").lower()
            if level not in CONSISTENCY:
                raise KVError(ErrorKind.BAD_INPUT,
                              f"unknown consistency {level!r}; use linearizable, leader or local")
            mode = CONSISTENCY[level]
            if mode is not None:
                await self._raft.barrier.wait(mode)
        except KVError as err:
            return error_response(err)
        value = self._store.get(key.encode("utf-8"))
        if value is None:
            return web.Response(status=404, text="Key Not Found")
        return web.Response(body=value, content_type="text/plain")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def stats(self, request: web.Request) -> web.Response:
        s = self._store
        return web.Response(content_type="application/json", text=json.dumps({
            "applied_index": s.applied_index,
            "applies": s.stats.applies,
            "skipped": s.stats.skipped,
            "keys": len(s),
        }))
