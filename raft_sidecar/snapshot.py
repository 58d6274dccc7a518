"""Raft log compaction with the engine's real state (note §6).

PySyncObj calls `serialize` on its tick thread when it compacts the log, and
`deserialize` when it loads a dump: at start, or when a leader installed one on a
node that was too far behind or new. The file holds the Raft metadata, the member
registry and a consistent copy of the engine's data, streamed so that the whole
data set is never held in memory, and ends with a CRC32 of everything before it.
"""
from __future__ import annotations

import logging
import os
import pickle
import struct
import zlib
from typing import TYPE_CHECKING, BinaryIO, Iterator

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


class _CrcWriter:
    def __init__(self, f: BinaryIO) -> None:
        self.f, self.crc = f, 0

    def write(self, b: bytes) -> None:
        self.crc = zlib.crc32(b, self.crc)
        self.f.write(b)


class Snapshots:
    def __init__(self, applier: Applier, wait_timeout: float) -> None:
        self._applier = applier
        self._wait_timeout = wait_timeout
        self.node: RaftKVNode | None = None
        self.last_restore_keys = 0

    # -- compaction --------------------------------------------------------------
    def serialize(self, path: str, raft_data: tuple) -> None:
        last_index = raft_data[0][1]
        # The engine lags PySyncObj by the applier queue; no new entries are applied
        # while this runs (tick thread), so it will reach last_index and stop there.
        if not self._applier.wait(last_index, self._wait_timeout):
            raise SnapshotError(f"engine did not reach index {last_index} in time")
        stream = self._applier.stub.Snapshot(pb.SnapshotRequest(), timeout=SNAPSHOT_RPC_TIMEOUT)
        registry = self.node.registry_snapshot() if self.node else {}
        with open(path, "wb") as f:
            w = _CrcWriter(f)
            first = next(stream)
            header = pickle.dumps({"raft": tuple(raft_data), "registry": registry,
                                   "engine_index": first.applied_index, "sessions": first.sessions},
                                  protocol=4)
            w.write(MAGIC)
            w.write(_U32.pack(len(header)))
            w.write(header)
            count = 0
            for chunk in _chain(first, stream):
                for k, v in zip(chunk.keys, chunk.values):
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
            resp = self._applier.stub.Restore(_chunks(path, engine_index, header.get("sessions", b"")),
                                              timeout=SNAPSHOT_RPC_TIMEOUT)
            if not resp.success:
                raise SnapshotError(f"engine refused the snapshot: {resp.error}")
            current = resp.applied_index
            log.info("installed snapshot at raft index %d into the engine (engine index %d)",
                     last_index, current)
        self._applier.reset_to(last_index, current)
        return raft_data


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


def _chunks(path: str, engine_index: int, sessions: bytes = b"") -> Iterator[pb.SnapshotChunk]:
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
                yield pb.SnapshotChunk(applied_index=engine_index if first else 0, keys=keys, values=values,
                                       sessions=sessions if first else b"")
                first, keys, values = False, [], []
        yield pb.SnapshotChunk(applied_index=engine_index if first else 0, keys=keys, values=values,
                               sessions=sessions if first else b"", last=True)
