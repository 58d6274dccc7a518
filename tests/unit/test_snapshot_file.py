"""Tests for the sidecar's snapshot file format (raft_sidecar.snapshot).

The file is written by the real `Snapshots.serialize` from a real engine: a
`storage_engine.store.Store` streamed by the real `StateMachineService.Snapshot`
(which reads `Store.iter_snapshot`). Only the transport is replaced: the
stand-in applier calls the servicer in-process instead of over gRPC. The file
is read back with `read_header` and `_chunks`, and, for the full round trip,
fed to the real `StateMachineService.Restore` of a second store.
"""

from __future__ import annotations

import asyncio
import os
import struct
import zlib

import pytest

from raft_sidecar.snapshot import CHUNK_PAIRS, MAGIC, Snapshots, SnapshotError, _chunks, read_header
from raftkv.pb import consensus_pb2 as pb
from storage_engine.commands import Write
from storage_engine.state_machine import StateMachineService
from storage_engine.store import Store, unpack_record

# What PySyncObj hands to the serializer: (last applied entry, previous entry, cluster);
# an entry is (command, index, term). Index 42 is the raft index of the snapshot.
RAFT_DATA = ((b"\x01cmd", 42, 3), (b"\x01cmd", 41, 3), frozenset({"node2:8088", "node3:8088"}))


class InProcessStub:
    """The engine's StateMachine, called in-process: same servicer, no channel."""

    def __init__(self, service: StateMachineService) -> None:
        self._service = service
        self.snapshot_requests: list[tuple[pb.SnapshotRequest, float | None]] = []

    def Snapshot(self, request, timeout=None):
        self.snapshot_requests.append((request, timeout))
        agen = self._service.Snapshot(request, None)
        loop = asyncio.new_event_loop()
        try:
            while True:  # stream lazily, like a gRPC response iterator
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()

    def AppliedIndex(self, request, timeout=None):
        return asyncio.run(self._service.AppliedIndex(request, None))

    def Restore(self, chunks, timeout=None):
        async def stream():
            for chunk in chunks:
                yield chunk
        return asyncio.run(self._service.Restore(stream(), None))


class EngineApplier:
    """Stand-in for raft_sidecar.applier.Applier: `.wait()` and `.stub` over a real engine."""

    def __init__(self, store: Store, reached: bool = True) -> None:
        self.stub = InProcessStub(StateMachineService(store))
        self.reached = reached
        self.waits: list[tuple[int, float]] = []
        self.submitted = 0
        self.resets: list[tuple[int, int]] = []

    def wait(self, index: int, timeout: float) -> bool:
        self.waits.append((index, timeout))
        return self.reached

    def reset_to(self, index: int, engine_applied: int) -> None:
        self.resets.append((index, engine_applied))


@pytest.fixture
def stores(tmp_path):
    opened: list[Store] = []

    def _open(name: str = "engine.db") -> Store:
        s = Store(str(tmp_path / name))
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


def fill(store: Store, pairs: dict[bytes, bytes], index: int) -> None:
    store.apply([(index, [Write("SET", k, v) for k, v in pairs.items()])])


def write_snapshot(store: Store, path: str, raft_data: tuple = RAFT_DATA) -> EngineApplier:
    applier = EngineApplier(store)
    Snapshots(applier, wait_timeout=7.0, dump_path=path).write(path, raft_data)
    return applier


def read_pairs(path: str, engine_index: int) -> tuple[list[pb.SnapshotChunk], list[tuple[bytes, bytes]]]:
    """The file's chunks as the sidecar streams them to Restore, and its (key, value) pairs."""
    chunks = list(_chunks(path, engine_index, records=True))
    pairs = [(k, unpack_record(r)[3]) for c in chunks for k, r in zip(c.keys, c.records)]
    return chunks, pairs


def restore_chunks(path: str):
    """What Snapshots.deserialize streams to the engine's Restore for this file."""
    h = read_header(path)
    return _chunks(path, h["engine_index"], h.get("sessions", b""), h.get("revision", 0), h.get("records", False))


SMALL = {
    b"alpha": b"1",
    b"\x00\x01\xff binary key": b"\x00\xff\x00 binary value",
    b"empty-value": b"",
    "ключ".encode(): "значение".encode(),
    b"k" * 200: b"v" * 400,
}


@pytest.fixture
def small_snapshot(stores, tmp_path):
    store = stores()
    fill(store, SMALL, 17)
    path = str(tmp_path / "raft.dump")
    applier = write_snapshot(store, path)
    return path, applier


# -- header ------------------------------------------------------------------------------

def test_header_contents(small_snapshot):
    path, applier = small_snapshot
    header = read_header(path)
    assert header == {"raft": RAFT_DATA, "registry": {}, "engine_index": 17, "sessions": b"\x80",
                      "revision": len(SMALL), "records": True}
    # serialize waited for the engine to reach the snapshot's raft index first
    assert applier.waits == [(42, 7.0)]
    assert len(applier.stub.snapshot_requests) == 1


def test_file_layout(small_snapshot):
    path, _ = small_snapshot
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(MAGIC)
    (stored_crc,) = struct.unpack(">I", data[-4:])
    assert stored_crc == zlib.crc32(data[:-4])
    assert data[-12:-4] == struct.pack(">II", 0xFFFFFFFF, 0)   # end marker before the checksum


def test_serialize_refuses_when_the_engine_lags(stores, tmp_path):
    store = stores()
    fill(store, SMALL, 3)
    applier = EngineApplier(store, reached=False)
    path = str(tmp_path / "raft.dump")
    with pytest.raises(SnapshotError, match="42"):
        Snapshots(applier, wait_timeout=0.1, dump_path=path).write(path, RAFT_DATA)
    assert not os.path.exists(path)
    assert applier.stub.snapshot_requests == []


# -- data round trip -------------------------------------------------------------------------

def test_round_trip_of_keys_and_values(small_snapshot):
    path, _ = small_snapshot
    chunks, pairs = read_pairs(path, 17)
    assert dict(pairs) == SMALL
    assert [k for k, _ in pairs] == sorted(SMALL)     # LevelDB order, no duplicates
    assert len(chunks) == 1
    assert chunks[0].applied_index == 17 and chunks[0].last


def test_round_trip_of_many_chunks(stores, tmp_path):
    store = stores()
    n = 2 * CHUNK_PAIRS + 345
    data = {b"key-%06d" % i: (b"value-%d" % i) * (i % 7) for i in range(n)}
    data[b"\x00"] = b"\xff" * 3
    fill(store, data, 1000)
    path = str(tmp_path / "raft.dump")
    write_snapshot(store, path)
    assert read_header(path)["engine_index"] == 1000
    chunks, pairs = read_pairs(path, 1000)
    assert dict(pairs) == data and len(pairs) == len(data)
    assert [len(c.keys) for c in chunks] == [CHUNK_PAIRS, CHUNK_PAIRS, len(data) - 2 * CHUNK_PAIRS]
    assert all(len(c.keys) == len(c.records) and not c.values for c in chunks)
    assert chunks[0].applied_index == 1000
    assert [c.last for c in chunks] == [False, False, True]


def test_exact_multiple_of_the_chunk_size(stores, tmp_path):
    store = stores()
    data = {b"%05d" % i: b"v" for i in range(CHUNK_PAIRS)}
    fill(store, data, 5)
    path = str(tmp_path / "raft.dump")
    write_snapshot(store, path)
    chunks, pairs = read_pairs(path, 5)
    assert dict(pairs) == data
    assert chunks[-1].last and sum(c.last for c in chunks) == 1


def test_empty_engine(stores, tmp_path):
    store = stores()
    path = str(tmp_path / "raft.dump")
    write_snapshot(store, path)
    assert read_header(path) == {"raft": RAFT_DATA, "registry": {}, "engine_index": 0, "sessions": b"\x80",
                                 "revision": 0, "records": True}
    chunks, pairs = read_pairs(path, 0)
    assert pairs == []
    assert len(chunks) == 1 and chunks[0].last


def test_full_round_trip_into_another_engine(stores, tmp_path):
    source = stores("source.db")
    data = {b"k%05d" % i: b"%d" % (i * i) for i in range(CHUNK_PAIRS + 10)}
    data.update(SMALL)
    fill(source, data, 77)
    path = str(tmp_path / "raft.dump")
    write_snapshot(source, path)

    target = stores("target.db")
    fill(target, {b"stale": b"must disappear", b"alpha": b"old"}, 3)
    resp = EngineApplier(target).stub.Restore(restore_chunks(path))
    assert resp.success, resp.error
    assert resp.applied_index == 77 and target.applied_index == 77
    assert target.get(b"stale") is None
    assert {k: target.get(k) for k in data} == data
    assert len(target) == len(data)


def test_snapshot_is_consistent_while_the_engine_keeps_applying(stores, tmp_path):
    """Writes applied after the engine's stream started are not in the file."""
    store = stores()
    data = {b"k%05d" % i: b"old" for i in range(3 * CHUNK_PAIRS)}
    fill(store, data, 10)

    class ApplyingDuringStream(EngineApplier):
        def __init__(self, store):
            super().__init__(store)
            inner = self.stub.Snapshot

            def snapshot(request, timeout=None):
                for i, chunk in enumerate(inner(request, timeout)):
                    yield chunk
                    if i == 0:
                        store.apply([(11, [Write("SET", b"k02500", b"new"), Write("DELETE", b"k02900"),
                                           Write("SET", b"zzz", b"added")])])

            self.stub.Snapshot = snapshot

    path = str(tmp_path / "raft.dump")
    Snapshots(ApplyingDuringStream(store), wait_timeout=1.0, dump_path=path).write(path, RAFT_DATA)
    assert store.applied_index == 11 and store.get(b"zzz") == b"added"
    assert read_header(path)["engine_index"] == 10
    _, pairs = read_pairs(path, 10)
    assert dict(pairs) == data


# -- integrity ------------------------------------------------------------------------------------

def test_every_single_byte_flip_is_detected(small_snapshot, tmp_path):
    path, _ = small_snapshot
    with open(path, "rb") as f:
        good = f.read()
    bad = str(tmp_path / "bad.dump")
    for pos in range(len(good)):
        for mask in (0x01, 0x80):
            corrupt = bytearray(good)
            corrupt[pos] ^= mask
            with open(bad, "wb") as f:
                f.write(corrupt)
            with pytest.raises(SnapshotError, match="checksum"):
                read_header(bad)


def test_byte_flips_in_a_large_snapshot_are_detected(stores, tmp_path):
    store = stores()
    fill(store, {b"key-%06d" % i: b"x" * 100 for i in range(2 * CHUNK_PAIRS)}, 9)
    path = str(tmp_path / "raft.dump")
    write_snapshot(store, path)
    assert read_header(path)["engine_index"] == 9
    with open(path, "rb") as f:
        good = f.read()
    bad = str(tmp_path / "bad.dump")
    positions = set(range(0, len(good), 4999)) | {0, len(MAGIC), len(good) // 2, len(good) - 5, len(good) - 1}
    for pos in sorted(positions):
        corrupt = bytearray(good)
        corrupt[pos] ^= 0x10
        with open(bad, "wb") as f:
            f.write(corrupt)
        with pytest.raises(SnapshotError, match="checksum"):
            read_header(bad)


def test_every_truncation_is_detected(small_snapshot, tmp_path):
    path, _ = small_snapshot
    with open(path, "rb") as f:
        good = f.read()
    bad = str(tmp_path / "bad.dump")
    for size in range(len(good)):
        with open(bad, "wb") as f:
            f.write(good[:size])
        with pytest.raises(SnapshotError) as info:
            read_header(bad)
        if size >= len(MAGIC) + 8:
            assert "checksum" in str(info.value), size
        else:
            assert "too short" in str(info.value), size


def test_appended_bytes_are_detected(small_snapshot, tmp_path):
    path, _ = small_snapshot
    with open(path, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(SnapshotError, match="checksum"):
        read_header(path)


def test_wrong_magic_with_a_valid_checksum_is_refused(tmp_path):
    body = b"NOTASNAP" + struct.pack(">I", 0) + struct.pack(">II", 0xFFFFFFFF, 0)
    path = str(tmp_path / "other.dump")
    with open(path, "wb") as f:
        f.write(body + struct.pack(">I", zlib.crc32(body)))
    with pytest.raises(SnapshotError, match="not a RaftKV snapshot"):
        read_header(path)


def test_dedup_table_travels_with_the_snapshot(stores, tmp_path):
    """A retry of a proposal applied before the snapshot is still skipped on the node that installed it."""
    from storage_engine.commands import Proposal

    source = stores("source.db")
    first = Proposal("client-a", 5, 5, (Write("SET", b"counter", b"1"),))
    source.apply([(40, [first])])
    path = str(tmp_path / "raft.dump")
    write_snapshot(source, path)

    target = stores("target.db")
    resp = EngineApplier(target).stub.Restore(restore_chunks(path))
    assert resp.success, resp.error
    retry = Proposal("client-a", 5, 5, (Write("SET", b"counter", b"2"),))
    target.apply([(41, [retry])])
    assert target.get(b"counter") == b"1"
    assert target.stats.duplicates == 1


def test_background_serialization_moves_the_file_in_place_only_when_complete(stores, tmp_path):
    """serialize() must not leave PySyncObj a tmp file to rename; check() puts the dump in place."""
    import time as _time

    from pysyncobj.config import SERIALIZER_STATE

    from raft_sidecar.snapshot import SnapshotStarted

    store = stores()
    fill(store, SMALL, 5)
    dump = str(tmp_path / "raft.dump")
    snaps = Snapshots(EngineApplier(store), wait_timeout=7.0, dump_path=dump)
    assert snaps.check() == SERIALIZER_STATE.NOT_SERIALIZING
    with pytest.raises(SnapshotStarted):
        snaps.serialize(dump + ".tmp", RAFT_DATA)
    assert not (tmp_path / "raft.dump.tmp").exists()
    states = []
    deadline = _time.monotonic() + 10
    while _time.monotonic() < deadline:
        states.append(snaps.check())
        if states[-1] != SERIALIZER_STATE.SERIALIZING:
            break
        _time.sleep(0.01)
    assert states[-1] == SERIALIZER_STATE.SUCCESS
    assert read_header(dump)["engine_index"] == 5
    assert snaps.check() == SERIALIZER_STATE.NOT_SERIALIZING


def test_a_snapshot_installed_meanwhile_cancels_the_background_one(stores, tmp_path):
    import time as _time

    from pysyncobj.config import SERIALIZER_STATE

    from raft_sidecar.snapshot import SnapshotStarted

    source = stores("source.db")
    fill(source, {b"from": b"leader"}, 50)
    dump = str(tmp_path / "raft.dump")
    Snapshots(EngineApplier(source), wait_timeout=7.0, dump_path=dump).write(dump, RAFT_DATA)
    leader_bytes = open(dump, "rb").read()

    local = stores("local.db")
    fill(local, {b"own": b"older"}, 60)
    snaps = Snapshots(EngineApplier(local), wait_timeout=7.0, dump_path=dump)
    with pytest.raises(SnapshotStarted):
        snaps.serialize(dump + ".tmp", RAFT_DATA)
    snaps.deserialize(dump)  # the leader's snapshot arrives while ours is being written
    deadline = _time.monotonic() + 10
    state = SERIALIZER_STATE.SERIALIZING
    while state == SERIALIZER_STATE.SERIALIZING and _time.monotonic() < deadline:
        state = snaps.check()
        _time.sleep(0.01)
    assert state == SERIALIZER_STATE.FAILED
    assert open(dump, "rb").read() == leader_bytes


# -- metadata ---------------------------------------------------------------------------------------

def test_revision_and_key_metadata_travel_with_the_snapshot(stores, tmp_path):
    """A node restored from a snapshot serves the same create/mod revisions, versions and
    store revision as the node that wrote it, and remembered request outcomes too."""
    from storage_engine.commands import Proposal, TxnRequest
    from storage_engine.txn import PUT, RequestIdentity, Txn, TxnOp

    source = stores("source.db")
    source.apply([(1, [Write("SET", b"a", b"1"), Write("SET", b"b", b"1")]),
                  (2, [Write("SET", b"a", b"2"), Write("DELETE", b"b"), Write("SET", b"b", b"again")])])
    txn = Txn((TxnOp(PUT, b"c", b"v", expect_version=0),))
    source.apply([(3, [Proposal("engine:x", 1, 1, (TxnRequest(txn, RequestIdentity("cli", 4, 4)),))])])
    path = str(tmp_path / "raft.dump")
    write_snapshot(source, path)
    assert read_header(path)["revision"] == source.revision == 6

    target = stores("target.db")
    resp = EngineApplier(target).stub.Restore(restore_chunks(path))
    assert resp.success, resp.error
    assert target.revision == 6
    for k in (b"a", b"b", b"c"):
        assert target.get_entry(k) == source.get_entry(k)
    assert (target.get_entry(b"a").version, target.get_entry(b"a").create_revision,
            target.get_entry(b"a").mod_revision) == (2, 1, 3)
    assert target.get_entry(b"b").version == 1 and target.get_entry(b"b").create_revision == 5
    # the request's outcome was restored with the sessions: a retry answers it, changes nothing
    got = []
    target.set_outcome_sink("engine:y", lambda seq, index, outs: got.append(outs))
    target.apply([(4, [Proposal("engine:y", 1, 1, (TxnRequest(txn, RequestIdentity("cli", 4, 4)),))])])
    (dup,) = got[0]
    assert dup.duplicate and dup.succeeded and dup.revision == 6 and dup.results[0].version == 1
    assert target.revision == 6


def test_a_snapshot_file_of_the_older_format_restores_plain_values(stores, tmp_path):
    """Files written before per-key metadata (no "records" in the header) hold plain values."""
    import pickle
    path = str(tmp_path / "old.dump")
    header = pickle.dumps({"raft": RAFT_DATA, "registry": {}, "engine_index": 9, "sessions": b"\x80"}, protocol=4)
    body = MAGIC + struct.pack(">I", len(header)) + header
    for k, v in [(b"a", b"1"), (b"b", b"")]:
        body += struct.pack(">II", len(k), len(v)) + k + v
    body += struct.pack(">II", 0xFFFFFFFF, 0)
    with open(path, "wb") as f:
        f.write(body + struct.pack(">I", zlib.crc32(body)))
    target = stores("target.db")
    resp = EngineApplier(target).stub.Restore(restore_chunks(path))
    assert resp.success, resp.error
    assert target.applied_index == 9 and target.revision == 0
    assert target.get(b"a") == b"1" and target.get(b"b") == b""
    assert target.get_entry(b"a").version == 1
    target.apply([(10, [Write("SET", b"a", b"2")])])
    assert target.get_entry(b"a").version == 2 and target.get_entry(b"a").mod_revision == 1
