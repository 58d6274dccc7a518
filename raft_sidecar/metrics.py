"""Prometheus metrics for the sidecar: GET /metrics on the management port.

Raft state is read at scrape time from the node's public helpers and PySyncObj's
getStatus(), like /status does. Leader changes happen between scrapes, so a small sampler
task watches the known leader and counts the transitions it sees (polling every 50 ms: a
flap shorter than that can be missed, which a counter of elections would not need, but
PySyncObj offers no hook without editing node.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from raftkv.http_metrics import install_http

from .applier import Applier
from .node import RaftKVNode

log = logging.getLogger(__name__)

SAMPLE_EVERY = 0.05
_SAMPLER_KEY = web.AppKey("leader_sampler", asyncio.Task)


class LeaderWatch:
    """Counts changes of the leader this node knows, and the times it became leader itself."""

    def __init__(self, node: RaftKVNode, registry: CollectorRegistry) -> None:
        self._node = node
        self._last_leader: str | None = None
        self._was_leader = False
        self.changes = Counter("raftkv_raft_leader_changes", "Times this node saw a different leader "
                               "(the first leader it learns counts as one)", registry=registry)
        self.became_leader = Counter("raftkv_raft_became_leader", "Times this node became the leader",
                                     registry=registry)

    def sample(self) -> None:
        try:
            leader = self._node.leader_address()
            is_leader = bool(self._node._isLeader())
        except Exception:  # noqa: BLE001 - never let metrics break the node
            return
        if leader is not None and leader != self._last_leader:
            self._last_leader = leader
            self.changes.inc()
        if is_leader and not self._was_leader:
            self.became_leader.inc()
        self._was_leader = is_leader

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY)


def raft_status(node: RaftKVNode) -> dict:
    """PySyncObj's getStatus(), read from outside its tick thread: a set or dict it
    iterates can change size meanwhile, so retry a few times and give up quietly."""
    for _ in range(3):
        try:
            return node.getStatus()
        except RuntimeError:
            continue
        except Exception:  # noqa: BLE001
            break
    return {}


class SidecarCollector(Collector):
    def __init__(self, node: RaftKVNode, applier: Applier, watch: LeaderWatch) -> None:
        self._node = node
        self._applier = applier
        self._watch = watch

    def collect(self) -> Iterator[Metric]:
        node, applier = self._node, self._applier
        self._watch.sample()  # a scrape right after a change already counts it
        status = raft_status(node)
        commit = int(getattr(node, "raftCommitIndex", 0) or 0)
        processed = int(getattr(applier, "processed", 0) or 0)
        submitted = int(getattr(applier, "submitted", 0) or 0)
        yield _gauge("raftkv_raft_term", "Current Raft term", getattr(node, "raftCurrentTerm", 0))
        yield _gauge("raftkv_raft_commit_index", "Raft commit index known to this node", commit)
        yield _gauge("raftkv_raft_last_applied_index",
                     "Last entry PySyncObj applied (handed to the applier)", getattr(node, "raftLastApplied", 0))
        yield _gauge("raftkv_sidecar_applied_index",
                     "Every entry up to this index is reflected in the engine", processed)
        yield _gauge("raftkv_sidecar_engine_applied_index",
                     "The engine's own stored index, as last reported to the applier",
                     getattr(applier, "engine_applied", 0))
        yield _gauge("raftkv_sidecar_apply_lag_entries",
                     "Committed entries not yet reflected in the engine (commit index - applied index)",
                     max(commit - processed, 0))
        yield _gauge("raftkv_sidecar_apply_queue_entries",
                     "Entries handed to the applier and not yet delivered to the engine",
                     max(submitted - processed, 0))
        yield _counter("raftkv_sidecar_apply_calls", "Apply requests the engine accepted",
                       getattr(applier, "deliveries", 0))
        yield _counter("raftkv_sidecar_apply_call_entries", "Raft entries in those requests",
                       getattr(applier, "delivered_entries", 0))
        try:
            is_leader = bool(node._isLeader())
            leader = node.leader_address()
            members = len(node.members())
        except Exception:  # noqa: BLE001
            is_leader, leader, members = False, None, 0
        yield _gauge("raftkv_raft_is_leader", "1 when this node is the Raft leader", int(is_leader))
        yield _gauge("raftkv_raft_has_leader", "1 when this node knows a leader", int(leader is not None))
        yield _gauge("raftkv_raft_members", "Voting members in this node's configuration", members)
        if "log_len" in status:
            yield _gauge("raftkv_raft_log_entries", "Entries in the Raft log (since the last compaction)",
                         status["log_len"])
        if "has_quorum" in status:
            yield _gauge("raftkv_raft_has_quorum", "1 when the leader hears a majority (leader only)",
                         int(bool(status["has_quorum"])))
        connected = GaugeMetricFamily("raftkv_raft_peer_connected",
                                      "1 when the Raft connection to the peer is up", labels=["peer"])
        match = GaugeMetricFamily("raftkv_raft_peer_match_index",
                                  "Highest log index known replicated on the peer (leader only)", labels=["peer"])
        for key, value in status.items():
            if key.startswith("partner_node_status_server_"):
                connected.add_metric([key[len("partner_node_status_server_"):]], 1.0 if value == 2 else 0.0)
            elif key.startswith("match_idx_server_"):
                match.add_metric([key[len("match_idx_server_"):]], float(value))
        yield connected
        yield match
        waiting_commit = getattr(node, "_SyncObj__commandsWaitingCommit", None)
        waiting_reply = getattr(node, "_SyncObj__commandsWaitingReply", None)
        if waiting_commit is not None or waiting_reply is not None:
            yield _gauge("raftkv_raft_proposals_in_flight",
                         "Commands of this node waiting for commit (leader) or for the leader's reply (follower)",
                         _size(waiting_commit) + _size(waiting_reply))


def _size(container: object) -> int:
    try:
        return len(container)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_text)
    g.add_metric([], float(value or 0))
    return g


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, help_text)
    c.add_metric([], float(value or 0))
    return c


def install(app: web.Application, node: RaftKVNode, applier: Applier) -> None:
    """Adds /metrics (and management request counts) to the management application."""
    registry = CollectorRegistry(auto_describe=True)
    install_http(app, registry, "raftkv_mgmt", "Management HTTP")
    watch = LeaderWatch(node, registry)
    registry.register(SidecarCollector(node, applier, watch))

    async def start_sampler(app: web.Application) -> None:
        app[_SAMPLER_KEY] = asyncio.create_task(watch.run())

    async def stop_sampler(app: web.Application) -> None:
        task = app.get(_SAMPLER_KEY)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.on_startup.append(start_sampler)
    app.on_cleanup.append(stop_sampler)
