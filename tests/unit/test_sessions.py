"""Exactly-once bookkeeping: pure SessionTable rules and the Store applying them."""
from storage_engine.commands import Proposal, Write
import msgpack

from storage_engine.sessions import EXPIRY_EVERY, MAX_SEQS_PER_CLIENT, SESSION_TTL_ENTRIES, Session, SessionTable
from storage_engine.store import Store


def test_first_copy_applies_and_retries_are_skipped():
    t = SessionTable()
    assert t.admit("c", 1, 1, index=10)
    assert not t.admit("c", 1, 1, index=11)
    assert t.admit("c", 2, 1, index=12)


def test_out_of_order_commits_within_the_window_both_apply():
    t = SessionTable()
    assert t.admit("c", 3, 1, index=10)
    assert t.admit("c", 2, 1, index=11)
    assert t.admit("c", 1, 1, index=12)
    assert not t.admit("c", 2, 1, index=13)


def test_seq_below_floor_is_never_applied():
    t = SessionTable()
    assert t.admit("c", 5, 5, index=10)
    # the client gave up on seq 4 long ago ("outcome unknown"); a late copy must not apply
    assert not t.admit("c", 4, 4, index=11)
    assert t.sessions["c"].seqs == {5}


def test_floor_prunes_remembered_seqs():
    t = SessionTable()
    for s in range(1, 6):
        t.admit("c", s, 1, index=s)
    t.admit("c", 6, 6, index=7)
    assert t.sessions["c"].seqs == {6}


def test_clients_are_independent():
    t = SessionTable()
    assert t.admit("a", 1, 1, index=1)
    assert t.admit("b", 1, 1, index=2)


def test_expiry_is_by_index_and_dump_load_round_trips():
    t = SessionTable()
    t.admit("old", 1, 1, index=1)
    t.admit("new", 1, 1, index=SESSION_TTL_ENTRIES + 5)
    assert t.expire(SESSION_TTL_ENTRIES + 10) == ["old"]
    t2 = SessionTable.load(t.dump())
    assert set(t2.sessions) == {"new"} and t2.sessions["new"].seqs == {1}


def test_store_skips_duplicate_proposals_and_remembers_across_reopen(tmp_path):
    path = str(tmp_path / "kv.db")
    s = Store(path)
    s.apply([(1, [Proposal("c", 1, 1, (Write("SET", b"x", b"1"),))])])
    s.apply([(2, [Proposal("c", 1, 1, (Write("SET", b"x", b"2"),))])])  # retry of seq 1
    assert s.get(b"x") == b"1" and s.stats.duplicates == 1 and s.applied_index == 2
    s.close()
    s = Store(path)
    s.apply([(3, [Proposal("c", 1, 1, (Write("SET", b"x", b"3"),))])])
    assert s.get(b"x") == b"1"
    s.apply([(4, [Proposal("c", 2, 1, (Write("SET", b"x", b"4"),))])])
    assert s.get(b"x") == b"4"
    s.close()


def test_store_expires_sessions_at_fixed_indexes(tmp_path):
    s = Store(str(tmp_path / "kv.db"))
    s.apply([(1, [Proposal("gone", 1, 1, (Write("SET", b"a", b"1"),))])])
    boundary = (SESSION_TTL_ENTRIES // EXPIRY_EVERY + 1) * EXPIRY_EVERY
    s.apply([(boundary, [Proposal("live", 1, 1, ())])])
    assert set(s.sessions.sessions) == {"live"}
    s.close()
    s = Store(str(tmp_path / "kv.db"))
    assert set(s.sessions.sessions) == {"live"}
    s.close()


def test_outcomes_are_remembered_per_seq_until_the_floor_passes():
    t = SessionTable()
    assert t.admit("c", 1, 1, index=1)
    t.remember("c", 1, [1, 5, [[1, 5]]])
    assert t.admit("c", 2, 1, index=2)
    t.remember("c", 2, [0, 5, []])
    assert t.outcome("c", 1) == [1, 5, [[1, 5]]] and t.outcome("c", 2) == [0, 5, []]
    assert not t.admit("c", 1, 1, index=3)
    assert t.outcome("c", 1) == [1, 5, [[1, 5]]]          # a duplicate does not overwrite it
    t.admit("c", 3, 2, index=4)
    assert t.outcome("c", 1) is None and t.outcome("c", 2) == [0, 5, []] and t.floor("c") == 2
    assert t.outcome("nobody", 1) is None


def test_remember_ignores_a_seq_that_was_not_admitted():
    t = SessionTable()
    t.remember("c", 1, "x")
    assert "c" not in t.sessions
    t.admit("c", 5, 5, index=1)
    t.remember("c", 4, "x")
    assert t.outcome("c", 4) is None


def test_seqs_per_client_are_capped_by_raising_the_floor():
    t = SessionTable()
    for s in range(1, MAX_SEQS_PER_CLIENT + 3):
        assert t.admit("c", s, 0, index=s)
    sess = t.sessions["c"]
    assert len(sess.outcomes) == MAX_SEQS_PER_CLIENT and sess.floor == 3 and min(sess.outcomes) == 3
    assert not t.admit("c", 2, 0, index=10_000)


def test_outcomes_round_trip_through_dump_and_encode():
    t = SessionTable()
    t.admit("c", 1, 1, index=1)
    t.remember("c", 1, [1, 9, [[2, 1], 0]])
    t.admit("c", 2, 1, index=2)
    t2 = SessionTable.load(t.dump())
    assert t2.sessions["c"] == t.sessions["c"]
    assert Session.decode(t.sessions["c"].encode()) == t.sessions["c"]


def test_sessions_of_the_older_format_load_without_outcomes():
    old = msgpack.packb({"c": [3, [3, 4], 17]})
    t = SessionTable.load(old)
    assert t.sessions["c"].seqs == {3, 4} and t.sessions["c"].floor == 3 and t.sessions["c"].last_index == 17
    assert not t.admit("c", 4, 3, index=18) and t.outcome("c", 4) is None
    assert Session.decode(msgpack.packb([1, [1, 2], 5])).seqs == {1, 2}
