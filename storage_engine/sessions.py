"""Exactly-once bookkeeping for proposals and client requests (note H4): pure, no I/O.

Two kinds of clients share this table: each engine process (one (client_id, seq)
per batched proposal, so a retried proposal applies once), and v1 HTTP clients
(X-RaftKV-Client/Seq/Floor on one request inside a proposal). A retry after an
ambiguous outcome reuses its seq, so whichever copy commits first is applied and
every later copy is skipped. For requests, the first copy's compact outcome is
remembered with its seq, so a duplicate answers exactly what the first got.

`floor` is the lowest seq the client may still retry; seqs below it, and their
outcomes, are forgotten. Sessions expire by log index, never by wall clock, so
every node drops the same ones at the same entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

# A client silent for this many log entries is forgotten; it may only retry
# within its propose timeout, which is far shorter at any realistic write rate.
SESSION_TTL_ENTRIES = 200_000
EXPIRY_EVERY = 10_000
# Seqs remembered per client at most. A client that never raises its floor
# would otherwise grow its session (re-encoded on every touch) without bound; past
# this, the lowest seqs are dropped as if the floor had passed them.
MAX_SEQS_PER_CLIENT = 1024

Outcome = Any  # a request's compact outcome (txn.outcome_to_wire), None for proposals


@dataclass
class Session:
    floor: int = 0
    outcomes: dict[int, Outcome] = field(default_factory=dict)  # seq -> outcome, seq >= floor
    last_index: int = 0

    @property
    def seqs(self) -> set[int]:
        return set(self.outcomes)

    def to_wire(self) -> list:
        return [self.floor, [[s, o] for s, o in sorted(self.outcomes.items())], self.last_index]

    @classmethod
    def from_wire(cls, raw: list) -> "Session":
        floor, seqs, last = raw
        # Older stores kept a plain list of seqs, without outcomes.
        outcomes = dict((s if isinstance(s, list) else (s, None)) for s in seqs)
        return cls(floor, outcomes, last)

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire())

    @classmethod
    def decode(cls, raw: bytes) -> "Session":
        return cls.from_wire(msgpack.unpackb(raw))


class SessionTable:
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    def admit(self, client_id: str, seq: int, floor: int, index: int) -> bool:
        """True when (client_id, seq) has not been applied before (and records it)."""
        s = self.sessions.get(client_id)
        if s is None:
            s = self.sessions[client_id] = Session()
        if floor > s.floor:
            s.floor = floor
            s.outcomes = {x: o for x, o in s.outcomes.items() if x >= floor}
        s.last_index = index
        if seq < s.floor or seq in s.outcomes:
            return False
        s.outcomes[seq] = None
        if len(s.outcomes) > MAX_SEQS_PER_CLIENT:
            drop = sorted(s.outcomes)[: len(s.outcomes) - MAX_SEQS_PER_CLIENT]
            for x in drop:
                del s.outcomes[x]
            s.floor = drop[-1] + 1
        return True

    def remember(self, client_id: str, seq: int, outcome: Outcome) -> None:
        """Stores the outcome of an admitted request, for its duplicates."""
        s = self.sessions.get(client_id)
        if s is not None and seq in s.outcomes:
            s.outcomes[seq] = outcome

    def outcome(self, client_id: str, seq: int) -> Outcome:
        """The remembered outcome of (client_id, seq); None when unknown or forgotten."""
        s = self.sessions.get(client_id)
        return s.outcomes.get(seq) if s is not None else None

    def floor(self, client_id: str) -> int:
        s = self.sessions.get(client_id)
        return s.floor if s is not None else 0

    def expire(self, index: int) -> list[str]:
        """Drops sessions idle for SESSION_TTL_ENTRIES; runs at fixed index multiples."""
        gone = [c for c, s in self.sessions.items() if s.last_index < index - SESSION_TTL_ENTRIES]
        for c in gone:
            del self.sessions[c]
        return gone

    def dump(self) -> bytes:
        return msgpack.packb({c: s.to_wire() for c, s in self.sessions.items()})

    @classmethod
    def load(cls, raw: bytes) -> "SessionTable":
        t = cls()
        if raw:
            for c, wire in msgpack.unpackb(raw).items():
                t.sessions[c] = Session.from_wire(wire)
        return t
