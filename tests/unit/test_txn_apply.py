"""Apply-time semantics of v1 requests in storage_engine.store: key metadata, the store
revision, conditions, all-or-nothing txns, per-request exactly-once and outcomes.

Real plyvel databases in a temporary directory; durability claims are checked by
reopening the store. Proposals are built as the engine builds them (Proposal with
its own identity around TxnRequests), and outcomes are read through the same
outcome sink raft_client uses.
"""
from __future__ import annotations

import plyvel
import pytest

from storage_engine.commands import Proposal, TxnRequest, Write, decode_proposal, encode_batch
from storage_engine.errors import ErrorKind, KVError
from storage_engine.sessions import MAX_SEQS_PER_CLIENT
from storage_engine.store import Store
from storage_engine.txn import DELETE, PUT, CurrentState, KeyMeta, RequestIdentity, Txn, TxnOp, TxnResult

ENGINE = "engine:test"


class Engine:
    """A Store plus the bookkeeping raft_client does: numbered proposals and their outcomes."""

    def __init__(self, path: str, client: str = ENGINE) -> None:
        self.store = Store(path)
        self.client = client
        self.index = self.store.applied_index
        self.seq = 0
        self.outcomes: dict[int, list] = {}
        self.store.set_outcome_sink(client, lambda seq, index, outs: self.outcomes.__setitem__(seq, outs))

    def run(self, *items, wire: bool = True) -> list:
        """Applies one entry holding `items` (Writes or (Txn, identity) pairs); returns their outcomes."""
        reqs = [i if isinstance(i, Write) else TxnRequest(i[0], i[1]) for i in items]
        self.seq += 1
        self.index += 1
        prop = Proposal(self.client, self.seq, self.seq, tuple(reqs))
        if wire:  # through the wire format, as the sidecar delivers it
            cmd = encode_batch(reqs)
            cmd.client_id, cmd.seq, cmd.floor = self.client, self.seq, self.seq
            prop = decode_proposal(type(cmd).FromString(cmd.SerializeToString()))
        self.store.apply([(self.index, [prop])])
        return self.outcomes.pop(self.seq)

    def txn(self, *ops: TxnOp, ident: RequestIdentity | None = None) -> TxnResult | KVError:
        (out,) = self.run((Txn(tuple(ops)), ident))
        return out

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def engine(tmp_path):
    opened: list[Engine] = []

    def _open(name: str = "kv.db", client: str = ENGINE) -> Engine:
        e = Engine(str(tmp_path / name), client)
        opened.append(e)
        return e

    yield _open
    for e in opened:
        try:
            e.close()
        except Exception:
            pass


def put(key: bytes, value: bytes = b"v", **cond) -> TxnOp:
    return TxnOp(PUT, key, value, **cond)


def delete(key: bytes, **cond) -> TxnOp:
    return TxnOp(DELETE, key, **cond)


def meta(e: Engine, key: bytes) -> tuple[int, int, int] | None:
    m = e.store.get_entry(key)
    return None if m is None else (m.create_revision, m.mod_revision, m.version)


# -- revisions and versions ---------------------------------------------------------------

def test_put_creates_then_bumps_version_and_mod_revision(engine):
    e = engine()
    assert e.store.revision == 0
    r = e.txn(put(b"k", b"1"))
    assert r.succeeded and r.revision == 1 and not r.duplicate
    assert r.results[0].version == 1 and r.results[0].create_revision == 1 and r.results[0].mod_revision == 1
    e.txn(put(b"other"))
    r = e.txn(put(b"k", b"2"))
    assert r.revision == 3 and r.results[0].version == 2 and r.results[0].create_revision == 1
    assert e.store.get_entry(b"k") == KeyMeta(b"k", b"2", 1, 3, 2)
    assert e.store.get(b"k") == b"2"   # /get-val still sees the raw value


def test_delete_removes_the_key_and_recreating_starts_at_version_1(engine):
    e = engine()
    e.txn(put(b"k"))
    e.txn(put(b"k"))
    r = e.txn(delete(b"k"))
    assert r.succeeded and r.results[0].deleted == 1 and r.revision == 3
    assert e.store.get_entry(b"k") is None and e.store.get(b"k") is None
    r = e.txn(put(b"k", b"new"))
    assert r.revision == 4 and meta(e, b"k") == (4, 4, 1)


def test_delete_of_a_missing_key_does_not_bump_the_revision(engine):
    e = engine()
    e.txn(put(b"a"))
    r = e.txn(delete(b"missing"))
    assert r.succeeded and r.results[0].deleted == 0 and r.revision == 1 == e.store.revision
    e.run(Write("DELETE", b"missing"))
    assert e.store.revision == 1


def test_original_writes_bump_one_revision_each(engine):
    e = engine()
    assert e.run(Write("SET", b"a", b"1"), Write("SET", b"a", b"2"), Write("SET", b"b", b"x"),
                 Write("DELETE", b"b")) == [None] * 4
    assert e.store.revision == 4
    assert meta(e, b"a") == (1, 2, 2) and e.store.get(b"b") is None
    # original and v1 requests share one keyspace and one revision counter
    r = e.txn(put(b"a", b"3", expect_version=2))
    assert r.succeeded and r.revision == 5 and meta(e, b"a") == (1, 5, 3)


def test_a_txn_shares_one_revision_across_its_keys(engine):
    e = engine()
    e.txn(put(b"x"))
    r = e.txn(put(b"a"), put(b"b"), delete(b"x"), put(b"x", b"back"))
    assert r.succeeded and r.revision == 2 == e.store.revision
    assert [(o.key, o.op) for o in r.results] == [(b"a", PUT), (b"b", PUT), (b"x", DELETE), (b"x", PUT)]
    assert meta(e, b"a") == meta(e, b"b") == (2, 2, 1)
    assert r.results[2].deleted == 1 and meta(e, b"x") == (2, 2, 1)


def test_a_txn_deleting_only_missing_keys_does_not_bump(engine):
    e = engine()
    e.txn(put(b"a"))
    r = e.txn(delete(b"m1"), delete(b"m2"))
    assert r.succeeded and r.revision == 1 and [o.deleted for o in r.results] == [0, 0]


def test_the_same_key_twice_in_one_txn_applies_in_order(engine):
    e = engine()
    r = e.txn(put(b"k", b"1"), put(b"k", b"2"))
    assert [o.version for o in r.results] == [1, 2] and e.store.get(b"k") == b"2"
    assert meta(e, b"k") == (1, 1, 2)
    r = e.txn(put(b"k", b"3"), delete(b"k"))
    assert r.results[1].deleted == 1 and e.store.get(b"k") is None and r.revision == 2
    r = e.txn(delete(b"k"), put(b"k", b"4"))
    assert r.results[0].deleted == 0 and meta(e, b"k") == (3, 3, 1)


# -- conditions ---------------------------------------------------------------------------------

def test_expect_version_zero_is_create_only(engine):
    e = engine()
    assert e.txn(put(b"k", b"1", expect_version=0)).succeeded
    r = e.txn(put(b"k", b"2", expect_version=0))
    assert not r.succeeded and r.failed == (0,) and r.revision == 1
    assert r.current == (CurrentState(True, 1, 1, 1),)
    assert e.store.get(b"k") == b"1" and e.store.revision == 1


@pytest.mark.parametrize("cond, holds", [
    ({"expect_version": 2}, True), ({"expect_version": 1}, False), ({"expect_version": 3}, False),
    ({"expect_mod_revision": 3}, True), ({"expect_mod_revision": 1}, False),
    ({"expect_value": b"second"}, True), ({"expect_value": b"first"}, False),
    ({"expect_value": b"secon"}, False), ({"expect_value": b"xsecond"}, False), ({"expect_value": b""}, False),
    ({"expect_version": 2, "expect_value": b"second", "expect_mod_revision": 3}, True),
    ({"expect_version": 2, "expect_value": b"second", "expect_mod_revision": 2}, False),
])
def test_conditions_on_an_existing_key(engine, cond, holds):
    e = engine()
    e.txn(put(b"k", b"first"))
    e.txn(put(b"other"))
    e.txn(put(b"k", b"second"))          # k: create 1, mod 3, version 2
    r = e.txn(put(b"k", b"third", **cond))
    assert r.succeeded is holds
    if holds:
        assert e.store.get(b"k") == b"third" and r.revision == 4
    else:
        assert e.store.get(b"k") == b"second" and e.store.revision == 3 and r.revision == 3
        assert r.failed == (0,) and r.current == (CurrentState(True, 2, 3, 1),)
    r = e.txn(delete(b"k", **cond))
    assert r.succeeded is (holds and "expect_value" not in cond and "expect_mod_revision" not in cond
                           and cond.get("expect_version") == 3)


@pytest.mark.parametrize("cond, holds", [
    ({"expect_version": 0}, True), ({"expect_version": 1}, False),
    ({"expect_value": b""}, False), ({"expect_mod_revision": 0}, False),
    ({"expect_version": 0, "expect_value": b""}, False),
])
def test_conditions_on_a_missing_key_fail_unless_expect_version_is_zero(engine, cond, holds):
    e = engine()
    e.txn(put(b"x"))
    r = e.txn(delete(b"k", **cond))
    assert r.succeeded is holds
    if holds:
        assert r.results[0].deleted == 0 and r.revision == 1
    else:
        assert r.current == (CurrentState(False, 0, 0, 0),)
    r = e.txn(put(b"k", b"v", **cond))
    assert r.succeeded is holds and (e.store.get(b"k") == b"v") is holds


def test_an_empty_expected_value_matches_an_empty_value(engine):
    e = engine()
    e.txn(put(b"k", b""))
    assert e.txn(put(b"k", b"now", expect_value=b"")).succeeded
    assert not e.txn(put(b"k", b"again", expect_value=b"")).succeeded


def test_a_failed_condition_applies_nothing_and_lists_every_failing_op(engine):
    e = engine()
    e.txn(put(b"a", b"1"), put(b"b", b"1"))
    before = {k: meta(e, k) for k in (b"a", b"b", b"c")}
    r = e.txn(put(b"a", b"2", expect_version=1),      # holds
              put(b"new", b"x"),                       # no condition
              delete(b"b", expect_value=b"wrong"),     # fails
              put(b"c", b"3", expect_version=5))       # fails: c is missing
    assert not r.succeeded and r.failed == (2, 3) and r.results == ()
    assert r.current == (CurrentState(True, 1, 1, 1), CurrentState(False))
    assert {k: meta(e, k) for k in (b"a", b"b", b"c")} == before
    assert e.store.get(b"new") is None and e.store.revision == 1 == r.revision


def test_conditions_see_the_state_before_the_txn(engine):
    e = engine()
    r = e.txn(put(b"k", b"1"), put(b"k", b"2", expect_version=0))
    assert r.succeeded and [o.version for o in r.results] == [1, 2]
    r = e.txn(put(b"k", b"3"), put(b"k", b"4", expect_version=3))   # k is at version 2 before
    assert not r.succeeded and r.failed == (1,) and e.store.get(b"k") == b"2"


def test_requests_of_one_entry_see_each_other_in_order(engine):
    e = engine()
    a, b = e.run((Txn((put(b"k", b"1", expect_version=0),)), None),
                 (Txn((put(b"k", b"2", expect_version=0),)), None))
    assert a.succeeded and not b.succeeded and b.current[0].version == 1
    assert a.revision == b.revision == 1 and a.index == b.index == e.index


# -- exactly-once per request ----------------------------------------------------------------------

def test_a_duplicate_request_answers_the_first_outcome_and_changes_nothing(engine):
    e = engine()
    ident = RequestIdentity("cli", 1, 1)
    first = e.txn(put(b"k", b"1"), put(b"j", b"1"), ident=ident)
    e.txn(put(b"k", b"2"))                                # the state moves on
    dup = e.txn(put(b"k", b"1"), put(b"j", b"1"), ident=ident)
    assert dup.duplicate and not first.duplicate
    assert (dup.succeeded, dup.revision, dup.results) == (first.succeeded, first.revision, first.results)
    assert e.store.get(b"k") == b"2" and meta(e, b"j") == (1, 1, 1) and e.store.revision == 2
    assert e.store.stats.duplicates == 1


def test_a_duplicate_of_a_failed_compare_answers_the_same_failure(engine):
    e = engine()
    e.txn(put(b"k", b"1"))
    ident = RequestIdentity("cli", 7, 1)
    first = e.txn(put(b"k", b"x", expect_version=0), ident=ident)
    assert not first.succeeded
    e.txn(delete(b"k"))                                   # now the compare would hold
    dup = e.txn(put(b"k", b"x", expect_version=0), ident=ident)
    assert dup.duplicate and not dup.succeeded
    assert (dup.revision, dup.failed, dup.current) == (first.revision, first.failed, first.current)
    assert e.store.get(b"k") is None


def test_a_delete_duplicate_answers_deleted_1(engine):
    e = engine()
    e.txn(put(b"k"))
    ident = RequestIdentity("cli", 1, 1)
    assert e.txn(delete(b"k"), ident=ident).results[0].deleted == 1
    dup = e.txn(delete(b"k"), ident=ident)
    assert dup.duplicate and dup.results[0].deleted == 1 and dup.results[0].key == b"k"


def test_a_retry_through_another_node_is_admitted_once(engine):
    """Two engines share the log: node A's proposal applies; node B's retry of the same
    request (another proposal, another engine identity) answers A's outcome on both."""
    a_node = engine("a.db", client="engine:a")
    b_node = engine("b.db", client="engine:b")
    req = (Txn((put(b"k", b"v", expect_version=0),)), RequestIdentity("cli", 3, 3))
    prop_a = Proposal("engine:a", 1, 1, (TxnRequest(*req),))
    prop_b = Proposal("engine:b", 1, 1, (TxnRequest(*req),))
    for node in (a_node, b_node):
        node.store.apply([(1, [prop_a]), (2, [prop_b])])
    (first,) = a_node.outcomes[1]
    (dup,) = b_node.outcomes[1]
    assert first.succeeded and not first.duplicate
    assert dup.duplicate and dup.succeeded and dup.revision == first.revision == 1
    for node in (a_node, b_node):
        assert node.store.revision == 1 and meta(node, b"k") == (1, 1, 1)


def test_a_duplicate_in_the_same_entry(engine):
    e = engine()
    ident = RequestIdentity("cli", 1, 1)
    first, dup = e.run((Txn((put(b"k", b"1"),)), ident), (Txn((put(b"k", b"2"),)), ident))
    assert first.succeeded and dup.duplicate and dup.results[0].version == 1
    assert e.store.get(b"k") == b"1"


def test_a_seq_below_the_floor_is_never_applied_and_says_so(engine):
    e = engine()
    e.txn(put(b"k", b"1"), ident=RequestIdentity("cli", 1, 1))
    e.txn(put(b"k", b"2"), ident=RequestIdentity("cli", 2, 2))      # floor 2: seq 1 forgotten
    late = e.txn(put(b"k", b"late"), ident=RequestIdentity("cli", 1, 1))
    assert isinstance(late, KVError) and late.kind is ErrorKind.BAD_INPUT
    assert "floor 2" in late.message and "not applied again" in late.message
    assert e.store.get(b"k") == b"2" and e.store.revision == 2
    # seqs at or above the floor are still remembered
    assert e.txn(put(b"k", b"x"), ident=RequestIdentity("cli", 2, 2)).duplicate


def test_a_floor_from_a_later_request_forgets_earlier_outcomes(engine):
    e = engine()
    for seq in (1, 2, 3):
        e.txn(put(b"k%d" % seq), ident=RequestIdentity("cli", seq, 1))
    assert set(e.store.sessions.sessions["cli"].outcomes) == {1, 2, 3}
    e.txn(put(b"k4"), ident=RequestIdentity("cli", 4, 3))
    assert set(e.store.sessions.sessions["cli"].outcomes) == {3, 4}


def test_a_client_that_never_raises_its_floor_is_capped(engine):
    e = engine()
    n = MAX_SEQS_PER_CLIENT + 5
    reqs = [(Txn((put(b"k"),)), RequestIdentity("cli", s, 0)) for s in range(1, n + 1)]
    e.run(*reqs)
    sess = e.store.sessions.sessions["cli"]
    assert len(sess.outcomes) == MAX_SEQS_PER_CLIENT and min(sess.outcomes) == 6 and sess.floor == 6
    assert isinstance(e.txn(put(b"k"), ident=RequestIdentity("cli", 5, 0)), KVError)
    assert e.txn(put(b"k"), ident=RequestIdentity("cli", 6, 0)).duplicate


def test_outcomes_and_metadata_survive_reopen(engine, tmp_path):
    e = engine()
    ident = RequestIdentity("cli", 9, 9)
    first = e.txn(put(b"k", b"1"), delete(b"none"), ident=ident)
    e.txn(put(b"k", b"2"))
    e.close()
    e = engine(client="engine:restarted")   # a restarted engine has a new identity
    assert e.store.revision == 2 and e.store.applied_index == 2
    assert e.store.get_entry(b"k") == KeyMeta(b"k", b"2", 1, 2, 2)
    e.index = e.store.applied_index
    dup = e.txn(put(b"k", b"1"), delete(b"none"), ident=ident)
    assert dup.duplicate and dup.results == first.results and dup.revision == first.revision
    assert e.store.get(b"k") == b"2"


def test_a_failed_run_rolls_back_metadata_and_revision(engine):
    e = engine()
    e.txn(put(b"k", b"1"))
    good = Proposal("x", 1, 1, (TxnRequest(Txn((put(b"k", b"2"),)), RequestIdentity("cli", 1, 1)),))
    with pytest.raises(ValueError, match="out of order"):
        e.store.apply([(5, [good]), (4, [])])
    assert e.store.revision == 1 and meta(e, b"k") == (1, 1, 1) and "cli" not in e.store.sessions.sessions
    e.store.apply([(5, [good])])
    assert e.store.revision == 2 and meta(e, b"k") == (1, 2, 2)


def test_every_node_computes_the_same_metadata(engine):
    """Revisions come from the log alone: two stores fed the same entries agree."""
    nodes = [engine("n1.db"), engine("n2.db", client="engine:other")]
    entries = []
    for i in range(1, 40):
        ops = (put(b"k%d" % (i % 5), b"%d" % i, **({"expect_version": 0} if i % 3 == 0 else {})),
               delete(b"k%d" % ((i * 7) % 5)))
        ident = RequestIdentity("c%d" % (i % 2), i, max(1, i - 4))
        entries.append((i, [Proposal("p", i, i, (Write("SET", b"w%d" % (i % 4), b"x"),
                                                 TxnRequest(Txn(ops), ident)))]))
    for n in nodes:
        n.store.apply(entries[:20])
        n.store.apply(entries[20:])
    a, b = (n.store for n in nodes)
    assert a.revision == b.revision > 0
    assert a.scan(b"", None, 100) == b.scan(b"", None, 100)
    assert a.sessions.dump() == b.sessions.dump()


def test_only_this_engines_proposals_are_reported(engine):
    e = engine()
    seen = []
    e.store.set_outcome_sink(ENGINE, lambda seq, index, outs: seen.append((seq, index, outs)))
    ident = RequestIdentity("cli", 1, 1)
    e.store.apply([(1, [Proposal("engine:someone-else", 1, 1, (TxnRequest(Txn((put(b"a"),)), ident),))]),
                   (2, [Proposal(ENGINE, 5, 5, (Write("SET", b"b", b"1"), TxnRequest(Txn((put(b"c"),)), None)))]),
                   (3, [Proposal(ENGINE, 5, 5, (Write("SET", b"b", b"2"),))])])   # a retry: skipped
    assert len(seen) == 1
    seq, index, outs = seen[0]
    assert (seq, index) == (5, 2) and outs[0] is None and outs[1].succeeded and outs[1].revision == 3
    assert e.store.get(b"b") == b"1"


# -- older stores --------------------------------------------------------------------------------

def test_a_store_of_the_older_format_gets_metadata_headers_once(tmp_path):
    path = str(tmp_path / "old.db")
    db = plyvel.DB(path, create_if_missing=True)
    db.put(b"d/a", b"plain")
    db.put(b"d/b", b"")
    db.put(b"m/applied_index", (7).to_bytes(8, "big"))
    db.close()
    s = Store(path)
    try:
        assert s.applied_index == 7 and s.revision == 0
        assert s.get(b"a") == b"plain" and s.get(b"b") == b""
        assert s.get_entry(b"a") == KeyMeta(b"a", b"plain", 0, 0, 1)
        s.apply([(8, [Write("SET", b"a", b"new")])])
        assert s.get_entry(b"a") == KeyMeta(b"a", b"new", 0, 1, 2)
    finally:
        s.close()
    s = Store(path)     # not upgraded twice
    try:
        assert s.get_entry(b"a") == KeyMeta(b"a", b"new", 0, 1, 2) and s.get(b"b") == b""
    finally:
        s.close()


def test_an_interrupted_upgrade_resumes_without_a_second_header(tmp_path, monkeypatch):
    import storage_engine.store as store_mod
    path = str(tmp_path / "old.db")
    db = plyvel.DB(path, create_if_missing=True)
    for i in range(25):
        db.put(b"d/k%02d" % i, b"value-%d" % i)
    db.close()
    monkeypatch.setattr(store_mod, "UPGRADE_BATCH_KEYS", 10)
    real = Store._write_upgrade
    calls = []

    def crash_on_second(self, batch, resume_at):
        calls.append(len(batch))
        if len(calls) == 2:
            raise OSError("simulated crash")
        real(self, batch, resume_at)

    monkeypatch.setattr(Store, "_write_upgrade", crash_on_second)
    with pytest.raises(OSError):
        Store(path)
    monkeypatch.setattr(Store, "_write_upgrade", real)
    s = Store(path)
    try:
        assert len(s) == 25
        assert all(s.get_entry(b"k%02d" % i) == KeyMeta(b"k%02d" % i, b"value-%d" % i, 0, 0, 1) for i in range(25))
    finally:
        s.close()
