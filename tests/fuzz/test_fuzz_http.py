"""Property tests (hypothesis) against the real HTTP handlers of a running 3-node cluster.

The property, for every generated request: valid input -> 2xx and the write is really
applied (read back through another node); invalid input -> 4xx with a message, and nothing
changed (no engine applied anything: /debug/stats applies/applied_index stay put on every
node, and a sentinel key set before keeps its value). Settings, seed and how to run longer:
tests/fuzz/conftest.py.
"""
from __future__ import annotations

import base64
import json
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_from_bytes

import msgpack
import pytest
import requests
from hypothesis import event, example, given, note, seed
from hypothesis import strategies as st

from tests.cluster import HOST, Cluster, Node, wait_until

from .conftest import FUZZ, SEED

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
MAX_KEY = 4096                               # engine defaults (storage_engine/config.py)
MAX_VALUE = MiB
MAX_BODY = MAX_VALUE + MAX_KEY + 64 * 1024
SERVER_LIMIT = 16                            # msgpack array/map length the engine accepts in /insert-val


# -- the target -------------------------------------------------------------------------------------

@dataclass
class Target:
    cluster: Cluster
    sentinel_key: str
    sentinel_value: str
    session: requests.Session = field(default_factory=requests.Session)
    accepted: int = 0          # writes answered 2xx so far
    v1: bool | None = None

    def __post_init__(self) -> None:
        self.session.trust_env = False

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    def get(self, url: str, **kw) -> requests.Response:
        return self.session.get(url, timeout=10, **kw)

    def counters(self) -> list[tuple[int, int]]:
        """(applies, applied_index) of every engine: the only numbers a stored write moves."""
        out = []
        for n in self.nodes:
            s = self.get(f"{n.http_url}/debug/stats").json()
            out.append((s["applies"], s["applied_index"]))
        return out

    def settle(self) -> list[tuple[int, int]]:
        """Waits until every engine applied the same entries (a 2xx write is applied on the
        answering node first, the others follow), so the next example starts from rest."""
        def same():
            c = self.counters()
            return c if len({ix for _, ix in c}) == 1 else None
        return wait_until(same, 20, interval=0.02, what="every engine at the same applied index")

    def check_sentinel(self) -> None:
        for n in self.nodes:
            r = self.get(f"{n.http_url}/get-val", params={"key": self.sentinel_key, "consistency": "local"})
            assert (r.status_code, r.text) == (200, self.sentinel_value), f"sentinel changed on {n.node_id}"

    def has_v1(self) -> bool:
        if self.v1 is None:
            r = self.get(f"{self.nodes[0].http_url}/v1/health")
            self.v1 = r.status_code == 200
        return self.v1


@pytest.fixture(scope="module")
def target(module_cluster: Cluster) -> Target:
    t = Target(module_cluster, f"fuzz-sentinel-{uuid.uuid4().hex}", "sentinel-value")
    leader = module_cluster.leader()
    body = msgpack.packb({"op": "SET", "key": t.sentinel_key, "value": t.sentinel_value})
    assert t.session.post(f"{leader.http_url}/insert-val", data=body, timeout=10).text == "ok"
    t.settle()
    t.check_sentinel()
    yield t
    # After every property: all engines agree, the sentinel is intact, nothing died.
    t.settle()
    t.check_sentinel()
    assert all(n.alive() for n in module_cluster.nodes), module_cluster.log_tails(30)


def assert_unchanged(t: Target, before: list[tuple[int, int]], what: str) -> None:
    after = t.counters()
    assert after == before, f"{what}: an engine applied something: {before} -> {after}"


# -- /insert-val: msgpack bodies ---------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """What the contract says about a body: status 200/400/413, or None = either (then the
    answer only has to be consistent with what happened)."""
    status: int | None
    op: str | None = None
    key: bytes | None = None
    value: bytes | None = None


def _decode_noting_limits(body: bytes) -> tuple[Any, bool]:
    """The document, and whether the stream holds anything past the engine's msgpack limits
    (a container longer than SERVER_LIMIT, an ext type), also where a duplicate field later
    hides it in the decoded map. The contract says nothing about these, so either answer is
    allowed for them."""
    loose = False

    def pairs_hook(pairs):
        nonlocal loose
        loose = loose or len(pairs) > SERVER_LIMIT
        return dict(pairs)

    def list_hook(items):
        nonlocal loose
        loose = loose or len(items) > SERVER_LIMIT
        return items

    def ext_hook(code, data):
        nonlocal loose
        loose = True
        return msgpack.ExtType(code, data)
    doc = msgpack.unpackb(body, raw=False, strict_map_key=False, object_pairs_hook=pairs_hook,
                          list_hook=list_hook, ext_hook=ext_hook)
    return doc, loose


def insert_verdict(body: bytes) -> Verdict:
    """The contract of /insert-val (README: client HTTP API), independent of the engine's code."""
    if len(body) > MAX_BODY:
        return Verdict(413)
    if not body:
        return Verdict(400)
    try:
        doc, loose = _decode_noting_limits(body)
    except Exception:  # noqa: BLE001 - not msgpack, truncated, trailing bytes, bad UTF-8, unhashable key
        return Verdict(400)
    if not isinstance(doc, dict):
        return Verdict(400)
    op = doc.get("op")
    if not isinstance(op, str) or op.upper() not in ("SET", "DELETE"):
        return Verdict(400)
    if not op.isascii():
        loose = True          # e.g. "ſet".upper() == "SET": not in the contract either way
    op = op.upper()

    def as_bytes(name: str) -> bytes | None:
        v = doc.get(name)
        return v.encode() if isinstance(v, str) else v if isinstance(v, bytes) else None
    key = as_bytes("key")
    if key is None or not key:
        return Verdict(400)
    if len(key) > MAX_KEY:
        return Verdict(None if loose else 413)
    if op == "DELETE":
        return Verdict(None if loose else 200, op, key)
    value = as_bytes("value")
    if value is None:
        return Verdict(400)
    if len(value) > MAX_VALUE:
        return Verdict(None if loose else 413)
    return Verdict(None if loose else 200, op, key, value)


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
                    st.floats(), st.text(max_size=12), st.binary(max_size=12))
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(
        st.one_of(st.text(max_size=6), st.integers(-5, 5), st.binary(max_size=4)), inner, max_size=20),
    max_leaves=24)
ext_types = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
op_values = st.one_of(st.sampled_from(["SET", "DELETE", "set", "delete", "Set", "dElEtE", "PUT", "GET", "",
                                       " SET", "SET\x00", "ſet", "DEL"]), junk)
key_values = st.one_of(
    st.text(max_size=24), st.binary(max_size=24),
    st.sampled_from(["", "\x00", "é", "🔑", "a/b", "?&=#%+ ;", "..", "/", "\r\n", "k" * MAX_KEY,
                     "k" * (MAX_KEY + 1), "é" * 2049]),
    junk)
value_values = st.one_of(
    st.text(max_size=40), st.binary(max_size=40),
    st.sampled_from([MAX_VALUE - 1, MAX_VALUE, MAX_VALUE + 1, MAX_BODY + 10]).map(lambda n: b"v" * n),
    junk)
field_names = st.one_of(st.sampled_from(["op", "key", "value", "Op", "KEY", "values"]), st.text(max_size=6),
                        st.binary(max_size=4), st.integers(-3, 3))


def pack_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A msgpack map from pairs, so a field can appear twice (decoders keep the last)."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)


valid_ops = st.sampled_from(["SET", "DELETE", "set", "delete", "Set", "dElEtE"])
valid_keys = st.one_of(st.text(min_size=1, max_size=24), st.binary(min_size=1, max_size=24))
valid_values = st.one_of(st.text(max_size=40), st.binary(max_size=40))


@st.composite
def insert_bodies(draw) -> bytes:
    if draw(st.integers(0, 3)) == 0:   # a quarter of the bodies are valid, to exercise "applied"
        pairs = [("op", draw(valid_ops)), ("key", draw(valid_keys)), ("value", draw(valid_values))]
        pairs += draw(st.lists(st.tuples(st.text(max_size=6).filter(lambda n: n not in ("op", "key", "value")),
                                         scalars), max_size=2))
        return pack_map(draw(st.permutations(pairs)))
    pairs: list[tuple[Any, Any]] = []
    if draw(st.integers(0, 9)) > 0:
        pairs.append(("op", draw(op_values)))
    if draw(st.integers(0, 9)) > 0:
        pairs.append(("key", draw(key_values)))
    if draw(st.integers(0, 9)) > 1:
        pairs.append(("value", draw(value_values)))
    pairs += draw(st.lists(st.tuples(field_names, st.one_of(junk, ext_types)), max_size=3))
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    body = pack_map(pairs)
    mutation = draw(st.sampled_from(["none"] * 8 + ["trailing", "truncate", "prefix", "random", "array",
                                                    "twice", "json", "deep", "str-not-utf8"]))
    if mutation == "trailing":
        body += draw(st.binary(min_size=1, max_size=8))
    elif mutation == "truncate":
        body = body[:draw(st.integers(0, max(0, len(body) - 1)))]
    elif mutation == "prefix":
        body = draw(st.binary(min_size=1, max_size=4)) + body
    elif mutation == "random":
        body = draw(st.binary(max_size=64))
    elif mutation == "array":
        body = msgpack.packb([list(p) for p in pairs])
    elif mutation == "twice":
        body += body
    elif mutation == "json":
        body = json.dumps({str(k): str(v) for k, v in pairs}).encode()
    elif mutation == "deep":
        depth = draw(st.integers(1, 3000))
        body = pack_map(pairs + [("nest", None)])[:-1] + b"\x91" * depth + b"\xc0"
    elif mutation == "str-not-utf8":
        body = pack_map(pairs + [("junk", "x")])[:-1] + b"\xff"   # str header, byte 0xff: not UTF-8
    return body


def readable_via_get_val(key: bytes) -> str | None:
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None


def check_applied(t: Target, writer: int, v: Verdict) -> None:
    """A 2xx write: read it back through another node (linearizable by default)."""
    reader = t.nodes[(writer + 1) % len(t.nodes)]
    text_key = readable_via_get_val(v.key)
    if text_key is not None:
        r = t.get(f"{reader.http_url}/get-val", params={"key": text_key})
        if v.op == "SET":
            assert (r.status_code, r.content) == (200, v.value), f"acknowledged SET of {v.key!r} not readable"
        else:
            assert r.status_code == 404, f"acknowledged DELETE of {v.key!r} but the key is still there"
    elif t.has_v1():
        r = t.get(f"{reader.http_url}/v1/kv/{quote_from_bytes(v.key, safe='')}", params={"format": "json"})
        if v.op == "SET":
            doc = r.json()
            got = doc.get("value", "").encode() if "value" in doc else base64.b64decode(doc.get("value_b64", ""))
            assert (r.status_code, got) == (200, v.value), f"acknowledged SET of {v.key!r} not readable via /v1"
        else:
            assert r.status_code == 404


@seed(SEED)
@FUZZ
@example(body=msgpack.packb({"op": "SET", "key": "line\nbreak", "value": b"\x00\xff"}), writer=1, ctype=None)
@example(body=msgpack.packb({"op": "set", "key": b"\xff\xfe", "value": ""}), writer=2, ctype="application/msgpack")
@given(body=insert_bodies(), writer=st.integers(0, 2),
       ctype=st.sampled_from(["application/msgpack", "application/x-msgpack", "application/json",
                              "text/plain", None]))
def test_insert_val_bodies(target: Target, body: bytes, writer: int, ctype: str | None) -> None:
    t = target
    verdict = insert_verdict(body)
    note(f"verdict {verdict.status} op={verdict.op} key={verdict.key!r:.80}")
    before = t.counters()
    headers = {"Content-Type": ctype} if ctype else {}
    r = t.session.post(f"{t.nodes[writer].http_url}/insert-val", data=body, headers=headers, timeout=15)
    note(f"answer {r.status_code} {r.text[:200]!r}")
    event(f"/insert-val answered {r.status_code}")
    if r.status_code == 200:
        assert r.text == "ok"
        assert verdict.status in (200, None), f"invalid body accepted (contract says {verdict.status})"
        if verdict.op is None:  # a loose body the contract does not decide: decode what was written
            verdict = insert_verdict_loose(body)
        t.accepted += 1
        check_applied(t, writer, verdict)
        t.settle()
    else:
        assert 400 <= r.status_code < 500, f"status {r.status_code}: {r.text[:300]}"
        assert r.text.startswith("error: ") and len(r.text) > len("error: ") + 3, r.text[:200]
        if verdict.status is not None:
            assert r.status_code == verdict.status, f"expected {verdict.status}, got {r.status_code}: {r.text}"
        assert_unchanged(t, before, f"refused body ({r.status_code} {r.text[:80]})")


def insert_verdict_loose(body: bytes) -> Verdict:
    doc = msgpack.unpackb(body, raw=False, strict_map_key=False)
    op = doc["op"].upper()
    key = doc["key"].encode() if isinstance(doc["key"], str) else doc["key"]
    value = doc.get("value")
    value = value.encode() if isinstance(value, str) else value
    return Verdict(200, op, key, value if op == "SET" else None)


# -- raw HTTP requests --------------------------------------------------------------------------------

KNOWN_PATHS = ["/insert-val", "/get-val", "/health", "/debug/stats", "/", "/metrics", "/v1/kv/x", "/v1/txn",
               "/v1/range", "/v1/health", "/insert-val/", "//insert-val", "/INSERT-VAL", "/get-val/../health",
               "*", "http://127.0.0.1/health"]
token_chars = st.characters(min_codepoint=33, max_codepoint=126)
header_names = st.one_of(st.sampled_from(["Host", "Content-Type", "Accept", "X-RaftKV-Client", "Connection",
                                          "Expect", "Authorization", "Content-Encoding", "Upgrade"]),
                         st.text(token_chars, min_size=1, max_size=12))


@st.composite
def raw_requests(draw) -> tuple[bytes, bool, str]:
    """(request bytes, complete?, method). Bodies start with 0xc1, never valid msgpack, so no
    request here is a valid write."""
    method = draw(st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH",
                                             "TRACE", "CONNECT", "FOO", "get", "PRI"]),
                            st.text(token_chars, min_size=1, max_size=8)))
    path = draw(st.one_of(st.sampled_from(KNOWN_PATHS),
                          st.text(max_size=30).map(lambda s: "/" + quote(s, safe="/%?&=;+")),
                          st.binary(max_size=20).map(lambda b: "/" + b.decode("latin-1")),
                          st.integers(1000, 20000).map(lambda n: "/" + "a" * n)))
    query = draw(st.one_of(st.just(""), st.sampled_from(["?key=", "?key", "?key=%zz", "?key=a&key=b", "?&&&",
                                                          "?consistency=bogus&key=k", "?key=%00", "?%",
                                                          "?key=" + "q" * 10000]),
                           st.text(max_size=30).map(lambda s: "?" + s)))
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x",
                                                       "http/1.1", "", "HTTP/1.1 extra"]))
    line = f"{method} {path}{query} {version}".rstrip(" ")
    body = b"\xc1" + draw(st.binary(max_size=48))
    headers = draw(st.lists(st.tuples(header_names, st.text(st.characters(min_codepoint=32, max_codepoint=255),
                                                                         max_size=40)), max_size=4))
    if draw(st.integers(0, 9)) == 0:
        headers.append(("X-Big", "h" * draw(st.integers(4000, 70000))))
    framing = draw(st.sampled_from(["exact", "exact", "none", "short", "long", "garbage", "negative", "huge",
                                    "double", "chunked", "chunked-bad", "chunked-and-length"]))
    # "PRI" starts the HTTP/2 preface: aiohttp's parser waits for the rest of it ("SM\r\n\r\n")
    # when no header follows, like for any unfinished request.
    complete = method != "PRI"
    if framing == "exact":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "none":
        body = b""
    elif framing == "short":   # fewer announced than sent: the rest is the "next request"
        headers.append(("Content-Length", str(max(0, len(body) - 3))))
    elif framing == "long":    # more announced than sent: we then half-close
        headers.append(("Content-Length", str(len(body) + 10)))
        complete = False
    elif framing == "garbage":
        headers.append(("Content-Length", draw(st.sampled_from(["abc", "1e3", "0x10", " ", "+5", "5 5", "½"]))))
    elif framing == "negative":
        headers.append(("Content-Length", "-1"))
    elif framing == "huge":
        headers.append(("Content-Length", "9" * draw(st.integers(10, 40))))
        complete = False
    elif framing == "double":
        headers += [("Content-Length", str(len(body))), ("Content-Length", "0")]
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    elif framing == "chunked-bad":
        headers.append(("Transfer-Encoding", "chunked"))
        body = b"zz\r\n" + body + b"\r\n"
    else:
        headers += [("Transfer-Encoding", "chunked"), ("Content-Length", str(len(body)))]
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    head = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1", "replace") + body, complete, method


def read_response(sock: socket.socket, head_only: bool) -> tuple[int | None, bytes, bytes]:
    """(status, head, body) of the first response, or (None, ...) when the server closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return None, buf, b""
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, head, body
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if head_only or status in (204, 304):
        return status, head, b""
    while True:
        if length is not None and len(body) >= length:
            return status, head, body[:length]
        if chunked and body.endswith(b"0\r\n\r\n"):
            return status, head, body
        chunk = sock.recv(65536)
        if not chunk:
            return status, head, body
        body += chunk


def raw_exchange(port: int, data: bytes, complete: bool, head_only: bool) -> tuple[int | None, bytes, bytes]:
    with socket.create_connection((HOST, port), timeout=10) as s:
        try:
            s.sendall(data)
            if not complete:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking all of it
        try:
            return read_response(s, head_only)
        except ConnectionResetError:
            return None, b"", b""


@seed(SEED)
@FUZZ
@given(req=raw_requests(), node=st.integers(0, 2))
def test_raw_http_requests(target: Target, req: tuple[bytes, bool, str], node: int) -> None:
    t = target
    data, complete, method = req
    n = t.nodes[node]
    before = t.counters()
    status, head, body = raw_exchange(n.ports.http, data, complete, head_only=method.upper() == "HEAD")
    note(f"answer {status} {head[:200]!r} {body[:200]!r}")
    event(f"raw request answered {status}")
    if status is None:
        # Only a request the client never finished may go unanswered.
        assert not complete, f"no HTTP answer to a complete request: {head[:200]!r}"
    else:
        assert status < 500 or (status == 505 and b"HTTP/1." not in data.split(b"\r\n", 1)[0]), \
            f"server error {status}: {head[:200]!r} {body[:300]!r}"
        if 400 <= status < 500 and method.upper() != "HEAD":
            assert body.strip(), f"{status} without a message"
    assert_unchanged(t, before, f"raw request answered {status}")
    assert t.get(f"{n.http_url}/health").status_code == 200, f"{n.node_id} stopped serving"


# -- /v1 (storage_engine/v1_api.py; docs: /work/notes/v1-contract.md) ------------------------------------

def need_v1(t: Target) -> None:
    if not t.has_v1():
        pytest.skip("the engine has no /v1 routes yet (GET /v1/health is not 200)")


def decode_answer(r: requests.Response) -> Any:
    if "json" in r.headers.get("Content-Type", ""):
        return r.json()
    return msgpack.unpackb(r.content, raw=False, strict_map_key=False)


def field_bytes(doc: dict, name: str) -> bytes | None:
    if name in doc:
        v = doc[name]
        return v.encode() if isinstance(v, str) else v
    if f"{name}_b64" in doc:
        return base64.b64decode(doc[f"{name}_b64"])
    return None


def v1_state(t: Target, key: bytes, node: int = 0) -> tuple[int, Any]:
    """(status, (value, version, mod_revision)) of a key, read linearizably as JSON."""
    r = t.get(f"{t.nodes[node].http_url}/v1/kv/{quote_from_bytes(key, safe='')}", params={"format": "json"})
    doc = r.json()
    if r.status_code == 200:
        return 200, (field_bytes(doc, "value"), doc["version"], doc["mod_revision"])
    return r.status_code, None


def v1_revision(t: Target) -> int:
    r = t.get(f"{t.nodes[0].http_url}/v1/range", params={"limit": "1", "keys_only": "true", "format": "json"})
    assert r.status_code == 200, r.text
    return r.json()["revision"]


def assert_v1_error(r: requests.Response) -> dict:
    assert 400 <= r.status_code < 500, f"status {r.status_code}: {r.content[:300]!r}"
    doc = decode_answer(r)
    err = doc.get("error") if isinstance(doc, dict) else None
    assert isinstance(err, dict) and err.get("code") and err.get("message"), f"not a /v1 error document: {doc!r}"
    return err


v1_keys = st.one_of(st.binary(min_size=1, max_size=24), st.text(min_size=1, max_size=16).map(str.encode),
                    st.sampled_from([b"", b"/", b"%", b"?", b"\x00", b"k" * MAX_KEY, b"k" * (MAX_KEY + 1)]))
v1_values = st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode))
v1_field_values = st.one_of(junk, st.integers(-2, 3))


def jsonable(x: Any) -> Any:
    """Generated junk as JSON can carry it: string keys, bytes as base64 text."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(i) for i in x]
    if isinstance(x, bytes):
        return base64.b64encode(x).decode()
    return x


@st.composite
def put_requests(draw) -> dict:
    """A PUT /v1/kv/{key}: {key, headers, body, query, value (what a 2xx must store), plain}."""
    key = draw(v1_keys)
    value = draw(v1_values)
    fmt = draw(st.sampled_from(["json", "msgpack", "raw", "raw-text", "none", "weird"]))
    doc: dict[str, Any] = {}
    if fmt in ("json", "msgpack"):
        if draw(st.integers(0, 9)) > 0:
            if fmt == "json":
                try:
                    doc["value"] = value.decode()
                except UnicodeDecodeError:
                    doc["value_b64"] = base64.b64encode(value).decode()
            else:
                doc["value"] = value
        value_doc = dict(doc)
        for name in draw(st.lists(st.sampled_from(["expect_version", "expect_mod_revision", "expect_value",
                                                   "expect_value_b64", "value_b64", "valeu", "key"]), max_size=2)):
            doc[name] = draw(v1_field_values)
        plain = bool(value_doc) and doc == value_doc   # exactly one value field, as generated
    else:
        plain = False
    if fmt == "json":
        body = json.dumps(jsonable(doc)).encode()
        if draw(st.integers(0, 9)) == 0:
            body = body[:draw(st.integers(0, len(body)))]
            plain = False
        ctype = "application/json"
    elif fmt == "msgpack":
        body = msgpack.packb(doc, default=repr)
        if draw(st.integers(0, 9)) == 0:
            body += b"\x00"
            plain = False
        ctype = draw(st.sampled_from(["application/msgpack", "application/x-msgpack"]))
    elif fmt in ("raw", "raw-text"):
        body = value
        ctype = "application/octet-stream" if fmt == "raw" else "text/plain"
        plain = len(value) <= MAX_VALUE
    elif fmt == "none":
        body, ctype = draw(st.binary(max_size=20)), None
    else:
        body, ctype = msgpack.packb({"value": value}), draw(st.sampled_from(["image/png", "application/xml"]))
    query = draw(st.sampled_from(["", "", "?expect_version=0", "?expect_version=abc", "?format=json",
                                  "?format=yaml", "?expect_mod_revision=1", "?expect_version=1&expect_version=1"]))
    # Must succeed: one unconditional value (doc or raw body), a key within the limits, no odd query.
    plain = plain and query in ("", "?format=json") and 1 <= len(key) <= MAX_KEY
    return {"key": key, "body": body, "headers": {"Content-Type": ctype} if ctype else {}, "query": query,
            "value": value, "plain": plain}


@seed(SEED)
@FUZZ
@example(req={"key": b"line\nbreak", "body": msgpack.packb({"value": b"v"}), "query": "", "value": b"v",
              "headers": {"Content-Type": "application/msgpack"}, "plain": True}, writer=0)
@given(req=put_requests(), writer=st.integers(0, 2))
def test_v1_put(target: Target, req: dict, writer: int) -> None:
    t = target
    need_v1(t)
    key = req["key"]
    valid_key = 1 <= len(key) <= MAX_KEY
    before_key = v1_state(t, key) if valid_key else None
    before = t.counters()
    url = f"{t.nodes[writer].http_url}/v1/kv/{quote_from_bytes(key, safe='')}{req['query']}"
    r = t.session.put(url, data=req["body"], headers={**req["headers"], "Accept": "application/json"}, timeout=15)
    note(f"answer {r.status_code} {r.content[:300]!r}")
    if r.status_code == 200:
        doc = r.json()
        t.accepted += 1
        status, state = v1_state(t, key, (writer + 1) % 3)
        assert status == 200 and state[1] == doc["version"], f"acknowledged PUT not readable: {status} {state}"
        if req["plain"] or req["headers"].get("Content-Type") in ("application/octet-stream", "text/plain"):
            assert state[0] == req["value"], f"stored {state[0]!r}, sent {req['value']!r}"
        t.settle()
        return
    assert not req["plain"] or r.status_code == 412, f"a plain valid PUT was refused: {r.status_code} {r.text}"
    err = assert_v1_error(r)
    if r.status_code == 412:
        assert err["code"] == "compare_failed"
        t.settle()  # a failed compare is decided at apply time: an entry, but no change
    else:
        assert_unchanged(t, before, f"refused PUT ({r.status_code} {err})")
    if valid_key:
        assert v1_state(t, key) == before_key, "a refused PUT changed the key"


@st.composite
def txn_requests(draw) -> tuple[bytes, str, list[dict], bool]:
    """(body, content type, ops as sent, every op well-formed and unconditional)."""
    ops = []
    well_formed = True
    keys = draw(st.lists(st.binary(min_size=1, max_size=6), min_size=1, max_size=3))
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["put", "put", "delete", "junk", "cond"]))
        key = draw(st.sampled_from(keys))
        if kind == "put":
            ops.append({"op": "put", "key": key, "value": draw(v1_values)})
        elif kind == "delete":
            ops.append({"op": "delete", "key": key})
        elif kind == "cond":
            ops.append({"op": "put", "key": key, "value": b"c",
                        draw(st.sampled_from(["expect_version", "expect_mod_revision"])): draw(st.integers(0, 3))})
            well_formed = False
        else:
            ops.append(draw(st.dictionaries(st.sampled_from(["op", "key", "value", "x"]), v1_field_values,
                                            max_size=3)))
            well_formed = False
    if not ops:
        well_formed = False      # an empty txn: the contract does not say
    as_json = draw(st.booleans())
    doc: Any = {"ops": ops}
    if draw(st.integers(0, 9)) == 0:
        doc = draw(st.sampled_from([ops, {"op": ops}, {"ops": "x"}, None]))
        well_formed = False
    if as_json:
        def enc(x):
            if isinstance(x, dict):
                return {(f"{k}_b64" if isinstance(v, bytes) else str(k)): enc(v) for k, v in x.items()}
            if isinstance(x, list):
                return [enc(i) for i in x]
            return jsonable(x)
        return json.dumps(enc(doc)).encode(), "application/json", ops, well_formed
    return msgpack.packb(doc, default=repr), "application/msgpack", ops, well_formed


@seed(SEED)
@FUZZ
@given(req=txn_requests(), writer=st.integers(0, 2))
def test_v1_txn(target: Target, req: tuple[bytes, str, list[dict], bool], writer: int) -> None:
    t = target
    need_v1(t)
    body, ctype, ops, well_formed = req
    keys = sorted({op["key"] for op in ops if isinstance(op.get("key"), bytes) and 0 < len(op["key"]) <= MAX_KEY})
    before_keys = {k: v1_state(t, k) for k in keys}
    before = t.counters()
    r = t.session.post(f"{t.nodes[writer].http_url}/v1/txn", data=body,
                       headers={"Content-Type": ctype, "Accept": "application/json"}, timeout=15)
    note(f"answer {r.status_code} {r.content[:300]!r}")
    if r.status_code == 200:
        t.accepted += 1
        expect: dict[bytes, bytes | None] = {}
        for op in ops:  # applied in order; the last op on a key decides
            expect[op["key"]] = op.get("value") if op["op"] == "put" else None
        for k, v in expect.items():
            status, state = v1_state(t, k, (writer + 1) % 3)
            if v is None:
                assert status == 404, f"txn deleted {k!r} but it is readable"
            else:
                assert status == 200 and state[0] == v, f"txn put {k!r}={v!r}, read {status} {state}"
        t.settle()
        return
    assert not well_formed, f"a well-formed unconditional txn was refused: {r.status_code} {r.text}"
    err = assert_v1_error(r)
    if r.status_code == 412:
        assert err["code"] == "compare_failed"
        t.settle()
    else:
        assert_unchanged(t, before, f"refused txn ({r.status_code} {err})")
    assert {k: v1_state(t, k) for k in keys} == before_keys, "a refused txn changed a key (not all-or-nothing)"


range_params = st.dictionaries(
    st.sampled_from(["start", "end", "prefix", "limit", "after", "keys_only", "consistency", "start_b64",
                     "format", "bogus"]),
    st.one_of(st.text(max_size=8), st.sampled_from(["0", "1", "-1", "10000", "10001", "abc", "true", "local",
                                                    "leader", "linearizable", "json", "%zz", "%ff"])),
    max_size=4)


@seed(SEED)
@FUZZ
@given(params=range_params, node=st.integers(0, 2))
def test_v1_range(target: Target, params: dict[str, str], node: int) -> None:
    t = target
    need_v1(t)
    before = t.counters()
    qs = "&".join(f"{quote(k)}={v if v.startswith('%') else quote(v, safe='')}" for k, v in params.items())
    r = t.get(f"{t.nodes[node].http_url}/v1/range?{qs}", headers={"Accept": "application/json"})
    note(f"answer {r.status_code} {r.content[:300]!r}")
    if r.status_code == 200:
        doc = decode_answer(r)
        keys = [field_bytes(kv, "key") for kv in doc["kvs"]]
        assert keys == sorted(keys) and len(set(keys)) == len(keys), "range not in bytewise order"
        limit = params.get("limit", "100")
        if limit.isdigit():
            assert len(keys) <= int(limit)
    else:
        err = assert_v1_error(r)
        assert err["code"] in ("bad_request", "bad_range"), err
    assert_unchanged(t, before, f"range answered {r.status_code}")
