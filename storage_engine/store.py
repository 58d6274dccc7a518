"""LevelDB-backed key-value map, fenced by raft index.

Every apply writes the data and the new applied index in one LevelDB write
batch, so after any crash the stored data is exactly the state after the stored
index, and replayed entries (index <= applied) are skipped: a log replay never
applies anything twice (pysyncobj note, H5).
"""
from __future__ import annotations

import logging
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import plyvel

from .commands import Proposal, Write
from .sessions import EXPIRY_EVERY, Session, SessionTable

log = logging.getLogger(__name__)

DATA_PREFIX = b"d/"
SESSION_PREFIX = b"s/"
APPLIED_KEY = b"m/applied_index"
_INDEX = struct.Struct(">Q")


@dataclass
class ApplyStats:
    applies: int = 0      # entries applied by this process
    skipped: int = 0      # entries skipped because already stored (replay)
    duplicates: int = 0   # proposals skipped because their (client, seq) was applied


class Store:
    """The engine's data: a dict in memory, LevelDB underneath."""

    def __init__(self, path: str, audit_path: str | None = None) -> None:
        self.path = path
        self._recover_interrupted_restore()
        self._db = plyvel.DB(path, create_if_missing=True)
        self._data: dict[bytes, bytes] = {}
        self.sessions = SessionTable()
        self.applied_index = 0
        self.stats = ApplyStats()
        self._audit = open(audit_path, "a", buffering=1) if audit_path else None
        self._load()

    # -- reading -------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def __len__(self) -> int:
        return len(self._data)

    # -- applying ------------------------------------------------------------
    def apply(self, entries: Sequence[tuple[int, Iterable[Write | Proposal]]]) -> int:
        """Applies committed entries in index order; returns the applied index.

        One LevelDB write batch for the whole run (the sidecar sends runs of
        entries), so the per-write cost does not grow with the data size. A
        Proposal whose (client, seq) was already applied is skipped (a retry).
        """
        fresh = [(i, list(items)) for i, items in entries if i > self.applied_index]
        self.stats.skipped += len(entries) - len(fresh)
        if not fresh:
            return self.applied_index
        try:
            return self._apply_fresh(fresh)
        except Exception:
            # Memory may be ahead of disk now; the disk is the truth.
            self._load()
            raise

    def _apply_fresh(self, fresh: list[tuple[int, list[Write | Proposal]]]) -> int:
        last = self.applied_index
        pending: dict[bytes, bytes | None] = {}
        touched: set[str] = set()
        expired: list[str] = []
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
                        writes: Iterable[Write] = item.writes
                    else:
                        writes = (item,)
                    for w in writes:
                        if w.op == "SET":
                            wb.put(DATA_PREFIX + w.key, w.value)
                            pending[w.key] = w.value
                        else:
                            wb.delete(DATA_PREFIX + w.key)
                            pending[w.key] = None
                if index % EXPIRY_EVERY == 0:
                    expired += self.sessions.expire(index)
            for client in touched:
                if client in self.sessions.sessions:
                    wb.put(SESSION_PREFIX + client.encode(), self.sessions.sessions[client].encode())
            for client in expired:
                wb.delete(SESSION_PREFIX + client.encode())
            wb.put(APPLIED_KEY, _INDEX.pack(last))
        for k, v in pending.items():
            if v is None:
                self._data.pop(k, None)
            else:
                self._data[k] = v
        self.applied_index = last
        self.stats.applies += len(fresh)
        if self._audit is not None:
            self._audit.write("".join(f"{i}\n" for i, _ in fresh))
        return last

    # -- snapshots -------------------------------------------------------------
    def snapshot_sessions(self, snap=None) -> bytes:
        """The dedup table as of a LevelDB snapshot (or now), for Raft snapshots."""
        src = snap if snap is not None else self._db
        table = SessionTable()
        for k, v in src.iterator(prefix=SESSION_PREFIX):
            table.sessions[k[len(SESSION_PREFIX):].decode()] = Session.decode(v)
        return table.dump()

    def iter_snapshot(self, chunk_keys: int = 1000,
                      with_sessions: bool = False) -> Iterator[tuple[int, list[tuple[bytes, bytes]]]]:
        """Yields (applied_index, chunk) pairs from one consistent LevelDB snapshot.

        With `with_sessions`, the first item is (applied_index, sessions blob)."""
        snap = self._db.snapshot()
        try:
            raw = snap.get(APPLIED_KEY)
            index = _INDEX.unpack(raw)[0] if raw else 0
            if with_sessions:
                yield index, self.snapshot_sessions(snap)
            chunk: list[tuple[bytes, bytes]] = []
            for k, v in snap.iterator(prefix=DATA_PREFIX):
                chunk.append((k[len(DATA_PREFIX):], v))
                if len(chunk) >= chunk_keys:
                    yield index, chunk
                    chunk = []
            yield index, chunk
        finally:
            snap.close()

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
        raw = self._db.get(APPLIED_KEY)
        self.applied_index = _INDEX.unpack(raw)[0] if raw else 0
        self._data = {k[len(DATA_PREFIX):]: v for k, v in self._db.iterator(prefix=DATA_PREFIX)}
        self.sessions = SessionTable.load(self.snapshot_sessions())
        log.info("store %s: %d keys, applied index %d", self.path, len(self._data), self.applied_index)

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


class Restore:
    """Builds a replacement database beside the live one; swapped in only when complete."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._path = store.path + ".restore"
        shutil.rmtree(self._path, ignore_errors=True)
        self._db = plyvel.DB(self._path, create_if_missing=True)
        self.index = 0

    def add(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        with self._db.write_batch() as wb:
            for k, v in pairs:
                wb.put(DATA_PREFIX + k, v)

    def set_sessions(self, blob: bytes) -> None:
        table = SessionTable.load(blob)
        with self._db.write_batch() as wb:
            for client, sess in table.sessions.items():
                wb.put(SESSION_PREFIX + client.encode(), sess.encode())

    def commit(self, index: int) -> None:
        self._db.put(APPLIED_KEY, _INDEX.pack(index), sync=True)
        self._db.close()
        self._store._swap_in(self._path)

    def abort(self) -> None:
        self._db.close()
        shutil.rmtree(self._path, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
