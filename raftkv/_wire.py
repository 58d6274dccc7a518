"""The /v1 wire format on the client side: paths, query strings, msgpack bodies, answers.

Pure functions, no I/O: both the sync and the asyncio client build their requests and read
their answers here, so the two cannot drift apart.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping
from urllib.parse import quote, quote_from_bytes

import msgpack

from ._errors import (ERROR_CLASSES, STATUS_CLASSES, CompareFailed, CurrentMeta, OutcomeUnknown,
                      Overloaded, ProtocolError, RaftKVError)
from ._types import (Bytesish, DeleteOp, DeleteResult, KeyValue, Member, NodeStatus, Page,
                     PutOp, PutResult, TxnOp, TxnResult, to_bytes)

MSGPACK = "application/msgpack"
CONSISTENCY_LEVELS = ("linearizable", "leader", "local")


# -- requests ----------------------------------------------------------------------------------

def kv_path(key: Bytesish) -> str:
    """/v1/kv/{key}: every byte of the key percent-encoded except unreserved characters
    (the server decodes the raw path with unquote_to_bytes, so any byte string works)."""
    k = to_bytes(key)
    if not k:
        raise ValueError("key must not be empty")
    return "/v1/kv/" + quote_from_bytes(k, safe="")


def query(params: Iterable[tuple[str, Any]]) -> str:
    """`?a=b&...` with bytes percent-encoded byte for byte (never '+' for a space: the server
    decodes the raw query with unquote_to_bytes). None values are left out."""
    parts = []
    for name, v in params:
        if v is None:
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        if isinstance(v, (bytes, bytearray, memoryview)):
            enc = quote_from_bytes(bytes(v), safe="")
        else:
            enc = quote(str(v), safe="")
        parts.append(f"{name}={enc}")
    return ("?" + "&".join(parts)) if parts else ""


def check_consistency(consistency: str | None) -> str | None:
    if consistency is not None and consistency not in CONSISTENCY_LEVELS:
        raise ValueError(f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}, "
                         f"not {consistency!r}")
    return consistency


def _conditions(doc: dict[str, Any], expect_value: Bytesish | None, expect_version: int | None,
                expect_mod_revision: int | None) -> dict[str, Any]:
    if expect_value is not None:
        doc["expect_value"] = to_bytes(expect_value, "expect_value")
    if expect_version is not None:
        if isinstance(expect_version, bool) or not isinstance(expect_version, int) or expect_version < 0:
            raise ValueError("expect_version must be an int >= 0 (0: the key must not exist)")
        doc["expect_version"] = expect_version
    if expect_mod_revision is not None:
        if isinstance(expect_mod_revision, bool) or not isinstance(expect_mod_revision, int) \
                or expect_mod_revision < 0:
            raise ValueError("expect_mod_revision must be an int >= 0")
        doc["expect_mod_revision"] = expect_mod_revision
    return doc


def pack(doc: Any) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def put_body(value: Bytesish, expect_value: Bytesish | None = None, expect_version: int | None = None,
             expect_mod_revision: int | None = None) -> bytes:
    return pack(_conditions({"value": to_bytes(value, "value")}, expect_value, expect_version,
                            expect_mod_revision))


def delete_body(expect_value: Bytesish | None = None, expect_version: int | None = None,
                expect_mod_revision: int | None = None) -> bytes | None:
    doc = _conditions({}, expect_value, expect_version, expect_mod_revision)
    return pack(doc) if doc else None


def txn_op_doc(op: TxnOp | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(op, Mapping):  # already in wire form: {"op": "put", "key": ..., ...}
        doc = dict(op)
        if doc.get("op") not in ("put", "delete"):
            raise ValueError(f"txn op must have op 'put' or 'delete': {op!r}")
        for f in ("key", "value", "expect_value"):
            if f in doc and doc[f] is not None:
                doc[f] = to_bytes(doc[f], f)
        return doc
    if isinstance(op, PutOp):
        doc = {"op": "put", "key": to_bytes(op.key), "value": to_bytes(op.value, "value")}
    elif isinstance(op, DeleteOp):
        doc = {"op": "delete", "key": to_bytes(op.key)}
    else:
        raise TypeError(f"txn ops are PutOp, DeleteOp or dicts, not {type(op).__name__}")
    return _conditions(doc, op.expect_value, op.expect_version, op.expect_mod_revision)


def txn_body(ops: Iterable[TxnOp | Mapping[str, Any]]) -> tuple[bytes, int]:
    docs = [txn_op_doc(op) for op in ops]
    if not docs:
        raise ValueError("a txn needs at least one op")
    return pack({"ops": docs}), len(docs)


def range_query(*, start: Bytesish | None, end: Bytesish | None, prefix: Bytesish | None,
                limit: int, after: str | None, keys_only: bool, consistency: str | None) -> str:
    if prefix is not None and (start is not None or end is not None):
        raise ValueError("prefix cannot be combined with start/end")
    return "/v1/range" + query([
        ("start", to_bytes(start) if start is not None else None),
        ("end", to_bytes(end) if end is not None else None),
        ("prefix", to_bytes(prefix) if prefix is not None else None),
        ("limit", limit),
        ("after", after),
        ("keys_only", True if keys_only else None),
        ("consistency", consistency),
    ])


# -- answers ----------------------------------------------------------------------------------

def unpack(body: bytes, content_type: str = "") -> Any:
    if "json" in content_type:
        return json.loads(body)
    return msgpack.unpackb(body, raw=False)


def _int(doc: Mapping[str, Any], name: str) -> int:
    v = doc.get(name, 0)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def _bytes(v: Any) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    raise ProtocolError(f"expected bytes in the answer, got {type(v).__name__}")


def doc_of(status: int, body: bytes, content_type: str, node: str) -> dict[str, Any]:
    try:
        doc = unpack(body, content_type)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a protocol error
        raise ProtocolError(f"{node}: status {status} with an undecodable body ({exc}): "
                            f"{body[:200]!r}", status=status, node=node) from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{node}: expected a map, got {type(doc).__name__}", status=status, node=node)
    return doc


def key_value(doc: Mapping[str, Any], revision: int = 0) -> KeyValue:
    return KeyValue(key=_bytes(doc.get("key")) or b"", value=_bytes(doc.get("value")),
                    create_revision=_int(doc, "create_revision"), mod_revision=_int(doc, "mod_revision"),
                    version=_int(doc, "version"), revision=revision or _int(doc, "revision"))


def put_result(doc: Mapping[str, Any], duplicate: bool) -> PutResult:
    return PutResult(key=_bytes(doc.get("key")) or b"", revision=_int(doc, "revision"),
                     version=_int(doc, "version"), create_revision=_int(doc, "create_revision"),
                     mod_revision=_int(doc, "mod_revision"), duplicate=duplicate)


def delete_result(doc: Mapping[str, Any], duplicate: bool) -> DeleteResult:
    return DeleteResult(deleted=_int(doc, "deleted"), revision=_int(doc, "revision"), duplicate=duplicate)


def page(doc: Mapping[str, Any]) -> Page:
    kvs = doc.get("kvs")
    if not isinstance(kvs, list):
        raise ProtocolError("range answer without a 'kvs' list")
    nxt = doc.get("next")
    if isinstance(nxt, bytes):
        nxt = nxt.decode("ascii", "replace")
    return Page(kvs=[key_value(kv) for kv in kvs], more=bool(doc.get("more")), next=nxt,
                revision=_int(doc, "revision"))


def txn_result(doc: Mapping[str, Any], duplicate: bool) -> TxnResult:
    results = doc.get("results") or []
    return TxnResult(succeeded=bool(doc.get("succeeded", True)), revision=_int(doc, "revision"),
                     results=[dict(r) for r in results if isinstance(r, Mapping)], duplicate=duplicate)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return float(headers.get("retry-after", ""))
    except ValueError:
        return None


def error_from_answer(status: int, headers: Mapping[str, str], body: bytes, node: str) -> RaftKVError:
    """The typed exception for a 4xx/5xx answer. /v1 errors carry {"error": {"code", "message"}};
    anything else (a proxy, a missing route, the management API's {"error": "text"}) is
    classified by its status."""
    code, message, doc = None, None, {}
    try:
        doc = unpack(body, headers.get("content-type", ""))
    except Exception:  # noqa: BLE001 - not ours: fall back to the status
        doc = {}
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            code, message = err.get("code"), err.get("message")
        elif isinstance(err, str):
            message = err
    else:
        doc = {}
    if not message:
        text = body[:300].decode("utf-8", "replace").strip()
        message = text or f"HTTP {status}"
    cls = ERROR_CLASSES.get(code or "") or STATUS_CLASSES.get(status) or ProtocolError
    if status == 503 and code is None and "outcome unknown" in message:
        cls = OutcomeUnknown
    text = f"{node}: {message}"
    kw: dict[str, Any] = {"code": code, "status": status, "node": node, "details": doc, "reason": message}
    if cls is CompareFailed:
        cur = doc.get("current")
        current = None
        if isinstance(cur, Mapping):
            current = CurrentMeta(exists=bool(cur.get("exists")), version=_int(cur, "version"),
                                  mod_revision=_int(cur, "mod_revision"),
                                  create_revision=_int(cur, "create_revision"))
        failed = doc.get("failed")
        return CompareFailed(text, current=current,
                             failed=[int(i) for i in failed] if isinstance(failed, list) else None, **kw)
    if cls is Overloaded:
        return Overloaded(text, retry_after=_retry_after(headers), **kw)
    return cls(text, **kw)


def node_status(mgmt_url: str, doc: Mapping[str, Any]) -> NodeStatus:
    members = [Member(id=str(m.get("id", "")), address=str(m.get("address", "")), mgmt=str(m.get("mgmt", "")))
               for m in doc.get("members") or [] if isinstance(m, Mapping)]
    return NodeStatus(mgmt_url=mgmt_url, ok=True, node_id=str(doc.get("node_id", "")),
                      is_leader=bool(doc.get("is_leader")), leader_id=str(doc.get("leader_id", "") or ""),
                      leader_addr=str(doc.get("leader_addr", "") or ""), term=_int(doc, "term"),
                      commit_index=_int(doc, "commit_index"), applied_index=_int(doc, "applied_index"),
                      members=members, raw=dict(doc))
