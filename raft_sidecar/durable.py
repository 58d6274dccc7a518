"""Crash-safe persistence for PySyncObj 0.3.17, without forking the library.

Notes H1, H2 and H7 (and §1 "Still missing"): stock PySyncObj never fsyncs or
msyncs, has no record checksums, renames meta and dump files without fsync, and
rewrites the journal in place when it compacts. This module fixes that with a
replacement journal class, a transport subclass and a few monkeypatches, all
applied by `install()` (idempotent, call it before constructing SyncObj):

* `pysyncobj.syncobj.createJournal` (and `pysyncobj.journal.createJournal`,
  `pysyncobj.createJournal`) builds a `DurableFileJournal`: CRC32 per record,
  own versioned format, fdatasync via `sync()`, compaction by rename;
* `pysyncobj.serializer.atomicReplace` (and `pysyncobj.atomic_replace`'s)
  fsyncs the dump before the rename and the directory after it;
* the stock `MetaStorer.storeMeta` fsyncs too (only used if something still
  builds a stock FileJournal);
* `SyncObj._SyncObj__loadDumpFile` is wrapped to close two windows where stock
  PySyncObj drops journal entries that this node may have acknowledged, found
  by the kill -9 test (I7, I8 below).

`DurableTCPTransport` (pass it as `SyncObj(..., transportClass=...)`) makes the
journal durable before any `append_entries`, `next_node_idx`, `request_vote`
or `response_vote` leaves the node: "persist before you acknowledge or
replicate", as group commit. `check_data_dir()` refuses a data dir whose
journal was compacted but whose dump is missing or unreadable (H2).

Invariants (what the rest of the sidecar may rely on)
-----------------------------------------------------
I1  Every journal entry that this node has acknowledged (`next_node_idx`),
    replicated (`append_entries`), or counted towards a commit is on stable
    storage: the transport syncs before those messages go out, and
    `setRaftCommitIndex` syncs when the new commit index covers unsynced
    entries (a single-node cluster commits without sending anything; the sync
    happens before PySyncObj applies the entries or sends the new commit index).
I2  currentTerm/votedFor are on stable storage before `setCurrentTerm` returns,
    hence before the `request_vote`/`response_vote` that depends on them is
    sent (PySyncObj stores them synchronously; the storer fsyncs the file,
    renames it atomically and fsyncs the directory).
I3  The journal file at its path is always a complete journal: it is created
    and compacted by writing `<journal>.compact`, fsyncing it and renaming it
    over the journal (H7). A kill at any moment leaves the old or the new file.
I4  A record is accepted only if its CRC32 matches. On load, a bad record with
    no valid record after it is a torn tail: the file is truncated there, with
    a warning naming the file and the index range dropped. A bad record followed
    by any valid record is mid-file corruption: the journal refuses to open
    (`JournalCorruptError`, names the file). A record whose index does not
    follow its predecessor also refuses. (Conservative: after an OS crash an
    unsynced tail with a hole in it also refuses; nothing in it was ever
    acknowledged, but telling that apart needs the synced length.)
I5  The dump file is fsynced before it is renamed into place, and the
    directory after, so the journal head is never compacted away before the
    dump that replaces it is durable.
I6  Any I/O error while writing, truncating or syncing the journal or the meta
    file is fatal (`DurableFileJournal.fatal`, default `os._exit(70)`): after a
    failed fsync the page cache may no longer match the disk, and continuing
    could acknowledge entries that are gone. The supervisor restarts the node.
    (A failed compaction before its rename is only logged: the old journal is
    intact.)
I7  Start-up after a kill between the dump rename and the journal compaction
    (PySyncObj compacts one tick after the dump is written): stock PySyncObj
    sees a journal that does not start at the dump and replaces it with the
    dump's last two entries, dropping every later entry. The wrapper completes
    the interrupted compaction instead when the journal holds those two entries.
I8  A snapshot installed from the leader in the same tick in which this node
    finished writing its own dump: stock PySyncObj then compacts the journal
    for the node's own (replaced, newer) dump, past the installed snapshot, so
    the entries in between exist nowhere on this node (and a restart drops the
    journal). The wrapper forgets the pending own serialization (useFork=False,
    which a custom serializer implies; fork mode is not covered).
I9  PySyncObj truncates a follower's whole suffix on every AppendEntries and
    re-adds it (note H10). The journal truncates lazily: records re-added
    identically stay in place, so an acknowledged entry is never cut from the
    file, even for a moment; the file is cut at the first differing add or at
    the next sync.

Group commit (DurableTCPTransport.coalesce, default True): while the journal is
dirty, those messages, and every message after them, are queued and flushed
(one fdatasync, then all of them in order) after PySyncObj drains its command
queue, before each poll and after each poll. Without it, appendEntriesUseBatch
=False costs one fdatasync per command on the leader and per AppendEntries on
a follower.

Threading: PySyncObj mutates the journal from its tick thread only (and from
the constructor, before that thread starts); sends happen on the same thread.
A lock still guards every method so that a status read from another thread
sees a consistent journal.

On-disk format, version 1 (little-endian)
-----------------------------------------
journal   header: magic b"RKVJRNL\\0" (8) | u32 format version (=1)
                  | u32 CRC32 of the previous 12 bytes
          records, back to back until the end of the file:
                  magic b"\\xd5\\x1eRJ" (4) | u32 payload length | u32 CRC32
                  | u64 raft index | u64 raft term | payload
          The CRC32 covers length, index, term and payload. The payload is the
          PySyncObj command (1 type byte + pickle). There is no "last record
          offset": the file length is the end of the log (truncation uses
          ftruncate), and the record magic lets the loader look past a bad
          record to tell a torn tail from mid-file corruption.
meta      `<journal>.meta`: magic b"RKVMETA\\0" (8) | u32 version (=1)
          | u32 payload length | u32 CRC32 of payload | payload = pickle of
          {currentTerm, votedForNodeId, raftCommitIndex}. A stock (plain
          pickle) meta file is still read; it is rewritten in this format at the
          next store. A meta file that exists but cannot be read refuses to
          start (stock silently forgot the vote, note §1).

A journal written by stock `FileJournal` (header b"PYSYNCOBJ") is refused with
`StockJournalError`; convert it offline with
`python -m raft_sidecar.durable migrate <journal>` (keeps a hard-linked
`<journal>.stock-backup`), or wipe the data dir and let the node resync.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import pickle
import struct
import sys
import threading
import time
import zlib
from typing import Any, Callable, NamedTuple

import pysyncobj
import pysyncobj.atomic_replace as _atomic_replace_mod
import pysyncobj.journal as _journal_mod
import pysyncobj.serializer as _serializer_mod
import pysyncobj.syncobj as _syncobj_mod
from pysyncobj.journal import Journal, MemoryJournal
from pysyncobj.transport import TCPTransport

log = logging.getLogger(__name__)

__all__ = [
    "install", "uninstall", "installed", "DurableFileJournal", "DurableTCPTransport", "DurableMetaStorer",
    "check_data_dir", "scan_journal", "migrate_stock_journal", "durable_atomic_replace",
    "DurableError", "JournalCorruptError", "StockJournalError", "MetaCorruptError", "DataDirError",
    "SYNC_BEFORE_TYPES",
]

# -- on-disk format ------------------------------------------------------------------
FILE_MAGIC = b"RKVJRNL\x00"
FORMAT_VERSION = 1
_FILE_HDR = struct.Struct("<8sII")          # magic, version, crc32(magic|version)
HEADER_SIZE = _FILE_HDR.size                # 16
REC_MAGIC = b"\xd5\x1eRJ"
_REC_HDR = struct.Struct("<4sIIQQ")         # magic, payload length, crc32, index, term
REC_HDR_SIZE = _REC_HDR.size                # 28
_REC_CRC_PREFIX = struct.Struct("<IQQ")     # length, index, term: covered by the CRC

META_MAGIC = b"RKVMETA\x00"
META_VERSION = 1
_META_HDR = struct.Struct("<8sIII")         # magic, version, payload length, crc32(payload)

STOCK_MAGIC = b"PYSYNCOBJ"
COMPACT_SUFFIX = ".compact"
META_SUFFIX = ".meta"

# Messages that carry or acknowledge log entries or votes (pysyncobj/syncobj.py).
SYNC_BEFORE_TYPES = frozenset({"append_entries", "next_node_idx", "request_vote", "response_vote"})

_COPY_CHUNK = 1 << 20


# -- errors --------------------------------------------------------------------------
class DurableError(Exception):
    """Base class: a persistence problem that must stop the node from starting."""


class JournalCorruptError(DurableError):
    pass


class StockJournalError(DurableError):
    pass


class MetaCorruptError(DurableError):
    pass


class DataDirError(DurableError):
    pass


# -- small helpers -------------------------------------------------------------------
_fdatasync = getattr(os, "fdatasync", os.fsync)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError("short write")
        view = view[n:]
        offset += n


def _file_header() -> bytes:
    head = FILE_MAGIC + struct.pack("<I", FORMAT_VERSION)
    return head + struct.pack("<I", zlib.crc32(head))


def encode_record(idx: int, term: int, payload: bytes) -> bytes:
    ln = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(_REC_CRC_PREFIX.pack(ln, idx, term)))
    return _REC_HDR.pack(REC_MAGIC, ln, crc, idx, term) + payload


def _record_at(buf: memoryview, pos: int, size: int) -> tuple[int, int, int] | None:
    """(index, term, end offset) of a valid record at pos, else None."""
    if pos + REC_HDR_SIZE > size:
        return None
    magic, ln, crc, idx, term = _REC_HDR.unpack_from(buf, pos)
    if magic != REC_MAGIC:
        return None
    end = pos + REC_HDR_SIZE + ln
    if end > size:
        return None
    if zlib.crc32(buf[pos + REC_HDR_SIZE:end], zlib.crc32(_REC_CRC_PREFIX.pack(ln, idx, term))) != crc:
        return None
    return idx, term, end


class JournalScan(NamedTuple):
    path: str
    entries: list            # [(command bytes, index, term)]
    offsets: list            # file offset of each entry's record
    valid_end: int           # offset just past the last good record
    file_size: int
    torn_first_index: int | None   # first index of the dropped tail (None: nothing dropped)
    torn_last_index: int | None    # highest index readable in the dropped tail, if any

    @property
    def torn(self) -> bool:
        return self.valid_end < self.file_size

    def describe_torn(self) -> str:
        dropped = self.file_size - self.valid_end
        if self.torn_first_index is None:
            what = "no entries" if not self.entries else f"entries after index {self.entries[-1][1]}"
        elif self.torn_last_index is not None and self.torn_last_index > self.torn_first_index:
            what = f"entries {self.torn_first_index}..{self.torn_last_index}"
        else:
            what = f"entry {self.torn_first_index} (and any after it)"
        return (f"{self.path}: torn tail: dropping {dropped} bytes at offset {self.valid_end} "
                f"(index range dropped: {what})")


def _check_header(path: str, head: bytes) -> None:
    if head.startswith(STOCK_MAGIC):
        fmt = struct.unpack_from("<I", head, 32)[0] if len(head) >= 36 else "?"
        raise StockJournalError(
            f"{path} was written by stock pysyncobj FileJournal (format {fmt}), which has no checksums; "
            f"refusing to open it with the durable journal. Stop the node and convert it with "
            f"'python -m raft_sidecar.durable migrate {path}', or wipe the data directory and let the node "
            f"resync from its peers.")
    if len(head) < HEADER_SIZE:
        raise JournalCorruptError(f"{path}: journal header truncated ({len(head)} of {HEADER_SIZE} bytes); "
                                  f"not a RaftKV durable journal")
    magic, version, crc = _FILE_HDR.unpack_from(head, 0)
    if magic != FILE_MAGIC:
        raise JournalCorruptError(f"{path}: not a RaftKV durable journal (magic {magic!r})")
    if zlib.crc32(head[:12]) != crc:
        raise JournalCorruptError(f"{path}: journal header checksum mismatch")
    if version != FORMAT_VERSION:
        raise JournalCorruptError(f"{path}: unsupported journal format version {version} "
                                  f"(this build reads version {FORMAT_VERSION})")


def scan_journal(path: str) -> JournalScan:
    """Reads and validates a durable journal, read-only.

    Raises StockJournalError / JournalCorruptError when the journal must not be
    used (I4). A torn tail is reported in the result, not repaired here.
    """
    with open(path, "rb") as f:
        data = f.read()
    size = len(data)
    _check_header(path, data[:64])
    buf = memoryview(data)
    entries: list = []
    offsets: list = []
    pos = HEADER_SIZE
    while pos < size:
        rec = _record_at(buf, pos, size)
        if rec is None:
            break
        idx, term, end = rec
        if entries:
            prev_idx, prev_term = entries[-1][1], entries[-1][2]
            if idx != prev_idx + 1 or term < prev_term:
                raise JournalCorruptError(
                    f"{path}: record at offset {pos} has index {idx} term {term} after index {prev_idx} "
                    f"term {prev_term}: the journal is inconsistent; refusing to start")
        entries.append((bytes(buf[pos + REC_HDR_SIZE:end]), idx, term))
        offsets.append(pos)
        pos = end
    if pos >= size:
        return JournalScan(path, entries, offsets, pos, size, None, None)

    # A bad record at pos. Any valid record after it means mid-file corruption.
    last_idx = entries[-1][1] if entries else None
    readable: list[int] = []
    cand = pos
    while cand != -1:
        if cand > pos and _record_at(buf, cand, size) is not None:
            good_idx = _REC_HDR.unpack_from(buf, cand)[3]
            raise JournalCorruptError(
                f"{path}: corrupt record at offset {pos} (after index {last_idx}) followed by a valid record "
                f"at offset {cand} (index {good_idx}): mid-file corruption, refusing to start. Restore the "
                f"data directory from a replica (wipe it and let the node resync), or inspect it with "
                f"'python -m raft_sidecar.durable inspect {path}'.")
        if cand + REC_HDR_SIZE <= size and bytes(buf[cand:cand + 4]) == REC_MAGIC:
            readable.append(_REC_HDR.unpack_from(buf, cand)[3])
        cand = data.find(REC_MAGIC, cand + 1)
    first = last_idx + 1 if last_idx is not None else None
    plausible_max = (size - pos) // REC_HDR_SIZE
    if first is None:
        plausible = [i for i in readable if 0 < i]
        first = min(plausible) if plausible else None
    else:
        plausible = [i for i in readable if first <= i < first + plausible_max]
    return JournalScan(path, entries, offsets, pos, size, first, max(plausible) if plausible else None)


def _create_empty_journal(path: str) -> None:
    tmp = path + COMPACT_SUFFIX
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, _file_header(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path)


def _default_fatal(message: str) -> None:
    # Fail-stop (I6); flush what logging we can first.
    try:
        log.critical("%s; exiting (fail-stop)", message)
        for h in logging.getLogger().handlers:
            h.flush()
        sys.stderr.flush()
    finally:
        os._exit(70)


# -- meta ----------------------------------------------------------------------------
class DurableMetaStorer:
    """`<journal>.meta`: term, vote and commit index. Write+fsync+rename+fsync(dir)."""

    def __init__(self, path: str, on_stored: Callable[[dict], None] | None = None) -> None:
        self._path = path
        self._on_stored = on_stored

    def getPath(self) -> str:  # noqa: N802 (PySyncObj naming)
        return self._path

    def getMeta(self) -> dict:  # noqa: N802
        try:
            with open(self._path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        if raw.startswith(META_MAGIC):
            if len(raw) < _META_HDR.size:
                raise MetaCorruptError(f"{self._path}: meta file truncated")
            _, version, ln, crc = _META_HDR.unpack_from(raw, 0)
            payload = raw[_META_HDR.size:_META_HDR.size + ln]
            if version != META_VERSION:
                raise MetaCorruptError(f"{self._path}: unsupported meta format version {version}")
            if len(payload) != ln or zlib.crc32(payload) != crc:
                raise MetaCorruptError(f"{self._path}: meta file checksum mismatch; refusing to start "
                                       f"(the stored term and vote are unknown)")
        else:
            payload = raw  # a stock MetaStorer file: a plain pickle of the same dict
        try:
            meta = pickle.loads(payload)
        except Exception as exc:
            raise MetaCorruptError(f"{self._path}: cannot read the meta file ({exc!r}); refusing to start "
                                   f"(the stored term and vote are unknown)") from exc
        if not isinstance(meta, dict):
            raise MetaCorruptError(f"{self._path}: meta file does not hold a dict")
        return meta

    def storeMeta(self, meta: dict) -> None:  # noqa: N802
        payload = pickle.dumps(dict(meta), protocol=2)
        data = _META_HDR.pack(META_MAGIC, META_VERSION, len(payload), zlib.crc32(payload)) + payload
        _write_file_durably(self._path, data)
        if self._on_stored is not None:
            self._on_stored(meta)


def _write_file_durably(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path)


def _stock_store_meta(self, meta):
    """Replacement for pysyncobj.journal.MetaStorer.storeMeta: same (pickle)
    format, but durable. Only used if something builds a stock FileJournal."""
    _write_file_durably(self._MetaStorer__path, _journal_mod.dumps(meta))


# -- the journal ---------------------------------------------------------------------
class DurableFileJournal(Journal):
    """Replacement for pysyncobj.journal.FileJournal (same interface).

    Observability hooks for subclasses (called on the thread that caused them,
    possibly with the journal's lock held; they must be fast, must not raise,
    and must not use the journal from another thread):
      on_sync(reason, seconds)      after every fdatasync of the journal
      on_meta_stored(meta)          after every durable meta store (a copy)
      on_compact_step(step)         during compaction: 'written' (tmp file
                                    written, not yet fsynced/renamed), 'renamed'
      on_torn_tail(scan)            after a torn tail was truncated at open
    Use them with `install(journal_class=YourSubclass)`.
    """

    def __init__(self, journalFile: str) -> None:
        self.path = journalFile
        self._lock = threading.RLock()
        self._fd = -1
        self.sync_count = 0
        self.transport_attached = False
        self._warned_no_transport = False
        self._failed: str | None = None
        self._meta_storer = DurableMetaStorer(journalFile + META_SUFFIX, self._meta_stored)

        self._meta = self._meta_storer.getMeta()  # refuses an unreadable meta file first
        stale = journalFile + COMPACT_SUFFIX
        if os.path.exists(stale):
            log.warning("%s: removing %s left by an interrupted compaction or creation", journalFile, stale)
            os.unlink(stale)
        if not os.path.exists(journalFile):
            _create_empty_journal(journalFile)
        scan = scan_journal(journalFile)
        self._entries: list = scan.entries
        self._offsets: list = scan.offsets
        self._fd = os.open(journalFile, os.O_RDWR)
        if scan.torn:
            log.warning("%s", scan.describe_torn())
            os.ftruncate(self._fd, scan.valid_end)
            os.fsync(self._fd)
            self.on_torn_tail(scan)
        self._end = scan.valid_end
        # Records removed by deleteEntriesFrom but still in the file, right after
        # _end: (entry, offset, was synced).
        self._shadow: collections.deque = collections.deque()
        self._writes_pending = False   # bytes written or cut since the last fdatasync
        self._dirty = False            # a sync is needed: _writes_pending or _shadow
        self._synced_idx = self._last_index()
        self._dump_load: dict | None = None
        log.info("%s: opened: %d entries (index %s..%s), %d bytes; term %s, voted for %s, commit index %s",
                 journalFile, len(self._entries), self._entries[0][1] if self._entries else None,
                 self._last_index() or None, self._end, self._meta.get("currentTerm"),
                 self._meta.get("votedForNodeId"), self._meta.get("raftCommitIndex"))
        self._meta_saved = True

    # -- hooks ---------------------------------------------------------------
    def on_sync(self, reason: str, seconds: float) -> None:
        pass

    def on_meta_stored(self, meta: dict) -> None:
        pass

    def on_compact_step(self, step: str) -> None:
        pass

    def on_torn_tail(self, scan: JournalScan) -> None:
        pass

    def fatal(self, message: str) -> None:
        """Called on an I/O error that leaves the journal in an unknown state (I6)."""
        _default_fatal(message)

    # -- state ---------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def synced_index(self) -> int:
        """Raft index of the last entry known to be on stable storage (0: none)."""
        return self._synced_idx

    @property
    def last_index(self) -> int:
        return self._last_index()

    def _last_index(self) -> int:
        return self._entries[-1][1] if self._entries else 0

    def _io_failed(self, what: str, exc: BaseException) -> None:
        self._failed = f"{self.path}: {what} failed: {exc!r}"
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            where = os.path.dirname(self.path) or "."
            self._failed += (f": the disk holding the Raft journal is full. This node stops instead of "
                             f"acknowledging entries it could not store; free space on the filesystem of "
                             f"{where} and restart the node: it catches up from its peers")
        self.fatal(self._failed)
        raise DurableError(self._failed)  # only reached if fatal() was overridden to return

    def _check_ok(self) -> None:
        if self._failed is not None:
            raise DurableError(self._failed)

    # -- durability ----------------------------------------------------------
    def sync(self, reason: str = "explicit", force: bool = False) -> bool:
        """Makes the journal durable if it changed since the last sync: applies
        a pending truncation (ftruncate) and fdatasyncs. Returns whether it
        synced."""
        with self._lock:
            if not (self._dirty or force) or self._fd < 0:
                return False
            self._check_ok()
            t0 = time.perf_counter()
            self._drop_shadow()
            try:
                _fdatasync(self._fd)
            except OSError as exc:
                self._io_failed("fdatasync", exc)
            self._writes_pending = False
            self._dirty = False
            self._synced_idx = self._last_index()
            self.sync_count += 1
            dt = time.perf_counter() - t0
        self.on_sync(reason, dt)
        return True

    def flush(self) -> None:
        self.sync("flush")

    # -- Journal interface ---------------------------------------------------
    def add(self, command, idx, term):
        payload = bytes(command)
        with self._lock:
            self._check_ok()
            if self._dump_load is not None and self._dump_load["cleared"]:
                self._dump_load["adds"].append((payload, idx, term))
                if len(self._dump_load["adds"]) == 2:
                    self._finish_dump_load()
                return
            if self._shadow:
                entry, offset, was_synced = self._shadow[0]
                if offset == self._end and entry[1] == idx and entry[2] == term and entry[0] == payload:
                    # PySyncObj truncates the follower's whole suffix on every
                    # AppendEntries and re-adds it (note H10). The record is
                    # still in the file: keep it, so an entry this node already
                    # acknowledged is never off the disk, even for a moment.
                    self._shadow.popleft()
                    self._entries.append(entry)
                    self._offsets.append(offset)
                    self._end = offset + REC_HDR_SIZE + len(payload)
                    if was_synced and self._synced_idx == idx - 1 and not self._writes_pending:
                        self._synced_idx = idx
                    self._dirty = self._writes_pending or bool(self._shadow)
                    return
                self._drop_shadow()
            rec = encode_record(idx, term, payload)
            try:
                _pwrite_all(self._fd, rec, self._end)
            except OSError as exc:
                self._io_failed("write", exc)
            self._entries.append((payload, idx, term))
            self._offsets.append(self._end)
            self._end += len(rec)
            self._writes_pending = True
            self._dirty = True

    def clear(self):
        with self._lock:
            self._check_ok()
            if self._dump_load is not None and not self._dump_load["cleared"]:
                self._dump_load["cleared"] = True  # decided when the two dump entries arrive
                return
            self._real_clear()

    def _real_clear(self) -> None:
        self._shadow.clear()
        self._ftruncate(HEADER_SIZE)
        self._entries = []
        self._offsets = []
        self._end = HEADER_SIZE
        self._writes_pending = True
        self._dirty = True
        self._synced_idx = 0

    def deleteEntriesFrom(self, entryFrom):  # noqa: N802
        """Logical truncation; the file is cut at the next sync, or at the first
        add that differs from the removed records (see add)."""
        with self._lock:
            self._check_ok()
            if entryFrom < 0:
                entryFrom = max(0, len(self._entries) + entryFrom)
            if entryFrom >= len(self._entries):
                return
            removed = [(e, o, e[1] <= self._synced_idx)
                       for e, o in zip(self._entries[entryFrom:], self._offsets[entryFrom:])]
            self._shadow.extendleft(reversed(removed))
            self._end = self._offsets[entryFrom]
            del self._entries[entryFrom:]
            del self._offsets[entryFrom:]
            self._synced_idx = min(self._synced_idx, self._last_index())
            self._dirty = True

    def _drop_shadow(self) -> None:
        if self._shadow:
            self._shadow.clear()
            self._ftruncate(self._end)
            self._writes_pending = True

    def _ftruncate(self, offset: int) -> None:
        try:
            os.ftruncate(self._fd, offset)
        except OSError as exc:
            self._io_failed("ftruncate", exc)

    def deleteEntriesTo(self, entryTo):  # noqa: N802
        """Compaction (H7): copy the kept records into <journal>.compact, fsync,
        rename over the journal, fsync the directory. Never rewrites in place."""
        with self._lock:
            self._check_ok()
            if entryTo <= 0:
                return
            entryTo = min(entryTo, len(self._entries))
            base = self._offsets[entryTo] if entryTo < len(self._offsets) else self._end
            # Cut removed-but-present records first: a skipped compaction must
            # leave the file ending at _end like a completed one.
            self._drop_shadow()
            tmp = self.path + COMPACT_SUFFIX
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as exc:
                log.error("%s: compaction skipped, cannot create %s: %r", self.path, tmp, exc)
                return
            try:
                _pwrite_all(fd, _file_header(), 0)
                src, dst = base, HEADER_SIZE
                while src < self._end:
                    chunk = os.pread(self._fd, min(_COPY_CHUNK, self._end - src), src)
                    if not chunk:
                        raise OSError(f"unexpected end of {self.path} at {src}")
                    _pwrite_all(fd, chunk, dst)
                    src += len(chunk)
                    dst += len(chunk)
                self.on_compact_step("written")
                os.fsync(fd)
            except OSError as exc:
                # The journal itself is untouched: skip this compaction.
                os.close(fd)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                log.error("%s: compaction skipped, writing %s failed: %r", self.path, tmp, exc)
                return
            try:
                os.replace(tmp, self.path)
            except OSError as exc:
                os.close(fd)
                log.error("%s: compaction skipped, rename failed: %r", self.path, exc)
                return
            old_fd, self._fd = self._fd, fd
            delta = base - HEADER_SIZE
            self._entries = self._entries[entryTo:]
            self._offsets = [o - delta for o in self._offsets[entryTo:]]
            self._end -= delta
            self._writes_pending = False
            self._dirty = False
            self._synced_idx = self._last_index()
            try:
                os.close(old_fd)
                _fsync_dir(self.path)
            except OSError as exc:
                self._io_failed("fsync of the directory after compaction", exc)
        self.on_compact_step("renamed")

    def __getitem__(self, item):
        return self._entries[item]

    def __len__(self):
        return len(self._entries)

    # -- dump load at start (see _load_dump_file) ----------------------------
    def _begin_dump_load(self) -> None:
        with self._lock:
            self._dump_load = {"cleared": False, "adds": []}

    def _end_dump_load(self) -> None:
        with self._lock:
            state, self._dump_load = self._dump_load, None
            if state is not None and state["cleared"]:
                # Interrupted (an exception in PySyncObj): do what it asked for.
                self._real_clear()
                for e in state["adds"]:
                    self.add(*e)

    def _finish_dump_load(self) -> None:
        """PySyncObj found that the journal does not start at the dump's last two
        entries and called clear() + add(dump[-2]) + add(dump[-1]). If the
        journal holds those two entries further in, a compaction was interrupted
        after the new dump was renamed into place (the journal is compacted one
        tick later): finish that compaction instead of dropping every entry
        after the dump, which this node may have acknowledged. Raft keeps the
        entries following a snapshot's last entry when they match (§7)."""
        state, self._dump_load = self._dump_load, None
        first, second = state["adds"]
        p = first[1] - self._entries[0][1] if self._entries else -1
        if 0 <= p and p + 1 < len(self._entries) and \
                self._entries[p] == first and self._entries[p + 1] == second:
            log.warning("%s: the dump ends at index %d but the journal starts at %d (a compaction was "
                        "interrupted): completing it, keeping entries %d..%d", self.path, second[1],
                        self._entries[0][1], first[1], self._last_index())
            self.deleteEntriesTo(p)
            return
        if self._entries:
            log.warning("%s: the journal (index %d..%d) does not contain the dump's last entries (%d, %d): "
                        "replacing it with them", self.path, self._entries[0][1], self._last_index(),
                        first[1], second[1])
        self._real_clear()
        self.add(*first)
        self.add(*second)

    def _destroy(self):
        with self._lock:
            if self._fd < 0:
                return
            if self._failed is None:
                self.sync("destroy")
                if not self._meta_saved:
                    self._store_meta()
            os.close(self._fd)
            self._fd = -1

    # -- meta ----------------------------------------------------------------
    def _meta_stored(self, meta: dict) -> None:
        self.on_meta_stored(dict(meta))

    def _store_meta(self) -> None:
        try:
            self._meta_storer.storeMeta(self._meta)
        except OSError as exc:
            self._io_failed("storing " + self._meta_storer.getPath(), exc)
        self._meta_saved = True

    def setRaftCommitIndex(self, raftCommitIndex):  # noqa: N802
        # I1: a commit index covering unsynced entries (a follower learning it
        # together with the entries, or a single-node cluster) syncs them first.
        if self._dirty and raftCommitIndex > self._synced_idx:
            self.sync("commit")
        with self._lock:
            if self._meta.get("raftCommitIndex") != raftCommitIndex:
                self._meta["raftCommitIndex"] = raftCommitIndex
                self._meta_saved = False

    def getRaftCommitIndex(self):  # noqa: N802
        ci = self._meta.get("raftCommitIndex", 1)
        last = self._last_index()
        if self._entries and ci > last:
            log.warning("%s: stored commit index %d is past the journal end %d; clamping", self.path, ci, last)
            ci = last
        return ci

    def setCurrentTerm(self, term, votedForNodeId):  # noqa: N802
        with self._lock:
            self._check_ok()
            self._meta["currentTerm"] = term
            self._meta["votedForNodeId"] = votedForNodeId
            self._store_meta()  # I2: durable before the caller sends anything

    def getCurrentTerm(self):  # noqa: N802
        return self._meta.get("currentTerm", 0)

    def getVotedForNodeId(self):  # noqa: N802
        return self._meta.get("votedForNodeId", None)

    def onOneSecondTimer(self):  # noqa: N802
        with self._lock:
            if not self._meta_saved and self._failed is None:
                self._store_meta()
        if not self.transport_attached and not self._warned_no_transport:
            self._warned_no_transport = True
            log.warning("%s: durable journal used without DurableTCPTransport: entries are synced only "
                        "when committed, not before they are acknowledged; pass "
                        "transportClass=DurableTCPTransport to SyncObj", self.path)


# -- transport -----------------------------------------------------------------------
class DurableTCPTransport(TCPTransport):
    """TCPTransport that makes the journal durable before any message that
    replicates, acknowledges or votes (SYNC_BEFORE_TYPES) leaves this node. Use
    with `SyncObj(..., transportClass=DurableTCPTransport)` after `install()`.

    Group commit. With `coalesce = True` (default) such a message, while the
    journal is dirty, is queued instead of sent, and so is every later message
    (order is kept); the queue is flushed (one sync, then every message in
    order) after PySyncObj drained its command queue, before each poll (tick
    callback) and after each poll (the replies of every message read in that
    poll). With appendEntriesUseBatch=False the leader would otherwise sync once
    per command, and a follower once per AppendEntries. Delaying a message is
    safe: Raft tolerates any delay, and the journal state made durable at the
    flush is a Raft successor of the state the message describes.
    With `coalesce = False` the sync runs inside send(), per message.

    `sync_before` is the set of message types that wait for the sync. The only
    safe change is dropping "append_entries" (the leader then writes its log in
    parallel with replicating it, Raft thesis §10.2.1: I1 still holds because
    setRaftCommitIndex syncs the leader's copy before the entries count as
    committed); never drop the other three. Default: all four, as specified.

    Hook: `on_send(node, message, journal)` runs after the sync and right
    before the message is handed to the connection (journal is None without a
    file journal).
    """

    coalesce = True
    sync_before = SYNC_BEFORE_TYPES
    # True: the leader sends AppendEntries before its own fdatasync and syncs at the
    # next flush point, so its disk write overlaps the followers' (thesis §10.2.1).
    # Safe by I1: setRaftCommitIndex syncs before any entry counts as committed.
    parallel_leader_write = False

    def __init__(self, syncObj, selfNode, otherNodes):
        journal = getattr(syncObj, "_SyncObj__raftLog", None)
        if isinstance(journal, DurableFileJournal):
            journal.transport_attached = True
            self._journal: DurableFileJournal | None = journal
        elif journal is None or isinstance(journal, MemoryJournal):
            self._journal = None  # no journalFile: nothing to sync
        else:
            raise DurableError(
                f"DurableTCPTransport needs a DurableFileJournal but SyncObj built a {type(journal).__name__}: "
                f"call raft_sidecar.durable.install() before constructing SyncObj")
        self._deferred: list = []
        self._deferred_lock = threading.Lock()
        self._sync_soon = False
        if self.parallel_leader_write:
            self.sync_before = self.sync_before - {"append_entries"}
        super().__init__(syncObj, selfNode, otherNodes)
        if self.coalesce and self._journal is not None:
            self._install_flush_points(syncObj)

    def _install_flush_points(self, syncObj) -> None:
        # Instance attributes shadow the methods PySyncObj's tick calls as
        # self._checkCommandsToApply() and self._poller.poll(timeout).
        check = syncObj._checkCommandsToApply
        poller = syncObj._poller
        poll = poller.poll

        def _checkCommandsToApply():  # noqa: N802
            try:
                check()
            finally:
                self.flush()

        def _poll(timeout):
            try:
                return poll(timeout)
            finally:
                self.flush()

        syncObj._checkCommandsToApply = _checkCommandsToApply
        poller.poll = _poll

    @property
    def journal(self) -> DurableFileJournal | None:
        return self._journal

    def on_send(self, node, message, journal) -> None:
        pass

    def send(self, node, message):
        journal = self._journal
        if journal is not None:
            if self._deferred:
                with self._deferred_lock:
                    self._deferred.append((node, message))
                return True
            if journal._dirty:
                mtype = message.get("type") if isinstance(message, dict) else None
                if mtype in self.sync_before:
                    if self.coalesce:
                        with self._deferred_lock:
                            self._deferred.append((node, message))
                        return True
                    journal.sync("send:" + mtype)
                elif mtype == "append_entries":
                    self._sync_soon = True  # parallel_leader_write: synced at the next flush point
        self.on_send(node, message, journal)
        return TCPTransport.send(self, node, message)

    def flush(self) -> None:
        """Syncs the journal if dirty, then sends the queued messages in order."""
        if not self._deferred:
            if self._sync_soon:
                self._sync_soon = False
                if self._journal is not None and self._journal._dirty:
                    self._journal.sync("after:append_entries")
            return
        with self._deferred_lock:
            pending, self._deferred = self._deferred, []
        journal = self._journal
        journal.sync("send:batch")
        for node, message in pending:
            self.on_send(node, message, journal)
            TCPTransport.send(self, node, message)

    def _onTick(self):
        self.flush()
        TCPTransport._onTick(self)


# -- dump files ----------------------------------------------------------------------
def durable_atomic_replace(oldPath, newPath):  # noqa: N803
    """fsync(old) + rename + fsync(dir): replacement for pysyncobj's atomicReplace (I5)."""
    fd = os.open(oldPath, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(oldPath, newPath)
    _fsync_dir(newPath)
    return True


# -- install -------------------------------------------------------------------------
TESTED_PYSYNCOBJ = "0.3.17"
_PYSYNCOBJ_VERSION = getattr(_syncobj_mod, "VERSION", "?")
_install_lock = threading.Lock()
_originals: dict[str, Any] | None = None
_journal_class: type = DurableFileJournal


def _make_load_dump_file(orig):
    def _load_dump_file(self, clearJournal):  # noqa: N803
        """Wraps SyncObj.__loadDumpFile.

        Start-up load (clearJournal=False, I7): an interrupted compaction is
        completed instead of dropping the journal tail (see
        DurableFileJournal._finish_dump_load).
        Snapshot installed from the leader (clearJournal=True, I8): a pending
        own serialization is forgotten; the journal is still replaced whole,
        because PySyncObj then acknowledges up to the end of its log."""
        journal = getattr(self, "_SyncObj__raftLog", None)
        if clearJournal:
            # A snapshot from the leader was just renamed over the dump. If this
            # node finished writing its own dump earlier in the same tick, the
            # next tick would report that one as SUCCESS and compact the journal
            # up to its index, past the leader's (older) snapshot that is now the
            # dump: entries would then exist nowhere on this node, and a restart
            # would drop the journal. Forget that serialization (non-fork mode).
            ser = getattr(self, "_SyncObj__serializer", None)
            if ser is not None and getattr(ser, "_Serializer__pid", None) == -1:
                log.warning("a snapshot from the leader replaced the dump this node had just written: "
                            "not compacting the journal for the replaced dump")
                ser._Serializer__pid = 0
            return orig(self, clearJournal)
        if not isinstance(journal, DurableFileJournal):
            return orig(self, clearJournal)
        journal._begin_dump_load()
        try:
            return orig(self, clearJournal)
        finally:
            journal._end_dump_load()

    _load_dump_file._durable_wrapper = True
    return _load_dump_file


def create_journal(journalFile=None):  # noqa: N803
    """Replacement for pysyncobj.journal.createJournal."""
    if journalFile is None:
        return MemoryJournal()
    return _journal_class(journalFile)


def install(journal_class: type | None = None) -> None:
    """Applies the patches (idempotent; call before constructing SyncObj):

    * pysyncobj.journal.createJournal, pysyncobj.syncobj.createJournal and
      pysyncobj.createJournal build `journal_class` (default DurableFileJournal)
      for a journalFile (MemoryJournal without one, as before);
    * pysyncobj.serializer.atomicReplace and pysyncobj.atomic_replace.atomicReplace
      become `durable_atomic_replace`;
    * pysyncobj.journal.MetaStorer.storeMeta fsyncs (stock format kept);
    * SyncObj._SyncObj__loadDumpFile is wrapped (I7, I8 in the module doc).

    A later call with a journal_class switches the class used by SyncObj
    objects constructed afterwards; journal_class=None keeps the current one.
    """
    global _originals, _journal_class
    with _install_lock:
        if journal_class is not None:
            if not (isinstance(journal_class, type) and issubclass(journal_class, DurableFileJournal)):
                raise TypeError("journal_class must be a subclass of DurableFileJournal")
            _journal_class = journal_class
        if _originals is not None:
            return
        for owner, attr in ((_syncobj_mod.SyncObj, "_SyncObj__loadDumpFile"),
                            (_syncobj_mod.SyncObj, "_checkCommandsToApply"),
                            (_serializer_mod, "atomicReplace"), (_journal_mod.MetaStorer, "storeMeta")):
            if not hasattr(owner, attr):
                raise DurableError(f"pysyncobj {_PYSYNCOBJ_VERSION} has no {attr}: raft_sidecar.durable was "
                                   f"written against {TESTED_PYSYNCOBJ}; review it before upgrading")
        if _PYSYNCOBJ_VERSION != TESTED_PYSYNCOBJ:
            log.warning("raft_sidecar.durable was tested with pysyncobj %s, running %s",
                        TESTED_PYSYNCOBJ, _PYSYNCOBJ_VERSION)
        _originals = {
            "journal.createJournal": _journal_mod.createJournal,
            "syncobj.createJournal": _syncobj_mod.createJournal,
            "pysyncobj.createJournal": getattr(pysyncobj, "createJournal", None),
            "serializer.atomicReplace": _serializer_mod.atomicReplace,
            "atomic_replace.atomicReplace": _atomic_replace_mod.atomicReplace,
            "MetaStorer.storeMeta": _journal_mod.MetaStorer.storeMeta,
            "SyncObj.__loadDumpFile": _syncobj_mod.SyncObj._SyncObj__loadDumpFile,
        }
        _journal_mod.createJournal = create_journal
        _syncobj_mod.createJournal = create_journal
        pysyncobj.createJournal = create_journal
        _serializer_mod.atomicReplace = durable_atomic_replace
        _atomic_replace_mod.atomicReplace = durable_atomic_replace
        _journal_mod.MetaStorer.storeMeta = _stock_store_meta
        _syncobj_mod.SyncObj._SyncObj__loadDumpFile = _make_load_dump_file(_originals["SyncObj.__loadDumpFile"])
        log.info("durable persistence installed (journal class %s)", _journal_class.__name__)


def uninstall() -> None:
    """Restores the stock functions (for tests and benchmarks)."""
    global _originals, _journal_class
    with _install_lock:
        if _originals is None:
            return
        o = _originals
        _journal_mod.createJournal = o["journal.createJournal"]
        _syncobj_mod.createJournal = o["syncobj.createJournal"]
        if o["pysyncobj.createJournal"] is not None:
            pysyncobj.createJournal = o["pysyncobj.createJournal"]
        _serializer_mod.atomicReplace = o["serializer.atomicReplace"]
        _atomic_replace_mod.atomicReplace = o["atomic_replace.atomicReplace"]
        _journal_mod.MetaStorer.storeMeta = o["MetaStorer.storeMeta"]
        _syncobj_mod.SyncObj._SyncObj__loadDumpFile = o["SyncObj.__loadDumpFile"]
        _originals = None
        _journal_class = DurableFileJournal


def installed() -> bool:
    return _originals is not None


# -- data dir checks -----------------------------------------------------------------
def check_data_dir(journal_file: str | None, dump_file: str | None,
                   dump_header_check: Callable[[str], Any] | None = None) -> dict:
    """Refuses (raises DataDirError / JournalCorruptError / StockJournalError /
    MetaCorruptError, each naming the file) a data dir that would start wrong:

    * journal_file or dump_file not configured (H2: always both);
    * the journal's first index is above 1 (it was compacted) but the dump file
      is missing or empty: entries 1..first-1 exist only in the dump (H2);
    * the dump file exists but is empty, or `dump_header_check(dump_file)`
      raises (pass e.g. raft_sidecar.snapshot.read_header);
    * the journal is a stock one, or corrupt mid-file, or its meta is unreadable.

    Read-only. Returns a summary dict (first/last index, torn tail, files).
    """
    if not journal_file or not dump_file:
        raise DataDirError(f"both a journal file and a dump file are required (journal={journal_file!r}, "
                           f"dump={dump_file!r}); a journal alone loses the state machine after compaction (H2)")
    summary: dict[str, Any] = {"journal_file": journal_file, "dump_file": dump_file, "first_index": None,
                               "last_index": None, "torn_tail": None, "dump_size": None}
    if os.path.exists(dump_file):
        size = os.path.getsize(dump_file)
        summary["dump_size"] = size
        if size == 0:
            raise DataDirError(f"dump file {dump_file} exists but is empty; refusing to start")
        if dump_header_check is not None:
            try:
                dump_header_check(dump_file)
            except Exception as exc:
                raise DataDirError(f"dump file {dump_file} exists but its header does not parse ({exc}); "
                                   f"refusing to start") from exc
    if not os.path.exists(journal_file):
        return summary
    scan = scan_journal(journal_file)
    if scan.entries:
        summary["first_index"] = scan.entries[0][1]
        summary["last_index"] = scan.entries[-1][1]
    if scan.torn:
        summary["torn_tail"] = scan.describe_torn()
    DurableMetaStorer(journal_file + META_SUFFIX).getMeta()
    first = summary["first_index"]
    if first is not None and first > 1 and summary["dump_size"] is None:
        raise DataDirError(
            f"journal {journal_file} starts at index {first} (it was compacted) but the dump file {dump_file} "
            f"is missing: entries 1..{first - 1} exist only in that dump (H2). Restore the dump, or wipe the "
            f"data directory and let the node resync from its peers.")
    return summary


# -- stock journal migration -----------------------------------------------------------
_STOCK_FIRST_RECORD = 24 + 8 + 4 + 4


def read_stock_journal(path: str) -> list:
    """Parses a stock FileJournal strictly; raises JournalCorruptError on anything odd."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(STOCK_MAGIC) or len(data) < _STOCK_FIRST_RECORD:
        raise JournalCorruptError(f"{path}: not a stock pysyncobj journal")
    fmt, last = struct.unpack_from("<II", data, 32)
    if fmt != 1 or not (_STOCK_FIRST_RECORD <= last <= len(data)):
        raise JournalCorruptError(f"{path}: stock journal header invalid (format {fmt}, end {last})")
    entries = []
    pos = _STOCK_FIRST_RECORD
    while pos < last:
        if pos + 4 > last:
            raise JournalCorruptError(f"{path}: stock record at {pos} truncated")
        (ln,) = struct.unpack_from("<I", data, pos)
        end = pos + 4 + ln + 4
        if ln < 16 or end > last or struct.unpack_from("<I", data, end - 4)[0] != ln:
            raise JournalCorruptError(f"{path}: stock record at {pos} is inconsistent")
        idx, term = struct.unpack_from("<QQ", data, pos + 4)
        if entries and (idx != entries[-1][1] + 1 or term < entries[-1][2]):
            raise JournalCorruptError(f"{path}: stock record at {pos} has index {idx} after {entries[-1][1]}")
        entries.append((bytes(data[pos + 20:end - 4]), idx, term))
        pos = end
    return entries


def migrate_stock_journal(path: str) -> int:
    """Offline conversion of a stock FileJournal to the durable format. Keeps a
    hard link of the original at <path>.stock-backup. Returns the entry count.
    The .meta file is left as is (the durable meta storer reads stock meta)."""
    entries = read_stock_journal(path)
    tmp = path + COMPACT_SUFFIX
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        body = b"".join(encode_record(idx, term, cmd) for cmd, idx, term in entries)
        _pwrite_all(fd, _file_header() + body, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    backup = path + ".stock-backup"
    if os.path.exists(backup):
        os.unlink(backup)
    os.link(path, backup)
    os.replace(tmp, path)
    _fsync_dir(path)
    return len(entries)


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m raft_sidecar.durable")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inspect", help="validate a journal (read-only)").add_argument("journal")
    sub.add_parser("migrate", help="convert a stock pysyncobj journal (node stopped)").add_argument("journal")
    args = p.parse_args(argv)
    try:
        if args.cmd == "inspect":
            scan = scan_journal(args.journal)
            first = scan.entries[0][1] if scan.entries else None
            last = scan.entries[-1][1] if scan.entries else None
            print(f"{args.journal}: format {FORMAT_VERSION}, {len(scan.entries)} entries, index {first}..{last}, "
                  f"{scan.valid_end} of {scan.file_size} bytes valid")
            if scan.torn:
                print(scan.describe_torn() + " (would be truncated at the next start)")
            print(f"meta: {DurableMetaStorer(args.journal + META_SUFFIX).getMeta()}")
        else:
            n = migrate_stock_journal(args.journal)
            print(f"{args.journal}: migrated {n} entries; original kept as {args.journal}.stock-backup")
    except DurableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
