"""Management HTTP API (port 6000): /join, /leave, /status, /health.

Membership changes are single-flight on the leader and each waits for its entry
to commit before the next is accepted: PySyncObj's own guard is dead code (H8),
and two overlapping single-server changes can produce disjoint majorities.
"""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web

from raftkv.secretfile import same_secret

from . import metrics, raft_secret
from .applier import Applier
from .config import SidecarConfig
from .node import RaftKVNode
from .rpc import RaftOutcome, call_replicated

log = logging.getLogger(__name__)

CHANGE_TIMEOUT = 15.0


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _valid_address(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


class Management:
    def __init__(self, cfg: SidecarConfig, node: RaftKVNode, applier: Applier) -> None:
        self._cfg = cfg
        self._node = node
        self._applier = applier
        self._change_lock = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        for path, handler in (("/join", self.join), ("/leave", self.leave)):
            app.router.add_get(path, handler)
            app.router.add_post(path, handler)
        app.router.add_get("/status", self.status)
        app.router.add_get("/health", self.health)
        metrics.install(app, self._node, self._applier)
        return app

    # -- helpers --------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        token = self._cfg.cluster_token
        if not token:
            return True
        given = request.headers.get("Authorization", "")
        given = given[7:] if given.startswith("Bearer ") else request.query.get("token", "")
        return same_secret(given, token)   # constant time, length included

    def _members(self) -> list[dict[str, str]]:
        registry = self._node.registry_snapshot()
        return [{"id": registry.get(a, {}).get("id", a), "address": a, "mgmt": registry.get(a, {}).get("mgmt", "")}
                for a in self._node.members()]

    async def _forward_to_leader(self, request: web.Request) -> web.Response:
        leader = self._node.leader_address()
        mgmt = self._node.registry_snapshot().get(leader or "", {}).get("mgmt")
        if not mgmt:
            return _json_error(503, "no leader known (or its management address is not registered yet); retry")
        headers = {k: v for k, v in request.headers.items() if k == "Authorization"}
        url = f"http://{mgmt}{request.path}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CHANGE_TIMEOUT + 5)) as s:
                async with s.post(url, params=request.query, headers=headers) as r:
                    return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _json_error(503, f"could not reach the leader at {mgmt}: {exc!r}")

    async def _change(self, method, *args) -> None:
        await call_replicated(method, *args, timeout=CHANGE_TIMEOUT)

    # -- endpoints ------------------------------------------------------------------------
    async def join(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _json_error(401, "missing or wrong cluster token")
        peer_id = request.query.get("peerID", "")
        peer_addr = request.query.get("peerAddress", "")
        mgmt = request.query.get("mgmtAddress", "")
        if not peer_id or not _valid_address(peer_addr):
            return _json_error(400, "need peerID=ID and peerAddress=HOST:RAFTPORT")
        if mgmt and not _valid_address(mgmt):
            return _json_error(400, "mgmtAddress must be HOST:PORT")
        if not self._node._isLeader():
            return await self._forward_to_leader(request)
        async with self._change_lock:
            members = self._node.members()
            holder = self._node.address_of(peer_id)
            if holder is not None and holder != peer_addr and holder in members:
                return _json_error(409, f"id {peer_id!r} already belongs to member {holder}; /leave it first")
            registered = self._node.registry_snapshot().get(peer_addr, {})
            if peer_addr not in members and self._node.encryptor is not None:
                # Only a node holding the raft secret may become a member (raft_secret.py).
                try:
                    await raft_secret.probe_peer(peer_addr, self._node.encryptor)
                except raft_secret.ProbeUnreachable as exc:
                    return _json_error(503, f"not adding {peer_id}: {exc}; retry once its raft port is up")
                except raft_secret.ProbeRefused as exc:
                    log.warning("refusing to add %s (%s): %s", peer_id, peer_addr, exc)
                    return _json_error(403, f"not adding {peer_id}: {exc}")
            try:
                if peer_addr not in members:
                    log.info("adding %s (%s) to the cluster", peer_id, peer_addr)
                    await self._change(self._node.addNodeToCluster, peer_addr)
                if registered.get("id") != peer_id or (mgmt and registered.get("mgmt") != mgmt):
                    await self._change(self._node.register, peer_addr, peer_id, mgmt or registered.get("mgmt", ""))
            except RaftOutcome as out:
                return _json_error(503, f"membership change not confirmed: {out}")
        return web.json_response({"status": "member", "members": self._members()})

    async def leave(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _json_error(401, "missing or wrong cluster token")
        peer_id = request.query.get("peerID", "")
        if not peer_id:
            return _json_error(400, "need peerID=ID")
        addr = self._node.address_of(peer_id)
        if addr is None or addr not in self._node.members():
            return web.json_response({"status": "not a member", "members": self._members()})
        if not self._node._isLeader():
            return await self._forward_to_leader(request)
        if addr == self._node.selfNode.address:
            return await self._leave_self(request)
        async with self._change_lock:
            try:
                log.info("removing %s (%s) from the cluster", peer_id, addr)
                await self._change(self._node.removeNodeFromCluster, addr)
                await self._change(self._node.unregister, addr)
            except RaftOutcome as out:
                return _json_error(503, f"membership change not confirmed: {out}")
        return web.json_response({"status": "removed", "members": self._members()})

    async def _leave_self(self, request: web.Request) -> web.Response:
        """A leader cannot remove itself in PySyncObj: hand leadership over, then ask the new leader."""
        try:
            await self._change(self._node.transferLeadership)
        except RaftOutcome as out:
            return _json_error(503, f"could not hand leadership over before leaving: {out}")
        deadline = time.monotonic() + CHANGE_TIMEOUT
        while time.monotonic() < deadline:
            leader = self._node.leader_address()
            if leader and leader != self._node.selfNode.address:
                return await self._forward_to_leader(request)
            await asyncio.sleep(0.1)
        return _json_error(503, "no new leader after the leadership transfer; retry")

    async def status(self, request: web.Request) -> web.Response:
        node = self._node
        leader = node.leader_address()
        return web.json_response({
            "node_id": self._cfg.node_id,
            "address": node.selfNode.address,
            "is_leader": bool(node._isLeader()),
            "leader_addr": leader or "",
            "leader_id": node.id_of(leader) if leader else "",
            "term": node.raftCurrentTerm,
            "commit_index": node.raftCommitIndex,
            "raft_applied_index": node.raftLastApplied,
            "applied_index": self._applier.processed,
            "engine_applied_index": self._applier.engine_applied,
            "members": self._members(),
        })

    async def health(self, request: web.Request) -> web.Response:
        if self._node.leader_address() is None:
            return web.Response(status=503, text="no leader known")
        try:
            await self._applier.engine_applied_index(timeout=1.0)
        except Exception as exc:
            return web.Response(status=503, text=f"engine not answering at {self._cfg.app_addr}: {exc.__class__.__name__}")
        return web.Response(text="OK")
