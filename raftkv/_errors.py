"""Typed errors of the RaftKV client library.

Every failure the client raises is a :class:`RaftKVError`; the subclass says what a caller
can do about it. The one that matters most is :class:`OutcomeUnknown`: a write that may or
may not have been applied (read the key before deciding what to do), as opposed to
:class:`Unavailable` / :class:`Overloaded`, which mean the write was definitely not applied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class RaftKVError(Exception):
    """Base class. `code` is the server's error code (``not_found``, ``compare_failed``, ...)
    or a client-side one (``connection``); `status` the HTTP status (0 when none arrived);
    `node` the URL that answered (or failed); `reason` the message without the node."""

    default_code = "error"

    def __init__(self, message: str, *, code: str | None = None, status: int = 0,
                 node: str | None = None, details: dict[str, Any] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.status = status
        self.node = node
        self.details = details or {}
        self.reason = reason or message  # the server's own words, without the node URL

    def __str__(self) -> str:
        return self.message


class BadRequest(RaftKVError):
    """The request is malformed or not allowed (400): retrying it cannot help."""

    default_code = "bad_request"


class BadRange(BadRequest):
    """A scan with start >= end, a bad limit, prefix together with start/end, or a bad token."""

    default_code = "bad_range"


class NotFound(RaftKVError):
    """The key does not exist (404)."""

    default_code = "not_found"


@dataclass(frozen=True)
class CurrentMeta:
    """What a failed compare found: whether the key exists and its metadata (never its value)."""

    exists: bool
    version: int = 0
    mod_revision: int = 0
    create_revision: int = 0


class CompareFailed(RaftKVError):
    """A condition (expect_value / expect_version / expect_mod_revision) did not hold (412);
    nothing was written. `current` is the key's metadata at that moment (single-key writes);
    `failed` the indices of the txn ops whose condition failed (txns)."""

    default_code = "compare_failed"

    def __init__(self, message: str, *, current: CurrentMeta | None = None,
                 failed: list[int] | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.current = current
        self.failed = failed or []


class TooLarge(RaftKVError):
    """Key, value, body or txn over the server's limits (413)."""

    default_code = "too_large"


class Unauthorized(RaftKVError):
    """Missing or wrong token (401): the client token for the data API, the cluster token for
    join/leave."""

    default_code = "unauthorized"


class Forbidden(RaftKVError):
    """The token is valid but not allowed to do this (403)."""

    default_code = "forbidden"


class Overloaded(RaftKVError):
    """The node refused the request for load (429) after the client's retries; not applied.
    `retry_after` is the server's hint in seconds."""

    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unavailable(RaftKVError):
    """No node could serve the request (no leader, no quorum, nothing reachable) within the
    client's retry budget. For a write this is definite: it was not applied."""

    default_code = "unavailable"


class OutcomeUnknown(RaftKVError):
    """A write may or may not have been applied: an attempt timed out or lost its connection
    after it was sent (or the server said so), and no retry got a definite answer before the
    retry budget ran out. The write is applied at most once either way; read to find out."""

    default_code = "outcome_unknown"


class InternalError(RaftKVError):
    """The server failed unexpectedly (500)."""

    default_code = "internal"


class ProtocolError(RaftKVError):
    """An answer the client cannot understand (not msgpack, wrong shape, unexpected status)."""

    default_code = "protocol"


class RestoreError(RaftKVError):
    """A restore refused to start (non-empty target) or its final verification failed."""

    default_code = "restore"


ERROR_CLASSES: dict[str, type[RaftKVError]] = {
    "bad_request": BadRequest,
    "bad_range": BadRange,
    "not_found": NotFound,
    "compare_failed": CompareFailed,
    "too_large": TooLarge,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "overloaded": Overloaded,
    "no_leader": Unavailable,
    "unavailable": Unavailable,
    "outcome_unknown": OutcomeUnknown,
    "internal": InternalError,
}

STATUS_CLASSES: dict[int, type[RaftKVError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: BadRequest,  # management API: the id belongs to another address
    412: CompareFailed,
    413: TooLarge,
    429: Overloaded,
    500: InternalError,
    503: Unavailable,
}

__all__ = [
    "RaftKVError", "BadRequest", "BadRange", "NotFound", "CurrentMeta", "CompareFailed",
    "TooLarge", "Unauthorized", "Forbidden", "Overloaded", "Unavailable", "OutcomeUnknown",
    "InternalError", "ProtocolError", "RestoreError",
]
