"""The Raft transport secret (RAFT_SECRET / --raft-secret-file), on top of PySyncObj's
own encryption (SyncObjConf(password=...): Fernet, a key stretched from the secret).

PySyncObj 0.3.17 does the cryptography; this module fills three gaps around it:

* `SecretTransport` never sends a Raft message on a connection whose key exchange has
  not finished. PySyncObj sends request_vote (and a few replies) to every peer whose TCP
  connection is up, also in the round trip before the random session keys are swapped;
  the peer then cannot unwrap the message and drops the connection, and the next try
  comes a whole connectionRetryTime later (measured: 1 reconnect in ~12 led by the
  leader, each one a 1 s gap long enough for the restarted node to start an election).
  Refusing the send is the same as a lost message, which Raft tolerates.
* `SecretTransport` logs connections that close before the key exchange completed:
  PySyncObj drops them silently, which makes a wrong secret on one node invisible.
* `probe_peer` proves that a node asking to /join holds this cluster's secret before
  the leader adds it: without the probe, a node with a wrong secret would become a
  member that can never vote, and the cluster would lose fault tolerance.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import struct
import time
import weakref
import zlib
from typing import Any

from .durable import DurableTCPTransport

log = logging.getLogger(__name__)

# Warn at most once per peer host per this many seconds (a retrying peer reconnects every second).
WARN_INTERVAL = 30.0
PROBE_TIMEOUT = 3.0
_FRAME = struct.Struct("i")   # PySyncObj's frame header: native int length
_KEY_BYTES = 32
_MAX_REPLY = 1 << 16


class SecretTransport(DurableTCPTransport):
    """DurableTCPTransport plus the handshake guard and the handshake-failure log (see
    the module docstring). Without a secret it behaves exactly like its parent.

    Limit: messages that DurableTCPTransport queued for group commit are flushed by the
    parent directly; such a message could still meet a connection that dropped and
    reconnected within the same poll. That costs one reconnect, as before."""

    # The leader's fdatasync overlaps the followers' instead of preceding them
    # (about 0.35 ms less per write at one client; see DurableTCPTransport).
    parallel_leader_write = True

    def __init__(self, syncObj, selfNode, otherNodes):
        self._secret_on = syncObj.encryptor is not None
        self._keyed: "weakref.WeakSet[Any]" = weakref.WeakSet()      # key exchange completed
        self._pending: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
        self._last_warn: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.handshake_failures = 0
        super().__init__(syncObj, selfNode, otherNodes)
        bind = str(getattr(syncObj.conf, "bindAddress", "") or "")
        if self._secret_on:
            log.info("raft traffic is encrypted and authenticated with the raft secret")
        elif bind and not bind.startswith(("127.", "localhost:", "[::1]:", "::1:")):
            log.warning("raft traffic on %s is NOT authenticated: anyone who can reach this port can change "
                        "the cluster and run code in this process; set RAFT_SECRET or --raft-secret-file "
                        "(docs/security.md)", bind)

    # -- the guard -----------------------------------------------------------------------
    def send(self, node, message):
        if self._secret_on:
            conn = self._connections.get(node)
            if conn is None or conn.sendRandKey is None:
                return False
        return super().send(node, message)

    # -- bookkeeping of handshakes -------------------------------------------------------
    def _onNewIncomingConnection(self, conn):  # noqa: N802 (PySyncObj naming)
        super()._onNewIncomingConnection(conn)
        if self._secret_on:
            self._pending[conn] = f"incoming connection from {_peer_of(conn)}"

    def _onIncomingMessageReceived(self, conn, message):  # noqa: N802
        super()._onIncomingMessageReceived(conn, message)
        if conn.sendRandKey is not None:
            self._keyed.add(conn)

    def _onOutgoingConnected(self, conn):  # noqa: N802
        if self._secret_on:
            node = self._connToNode(conn)
            self._pending[conn] = f"connection to {getattr(node, 'address', node)}"
            self._keyed.discard(conn)  # the object is reused across reconnects
        super()._onOutgoingConnected(conn)

    def _onOutgoingMessageReceived(self, conn, message):  # noqa: N802
        super()._onOutgoingMessageReceived(conn, message)
        if conn.sendRandKey is not None:
            self._keyed.add(conn)

    def _onDisconnected(self, conn):  # noqa: N802
        what = self._pending.pop(conn, None)
        if what is not None and conn not in self._keyed:
            self._handshake_failed(what)
        self._keyed.discard(conn)
        super()._onDisconnected(conn)

    def _handshake_failed(self, what: str) -> None:
        self.handshake_failures += 1
        host = what.rsplit(" ", 1)[-1].rsplit(":", 1)[0]
        now = time.monotonic()
        if now - self._last_warn.get(host, float("-inf")) < WARN_INTERVAL:
            self._suppressed[host] = self._suppressed.get(host, 0) + 1
            return
        more = self._suppressed.pop(host, 0)
        self._last_warn[host] = now
        log.warning("raft %s closed before the secret handshake completed: the two nodes do not share "
                    "the same raft secret (RAFT_SECRET / --raft-secret-file), or the peer is not a RaftKV "
                    "node%s", what, f" ({more} more such closes from {host} not logged)" if more else "")


def _peer_of(conn) -> str:
    fd = conn.fileno()
    if fd is None:
        return "?"
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return "?"
    try:
        host, port = s.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
    finally:
        s.close()


# -- the join probe ------------------------------------------------------------------------
class ProbeUnreachable(Exception):
    """Could not connect to the peer's Raft port at all (retryable: it may still be starting)."""


class ProbeRefused(Exception):
    """The peer answered but could not complete the key exchange: it lacks this cluster's secret."""


def _frame(encryptor, obj: object) -> bytes:
    data = encryptor.encrypt(zlib.compress(pickle.dumps(obj), 3))
    return _FRAME.pack(len(data)) + data


async def probe_peer(address: str, encryptor, timeout: float = PROBE_TIMEOUT) -> None:
    """Opens a Raft connection to `address` (HOST:PORT) and performs the first step of
    PySyncObj's key exchange (send our random key; the peer answers with it and its own,
    both encrypted). Only a peer holding the same secret can answer. Raises
    ProbeUnreachable or ProbeRefused; returns None on success."""
    host, _, port = address.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except (OSError, asyncio.TimeoutError, ValueError) as exc:
        raise ProbeUnreachable(f"cannot connect to the raft port {address}: {exc!r}") from None
    try:
        key = os.urandom(_KEY_BYTES)
        writer.write(_frame(encryptor, key))
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readexactly(_FRAME.size), timeout)
            (length,) = _FRAME.unpack(head)
            if not 0 < length <= _MAX_REPLY:
                raise ProbeRefused(f"{address} answered a frame of {length} bytes; not a RaftKV raft port")
            body = await asyncio.wait_for(reader.readexactly(length), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise ProbeRefused(f"{address} closed the connection during the key exchange: "
                               f"it does not hold this cluster's raft secret") from None
        except asyncio.TimeoutError:
            raise ProbeRefused(f"{address} did not answer the key exchange within {timeout:.0f} s") from None
        try:
            payload = encryptor.decrypt(body)
        except Exception:  # cryptography.fernet.InvalidToken
            raise ProbeRefused(f"{address} answered with a different raft secret") from None
        # Decrypted with our key: the sender holds the secret, so its pickle is trusted.
        reply = pickle.loads(zlib.decompress(payload))
        if not (isinstance(reply, tuple) and len(reply) == 2 and reply[0] == key):
            raise ProbeRefused(f"{address} answered the key exchange with an unexpected message")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ConnectionError):
            pass
