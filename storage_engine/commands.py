"""Pure request validation and command encoding: no I/O, tested without processes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import msgpack

from raftkv.pb import consensus_pb2 as pb

from .errors import ErrorKind, KVError

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


@dataclass(frozen=True)
class Proposal:
    """One Raft entry's writes with its exactly-once identity (empty client_id: none)."""
    client_id: str
    seq: int
    floor: int
    writes: tuple[Write, ...]


def decode_proposal(cmd: pb.Command) -> Proposal:
    return Proposal(cmd.client_id, cmd.seq, cmd.floor, tuple(decode_command(cmd)))


def encode_batch(writes: Iterable[Write]) -> pb.Command:
    """One Raft entry for several writes, applied in order, atomically."""
    return pb.Command(op="BATCH", batch=[pb.Command(op=w.op, bkey=w.key, bvalue=w.value) for w in writes])


def decode_command(cmd: pb.Command) -> Iterator[Write]:
    """Yields the writes a Command carries; unknown ops are skipped (they never pass parse_insert)."""
    if len(cmd.batch):
        for sub in cmd.batch:
            yield from decode_command(sub)
        return
    op = cmd.op.upper()
    if op not in OPS:
        return
    key = cmd.bkey or cmd.key.encode("utf-8")
    if not key:
        return
    value = cmd.bvalue or cmd.value.encode("utf-8")
    yield Write(op, key, value if op == "SET" else b"")
