"""Pure request validation and command encoding: no I/O, tested without processes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Union

import msgpack

from raftkv.pb import consensus_pb2 as pb

from .errors import ErrorKind, KVError
# The v1 write model lives in txn.py; re-exported here for the HTTP layer.
from .txn import (DELETE, PUT, CurrentState, KeyMeta, OpResult, RequestIdentity,  # noqa: F401
                  Txn, TxnOp, TxnResult)

OPS = ("SET", "DELETE")


@dataclass(frozen=True)
class Write:
    op: str          # "SET" | "DELETE"
    key: bytes
    value: bytes = b""


def _as_bytes(field: str, raw: object) -> bytes:
    if isinstance(raw, str):
        return raw.encode("utf-8")
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    raise KVError(ErrorKind.BAD_INPUT, f"field '{field}' must be a string, got {type(raw).__name__}")


def parse_insert(body: bytes, max_key_bytes: int, max_value_bytes: int) -> Write:
    """Validates an original-format `/insert-val` body: msgpack {"op", "key", "value"}.

    The original accepted junk and proposed it; here anything malformed is refused
    before it can reach the Raft log.
    """
    if not body:
        raise KVError(ErrorKind.BAD_INPUT, "empty body; expected a msgpack map {op, key, value}")
    try:
        # String sizes are bounded by the body (already limited by http_api) and
        # checked below, so that an oversized value gets "too large", not "invalid".
        doc = msgpack.unpackb(body, raw=False, strict_map_key=False,
                              max_array_len=16, max_map_len=16, max_ext_len=0)
    except msgpack.ExtraData:
        raise KVError(ErrorKind.BAD_INPUT, "body has trailing bytes after the msgpack map") from None
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError):
        raise KVError(ErrorKind.BAD_INPUT, "body is not valid msgpack") from None
    if not isinstance(doc, dict):
        raise KVError(ErrorKind.BAD_INPUT, f"body must be a msgpack map, got {type(doc).__name__}")
    op = doc.get("op")
    if op is None:
        raise KVError(ErrorKind.BAD_INPUT, "missing field 'op'")
    if not isinstance(op, str) or op.upper() not in OPS:
        raise KVError(ErrorKind.BAD_INPUT, f"unknown op {op!r}; expected SET or DELETE")
    op = op.upper()
    if "key" not in doc:
        raise KVError(ErrorKind.BAD_INPUT, "missing field 'key'")
    key = _as_bytes("key", doc["key"])
    if not key:
        raise KVError(ErrorKind.BAD_INPUT, "field 'key' must not be empty")
    if len(key) > max_key_bytes:
        raise KVError(ErrorKind.TOO_LARGE, f"key is {len(key)} bytes; the limit is {max_key_bytes}")
    if op == "DELETE":
        return Write("DELETE", key)
    if "value" not in doc:
        raise KVError(ErrorKind.BAD_INPUT, "missing field 'value' for SET")
    value = _as_bytes("value", doc["value"])
    if len(value) > max_value_bytes:
        raise KVError(ErrorKind.TOO_LARGE, f"value is {len(value)} bytes; the limit is {max_value_bytes}")
    return Write("SET", key, value)


@dataclass(frozen=True, slots=True)
class TxnRequest:
    """One v1 request inside a proposal: a txn with its client's identity (or None)."""
    txn: Txn
    identity: RequestIdentity | None = None


Item = Union[Write, TxnRequest]  # one request of a batched proposal


@dataclass(frozen=True)
class Proposal:
    """One Raft entry's requests with the proposer's exactly-once identity (empty client_id: none)."""
    client_id: str
    seq: int
    floor: int
    writes: tuple[Item, ...]


def decode_proposal(cmd: pb.Command) -> Proposal:
    return Proposal(cmd.client_id, cmd.seq, cmd.floor, tuple(decode_command(cmd)))


def encode_batch(items: Iterable[Item]) -> pb.Command:
    """One Raft entry for several requests, applied in order, each one atomically."""
    return pb.Command(op="BATCH", batch=[encode_txn(i.txn, i.identity) if isinstance(i, TxnRequest)
                                         else pb.Command(op=i.op, bkey=i.key, bvalue=i.value) for i in items])


def encode_txn(txn: Txn, identity: RequestIdentity | None = None) -> pb.Command:
    cmd = pb.Command(op="TXN", batch=[_encode_op(op) for op in txn.ops])
    if identity is not None:
        cmd.client_id, cmd.seq, cmd.floor = identity.client_id, identity.seq, identity.floor
    return cmd


def _encode_op(op: TxnOp) -> pb.Command:
    sub = pb.Command(op="SET" if op.op == PUT else "DELETE", bkey=op.key, bvalue=op.value)
    if op.expect_value is not None:
        sub.expect_value = op.expect_value
    if op.expect_version is not None:
        sub.expect_version = op.expect_version
    if op.expect_mod_revision is not None:
        sub.expect_mod_revision = op.expect_mod_revision
    return sub


def decode_command(cmd: pb.Command) -> Iterator[Item]:
    """Yields the requests a Command carries; unknown ops are skipped (they never pass parse_insert)."""
    op = cmd.op.upper()
    if op == "TXN":
        yield _decode_txn(cmd)
        return
    if len(cmd.batch):
        for sub in cmd.batch:
            yield from decode_command(sub)
        return
    if op not in OPS:
        return
    key = cmd.bkey or cmd.key.encode("utf-8")
    if not key:
        return
    value = cmd.bvalue or cmd.value.encode("utf-8")
    yield Write(op, key, value if op == "SET" else b"")


def _decode_txn(cmd: pb.Command) -> TxnRequest:
    ops = []
    for sub in cmd.batch:
        kind = sub.op.upper()
        if kind not in OPS:
            continue  # never encoded by encode_txn; skipped the same way on every node
        ops.append(TxnOp(
            PUT if kind == "SET" else DELETE,
            sub.bkey or sub.key.encode("utf-8"),
            (sub.bvalue or sub.value.encode("utf-8")) if kind == "SET" else b"",
            sub.expect_value if sub.HasField("expect_value") else None,
            sub.expect_version if sub.HasField("expect_version") else None,
            sub.expect_mod_revision if sub.HasField("expect_mod_revision") else None,
        ))
    identity = RequestIdentity(cmd.client_id, cmd.seq, cmd.floor) if cmd.client_id else None
    return TxnRequest(Txn(tuple(ops)), identity)
