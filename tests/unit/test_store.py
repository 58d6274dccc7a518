"""Tests for storage_engine.store: the LevelDB-backed map fenced by raft index.

Real plyvel databases in a temporary directory; every claim about durability is
checked by closing and reopening the store.
"""

from __future__ import annotations

import os

import pytest

from storage_engine.commands import Write
from storage_engine.store import Store, pack_record, unpack_record


def SET(key: bytes, value: bytes) -> Write:
    return Write("SET", key, value)


def DEL(key: bytes) -> Write:
    return Write("DELETE", key)


def contents(store: Store) -> dict[bytes, bytes]:
    """Everything the store holds, read through the snapshot path (i.e. from LevelDB)."""
    out: dict[bytes, bytes] = {}
    for _, chunk in store.iter_snapshot():
        out.update((k, unpack_record(r)[3]) for k, r in chunk)
    return out


def values(chunk: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, unpack_record(r)[3]) for k, r in chunk]


def recs(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Plain (key, value) pairs as snapshot records of fresh keys (version 1 at revision 1)."""
    return [(k, pack_record(1, 1, 1, v)) for k, v in pairs]


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "kv.db")


@pytest.fixture
def open_store(db_path):
    opened: list[Store] = []

    def _open(path: str = db_path, audit: str | None = None) -> Store:
        s = Store(path, audit_path=audit)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        try:
            s.close()
        except Exception:
            pass


def reopen(store: Store, open_store) -> Store:
    store.close()
    return open_store(store.path)


# -- applying ----------------------------------------------------------------------

def test_new_store_is_empty(open_store):
    s = open_store()
    assert s.applied_index == 0
    assert len(s) == 0
    assert s.get(b"a") is None
    assert contents(s) == {}


def test_apply_set_and_delete(open_store):
    s = open_store()
    assert s.apply([(1, [SET(b"a", b"1"), SET(b"b", b"2")]), (2, [DEL(b"a"), SET(b"c", b"")])]) == 2
    assert s.applied_index == 2
    assert s.get(b"a") is None
    assert s.get(b"b") == b"2"
    assert s.get(b"c") == b""
    assert len(s) == 2
    assert s.stats.applies == 2 and s.stats.skipped == 0
    assert contents(s) == {b"b": b"2", b"c": b""}


def test_overwrite_and_delete_of_missing_key(open_store):
    s = open_store()
    s.apply([(1, [SET(b"k", b"old")])])
    s.apply([(2, [SET(b"k", b"new"), DEL(b"never-there")])])
    assert s.get(b"k") == b"new"
    assert len(s) == 1


def test_writes_inside_one_entry_apply_in_order(open_store):
    s = open_store()
    s.apply([(1, [SET(b"x", b"1"), DEL(b"x"), DEL(b"y"), SET(b"y", b"2")])])
    assert s.get(b"x") is None and s.get(b"y") == b"2"
    s = reopen(s, open_store)
    assert s.get(b"x") is None and s.get(b"y") == b"2"
    assert contents(s) == {b"y": b"2"}


def test_entry_without_writes_still_advances_the_index(open_store):
    s = open_store()
    assert s.apply([(1, [])]) == 1
    assert s.apply([(2, iter(()))]) == 2
    s = reopen(s, open_store)
    assert s.applied_index == 2 and len(s) == 0


def test_binary_keys_and_values(open_store):
    s = open_store()
    s.apply([(1, [SET(b"\x00\xff", b"\x00\x00"), SET(b"d/nested", b"v"), SET(b"m/applied_index", b"x")])])
    s = reopen(s, open_store)
    # user keys that look like the store's own prefixes do not clash with its metadata
    assert s.applied_index == 1
    assert s.get(b"\x00\xff") == b"\x00\x00"
    assert s.get(b"d/nested") == b"v"
    assert s.get(b"m/applied_index") == b"x"
    assert len(s) == 3


def test_data_and_applied_index_survive_reopen(open_store):
    s = open_store()
    s.apply([(3, [SET(b"a", b"1")]), (7, [SET(b"b", b"2"), DEL(b"a")])])
    s = reopen(s, open_store)
    assert s.applied_index == 7
    assert s.get(b"a") is None and s.get(b"b") == b"2"
    assert contents(s) == {b"b": b"2"}
    assert s.stats.applies == 0 and s.stats.skipped == 0


def test_empty_apply_returns_current_index(open_store):
    s = open_store()
    s.apply([(4, [SET(b"a", b"1")])])
    assert s.apply([]) == 4


# -- replay safety ----------------------------------------------------------------------

def test_replayed_entries_are_skipped_and_change_nothing(open_store):
    s = open_store()
    s.apply([(1, [SET(b"a", b"1")]), (2, [SET(b"b", b"2")]), (3, [DEL(b"c")])])
    s = reopen(s, open_store)
    # A replay of the same indexes carrying different writes must not touch the data.
    assert s.apply([(1, [SET(b"a", b"REPLAYED")]), (2, [DEL(b"b")]), (3, [SET(b"c", b"3")])]) == 3
    assert s.stats.skipped == 3 and s.stats.applies == 0
    assert s.applied_index == 3
    assert {k: s.get(k) for k in (b"a", b"b", b"c")} == {b"a": b"1", b"b": b"2", b"c": None}
    s = reopen(s, open_store)
    assert contents(s) == {b"a": b"1", b"b": b"2"}
    assert s.applied_index == 3


def test_replay_in_the_same_process_is_skipped(open_store):
    s = open_store()
    s.apply([(5, [SET(b"k", b"v")])])
    s.apply([(5, [SET(b"k", b"other")])])
    s.apply([(4, [DEL(b"k")])])
    assert s.get(b"k") == b"v"
    assert s.stats.applies == 1 and s.stats.skipped == 2


def test_run_straddling_the_applied_index_applies_only_the_new_part(open_store):
    s = open_store()
    s.apply([(1, [SET(b"a", b"1")]), (2, [SET(b"b", b"2")])])
    assert s.apply([(1, [DEL(b"a")]), (2, [DEL(b"b")]), (3, [SET(b"a", b"3")]), (4, [SET(b"d", b"4")])]) == 4
    assert s.stats.skipped == 2 and s.stats.applies == 4
    assert contents(s) == {b"a": b"3", b"b": b"2", b"d": b"4"}


def test_skipped_entries_writes_are_not_consumed(open_store):
    s = open_store()
    s.apply([(2, [SET(b"a", b"1")])])

    def exploding():
        raise AssertionError("a skipped entry's writes must not be evaluated")
        yield  # pragma: no cover

    assert s.apply([(1, exploding()), (2, exploding())]) == 2


# -- audit file -------------------------------------------------------------------------

def test_audit_file_lists_each_applied_index_once(tmp_path, open_store, db_path):
    audit = str(tmp_path / "audit.log")
    s = open_store(audit=audit)
    s.apply([(1, [SET(b"a", b"1")]), (2, [])])
    s.apply([(2, [SET(b"a", b"x")]), (3, [DEL(b"a")])])  # 2 is a replay
    s.apply([(1, [])])                                    # all replay
    with open(audit) as f:
        assert f.read() == "1\n2\n3\n"   # line-buffered: visible before close
    s.close()
    s = open_store(audit=audit)
    s.apply([(3, []), (4, [SET(b"b", b"2")])])
    s.close()
    with open(audit) as f:
        assert f.read().splitlines() == ["1", "2", "3", "4"]


def test_no_audit_file_unless_asked(tmp_path, open_store):
    s = open_store()
    s.apply([(1, [SET(b"a", b"1")])])
    assert sorted(os.listdir(tmp_path)) == ["kv.db"]


# -- out-of-order entries -------------------------------------------------------------------

@pytest.mark.parametrize("indexes", [(2, 1), (3, 3), (1, 3, 2)])
def test_out_of_order_entries_in_one_call_raise_and_change_nothing(tmp_path, open_store, indexes):
    audit = str(tmp_path / "audit.log")
    s = open_store(audit=audit)
    with pytest.raises(ValueError, match="out of order"):
        s.apply([(i, [SET(b"k%d" % n, b"v")]) for n, i in enumerate(indexes)])
    assert s.applied_index == 0
    assert len(s) == 0 and s.get(b"k0") is None
    assert s.stats.applies == 0
    s.close()
    s = open_store(audit=audit)
    assert s.applied_index == 0
    assert contents(s) == {}
    with open(audit) as f:
        assert f.read() == ""
    # and the store is still usable
    assert s.apply([(1, [SET(b"a", b"1")])]) == 1


def test_out_of_order_after_existing_data_keeps_old_state(open_store):
    s = open_store()
    s.apply([(10, [SET(b"a", b"1")])])
    with pytest.raises(ValueError):
        s.apply([(12, [SET(b"a", b"2")]), (11, [SET(b"b", b"3")])])
    assert s.applied_index == 10 and s.get(b"a") == b"1" and s.get(b"b") is None
    s = reopen(s, open_store)
    assert s.applied_index == 10 and contents(s) == {b"a": b"1"}


# -- snapshots ---------------------------------------------------------------------------------

def test_iter_snapshot_chunks_in_key_order(open_store):
    s = open_store()
    s.apply([(9, [SET(b"%02d" % i, b"v%d" % i) for i in (4, 0, 3, 1, 2)])])
    chunks = list(s.iter_snapshot(chunk_keys=2))
    assert [idx for idx, _ in chunks] == [9, 9, 9]
    assert [len(c) for _, c in chunks] == [2, 2, 1]
    assert [k for _, c in chunks for k, _ in c] == [b"00", b"01", b"02", b"03", b"04"]
    assert dict(p for _, c in chunks for p in values(c))[b"03"] == b"v3"


def test_iter_snapshot_exact_multiple_and_empty(open_store):
    s = open_store()
    assert list(s.iter_snapshot()) == [(0, [])]
    s.apply([(1, [SET(b"a", b"1"), SET(b"b", b"2")])])
    assert [(i, values(c)) for i, c in s.iter_snapshot(chunk_keys=2)] == [(1, [(b"a", b"1"), (b"b", b"2")]), (1, [])]


def test_iter_snapshot_is_a_consistent_view(open_store):
    s = open_store()
    s.apply([(5, [SET(b"k%d" % i, b"old") for i in range(6)])])
    it = s.iter_snapshot(chunk_keys=2)
    first_index, first = next(it)
    assert first_index == 5 and values(first) == [(b"k0", b"old"), (b"k1", b"old")]
    # Writes applied while the snapshot is being streamed:
    s.apply([(6, [SET(b"k3", b"new"), DEL(b"k4"), SET(b"k9", b"added")]), (7, [DEL(b"k5")])])
    rest = list(it)
    assert {idx for idx, _ in rest} == {5}
    seen = dict(values(first))
    for _, chunk in rest:
        seen.update(values(chunk))
    assert seen == {b"k%d" % i: b"old" for i in range(6)}
    # ... while a new snapshot, and the store itself, see them
    assert s.get(b"k3") == b"new" and s.get(b"k4") is None
    assert contents(s) == {b"k0": b"old", b"k1": b"old", b"k2": b"old", b"k3": b"new", b"k9": b"added"}
    assert next(s.iter_snapshot())[0] == 7


# -- restore -------------------------------------------------------------------------------------

def leftovers(db_path: str) -> list[str]:
    return [p for p in (db_path + ".old", db_path + ".restore") if os.path.exists(p)]


def test_restore_replaces_the_whole_content(open_store, db_path):
    s = open_store()
    s.apply([(5, [SET(b"a", b"1"), SET(b"b", b"2"), SET(b"shared", b"old")])])
    r = s.begin_restore()
    r.add(recs([(b"c", b"3"), (b"shared", b"new")]))
    r.add_plain([(b"\x00bin", b"\xff"), (b"empty", b"")])
    r.commit(42)
    expected = {b"c": b"3", b"shared": b"new", b"\x00bin": b"\xff", b"empty": b""}
    assert s.applied_index == 42
    assert s.get(b"a") is None and s.get(b"b") is None
    assert {k: s.get(k) for k in expected} == expected
    assert len(s) == len(expected)
    assert contents(s) == expected
    assert leftovers(db_path) == []
    s = reopen(s, open_store)
    assert s.applied_index == 42
    assert contents(s) == expected


def test_store_keeps_working_after_restore(open_store):
    s = open_store()
    s.apply([(5, [SET(b"a", b"1")])])
    r = s.begin_restore()
    r.add(recs([(b"b", b"2")]))
    r.commit(10)
    assert s.apply([(9, [SET(b"stale", b"x")]), (10, [DEL(b"b")])]) == 10   # replays skipped
    assert s.apply([(11, [SET(b"c", b"3")])]) == 11
    assert contents(s) == {b"b": b"2", b"c": b"3"}
    s = reopen(s, open_store)
    assert s.applied_index == 11 and contents(s) == {b"b": b"2", b"c": b"3"}


def test_restore_of_an_empty_snapshot_empties_the_store(open_store):
    s = open_store()
    s.apply([(3, [SET(b"a", b"1")])])
    s.begin_restore().commit(7)
    assert s.applied_index == 7 and len(s) == 0
    s = reopen(s, open_store)
    assert s.applied_index == 7 and contents(s) == {}


def test_restore_abort_keeps_the_old_state(open_store, db_path):
    s = open_store()
    s.apply([(5, [SET(b"a", b"1"), SET(b"b", b"2")])])
    r = s.begin_restore()
    r.add(recs([(b"z", b"26")]))
    r.abort()
    assert s.applied_index == 5
    assert contents(s) == {b"a": b"1", b"b": b"2"}
    assert s.get(b"z") is None
    assert leftovers(db_path) == []
    s.apply([(6, [SET(b"c", b"3")])])
    s = reopen(s, open_store)
    assert s.applied_index == 6
    assert contents(s) == {b"a": b"1", b"b": b"2", b"c": b"3"}


def test_a_second_restore_starts_from_scratch(open_store):
    s = open_store()
    r = s.begin_restore()
    r.add(recs([(b"from-first-attempt", b"x")]))
    r.abort()
    r = s.begin_restore()
    r.add(recs([(b"only", b"1")]))
    r.commit(3)
    assert contents(s) == {b"only": b"1"}


# -- crash recovery ----------------------------------------------------------------------------------

def test_recovers_from_a_swap_interrupted_after_moving_the_old_db(open_store, db_path):
    s = open_store()
    s.apply([(8, [SET(b"a", b"1"), SET(b"b", b"2")])])
    s.close()
    # Crash between `rename(path, path.old)` and `rename(path.restore, path)`:
    os.rename(db_path, db_path + ".old")
    half = Store(db_path + ".restore")
    half.apply([(99, [SET(b"partial", b"x")])])
    half.close()
    s = open_store()
    assert s.applied_index == 8
    assert contents(s) == {b"a": b"1", b"b": b"2"}
    assert s.get(b"partial") is None
    assert leftovers(db_path) == []


def test_leftover_restore_dir_is_discarded_on_open(open_store, db_path):
    s = open_store()
    s.apply([(2, [SET(b"a", b"1")])])
    s.close()
    half = Store(db_path + ".restore")
    half.apply([(50, [SET(b"partial", b"x")])])
    half.close()
    s = open_store()
    assert s.applied_index == 2 and contents(s) == {b"a": b"1"}
    assert not os.path.exists(db_path + ".restore")


def test_swap_interrupted_after_moving_the_new_db_in_keeps_the_new_db(open_store, db_path):
    new = open_store()
    new.apply([(20, [SET(b"new", b"1")])])
    new.close()
    old = open_store(db_path + ".old")
    old.apply([(3, [SET(b"old", b"1")])])
    old.close()
    s = open_store()
    assert s.applied_index == 20
    assert contents(s) == {b"new": b"1"}


# -- metadata and the store revision ----------------------------------------------------------

def test_revision_and_key_metadata_survive_reopen(open_store):
    s = open_store()
    s.apply([(1, [SET(b"a", b"1"), SET(b"b", b"1")]), (2, [SET(b"a", b"2"), DEL(b"b"), DEL(b"b")])])
    assert s.revision == 4
    s = reopen(s, open_store)
    assert s.revision == 4
    e = s.get_entry(b"a")
    assert (e.key, e.value, e.create_revision, e.mod_revision, e.version) == (b"a", b"2", 1, 3, 2)
    assert s.get_entry(b"b") is None
    # replayed entries do not bump it again
    s.apply([(2, [SET(b"a", b"x")])])
    assert s.revision == 4 and s.get_entry(b"a").version == 2


# -- scan -------------------------------------------------------------------------------------

def scan_keys(s: Store, start: bytes, end: bytes | None, limit: int) -> tuple[list[bytes], bool]:
    kvs, more = s.scan(start, end, limit)
    return [m.key for m in kvs], more


@pytest.fixture
def scanned(open_store):
    s = open_store()
    keys = [b"a", b"a\x00", b"ab", b"abc", b"b", b"b\xff", b"c", b"\x00", b"\xff\xff"]
    s.apply([(1, [SET(k, b"v-" + k) for k in keys])])
    return s, sorted(keys)


def test_scan_is_in_bytewise_order_with_an_exclusive_end(scanned):
    s, keys = scanned
    assert scan_keys(s, b"", None, 100) == (keys, False)
    assert scan_keys(s, b"a", b"b", 100) == ([b"a", b"a\x00", b"ab", b"abc"], False)
    assert scan_keys(s, b"ab", b"abc", 100) == ([b"ab"], False)
    assert scan_keys(s, b"b", b"b", 100) == ([], False)
    assert scan_keys(s, b"zz", None, 100) == ([b"\xff\xff"], False)


def test_scan_limit_and_continuation_cover_every_key_once(scanned):
    s, keys = scanned
    assert scan_keys(s, b"", None, 3) == (keys[:3], True)
    assert scan_keys(s, b"", None, len(keys)) == (keys, False)
    seen, start = [], b""
    while True:
        page, more = scan_keys(s, start, None, 2)
        seen += page
        if not more:
            break
        start = page[-1] + b"\x00"          # strictly after the last key
    assert seen == keys


def test_scan_returns_values_metadata_or_keys_only(scanned):
    s, _ = scanned
    s.apply([(2, [SET(b"ab", b"new")])])
    (m,), more = s.scan(b"ab", b"abc", 10)
    assert (m.key, m.value, m.create_revision, m.mod_revision, m.version) == (b"ab", b"new", 3, 10, 2)   # 3rd key written
    (m,), _ = s.scan(b"ab", b"abc", 10, keys_only=True)
    assert m.value == b"" and m.version == 2


def test_scan_with_a_prefix_end(scanned):
    from storage_engine.store import prefix_end
    s, _ = scanned
    assert prefix_end(b"ab") == b"ac" and prefix_end(b"a\xff") == b"b" and prefix_end(b"\xff\xff") is None
    assert scan_keys(s, b"a", prefix_end(b"a"), 100) == ([b"a", b"a\x00", b"ab", b"abc"], False)
    assert scan_keys(s, b"\xff", prefix_end(b"\xff"), 100) == ([b"\xff\xff"], False)


def test_scan_never_sees_the_stores_own_keys(open_store):
    s = open_store()
    s.apply([(1, [SET(b"x", b"1")]), (2, [])])
    assert scan_keys(s, b"", None, 100) == ([b"x"], False)


# -- backup view --------------------------------------------------------------------------------

def test_backup_view_is_one_snapshot_and_encodes_the_file(open_store):
    import io
    from raftkv import backup
    s = open_store()
    s.apply([(3, [SET(b"k%d" % i, b"v%d" % i) for i in range(5)]), (4, [SET(b"k0", b"again")])])
    view = s.iter_backup(node="n1")
    s.apply([(5, [SET(b"k9", b"later"), DEL(b"k1")])])        # after the snapshot
    assert (view.applied_index, view.revision) == (4, 6)
    data = b"".join(view)
    header, records = backup.read(io.BytesIO(data))
    assert (header.applied_index, header.revision, header.node) == (4, 6, "n1")
    got = [(r.key, r.value, r.create_revision, r.mod_revision, r.version) for r in records]
    assert got[0] == (b"k0", b"again", 1, 6, 2)
    assert [g[0] for g in got] == [b"k%d" % i for i in range(5)]
    assert list(s.iter_backup().records())[-1] == (b"k9", b"later", 7, 7, 1)


def test_backup_view_can_be_closed_early(open_store):
    s = open_store()
    s.apply([(1, [SET(b"k%04d" % i, b"v") for i in range(3000)])])
    chunks = iter(s.iter_backup())
    next(chunks)
    next(chunks)
    chunks.close()    # a client that went away: the snapshot is released
    view = s.iter_backup()
    view.close()
    with pytest.raises(ValueError, match="closed"):
        list(view.records())
