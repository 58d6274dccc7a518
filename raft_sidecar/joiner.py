"""Joining a running cluster through any member's management API.

Order matters with single-server changes: the new node starts its Raft first
(with the current members as peers) and only then asks to be added, because the
add entry needs the new node's ack to commit when the cluster is small.
"""
from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlencode

import aiohttp

from .config import SidecarConfig

log = logging.getLogger(__name__)


class JoinError(Exception):
    pass


def _headers(cfg: SidecarConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.cluster_token}"} if cfg.cluster_token else {}


async def _retry(cfg: SidecarConfig, what: str, attempt) -> dict:
    last = "no attempt made"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        for n in range(1, cfg.join_tries + 1):
            try:
                status, body = await attempt(session)
                if status == 200:
                    return body
                last = f"HTTP {status}: {body}"
                if status in (400, 401, 403, 409):
                    raise JoinError(f"{what} refused by {cfg.join_addr}: {last}")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                last = repr(exc)
            log.warning("%s via %s failed (try %d/%d): %s", what, cfg.join_addr, n, cfg.join_tries, last)
            if n < cfg.join_tries:
                await asyncio.sleep(cfg.join_interval)
    raise JoinError(f"{what} via {cfg.join_addr} failed after {cfg.join_tries} tries: {last}")


async def fetch_members(cfg: SidecarConfig) -> list[str]:
    async def attempt(session: aiohttp.ClientSession):
        async with session.get(f"http://{cfg.join_addr}/status") as r:
            body = await r.json(content_type=None) if r.status == 200 else await r.text()
            if r.status == 200 and not body.get("leader_addr"):
                return 503, "member knows no leader yet"
            return r.status, body
    status = await _retry(cfg, "reading the member list", attempt)
    return [m["address"] for m in status["members"]]


async def join(cfg: SidecarConfig) -> dict:
    query = urlencode({"peerID": cfg.node_id, "peerAddress": cfg.advertise, "mgmtAddress": cfg.mgmt_advertise})

    async def attempt(session: aiohttp.ClientSession):
        async with session.post(f"http://{cfg.join_addr}/join?{query}", headers=_headers(cfg)) as r:
            body = await r.json(content_type=None) if r.status == 200 else await r.text()
            return r.status, body
    result = await _retry(cfg, "joining", attempt)
    log.info("joined the cluster via %s: %s", cfg.join_addr, result.get("members"))
    return result
