"""Checks before a sidecar with no Raft state (no members.json, no journal) starts as a new node.

An empty Raft data dir is normal on a node's first start, and dangerous on a node that was a
member and lost its data: with its log and vote gone it could vote twice in a term, count
towards a majority for entries it no longer has, or, started with -bootstrap, form a second
cluster beside the real one. Each check below refuses with a message that names the directory
and says how to recover (docs/recovery.md): /leave the old member, then start with -join.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Mapping

import aiohttp

from .config import SidecarConfig

log = logging.getLogger(__name__)

PEERS_ENV = "RAFTKV_PEERS"
PEER_TIMEOUT = 2.0


class FreshStartRefused(Exception):
    """This node must not start as a new member; the message says why and what to do."""


def peers_from_env(env: Mapping[str, str]) -> list[str]:
    """RAFTKV_PEERS: comma- or space-separated HOST:MGMTPORT of the other members."""
    raw = env.get(PEERS_ENV, "")
    return [p for p in raw.replace(",", " ").split() if p]


def refuse_engine_data_without_raft_state(cfg: SidecarConfig, engine_index: int) -> None:
    """The engine stores the raft index it applied and skips every entry at or below it. With
    no Raft state here, this node's log starts again at 1, so those entries would be skipped
    on an engine whose data belongs to some other log: refuse instead of guessing."""
    if engine_index > 0:
        raise FreshStartRefused(
            f"the engine at {cfg.app_addr} holds data up to raft index {engine_index} but this node's Raft "
            f"data dir {cfg.data_dir} is empty: the engine's data cannot be matched to a Raft log (a new log "
            f"would have its first {engine_index} entries skipped). Either restore {cfg.data_dir}, or wipe the "
            f"engine's DB_PATH too and start the node again with -join (it then catches up from its peers); "
            f"if it is still listed as a member, /leave it first")


def refuse_if_member(cfg: SidecarConfig, members: list[str]) -> None:
    """-join with an empty data dir, while the cluster still lists this node's address."""
    if cfg.advertise in members:
        raise FreshStartRefused(
            f"this node's address {cfg.advertise} is already a member of the cluster at {cfg.join_addr} "
            f"(members {members}), but its Raft data dir {cfg.data_dir} is empty: it lost its log and vote. "
            f"Rejoining under the same address could let it vote twice in a term or count towards a majority "
            f"for entries it no longer has. Remove the old member first: "
            f"curl -X POST 'http://{cfg.join_addr}/leave?peerID={cfg.node_id}' (add the cluster token if one "
            f"is set), wipe {cfg.data_dir} and the engine's DB_PATH, then start this node again with "
            f"-join {cfg.join_addr}: it joins as a new member and catches up from its peers (log entries or "
            f"a snapshot)")


async def _peer_status(session: aiohttp.ClientSession, peer: str) -> dict | None:
    try:
        async with session.get(f"http://{peer}/status") as r:
            if r.status != 200:
                return None
            body = await r.json(content_type=None)
            return body if isinstance(body, dict) else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        log.info("peer %s did not answer /status (%r): treated as not running", peer, exc)
        return None


async def refuse_if_cluster_exists(cfg: SidecarConfig, peers: list[str]) -> None:
    """-bootstrap with an empty data dir: refuse when any listed peer already serves a cluster.
    Peers that do not answer are ignored (a brand-new cluster's other nodes are not up yet)."""
    own = {cfg.mgmt_advertise, f"127.0.0.1:{cfg.mgmt_port}", f"localhost:{cfg.mgmt_port}"}
    peers = [p for p in peers if p not in own]
    if not peers:
        return
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT)) as session:
        answers = await asyncio.gather(*(_peer_status(session, p) for p in peers))
    for peer, status in zip(peers, answers):
        members = [m.get("address") for m in (status or {}).get("members", []) if isinstance(m, dict)]
        if members:
            raise FreshStartRefused(
                f"-bootstrap asks for a new cluster, but peer {peer} ({PEERS_ENV}) already serves one "
                f"(members {members}, leader {status.get('leader_id') or status.get('leader_addr') or 'unknown'}), "
                f"and this node's Raft data dir {cfg.data_dir} is empty. Starting would form a second cluster "
                f"beside it. If this node was a member and lost its data: "
                f"curl -X POST 'http://{peer}/leave?peerID={cfg.node_id}', wipe {cfg.data_dir} and the engine's "
                f"DB_PATH, and start it with -join {peer} instead of -bootstrap. If a separate cluster is "
                f"really meant, do not list {peer} in {PEERS_ENV}")
    log.info("no peer in %s serves a cluster yet: bootstrapping a new one", peers)
