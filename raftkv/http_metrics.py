"""Request metrics for the aiohttp servers of both processes (engine client API, sidecar management).

Each application gets its own CollectorRegistry (never prometheus_client's global one), so
several servers in one process, or a test that builds the app twice, do not collide.
Requests are labelled with the route template (`/v1/kv/{key}`), never the raw path: one
series per route, however many keys clients use.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"
REGISTRY_KEY = web.AppKey("metrics_registry", CollectorRegistry)
# Any token is a valid HTTP method: label only the usual ones, so a client cannot make series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
CANCELLED = 499  # nginx's "client closed request"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# Seconds; spans a local read (~1 ms) to a write that waits for its full timeout (5 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def route_label(request: web.Request) -> str:
    """The template of the route that matched (`/v1/kv/{key}`), or `unmatched` (404/405)."""
    match_info = getattr(request, "match_info", None)
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None:
        return UNMATCHED
    return resource.canonical


@dataclass
class RequestMetrics:
    """The per-request series of one application."""

    requests: Counter
    latency: Histogram
    in_progress: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry, prefix: str, what: str) -> "RequestMetrics":
        return cls(
            requests=Counter(f"{prefix}_requests", f"{what} requests answered, by route template, method and status",
                             ["endpoint", "method", "status"], registry=registry),
            latency=Histogram(f"{prefix}_request_duration_seconds",
                              f"{what} request latency until the handler returned, by route, method and status",
                              ["endpoint", "method", "status"], buckets=LATENCY_BUCKETS, registry=registry),
            in_progress=Gauge(f"{prefix}_requests_in_progress", f"{what} requests being handled now",
                              registry=registry),
        )

    def middleware(self) -> Middleware:
        """Outermost middleware: counts every answer, also 401s of an auth middleware and 404s."""

        @web.middleware
        async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path == METRICS_PATH:
                return await handler(request)
            started = time.perf_counter()
            status = 500
            self.in_progress.inc()
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = CANCELLED  # the client went away, or the shutdown drain ran out
                raise
            finally:
                self.in_progress.dec()
                method = request.method if request.method in KNOWN_METHODS else "OTHER"
                labels = (route_label(request), method, str(status))
                self.requests.labels(*labels).inc()
                self.latency.labels(*labels).observe(time.perf_counter() - started)

        return count_requests


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """GET /metrics in the Prometheus text format."""

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    return handle


def install_http(app: web.Application, registry: CollectorRegistry, prefix: str, what: str) -> RequestMetrics:
    """Adds GET /metrics and the counting middleware (in front of any other middleware)."""
    disable_created_metrics()  # process-wide; the `_created` timestamps only double the output
    metrics = RequestMetrics.create(registry, prefix, what)
    app.middlewares.insert(0, metrics.middleware())
    app.router.add_get(METRICS_PATH, metrics_handler(registry))
    app[REGISTRY_KEY] = registry
    return metrics
