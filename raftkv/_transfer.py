"""Backup and restore on the client side, the parts without network I/O.

The file format and its checks belong to raftkv/backup.py (BackupError); this module adds
what a client needs around it: writing a download safely (temporary file, verify, fsync,
rename), grouping records into txns for a restore, and the final count check.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Generator

from . import backup as backup_format
from ._core import Answer
from ._errors import ProtocolError, RestoreError
from ._types import BackupInfo

BackupError = backup_format.BackupError

# A restore txn whose outcome stays unknown is sent again as a new request: its ops are
# unconditional puts of the backup's values, so a second copy can only write the same values.
RESTORE_TXN_ATTEMPTS = 3
# msgpack framing per op, on top of key and value bytes.
OP_OVERHEAD = 32
# Restore txns stay at or below this many ops (the engines accept up to 1000 by default; half of
# that keeps each Raft entry and apply batch moderate while still amortizing the round trip).
MAX_TXN_OPS = 500


def check_txn_ops(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TXN_OPS:
        raise ValueError(f"txn_ops must be 1-{MAX_TXN_OPS}, not {n!r}")


def partial_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(f".{p.name}.partial-{os.getpid()}")


def fsync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def finish_backup(tmp: Path, path: str | os.PathLike, node: str, t0: float) -> BackupInfo:
    """Verifies the downloaded file (a cut-off stream fails here), then moves it into place."""
    header, count = backup_format.verify(str(tmp))
    size = tmp.stat().st_size
    dest = Path(path)
    os.replace(tmp, dest)
    try:
        fd = os.open(dest.parent if str(dest.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file itself is synced
    return BackupInfo(path=str(dest), count=count, bytes=size, revision=header.revision,
                      applied_index=header.applied_index, node=header.node or node,
                      seconds=time.monotonic() - t0)


def verify(path: str | os.PathLike) -> int:
    """Record count of an intact backup; BackupError (naming the problem) otherwise. A restore
    reads the whole file once before writing anything, so a corrupt file changes nothing."""
    try:
        _, count = backup_format.verify(str(path))
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from None
    return count


def batches(path: str | os.PathLike, max_ops: int, max_bytes: int) -> Generator[list[dict[str, Any]], None, None]:
    """The records as txn op lists of at most max_ops ops and about max_bytes (one bigger
    record goes alone). The reader re-checks the digest at the end of this second pass."""
    with open(path, "rb") as f:
        reader = backup_format.BackupReader(f)
        ops: list[dict[str, Any]] = []
        size = 0
        for rec in reader:
            n = len(rec.key) + len(rec.value) + OP_OVERHEAD
            if ops and (len(ops) >= max_ops or size + n > max_bytes):
                yield ops
                ops, size = [], 0
            ops.append({"op": "put", "key": rec.key, "value": rec.value})
            size += n
        if ops:
            yield ops


def refuse_non_empty(first_key: bytes) -> None:
    raise RestoreError(
        f"the target cluster is not empty (it holds at least the key {first_key[:60]!r}); restore into an "
        "empty cluster, or pass --force to write the backup over the existing keys", code="not_empty")


def check_count(total: int, before: int, after: int, force: bool) -> None:
    """An empty target must end with exactly the backup's keys. With force the backup's keys
    were written over whatever was there, so the count is at least the backup's and at most
    that plus what was there before."""
    if not force:
        if after != total:
            raise RestoreError(f"verification failed: the backup holds {total} keys but the cluster now has "
                               f"{after}; was something else writing to it?", code="verify")
        return
    if not total <= after <= total + before:
        raise RestoreError(f"verification failed: after writing {total} keys over {before} existing ones the "
                           f"cluster has {after} keys (expected {total} to {total + before})", code="verify")


def json_doc(a: Answer) -> dict[str, Any]:
    try:
        doc = json.loads(a.body)
    except ValueError:
        raise ProtocolError(f"{a.node}: expected JSON, got {a.body[:200]!r}", status=a.status,
                            node=a.node) from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{a.node}: expected a JSON object", status=a.status, node=a.node)
    return doc
