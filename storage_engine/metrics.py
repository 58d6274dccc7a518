"""Prometheus metrics for the engine (/metrics). Filled in by the metrics work."""
from __future__ import annotations

from aiohttp import web


def install(app: web.Application, store: object, raft: object) -> None:
    """Adds /metrics and the request-counting middleware to the client application."""
