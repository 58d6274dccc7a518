"""Linearizability checker for recorded key-value client histories.

Fault-injection tests record what every client asked for and what it was told
(a *history*) and then ask one question: is there a single order of the
operations, consistent with real time, in which a plain register per key would
have produced exactly the answers the clients saw? This module answers it.

The search is Wing & Gong's algorithm with Lowe's memoization, as in Porcupine:
the history becomes a doubly linked list of call/return entries sorted by time;
a depth-first search repeatedly "linearizes" (lifts out) a call whose effect
is legal in the current state, and backtracks when it meets the return of an
op that was never linearized. Visited (linearized-set, state) pairs are cached
so no configuration is explored twice. Keys are independent registers, so each
key is checked on its own (P-compositionality), which keeps every search small.
On top of that the search takes a few provably safe shortcuts (see _search),
e.g. a read that matches the current state is linearized without branching.

Indeterminate writes (status "info", or no return time) are handled as in
Jepsen/Knossos: their return is at +infinity, so they may take effect at any
point after their call, or never (an unobserved effect at the end of the order
is the same as never). Failed ops definitely did not happen and are dropped;
indeterminate reads carry no information and are dropped too.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

__all__ = [
    "Op",
    "CheckResult",
    "History",
    "check",
    "check_by_key",
    "check_key",
    "dump_ops",
    "load_ops",
]

KINDS = ("set", "delete", "get")
STATUSES = ("ok", "fail", "info")

_SET, _DELETE, _GET = 0, 1, 2
_KIND_CODE = {"set": _SET, "delete": _DELETE, "get": _GET}

# How many search steps run between deadline checks (a power of two minus 1,
# used as a mask); time.monotonic() on every step would dominate the search.
_DEADLINE_MASK = 0x3FF

# How a search decision was made; only _CHOICE has alternatives to explore.
_CHOICE, _FORCED_READ, _EXPIRED, _ABSORBED = 0, 1, 2, 3


@dataclass(frozen=True)
class Op:
    """One client operation as observed from outside the store.

    ``value`` is the value written for a set, the value read for a get (None =
    key absent) and None for a delete. ``ret`` None means the client never
    learned the outcome; such an op is indeterminate whatever its status says.
    """

    process: int
    kind: str
    key: str
    value: str | None
    call: float
    ret: float | None
    status: str

    def __post_init__(self) -> None:
        # Catch recorder bugs here rather than as baffling checker verdicts.
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")
        if self.status not in STATUSES:
            raise ValueError(f"unknown op status {self.status!r}")
        if self.kind == "delete" and self.value is not None:
            raise ValueError("a delete carries no value")
        if self.kind == "set" and self.value is None:
            raise ValueError("a set needs a value")
        if self.ret is not None and self.ret < self.call:
            raise ValueError(f"op returns ({self.ret}) before its call ({self.call})")

    @property
    def indeterminate(self) -> bool:
        """True when the op may or may not have taken effect."""
        return self.status == "info" or self.ret is None

    def describe(self) -> str:
        """Human-readable one-liner used in violation explanations."""
        if self.kind == "set":
            what = f"set({self.key!r}, {self.value!r})"
        elif self.kind == "delete":
            what = f"delete({self.key!r})"
        else:
            what = f"get({self.key!r}) -> {_fmt_value(self.value)}"
        ret = "never returned" if self.indeterminate else f"{self.ret:.6f}"
        return (
            f"process {self.process} {what} [{self.status}] "
            f"call={self.call:.6f} ret={ret}"
        )


@dataclass
class CheckResult:
    """Verdict for a whole history (or, from check_by_key, for one key).

    ``ok`` is None when the search ran out of time before deciding.
    ``per_key_ops`` counts the ops actually searched per key, i.e. after
    dropping failed ops, indeterminate reads and unobservable indeterminate
    writes.
    """

    ok: bool | None
    bad_key: str | None = None
    explanation: str = ""
    per_key_ops: dict[str, int] = field(default_factory=dict)


class _Unread:
    """Register state standing for any value that no read returned.

    Not a str, so it compares equal to nothing a read could return.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unread>"


_UNREAD: Any = _Unread()


def _fmt_value(value: str | None) -> str:
    if value is None:
        return "<absent>"
    if value is _UNREAD:
        return "<a value no read returned>"
    return repr(value)


# --------------------------------------------------------------------------
# Preparation: drop what carries no information, catch the obvious lies.
# --------------------------------------------------------------------------


def _prepare(ops: Iterable[Op]) -> list[Op]:
    """Keep only the ops that constrain the search.

    An indeterminate write whose value no read returned after the write's
    call can always be linearized "never": in any legal order containing it,
    no read sits between it and the next write (that read would return its
    value), so removing it keeps the order legal. Dropping such writes up
    front matters because each one stays concurrent with the rest of the
    history and would multiply the search space.
    """
    kept = [
        op
        for op in ops
        if op.status != "fail" and not (op.kind == "get" and op.indeterminate)
    ]
    last_read: dict[str | None, float] = {}
    for op in kept:
        if op.kind == "get" and op.ret > last_read.get(op.value, -math.inf):  # type: ignore[operator]
            last_read[op.value] = op.ret  # type: ignore[assignment]
    return [
        op
        for op in kept
        if not (
            op.indeterminate
            and op.kind != "get"
            and last_read.get(op.value, -math.inf) < op.call
        )
    ]


def _quick_violation(key: str, ops: list[Op], all_ops: list[Op]) -> str | None:
    """Explain reads that no order can justify, without searching.

    These are the commonest bugs (reading garbage, reading a failed write,
    reading a value before anyone tried to write it) and they deserve a
    clearer message than a generic search dead end. ``ops`` are the
    prepared ops, ``all_ops`` the key's ops before dropping anything.
    """
    failed = [op for op in all_ops if op.status == "fail"]
    first_write_call: dict[str, float] = {}
    for op in all_ops:
        if op.kind == "set" and op.status != "fail":
            prev = first_write_call.get(op.value)  # type: ignore[arg-type]
            if prev is None or op.call < prev:
                first_write_call[op.value] = op.call  # type: ignore[index]
    for op in sorted(ops, key=lambda o: o.call):
        if op.kind != "get" or op.value is None:
            continue
        first = first_write_call.get(op.value)
        if first is None:
            failed_writers = [
                f for f in failed if f.kind == "set" and f.value == op.value
            ]
            msg = (
                f"key {key!r} is not linearizable: a read returned a value that "
                f"was never written to this key.\n  read: {op.describe()}"
            )
            if failed_writers:
                msg += (
                    "\n  the only writes of that value failed (status 'fail' "
                    "means definitely not applied):"
                )
                msg += "".join(f"\n    {f.describe()}" for f in failed_writers[:5])
            return msg
        if op.ret is not None and op.ret < first:
            return (
                f"key {key!r} is not linearizable: a read returned "
                f"{op.value!r} before any write of that value was invoked "
                f"(first such write called at {first:.6f}).\n  read: {op.describe()}"
            )
    return None


# --------------------------------------------------------------------------
# The WGL search for one key.
# --------------------------------------------------------------------------


def _memo_key(
    lin_def: int, lin_opt: int, state: Any
) -> tuple[int, int, int, Any]:
    """Compact, lossless cache key for a search configuration.

    Every definite op whose return has passed is decided, and ops are
    indexed in call order, so the definite bitset is a long run of ones
    plus a short sparse tail: store (run length, tail) instead of n/8 bytes
    per entry. Indeterminate writes stay undecided for long stretches, which
    is why they live in their own (small) bitset instead of cutting the run.
    """
    low = (~lin_def & (lin_def + 1)).bit_length()  # bits below low-1 are all 1
    return (low, lin_def >> low, lin_opt, state)


@dataclass
class _Outcome:
    ok: bool | None
    explanation: str = ""


def _search(key: str, ops: list[Op], deadline: float | None) -> _Outcome:
    """Wing & Gong search with Lowe's memoization over one key's register.

    Iterative on purpose: histories have thousands of ops per key and the
    search depth equals the number of linearized ops. Plain WGL explodes on
    indeterminate writes (each stays concurrent with the rest of the
    history) and on many concurrent clients, so it is pruned by moves that
    provably lose no linearization:

    * Reads first. A read whose value matches the state and that nothing
      pending must precede can go next in some valid order if any exists
      (it changes no state), so it is taken without branching.
    * Unread writes are absorbed. A write whose value no read returns can
      only be followed by another write (or nothing), so it can take effect
      just before whichever write is chosen next; all pending ones do so
      at once, and they share a single "unread" register state.
    * Indeterminate writes only right before a read of their value: one
      followed by anything else might as well never have happened.
    * Expiry. Placing an indeterminate write w of value v after every read
      of v is pointless for the same reason, so w expires ("never took
      effect") at the latest return of a read of v.
    * Symmetry. Indeterminate writes with the same value are interchangeable
      and share one expiry, so only the earliest-called pending one may be
      tried: the search counts how many took effect, not which.
    """
    n = len(ops)
    if n == 0:
        return _Outcome(True)
    ops = sorted(ops, key=lambda o: o.call)  # index order == call order

    kind = [_KIND_CODE[op.kind] for op in ops]
    definite = [not op.indeterminate for op in ops]
    read_values = {op.value for op in ops if op.kind == "get"}
    value: list[Any] = [
        _UNREAD if op.kind == "set" and op.value not in read_values else op.value
        for op in ops
    ]
    has_unread = any(v is _UNREAD for v in value)  # only definite sets do

    # Decided ops are tracked in two bitsets, definite and indeterminate,
    # each indexed in call order; see _memo_key for why.
    bit = [0] * n
    n_def = n_opt = 0
    for i in range(n):
        if definite[i]:
            bit[i] = 1 << n_def
            n_def += 1
        else:
            bit[i] = 1 << n_opt
            n_opt += 1

    last_read: dict[Any, float] = {}
    for op in ops:
        if op.kind == "get":  # _prepare kept only definite reads
            t = last_read.get(op.value)
            if t is None or op.ret > t:  # type: ignore[operator]
                last_read[op.value] = op.ret  # type: ignore[assignment]

    # Entries sorted by (time, rank, op): at equal times calls (rank 0) come
    # first so ops touching at an instant count as concurrent (the permissive
    # reading); expiries (rank 2) come after returns (rank 1), so every read
    # of the value has been linearized when its writer expires.
    events: list[tuple[float, int, int]] = []
    prev_same = [-1] * n  # previous interchangeable indeterminate write
    last_of_class: dict[tuple[int, Any], int] = {}
    for i, op in enumerate(ops):
        events.append((op.call, 0, i))
        if definite[i]:
            events.append((op.ret, 1, i))  # type: ignore[arg-type]
        else:
            # _prepare guarantees a read of the value returns after the call.
            events.append((last_read[value[i]], 2, i))
            cls = (kind[i], value[i])
            prev_same[i] = last_of_class.get(cls, -1)
            last_of_class[cls] = i
    events.sort()

    # Doubly linked entry list with sentinels head=0 and tail=2n+1.
    m = 2 * n
    head = 0
    nxt = list(range(1, m + 2)) + [-1]
    prv = [-1] + list(range(0, m + 1))
    op_of = [-1] * (m + 2)
    rank = [1] * (m + 2)  # sentinels rank as returns: scans stop there
    match = [-1] * (m + 2)  # call entry -> its return/expiry entry
    call_pos = [0] * n
    for pos, (_t, r, i) in enumerate(events, start=1):
        op_of[pos] = i
        rank[pos] = r
        if r == 0:
            call_pos[i] = pos
        else:
            match[call_pos[i]] = pos

    def lift(e: int) -> None:
        """Unlink a call entry and its return (undone by unlift, LIFO)."""
        p, q = prv[e], nxt[e]
        nxt[p] = q
        prv[q] = p
        x = match[e]
        p, q = prv[x], nxt[x]
        nxt[p] = q
        prv[q] = p

    state: Any = None
    lin_def = 0  # decided definite ops
    lin_opt = 0  # decided indeterminate writes (took effect, or expired)
    # (call entry, state before, how decided) for every decision, newest last
    stack: list[tuple[int, Any, int]] = []
    cache: set[tuple[int, int, int, Any]] = set()
    remaining = n_def  # definite ops still to linearize
    entry = nxt[head]
    fresh = True  # entry is at the head of a configuration not yet scanned
    steps = 0

    best_depth = -1
    best_stack: list[tuple[int, Any, int]] = []
    best_state: Any = None
    best_block = -1
    best_pending: list[int] = []

    while remaining:
        steps += 1
        if (
            deadline is not None
            and not steps & _DEADLINE_MASK
            and time.monotonic() > deadline
        ):
            return _Outcome(
                None,
                f"key {key!r}: timed out after {steps} search steps "
                f"({n} ops, deepest prefix {max(best_depth, 0)})",
            )
        r = rank[entry]
        if fresh:
            fresh = False
            e = entry
            while rank[e] != 1:  # the window: calls before the first return
                if rank[e] == 0:
                    i = op_of[e]
                    if kind[i] == _GET and value[i] == state:
                        break
                e = nxt[e]
            if rank[e] == 0:  # a legal read: forced move
                new_def = lin_def | bit[i]
                ckey = _memo_key(new_def, lin_opt, state)
                if ckey in cache:
                    r = -1  # explored already: dead end
                else:
                    cache.add(ckey)
                    stack.append((e, state, _FORCED_READ))
                    lin_def = new_def
                    remaining -= 1  # reads kept by _prepare are definite
                    lift(e)
                    entry = nxt[head]
                    fresh = True
                    continue
        if r == 0:
            i = op_of[entry]
            k = kind[i]
            new_def, new_opt = lin_def, lin_opt
            absorbed: list[int] = []
            if k == _GET:
                # Legal reads were taken by the forced move above.
                legal = False
                new_state = state
            elif definite[i]:
                legal = True
                new_state = value[i] if k == _SET else None
                new_def |= bit[i]
                if has_unread:
                    e = nxt[head]
                    while rank[e] != 1:
                        if rank[e] == 0 and e != entry:
                            j = op_of[e]
                            if value[j] is _UNREAD:
                                absorbed.append(e)
                                new_def |= bit[j]
                        e = nxt[e]
            else:
                new_state = value[i] if k == _SET else None
                new_opt |= bit[i]
                legal = False
                j = prev_same[i]
                if j < 0 or lin_opt & bit[j]:
                    e = nxt[head]
                    while rank[e] != 1:
                        if rank[e] == 0:
                            j = op_of[e]
                            if kind[j] == _GET and value[j] == new_state:
                                legal = True
                                break
                        e = nxt[e]
            if legal:
                ckey = _memo_key(new_def, new_opt, new_state)
                if ckey not in cache:
                    cache.add(ckey)
                    stack.append((entry, state, _CHOICE))
                    lift(entry)
                    for e in absorbed:
                        stack.append((e, state, _ABSORBED))
                        lift(e)
                    remaining -= len(absorbed) + definite[i]
                    state = new_state
                    lin_def, lin_opt = new_def, new_opt
                    entry = nxt[head]
                    fresh = True
                    continue
            entry = nxt[entry]
            continue
        if r == 2:
            # Expiry of an indeterminate write: it never took effect. Every
            # call before this entry was already refuted in this
            # configuration, so the scan resumes right after it.
            i = op_of[entry]
            new_opt = lin_opt | bit[i]
            ckey = _memo_key(lin_def, new_opt, state)
            if ckey not in cache:
                cache.add(ckey)
                c = nxt[entry]
                stack.append((call_pos[i], state, _EXPIRED))
                lift(call_pos[i])
                lin_opt = new_opt
                entry = c
                continue
        # The return of an op not yet linearized, or a forced move already
        # explored: this configuration is a dead end, so undo decisions.
        depth = len(stack)
        if depth > best_depth:
            best_depth = depth
            best_stack = list(stack)
            best_state = state
            best_pending = []
            e = nxt[head]
            while rank[e] != 1:
                if rank[e] == 0:
                    best_pending.append(op_of[e])
                e = nxt[e]
            best_block = op_of[e]  # the first return still pending
        while True:
            if not stack:
                return _Outcome(
                    False,
                    _explain(key, ops, best_stack, op_of, best_state, best_block, best_pending),
                )
            entry, state, how = stack.pop()
            i = op_of[entry]
            if definite[i]:
                lin_def ^= bit[i]
                remaining += 1
            else:
                lin_opt ^= bit[i]
            # unlift: relink the return, then the call
            x = match[entry]
            nxt[prv[x]] = x
            prv[nxt[x]] = x
            nxt[prv[entry]] = entry
            prv[nxt[entry]] = entry
            if how == _CHOICE:
                entry = nxt[entry]
                break
            # A forced move failed, so its configuration is exhausted too.

    return _Outcome(True)


def _explain(
    key: str,
    ops: list[Op],
    stack: list[tuple[int, Any, int]],
    op_of: list[int],
    state: Any,
    block: int,
    pending: list[int],
) -> str:
    """Describe the deepest dead end the search reached."""
    seq: list[int] = []
    choice_at = 0
    for e, _, how in stack:
        if how == _ABSORBED:  # took effect just before the preceding choice
            seq.insert(choice_at, op_of[e])
            choice_at += 1
        elif how != _EXPIRED:
            choice_at = len(seq)
            seq.append(op_of[e])
    if state is _UNREAD:  # the search merged unread values; name the real one
        last_set = next((ops[i] for i in reversed(seq) if ops[i].kind == "set"), None)
        if last_set is not None:
            state = last_set.value
    lines = [
        f"key {key!r} is not linearizable ({len(ops)} ops checked).",
        f"Longest linearizable prefix found: {len(seq)} of {len(ops)} ops; "
        f"register state after it: {_fmt_value(state)}.",
    ]
    tail_n = 8
    if seq:
        shown = seq[-tail_n:]
        lines.append(
            f"Last {len(shown)} ops of that prefix, in linearization order:"
        )
        lines.extend(f"  {ops[i].describe()}" for i in shown)
    lines.append(
        "Could not linearize this op before its return (no order of the ops "
        "still pending is consistent):"
    )
    lines.append(f"  {ops[block].describe()}")
    others = [i for i in pending if i != block]
    if others:
        lines.append(f"Ops pending at that point ({len(others)}, up to 10 shown):")
        for i in others[:10]:
            op = ops[i]
            why = ""
            if op.kind == "get" and op.value != state:
                why = f"  (reads {_fmt_value(op.value)}, state is {_fmt_value(state)})"
            lines.append(f"  {op.describe()}{why}")
    b = ops[block]
    if b.kind == "get" and b.value != state:
        lines.append(
            f"The blocked read returned {_fmt_value(b.value)} but the register "
            f"held {_fmt_value(state)}: a stale, lost or out-of-order value."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------


def _group(ops: Iterable[Op]) -> dict[str, list[Op]]:
    by_key: dict[str, list[Op]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    return by_key


def check_key(key: str, ops: list[Op], deadline: float | None = None) -> CheckResult:
    """Check one key's ops (all must be on ``key``) against a register.

    ``deadline`` is an absolute time.monotonic() value shared across keys.
    """
    prepared = _prepare(ops)
    counts = {key: len(prepared)}
    if deadline is not None and time.monotonic() >= deadline:
        return CheckResult(None, None, f"key {key!r}: not checked (timed out)", counts)
    quick = _quick_violation(key, prepared, ops)
    if quick is not None:
        return CheckResult(False, key, quick, counts)
    out = _search(key, prepared, deadline)
    return CheckResult(
        out.ok, key if out.ok is False else None, out.explanation, counts
    )


def _ordered_keys(by_key: dict[str, list[Op]]) -> list[str]:
    # Small keys first: a cheap violation is found before an expensive search.
    return sorted(by_key, key=lambda k: (len(by_key[k]), k))


def check_by_key(
    ops: list[Op], timeout: float | None = None
) -> dict[str, CheckResult]:
    """Check every key independently and return each key's verdict."""
    deadline = None if timeout is None else time.monotonic() + timeout
    by_key = _group(ops)
    return {key: check_key(key, by_key[key], deadline) for key in _ordered_keys(by_key)}


def check(ops: list[Op], timeout: float | None = None) -> CheckResult:
    """Decide whether ``ops`` is linearizable for a per-key register model.

    Stops at the first key with a violation. With a ``timeout`` (seconds,
    for the whole history), undecided keys make the verdict None unless some
    other key is definitely violated.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    by_key = _group(ops)
    per_key: dict[str, int] = {}
    unknown: list[str] = []
    for key in _ordered_keys(by_key):
        res = check_key(key, by_key[key], deadline)
        per_key.update(res.per_key_ops)
        if res.ok is False:
            for other in by_key:  # report counts for every key, checked or not
                per_key.setdefault(other, len(_prepare(by_key[other])))
            return CheckResult(False, key, res.explanation, per_key)
        if res.ok is None:
            unknown.append(key)
    if unknown:
        return CheckResult(
            None,
            None,
            "timed out before deciding key(s): " + ", ".join(map(repr, unknown)),
            per_key,
        )
    return CheckResult(
        True, None, f"linearizable ({sum(per_key.values())} ops, {len(per_key)} keys)", per_key
    )


# --------------------------------------------------------------------------
# Recording and persistence.
# --------------------------------------------------------------------------


def _op_to_json(op: Op) -> str:
    return json.dumps(asdict(op), sort_keys=True)


def _op_from_json(line: str) -> Op:
    d = json.loads(line)
    return Op(
        process=int(d["process"]),
        kind=d["kind"],
        key=d["key"],
        value=d.get("value"),
        call=float(d["call"]),
        ret=None if d.get("ret") is None else float(d["ret"]),
        status=d["status"],
    )


def dump_ops(ops: Iterable[Op], path: str | os.PathLike[str]) -> None:
    """Write ops one JSON object per line, so a failing run can be replayed."""
    with open(path, "w", encoding="utf-8") as f:
        for op in ops:
            f.write(_op_to_json(op))
            f.write("\n")


def load_ops(path: str | os.PathLike[str]) -> list[Op]:
    """Read ops written by dump_ops (blank lines are ignored)."""
    with open(path, encoding="utf-8") as f:
        return [_op_from_json(line) for line in f if line.strip()]


@dataclass
class _Pending:
    process: int
    kind: str
    key: str
    value: str | None
    call: float


class History:
    """Thread-safe recorder of client operations.

    Call ``invoke`` just before sending a request and ``ok``/``fail``/``info``
    just after learning its outcome; the timestamps then bracket the real
    effect. The lock is held only for dictionary updates and never across
    I/O, so asyncio tasks may call it directly from the event loop.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._handles = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._busy: dict[int, int] = {}  # process -> its outstanding handle
        self._ops: list[Op] = []

    def invoke(
        self, process: int, kind: str, key: str, value: str | None = None
    ) -> int:
        """Record the start of an op and return a handle for its outcome."""
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r}")
        if kind == "set" and value is None:
            raise ValueError("a set needs a value")
        if kind != "set" and value is not None:
            raise ValueError(f"a {kind} is invoked without a value")
        now = self._clock()
        with self._lock:
            if process in self._busy:
                raise ValueError(
                    f"process {process} already has an op outstanding; "
                    "use a new process id after an indeterminate op"
                )
            handle = next(self._handles)
            self._pending[handle] = _Pending(process, kind, key, value, now)
            self._busy[process] = handle
            return handle

    def _complete(
        self, handle: int, status: str, ret: float | None, value: str | None
    ) -> Op:
        with self._lock:
            p = self._pending.pop(handle, None)
            if p is None:
                raise KeyError(f"unknown or already completed handle {handle}")
            del self._busy[p.process]
            if p.kind == "get":
                v = value if status == "ok" else None
            else:
                if value is not None and value != p.value:
                    self._pending[handle] = p
                    self._busy[p.process] = handle
                    raise ValueError("a write completes with the value it was invoked with")
                v = p.value
            op = Op(p.process, p.kind, p.key, v, p.call, ret, status)
            self._ops.append(op)
            return op

    def ok(self, handle: int, value: str | None = None) -> Op:
        """Record success; for a get, ``value`` is what was read (None = absent)."""
        return self._complete(handle, "ok", self._clock(), value)

    def fail(self, handle: int) -> Op:
        """Record a definite failure: the op certainly had no effect."""
        return self._complete(handle, "fail", self._clock(), None)

    def info(self, handle: int) -> Op:
        """Record an unknown outcome (timeout, lost connection, crash)."""
        return self._complete(handle, "info", None, None)

    @property
    def ops(self) -> list[Op]:
        """Completed ops plus still-outstanding ones as indeterminate, by call time."""
        with self._lock:
            out = list(self._ops)
            out.extend(
                Op(p.process, p.kind, p.key, p.value if p.kind == "set" else None,
                   p.call, None, "info")
                for p in self._pending.values()
            )
        out.sort(key=lambda o: o.call)
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops) + len(self._pending)

    def check(self, timeout: float | None = None) -> CheckResult:
        """Check the recorded history (outstanding ops count as indeterminate)."""
        return check(self.ops, timeout)

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Save the history (see dump_ops)."""
        dump_ops(self.ops, path)

    @classmethod
    def from_jsonl(
        cls, path: str | os.PathLike[str], clock: Callable[[], float] = time.monotonic
    ) -> "History":
        """Load a history saved by to_jsonl; its ops are all completed."""
        h = cls(clock)
        h._ops = load_ops(path)
        return h
