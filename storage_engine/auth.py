"""Client authentication for the HTTP API. Filled in by the security work."""
from __future__ import annotations

from aiohttp import web

from .config import EngineConfig


def middlewares(cfg: EngineConfig) -> list:
    """aiohttp middlewares that guard the client API (none when no token is configured)."""
    return []
