"""Errors as values with a kind; http_api maps each kind to one HTTP status."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorKind(enum.Enum):
    BAD_INPUT = "bad input"
    TOO_LARGE = "too large"
    NO_LEADER = "no leader"
    NO_QUORUM = "no quorum"
    OVERLOADED = "overloaded"
    NOT_APPLIED = "not applied"
    OUTCOME_UNKNOWN = "outcome unknown"
    INTERNAL = "internal"


@dataclass
class KVError(Exception):
    kind: ErrorKind
    message: str

    def __str__(self) -> str:
        return self.message
