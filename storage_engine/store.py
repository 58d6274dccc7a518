"""LevelDB-backed key-value map with per-key metadata, fenced by raft index.

Every apply writes the data, the store revision and the new applied index in
one LevelDB write batch, so after any crash the stored data is exactly the state
after the stored index, and replayed entries (index <= applied) are skipped: a
log replay never applies anything twice (pysyncobj note, H5).

Each key is stored as one record: a 24-byte header (create_revision,
mod_revision, version) followed by the value bytes, both in LevelDB and as one
bytes object per key in memory (a second object per key would cost ~50 MB per
million keys). Revisions are computed here, at apply, so every node derives the
same metadata from the same log.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import plyvel

from raftkv import backup

from .commands import Item, Proposal, Write
from .errors import ErrorKind, KVError
from .sessions import EXPIRY_EVERY, Session, SessionTable
from .txn import (DELETE, PUT, CurrentState, KeyMeta, OpResult, Txn, TxnOp, TxnResult,
                  outcome_from_wire, outcome_to_wire)

log = logging.getLogger(__name__)

DATA_PREFIX = b"d/"
_DATA_END = b"d0"                 # first key after every DATA_PREFIX key
SESSION_PREFIX = b"s/"
APPLIED_KEY = b"m/applied_index"
REVISION_KEY = b"m/revision"
FORMAT_KEY = b"m/format"
FORMAT = b"2"                     # values are records (header + value); absent: plain values
UPGRADE_KEY = b"m/upgrade_next"   # while upgrading an older store: the first key not yet converted
UPGRADE_BATCH_KEYS = 10_000
_INDEX = struct.Struct(">Q")
META = struct.Struct(">QQQ")      # create_revision, mod_revision, version
META_SIZE = META.size
_META_PACK, _META_UNPACK = META.pack, META.unpack_from   # the apply loop's hot path

# Called after a run is stored, for each proposal of the registered client:
# (seq, raft index, per-request outcomes: None for a Write, TxnResult or KVError for a txn).
OutcomeSink = Callable[[int, int, list], None]


def pack_record(create_revision: int, mod_revision: int, version: int, value: bytes) -> bytes:
    return META.pack(create_revision, mod_revision, version) + value


def unpack_record(record: bytes) -> tuple[int, int, int, bytes]:
    """(create_revision, mod_revision, version, value) of a stored record."""
    c, m, v = META.unpack_from(record)
    return c, m, v, record[META_SIZE:]


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no bound)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1]) if p else None


@dataclass
class ApplyStats:
    applies: int = 0      # entries applied by this process
    skipped: int = 0      # entries skipped because already stored (replay)
    duplicates: int = 0   # proposals/requests skipped because their (client, seq) was applied


class StoreUnavailable(RuntimeError):
    """A write failed and LevelDB could not be reopened since (e.g. the disk is still full)."""


def error_text(exc: BaseException) -> str:
    """plyvel errors carry LevelDB's message as bytes; str() would give their repr."""
    arg = exc.args[0] if exc.args else exc
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


class Store:
    """The engine's data: a dict of records in memory, LevelDB underneath."""

    def __init__(self, path: str, audit_path: str | None = None) -> None:
        self.path = path
        self._recover_interrupted_restore()
        self._db = plyvel.DB(path, create_if_missing=True)
        self._data: dict[bytes, bytes] = {}
        self.sessions = SessionTable()
        self.applied_index = 0
        self.revision = 0
        self.stats = ApplyStats()
        self._sink_client: str | None = None
        self._sink: OutcomeSink | None = None
        self._broken: str | None = None   # why the last write failed, until a reopen succeeds
        try:
            self._load()
        except BaseException:
            self._db.close()  # the LOCK is released at once, not at garbage collection
            raise
        self._audit = open(audit_path, "a", buffering=1) if audit_path else None

    def set_outcome_sink(self, client_id: str, sink: OutcomeSink) -> None:
        """Outcomes of proposals made by `client_id` (this engine) go to `sink` once stored."""
        self._sink_client, self._sink = client_id, sink

    # -- reading -------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        rec = self._data.get(key)
        return rec[META_SIZE:] if rec is not None else None

    def get_entry(self, key: bytes) -> KeyMeta | None:
        rec = self._data.get(key)
        if rec is None:
            return None
        c, m, v = META.unpack_from(rec)
        return KeyMeta(key, rec[META_SIZE:], c, m, v)

    def scan(self, start: bytes, end: bytes | None, limit: int,
             keys_only: bool = False) -> tuple[list[KeyMeta], bool]:
        """Up to `limit` keys in [start, end) in bytewise order, and whether more follow.

        Reads limit+1 entries from a LevelDB iterator at most: the cost does not
        depend on the store size. LevelDB always equals memory between applies."""
        out: list[KeyMeta] = []
        it = self._db.iterator(start=DATA_PREFIX + start,
                               stop=DATA_PREFIX + end if end is not None else _DATA_END)
        try:
            for k, rec in it:
                if len(out) >= limit:
                    return out, True
                c, m, v = META.unpack_from(rec)
                out.append(KeyMeta(k[2:], b"" if keys_only else rec[META_SIZE:], c, m, v))
        finally:
            it.close()
        return out, False

    def __len__(self) -> int:
        return len(self._data)

    # -- applying ------------------------------------------------------------
    def apply(self, entries: Sequence[tuple[int, Iterable[Item | Proposal]]]) -> int:
        """Applies committed entries in index order; returns the applied index.

        One LevelDB write batch for the whole run (the sidecar sends runs of
        entries), so the per-write cost does not grow with the data size. A
        Proposal or request whose (client, seq) was already applied is skipped
        (a retry); a skipped request is answered with its first outcome.
        """
        if self._broken is not None and not self._reopen():
            raise StoreUnavailable(f"{self._broken} (the store at {self.path} could not be reopened since)")
        fresh = [(i, list(items)) for i, items in entries if i > self.applied_index]
        self.stats.skipped += len(entries) - len(fresh)
        if not fresh:
            return self.applied_index
        try:
            return self._apply_fresh(fresh)
        except plyvel.Error as exc:
            self._broken = error_text(exc)
            # A failed write (a full disk) may leave a partial record at the end of
            # LevelDB's log, and later writes on the same handle would land after it,
            # where recovery reports corruption. Reopening now recovers the log while
            # the partial record is its tail (dropped cleanly); memory is reloaded from
            # disk, which is the truth (first from the old handle, in case the reopen fails).
            self._load()
            self._reopen()
            raise
        except Exception:
            # Memory may be ahead of disk now; the disk is the truth.
            self._load()
            raise

    def _reopen(self) -> bool:
        try:
            self._db.close()
            self._db = plyvel.DB(self.path, create_if_missing=False)
            self._load()
        except (plyvel.Error, OSError) as exc:
            # Still failing (no space even to recover): every later apply retries the
            # reopen and fails with the first write's reason, so the sidecar fail-stops
            # naming it; nothing is acknowledged meanwhile.
            log.error("cannot reopen the LevelDB store %s after a failed write (%s): %s",
                      self.path, self._broken, error_text(exc))
            return False
        self._broken = None
        return True

    def _apply_fresh(self, fresh: list[tuple[int, list[Item | Proposal]]]) -> int:
        last = self.applied_index
        touched: set[str] = set()
        expired: list[str] = []
        delivered: list[tuple[int, int, list]] = []
        sink_client = self._sink_client if self._sink is not None else None
        with self._db.write_batch(transaction=True) as wb:
            for index, items in fresh:
                if index <= last:
                    raise ValueError(f"entries out of order: {index} after {last}")
                last = index
                for item in items:
                    if isinstance(item, Proposal):
                        if item.client_id:
                            touched.add(item.client_id)
                            if not self.sessions.admit(item.client_id, item.seq, item.floor, index):
                                self.stats.duplicates += 1
                                continue
                        if item.client_id and item.client_id == sink_client:
                            delivered.append((item.seq, index, [self._apply_item(wb, sub, index, touched, True)
                                                                for sub in item.writes]))
                        else:
                            for sub in item.writes:
                                self._apply_item(wb, sub, index, touched, False)
                    else:
                        self._apply_item(wb, item, index, touched, False)
                if index % EXPIRY_EVERY == 0:
                    expired += self.sessions.expire(index)
            for client in touched:
                if client in self.sessions.sessions:
                    wb.put(SESSION_PREFIX + client.encode(), self.sessions.sessions[client].encode())
            for client in expired:
                wb.delete(SESSION_PREFIX + client.encode())
            wb.put(REVISION_KEY, _INDEX.pack(self.revision))
            wb.put(APPLIED_KEY, _INDEX.pack(last))
        self.applied_index = last
        self.stats.applies += len(fresh)
        if self._audit is not None:
            self._audit.write("".join(f"{i}\n" for i, _ in fresh))
        if self._sink is not None:
            for seq, index, outcomes in delivered:
                self._sink(seq, index, outcomes)
        return last

    def _apply_item(self, wb, item: Item, index: int, touched: set[str],
                    want: bool) -> TxnResult | KVError | None:
        """Applies one request (one revision at most); its outcome when `want`."""
        if type(item) is Write:
            if item.op == "SET":
                rev = self.revision = self.revision + 1
                key = item.key
                old = self._data.get(key)
                if old is None:
                    rec = _META_PACK(rev, rev, 1) + item.value
                else:
                    create, _, version = _META_UNPACK(old)
                    rec = _META_PACK(create, rev, version + 1) + item.value
                wb.put(DATA_PREFIX + key, rec)
                self._data[key] = rec
            elif self._delete(wb, item.key):
                self.revision += 1
            return None
        ident = item.identity
        if ident is None:
            result = self._run_txn(wb, item.txn, index)
            return result if want else None
        touched.add(ident.client_id)
        if not self.sessions.admit(ident.client_id, ident.seq, ident.floor, index):
            self.stats.duplicates += 1
            if not want:
                return None
            raw = self.sessions.outcome(ident.client_id, ident.seq)
            if raw is None:
                return KVError(ErrorKind.BAD_INPUT,
                               f"request seq {ident.seq} of client {ident.client_id!r} is below its floor "
                               f"{self.sessions.floor(ident.client_id)} or has no remembered outcome: "
                               "it was not applied again")
            return outcome_from_wire(raw, item.txn, index, duplicate=True)
        result = self._run_txn(wb, item.txn, index)
        self.sessions.remember(ident.client_id, ident.seq, outcome_to_wire(result))
        return result

    def _run_txn(self, wb, txn: Txn, index: int) -> TxnResult:
        """All or nothing: every condition against the state before the txn, then the ops in order."""
        data = self._data
        failed = [n for n, op in enumerate(txn.ops) if op.has_condition and not _holds(op, data.get(op.key))]
        if failed:
            current = []
            for n in failed:
                rec = data.get(txn.ops[n].key)
                if rec is None:
                    current.append(CurrentState(False))
                else:
                    c, m, v = META.unpack_from(rec)
                    current.append(CurrentState(True, v, m, c))
            return TxnResult(False, self.revision, failed=tuple(failed), current=tuple(current), index=index)
        rev = self.revision + 1
        changed = False
        results = []
        for op in txn.ops:
            if op.op == PUT:
                version, create = self._put(wb, op.key, op.value, rev)
                changed = True
                results.append(OpResult(op.key, PUT, version, rev, create))
            else:
                existed = self._delete(wb, op.key)
                changed = changed or existed
                results.append(OpResult(op.key, DELETE, deleted=int(existed)))
        if changed:
            self.revision = rev
        return TxnResult(True, self.revision, results=tuple(results), index=index)

    def _put(self, wb, key: bytes, value: bytes, rev: int) -> tuple[int, int]:
        old = self._data.get(key)
        if old is None:
            create, version = rev, 1
        else:
            create, _, version = META.unpack_from(old)
            version += 1
        rec = META.pack(create, rev, version) + value
        wb.put(DATA_PREFIX + key, rec)
        self._data[key] = rec
        return version, create

    def _delete(self, wb, key: bytes) -> bool:
        if self._data.pop(key, None) is None:
            return False
        wb.delete(DATA_PREFIX + key)
        return True

    # -- snapshots -------------------------------------------------------------
    def snapshot_sessions(self, snap=None) -> bytes:
        """The dedup table as of a LevelDB snapshot (or now), for Raft snapshots."""
        src = snap if snap is not None else self._db
        table = SessionTable()
        for k, v in src.iterator(prefix=SESSION_PREFIX):
            table.sessions[k[len(SESSION_PREFIX):].decode()] = Session.decode(v)
        return table.dump()

    def iter_snapshot(self, chunk_keys: int = 1000, with_sessions: bool = False
                      ) -> Iterator[tuple[int, list[tuple[bytes, bytes]] | tuple[bytes, int]]]:
        """Yields (applied_index, [(key, record), ...]) chunks from one consistent LevelDB snapshot.

        With `with_sessions`, the first item is (applied_index, (sessions blob, revision))."""
        snap = self._db.snapshot()
        try:
            index = _read_int(snap, APPLIED_KEY)
            if with_sessions:
                yield index, (self.snapshot_sessions(snap), _read_int(snap, REVISION_KEY))
            chunk: list[tuple[bytes, bytes]] = []
            for k, v in snap.iterator(prefix=DATA_PREFIX):
                chunk.append((k[len(DATA_PREFIX):], v))
                if len(chunk) >= chunk_keys:
                    yield index, chunk
                    chunk = []
            yield index, chunk
        finally:
            snap.close()

    def iter_backup(self, node: str = "") -> "BackupView":
        """A backup of one LevelDB snapshot taken now (for /v1/backup).

        Iterating the view yields the backup file's bytes (raftkv/backup.py format)
        in chunks; `.records()` yields the raw records instead."""
        return BackupView(self._db.snapshot(), node or socket.gethostname())

    def begin_restore(self) -> "Restore":
        return Restore(self)

    def _swap_in(self, new_path: str) -> None:
        old_path = self.path + ".old"
        self._db.close()
        shutil.rmtree(old_path, ignore_errors=True)
        os.rename(self.path, old_path)
        os.rename(new_path, self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        shutil.rmtree(old_path, ignore_errors=True)
        self._db = plyvel.DB(self.path, create_if_missing=True)
        self._load()

    # -- lifecycle ---------------------------------------------------------------
    def _load(self) -> None:
        self._upgrade()
        self.applied_index = _read_int(self._db, APPLIED_KEY)
        self.revision = _read_int(self._db, REVISION_KEY)
        self._data = {k[len(DATA_PREFIX):]: v for k, v in self._db.iterator(prefix=DATA_PREFIX)}
        self.sessions = SessionTable.load(self.snapshot_sessions())
        log.info("store %s: %d keys, revision %d, applied index %d",
                 self.path, len(self._data), self.revision, self.applied_index)

    def _upgrade(self) -> None:
        """A store written before per-key metadata holds plain values: give each the
        header of a key created before revision 1 (version 1). In bounded batches, each
        with the position reached, so that memory stays flat and a crash midway resumes
        where it stopped instead of adding a second header."""
        if self._db.get(FORMAT_KEY) == FORMAT:
            return
        start = self._db.get(UPGRADE_KEY) or DATA_PREFIX
        n = 0
        batch: list[tuple[bytes, bytes]] = []
        for k, v in self._db.iterator(start=start, stop=_DATA_END):  # an implicit snapshot
            batch.append((k, v))
            if len(batch) >= UPGRADE_BATCH_KEYS:
                self._write_upgrade(batch, k + b"\x00")
                n += len(batch)
                batch = []
        self._write_upgrade(batch, None)
        n += len(batch)
        if n:
            log.warning("store %s: added metadata headers to %d keys of an older format", self.path, n)

    def _write_upgrade(self, batch: list[tuple[bytes, bytes]], resume_at: bytes | None) -> None:
        with self._db.write_batch(transaction=True) as wb:
            for k, v in batch:
                wb.put(k, pack_record(0, 0, 1, v))
            if resume_at is None:
                wb.delete(UPGRADE_KEY)
                wb.put(FORMAT_KEY, FORMAT)
            else:
                wb.put(UPGRADE_KEY, resume_at)

    def _recover_interrupted_restore(self) -> None:
        """A crash in the middle of _swap_in leaves `.old` without the main directory."""
        old_path = self.path + ".old"
        if not os.path.exists(self.path) and os.path.isdir(old_path):
            log.warning("recovering %s from an interrupted restore", self.path)
            os.rename(old_path, self.path)
        shutil.rmtree(self.path + ".restore", ignore_errors=True)

    def close(self) -> None:
        self._db.close()
        if self._audit is not None:
            self._audit.close()


class BackupView:
    """One LevelDB snapshot: its applied index and revision, and its records in key order.

    Iterating it yields the backup file's bytes, chunk by chunk; `records()` yields
    (key, value, create_revision, mod_revision, version) tuples. The snapshot is
    released at the end of either iteration (or when it is closed) or by close()."""

    def __init__(self, snap, node: str, chunk_records: int = 1000) -> None:
        self._snap = snap
        self.node = node
        self.chunk_records = chunk_records
        self.applied_index = _read_int(snap, APPLIED_KEY)
        self.revision = _read_int(snap, REVISION_KEY)

    def records(self) -> Iterator[tuple[bytes, bytes, int, int, int]]:
        if self._snap is None:
            raise ValueError("this backup view is closed")
        try:
            for k, rec in self._snap.iterator(prefix=DATA_PREFIX):
                c, m, v = META.unpack_from(rec)
                yield k[2:], rec[META_SIZE:], c, m, v
        finally:
            self.close()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from backup.encode(self.records(), self.applied_index, self.revision, self.node,
                                     chunk_records=self.chunk_records)
        finally:
            self.close()

    def close(self) -> None:
        if self._snap is not None:
            self._snap.close()
            self._snap = None

    def __enter__(self) -> "BackupView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Restore:
    """Builds a replacement database beside the live one; swapped in only when complete."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._path = store.path + ".restore"
        shutil.rmtree(self._path, ignore_errors=True)
        self._db = plyvel.DB(self._path, create_if_missing=True)
        self._db.put(FORMAT_KEY, FORMAT)
        self.index = 0

    def add(self, records: Iterable[tuple[bytes, bytes]]) -> None:
        """(key, record) pairs as iter_snapshot yields them."""
        with self._db.write_batch() as wb:
            for k, rec in records:
                if len(rec) < META_SIZE:
                    raise ValueError(f"record of key {k!r} is {len(rec)} bytes, shorter than its header")
                wb.put(DATA_PREFIX + k, rec)

    def add_plain(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """(key, value) pairs from a snapshot of the older format, without metadata."""
        with self._db.write_batch() as wb:
            for k, v in pairs:
                wb.put(DATA_PREFIX + k, pack_record(0, 0, 1, v))

    def set_sessions(self, blob: bytes) -> None:
        table = SessionTable.load(blob)
        with self._db.write_batch() as wb:
            for client, sess in table.sessions.items():
                wb.put(SESSION_PREFIX + client.encode(), sess.encode())

    def set_revision(self, revision: int) -> None:
        self._db.put(REVISION_KEY, _INDEX.pack(revision))

    def commit(self, index: int) -> None:
        self._db.put(APPLIED_KEY, _INDEX.pack(index), sync=True)
        self._db.close()
        self._store._swap_in(self._path)

    def abort(self) -> None:
        self._db.close()
        shutil.rmtree(self._path, ignore_errors=True)


def _holds(op: TxnOp, rec: bytes | None) -> bool:
    """Whether every condition of `op` holds on the key's current record."""
    if rec is None:
        return op.expect_version == 0 and op.expect_value is None and op.expect_mod_revision is None
    _, m, v = META.unpack_from(rec)
    if op.expect_version is not None and op.expect_version != v:
        return False
    if op.expect_mod_revision is not None and op.expect_mod_revision != m:
        return False
    ev = op.expect_value
    if ev is not None and (len(rec) - META_SIZE != len(ev) or not rec.endswith(ev)):
        return False  # endswith: no copy of the value
    return True


def _read_int(src, key: bytes) -> int:
    raw = src.get(key)
    return _INDEX.unpack(raw)[0] if raw else 0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
