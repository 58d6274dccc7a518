"""Tests for the linearizability checker (raftkv.linearizability).

Every accept test has a reject twin (or vice versa) close by, so a checker
that always answers the same way fails the suite.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import threading
import time

import pytest

from raftkv.linearizability import (
    CheckResult,
    History,
    Op,
    check,
    check_by_key,
    dump_ops,
    load_ops,
)


def op(process, kind, key, value, call, ret, status="ok") -> Op:
    return Op(process, kind, key, value, float(call), None if ret is None else float(ret), status)


def s(p, v, call, ret, key="x", status="ok"):
    return op(p, "set", key, v, call, ret, status)


def d(p, call, ret, key="x", status="ok"):
    return op(p, "delete", key, None, call, ret, status)


def g(p, v, call, ret, key="x", status="ok"):
    return op(p, "get", key, v, call, ret, status)


def assert_ok(ops, **kw) -> CheckResult:
    res = check(ops, **kw)
    assert res.ok is True, res.explanation
    assert res.bad_key is None
    return res


def assert_bad(ops, key="x", **kw) -> CheckResult:
    res = check(ops, **kw)
    assert res.ok is False, "expected a violation"
    assert res.bad_key == key
    assert repr(key) in res.explanation
    return res


# ---------------------------------------------------------------- accepts


def test_sequential_history():
    assert_ok(
        [
            g(1, None, 0, 1),
            s(1, "1", 2, 3),
            g(2, "1", 4, 5),
            s(2, "2", 6, 7),
            g(1, "2", 8, 9),
            d(1, 10, 11),
            g(2, None, 12, 13),
        ]
    )


def test_sequential_history_with_wrong_read_rejected():
    assert_bad(
        [
            s(1, "1", 2, 3),
            s(2, "2", 6, 7),
            g(1, "1", 8, 9),
        ]
    )


@pytest.mark.parametrize("seen", ["1", "2"])
def test_concurrent_writes_read_sees_either(seen):
    assert_ok(
        [
            s(1, "1", 0, 10),
            s(2, "2", 1, 9),
            g(3, seen, 11, 12),
        ]
    )


def test_concurrent_writes_then_reads_must_agree_on_winner():
    # After both writes completed, two sequential reads cannot flip back.
    assert_bad(
        [
            s(1, "1", 0, 10),
            s(2, "2", 1, 9),
            g(3, "1", 11, 12),
            g(3, "2", 13, 14),
        ]
    )


@pytest.mark.parametrize("seen", [None, "old", "new"])
def test_read_concurrent_with_write_sees_old_or_new(seen):
    ops = [s(1, "old", 0, 1), s(1, "new", 2, 6), g(2, seen, 3, 4)]
    if seen is None:
        assert_bad(ops)  # "old" was definitely written before the read began
    else:
        assert_ok(ops)


def test_indeterminate_write_later_seen():
    assert_ok(
        [
            s(1, "1", 0, None, status="info"),
            g(2, None, 1, 2),
            g(2, "1", 100, 101),
            g(3, "1", 102, 103),
        ]
    )


def test_indeterminate_write_with_ret_but_info_status_seen_long_after():
    # "info" means outcome unknown, so a recorded ret time must not bound it.
    assert_ok([s(1, "1", 0, 1, status="info"), g(2, None, 2, 3), g(2, "1", 50, 51)])


def test_indeterminate_write_never_seen():
    assert_ok(
        [
            s(1, "1", 0, 1),
            s(2, "2", 2, None, status="info"),
            g(3, "1", 3, 4),
            g(3, "1", 50, 51),
        ]
    )


def test_indeterminate_write_cannot_take_effect_before_its_call():
    assert_bad([g(2, "1", 0, 1), s(1, "1", 2, None, status="info")])


def test_indeterminate_write_takes_effect_at_most_once():
    # Seen, then overwritten, then seen again: a single effect cannot do that.
    assert_bad(
        [
            s(1, "1", 0, None, status="info"),
            g(2, "1", 1, 2),
            s(2, "2", 3, 4),
            g(2, "1", 5, 6),
        ]
    )


def test_delete_then_get_none():
    assert_ok([s(1, "1", 0, 1), d(1, 2, 3), g(2, None, 4, 5)])


def test_delete_then_get_old_value_rejected():
    assert_bad([s(1, "1", 0, 1), d(1, 2, 3), g(2, "1", 4, 5)])


def test_indeterminate_read_is_ignored():
    assert_ok([s(1, "1", 0, 1), g(2, "zzz", 2, None, status="info"), g(2, "zzz", 3, 4, status="fail")])


def test_empty_history():
    res = assert_ok([])
    assert res.per_key_ops == {}


# ---------------------------------------------------------------- rejects


def test_stale_read_after_completed_write():
    res = assert_bad([s(1, "1", 0, 1), g(2, None, 2, 3)])
    assert "<absent>" in res.explanation
    assert "call=2.000000" in res.explanation


def test_stale_read_of_old_value():
    assert_bad([s(1, "0", 0, 1), s(1, "1", 2, 3), g(2, "0", 4, 5)])


def test_stale_read_accepted_when_overlapping():
    assert_ok([s(1, "1", 0, 3), g(2, None, 2, 4)])


def test_lost_acknowledged_write():
    res = assert_bad(
        [
            s(1, "1", 0, 1),
            g(2, "1", 2, 3),
            g(3, None, 4, 5),
        ]
    )
    assert "Longest linearizable prefix found: 2 of 3" in res.explanation


def test_lost_write_accepted_when_a_delete_is_concurrent():
    assert_ok([s(1, "1", 0, 1), g(2, "1", 2, 3), d(4, 2.5, 6), g(3, None, 4, 5)])


def test_read_of_value_never_written():
    res = assert_bad([s(1, "1", 0, 1), g(2, "bogus", 2, 3)])
    assert "never written" in res.explanation
    assert "'bogus'" in res.explanation


def _opposite_orders(reader_b_sees):
    # w1 and w2 are concurrent with each other and with every read; all reads
    # start after both writes were invoked. A reads 1 then 2, so the order
    # must be w1 < A1 < w2 < A2. If B reads 2 then 1 we also need
    # w2 < B1 < w1 < B2; both first reads end (t=2) before both second reads
    # start (t=3), so A1 < B2 and B1 < A2, and w1 < A1 < w2 < B1 < w1 is a
    # cycle: not linearizable. If B reads 1 then 2 it is fine.
    first, second = reader_b_sees
    return [
        s(1, "1", 0, 10),
        s(2, "2", 0, 10),
        g(3, "1", 1, 2),
        g(3, "2", 3, 4),
        g(4, first, 1, 2),
        g(4, second, 3, 4),
    ]


def test_two_readers_see_writes_in_opposite_orders():
    assert_bad(_opposite_orders(("2", "1")))


def test_two_readers_see_writes_in_same_order():
    assert_ok(_opposite_orders(("1", "2")))


def test_failed_write_later_read_is_never_written():
    res = assert_bad([s(1, "1", 0, 1, status="fail"), g(2, "1", 2, 3)])
    assert "never written" in res.explanation
    assert "fail" in res.explanation


def test_info_write_later_read_is_accepted():
    # Twin of the test above: the same history with "info" is fine.
    assert_ok([s(1, "1", 0, 1, status="info"), g(2, "1", 2, 3)])


def test_read_before_value_was_ever_written():
    res = assert_bad([g(2, "1", 0, 1), s(1, "1", 2, 3)])
    assert "before any write" in res.explanation


def test_indeterminate_delete_explains_late_absent_read_once():
    base = [
        s(1, "1", 0, 1),
        d(2, 2, None, status="info"),
        g(3, "1", 3, 4),
        g(3, None, 10, 11),  # the indeterminate delete landed after all
    ]
    assert_ok(base)
    # ...but it can only land once: "1" cannot come back without a write.
    assert_bad(base + [g(3, "1", 12, 13)])


def test_indeterminate_deletes_each_used_at_most_once():
    ops = [
        s(1, "1", 0, 1),
        d(2, 2, None, status="info"),
        d(3, 2.5, None, status="info"),
        g(4, None, 3, 4),
        s(4, "2", 5, 6),
        g(4, None, 7, 8),  # needs the second indeterminate delete
    ]
    assert_ok(ops)
    assert_bad([o for o in ops if o.process != 3])
    # An unread write inside the last read's interval is fine: the second
    # indeterminate delete can land after it.
    assert_ok(ops + [s(5, "3", 7.5, 7.6)])
    # Not if it must land after the read, though.
    assert_bad(ops + [s(5, "3", 7.5, 7.6), g(4, None, 9, 10), s(6, "4", 9.5, 9.6), g(4, None, 11, 12)])


# ---------------------------------------------------------------- per key


def test_keys_are_independent_and_bad_key_reported():
    ops = [
        s(1, "1", 0, 1, key="a"),
        g(2, "1", 2, 3, key="a"),
        s(1, "1", 0, 1, key="b"),
        g(2, None, 2, 3, key="b"),  # stale read on b
        s(3, "9", 0, 1, key="c"),
        g(3, "9", 2, 3, key="c"),
    ]
    res = check(ops)
    assert res.ok is False
    assert res.bad_key == "b"
    assert "'b'" in res.explanation
    assert res.per_key_ops == {"a": 2, "b": 2, "c": 2}

    by_key = check_by_key(ops)
    assert by_key["a"].ok is True and by_key["c"].ok is True
    assert by_key["b"].ok is False and by_key["b"].bad_key == "b"

    # Same ops on one key would not be linearizable either, but values on
    # different keys never constrain each other:
    assert_ok([s(1, "1", 0, 1, key="a"), g(2, None, 2, 3, key="b")])


def test_per_key_ops_counts_checked_ops():
    res = assert_ok(
        [
            s(1, "1", 0, 1, key="a"),
            s(1, "2", 2, 3, key="a", status="fail"),  # dropped
            g(2, "1", 4, None, key="a", status="info"),  # dropped
            s(3, "never-read", 4, None, key="a", status="info"),  # unobservable
            g(2, None, 0, 1, key="b"),
        ]
    )
    assert res.per_key_ops == {"a": 1, "b": 1}


# ---------------------------------------------------------------- generated


def simulate(
    seed: int,
    n_ops: int,
    keys: list[str],
    processes: int = 5,
    p_info: float = 0.03,
    p_fail: float = 0.03,
) -> list[Op]:
    """A linearizable history from a simulated atomic register per key.

    Each op gets a random interval and a linearization point inside it (an
    indeterminate write may take effect any time after its call, or never);
    reads return the register state at their point in linearization order.
    Clients replace their process id after an indeterminate op, as Jepsen does.
    """
    rng = random.Random(seed)
    free_at = [0.0] * processes
    pid = list(range(processes))
    next_pid = processes
    planned = []  # [lin_point or None, process, kind, key, value, call, ret, status]
    counter = 0
    for _ in range(n_ops):
        slot = min(range(processes), key=lambda i: free_at[i])
        call = free_at[slot] + rng.uniform(0.0, 0.004)
        ret = call + rng.expovariate(1 / 0.01)
        kind = rng.choices(["set", "delete", "get"], weights=[4, 1, 5])[0]
        key = rng.choice(keys)
        value = None
        if kind == "set":
            counter += 1
            value = f"v{counter}"
        r = rng.random()
        status = "info" if r < p_info else "fail" if r < p_info + p_fail else "ok"
        lp: float | None = rng.uniform(call, ret)
        if status == "fail":
            lp = None if kind != "get" else lp
        if status == "info":
            lp = rng.uniform(call, call + 5 * (ret - call)) if rng.random() < 0.5 else None
            ret_rec = None if rng.random() < 0.7 else ret
        else:
            ret_rec = ret
        planned.append([lp, pid[slot], kind, key, value, call, ret_rec, status])
        free_at[slot] = ret
        if status == "info":
            pid[slot] = next_pid
            next_pid += 1

    state: dict[str, str | None] = {}
    for p in sorted((p for p in planned if p[0] is not None), key=lambda p: p[0]):
        _, _, kind, key, value, *_ = p
        if kind == "set":
            state[key] = value
        elif kind == "delete":
            state[key] = None
        else:
            p[4] = state.get(key)
    ops = []
    for lp, proc, kind, key, value, call, ret, status in planned:
        if kind == "get" and status != "ok":
            value = None if status == "fail" else value
        ops.append(Op(proc, kind, key, value, call, ret, status))
    return ops


@pytest.mark.parametrize("seed", range(12))
def test_random_linearizable_histories_accepted(seed):
    keys = ["k0", "k1", "k2"][: 1 + seed % 3]
    ops = simulate(seed, 600, keys, processes=2 + seed % 5)
    assert any(o.status == "info" for o in ops)
    res = assert_ok(ops, timeout=60)
    assert sum(res.per_key_ops.values()) > 300


@pytest.mark.parametrize("seed", range(6))
def test_random_history_with_injected_stale_read_rejected(seed):
    ops = simulate(100 + seed, 800, ["k0", "k1"], processes=4)
    end = max(o.ret or o.call for o in ops) + 1.0
    # A fresh write acknowledged after everything else, then a read of an
    # older value: must be caught even at the very end of a long history.
    # (Reading None would be legal: an indeterminate delete may land late.)
    # Values are unique, so the old value's only writer is that ok set.
    old = [o for o in ops if o.key == "k1" and o.kind == "set" and o.status == "ok"][-1]
    ops += [s(900, "fresh", end, end + 1, key="k1"), g(901, old.value, end + 2, end + 3, key="k1")]
    res = assert_bad(ops, key="k1", timeout=60)
    assert "'fresh'" in res.explanation and repr(old.value) in res.explanation


def test_random_history_with_unwritten_read_rejected():
    ops = simulate(7, 500, ["k0"], processes=5)
    i = next(i for i, o in enumerate(ops) if o.kind == "get" and o.status == "ok" and o.value)
    ops[i] = Op(ops[i].process, "get", "k0", "nobody-wrote-this", ops[i].call, ops[i].ret, "ok")
    assert_bad(ops, key="k0")


def _brute_force(ops: list[Op]) -> bool:
    """Reference: try every order of every subset of indeterminate writes."""
    ops = [o for o in ops if o.status != "fail" and not (o.kind == "get" and o.indeterminate)]
    ret = [math.inf if o.indeterminate else o.ret for o in ops]
    must = [i for i, o in enumerate(ops) if not o.indeterminate]
    maybe = [i for i, o in enumerate(ops) if o.indeterminate]
    for r in range(len(maybe) + 1):
        for extra in itertools.combinations(maybe, r):
            for order in itertools.permutations(must + list(extra)):
                if any(
                    ret[order[b]] < ops[order[a]].call
                    for a in range(len(order))
                    for b in range(a + 1, len(order))
                ):
                    continue
                state: dict[str, str | None] = {}
                for i in order:
                    o = ops[i]
                    if o.kind == "get":
                        if state.get(o.key) != o.value:
                            break
                    else:
                        state[o.key] = o.value
                else:
                    return True
    return False


def test_agrees_with_brute_force_on_small_random_histories():
    rng = random.Random(2024)
    verdicts = {True: 0, False: 0}
    for _ in range(400):
        ops = []
        weight_ok = rng.choice([1, 3, 6])
        for p in range(rng.randint(1, 6)):
            call = rng.randint(0, 8)
            kind = rng.choice(["set", "get", "get", "delete"])
            status = rng.choices(["ok", "info", "fail"], [weight_ok, 3, 1])[0]
            if kind == "set":
                value = rng.choice(["1", "2", "3"])  # "3" is never read
            elif kind == "get":
                value = rng.choice(["1", "2", None])
            else:
                value = None
            ret = None if status == "info" and rng.random() < 0.5 else call + rng.randint(0, 4)
            ops.append(op(p, kind, rng.choice(["x", "x", "y"]), value, call, ret, status))
        expected = _brute_force(ops)
        assert check(ops).ok is expected, ops
        verdicts[expected] += 1
    assert min(verdicts.values()) > 100  # both verdicts well exercised


def test_threaded_clients_on_real_register():
    hist = History()
    register: dict[str, str | None] = {}
    lock = threading.Lock()

    def client(p: int) -> None:
        rng = random.Random(p)
        for n in range(150):
            key = rng.choice(["a", "b"])
            kind = rng.choices(["set", "delete", "get"], weights=[4, 1, 5])[0]
            value = f"{p}-{n}" if kind == "set" else None
            h = hist.invoke(p, kind, key, value)
            with lock:  # the register's linearization point
                if kind == "set":
                    register[key] = value
                elif kind == "delete":
                    register.pop(key, None)
                else:
                    value = register.get(key)
            if kind == "get":
                hist.ok(h, value)
            else:
                hist.ok(h)

    threads = [threading.Thread(target=client, args=(p,)) for p in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(hist) == 750
    res = hist.check(timeout=60)
    assert res.ok is True, res.explanation


def test_asyncio_clients_and_jsonl_roundtrip(tmp_path):
    hist = History()
    register: dict[str, str | None] = {}

    async def client(p: int) -> None:
        rng = random.Random(p)
        for n in range(60):
            kind = rng.choice(["set", "get", "delete"])
            value = f"{p}-{n}" if kind == "set" else None
            h = hist.invoke(p, kind, "x", value)
            await asyncio.sleep(rng.uniform(0, 0.001))
            if rng.random() < 0.1 and kind != "get":
                hist.info(h)  # took effect?  maybe.
                if rng.random() < 0.5:
                    register["x"] = value
                return
            if kind == "set":
                register["x"] = value
            elif kind == "delete":
                register["x"] = None
            else:
                value = register.get("x")
            await asyncio.sleep(rng.uniform(0, 0.001))
            hist.ok(h, value if kind == "get" else None)

    async def main() -> None:
        await asyncio.gather(*(client(p) for p in range(5)))

    asyncio.run(main())
    assert hist.check().ok is True

    path = tmp_path / "h.jsonl"
    hist.to_jsonl(path)
    loaded = History.from_jsonl(path)
    assert loaded.ops == hist.ops
    assert load_ops(path) == hist.ops

    # Corrupt one read in the saved file: the reloaded history is rejected.
    ops = load_ops(path)
    i = next(i for i, o in enumerate(ops) if o.kind == "get" and o.status == "ok")
    ops[i] = Op(ops[i].process, "get", "x", "corrupt", ops[i].call, ops[i].ret, "ok")
    dump_ops(ops, path)
    assert History.from_jsonl(path).check().ok is False


def test_history_recorder_statuses_and_misuse():
    t = iter(range(100))
    hist = History(clock=lambda: float(next(t)))
    h1 = hist.invoke(1, "set", "x", "1")
    with pytest.raises(ValueError):
        hist.invoke(1, "get", "x")  # one outstanding op per process
    hist.fail(h1)
    with pytest.raises(KeyError):
        hist.ok(h1)
    h2 = hist.invoke(1, "set", "x", "2")
    hist.info(h2)
    h3 = hist.invoke(2, "get", "x")
    hist.ok(h3, "2")
    h4 = hist.invoke(3, "delete", "x")  # left outstanding
    ops = hist.ops
    assert [(o.kind, o.value, o.status, o.ret) for o in ops] == [
        ("set", "1", "fail", 2.0),
        ("set", "2", "info", None),
        ("get", "2", "ok", 6.0),  # clock ticks 1 and 3 went to refused calls
        ("delete", None, "info", None),
    ]
    assert hist.check().ok is True
    hist.ok(h4)
    with pytest.raises(ValueError):
        hist.invoke(4, "get", "x", "v")
    with pytest.raises(ValueError):
        Op(1, "get", "x", None, 2.0, 1.0, "ok")


def test_timeout_reports_unknown():
    ops = simulate(3, 2000, ["k0", "k1"], processes=5)
    res = check(ops, timeout=0.0)
    assert res.ok is None
    assert res.bad_key is None
    assert "timed out" in res.explanation


# ---------------------------------------------------------------- performance


def test_performance_5000_ops_5_processes():
    ops = simulate(42, 6000, ["a", "b", "c"], processes=5)
    t0 = time.monotonic()
    res = check(ops, timeout=60)
    elapsed = time.monotonic() - t0
    assert res.ok is True, res.explanation
    assert sum(res.per_key_ops.values()) >= 5000
    assert elapsed < 10.0, f"took {elapsed:.2f}s"


def test_performance_hot_key_10_processes_late_violation():
    # One hot key, 10 clients, indeterminate ops, and a stale read at the very
    # end: the search must exhaust the history to reject it.
    ops = simulate(44, 3000, ["hot"], processes=10, p_info=0.05)
    t0 = time.monotonic()
    res = check(ops, timeout=60)
    accept_time = time.monotonic() - t0
    assert res.ok is True, res.explanation
    end = max(o.ret or o.call for o in ops) + 1.0
    old = [o for o in ops if o.kind == "set" and o.status == "ok"][-1]
    ops += [s(900, "fresh", end, end + 1, key="hot"), g(901, old.value, end + 2, end + 3, key="hot")]
    t0 = time.monotonic()
    res = check(ops, timeout=60)
    reject_time = time.monotonic() - t0
    assert res.ok is False, res.explanation
    assert accept_time < 10.0 and reject_time < 30.0, (accept_time, reject_time)


def test_performance_20000_ops_10_keys():
    ops = simulate(43, 20000, [f"k{i}" for i in range(10)], processes=6)
    t0 = time.monotonic()
    res = check(ops, timeout=120)
    elapsed = time.monotonic() - t0
    assert res.ok is True, res.explanation
    assert elapsed < 20.0, f"took {elapsed:.2f}s"
