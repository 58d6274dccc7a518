"""The /v1 wire formats and request validation (storage_engine.formats, storage_engine.v1_requests): pure."""
from __future__ import annotations

import base64
import json

import msgpack
import pytest

from storage_engine import formats
from storage_engine.errors import ErrorKind, KVError
from storage_engine.formats import Query, V1Error
from storage_engine import v1_requests as r

LIMITS = r.Limits(max_key_bytes=16, max_value_bytes=32, max_scan_limit=50, max_txn_ops=3)


def code_of(fn, *args, **kw) -> str:
    with pytest.raises(V1Error) as info:
        fn(*args, **kw)
    return info.value.code


# -- formats -----------------------------------------------------------------------------------

def test_body_format_negotiation():
    assert formats.body_format(None) == "msgpack"
    assert formats.body_format("application/x-msgpack") == "msgpack"
    assert formats.body_format("application/json; charset=utf-8") == "json"
    assert formats.body_format("text/plain", raw_allowed=True) == "raw"
    assert code_of(formats.body_format, "text/plain") == "bad_request"
    assert code_of(formats.body_format, "application/x-www-form-urlencoded", True) == "bad_request"


@pytest.mark.parametrize("body,fmt", [
    (b"", "msgpack"), (b"\xc1", "msgpack"), (msgpack.packb({"a": 1}) + b"x", "msgpack"),
    (msgpack.packb([1, 2]), "msgpack"), (msgpack.packb({1: 2}), "msgpack"),
    (b"{", "json"), (b"[1]", "json"), (b"\xff\xfe", "json"), (b"[" * 100_000, "json"),
    (b'{"a": ' + b"9" * 5000 + b"}", "json"),
])
def test_decode_doc_refuses_malformed(body, fmt):
    assert code_of(formats.decode_doc, body, fmt) == "bad_request"


def test_byte_fields_plain_b64_and_types():
    assert formats.get_bytes({"key": "é"}, "key") == "é".encode()
    assert formats.get_bytes({"key": b"\xff"}, "key") == b"\xff"
    assert formats.get_bytes({"key_b64": base64.b64encode(b"\xff\x00").decode()}, "key") == b"\xff\x00"
    assert formats.get_bytes({"key_b64": "_w"}, "key") == b"\xff"  # URL-safe, no padding
    assert code_of(formats.get_bytes, {"key": 1}, "key") == "bad_request"
    assert code_of(formats.get_bytes, {"key": "a", "key_b64": "YQ"}, "key") == "bad_request"
    assert code_of(formats.get_bytes, {"key_b64": "!!"}, "key") == "bad_request"
    assert code_of(formats.get_bytes, {}, "key", required=True) == "bad_request"


def test_json_answers_use_b64_only_for_non_utf8():
    body, ctype = formats.encode({"kvs": [{"key": b"a", "value": b"\xff"}], "n": 1}, as_json=True)
    assert ctype == "application/json"
    assert json.loads(body) == {"kvs": [{"key": "a", "value_b64": base64.b64encode(b"\xff").decode()}], "n": 1}
    body, ctype = formats.encode({"key": b"\xff"}, as_json=False)
    assert ctype == "application/msgpack" and msgpack.unpackb(body) == {"key": b"\xff"}


def test_query_is_decoded_to_bytes_and_refuses_duplicates():
    q = Query("/v1/range?start=%FF%00a&end=b+c&format=json")
    assert q.bytes_param("start") == b"\xff\x00a" and q.bytes_param("end") == b"b+c"
    assert formats.wants_json(None, q)
    assert not formats.wants_json("application/json", Query("/x?format=msgpack"))
    assert formats.wants_json("text/html, Application/JSON", Query("/x"))
    assert code_of(Query("/x?a=1&a=2").check) == "bad_request"
    assert code_of(formats.check_format_param, Query("/x?format=xml")) == "bad_request"


def test_kv_errors_map_to_codes():
    assert V1Error.from_kv(KVError(ErrorKind.OVERLOADED, "x")).status == 429
    assert V1Error.from_kv(KVError(ErrorKind.NO_QUORUM, "x")).code == "unavailable"
    assert V1Error.from_kv(KVError(ErrorKind.OUTCOME_UNKNOWN, "x")).code == "outcome_unknown"
    assert V1Error.from_kv(KVError(ErrorKind.NOT_APPLIED, "x")).code == "no_leader"
    assert V1Error.from_kv(KVError(ErrorKind.TOO_LARGE, "x")).status == 413


# -- requests --------------------------------------------------------------------------------------

def test_put_doc_raw_and_query_conditions():
    spec = r.parse_put(b"k", "msgpack", b"", {"value": b"v", "expect_version": 0}, Query("/"), LIMITS)
    assert (spec.value, spec.expect_version, spec.expect_value) == (b"v", 0, None)
    spec = r.parse_put(b"k", "raw", b"raw", None, Query("/?expect_mod_revision=7&expect_value=%00"), LIMITS)
    assert (spec.value, spec.expect_mod_revision, spec.expect_value) == (b"raw", 7, b"\x00")
    assert code_of(r.parse_put, b"k", "json", b"", {"value": "v", "expect_verison": 1}, Query("/"), LIMITS) \
        == "bad_request"
    assert code_of(r.parse_put, b"k", "json", b"", {"value": "v", "expect_version": "1"}, Query("/"), LIMITS) \
        == "bad_request"
    assert code_of(r.parse_put, b"k", "json", b"", {"value": "v", "expect_version": -1}, Query("/"), LIMITS) \
        == "bad_request"
    assert code_of(r.parse_put, b"k", "json", b"", {"value": "v", "expect_version": True}, Query("/"), LIMITS) \
        == "bad_request"
    assert code_of(r.parse_put, b"k", "raw", b"x" * 33, None, Query("/"), LIMITS) == "too_large"
    assert code_of(r.parse_put, b"k" * 17, "raw", b"", None, Query("/"), LIMITS) == "too_large"
    assert code_of(r.parse_put, b"", "raw", b"", None, Query("/"), LIMITS) == "bad_request"
    assert code_of(r.parse_put, b"k", "raw", b"", None, Query("/?expect_version=x"), LIMITS) == "bad_request"


def test_txn_validation():
    ops = r.parse_txn({"ops": [{"op": "put", "key": "a", "value": "1"},
                               {"op": "DELETE", "key_b64": "/w==", "expect_version": 0}]}, LIMITS)
    assert [(o.op, o.key) for o in ops] == [("put", b"a"), ("delete", b"\xff")]
    assert code_of(r.parse_txn, {"ops": [{"op": "put", "key": "a", "value": "1"}] * 4}, LIMITS) == "too_large"
    for bad_doc in ({}, {"ops": {}}, {"ops": []}, {"ops": [1]}, {"ops": [{"op": "get", "key": "a"}]},
                    {"ops": [{"op": "put", "key": "a"}]}, {"ops": [{"op": "put", "key": "", "value": ""}]},
                    {"ops": [{"op": "delete", "key": "a", "value": "x"}]}, {"ops": [], "extra": 1}):
        assert code_of(r.parse_txn, bad_doc, LIMITS) == "bad_request", bad_doc


def test_range_bounds_prefix_limit_and_token():
    spec = r.parse_range(Query("/?prefix=ab"), LIMITS)
    assert (spec.start, spec.end, spec.limit, spec.keys_only) == (b"ab", b"ac", 50, False)
    assert r.prefix_end(b"a\xff\xff") == b"b" and r.prefix_end(b"\xff") is None
    token = r.make_token(b"k\x00\xff")
    spec = r.parse_range(Query(f"/?start=a&limit=5&keys_only=1&after={token}"), LIMITS)
    assert (spec.start, spec.limit, spec.keys_only) == (b"k\x00\xff\x00", 5, True)
    for qs in ("start=b&end=a", "start=a&end=a", "limit=0", "limit=51", "limit=-1", "limit=x",
               "prefix=a&start=a", "prefix=a&end=b", "after=zzz", "after=k!!"):
        assert code_of(r.parse_range, Query("/?" + qs), LIMITS) == "bad_range", qs
    assert code_of(r.parse_range, Query("/?keys_only=maybe"), LIMITS) == "bad_request"


def test_identity_headers():
    assert r.identity({}) is None
    ident = r.identity({"X-RaftKV-Client": "c-1", "X-RaftKV-Seq": "5", "X-RaftKV-Floor": "3"})
    assert (ident.client_id, ident.seq, ident.floor) == ("c-1", 5, 3)
    assert r.identity({"X-RaftKV-Client": "c", "X-RaftKV-Seq": "5"}).floor == 0
    for h in ({"X-RaftKV-Client": "c"}, {"X-RaftKV-Seq": "1"},
              {"X-RaftKV-Client": "a:b", "X-RaftKV-Seq": "1"}, {"X-RaftKV-Client": "x" * 65, "X-RaftKV-Seq": "1"},
              {"X-RaftKV-Client": "c", "X-RaftKV-Seq": "0"}, {"X-RaftKV-Client": "c", "X-RaftKV-Seq": "-1"},
              {"X-RaftKV-Client": "c", "X-RaftKV-Seq": str(1 << 64)},
              {"X-RaftKV-Client": "c", "X-RaftKV-Seq": "2", "X-RaftKV-Floor": "3"}):
        assert code_of(r.identity, h) == "bad_request", h
