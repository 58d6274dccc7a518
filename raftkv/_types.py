"""Values the client library returns and takes (plain dataclasses, no I/O)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

Bytesish = Union[bytes, bytearray, memoryview, str]


def to_bytes(value: Bytesish, what: str = "key") -> bytes:
    """Keys and values are bytes; a str is taken as its UTF-8 encoding."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or str, not {type(value).__name__}")


@dataclass(frozen=True)
class KeyValue:
    """One key with its metadata. `value` is None in a keys_only scan. `revision` is the
    store revision at the time of the read (get only; 0 in scans: see Page.revision)."""

    key: bytes
    value: bytes | None
    create_revision: int
    mod_revision: int
    version: int
    revision: int = 0

    @property
    def text(self) -> str:
        """The value decoded as UTF-8 (replacement characters for invalid bytes)."""
        return (self.value or b"").decode("utf-8", "replace")


@dataclass(frozen=True)
class PutResult:
    key: bytes
    revision: int
    version: int
    create_revision: int
    mod_revision: int
    duplicate: bool = False  # answered from the server's memory of an earlier attempt


@dataclass(frozen=True)
class DeleteResult:
    deleted: int  # 1 when the key existed, 0 when it did not
    revision: int
    duplicate: bool = False


@dataclass(frozen=True)
class Page:
    """One page of a scan. `next` is the continuation token (None on the last page)."""

    kvs: list[KeyValue]
    more: bool
    next: str | None
    revision: int


@dataclass(frozen=True)
class PutOp:
    """A put inside a txn; expect_* are its conditions (all must hold for the txn to apply)."""

    key: Bytesish
    value: Bytesish
    expect_value: Bytesish | None = None
    expect_version: int | None = None
    expect_mod_revision: int | None = None


@dataclass(frozen=True)
class DeleteOp:
    key: Bytesish
    expect_value: Bytesish | None = None
    expect_version: int | None = None
    expect_mod_revision: int | None = None


TxnOp = Union[PutOp, DeleteOp]


@dataclass(frozen=True)
class TxnResult:
    """A txn that applied (a failed compare raises CompareFailed). `results[i]` is a dict
    with "key" and "version"/"mod_revision" (put) or "deleted" (delete) of ops[i]."""

    succeeded: bool
    revision: int
    results: list[dict[str, Any]]
    duplicate: bool = False


@dataclass(frozen=True)
class Member:
    id: str
    address: str  # Raft address host:port
    mgmt: str = ""  # management address host:port ("" when not registered)


@dataclass
class NodeStatus:
    """/status of one node's management API (or why it did not answer)."""

    mgmt_url: str
    ok: bool
    error: str = ""
    node_id: str = ""
    is_leader: bool = False
    leader_id: str = ""
    leader_addr: str = ""
    term: int = 0
    commit_index: int = 0
    applied_index: int = 0
    members: list[Member] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackupInfo:
    path: str
    count: int
    bytes: int
    revision: int
    applied_index: int
    node: str
    seconds: float


@dataclass(frozen=True)
class RestoreInfo:
    path: str
    count: int  # records in the backup
    txns: int  # txns written
    keys_after: int  # keys counted in the target at the end
    seconds: float
