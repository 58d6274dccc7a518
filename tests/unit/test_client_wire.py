"""Client-side /v1 encoding, error mapping, node lists and restore batching (no servers)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

import msgpack
import pytest

from raftkv import _endpoints, _transfer, _wire, backup
from raftkv._errors import (BadRange, CompareFailed, InternalError, NotFound, OutcomeUnknown,
                            ProtocolError, RestoreError, Unauthorized, Unavailable)
from raftkv._types import DeleteOp, PutOp


@pytest.mark.parametrize("key", [b"plain", b"with space+plus", b"\x00\xff/%?#&=", "ключ".encode(), b"a/b/c"])
def test_key_paths_round_trip_every_byte(key):
    path = _wire.kv_path(key)
    assert path.startswith("/v1/kv/") and "/" not in path[len("/v1/kv/"):]
    assert unquote_to_bytes(path[len("/v1/kv/"):]) == key


def test_query_bytes_are_percent_encoded_not_plus():
    q = _wire.range_query(start=b"a b+c", end=b"\xff", prefix=None, limit=10, after="tok en",
                          keys_only=True, consistency="local")
    params = dict(p.split("=", 1) for p in urlsplit(q).query.split("&"))
    assert unquote_to_bytes(params["start"]) == b"a b+c"
    assert unquote_to_bytes(params["end"]) == b"\xff"
    assert params["limit"] == "10" and params["keys_only"] == "true" and params["consistency"] == "local"
    assert unquote_to_bytes(params["after"]) == b"tok en"
    with pytest.raises(ValueError):
        _wire.range_query(start=b"a", end=None, prefix=b"p", limit=1, after=None, keys_only=False,
                          consistency=None)


def test_bodies():
    doc = msgpack.unpackb(_wire.put_body("v", expect_value=b"\x00", expect_version=0), raw=False)
    assert doc == {"value": b"v", "expect_value": b"\x00", "expect_version": 0}
    assert _wire.delete_body() is None
    assert msgpack.unpackb(_wire.delete_body(expect_mod_revision=7)) == {"expect_mod_revision": 7}
    body, n = _wire.txn_body([PutOp("k", b"v", expect_version=2), DeleteOp(b"d"),
                              {"op": "put", "key": "x", "value": "y"}])
    ops = msgpack.unpackb(body, raw=False)["ops"]
    assert n == 3 and ops[0] == {"op": "put", "key": b"k", "value": b"v", "expect_version": 2}
    assert ops[1] == {"op": "delete", "key": b"d"} and ops[2]["key"] == b"x"
    for bad in (lambda: _wire.put_body("v", expect_version=-1), lambda: _wire.txn_body([]),
                lambda: _wire.kv_path(b""), lambda: _wire.txn_body([{"op": "get", "key": "k"}])):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        _wire.put_body(123)  # type: ignore[arg-type]


def test_error_mapping():
    def err(status, doc=None, body=None, headers=None):
        raw = body if body is not None else msgpack.packb(doc)
        return _wire.error_from_answer(status, headers or {}, raw, "http://n1")
    e = err(412, {"error": {"code": "compare_failed", "message": "no"},
                  "current": {"exists": False, "version": 0, "mod_revision": 0, "create_revision": 0}})
    assert isinstance(e, CompareFailed) and e.current is not None and not e.current.exists
    e = err(412, {"error": {"code": "compare_failed", "message": "no"}, "failed": [1, 3]})
    assert isinstance(e, CompareFailed) and e.failed == [1, 3]
    assert isinstance(err(400, {"error": {"code": "bad_range", "message": "start >= end"}}), BadRange)
    assert isinstance(err(404, {"error": {"code": "not_found", "message": "k"}}), NotFound)
    assert isinstance(err(503, {"error": {"code": "no_leader", "message": "k"}}), Unavailable)
    assert isinstance(err(503, {"error": {"code": "outcome_unknown", "message": "k"}}), OutcomeUnknown)
    # Not /v1 documents: the original API's text, the management API's JSON, a proxy's HTML.
    assert isinstance(err(503, body=b"error: outcome unknown: timed out"), OutcomeUnknown)
    e = err(401, body=json.dumps({"error": "missing or wrong cluster token"}).encode(),
            headers={"content-type": "application/json"})
    assert isinstance(e, Unauthorized) and "cluster token" in str(e)
    assert isinstance(err(500, body=b"<html>"), InternalError)
    assert isinstance(err(418, body=b"teapot"), ProtocolError)


def test_answers():
    kv = _wire.key_value({"key": b"k", "value": b"v", "create_revision": 1, "mod_revision": 2,
                          "version": 3, "revision": 9})
    assert (kv.key, kv.value, kv.version, kv.revision) == (b"k", b"v", 3, 9)
    p = _wire.page({"kvs": [{"key": b"a", "create_revision": 1, "mod_revision": 1, "version": 1}],
                    "more": True, "next": "t", "revision": 5})
    assert p.kvs[0].value is None and p.more and p.next == "t"
    with pytest.raises(ProtocolError):
        _wire.page({"more": False})
    with pytest.raises(ProtocolError):
        _wire.doc_of(200, b"\xc1", "application/msgpack", "n")


def test_node_lists(tmp_path: Path):
    assert _endpoints.parse_url_list("http://h:8080,8081, 8082") == \
        ["http://h:8080", "http://h:8081", "http://h:8082"]
    ep = _endpoints.resolve(env={}, cluster_dir=tmp_path)
    assert ep.urls == list(_endpoints.DEFAULT_NODES) and ep.mgmt_urls == list(_endpoints.DEFAULT_MGMT)
    (tmp_path / "cluster.json").write_text(json.dumps(
        {"nodes": 2, "host": "127.0.0.1", "http_port": 9000, "mgmt_port": 7000, "raft_port": 1, "grpc_port": 2}))
    ep = _endpoints.resolve(env={}, cluster_dir=tmp_path)
    assert ep.urls == ["http://127.0.0.1:9000", "http://127.0.0.1:9001"]
    assert ep.mgmt_urls == ["http://127.0.0.1:7000", "http://127.0.0.1:7001"]
    # A subset of the cluster.json nodes keeps their management URLs; other nodes have none.
    ep = _endpoints.resolve("127.0.0.1:9001", env={}, cluster_dir=tmp_path)
    assert ep.mgmt_urls == ["http://127.0.0.1:7001"] and ep.source == "--nodes"
    ep = _endpoints.resolve(env={"RAFTKV_NODES": "h:1", "RAFTKV_MGMT": "h:2"}, cluster_dir=tmp_path)
    assert (ep.urls, ep.mgmt_urls, ep.source) == (["http://h:1"], ["http://h:2"], "RAFTKV_NODES")
    (tmp_path / "cluster.json").write_text("{")
    with pytest.raises(ValueError, match="cluster.json"):
        _endpoints.resolve(env={}, cluster_dir=tmp_path)


def _backup_file(path: Path, records) -> Path:
    with open(path, "wb") as f:
        backup.write(f, records, applied_index=5, revision=7, node="n1")
    return path


def test_restore_batches_respect_ops_and_bytes(tmp_path: Path):
    recs = [(f"k{i:04d}".encode(), b"v" * (i % 50), 1, 1, 1) for i in range(1234)]
    recs.append((b"big", b"x" * 5000, 1, 1, 1))
    path = _backup_file(tmp_path / "b", sorted(recs))
    assert _transfer.verify(path) == 1235
    batches = list(_transfer.batches(path, 500, 4000))
    flat = [(op["key"], op["value"]) for b in batches for op in b]
    assert flat == [(k, v) for k, v, *_ in sorted(recs)]
    assert all(len(b) <= 500 for b in batches)
    for b in batches:
        size = sum(len(op["key"]) + len(op["value"]) + _transfer.OP_OVERHEAD for op in b)
        assert size <= 4000 or len(b) == 1, "only a single record may exceed the byte budget"
    assert [len(b) for b in _transfer.batches(path, 500, 10 ** 9)] == [500, 500, 235]


def test_corrupt_backups_are_refused_before_anything_is_written(tmp_path: Path):
    path = _backup_file(tmp_path / "b", [(b"a", b"1", 1, 1, 1), (b"b", b"2", 2, 2, 1)])
    data = bytearray(path.read_bytes())
    data[len(backup.MAGIC) + 40] ^= 0x01
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    with pytest.raises(backup.BackupError):
        _transfer.verify(bad)
    (tmp_path / "short").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(backup.BackupError, match="truncated|corrupt"):
        _transfer.verify(tmp_path / "short")
    with pytest.raises(backup.BackupError, match="cannot read"):
        _transfer.verify(tmp_path / "missing")


def test_restore_txn_size_is_bounded():
    _transfer.check_txn_ops(1)
    _transfer.check_txn_ops(500)
    for bad in (0, 501, True, 2.5):
        with pytest.raises(ValueError):
            _transfer.check_txn_ops(bad)  # type: ignore[arg-type]


def test_count_check():
    _transfer.check_count(10, 0, 10, force=False)
    with pytest.raises(RestoreError, match="verification failed"):
        _transfer.check_count(10, 0, 9, force=False)
    _transfer.check_count(10, 5, 12, force=True)
    with pytest.raises(RestoreError):
        _transfer.check_count(10, 5, 16, force=True)
    with pytest.raises(RestoreError, match="not empty"):
        _transfer.refuse_non_empty(b"k")


def test_progress_line_only_when_asked():
    from raftkv._progress import ProgressLine

    buf = io.StringIO()
    p = ProgressLine("backup", "bytes", stream=buf)  # StringIO is not a terminal
    p.update(10, None, force=True)
    p.done(10)
    assert buf.getvalue() == ""
    p = ProgressLine("restore", "keys", enabled=True, stream=buf)
    p.update(50, 100, force=True)
    p.done(100, 100)
    assert "restore: 100 keys of 100 keys (100%)" in buf.getvalue() and buf.getvalue().endswith("\n")
