"""Prometheus metrics for the engine: GET /metrics on the client HTTP port.

Request counts and latencies come from a middleware; everything else (indices, key count,
LevelDB size, writes and proposals in flight) is read from the store and the Raft client at
scrape time by a custom collector, so the hot paths carry no extra bookkeeping. The Raft
client is only read, through getattr with defaults: its internals may change.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from raftkv.http_metrics import install_http

DISK_SIZE_CACHE_SECONDS = 5.0
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def directory_size(path: str) -> int:
    """Bytes of the regular files under `path` (LevelDB keeps one flat directory)."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:  # compaction removed it meanwhile
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


class CachedDirectorySize:
    """Directory size, recomputed at most every few seconds: a scrape must stay cheap."""

    def __init__(self, path: str, ttl: float = DISK_SIZE_CACHE_SECONDS) -> None:
        self._path = path
        self._ttl = ttl
        self._value = 0
        self._at = float("-inf")

    def get(self) -> int:
        now = time.monotonic()
        if now - self._at >= self._ttl:
            self._value = directory_size(self._path)
            self._at = now
        return self._value


class EngineCollector(Collector):
    """Reads the store and the Raft client when Prometheus scrapes."""

    def __init__(self, store: object, raft: object) -> None:
        self._store = store
        self._raft = raft
        path = getattr(store, "path", None)
        self._disk = CachedDirectorySize(path) if path else None

    def collect(self) -> Iterator[Metric]:
        store, raft = self._store, self._raft
        yield _gauge("raftkv_engine_applied_index", "Raft index of the last entry this engine applied",
                     getattr(store, "applied_index", 0))
        yield _gauge("raftkv_engine_revision", "Store revision (one per successful mutating request)",
                     getattr(store, "revision", 0))
        try:
            keys = len(store)  # type: ignore[arg-type]
        except TypeError:
            keys = 0
        yield _gauge("raftkv_engine_keys", "Keys in the store", keys)
        if self._disk is not None:
            yield _gauge("raftkv_engine_leveldb_size_bytes",
                         f"Bytes of the LevelDB directory on disk (refreshed every {DISK_SIZE_CACHE_SECONDS:.0f} s)",
                         self._disk.get())
        stats = getattr(store, "stats", None)
        for attr, help_text in (("applies", "Raft entries applied by this process"),
                                ("skipped", "Raft entries skipped because already stored (log replay)"),
                                ("duplicates", "Proposals skipped because their (client, seq) was applied")):
            counter = CounterMetricFamily(f"raftkv_engine_{attr}", help_text)
            counter.add_metric([], getattr(stats, attr, 0))
            yield counter

        yield _gauge("raftkv_engine_writes_in_flight",
                     "Client writes accepted by this engine and not answered yet", getattr(raft, "_inflight", 0))
        pending = getattr(raft, "_pending", None)
        yield _gauge("raftkv_engine_writes_queued",
                     "Writes waiting for the next proposal (not sent to the sidecar yet)",
                     len(pending) if pending is not None else 0)
        limit = _proposal_limit(raft)
        free = getattr(getattr(raft, "_slots", None), "_value", None)
        if limit is not None and isinstance(free, int):
            yield _gauge("raftkv_engine_proposals_in_flight",
                         "Batched proposals sent to the sidecar and not answered yet", max(limit - free, 0))
            yield _gauge("raftkv_engine_proposals_limit", "Proposals the engine keeps in flight at most", limit)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_text)
    g.add_metric([], float(value))
    return g


def _proposal_limit(raft: object) -> int | None:
    module = sys.modules.get(type(raft).__module__)
    limit = getattr(raft, "max_concurrent_proposals", None) or getattr(module, "MAX_CONCURRENT_PROPOSALS", None)
    return limit if isinstance(limit, int) else None


def install(app: web.Application, store: object, raft: object) -> None:
    """Adds /metrics and the request-counting middleware to the client application."""
    registry = CollectorRegistry(auto_describe=True)
    install_http(app, registry, "raftkv_http", "Client HTTP")
    registry.register(EngineCollector(store, raft))
    # Writes per proposal, if the Raft client offers a hook for it (an attribute that is None
    # until set); reading batch sizes any other way would mean editing the client.
    if hasattr(raft, "batch_observer") and getattr(raft, "batch_observer") is None:
        batches = Histogram("raftkv_engine_proposal_batch_writes", "Client writes carried by one proposal",
                            buckets=BATCH_BUCKETS, registry=registry)
        raft.batch_observer = batches.observe  # type: ignore[attr-defined]
