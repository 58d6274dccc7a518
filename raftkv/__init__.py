"""RaftKV for Python: a Raft-replicated key-value store (client library, CLI, local launcher)."""

__version__ = "0.1.0"
