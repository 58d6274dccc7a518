"""The PySyncObj node: the replicated log and its few replicated methods.

Replicated methods run on PySyncObj's tick thread during apply, on every node,
also during the log replay after a restart. They never raise and never block:
they hand the entry to the applier and return its raft index (note H5, H6).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from time import monotonic as monotonic_time
from typing import TYPE_CHECKING, Callable

from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.syncobj import _RAFT_STATE, PIPE_NOTIFIER_ENABLED

from . import durable
from .raft_secret import SecretTransport
from .applier import Applier
from .config import SidecarConfig
from . import read_index

if TYPE_CHECKING:
    from .snapshot import Snapshots

log = logging.getLogger(__name__)


def make_conf(cfg: SidecarConfig, serializer: Callable, deserializer: Callable,
              checker: Callable[[], int]) -> SyncObjConf:
    return SyncObjConf(
        # Both files, always: a journal without a dump loses the state machine at
        # the first restart after compaction (note H2).
        journalFile=cfg.journal_file,
        fullDumpFile=cfg.dump_file,
        serializer=serializer,
        deserializer=deserializer,
        serializeChecker=checker,
        dynamicMembershipChange=True,
        bindAddress=f"{cfg.bind_host}:{cfg.raft_port}",
        # Definite MISSING_LEADER instead of a command queued for minutes (note §3).
        commandsWaitLeader=False,
        # Send entries at once instead of on the 100 ms heartbeat (note §8).
        appendEntriesUseBatch=False,
        appendEntriesPeriod=cfg.heartbeat,
        raftMinTimeout=cfg.raft_min_timeout,
        raftMaxTimeout=cfg.raft_max_timeout,
        connectionTimeout=cfg.connection_timeout,
        leaderFallbackTimeout=cfg.leader_fallback_timeout,
        logCompactionMinEntries=cfg.compact_entries,
        logCompactionMinTime=cfg.compact_seconds,
        commandsQueueSize=20000,
        # Reconnect quickly to a restarted or newly added peer (default 5 s).
        connectionRetryTime=1.0,
        # Encrypts and authenticates every Raft message (Fernet); None = plaintext pickles,
        # which anyone who can reach the Raft port could forge (docs/security.md).
        password=cfg.raft_secret,
    )


class MembersFile:
    """The membership this node last saw, so a restart ignores -bootstrap/-join.

    PySyncObj replays membership entries only when it re-applies them, after the
    first election could already have happened with the constructor's peer list.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> list[str] | None:
        try:
            with open(self.path) as f:
                return list(json.load(f)["members"])
        except FileNotFoundError:
            return None

    def save(self, members: list[str]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"members": sorted(members)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class RaftKVNode(SyncObj):
    def __init__(self, cfg: SidecarConfig, peers: list[str], applier: Applier,
                 members_file: MembersFile, snapshots: "Snapshots", persist_members: bool = True) -> None:
        self._applier = applier
        self._members_file = members_file
        # A joining node saves its membership only once the cluster accepted it, so
        # a crash before that makes the next start join again.
        self.persist_members = persist_members
        snapshots.node = self  # the first tick may load a dump before __init__ returns
        # address -> {"id": node id, "mgmt": management address}; replicated.
        self.registry: dict[str, dict[str, str]] = {}
        self._registry_lock = threading.Lock()
        self._saved_members: list[str] | None = None
        self._stickiness = cfg.raft_min_timeout
        self._last_leader_contact = 0.0
        # Probe again after a heartbeat period and a half without a majority; the
        # asking node gives up when the engine would have (propose timeout).
        self.read_index = read_index.ReadIndex(self, probe_timeout=cfg.heartbeat * 1.5,
                                               give_up=cfg.propose_timeout)
        # fsync'd journal and meta, atomic compaction, a sync before any Raft message
        # that depends on the journal (note H1, H7); must run before SyncObj opens it.
        durable.install()
        super().__init__(cfg.advertise, [p for p in peers if p != cfg.advertise],
                         make_conf(cfg, snapshots.serialize, snapshots.deserialize, snapshots.check),
                         transportClass=SecretTransport)  # DurableTCPTransport + raft secret guard
        self._persist_members()
        # A loaded snapshot replaces the peer set without the change hook below.
        self.addOnTickCallback(self._persist_members)
        self.addOnTickCallback(self.read_index.tick)

    # -- replicated methods --------------------------------------------------------
    @replicated
    def propose(self, command: bytes) -> int:
        index = self.raftLastApplied + 1
        self._applier.submit(index, command)
        return index

    @replicated
    def barrier(self) -> int:
        """The read barrier entry of earlier versions (reads now use ReadIndex); kept so
        that journals holding such entries still replay."""
        index = self.raftLastApplied + 1
        self._applier.submit(index, None)
        return index

    @replicated
    def register(self, address: str, node_id: str, mgmt: str) -> int:
        with self._registry_lock:
            for addr in [a for a, info in self.registry.items() if info["id"] == node_id and a != address]:
                del self.registry[addr]
            self.registry[address] = {"id": node_id, "mgmt": mgmt}
        index = self.raftLastApplied + 1
        self._applier.submit(index, None)
        return index

    @replicated
    def unregister(self, address: str) -> int:
        with self._registry_lock:
            self.registry.pop(address, None)
        index = self.raftLastApplied + 1
        self._applier.submit(index, None)
        return index

    # -- Raft fixes (note H10) -------------------------------------------------------------
    def _SyncObj__sendNextNodeIdx(self, node, reset=False, nextNodeIdx=None, success=False):  # noqa: N802
        """PySyncObj's follower reply, plus the term it was sent in, so that a leader
        can ignore a reply delayed across elections (it could inflate matchIndex)."""
        if nextNodeIdx is None:
            nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
        self._SyncObj__transport.send(node, {
            "type": "next_node_idx", "next_node_idx": nextNodeIdx, "reset": reset,
            "success": success, "term": self.raftCurrentTerm,
        })

    def _SyncObj__onMessageReceived(self, node, message):  # noqa: N802
        """Guards around PySyncObj's message handler.

        Leader stickiness (Raft dissertation §4.2.3): a follower that heard from its
        leader within the minimum election timeout ignores vote requests. Without it a
        follower cut off from the leader alone (one broken link) keeps winning votes from
        the followers that still hear the leader, and deposes it again and again. The
        leader itself still answers votes, so a leadership transfer still completes.

        For a follower's reply (next_node_idx):
        - a reply from another term is dropped;
        - a successful ack never moves the leader's nextIndex backwards. PySyncObj
          resets it to the acked position, so with entries sent at once
          (appendEntriesUseBatch=False) every ack made the leader resend entries the
          follower had, and the follower then truncated and re-appended its log
          suffix (even applied entries) on each resend.
        """
        kind = message.get("type") if isinstance(message, dict) else None
        if kind in read_index.MESSAGE_TYPES:
            return self.read_index.on_message(node, message)
        if kind == "append_entries" and message.get("term", -1) >= self.raftCurrentTerm:
            self._last_leader_contact = monotonic_time()
        elif kind == "request_vote" and self._SyncObj__raftState == _RAFT_STATE.FOLLOWER \
                and self._SyncObj__raftLeader is not None \
                and monotonic_time() - self._last_leader_contact < self._stickiness:
            return None
        if kind != "next_node_idx":
            return SyncObj._SyncObj__onMessageReceived(self, node, message)
        if message.get("term", self.raftCurrentTerm) != self.raftCurrentTerm:
            return None
        next_index = self._SyncObj__raftNextIndex
        before = next_index.get(node)
        SyncObj._SyncObj__onMessageReceived(self, node, message)
        if message.get("success") and not message.get("reset") and before is not None \
                and next_index.get(node, before) < before:
            next_index[node] = before
        return None

    # -- what ReadIndex needs from PySyncObj's private state (tick thread only) -------------
    def wake(self) -> None:
        """Makes the tick thread run now rather than at its next poll timeout."""
        if PIPE_NOTIFIER_ENABLED:
            self._SyncObj__pipeNotifier.notify()

    def send(self, node, message: dict) -> bool:
        """False when the connection to `node` is down (the message is dropped)."""
        return bool(self._SyncObj__transport.send(node, message))

    def committed_in_own_term(self) -> bool:
        """Until an entry of its own term commits, a new leader's commit index may be
        behind what the previous leader committed (Raft §6.4; PySyncObj appends a
        no-op on election, so this is one round trip)."""
        entries = self._SyncObj__getEntries(self.raftCommitIndex, 1)
        return bool(entries) and entries[0][2] == self.raftCurrentTerm

    def applier_submitted(self) -> int:
        return self._applier.submitted

    # -- membership ---------------------------------------------------------------------
    def _SyncObj__doChangeCluster(self, request, reverse=False):  # noqa: N802 (PySyncObj hook)
        """Wraps PySyncObj's private change hook: it runs when a change is appended,
        received, rolled back or replayed, which is exactly when to persist."""
        changed = SyncObj._SyncObj__doChangeCluster(self, request, reverse)
        if changed:
            self._persist_members()
        return changed

    def postpone_election(self) -> None:
        self._SyncObj__raftElectionDeadline = monotonic_time() + self._stickiness

    def members(self) -> list[str]:
        return sorted([self.selfNode.address] + [n.address for n in self.otherNodes])

    def _persist_members(self) -> None:
        if not self.persist_members:
            return
        members = self.members()
        if members != self._saved_members:
            self._members_file.save(members)
            self._saved_members = members

    def registry_snapshot(self) -> dict[str, dict[str, str]]:
        with self._registry_lock:
            return {a: dict(i) for a, i in self.registry.items()}

    def restore_registry(self, registry: dict[str, dict[str, str]]) -> None:
        with self._registry_lock:
            self.registry = {a: dict(i) for a, i in registry.items()}

    def id_of(self, address: str) -> str:
        info = self.registry.get(address)
        return info["id"] if info else address

    def address_of(self, node_id: str) -> str | None:
        for addr, info in self.registry_snapshot().items():
            if info["id"] == node_id:
                return addr
        members = self.members()
        return node_id if node_id in members else None

    def leader_address(self) -> str | None:
        leader = self._getLeader()
        return leader.address if leader is not None else None
