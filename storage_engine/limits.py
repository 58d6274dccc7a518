"""Per-node limit on client requests handled at once (--max-concurrent-requests).

Beyond the limit a request is answered at once, before its body is read: 429
`overloaded` on /v1 paths, 503 on the original endpoints, both with Retry-After. Queueing
it instead would only turn overload into timeouts and memory growth. Health checks and
/metrics are not counted, so an overloaded node still reports itself alive.
"""
from __future__ import annotations

import logging
import time

from aiohttp import web

from .refusals import is_v1, refuse

log = logging.getLogger(__name__)

UNCOUNTED = frozenset({"/health", "/v1/health", "/metrics"})
RETRY_AFTER_SECONDS = "1"
WARN_INTERVAL = 10.0


class ConcurrencyLimit:
    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the concurrency limit must be positive")
        self.limit = limit
        self.active = 0
        self.rejected = 0
        self._rejected_since_warn = 0
        self._last_warn = float("-inf")

    def _note_rejection(self) -> None:
        self.rejected += 1
        self._rejected_since_warn += 1
        now = time.monotonic()
        if now - self._last_warn >= WARN_INTERVAL:
            log.warning("overloaded: refused %d client request(s) beyond --max-concurrent-requests=%d",
                        self._rejected_since_warn, self.limit)
            self._rejected_since_warn = 0
            self._last_warn = now

    @web.middleware
    async def middleware(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.path in UNCOUNTED:
            return await handler(request)
        if self.active >= self.limit:
            self._note_rejection()
            status = 429 if is_v1(request) else 503
            resp = refuse(request, status, "overloaded",
                          f"overloaded: {self.limit} requests in progress on this node; retry later",
                          {"Retry-After": RETRY_AFTER_SECONDS})
            # An unread body is drained by aiohttp (bounded lingering) rather than cut with
            # a close, which could reset the connection before the client reads this answer.
            return resp
        # One event loop: a plain counter is enough, and `finally` frees the slot also
        # when the client disconnects and the handler is cancelled.
        self.active += 1
        try:
            return await handler(request)
        finally:
            self.active -= 1
