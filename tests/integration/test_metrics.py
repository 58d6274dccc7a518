"""GET /metrics on both processes of a real cluster: names present, values that move with the load."""
from __future__ import annotations

from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster, Node, get, http_get, put, wait_until

WRITES = 25
READS = 10

ENGINE_METRICS = {
    "raftkv_http_requests", "raftkv_http_request_duration_seconds", "raftkv_http_requests_in_progress",
    "raftkv_engine_applied_index", "raftkv_engine_revision", "raftkv_engine_keys",
    "raftkv_engine_leveldb_size_bytes", "raftkv_engine_writes_in_flight", "raftkv_engine_writes_queued",
    "raftkv_engine_proposals_in_flight", "raftkv_engine_applies", "raftkv_engine_skipped",
    "raftkv_engine_duplicates",
}
SIDECAR_METRICS = {
    "raftkv_raft_term", "raftkv_raft_commit_index", "raftkv_raft_last_applied_index",
    "raftkv_sidecar_applied_index", "raftkv_sidecar_engine_applied_index", "raftkv_sidecar_apply_lag_entries",
    "raftkv_sidecar_apply_queue_entries", "raftkv_sidecar_apply_calls", "raftkv_sidecar_apply_call_entries",
    "raftkv_raft_is_leader", "raftkv_raft_has_leader",
    "raftkv_raft_members", "raftkv_raft_leader_changes", "raftkv_raft_became_leader",
    "raftkv_raft_log_entries", "raftkv_raft_peer_connected", "raftkv_raft_proposals_in_flight",
    "raftkv_mgmt_requests", "raftkv_mgmt_request_duration_seconds",
}


class Scrape:
    """One parsed /metrics answer: families by name, samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset], float] = {}
        for fam in self.families.values():
            for s in fam.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, default: float | None = None, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            if default is not None:
                return default
            raise AssertionError(f"no sample {name}{labels} in /metrics:\n{self.text}")
        return self.samples[key]

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(lbls)[label] for (n, lbls) in self.samples if n == name and label in dict(lbls)}


def scrape(url: str) -> Scrape:
    r = http_get(f"{url}/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain"), r.headers
    return Scrape(r.text)


@pytest.fixture(scope="module")
def c(module_cluster: Cluster) -> Cluster:
    return module_cluster


def follower(c: Cluster) -> Node:
    return c.followers()[0]


def test_engine_metrics_move_with_writes_and_reads(c: Cluster):
    node = follower(c)
    before = scrape(node.http_url)
    missing = ENGINE_METRICS - set(before.families)
    assert not missing, f"engine /metrics lacks {sorted(missing)}"

    for i in range(WRITES):
        assert put(node.http_url, f"metrics-{i}", "v").status_code == 200
    for i in range(READS):
        assert get(node.http_url, f"metrics-{i}").status_code == 200
    assert get(node.http_url, "metrics-absent").status_code == 404
    after = scrape(node.http_url)

    def count(s: Scrape, endpoint: str, method: str, status: str) -> float:
        return s.value("raftkv_http_requests_total", 0.0, endpoint=endpoint, method=method, status=status)

    assert count(after, "/insert-val", "POST", "200") - count(before, "/insert-val", "POST", "200") >= WRITES
    assert count(after, "/get-val", "GET", "200") - count(before, "/get-val", "GET", "200") >= READS
    assert count(after, "/get-val", "GET", "404") - count(before, "/get-val", "GET", "404") >= 1
    hist = "raftkv_http_request_duration_seconds_count"
    assert after.value(hist, endpoint="/insert-val", method="POST", status="200") - \
        before.value(hist, 0.0, endpoint="/insert-val", method="POST", status="200") >= WRITES
    assert after.value("raftkv_engine_applied_index") >= before.value("raftkv_engine_applied_index") + 1
    assert after.value("raftkv_engine_applies_total") >= before.value("raftkv_engine_applies_total") + 1
    # Every successful /insert-val bumps the store revision once (v1 contract).
    assert after.value("raftkv_engine_revision") >= before.value("raftkv_engine_revision") + WRITES
    assert after.value("raftkv_engine_keys") >= before.value("raftkv_engine_keys") + WRITES
    assert after.value("raftkv_engine_leveldb_size_bytes") > 0
    assert after.value("raftkv_engine_writes_in_flight") == 0
    # /metrics does not count itself.
    assert "/metrics" not in after.label_values("raftkv_http_requests_total", "endpoint")


def test_engine_metrics_label_routes_not_raw_paths(c: Cluster):
    """A key in the path must not become a label value: one series per route template."""
    node = follower(c)
    keys = [f"card-{i}" for i in range(5)]
    for k in keys:
        http_get(f"{node.http_url}/v1/kv/{quote(k)}")
        http_get(f"{node.http_url}/no-such-route/{k}")
    s = scrape(node.http_url)
    endpoints = s.label_values("raftkv_http_requests_total", "endpoint")
    assert "/v1/kv/{key}" in endpoints, endpoints
    assert "unmatched" in endpoints, endpoints
    for k in keys:
        assert k not in s.text, f"raw path with {k!r} leaked into the labels"


def test_sidecar_metrics_follow_raft_state(c: Cluster):
    leader = c.leader()
    before = {n.node_id: scrape(n.mgmt_url) for n in c.nodes}
    for node_id, s in before.items():
        missing = SIDECAR_METRICS - set(s.families)
        assert not missing, f"{node_id} sidecar /metrics lacks {sorted(missing)}"
    assert [n.node_id for n in c.nodes if before[n.node_id].value("raftkv_raft_is_leader") == 1] == [leader.node_id]
    for node_id, s in before.items():
        assert s.value("raftkv_raft_members") == 3, node_id
        assert s.value("raftkv_raft_has_leader") == 1, node_id
        assert s.value("raftkv_raft_term") >= 1, node_id
        assert s.value("raftkv_raft_leader_changes_total") >= 1, node_id  # it learned a leader once
    assert before[leader.node_id].value("raftkv_raft_became_leader_total") >= 1
    peers = before[leader.node_id].label_values("raftkv_raft_peer_connected", "peer")
    assert peers == {n.raft_addr for n in c.nodes if n is not leader}

    via = follower(c)
    for i in range(WRITES):
        assert put(via.http_url, f"side-{i}", "v").status_code == 200
    for _ in range(3):
        via.status()

    def moved() -> bool:
        after = {n.node_id: scrape(n.mgmt_url) for n in c.nodes}
        for n in c.nodes:
            a, b = after[n.node_id], before[n.node_id]
            if a.value("raftkv_raft_commit_index") < b.value("raftkv_raft_commit_index") + WRITES:
                return False
            if a.value("raftkv_sidecar_applied_index") < b.value("raftkv_sidecar_applied_index") + WRITES:
                return False
            if a.value("raftkv_sidecar_engine_applied_index") <= b.value("raftkv_sidecar_engine_applied_index"):
                return False
        return True
    # Followers learn the commit index with the next message from the leader: poll briefly.
    wait_until(moved, 10, what="commit and applied indices to grow on every sidecar")

    after = scrape(via.mgmt_url)
    status_calls = after.value("raftkv_mgmt_requests_total", endpoint="/status", method="GET", status="200") - \
        before[via.node_id].value("raftkv_mgmt_requests_total", 0.0, endpoint="/status", method="GET", status="200")
    assert status_calls >= 3
    assert after.value("raftkv_sidecar_apply_lag_entries") >= 0
    assert "/metrics" not in after.label_values("raftkv_mgmt_requests_total", "endpoint")
    # Every node delivered the writes to its engine; an apply request carries one entry or more.
    for n in c.nodes:
        a, b = scrape(n.mgmt_url), before[n.node_id]
        entries = a.value("raftkv_sidecar_apply_call_entries_total") - b.value("raftkv_sidecar_apply_call_entries_total")
        calls = a.value("raftkv_sidecar_apply_calls_total") - b.value("raftkv_sidecar_apply_calls_total")
        assert entries >= WRITES and 1 <= calls <= entries, (n.node_id, calls, entries)
