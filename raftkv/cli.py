"""The `raftkv` command.

Each subcommand is a `cmd_*` function taking the parsed arguments and returning an exit
status, registered in `build_parser`; add new ones (get, put, status, ...) the same way.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Sequence

from raftkv import __version__


class _StopRequested(KeyboardInterrupt):
    """SIGTERM/SIGHUP arrived: handled exactly like Ctrl-C. Signals that arrive while the
    nodes are being stopped are ignored; the stop itself is bounded by --stop-timeout."""


def _raise_stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _StopRequested(signal.Signals(signum).name)


def _print(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


# -- cluster up ---------------------------------------------------------------------------------

def cmd_cluster_up(args: argparse.Namespace) -> int:
    from raftkv import launcher

    token = args.token if args.token is not None else os.environ.get("CLUSTER_TOKEN") or None
    # SIGTERM/SIGHUP stop the cluster like Ctrl-C does, also while it is starting. SIGINT is
    # set explicitly: a shell without job control starts background commands with it ignored.
    old_handlers = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    cluster = None
    try:
        try:
            cluster = launcher.launch(
                args.nodes, args.dir, http_port=args.http_port, mgmt_port=args.mgmt_port,
                raft_port=args.raft_port, grpc_port=args.grpc_port, host=args.host, token=token,
                timeout=args.timeout)
        except launcher.LauncherError as e:
            print(f"raftkv cluster up: {e}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            print("raftkv cluster up: interrupted while starting; all nodes stopped", file=sys.stderr,
                  flush=True)
            return 0

        first = cluster.nodes[0]
        _print(*launcher.describe(cluster))
        _print(f"Try: curl '{first.http_url}/get-val?key=hello'   "
               f"(status: curl {first.mgmt_url}/status)",
               "Press Ctrl-C to stop.")
        status = _watch(cluster)
    except KeyboardInterrupt:
        status = 0
    finally:
        if cluster is not None:
            # Further signals must not abandon the nodes half-stopped: stop() is bounded.
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_IGN)
            _print("Stopping the cluster ...")
            codes = cluster.stop(timeout=args.stop_timeout)
            unclean = {k: v for k, v in codes.items() if v not in (0,)}
            if unclean:
                _print("Stopped; exit statuses: " + ", ".join(
                    f"{k}={'killed' if v is None else v}" for k, v in sorted(unclean.items())))
            else:
                _print("Stopped.")
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return status


def _watch(cluster) -> int:
    """Foreground loop: report nodes that die; returns 1 when every node is gone."""
    while True:
        for n in cluster.dead_nodes():
            if not n.reported_dead:
                n.reported_dead = True
                print(f"warning: {n.node_id} exited with status {n.proc.returncode}; "
                      f"see {n.log_path}:\n{n.log_tail(15)}", file=sys.stderr, flush=True)
        if len(cluster.dead_nodes()) == len(cluster.nodes):
            print("error: every node has exited", file=sys.stderr, flush=True)
            return 1
        time.sleep(0.5)


# -- parser -------------------------------------------------------------------------------------

def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {v}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def _add_cluster_parser(sub: argparse._SubParsersAction) -> None:
    from raftkv import launcher as L

    cluster = sub.add_parser("cluster", help="run a local cluster (no Docker)")
    csub = cluster.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    up = csub.add_parser(
        "up", help="start N nodes on this machine and keep them running until Ctrl-C",
        description="Start a local RaftKV cluster: node K gets client port HTTP_PORT+K-1, "
                    "management port MGMT_PORT+K-1, Raft port RAFT_PORT+K-1 and loopback gRPC "
                    "ports GRPC_PORT+2(K-1) and GRPC_PORT+2(K-1)+1. node1 bootstraps, the others "
                    "join it. Data and logs go to DIR; running the command again on the same DIR "
                    "restarts the same cluster on its data (options left out are then taken from "
                    "DIR/cluster.json). Ctrl-C or SIGTERM stops every node.",
    )
    up.add_argument("--nodes", "-n", type=_positive_int, default=None,
                    help=f"number of nodes (default {L.DEFAULT_NODES}, or as saved in DIR)")
    up.add_argument("--dir", default=L.DEFAULT_DIR, help=f"folder for data and logs (default {L.DEFAULT_DIR})")
    up.add_argument("--http-port", type=_port, default=None,
                    help=f"client HTTP port of node1 (default {L.DEFAULT_HTTP_PORT})")
    up.add_argument("--mgmt-port", type=_port, default=None,
                    help=f"management port of node1 (default {L.DEFAULT_MGMT_PORT})")
    up.add_argument("--raft-port", type=_port, default=None,
                    help=f"Raft port of node1 (default {L.DEFAULT_RAFT_PORT})")
    up.add_argument("--grpc-port", type=_port, default=None,
                    help=f"engine gRPC port of node1; the sidecar's is the next one "
                         f"(default {L.DEFAULT_GRPC_PORT})")
    up.add_argument("--host", default=None,
                    help=f"address every node listens on and advertises (default {L.DEFAULT_HOST})")
    up.add_argument("--token", default=None,
                    help="cluster token required by /join and /leave (default: $CLUSTER_TOKEN; "
                         "prefer the environment, a command line is visible in ps)")
    up.add_argument("--timeout", type=float, default=L.DEFAULT_READY_TIMEOUT,
                    help="seconds to wait for every node to become ready (default %(default)s)")
    up.add_argument("--stop-timeout", type=float, default=L.DEFAULT_STOP_TIMEOUT,
                    help="seconds to wait for the nodes to stop before SIGKILL (default %(default)s)")
    up.set_defaults(func=cmd_cluster_up)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raftkv", description="RaftKV for Python")
    parser.add_argument("--version", action="version", version=f"raftkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_cluster_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
