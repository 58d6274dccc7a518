"""One PySyncObj node for tests/integration/test_durable_kill.py (not a test).

A replicated set of operation ids with a counter, journal + dump files, a small
logCompactionMinEntries, raft_sidecar.durable installed. Writer threads add
unique ids as fast as they can and append each acknowledged id to
ack-<i>.log; every durable meta store (term, votedFor) is appended to
votes-<i>.log; status-<i>.json is refreshed every 0.1 s. When <dir>/stop exists
the writers stop and the status carries the full id list.

    python durable_node.py DIR INDEX PORT0,PORT1,PORT2 [--writers N] [--compact-delay S]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated  # noqa: E402

from raft_sidecar import durable  # noqa: E402


class Ops(SyncObjConsumer):
    def __init__(self):
        super().__init__()
        self.ops = {}
        self.counter = 0

    @replicated
    def add(self, op_id):
        if op_id not in self.ops:
            self.counter += 1
            self.ops[op_id] = self.counter
        return self.counter


def open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("index", type=int)
    ap.add_argument("ports")
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--compact-delay", type=float, default=0.0)
    ap.add_argument("--compact-entries", type=int, default=50)
    args = ap.parse_args()

    d, i = args.dir, args.index
    logging.basicConfig(filename=os.path.join(d, f"node{i}.log"), level=logging.WARNING,
                        format=f"%(asctime)s n{i} pid{os.getpid()} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("raft_sidecar.durable").setLevel(logging.INFO)
    addrs = [f"127.0.0.1:{p}" for p in args.ports.split(",")]
    journal = os.path.join(d, f"n{i}.journal")
    dump = os.path.join(d, f"n{i}.dump")
    votes_fd = open_append(os.path.join(d, f"votes-{i}.log"))
    ack_fd = open_append(os.path.join(d, f"ack-{i}.log"))
    pid = os.getpid()

    class NodeJournal(durable.DurableFileJournal):
        def on_meta_stored(self, meta):
            # Runs after the meta file is durable, before the vote is sent.
            os.write(votes_fd, ("%d %s %d\n" % (meta.get("currentTerm", 0), meta.get("votedForNodeId"), pid)).encode())

        def on_compact_step(self, step):
            if step == "written" and args.compact_delay:
                time.sleep(args.compact_delay)  # widen the window the test kills in

    try:
        durable.check_data_dir(journal, dump)
    except durable.DurableError as exc:
        logging.error("refusing to start: %s", exc)
        print(f"refusing to start: {exc}", file=sys.stderr)
        return 3
    durable.install(journal_class=NodeJournal)

    conf = SyncObjConf(
        journalFile=journal, fullDumpFile=dump, useFork=False,
        appendEntriesUseBatch=False, logCompactionMinEntries=args.compact_entries, logCompactionMinTime=3600,
        raftMinTimeout=0.5, raftMaxTimeout=1.0, connectionTimeout=2.0, connectionRetryTime=0.2,
        leaderFallbackTimeout=2.0, commandsWaitLeader=False,
    )
    ops = Ops()
    node = SyncObj(addrs[i], [a for a in addrs if a != addrs[i]], conf, consumers=[ops],
                   transportClass=durable.DurableTCPTransport)

    stop_path = os.path.join(d, "stop")
    stopping = threading.Event()

    def writer(w: int) -> None:
        seq = 0
        while not stopping.is_set() and not os.path.exists(stop_path):
            seq += 1
            op_id = f"{i}.{pid}.{w}.{seq}"
            try:
                counter = ops.add(op_id, sync=True, timeout=3.0)
            except Exception:
                time.sleep(0.05)
                continue
            os.write(ack_fd, f"{op_id} {counter} {node.raftLastApplied} {node.raftCurrentTerm}\n".encode())

    for w in range(args.writers):
        threading.Thread(target=writer, args=(w,), daemon=True).start()

    def on_term(*_):
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    status_path = os.path.join(d, f"status-{i}.json")
    while not stopping.is_set():
        try:  # read from this thread while the tick thread mutates: retry on a race
            st = node.getStatus()
            status = {
                "pid": pid, "counter": ops.counter, "n_ops": len(ops.ops), "last_applied": node.raftLastApplied,
                "commit": node.raftCommitIndex, "term": node.raftCurrentTerm, "leader": str(st["leader"]),
                "is_leader": node._isLeader(), "log_len": st["log_len"], "time": time.time(),
                "last_index": node._SyncObj__raftLog[-1][1],
            }
            if os.path.exists(stop_path):
                status["ops"] = sorted(list(ops.ops))
        except RuntimeError:
            time.sleep(0.01)
            continue
        with open(status_path + ".tmp", "w") as f:
            json.dump(status, f)
        os.replace(status_path + ".tmp", status_path)
        time.sleep(0.1)
    node.destroy_synchronous()
    return 0


if __name__ == "__main__":
    sys.exit(main())
