"""RaftKV for Python: a Raft-replicated key-value store (client library, CLI, local launcher)."""

__version__ = "0.1.0"

# The client library (raftkv.Client, raftkv.AsyncClient, the typed errors, ...) is imported on
# first use: the engine and the sidecar import raftkv.pb and must not pull in HTTP clients.
_CLIENT_NAMES = frozenset({
    "Client", "AsyncClient", "ClientOptions",
    "KeyValue", "PutResult", "DeleteResult", "Page", "PutOp", "DeleteOp", "TxnResult",
    "Member", "NodeStatus", "BackupInfo", "RestoreInfo",
    "RaftKVError", "BadRequest", "BadRange", "NotFound", "CompareFailed", "CurrentMeta",
    "TooLarge", "Unauthorized", "Forbidden", "Overloaded", "Unavailable", "OutcomeUnknown",
    "InternalError", "ProtocolError", "RestoreError",
})


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        from raftkv import client
        return getattr(client, name)
    if name == "BackupError":
        from raftkv.backup import BackupError
        return BackupError
    raise AttributeError(f"module 'raftkv' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _CLIENT_NAMES | {"BackupError"})
