"""The /v1 client API (docs/api.md) on a real 3-node cluster: every endpoint, both formats,
every error path, txn atomicity, binary keys, follower reads, exactly-once request identity
across nodes, and the streamed backup."""
from __future__ import annotations

import base64
import http.client
import json
import threading
from typing import Any
from urllib.parse import quote_from_bytes

import msgpack
import pytest
import requests

from raftkv import backup
from tests.cluster import Cluster, Node, get, put, wait_until

MAX_VALUE = 1 << 20


# -- a tiny /v1 client over requests -----------------------------------------------------------------

class Answer:
    def __init__(self, resp: requests.Response) -> None:
        self.resp = resp
        self.status = resp.status_code
        self.headers = resp.headers
        ctype = resp.headers.get("Content-Type", "")
        if "json" in ctype:
            self.doc: Any = json.loads(resp.content)
        elif "msgpack" in ctype:
            self.doc = msgpack.unpackb(resp.content, raw=False)
        else:
            self.doc = resp.content
        self.json = "json" in ctype

    @property
    def code(self) -> str | None:
        err = self.doc.get("error") if isinstance(self.doc, dict) else None
        return err.get("code") if isinstance(err, dict) else None

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.doc!r})"


def kpath(key: bytes | str) -> str:
    k = key.encode() if isinstance(key, str) else key
    return "/v1/kv/" + quote_from_bytes(k, safe="")


def jsonable(doc: Any) -> Any:
    """bytes fields as JSON requests carry them: text when UTF-8, else `<name>_b64`."""
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            if isinstance(v, bytes):
                try:
                    out[k] = v.decode("utf-8")
                except UnicodeDecodeError:
                    out[k + "_b64"] = base64.b64encode(v).decode()
            else:
                out[k] = jsonable(v)
        return out
    if isinstance(doc, list):
        return [jsonable(x) for x in doc]
    return doc


def call(node: Node, method: str, path: str, *, doc: Any = None, as_json: bool = False,
         data: bytes | None = None, ctype: str | None = None, headers: dict[str, str] | None = None,
         answer_json: bool | None = None, timeout: float = 10.0) -> Answer:
    """One request. `doc` is sent as msgpack (or JSON with as_json); answers in msgpack unless
    answer_json (default: the request's format)."""
    hdrs = dict(headers or {})
    if doc is not None:
        data = json.dumps(jsonable(doc)).encode() if as_json else msgpack.packb(doc, use_bin_type=True)
        ctype = ctype or ("application/json" if as_json else "application/msgpack")
    if ctype:
        hdrs["Content-Type"] = ctype
    if answer_json if answer_json is not None else as_json:
        hdrs["Accept"] = "application/json"
    with requests.Session() as s:
        s.trust_env = False
        resp = s.request(method, node.http_url + path, data=data, headers=hdrs, timeout=timeout)
    return Answer(resp)


def kv_put(node: Node, key: bytes | str, value: bytes | str, **kw: Any) -> Answer:
    v = value.encode() if isinstance(value, str) else value
    return call(node, "PUT", kpath(key), doc={"value": v, **kw.pop("cond", {})}, **kw)


def kv_get(node: Node, key: bytes | str, consistency: str | None = None, **kw: Any) -> Answer:
    q = f"?consistency={consistency}" if consistency else ""
    return call(node, "GET", kpath(key) + q, **kw)


def revision(node: Node) -> int:
    a = call(node, "GET", "/v1/range?limit=1&keys_only=true")
    assert a.status == 200, a
    return a.doc["revision"]


def scan_all(node: Node, query: str, limit: int = 1000) -> list[dict]:
    out: list[dict] = []
    after = ""
    while True:
        a = call(node, "GET", f"/v1/range?{query}&limit={limit}{after}")
        assert a.status == 200, a
        assert len(a.doc["kvs"]) <= limit
        out += a.doc["kvs"]
        if not a.doc["more"]:
            assert a.doc["next"] is None
            return out
        after = f"&after={a.doc['next']}"


def ident(client: str, seq: int, floor: int | None = None) -> dict[str, str]:
    h = {"X-RaftKV-Client": client, "X-RaftKV-Seq": str(seq)}
    if floor is not None:
        h["X-RaftKV-Floor"] = str(floor)
    return h


@pytest.fixture(scope="module")
def c(module_cluster: Cluster) -> Cluster:
    module_cluster.leader()
    return module_cluster


# -- health, formats ------------------------------------------------------------------------------------

def test_health_in_both_formats(c: Cluster):
    n = c.nodes[0]
    a = call(n, "GET", "/v1/health")
    assert (a.status, a.doc, a.headers["Content-Type"].split(";")[0]) == (200, {"ok": True}, "application/msgpack")
    a = call(n, "GET", "/v1/health", answer_json=True)
    assert (a.status, a.doc, a.json) == (200, {"ok": True}, True)
    a = call(n, "GET", "/v1/health?format=json")
    assert (a.doc, a.json) == ({"ok": True}, True)
    a = call(n, "GET", "/v1/health?format=msgpack", answer_json=True)
    assert (a.doc, a.json) == ({"ok": True}, False)


@pytest.mark.parametrize("as_json", [False, True], ids=["msgpack", "json"])
def test_put_get_delete_through_different_nodes(c: Cluster, as_json: bool):
    n1, n2, n3 = c.nodes
    key = f"crud-{as_json}"
    a = kv_put(n1, key, "v1", as_json=as_json)
    assert a.status == 200, a
    r1 = a.doc["revision"]
    assert a.doc == {"revision": r1, "key": key if as_json else key.encode(), "version": 1,
                     "create_revision": r1, "mod_revision": r1}
    g = kv_get(n2, key, as_json=as_json)
    assert g.status == 200, g
    assert g.doc["value"] == ("v1" if as_json else b"v1")
    assert (g.doc["version"], g.doc["create_revision"], g.doc["mod_revision"]) == (1, r1, r1)
    assert g.doc["revision"] >= r1

    a = kv_put(n3, key, "v2", as_json=as_json)
    assert a.status == 200, a
    r2 = a.doc["revision"]
    assert r2 > r1 and (a.doc["version"], a.doc["create_revision"], a.doc["mod_revision"]) == (2, r1, r2)
    g = kv_get(n1, key, as_json=as_json)
    assert (g.doc["value"], g.doc["version"], g.doc["mod_revision"]) == (("v2" if as_json else b"v2"), 2, r2)

    d = call(n2, "DELETE", kpath(key), answer_json=as_json)
    assert d.status == 200 and d.doc["deleted"] == 1 and d.doc["revision"] > r2, d
    g = kv_get(n3, key, as_json=as_json)
    assert (g.status, g.code) == (404, "not_found"), g
    again = call(n1, "DELETE", kpath(key), answer_json=as_json)
    assert again.status == 200 and again.doc == {"deleted": 0, "revision": d.doc["revision"]}, again
    # Re-creating starts a new life: version 1, a new create_revision.
    a = kv_put(n1, key, "v3", as_json=as_json)
    assert a.doc["version"] == 1 and a.doc["create_revision"] > d.doc["revision"]


def test_raw_body_put_with_query_conditions(c: Cluster):
    n = c.nodes[1]
    a = call(n, "PUT", kpath("raw-1") + "?expect_version=0", data=b"\x00\xffbinary", ctype="application/octet-stream")
    assert a.status == 200 and a.doc["version"] == 1, a
    assert kv_get(n, "raw-1").doc["value"] == b"\x00\xffbinary"
    a = call(n, "PUT", kpath("raw-1") + "?expect_version=0", data=b"again", ctype="text/plain")
    assert a.status == 412 and a.code == "compare_failed" and a.doc["current"]["exists"] is True, a
    a = call(n, "PUT", kpath("raw-1") + "?expect_value=%00%FFbinary&expect_version=1", data=b"text value",
             ctype="text/plain; charset=utf-8")
    assert a.status == 200 and a.doc["version"] == 2, a
    assert get(n.http_url, "raw-1").text == "text value"  # the original endpoint sees the same keyspace


def test_shared_keyspace_and_revisions_with_original_endpoints(c: Cluster):
    n1, n2, _ = c.nodes
    r0 = revision(n1)
    assert put(n1.http_url, "orig-key", "from insert-val").status_code == 200
    r1 = revision(n1)
    assert r1 == r0 + 1  # one /insert-val SET = one revision
    g = kv_get(n2, "orig-key")
    assert g.doc["value"] == b"from insert-val" and g.doc["mod_revision"] == r1
    assert kv_put(n2, "orig-key", "from v1").status == 200
    assert get(n1.http_url, "orig-key").text == "from v1"


# -- conditions -----------------------------------------------------------------------------------------

def test_cas_mismatch_by_value_version_and_mod_revision(c: Cluster):
    n1, n2, n3 = c.nodes
    first = kv_put(n1, "cas", "one").doc
    second = kv_put(n1, "cas", "two").doc
    before = revision(n1)
    for cond in ({"expect_value": b"one"}, {"expect_version": 1}, {"expect_mod_revision": first["mod_revision"]},
                 {"expect_value": b"two", "expect_version": 1}):
        a = kv_put(n2, "cas", "lost", cond=cond)
        assert a.status == 412 and a.code == "compare_failed", (cond, a)
        assert a.doc["current"] == {"exists": True, "version": 2, "mod_revision": second["mod_revision"],
                                    "create_revision": first["create_revision"]}, a
        assert "value" not in a.doc["current"]
    assert revision(n3) == before  # a failed compare does not bump the revision
    assert kv_get(n3, "cas").doc["value"] == b"two"
    a = kv_put(n3, "cas", "three", cond={"expect_value": b"two", "expect_version": 2,
                                         "expect_mod_revision": second["mod_revision"]})
    assert a.status == 200 and a.doc["version"] == 3, a
    # DELETE with conditions, as query params and as a body document.
    a = call(n1, "DELETE", kpath("cas") + "?expect_version=2")
    assert a.status == 412 and a.doc["current"]["version"] == 3, a
    a = call(n1, "DELETE", kpath("cas"), doc={"expect_value": "three"}, as_json=True)
    assert a.status == 200 and a.doc["deleted"] == 1, a


def test_create_only_and_conditions_on_a_missing_key(c: Cluster):
    n1, n2, _ = c.nodes
    a = kv_put(n1, "create-only", "first", cond={"expect_version": 0})
    assert a.status == 200, a
    a = kv_put(n2, "create-only", "second", cond={"expect_version": 0})
    assert a.status == 412 and a.doc["current"]["exists"] is True and a.doc["current"]["version"] == 1, a
    assert kv_get(n1, "create-only").doc["value"] == b"first"
    for cond in ({"expect_version": 1}, {"expect_value": b""}, {"expect_mod_revision": 1}):
        a = kv_put(n1, "never-existed", "x", cond=cond)
        assert a.status == 412 and a.doc["current"] == {"exists": False, "version": 0, "mod_revision": 0,
                                                        "create_revision": 0}, (cond, a)
    a = call(n2, "DELETE", kpath("never-existed") + "?expect_version=1")
    assert a.status == 412 and a.doc["current"]["exists"] is False, a
    a = call(n2, "DELETE", kpath("never-existed") + "?expect_version=0")
    assert a.status == 200 and a.doc["deleted"] == 0, a
    assert kv_get(n1, "never-existed").status == 404


# -- transactions -----------------------------------------------------------------------------------------

def test_txn_applies_all_ops_in_order(c: Cluster):
    n1, n2, _ = c.nodes
    kv_put(n1, "t-del", "x")
    ops = [{"op": "put", "key": "t-a", "value": "1"},
           {"op": "put", "key": "t-a", "value": "2"},             # the same key twice: applied in order
           {"op": "put", "key": b"t-b", "value": b"\xff", "expect_version": 0},
           {"op": "delete", "key": "t-del"},
           {"op": "delete", "key": "t-missing"}]
    a = call(n2, "POST", "/v1/txn", doc={"ops": ops})
    assert a.status == 200 and a.doc["succeeded"] is True, a
    rev = a.doc["revision"]
    assert a.doc["results"] == [{"key": b"t-a", "version": 1, "mod_revision": rev},
                                {"key": b"t-a", "version": 2, "mod_revision": rev},
                                {"key": b"t-b", "version": 1, "mod_revision": rev},
                                {"key": b"t-del", "deleted": 1},
                                {"key": b"t-missing", "deleted": 0}]
    assert kv_get(n1, "t-a").doc["value"] == b"2"
    assert kv_get(n1, "t-b").doc["mod_revision"] == rev
    assert kv_get(n1, "t-del").status == 404
    assert revision(n1) == rev  # one revision for the whole txn


def test_txn_with_a_failing_compare_applies_nothing(c: Cluster):
    n1, n2, n3 = c.nodes
    kv_put(n1, "atom-a", "a0")
    kv_put(n1, "atom-b", "b0")
    before = revision(n1)
    ops = [{"op": "put", "key": "atom-a", "value": "a1"},
           {"op": "delete", "key": "atom-b"},
           {"op": "put", "key": "atom-c", "value": "c1", "expect_version": 0},   # holds
           {"op": "put", "key": "atom-b", "value": "b1", "expect_value": "nope"},  # fails
           {"op": "delete", "key": "atom-a", "expect_version": 7}]                # fails
    a = call(n2, "POST", "/v1/txn", doc={"ops": ops}, as_json=True)
    assert a.status == 412 and a.code == "compare_failed", a
    assert a.doc["failed"] == [3, 4] and a.doc["succeeded"] is False, a
    for n in c.nodes:
        assert kv_get(n, "atom-a").doc["value"] == b"a0"
        assert kv_get(n, "atom-b").doc["value"] == b"b0"
        assert kv_get(n, "atom-c").status == 404
    assert revision(n3) == before


# -- binary keys ---------------------------------------------------------------------------------------------

BIN_KEY = b"bin/\xff\x00 %?#&=+\x80\xc3(/end"


def test_binary_keys_in_the_path_and_in_json(c: Cluster):
    n1, n2, n3 = c.nodes
    value = b"\x00\x01\xfe\xff not utf-8 \xc3("
    a = call(n1, "PUT", kpath(BIN_KEY), doc={"value": value})
    assert a.status == 200 and a.doc["key"] == BIN_KEY, a
    g = kv_get(n2, BIN_KEY)
    assert (g.doc["key"], g.doc["value"]) == (BIN_KEY, value)
    j = kv_get(n3, BIN_KEY, as_json=True)
    assert "key" not in j.doc and "value" not in j.doc, j
    assert base64.b64decode(j.doc["key_b64"]) == BIN_KEY and base64.b64decode(j.doc["value_b64"]) == value

    # JSON requests carry bytes as *_b64 (standard, or URL-safe without padding).
    k2 = b"bin/\xfe\xfd-json"
    a = call(n2, "POST", "/v1/txn", as_json=True, doc={"ops": [
        {"op": "put", "key_b64": base64.b64encode(k2).decode(),
         "value_b64": base64.urlsafe_b64encode(b"\xff").decode()}]})
    assert a.status == 200 and base64.b64decode(a.doc["results"][0]["key_b64"]) == k2, a
    a = call(n3, "PUT", kpath(k2), as_json=True, doc={"value": "text now", "expect_value_b64": "_w"})
    assert a.status == 200 and a.doc["version"] == 2, a
    assert kv_get(n1, k2).doc["value"] == b"text now"

    # Range bounds as percent-encoded bytes and as base64url.
    keys = [kv["key"] for kv in scan_all(n1, "prefix=bin%2F")]
    assert keys == sorted([BIN_KEY, k2])
    start_b64 = base64.urlsafe_b64encode(b"bin/\xfe").decode().rstrip("=")
    a = call(n1, "GET", f"/v1/range?start_b64={start_b64}&end=bin%2F%FF%01")
    assert [kv["key"] for kv in a.doc["kvs"]] == [k2, BIN_KEY], a


def raw_request(node: Node, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """http.client sends the target as given (requests/urllib3 and curl remove dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", node.ports.http, timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, msgpack.unpackb(resp.read())
    finally:
        conn.close()


def test_key_path_is_the_raw_path(c: Cluster):
    """Dot segments and doubled slashes are part of the key: the server never normalizes."""
    n = c.nodes[0]
    for key in (b"a/../b", b"..", b"x//y", b"./z"):
        status, doc = raw_request(n, "PUT", "/v1/kv/" + key.decode(), msgpack.packb({"value": key}),
                                  {"Content-Type": "application/msgpack"})
        assert status == 200 and doc["key"] == key, (key, status, doc)
        status, doc = raw_request(n, "GET", "/v1/kv/" + key.decode())
        assert status == 200 and doc["key"] == doc["value"] == key, (key, status, doc)
    assert kv_get(n, b"a/../b").doc["value"] == b"a/../b"  # %2F-encoded slashes reach the same key


# -- ranges ----------------------------------------------------------------------------------------------------

def test_range_order_bounds_prefix_pages_and_keys_only(c: Cluster):
    n1, n2, _ = c.nodes
    keys = [b"rng/" + bytes([b]) for b in (0x00, 0x01, 0x41, 0x7f, 0x80, 0xfe, 0xff)] + [b"rng/a/1", b"rng/a/2"]
    a = call(n1, "POST", "/v1/txn", doc={"ops": [{"op": "put", "key": k, "value": b"v" + k} for k in keys]})
    assert a.status == 200, a
    rev = a.doc["revision"]
    expected = sorted(keys)
    got = scan_all(n2, "prefix=rng%2F", limit=2)
    assert [kv["key"] for kv in got] == expected
    assert all(kv["value"] == b"v" + kv["key"] and kv["version"] == 1 and kv["mod_revision"] == rev for kv in got)
    # start inclusive, end exclusive
    a = call(n2, "GET", "/v1/range?start=rng%2F%01&end=rng%2F%80")
    assert [kv["key"] for kv in a.doc["kvs"]] == [b"rng/\x01", b"rng/A", b"rng/a/1", b"rng/a/2", b"rng/\x7f"], a
    assert a.doc["more"] is False and a.doc["next"] is None and a.doc["revision"] >= rev
    # keys_only omits values
    a = call(n2, "GET", "/v1/range?prefix=rng%2Fa%2F&keys_only=true", answer_json=True)
    assert a.doc["kvs"] == [{"key": "rng/a/1", "create_revision": rev, "mod_revision": rev, "version": 1},
                            {"key": "rng/a/2", "create_revision": rev, "mod_revision": rev, "version": 1}], a
    # a page of exactly `limit` keys with more behind it, then the rest
    a = call(n2, "GET", "/v1/range?prefix=rng%2F&limit=3")
    assert len(a.doc["kvs"]) == 3 and a.doc["more"] is True and isinstance(a.doc["next"], str), a
    b = call(n2, "GET", f"/v1/range?prefix=rng%2F&limit=100&after={a.doc['next']}")
    assert [kv["key"] for kv in a.doc["kvs"] + b.doc["kvs"]] == expected and b.doc["more"] is False
    # default limit (100) and an empty range
    a = call(n2, "GET", "/v1/range?prefix=no-such-prefix%2F")
    assert a.status == 200 and a.doc["kvs"] == [] and a.doc["more"] is False and a.doc["next"] is None


@pytest.mark.parametrize("query", [
    "start=b&end=a", "start=a&end=a", "limit=0", "limit=-5", "limit=10001", "limit=ten",
    "prefix=a&start=a", "prefix=a&end=z", "after=not-a-token", "after=k%21%21",
])
def test_bad_range_variants(c: Cluster, query: str):
    a = call(c.nodes[0], "GET", f"/v1/range?{query}", answer_json=True)
    assert a.status == 400 and a.code == "bad_range" and a.doc["error"]["message"], a


# -- bad input -------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (method, path, body, content type, expected status, code)
    ("PUT", "/v1/kv/k", b"{not json", "application/json", 400, "bad_request"),
    ("PUT", "/v1/kv/k", b"[1, 2]", "application/json", 400, "bad_request"),
    ("PUT", "/v1/kv/k", b"\xc1\x00", "application/msgpack", 400, "bad_request"),
    ("PUT", "/v1/kv/k", msgpack.packb({"value": "v"}) + b"junk", None, 400, "bad_request"),
    ("PUT", "/v1/kv/k", b"", "application/msgpack", 400, "bad_request"),
    ("PUT", "/v1/kv/k", json.dumps({"value": 5}).encode(), "application/json", 400, "bad_request"),
    ("PUT", "/v1/kv/k", json.dumps({"value": "v", "expect_version": "1"}).encode(), "application/json", 400,
     "bad_request"),
    ("PUT", "/v1/kv/k", json.dumps({"value": "v", "expect_version": -1}).encode(), "application/json", 400,
     "bad_request"),
    ("PUT", "/v1/kv/k", json.dumps({"value": "v", "expect_verison": 1}).encode(), "application/json", 400,
     "bad_request"),
    ("PUT", "/v1/kv/k", json.dumps({"value_b64": "***"}).encode(), "application/json", 400, "bad_request"),
    ("PUT", "/v1/kv/k", json.dumps({"nothing": 1}).encode(), "application/json", 400, "bad_request"),
    ("PUT", "/v1/kv/k", b"v", "application/x-www-form-urlencoded", 400, "bad_request"),
    ("PUT", "/v1/kv/", msgpack.packb({"value": "v"}), None, 400, "bad_request"),
    ("GET", "/v1/kv/", None, None, 400, "bad_request"),
    ("PUT", "/v1/kv/k?expect_version=abc", b"v", "text/plain", 400, "bad_request"),
    ("PUT", "/v1/kv/" + "k" * 5000, msgpack.packb({"value": "v"}), None, 413, "too_large"),
    ("GET", "/v1/kv/" + "k" * 5000, None, None, 413, "too_large"),
    ("PUT", "/v1/kv/k", b"x" * (MAX_VALUE + 1), "application/octet-stream", 413, "too_large"),
    ("POST", "/v1/txn", json.dumps({"ops": [{"op": "get", "key": "a"}]}).encode(), "application/json", 400,
     "bad_request"),
    ("POST", "/v1/txn", json.dumps({"ops": [{"op": "put", "key": "", "value": "v"}]}).encode(), "application/json",
     400, "bad_request"),
    ("POST", "/v1/txn", json.dumps({"ops": []}).encode(), "application/json", 400, "bad_request"),
    ("POST", "/v1/txn", json.dumps({"ops": "put"}).encode(), "application/json", 400, "bad_request"),
    ("POST", "/v1/txn", json.dumps({"ops": [[]]}).encode(), "application/json", 400, "bad_request"),
    ("POST", "/v1/txn", b"\x93\x01\x02", None, 400, "bad_request"),
    ("POST", "/v1/txn", msgpack.packb({"ops": [{"op": "put", "key": "k", "value": 1.5}]}), None, 400,
     "bad_request"),
    ("POST", "/v1/txn", msgpack.packb({"ops": [{"op": "put", "key": "k", "value": "v"}] * 1001}), None, 413,
     "too_large"),
    ("POST", "/v1/txn", msgpack.packb({"ops": [{"op": "put", "key": "k" * 4097, "value": "v"}]}), None, 413,
     "too_large"),
    ("GET", "/v1/kv/k?consistency=eventual", None, None, 400, "bad_request"),
    ("GET", "/v1/kv/k?format=xml", None, None, 400, "bad_request"),
    ("GET", "/v1/range?limit=1&limit=2", None, None, 400, "bad_request"),
    ("GET", "/v1/nope", None, None, 404, "not_found"),
    ("POST", "/v1/kv/k", b"", None, 405, "bad_request"),
    ("GET", "/v1/txn", None, None, 405, "bad_request"),
]


@pytest.mark.parametrize("method,path,body,ctype,status,code", BAD_REQUESTS,
                         ids=[f"{i}-{r[0]}-{r[4]}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_input_answers_an_error_document_and_changes_nothing(c: Cluster, method, path, body, ctype,
                                                                  status, code):
    n = c.nodes[2]
    before = revision(n)
    for as_json in (False, True):
        a = call(n, method, path, data=body, ctype=ctype, answer_json=as_json)
        assert (a.status, a.code) == (status, code), a
        assert a.json is as_json and isinstance(a.doc["error"]["message"], str) and a.doc["error"]["message"]
    assert revision(n) == before


def test_body_announced_too_large_is_refused_unread(c: Cluster):
    """Content-Length over the limit: 413 before the body is read (we never send it)."""
    n = c.nodes[0]
    conn = http.client.HTTPConnection("127.0.0.1", n.ports.http, timeout=10)
    try:
        conn.putrequest("PUT", "/v1/kv/huge")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(50 << 20))
        conn.putheader("Accept", "application/json")
        conn.endheaders()
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413 and doc["error"]["code"] == "too_large", doc


@pytest.mark.parametrize("headers", [
    {"X-RaftKV-Client": "c"}, {"X-RaftKV-Seq": "1"}, {"X-RaftKV-Client": "bad id!", "X-RaftKV-Seq": "1"},
    {"X-RaftKV-Client": "c" * 65, "X-RaftKV-Seq": "1"}, {"X-RaftKV-Client": "c", "X-RaftKV-Seq": "0"},
    {"X-RaftKV-Client": "c", "X-RaftKV-Seq": "x"}, {"X-RaftKV-Client": "c", "X-RaftKV-Seq": "3", "X-RaftKV-Floor": "4"},
    {"X-RaftKV-Client": "c", "X-RaftKV-Seq": "3", "X-RaftKV-Floor": "-1"},
])
def test_malformed_request_identity(c: Cluster, headers):
    a = call(c.nodes[0], "PUT", kpath("ident-bad"), doc={"value": "v"}, headers=headers)
    assert (a.status, a.code) == (400, "bad_request"), a
    assert kv_get(c.nodes[0], "ident-bad").status == 404


# -- reads through followers -------------------------------------------------------------------------------------

def test_reads_through_followers_with_each_consistency(c: Cluster):
    leader = c.leader()
    followers = [n for n in c.nodes if n is not leader]
    for i in range(5):
        key = f"follow-{i}"
        assert kv_put(leader, key, f"v{i}").status == 200
        # linearizable (default and explicit): the acknowledged write is visible at once, anywhere
        for f in followers:
            assert kv_get(f, key).doc["value"] == f"v{i}".encode()
            assert kv_get(f, key, "linearizable").doc["value"] == f"v{i}".encode()
            a = call(f, "GET", "/v1/range?prefix=follow-&consistency=linearizable")
            assert [kv["key"] for kv in a.doc["kvs"]][-1] == key.encode()
        # leader / local: served by the follower itself, current once it caught up
        for level in ("leader", "local"):
            for f in followers:
                wait_until(lambda: kv_get(f, key, level).status == 200, 10, interval=0.02,
                           what=f"{key} via {f.node_id} {level}")
                a = call(f, "GET", f"/v1/range?prefix=follow-&consistency={level}")
                assert a.status == 200 and key.encode() in [kv["key"] for kv in a.doc["kvs"]]


# -- exactly-once request identity ------------------------------------------------------------------------------------

def test_duplicate_identity_through_another_node_answers_the_first_outcome(c: Cluster):
    n1, n2, n3 = c.nodes
    h = ident("dup-client-1", 7, 7)
    first = kv_put(n1, "dup-key", "first", headers=h)
    assert first.status == 200 and "X-RaftKV-Duplicate" not in first.headers, first
    rev_after = revision(n1)
    # The same request retried through other nodes: not applied again, same answer.
    for n in (n2, n3):
        again = kv_put(n, "dup-key", "first", headers=h)
        assert again.status == 200 and again.headers.get("X-RaftKV-Duplicate") == "1", again
        assert again.doc["revision"] == first.doc["revision"] and again.doc["version"] == 1, again
    # Even a different body under the same identity is the same request: its first outcome.
    odd = kv_put(n2, "dup-key", "SECOND", headers=h)
    assert odd.headers.get("X-RaftKV-Duplicate") == "1" and odd.doc["version"] == 1, odd
    g = kv_get(n3, "dup-key")
    assert (g.doc["value"], g.doc["version"]) == (b"first", 1)
    assert revision(n3) == rev_after

    # A failed compare is an outcome too: its retry answers 412 again, also after the key changed.
    h2 = ident("dup-client-1", 8, 7)
    failed = kv_put(n1, "dup-key", "cas", cond={"expect_version": 5}, headers=h2)
    assert failed.status == 412 and "X-RaftKV-Duplicate" not in failed.headers, failed
    assert kv_put(n1, "dup-key", "moved on").doc["version"] == 2
    retry = kv_put(n3, "dup-key", "cas", cond={"expect_version": 5}, headers=h2)
    assert retry.status == 412 and retry.code == "compare_failed", retry
    assert retry.headers.get("X-RaftKV-Duplicate") == "1" and retry.doc["revision"] == failed.doc["revision"]

    # DELETE and txn retries.
    h3 = ident("dup-client-1", 9, 9)
    d1 = call(n2, "DELETE", kpath("dup-key"), headers=h3)
    d2 = call(n1, "DELETE", kpath("dup-key"), headers=h3)
    assert d1.doc == d2.doc == {"deleted": 1, "revision": d1.doc["revision"]}, (d1, d2)
    assert d2.headers.get("X-RaftKV-Duplicate") == "1"
    h4 = ident("dup-client-2", 1)
    ops = {"ops": [{"op": "put", "key": "dup-t", "value": "1"}, {"op": "put", "key": "dup-t", "value": "2"}]}
    t1 = call(n3, "POST", "/v1/txn", doc=ops, headers=h4)
    t2 = call(n1, "POST", "/v1/txn", doc=ops, headers=h4, as_json=True)
    assert t1.status == t2.status == 200 and t2.headers.get("X-RaftKV-Duplicate") == "1", (t1, t2)
    assert t2.doc["revision"] == t1.doc["revision"]
    assert [r["version"] for r in t2.doc["results"]] == [1, 2]
    assert kv_get(n2, "dup-t").doc["version"] == 2  # applied once: two puts, version 2


# -- backup ------------------------------------------------------------------------------------------------------------

def test_backup_streams_a_file_the_reader_verifies(c: Cluster, tmp_path):
    n1, n2, _ = c.nodes
    ops = [{"op": "put", "key": b"bk/" + i.to_bytes(2, "big"), "value": bytes([i % 256]) * (i % 50)}
           for i in range(600)]
    assert call(n1, "POST", "/v1/txn", doc={"ops": ops}).status == 200
    expected = {kv["key"]: kv for kv in scan_all(n2, "")}
    path = tmp_path / "cluster.backup"
    with requests.get(n2.http_url + "/v1/backup", stream=True, timeout=30) as resp:
        assert resp.status_code == 200, resp.content[:300]
        assert resp.headers["Content-Type"].startswith("application/octet-stream")
        assert "Content-Length" not in resp.headers  # streamed, not buffered
        with open(path, "wb") as f:
            for chunk in resp.iter_content(64 << 10):
                f.write(chunk)
    with open(path, "rb") as f:
        reader = backup.BackupReader(f)
        header = reader.header
        records = {rec.key: rec for rec in reader}
    assert reader.trailer is not None and reader.count == len(expected)
    assert header.format == 1 and header.revision >= max(kv["mod_revision"] for kv in expected.values())
    assert header.applied_index > 0
    assert set(records) == set(expected)
    for key, rec in records.items():
        e = expected[key]
        assert (rec.value, rec.create_revision, rec.mod_revision, rec.version) == \
            (e["value"], e["create_revision"], e["mod_revision"], e["version"])
    assert backup.verify(str(path))[1] == len(expected)
    # A corrupted copy is refused by the reader.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad_path = tmp_path / "corrupt.backup"
    bad_path.write_bytes(bytes(data))
    with pytest.raises(backup.BackupError):
        backup.verify(str(bad_path))
    a = call(n1, "GET", "/v1/backup?consistency=sometimes")
    assert (a.status, a.code) == (400, "bad_request")


# -- overload and unavailability (own clusters) -------------------------------------------------------

def test_overloaded_writes_answer_429_with_retry_after(cluster_factory):
    c = cluster_factory(1, engine_args=["--max-inflight-writes", "1"])
    n = c.nodes[0]
    answers: list[Answer] = []
    lock = threading.Lock()
    go = threading.Barrier(40)

    def writer(i: int) -> None:
        go.wait()  # all at once: more than one write in flight
        a = kv_put(n, f"load-{i}", "x" * 1000)
        with lock:
            answers.append(a)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    over = [a for a in answers if a.status == 429]
    assert over, [a.status for a in answers]
    assert all(a.code == "overloaded" and a.headers.get("Retry-After") for a in over)
    assert all(a.status in (200, 429) for a in answers), answers


def test_no_quorum_reads_and_writes_answer_503_codes(cluster_factory):
    c = cluster_factory(3, engine_args=["--read-timeout", "1", "--propose-timeout", "1.5"])
    survivor = c.nodes[0]
    assert kv_put(survivor, "q", "v").status == 200
    for n in c.nodes[1:]:
        n.kill9()
    wait_until(lambda: call(survivor, "GET", kpath("q"), timeout=15).status == 503, 30, interval=0.2,
               what="the linearizable read to fail")
    a = call(survivor, "GET", kpath("q"), answer_json=True, timeout=15)
    assert a.status == 503 and a.code in ("unavailable", "no_leader") and a.headers.get("Retry-After"), a
    a = kv_put(survivor, "q", "w", timeout=15)
    assert a.status == 503 and a.code in ("no_leader", "outcome_unknown", "unavailable"), a
    local = kv_get(survivor, "q", "local")
    assert local.status == 200 and local.doc["value"] == b"v"
