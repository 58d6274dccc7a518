"""Exactly-once bookkeeping for proposals (note H4): pure, no I/O.

Every proposal carries (client_id, seq, floor). A retry after an ambiguous
outcome reuses its seq, so whichever copy commits first is applied and every
later copy is skipped. `floor` is the lowest seq the client may still retry;
seqs below it are forgotten. Sessions expire by log index, never by wall clock,
so every node drops the same ones at the same entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

# A client silent for this many log entries is forgotten; it may only retry
# within its propose timeout, which is far shorter at any realistic write rate.
SESSION_TTL_ENTRIES = 200_000
EXPIRY_EVERY = 10_000


@dataclass
class Session:
    floor: int = 0
    seqs: set[int] = field(default_factory=set)
    last_index: int = 0

    def encode(self) -> bytes:
        return msgpack.packb([self.floor, sorted(self.seqs), self.last_index])

    @classmethod
    def decode(cls, raw: bytes) -> "Session":
        floor, seqs, last = msgpack.unpackb(raw)
        return cls(floor, set(seqs), last)


class SessionTable:
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    def admit(self, client_id: str, seq: int, floor: int, index: int) -> bool:
        """True when this proposal has not been applied before (and records it)."""
        s = self.sessions.get(client_id)
        if s is None:
            s = self.sessions[client_id] = Session()
        if floor > s.floor:
            s.floor = floor
            s.seqs = {x for x in s.seqs if x >= floor}
        s.last_index = index
        if seq < s.floor or seq in s.seqs:
            return False
        s.seqs.add(seq)
        return True

    def expire(self, index: int) -> list[str]:
        """Drops sessions idle for SESSION_TTL_ENTRIES; runs at fixed index multiples."""
        gone = [c for c, s in self.sessions.items() if s.last_index < index - SESSION_TTL_ENTRIES]
        for c in gone:
            del self.sessions[c]
        return gone

    def dump(self) -> bytes:
        return msgpack.packb({c: [s.floor, sorted(s.seqs), s.last_index] for c, s in self.sessions.items()})

    @classmethod
    def load(cls, raw: bytes) -> "SessionTable":
        t = cls()
        if raw:
            for c, (floor, seqs, last) in msgpack.unpackb(raw).items():
                t.sessions[c] = Session(floor, set(seqs), last)
        return t
