"""Unit tests for raft_sidecar.durable (crash-safe PySyncObj persistence)."""
from __future__ import annotations

import collections
import logging
import os
import pickle
import threading
import time

import pytest

import pysyncobj
import pysyncobj.atomic_replace
import pysyncobj.journal
import pysyncobj.serializer
import pysyncobj.syncobj
from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.journal import FileJournal

from raft_sidecar import durable
from raftkv.procs import free_ports
from raft_sidecar.durable import (
    COMPACT_SUFFIX,
    REC_HDR_SIZE,
    SYNC_BEFORE_TYPES,
    DataDirError,
    DurableFileJournal,
    DurableTCPTransport,
    JournalCorruptError,
    MetaCorruptError,
    StockJournalError,
    check_data_dir,
    scan_journal,
)


def cmd(i: int) -> bytes:
    return b"\x00" + pickle.dumps((0, (i,)), protocol=2)


def fill(j: DurableFileJournal, start: int, count: int, term: int = 1) -> list:
    out = []
    for i in range(start, start + count):
        j.add(cmd(i), i, term)
        out.append((cmd(i), i, term))
    return out


@pytest.fixture
def jpath(tmp_path):
    return str(tmp_path / "raft.journal")


# -- journal format --------------------------------------------------------------------
def test_round_trip_and_sync(jpath):
    j = DurableFileJournal(jpath)
    assert len(j) == 0 and not j.dirty
    expect = fill(j, 1, 50, term=1) + fill(j, 51, 10, term=3)
    assert j.dirty and j.synced_index == 0
    assert j.sync() is True
    assert not j.dirty and j.synced_index == 60
    assert j.sync() is False  # clean: no fdatasync
    assert j[0] == expect[0] and j[-1] == expect[-1] and j[10:13] == expect[10:13]
    j._destroy()

    j2 = DurableFileJournal(jpath)
    assert list(j2[:]) == expect
    assert j2.synced_index == 60 and not j2.dirty
    j2.add(cmd(61), 61, 3)
    j2._destroy()
    assert [e[1] for e in DurableFileJournal(jpath)[:]] == list(range(1, 62))


def test_delete_entries_from_truncates_file(jpath):
    j = DurableFileJournal(jpath)
    fill(j, 1, 10, term=1)
    j.sync()
    j.deleteEntriesFrom(5)  # keeps indexes 1..5
    assert j.dirty and j.synced_index == 5 and j.last_index == 5
    new = fill(j, 6, 3, term=2)
    j.sync()
    j._destroy()
    j2 = DurableFileJournal(jpath)
    assert [(e[1], e[2]) for e in j2[:]] == [(i, 1) for i in range(1, 6)] + [(6, 2), (7, 2), (8, 2)]
    assert list(j2[5:]) == new
    j2.clear()
    assert len(j2) == 0
    j2.add(cmd(100), 100, 5)
    j2._destroy()
    assert [e[1] for e in DurableFileJournal(jpath)[:]] == [100]


def test_suffix_readded_identically_never_leaves_the_disk(jpath):
    """PySyncObj truncates and re-adds a follower's suffix on every AppendEntries
    (H10): identical records are kept in place, so no acknowledged entry is ever
    cut from the file; a real conflict cuts the file before the new record."""
    j = DurableFileJournal(jpath)
    expect = fill(j, 1, 10)
    j.sync()
    before = open(jpath, "rb").read()
    j.deleteEntriesFrom(5)
    assert j.dirty and os.path.getsize(jpath) == len(before)  # not cut yet
    assert list(DurableFileJournal(jpath)[:]) == expect  # a crash now: the old log
    for e in expect[5:]:
        j.add(*e)
    assert not j.dirty and j.synced_index == 10 and j.sync() is False
    assert open(jpath, "rb").read() == before
    # A conflicting suffix: cut at the first differing record.
    j.deleteEntriesFrom(5)
    j.add(*expect[5])
    j.add(cmd(77), 7, 2)
    assert j.dirty and j.synced_index == 6  # 6 was kept in place, 7 is new
    assert os.path.getsize(jpath) == j._offsets[-1] + REC_HDR_SIZE + len(cmd(77))
    j.sync()
    j.deleteEntriesFrom(6)  # deleted and never re-added: cut at sync
    j.sync()
    assert os.path.getsize(jpath) == j._offsets[-1] + REC_HDR_SIZE + len(expect[5][0])
    j._destroy()
    assert list(DurableFileJournal(jpath)[:]) == expect[:6]


def test_compaction_keeps_tail_exactly_and_renames(jpath):
    j = DurableFileJournal(jpath)
    expect = fill(j, 1, 100, term=2)
    ino = os.stat(jpath).st_ino
    steps = []
    j.on_compact_step = steps.append
    j.deleteEntriesTo(60)
    assert steps == ["written", "renamed"]
    assert os.stat(jpath).st_ino != ino  # a new file renamed over, not an in-place rewrite (H7)
    assert not os.path.exists(jpath + COMPACT_SUFFIX)
    assert list(j[:]) == expect[60:]
    assert not j.dirty and j.synced_index == 100
    more = fill(j, 101, 5, term=2)
    j.deleteEntriesFrom(len(j) - 2)  # offsets stay right after compaction
    j._destroy()
    j2 = DurableFileJournal(jpath)
    assert list(j2[:]) == expect[60:] + more[:3]


def test_leftover_compact_file_is_ignored(jpath, caplog):
    j = DurableFileJournal(jpath)
    expect = fill(j, 1, 20)
    j._destroy()
    with open(jpath + COMPACT_SUFFIX, "wb") as f:  # a kill in mid-compaction
        f.write(b"partial garbage")
    with caplog.at_level(logging.WARNING):
        j2 = DurableFileJournal(jpath)
    assert list(j2[:]) == expect
    assert not os.path.exists(jpath + COMPACT_SUFFIX)


def _write_journal(jpath, n=10):
    j = DurableFileJournal(jpath)
    expect = fill(j, 1, n)
    offsets = list(j._offsets)
    j._destroy()
    return expect, offsets


def test_torn_tail_partial_record_truncated(jpath, caplog):
    expect, offsets = _write_journal(jpath)
    size = os.path.getsize(jpath)
    with open(jpath, "r+b") as f:
        f.truncate(size - 7)  # chop bytes off the last record
    with caplog.at_level(logging.WARNING):
        j = DurableFileJournal(jpath)
    assert list(j[:]) == expect[:9]
    assert os.path.getsize(jpath) == offsets[9]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert jpath in msg and "torn tail" in msg and "10" in msg
    j.add(cmd(10), 10, 1)  # appends after the truncated tail
    j._destroy()
    assert [e[1] for e in DurableFileJournal(jpath)[:]] == list(range(1, 11))


def test_torn_tail_bad_crc_of_last_record(jpath, caplog):
    expect, offsets = _write_journal(jpath)
    with open(jpath, "r+b") as f:
        f.seek(offsets[9] + 8)  # the CRC field of the last record
        crc = f.read(4)
        f.seek(offsets[9] + 8)
        f.write(bytes(b ^ 0xFF for b in crc))
    with caplog.at_level(logging.WARNING):
        j = DurableFileJournal(jpath)
    assert list(j[:]) == expect[:9]
    assert "entry 10" in caplog.text and jpath in caplog.text


def test_torn_tail_several_records_and_zero_fill(jpath, caplog):
    expect, offsets = _write_journal(jpath)
    with open(jpath, "r+b") as f:
        f.seek(offsets[7] + REC_HDR_SIZE + 2)  # corrupt the payload of record 8
        f.write(b"\xff\xff")
        f.seek(offsets[8] + 3)  # the magic of record 9
        f.write(b"\x00")
        f.seek(offsets[9] + 20)  # the term field of record 10 (term 1 -> 5)
        f.write(b"\x05")
        f.seek(0, 2)
        f.write(b"\x00" * 4096)  # the file grew but the data never made it
    with caplog.at_level(logging.WARNING):
        j = DurableFileJournal(jpath)
    assert list(j[:]) == expect[:7]
    assert "entries 8..10" in caplog.text, caplog.text


def test_mid_file_corruption_refuses(jpath):
    expect, offsets = _write_journal(jpath)
    with open(jpath, "r+b") as f:
        f.seek(offsets[4] + REC_HDR_SIZE + 1)
        f.write(b"\xee")
    with pytest.raises(JournalCorruptError) as ei:
        DurableFileJournal(jpath)
    assert jpath in str(ei.value) and "mid-file" in str(ei.value)
    before = open(jpath, "rb").read()
    with pytest.raises(JournalCorruptError):
        DurableFileJournal(jpath)
    assert open(jpath, "rb").read() == before  # refused without touching the file


def test_mid_file_zeroed_record_refuses(jpath):
    expect, offsets = _write_journal(jpath)
    with open(jpath, "r+b") as f:
        f.seek(offsets[2])
        f.write(b"\x00" * (offsets[3] - offsets[2]))
    with pytest.raises(JournalCorruptError, match="mid-file"):
        scan_journal(jpath)


def test_index_gap_refuses(jpath):
    j = DurableFileJournal(jpath)
    j.add(cmd(1), 1, 1)
    j.add(cmd(3), 3, 1)
    j._destroy()
    with pytest.raises(JournalCorruptError, match="index 3"):
        DurableFileJournal(jpath)


def test_bad_header_refuses(jpath):
    _write_journal(jpath)
    with open(jpath, "r+b") as f:
        f.seek(9)
        f.write(b"\x07")  # version field
    with pytest.raises(JournalCorruptError, match="header"):
        DurableFileJournal(jpath)


def test_stock_journal_refused_and_migrated(jpath):
    stock = FileJournal(jpath)
    expect = [(cmd(i), i, 2) for i in range(1, 30)]
    for e in expect:
        stock.add(*e)
    stock.setCurrentTerm(4, "127.0.0.1:1")
    stock._destroy()
    with pytest.raises(StockJournalError) as ei:
        DurableFileJournal(jpath)
    assert jpath in str(ei.value) and "migrate" in str(ei.value)
    assert durable.migrate_stock_journal(jpath) == 29
    j = DurableFileJournal(jpath)
    assert list(j[:]) == expect
    assert j.getCurrentTerm() == 4 and j.getVotedForNodeId() == "127.0.0.1:1"  # stock meta still read
    j._destroy()
    assert os.path.exists(jpath + ".stock-backup")


# -- meta ------------------------------------------------------------------------------
def test_meta_round_trip_and_hook(jpath):
    stored = []

    class J(DurableFileJournal):
        def on_meta_stored(self, meta):
            stored.append(meta)

    j = J(jpath)
    fill(j, 1, 5)
    j.setCurrentTerm(7, "10.0.0.1:4321")
    assert stored[-1]["currentTerm"] == 7 and stored[-1]["votedForNodeId"] == "10.0.0.1:4321"
    j.setRaftCommitIndex(4)  # lazy: stored by the one-second timer
    assert j.synced_index == 5  # covering unsynced entries synced them first (I1)
    n = len(stored)
    j.onOneSecondTimer()
    assert len(stored) == n + 1
    j._destroy()
    raw = open(jpath + ".meta", "rb").read()
    assert raw.startswith(durable.META_MAGIC)
    j2 = DurableFileJournal(jpath)
    assert (j2.getCurrentTerm(), j2.getVotedForNodeId(), j2.getRaftCommitIndex()) == (7, "10.0.0.1:4321", 4)
    assert not os.path.exists(jpath + ".meta.tmp")


def test_meta_commit_index_clamped_to_journal_end(jpath):
    j = DurableFileJournal(jpath)
    fill(j, 1, 5)
    j.setRaftCommitIndex(5)
    j._destroy()
    with open(jpath, "r+b") as f:  # lose the last two records
        f.truncate(DurableFileJournal(jpath)._offsets[3])
    assert DurableFileJournal(jpath).getRaftCommitIndex() == 3


def test_corrupt_meta_refuses(jpath):
    j = DurableFileJournal(jpath)
    j.setCurrentTerm(3, "a:1")
    j._destroy()
    with open(jpath + ".meta", "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    with pytest.raises(MetaCorruptError, match="checksum"):
        DurableFileJournal(jpath)
    open(jpath + ".meta", "wb").close()  # empty (a stock meta after an OS crash)
    with pytest.raises(MetaCorruptError) as ei:
        DurableFileJournal(jpath)
    assert jpath + ".meta" in str(ei.value)


# -- install / patches ---------------------------------------------------------------------
@pytest.fixture
def installed():
    durable.uninstall()
    yield
    durable.uninstall()


def test_install_idempotent_and_uninstall(installed, tmp_path):
    stock_replace = pysyncobj.serializer.atomicReplace
    durable.install()
    durable.install()
    assert pysyncobj.syncobj.createJournal is durable.create_journal
    assert pysyncobj.journal.createJournal is durable.create_journal
    assert pysyncobj.createJournal is durable.create_journal
    assert pysyncobj.serializer.atomicReplace is durable.durable_atomic_replace
    assert pysyncobj.atomic_replace.atomicReplace is durable.durable_atomic_replace
    assert isinstance(pysyncobj.syncobj.createJournal(str(tmp_path / "j")), DurableFileJournal)
    assert type(pysyncobj.syncobj.createJournal(None)).__name__ == "MemoryJournal"
    durable.uninstall()
    assert pysyncobj.serializer.atomicReplace is stock_replace
    assert pysyncobj.syncobj.createJournal is not durable.create_journal


def test_durable_atomic_replace_and_stock_meta(installed, tmp_path):
    durable.install()
    src, dst = tmp_path / "dump.tmp", tmp_path / "dump"
    src.write_bytes(b"x" * 100)
    dst.write_bytes(b"old")
    pysyncobj.serializer.atomicReplace(str(src), str(dst))
    assert dst.read_bytes() == b"x" * 100 and not src.exists()
    ms = pysyncobj.journal.MetaStorer(str(tmp_path / "m.meta"))
    ms.storeMeta({"currentTerm": 2})
    assert ms.getMeta() == {"currentTerm": 2}  # stock format kept


# -- check_data_dir (H2) ---------------------------------------------------------------------
def test_check_data_dir(tmp_path, jpath):
    dump = str(tmp_path / "raft.dump")
    with pytest.raises(DataDirError, match="both"):
        check_data_dir(jpath, None)
    assert check_data_dir(jpath, dump)["first_index"] is None  # fresh
    j = DurableFileJournal(jpath)
    fill(j, 1, 30)
    j._destroy()
    assert check_data_dir(jpath, dump)["first_index"] == 1
    j = DurableFileJournal(jpath)
    j.deleteEntriesTo(10)  # compacted: starts at 11
    j._destroy()
    with pytest.raises(DataDirError) as ei:
        check_data_dir(jpath, dump)
    assert dump in str(ei.value) and "index 11" in str(ei.value)
    open(dump, "wb").close()
    with pytest.raises(DataDirError, match="empty"):
        check_data_dir(jpath, dump)
    with open(dump, "wb") as f:
        f.write(b"RKVSNAP1....")

    def bad_header(path):
        raise ValueError("bad magic")

    with pytest.raises(DataDirError, match="header"):
        check_data_dir(jpath, dump, dump_header_check=bad_header)
    s = check_data_dir(jpath, dump, dump_header_check=lambda p: None)
    assert (s["first_index"], s["last_index"]) == (11, 30)


# -- a real in-process cluster ------------------------------------------------------------------
class Counter(SyncObjConsumer):
    def __init__(self):
        super().__init__()
        self.value = 0

    @replicated
    def incr(self, n=1):
        self.value += n
        return self.value

    def get(self):
        return self.value


SYNCS: dict = collections.defaultdict(collections.Counter)
SENDS: dict = collections.defaultdict(collections.Counter)
VIOLATIONS: list = []
_obs_lock = threading.Lock()


class CountingJournal(DurableFileJournal):
    def on_sync(self, reason, seconds):
        with _obs_lock:
            SYNCS[self.path][reason] += 1

    def setRaftCommitIndex(self, raftCommitIndex):  # noqa: N802
        # I1 in every mode: nothing counts as committed here before it is on disk.
        super().setRaftCommitIndex(raftCommitIndex)
        if self.synced_index < min(raftCommitIndex, self.last_index):
            with _obs_lock:
                VIOLATIONS.append((self.path, "commit", self.synced_index, raftCommitIndex))


class CheckingTransport(DurableTCPTransport):
    def on_send(self, node, message, journal):
        mtype = message.get("type")
        if mtype not in SYNC_BEFORE_TYPES:
            return
        with _obs_lock:
            SENDS[journal.path][mtype] += 1
            if journal.dirty or journal.synced_index != journal.last_index:
                VIOLATIONS.append((journal.path, mtype, journal.synced_index, journal.last_index))


class ImmediateCheckingTransport(CheckingTransport):
    coalesce = False


DIRTY_APPENDS: collections.Counter = collections.Counter()


class ParallelCheckingTransport(CheckingTransport):
    """The leader sends AppendEntries before its own sync (as the sidecar does)."""
    parallel_leader_write = True

    def on_send(self, node, message, journal):
        if message.get("type") == "append_entries":
            if journal.dirty:
                with _obs_lock:
                    DIRTY_APPENDS[journal.path] += 1
            return
        super().on_send(node, message, journal)


def _start_cluster(tmp_path, ports, transport=CheckingTransport):
    addrs = [f"127.0.0.1:{p}" for p in ports]
    nodes = []
    for i, addr in enumerate(addrs):
        conf = SyncObjConf(
            journalFile=str(tmp_path / f"n{i}.journal"), fullDumpFile=str(tmp_path / f"n{i}.dump"),
            useFork=False, appendEntriesUseBatch=False, logCompactionMinEntries=20,
            raftMinTimeout=0.4, raftMaxTimeout=0.8, connectionRetryTime=0.3, commandsWaitLeader=False)
        c = Counter()
        o = SyncObj(addr, [a for a in addrs if a != addr], conf, consumers=[c], transportClass=transport)
        nodes.append((o, c))
    return nodes


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _incr_with_retry(nodes, deadline):
    """One increment through the leader; retried only when it certainly failed."""
    while time.monotonic() < deadline:
        leaders = [(o, c) for o, c in nodes if o._isLeader()]
        if leaders:
            o, c = leaders[0]
            res = []
            ev = threading.Event()
            c.incr(callback=lambda r, e: (res.append((r, e)), ev.set()))
            if ev.wait(3.0) and res[0][1] == 0:
                return res[0][0]
            if res and res[0][1] in (1, 2, 4, 6):  # QUEUE_FULL, MISSING_LEADER, NOT_LEADER, DENIED: not applied
                continue
            raise AssertionError(f"ambiguous outcome {res}")
        time.sleep(0.05)
    raise AssertionError("no leader")


def test_interrupted_compaction_keeps_the_journal_tail(installed, tmp_path, caplog):
    """A kill after the new dump is renamed into place but before the journal is
    compacted (one tick later): stock PySyncObj then finds a journal that does
    not start at the dump and clears it, dropping every entry after the dump."""

    class NoCompaction(DurableFileJournal):
        def deleteEntriesTo(self, entryTo):
            pass  # the process "dies" between the dump rename and the compaction

    durable.install(journal_class=NoCompaction)
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    journal, dump = str(tmp_path / "j"), str(tmp_path / "d")

    def conf():
        return SyncObjConf(journalFile=journal, fullDumpFile=dump, useFork=False, appendEntriesUseBatch=False,
                           logCompactionMinEntries=10, raftMinTimeout=0.4, raftMaxTimeout=0.6)

    cf = conf()
    c = Counter()
    o = SyncObj(addr, [], cf, consumers=[c], transportClass=DurableTCPTransport)
    try:
        _wait(o._isLeader, 10, "a single-node leader")
        for _ in range(30):
            c.incr(sync=True, timeout=5)
        _wait(lambda: os.path.exists(dump), 5, "a dump")
        cf.logCompactionMinEntries = 10 ** 6  # no more dumps: the journal runs ahead of it
        for _ in range(10):
            c.incr(sync=True, timeout=5)
    finally:
        o.destroy_synchronous()
    assert c.get() == 40
    assert scan_journal(journal).entries[0][1] == 1  # never compacted, the dump is newer

    durable.install(journal_class=DurableFileJournal)
    c2 = Counter()
    with caplog.at_level(logging.WARNING):
        o2 = SyncObj(addr, [], conf(), consumers=[c2], transportClass=DurableTCPTransport)
        try:
            _wait(lambda: c2.get() == 40, 10, "all 40 increments after restart")
            first = o2._SyncObj__raftLog[0][1]
        finally:
            o2.destroy_synchronous()
    assert first > 1
    assert "compaction was interrupted" in caplog.text


def test_snapshot_install_discards_own_pending_compaction(installed, tmp_path):
    """Stock race seen in the kill -9 chaos test: the node writes its own dump in
    one tick, a snapshot from the leader (older) is renamed over it in the same
    tick's poll, and the next tick compacts the journal up to the node's own,
    replaced, dump: past the installed snapshot."""
    durable.install()
    journal, dump = str(tmp_path / "j"), str(tmp_path / "d")
    conf = SyncObjConf(autoTick=False, journalFile=journal, fullDumpFile=dump, useFork=False,
                       appendEntriesUseBatch=False, logCompactionMinEntries=10 ** 6,
                       raftMinTimeout=0.4, raftMaxTimeout=0.6)
    c = Counter()
    o = SyncObj(f"127.0.0.1:{free_ports(1)[0]}", [], conf, consumers=[c], transportClass=DurableTCPTransport)
    ser = o._SyncObj__serializer
    log_ = o._SyncObj__raftLog

    def tick_until(pred, what):
        deadline = time.monotonic() + 10
        while not pred():
            assert time.monotonic() < deadline, what
            o.doTick(0.01)

    def incr(n):
        target = c.get() + n
        for _ in range(n):
            c.incr()
        tick_until(lambda: c.get() == target, "increments applied")

    try:
        tick_until(o._isLeader, "leadership")
        incr(10)
        o.forceLogCompaction()
        tick_until(lambda: ser._Serializer__pid == -1, "a dump")
        o.doTick(0)
        old_first = log_[0][1]
        assert old_first > 1  # compacted to the dump
        old_dump = open(dump, "rb").read()  # "the leader's" snapshot: older
        incr(10)
        o.forceLogCompaction()
        tick_until(lambda: ser._Serializer__pid == -1, "a second dump")
        # The leader's snapshot arrives in the same poll (setTransmissionData):
        with open(dump + ".1.tmp", "wb") as f:
            f.write(old_dump)
        pysyncobj.serializer.atomicReplace(dump + ".1.tmp", dump)
        o._SyncObj__loadDumpFile(True)
        for _ in range(5):
            o.doTick(0)
        assert len(log_) >= 2 and log_[0][1] == old_first  # not compacted past the installed snapshot
        assert c.get() == 10
    finally:
        o.destroy()


@pytest.mark.parametrize("transport", [CheckingTransport, ImmediateCheckingTransport, ParallelCheckingTransport],
                         ids=["coalesce", "immediate", "parallel-leader-write"])
def test_cluster_syncs_before_sending_and_survives_full_restart(installed, tmp_path, transport):
    durable.install(journal_class=CountingJournal)
    SYNCS.clear()
    SENDS.clear()
    VIOLATIONS.clear()
    DIRTY_APPENDS.clear()
    ports = free_ports(3)
    nodes = _start_cluster(tmp_path, ports, transport)
    try:
        _wait(lambda: sum(o._isLeader() for o, _ in nodes) == 1, 15, "a leader")
        deadline = time.monotonic() + 30
        for i in range(60):
            assert _incr_with_retry(nodes, deadline) is not None
        _wait(lambda: all(c.get() == 60 for _, c in nodes), 10, "all nodes to apply 60 increments")
        for o, _ in nodes:
            assert type(o._SyncObj__raftLog) is CountingJournal
    finally:
        for o, _ in nodes:
            o.destroy_synchronous()

    paths = [str(tmp_path / f"n{i}.journal") for i in range(3)]
    assert VIOLATIONS == [], VIOLATIONS[:5]
    for p in paths:
        sends = SENDS[p]
        syncs = SYNCS[p]
        assert sum(sends.values()) > 0, (p, sends)
        assert sum(n for r, n in syncs.items() if r.startswith("send:")) > 0, (p, syncs)
    # Followers acknowledged entries (next_node_idx) and the leader replicated them.
    total = collections.Counter()
    for p in paths:
        total.update(SENDS[p])
    if transport is ParallelCheckingTransport:
        # The leader's entries left before its own sync, and still none was committed unsynced.
        assert sum(DIRTY_APPENDS.values()) > 0 and total["next_node_idx"] > 0
    else:
        assert total["next_node_idx"] > 0 and total["append_entries"] > 0
    # Compaction happened (logCompactionMinEntries=20) and the data dirs are consistent.
    firsts = [check_data_dir(p, p.replace(".journal", ".dump"))["first_index"] for p in paths]
    assert max(firsts) > 1, firsts

    # Restart all nodes on the same files: the counter comes back from dump + journal.
    nodes = _start_cluster(tmp_path, ports, transport)
    try:
        _wait(lambda: all(c.get() == 60 for _, c in nodes), 20, "the counter after restart")
        _wait(lambda: sum(o._isLeader() for o, _ in nodes) == 1, 15, "a leader after restart")
        assert _incr_with_retry(nodes, time.monotonic() + 20) == 61
        _wait(lambda: all(c.get() == 61 for _, c in nodes), 10, "all nodes to apply the 61st increment")
    finally:
        for o, _ in nodes:
            o.destroy_synchronous()
    assert VIOLATIONS == [], VIOLATIONS[:5]
