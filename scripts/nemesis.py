#!/usr/bin/env python3
"""Long fault-injection run against a 3-node RaftKV cluster in network namespaces.

    python scripts/nemesis.py --duration 600 --clients 5 --keys 5 --report report.json

Needs root and iproute2 (`ip netns`); everything it sends stays on this machine
(namespaces on a private bridge, no default route, no forwarding). Faults are
drawn in random rounds that contain every kind once: kill -9 of a random node and
of the leader (then restart), isolating the leader, a 2/1 split and a partial
partition. At the end the history is checked for linearizability and the nodes
for identical data. Prints the report; exits 0 when both checks pass, 1 when not
(history and logs then kept under /tmp/nemesis-failures/), 2 on a setup error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.nemesis.netns import netns_unavailable_reason  # noqa: E402
from tests.nemesis.workload import FAULT_KINDS, Config, format_report, run_nemesis  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load and faults (600)")
    p.add_argument("--clients", type=int, default=5, help="concurrent client threads (5)")
    p.add_argument("--keys", type=int, default=5, help="number of keys (5)")
    p.add_argument("--nodes", type=int, default=3, help="cluster size (3)")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--seed", type=int, default=None, help="random seed (faults, victims, ops)")
    p.add_argument("--faults", default=",".join(FAULT_KINDS),
                   help=f"comma-separated fault kinds to draw from ({','.join(FAULT_KINDS)})")
    p.add_argument("--schedule", default=None,
                   help="comma-separated fault kinds run in this order instead of random rounds")
    p.add_argument("--think", type=float, default=0.01, help="mean pause between two ops of a client (s)")
    p.add_argument("--client-timeout", type=float, default=10.0)
    p.add_argument("--kill-down", type=float, default=4.0, help="seconds a killed node stays down")
    p.add_argument("--partition-time", type=float, default=8.0, help="seconds a partition lasts")
    p.add_argument("--quiet", type=float, default=5.0, help="seconds between two faults")
    p.add_argument("--check-timeout", type=float, default=600.0, help="linearizability checker budget (s)")
    p.add_argument("--election-timeout", type=float, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--no-netns", action="store_true",
                   help="run on 127.0.0.1 without namespaces (kill faults only)")
    a = p.parse_args(argv)

    if not a.no_netns:
        reason = netns_unavailable_reason()
        if reason:
            print(f"cannot run the partition faults: {reason} (use --no-netns for kill faults only)",
                  file=sys.stderr)
            return 2
    kinds = [k for k in a.faults.split(",") if k]
    unknown = [k for k in kinds + (a.schedule.split(",") if a.schedule else []) if k not in FAULT_KINDS]
    if unknown:
        p.error(f"unknown fault kinds {unknown}; choose from {FAULT_KINDS}")
    cfg = Config(clients=a.clients, keys=a.keys, duration=None if a.schedule else a.duration,
                 schedule=a.schedule.split(",") if a.schedule else None, fault_kinds=kinds,
                 client_timeout=a.client_timeout, think=a.think, kill_down=a.kill_down,
                 partition_time=a.partition_time, quiet=a.quiet, check_timeout=a.check_timeout, seed=a.seed)
    result, saved = run_nemesis(cfg, nodes=a.nodes, name="long", use_netns=not a.no_netns,
                                election_timeout=tuple(a.election_timeout) if a.election_timeout else None,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_report(result.report))
    if a.report:
        Path(a.report).write_text(json.dumps(result.report, indent=2, default=str))
        print(f"report written to {os.path.abspath(a.report)}")
    if saved:
        print(f"history and logs kept in {saved}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
