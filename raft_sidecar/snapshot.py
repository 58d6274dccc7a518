"""Raft log compaction with the engine's real state (note §6).

PySyncObj calls `serialize` on its tick thread when it compacts the log, and
`deserialize` when it loads a dump: at start, or when a leader installed one on a
node that was too far behind or new. The file holds the Raft metadata, the member
registry and a consistent copy of the engine's data, streamed so that the whole
data set is never held in memory, and ends with a CRC32 of everything before it.

Writing the file runs in a background thread: 1,000,000 keys take ~3.5 s, and a
leader whose tick thread stalls that long is deposed. PySyncObj renames its tmp
file over the dump right after `serialize` returns (note §6 trap), so `serialize`
only starts the job and raises; `check` (PySyncObj's serializeChecker, on the tick
thread) moves the finished file into place. Because the rename happens on the
tick thread, it can never race a snapshot installed from the leader, which cancels
a job still in flight.

The engine may have applied entries beyond the snapshot's raft index by the time
its LevelDB snapshot is taken; that is safe: the header records the engine's own
index, and replayed entries at or below it are skipped.
"""
from __future__ import annotations

import logging
import os
import pickle
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Iterator

from pysyncobj.config import SERIALIZER_STATE

from raftkv.pb import consensus_pb2 as pb

from .applier import Applier

if TYPE_CHECKING:
    from .node import RaftKVNode

log = logging.getLogger(__name__)

MAGIC = b"RKVSNAP1"
_U32 = struct.Struct(">I")
_PAIR = struct.Struct(">II")
_END = 0xFFFFFFFF
SNAPSHOT_RPC_TIMEOUT = 300.0
CHUNK_PAIRS = 1000


class SnapshotError(Exception):
    pass


class SnapshotStarted(Exception):
    """Raised by `serialize` so that PySyncObj does not rename a tmp file we never wrote."""


@dataclass
class _Job:
    raft_data: tuple
    path: str
    cancelled: bool = False
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None


class _CrcWriter:
    def __init__(self, f: BinaryIO) -> None:
        self.f, self.crc = f, 0

    def write(self, b: bytes) -> None:
        self.crc = zlib.crc32(b, self.crc)
        self.f.write(b)


class Snapshots:
    def __init__(self, applier: Applier, wait_timeout: float, dump_path: str) -> None:
        self._applier = applier
        self._wait_timeout = wait_timeout
        self._dump_path = dump_path
        self._job: _Job | None = None
        self.node: RaftKVNode | None = None

    # -- compaction (tick thread) ---------------------------------------------------
    def serialize(self, tmp_path: str, raft_data: tuple) -> None:
        if self._job is not None:
            raise SnapshotError("a snapshot is already being written")
        job = _Job(tuple(raft_data), self._dump_path + ".bg")
        job.thread = threading.Thread(target=self._run, args=(job,), name="snapshot", daemon=True)
        self._job = job
        job.thread.start()
        raise SnapshotStarted("snapshot is written in the background")

    def check(self) -> int:
        job = self._job
        if job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING
        if job.thread is not None and job.thread.is_alive():
            return SERIALIZER_STATE.SERIALIZING
        self._job = None
        if job.cancelled or job.error:
            log.warning("snapshot at raft index %d discarded: %s", job.raft_data[0][1],
                        job.error or "a snapshot from the leader replaced it")
            _remove(job.path)
            return SERIALIZER_STATE.FAILED
        _replace_durably(job.path, self._dump_path)
        log.info("snapshot at raft index %d in place after %.2fs", job.raft_data[0][1],
                 time.monotonic() - job.started)
        return SERIALIZER_STATE.SUCCESS

    def _run(self, job: _Job) -> None:
        try:
            self.write(job.path, job.raft_data)
        except Exception as exc:  # reported by check(); PySyncObj retries later
            job.error = repr(exc)

    def write(self, path: str, raft_data: tuple) -> None:
        """Writes a complete, fsync'd snapshot file for raft_data at `path`."""
        last_index = raft_data[0][1]
        # The engine lags PySyncObj by the applier queue: wait until it holds at
        # least everything up to the snapshot's index (it may hold more; see above).
        if not self._applier.wait(last_index, self._wait_timeout):
            raise SnapshotError(f"engine did not reach index {last_index} in time")
        stream = self._applier.stub.Snapshot(pb.SnapshotRequest(), timeout=SNAPSHOT_RPC_TIMEOUT)
        registry = self.node.registry_snapshot() if self.node else {}
        with open(path, "wb") as f:
            w = _CrcWriter(f)
            first = next(stream)
            # "records": values are the engine's records (metadata header + value);
            # files without it hold plain values and are restored as such.
            header = pickle.dumps({"raft": tuple(raft_data), "registry": registry,
                                   "engine_index": first.applied_index, "sessions": first.sessions,
                                   "revision": first.revision, "records": True},
                                  protocol=4)
            w.write(MAGIC)
            w.write(_U32.pack(len(header)))
            w.write(header)
            count = 0
            for chunk in _chain(first, stream):
                if len(chunk.keys) != len(chunk.records):
                    raise SnapshotError(f"engine sent {len(chunk.keys)} keys with {len(chunk.records)} records")
                for k, v in zip(chunk.keys, chunk.records):
                    w.write(_PAIR.pack(len(k), len(v)))
                    w.write(k)
                    w.write(v)
                    count += 1
            w.write(_PAIR.pack(_END, 0))
            f.write(_U32.pack(w.crc))
            f.flush()
            os.fsync(f.fileno())
        log.info("snapshot at raft index %d: %d keys, engine index %d", last_index, count, first.applied_index)

    # -- loading -----------------------------------------------------------------
    def deserialize(self, path: str) -> tuple:
        if self._job is not None:
            self._job.cancelled = True  # never move our older file over this one
        header = read_header(path)  # verifies the checksum first: never restore a torn file
        raft_data = tuple(header["raft"])
        last_index = raft_data[0][1]
        if self.node is not None:
            self.node.restore_registry(header["registry"])
        engine_index = header["engine_index"]
        current = self._applier.stub.AppliedIndex(pb.Empty(), timeout=10).applied_index
        if current >= engine_index:
            # Our own dump at start-up: the engine already holds this state or newer.
            log.info("dump at raft index %d: engine already at %d, keeping its data", last_index, current)
        else:
            self._applier.wait(self._applier.submitted, self._wait_timeout)
            resp = self._applier.stub.Restore(_chunks(path, engine_index, header.get("sessions", b""),
                                                      header.get("revision", 0), header.get("records", False)),
                                              timeout=SNAPSHOT_RPC_TIMEOUT)
            if not resp.success:
                raise SnapshotError(f"engine refused the snapshot: {resp.error}")
            current = resp.applied_index
            log.info("installed snapshot at raft index %d into the engine (engine index %d)",
                     last_index, current)
        self._applier.reset_to(last_index, current)
        if self.node is not None:
            # A restore can take seconds on this tick thread; the heartbeats that
            # queued meanwhile are read after the election check, so without this
            # the node would start an election as soon as it returns (note §9).
            self.node.postpone_election()
        return raft_data


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _replace_durably(src: str, dst: str) -> None:
    os.replace(src, dst)
    fd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chain(first: pb.SnapshotChunk, rest: Iterator[pb.SnapshotChunk]) -> Iterator[pb.SnapshotChunk]:
    yield first
    yield from rest


def read_header(path: str) -> dict:
    with open(path, "rb") as f:
        crc = 0
        size = os.fstat(f.fileno()).st_size
        if size < len(MAGIC) + 8:
            raise SnapshotError(f"{path}: too short to be a snapshot")
        remaining = size - 4
        while remaining > 0:
            block = f.read(min(remaining, 1 << 20))
            crc = zlib.crc32(block, crc)
            remaining -= len(block)
        (stored,) = _U32.unpack(f.read(4))
        if stored != crc:
            raise SnapshotError(f"{path}: checksum mismatch (torn or corrupt snapshot)")
        f.seek(0)
        if f.read(len(MAGIC)) != MAGIC:
            raise SnapshotError(f"{path}: not a RaftKV snapshot")
        (hlen,) = _U32.unpack(f.read(4))
        return pickle.loads(f.read(hlen))


def _chunks(path: str, engine_index: int, sessions: bytes = b"", revision: int = 0,
            records: bool = False) -> Iterator[pb.SnapshotChunk]:
    """The file's pairs as Restore chunks; `records` (from the header) says whether the
    values are the engine's records or plain values of the older format."""
    field = "records" if records else "values"
    with open(path, "rb") as f:
        f.seek(len(MAGIC))
        (hlen,) = _U32.unpack(f.read(4))
        f.seek(hlen, os.SEEK_CUR)
        keys: list[bytes] = []
        values: list[bytes] = []
        first = True
        while True:
            klen, vlen = _PAIR.unpack(f.read(_PAIR.size))
            if klen == _END:
                break
            keys.append(f.read(klen))
            values.append(f.read(vlen))
            if len(keys) >= CHUNK_PAIRS:
                yield pb.SnapshotChunk(applied_index=engine_index if first else 0, keys=keys, **{field: values},
                                       sessions=sessions if first else b"", revision=revision if first else 0)
                first, keys, values = False, [], []
        yield pb.SnapshotChunk(applied_index=engine_index if first else 0, keys=keys, **{field: values},
                               sessions=sessions if first else b"", revision=revision if first else 0, last=True)
