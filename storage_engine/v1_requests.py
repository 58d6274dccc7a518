"""Validation of /v1 requests: pure functions from parsed bodies and query strings to specs.

Nothing here does I/O or knows the Raft layer; v1_api turns the specs into
commands. Every refusal is a V1Error naming the field, so nothing malformed is
ever proposed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .formats import (V1Error, b64decode, b64url, bad, check_fields, check_int, get_bytes, get_int,
                      MAX_INT, Query)

CONSISTENCY_LEVELS = ("linearizable", "leader", "local")
CONDITION_FIELDS = ("expect_value", "expect_version", "expect_mod_revision")
DEFAULT_SCAN_LIMIT = 100
TOKEN_PREFIX = "k"

_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_UINT = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int
    max_value_bytes: int
    max_scan_limit: int = 10_000
    max_txn_ops: int = 1_000


@dataclass(frozen=True)
class OpSpec:
    """One validated put or delete with its optional conditions (all must hold)."""
    op: str                                  # "put" | "delete"
    key: bytes
    value: bytes | None = None               # put only
    expect_value: bytes | None = None
    expect_version: int | None = None        # 0: the key must not exist
    expect_mod_revision: int | None = None

    @property
    def conditional(self) -> bool:
        return any(getattr(self, f) is not None for f in CONDITION_FIELDS)


@dataclass(frozen=True)
class RangeSpec:
    start: bytes                 # inclusive; b"" = from the first key
    end: bytes | None            # exclusive; None = to the last key
    limit: int
    keys_only: bool


@dataclass(frozen=True)
class Identity:
    """Client request identity (exactly-once across retries and nodes)."""
    client_id: str
    seq: int
    floor: int


# -- shared checks ------------------------------------------------------------------------------

def consistency(query: Query) -> str:
    level = (query.text("consistency") or "linearizable").lower()
    if level not in CONSISTENCY_LEVELS:
        raise bad(f"unknown consistency {level!r}; use linearizable, leader or local")
    return level


def check_key(key: bytes | None, limits: Limits, label: str = "key") -> bytes:
    if not key:
        raise bad(f"{label} must not be empty")
    if len(key) > limits.max_key_bytes:
        raise V1Error("too_large", f"{label} is {len(key)} bytes; the limit is {limits.max_key_bytes}")
    return key


def check_value(value: bytes, limits: Limits, label: str = "value") -> bytes:
    if len(value) > limits.max_value_bytes:
        raise V1Error("too_large", f"{label} is {len(value)} bytes; the limit is {limits.max_value_bytes}")
    return value


def identity(headers: Mapping[str, str]) -> Identity | None:
    """X-RaftKV-Client / -Seq / -Floor. Without a Floor nothing is forgotten on the
    client's say-so (floor 0); the engine then keeps the client's latest seqs only."""
    client = headers.get("X-RaftKV-Client")
    seq_text = headers.get("X-RaftKV-Seq")
    floor_text = headers.get("X-RaftKV-Floor")
    if client is None and seq_text is None and floor_text is None:
        return None
    if client is None or seq_text is None:
        raise bad("X-RaftKV-Client and X-RaftKV-Seq go together (X-RaftKV-Floor is optional)")
    if not _CLIENT_ID.fullmatch(client):
        raise bad("X-RaftKV-Client must be 1 to 64 characters of A-Z a-z 0-9 _ -")
    seq = _uint_header("X-RaftKV-Seq", seq_text)
    if seq < 1:
        raise bad("X-RaftKV-Seq must be at least 1")
    floor = 0 if floor_text is None else _uint_header("X-RaftKV-Floor", floor_text)
    if floor > seq:
        raise bad(f"X-RaftKV-Floor ({floor}) must not be above X-RaftKV-Seq ({seq}): "
                  f"the request itself would be forgotten")
    return Identity(client, seq, floor)


def _uint_header(name: str, text: str) -> int:
    text = text.strip()
    if not _UINT.fullmatch(text) or int(text) > (1 << 64) - 1:
        raise bad(f"{name} must be an unsigned 64-bit integer, got {text!r}")
    return int(text)


# -- key-value writes ------------------------------------------------------------------------------

def _conditions_from_doc(doc: Mapping[str, Any], limits: Limits, where: str = "") -> dict[str, Any]:
    expect_value = get_bytes(doc, "expect_value", where=where)
    if expect_value is not None:
        check_value(expect_value, limits, f"{where}expect_value")
    return {"expect_value": expect_value,
            "expect_version": get_int(doc, "expect_version", where),
            "expect_mod_revision": get_int(doc, "expect_mod_revision", where)}


def _conditions_from_query(query: Query, limits: Limits) -> dict[str, Any]:
    expect_value = query.bytes_param("expect_value")
    if "expect_value" in query and expect_value is None:
        expect_value = b""  # `?expect_value=`: the current value must be empty
    if expect_value is not None:
        check_value(expect_value, limits, "expect_value")
    return {"expect_value": expect_value,
            "expect_version": query.int_param("expect_version"),
            "expect_mod_revision": query.int_param("expect_mod_revision")}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if v is None:
            continue
        if out.get(k) is not None:
            raise bad(f"condition '{k}' given both in the body and in the query")
        out[k] = v
    return out


def parse_put(key: bytes, fmt: str, body: bytes, doc: Mapping[str, Any] | None, query: Query,
              limits: Limits) -> OpSpec:
    """PUT /v1/kv/{key}: a {value, expect_*} document, or the raw value (fmt "raw")."""
    check_key(key, limits)
    conds = _conditions_from_query(query, limits)
    if fmt == "raw":
        value = body
    else:
        assert doc is not None
        check_fields(doc, {"value", *CONDITION_FIELDS})
        value = get_bytes(doc, "value", required=True)
        conds = _merge(conds, _conditions_from_doc(doc, limits))
    check_value(value, limits)
    return OpSpec("put", key, value, **conds)


def parse_delete(key: bytes, doc: Mapping[str, Any] | None, query: Query, limits: Limits) -> OpSpec:
    """DELETE /v1/kv/{key}: optional expect_* as query params or a body document."""
    check_key(key, limits)
    conds = _conditions_from_query(query, limits)
    if doc is not None:
        check_fields(doc, set(CONDITION_FIELDS))
        conds = _merge(conds, _conditions_from_doc(doc, limits))
    return OpSpec("delete", key, None, **conds)


def parse_txn(doc: Mapping[str, Any], limits: Limits) -> list[OpSpec]:
    """POST /v1/txn {"ops": [...]}: every op validated before anything is proposed."""
    check_fields(doc, {"ops"})
    if "ops" not in doc:
        raise bad("missing field 'ops' (an array of put/delete operations)")
    ops = doc["ops"]
    if not isinstance(ops, list):
        raise bad(f"field 'ops' must be an array, got {type(ops).__name__}")
    if not ops:
        raise bad("field 'ops' must hold at least one operation")
    if len(ops) > limits.max_txn_ops:
        raise V1Error("too_large", f"the transaction has {len(ops)} operations; the limit is {limits.max_txn_ops}")
    return [_parse_op(i, raw, limits) for i, raw in enumerate(ops)]


def _parse_op(i: int, raw: object, limits: Limits) -> OpSpec:
    where = f"ops[{i}]."
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise bad(f"ops[{i}] must be a map with string field names")
    check_fields(raw, {"op", "key", "value", *CONDITION_FIELDS}, where=f"ops[{i}]")
    op = raw.get("op")
    if op is None:
        raise bad(f"missing field '{where}op' (put or delete)")
    if not isinstance(op, str) or op.lower() not in ("put", "delete"):
        raise bad(f"unknown op {op!r} in ops[{i}]; expected put or delete")
    op = op.lower()
    key = check_key(get_bytes(raw, "key", required=True, where=where), limits, f"{where}key")
    conds = _conditions_from_doc(raw, limits, where)
    if op == "put":
        value = check_value(get_bytes(raw, "value", required=True, where=where), limits, f"{where}value")
        return OpSpec("put", key, value, **conds)
    if "value" in raw or "value_b64" in raw:
        raise bad(f"{where}value is not allowed on a delete")
    return OpSpec("delete", key, None, **conds)


# -- ranges --------------------------------------------------------------------------------------------

def prefix_end(prefix: bytes) -> bytes | None:
    """The first key after every key starting with `prefix` (None: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def make_token(last_key: bytes) -> str:
    return TOKEN_PREFIX + b64url(last_key)


def parse_token(token: bytes) -> bytes:
    text = token.decode("ascii", "replace")
    if not text.startswith(TOKEN_PREFIX) or len(text) < 2:
        raise V1Error("bad_range", "bad continuation token in 'after': pass the 'next' of the previous page")
    try:
        key = b64decode(text[len(TOKEN_PREFIX):], "after")
    except V1Error:
        key = b""
    if not key:
        raise V1Error("bad_range", "bad continuation token in 'after': pass the 'next' of the previous page")
    return key


def parse_range(query: Query, limits: Limits) -> RangeSpec:
    """GET /v1/range: [start, end) or a prefix, resumed strictly after the `after` token."""
    start = query.bytes_param("start")
    end = query.bytes_param("end")
    prefix = query.bytes_param("prefix")
    if prefix is not None and (start is not None or end is not None):
        raise V1Error("bad_range", "give 'prefix' or 'start'/'end', not both")
    if prefix is not None:
        start, end = prefix, prefix_end(prefix)
    start = start or b""
    if end is not None and start >= end:
        raise V1Error("bad_range", "'start' must sort before 'end' (end is exclusive)")
    limit_text = query.text("limit")
    if limit_text is None:
        limit = min(DEFAULT_SCAN_LIMIT, limits.max_scan_limit)
    else:
        if not re.fullmatch(r"-?[0-9]{1,19}", limit_text.strip()):
            raise V1Error("bad_range", f"'limit' must be an integer from 1 to {limits.max_scan_limit}")
        limit = int(limit_text)
        if not 1 <= limit <= limits.max_scan_limit:
            raise V1Error("bad_range", f"'limit' must be from 1 to {limits.max_scan_limit}, got {limit}")
    token = query.bytes_param("after")
    if token is not None:
        resume = parse_token(token) + b"\x00"   # the smallest key strictly after it
        if resume > start:
            start = resume
    return RangeSpec(start, end, limit, query.bool_param("keys_only"))


__all__ = ["Limits", "OpSpec", "RangeSpec", "Identity", "consistency", "identity", "parse_put",
           "parse_delete", "parse_txn", "parse_range", "prefix_end", "make_token", "parse_token",
           "check_key", "check_value", "CONSISTENCY_LEVELS", "MAX_INT", "check_int"]
