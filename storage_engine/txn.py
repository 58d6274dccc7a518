"""The v1 write model shared by the HTTP layer, raft_client and the store: pure data.

A `Txn` is the unit of every v1 write: a single PUT or DELETE is a one-op txn.
It travels inside one Raft entry and is applied all-or-nothing at apply time on
every node, so its outcome (a `TxnResult`) is the same everywhere.

Rules (v1 contract, "Key metadata"):
- Conditions are checked against the state BEFORE the txn (etcd's compare-then-
  apply), so `failed` lists every op whose condition does not hold. Then the ops
  apply in order; the same key twice is allowed and the later op sees the earlier.
- On a missing key, `expect_version=0` holds and every other condition fails.
  On an existing key, `expect_version=0` fails.
- The store revision goes up by one for a txn that changed at least one key
  (all its keys get that mod_revision); a failed compare or a txn whose only
  effect is deleting missing keys does not bump it.
"""
from __future__ import annotations

from dataclasses import dataclass

PUT = "put"
DELETE = "delete"


@dataclass(frozen=True, slots=True)
class KeyMeta:
    """A key's value and metadata as stored (store.get_entry, store.scan)."""
    key: bytes
    value: bytes                 # b"" when read with keys_only
    create_revision: int         # store revision of the put that created the key
    mod_revision: int            # store revision of the last put
    version: int                 # 1 on create, +1 per put


@dataclass(frozen=True, slots=True)
class TxnOp:
    """One put or delete, with optional conditions (None = not checked)."""
    op: str                               # PUT | DELETE
    key: bytes
    value: bytes = b""                    # for PUT
    expect_value: bytes | None = None     # the current value must equal this
    expect_version: int | None = None     # the current version; 0 = must not exist
    expect_mod_revision: int | None = None  # the current mod_revision

    @property
    def has_condition(self) -> bool:
        return (self.expect_value is not None or self.expect_version is not None
                or self.expect_mod_revision is not None)


@dataclass(frozen=True, slots=True)
class Txn:
    """Ops applied all-or-nothing in one Raft entry, in order."""
    ops: tuple[TxnOp, ...]


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    """A client's exactly-once identity for one request (X-RaftKV-Client/Seq/Floor)."""
    client_id: str   # <= 64 chars [A-Za-z0-9_-]
    seq: int         # >= 1; a retry reuses it
    floor: int = 0   # lowest seq the client may still retry; outcomes below it are forgotten


@dataclass(frozen=True, slots=True)
class CurrentState:
    """The state of a key whose condition failed (the 412 body's "current")."""
    exists: bool
    version: int = 0
    mod_revision: int = 0
    create_revision: int = 0


@dataclass(frozen=True, slots=True)
class OpResult:
    """The effect of one op of a succeeded txn."""
    key: bytes
    op: str                     # PUT | DELETE
    version: int = 0            # PUT: the key's new version
    mod_revision: int = 0       # PUT: the txn's revision
    create_revision: int = 0    # PUT: the key's create_revision
    deleted: int = 0            # DELETE: 1 if the key existed


@dataclass(frozen=True, slots=True)
class TxnResult:
    """A txn's outcome, computed at apply time (or remembered, for a duplicate)."""
    succeeded: bool                    # False: a condition failed, nothing applied
    revision: int                      # store revision right after this txn's apply
    results: tuple[OpResult, ...] = ()           # succeeded: one per op, in op order
    failed: tuple[int, ...] = ()                 # not succeeded: indices of the failing ops
    current: tuple[CurrentState, ...] = ()       # not succeeded: state of each failed op's key
    duplicate: bool = False            # True: (client, seq) was applied before; this is its first outcome
    index: int = 0                     # raft index of the entry that carried it (0 if unknown)


# -- the compact outcome remembered per (client, seq) in the sessions table --------
# Succeeded: [1, revision, [per op: [version, create_revision] for a put, deleted (0|1)
# for a delete]] (a put's mod_revision is the txn's revision). Failed: [0, revision,
# [[op index, exists, version, mod_revision, create_revision], ...]]. Keys are not
# stored: a duplicate carries the same ops as the request it repeats.

def outcome_to_wire(r: TxnResult) -> list:
    if r.succeeded:
        return [1, r.revision, [[o.version, o.create_revision] if o.op == PUT else o.deleted
                                for o in r.results]]
    return [0, r.revision, [[i, int(c.exists), c.version, c.mod_revision, c.create_revision]
                            for i, c in zip(r.failed, r.current)]]


def outcome_from_wire(raw: list, txn: Txn, index: int = 0, duplicate: bool = True) -> TxnResult:
    ok, revision, items = raw
    if not ok:
        return TxnResult(False, revision, failed=tuple(i for i, *_ in items),
                         current=tuple(CurrentState(bool(e), v, m, c) for _, e, v, m, c in items),
                         duplicate=duplicate, index=index)
    ops = txn.ops if len(txn.ops) == len(items) else ()
    results = []
    for n, item in enumerate(items):
        key = ops[n].key if ops else b""
        if isinstance(item, list):
            results.append(OpResult(key, PUT, version=item[0], mod_revision=revision, create_revision=item[1]))
        else:
            results.append(OpResult(key, DELETE, deleted=item))
    return TxnResult(True, revision, results=tuple(results), duplicate=duplicate, index=index)
