"""Prometheus metrics for the sidecar (/metrics on the management port). Filled in by the metrics work."""
from __future__ import annotations

from aiohttp import web


def install(app: web.Application, node: object, applier: object) -> None:
    """Adds /metrics to the management application."""
