"""Client authentication for the HTTP API: an optional bearer token (docs/security.md).

With a token configured every request needs `Authorization: Bearer <token>`, except the
health checks (an orchestrator must probe a node without the secret) and, when
--metrics-public is given, /metrics. Missing credentials -> 401, a wrong token -> 403.
The check runs before the handler, so a refused request never reads its body or
proposes anything. The token is compared in constant time and never logged.
"""
from __future__ import annotations

import logging
import time

from aiohttp import web

from raftkv.secretfile import same_secret

from . import limits
from .config import EngineConfig
from .refusals import refuse

log = logging.getLogger(__name__)

ALWAYS_OPEN = frozenset({"/health", "/v1/health"})
METRICS_PATH = "/metrics"
# At most one warning per this many seconds about refused requests (a scan must not flood the log).
WARN_INTERVAL = 10.0


def bearer_token(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class TokenAuth:
    def __init__(self, token: str, open_paths: frozenset[str]) -> None:
        self._token = token
        self._open = open_paths
        self.refused = 0
        self._refused_since_warn = 0
        self._last_warn = float("-inf")

    def _note_refusal(self, request: web.Request, why: str) -> None:
        self.refused += 1
        self._refused_since_warn += 1
        now = time.monotonic()
        if now - self._last_warn >= WARN_INTERVAL:
            log.warning("refused %d unauthenticated client request(s); latest: %s %s from %s (%s)",
                        self._refused_since_warn, request.method, request.path, request.remote, why)
            self._refused_since_warn = 0
            self._last_warn = now

    @web.middleware
    async def middleware(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.path in self._open:
            return await handler(request)
        given = bearer_token(request)
        if given is None:
            self._note_refusal(request, "no bearer token")
            return refuse(request, 401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)",
                          {"WWW-Authenticate": 'Bearer realm="raftkv"'})
        if not same_secret(given, self._token):
            self._note_refusal(request, "wrong token")
            return refuse(request, 403, "forbidden", "wrong bearer token")
        return await handler(request)


def middlewares(cfg: EngineConfig) -> list:
    """aiohttp middlewares that guard the client API: the token check (when a token is
    configured) first, so an unauthenticated flood never takes a concurrency slot, then
    the concurrency limit."""
    out = []
    if cfg.client_token:
        open_paths = ALWAYS_OPEN | ({METRICS_PATH} if cfg.metrics_public else frozenset())
        out.append(TokenAuth(cfg.client_token, frozenset(open_paths)).middleware)
    out.append(limits.ConcurrencyLimit(cfg.max_concurrent_requests).middleware)
    return out
