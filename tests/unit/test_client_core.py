"""The client's retry rules (raftkv/_core.py), driven with scripted answers and a fake clock.

No servers: each test scripts what the "network" answers to each attempt and checks where
the client sent it, with which identity, and what it finally raised or returned.
"""
from __future__ import annotations

import json
from typing import Callable

import msgpack
import pytest

from raftkv import _core
from raftkv._core import WRITE, Answer, ClientOptions, Core, Failure, Request, Sleep
from raftkv._errors import CompareFailed, NotFound, OutcomeUnknown, Overloaded, Unavailable

URLS = ["http://n1:8080", "http://n2:8080", "http://n3:8080"]
MGMT = ["http://n1:6000", "http://n2:6000", "http://n3:6000"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()

    class _Time:
        monotonic = staticmethod(c.monotonic)

    monkeypatch.setattr(_core, "time", _Time)
    return c


def v1_error(status: int, code: str, message: str = "x", **extra) -> Answer:
    return Answer(status, {"content-type": "application/msgpack"},
                  msgpack.packb({"error": {"code": code, "message": message}, **extra}), "")


def ok(doc: dict | None = None, **headers: str) -> Answer:
    return Answer(200, {"content-type": "application/msgpack", **headers},
                  msgpack.packb(doc or {"revision": 1}), "")


def drive(gen, answer: Callable[[Request], object], clock: FakeClock | None = None):
    """Runs an operation; answer(request) gives the scripted outcome. Returns (result or
    exception, requests sent, total sleep)."""
    sent: list[Request] = []
    slept = 0.0
    try:
        step = next(gen)
        while True:
            if isinstance(step, Sleep):
                slept += step.seconds
                if clock is not None:
                    clock.now += step.seconds
                out = None
            else:
                sent.append(step)
                out = answer(step)
                if clock is not None:
                    clock.now += 0.001
            step = gen.send(out)
    except StopIteration as stop:
        return stop.value, sent, slept
    except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
        return exc, sent, slept


def core(mgmt=None, **opts) -> Core:
    return Core(URLS, mgmt, ClientOptions(**{"retry_for": 5.0, **opts}))


def test_write_retries_through_other_nodes_with_the_same_identity(clock):
    c = core()
    answers = iter([Failure(False, "connection refused"), Failure(True, "connection reset"), ok()])
    res, sent, _ = drive(c.call("PUT", "/v1/kv/a", b"body", kind=WRITE), lambda r: next(answers), clock)
    assert isinstance(res, Answer) and res.status == 200
    assert len({r.node for r in sent}) == 3, "each attempt went to another node"
    ids = {(r.headers["X-RaftKV-Client"], r.headers["X-RaftKV-Seq"]) for r in sent}
    assert len(ids) == 1, f"every attempt must carry the same (client, seq): {ids}"
    assert all(r.body == b"body" for r in sent)


def test_definite_failures_only_give_unavailable_not_outcome_unknown(clock):
    c = core()
    res, sent, slept = drive(c.call("PUT", "/v1/kv/a", b"b", kind=WRITE),
                             lambda r: v1_error(503, "no_leader", "no Raft leader"), clock)
    assert type(res) is Unavailable, res
    assert len(sent) > 3 and slept > 0, "it retried with backoff until the budget ran out"
    assert clock.now - 1000.0 <= 5.0 + 1.1


def test_an_ambiguous_attempt_makes_the_final_failure_outcome_unknown(clock):
    c = core()
    answers = iter([Failure(True, "read timed out")])
    res, sent, _ = drive(c.call("PUT", "/v1/kv/a", b"b", kind=WRITE),
                         lambda r: next(answers, v1_error(503, "no_leader")), clock)
    assert isinstance(res, OutcomeUnknown), res
    assert "read timed out" in str(res) and "may have been applied" in str(res)


def test_outcome_unknown_answer_then_definite_answer_is_definite(clock):
    c = core()
    answers = iter([v1_error(503, "outcome_unknown", "outcome unknown: timed out"),
                    v1_error(412, "compare_failed", "no", current={"exists": True, "version": 4,
                                                                  "mod_revision": 9, "create_revision": 2})])
    res, sent, _ = drive(c.call("PUT", "/v1/kv/a", b"b", kind=WRITE), lambda r: next(answers), clock)
    assert isinstance(res, CompareFailed)
    assert res.current is not None and (res.current.version, res.current.mod_revision) == (4, 9)
    assert sent[0].headers["X-RaftKV-Seq"] == sent[1].headers["X-RaftKV-Seq"]


def test_compare_failed_and_not_found_are_not_retried(clock):
    c = core()
    res, sent, _ = drive(c.call("PUT", "/v1/kv/a", b"b", kind=WRITE),
                         lambda r: v1_error(412, "compare_failed"), clock)
    assert isinstance(res, CompareFailed) and len(sent) == 1
    res, sent, _ = drive(c.call("GET", "/v1/kv/a"), lambda r: v1_error(404, "not_found"), clock)
    assert isinstance(res, NotFound) and len(sent) == 1


def test_internal_error_on_a_write_is_retried_and_counts_as_ambiguous(clock):
    c = core(retry_for=1.0)
    res, sent, _ = drive(c.call("POST", "/v1/txn", b"b", kind=WRITE),
                         lambda r: v1_error(500, "internal", "boom"), clock)
    assert isinstance(res, OutcomeUnknown) and len(sent) > 1
    res, sent, _ = drive(c.call("GET", "/v1/kv/a"), lambda r: v1_error(500, "internal", "boom"), clock)
    assert not isinstance(res, OutcomeUnknown) and len(sent) == 1


def test_overloaded_waits_for_retry_after(clock):
    c = core()
    answers = iter([Answer(429, {"retry-after": "0.7", "content-type": "application/msgpack"},
                           msgpack.packb({"error": {"code": "overloaded", "message": "busy"}}), ""), ok()])
    res, sent, slept = drive(c.call("PUT", "/v1/kv/a", b"b", kind=WRITE), lambda r: next(answers), clock)
    assert isinstance(res, Answer) and slept >= 0.7
    c = core(retry_for=0.5)
    res, _, _ = drive(c.call("PUT", "/v1/kv/a", b"b", kind=WRITE),
                      lambda r: Answer(429, {"retry-after": "1"}, msgpack.packb(
                          {"error": {"code": "overloaded", "message": "busy"}}), ""), clock)
    assert isinstance(res, Overloaded) and res.retry_after == 1.0


def test_floor_is_the_lowest_sequence_still_in_flight():
    ident = _core.Identity()
    a, b, c = ident.begin(), ident.begin(), ident.begin()
    assert (a, b, c) == (1, 2, 3) and ident.floor() == 1
    ident.end(b)
    assert ident.floor() == 1
    ident.end(a)
    assert ident.floor() == 3
    ident.end(c)
    assert ident.floor() == 4, "nothing in flight: every seq below the next one may be forgotten"
    h = ident.headers(ident.begin())
    assert h["X-RaftKV-Seq"] == "4" and h["X-RaftKV-Floor"] == "4"


def test_identity_header_floor_tracks_concurrent_operations(clock):
    c = core()
    first = c.call("PUT", "/v1/kv/a", b"1", kind=WRITE)
    r1 = next(first)  # seq 1 in flight
    second = c.call("PUT", "/v1/kv/b", b"2", kind=WRITE)
    r2 = next(second)
    assert (r1.headers["X-RaftKV-Seq"], r2.headers["X-RaftKV-Seq"]) == ("1", "2")
    assert r2.headers["X-RaftKV-Floor"] == "1", "seq 1 may still be retried"
    with pytest.raises(StopIteration):
        first.send(ok())
    r2b = second.send(Failure(False, "refused"))
    assert r2b.headers["X-RaftKV-Seq"] == "2" and r2b.headers["X-RaftKV-Floor"] == "2"
    second.close()


def test_reads_are_spread_over_the_nodes(clock):
    c = core()
    firsts = []
    for _ in range(9):
        res, sent, _ = drive(c.call("GET", "/v1/kv/a"), lambda r: ok(), clock)
        firsts.append(sent[0].node)
    assert {u: firsts.count(u) for u in URLS} == {u: 3 for u in URLS}
    assert all("X-RaftKV-Seq" not in r.headers for r in sent), "reads carry no write identity"


def test_leader_is_found_from_the_management_api(clock):
    c = core(mgmt=MGMT)
    status = {"node_id": "node1", "is_leader": False, "leader_id": "node3", "term": 2,
              "members": [{"id": f"node{i}", "address": f"n{i}:8088", "mgmt": f"n{i}:6000"} for i in (1, 2, 3)]}

    def answer(r: Request):
        if r.url.endswith("/status"):
            return Answer(200, {"content-type": "application/json"}, json.dumps(status).encode(), "")
        return ok()
    res, sent, _ = drive(c.call("PUT", "/v1/kv/a", b"b", kind=WRITE), answer, clock)
    assert isinstance(res, Answer)
    assert sent[-1].node == "http://n3:8080", [r.url for r in sent]
    # The hint is kept: the next write goes straight to the leader, no /status round.
    res, sent, _ = drive(c.call("PUT", "/v1/kv/b", b"b", kind=WRITE), answer, clock)
    assert [r.node for r in sent] == ["http://n3:8080"]


def test_a_failing_leader_is_forgotten_and_looked_up_again(clock):
    c = core(mgmt=MGMT)
    leader = {"id": "node1"}

    def answer(r: Request):
        if r.url.endswith("/status"):
            doc = {"node_id": "x", "is_leader": False, "leader_id": leader["id"],
                   "members": [{"id": f"node{i}", "address": f"n{i}:8088", "mgmt": f"n{i}:6000"}
                               for i in (1, 2, 3)]}
            return Answer(200, {}, json.dumps(doc).encode(), "")
        if r.node == "http://n1:8080":
            leader["id"] = "node2"  # node1 died; node2 won the election
            return Failure(False, "connection refused")
        return ok()
    res, sent, _ = drive(c.call("PUT", "/v1/kv/a", b"b", kind=WRITE), answer, clock)
    assert isinstance(res, Answer)
    writes = [r.node for r in sent if "/v1/" in r.url]
    assert writes[0] == "http://n1:8080" and writes[-1] in ("http://n2:8080", "http://n3:8080")
    assert c.leader_url() in (None, "http://n2:8080")


def test_gives_up_early_when_nothing_listens(clock):
    c = core(retry_for=60.0, down_grace=2.0)
    res, sent, _ = drive(c.call("GET", "/v1/kv/a"), lambda r: Failure(False, "connection refused"), clock)
    assert isinstance(res, Unavailable) and res.code == "connection"
    assert clock.now - 1000.0 < 4.0, "did not wait for the whole retry budget"
    # A write to a cluster where one node still answers keeps trying for the budget.
    c = core(retry_for=6.0, down_grace=1.0)
    res, sent, _ = drive(c.call("PUT", "/v1/kv/a", b"b", kind=WRITE),
                         lambda r: v1_error(503, "no_leader") if r.node == "http://n2:8080"
                         else Failure(False, "refused"), clock)
    assert isinstance(res, Unavailable) and clock.now - 1000.0 > 4.0


def test_url_forms():
    assert _core.normalize_url("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert _core.normalize_url("8081") == "http://127.0.0.1:8081"
    assert _core.normalize_url("https://h:1/") == "https://h:1"
    for bad in ("ftp://h:1", "http://h:1/path", "http://h:x", ""):
        with pytest.raises(ValueError):
            _core.normalize_url(bad)
    with pytest.raises(ValueError):
        _core.Identity("has space")
