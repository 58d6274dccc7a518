"""Versioned client API under /v1/ (see docs/api.md). Filled in by the v1 work."""
from __future__ import annotations

from aiohttp import web

from .config import EngineConfig
from .raft_client import RaftClient
from .store import Store


class V1API:
    def __init__(self, cfg: EngineConfig, store: Store, raft: RaftClient) -> None:
        self._cfg = cfg
        self._store = store
        self._raft = raft

    def register(self, app: web.Application) -> None:
        """Adds the /v1/ routes to the client application."""
