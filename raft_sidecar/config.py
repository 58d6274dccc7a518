"""Sidecar configuration from the original's Go-style flags plus the environment."""
from __future__ import annotations

import argparse
import logging
import socket
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from raftkv import grpc_tls
from raftkv.grpc_tls import GrpcTLS
from raftkv.secretfile import SecretError, resolve_secret


@dataclass(frozen=True)
class SidecarConfig:
    node_id: str = "node1"
    raft_port: int = 8088
    grpc_port: int = 50052
    app_addr: str = "localhost:50051"
    mgmt_port: int = 6000
    bootstrap: bool = False
    data_dir: str = "raft-data"
    join_addr: str = ""
    advertise: str = ""           # host:raftport other nodes dial
    bind_host: str = "0.0.0.0"
    grpc_host: str = "127.0.0.1"
    # Secrets never go into repr/logs (docs/security.md).
    cluster_token: str | None = field(default=None, repr=False)
    raft_secret: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    # TLS on the RaftNode server and the channel to the engine (raftkv/grpc_tls.py).
    grpc_tls: GrpcTLS = GrpcTLS()
    # Raft timing. Election timeouts sit well above the 100 ms heartbeat so that a
    # busy 2-core machine does not cause spurious elections (note §9).
    raft_min_timeout: float = 1.0
    raft_max_timeout: float = 2.0
    heartbeat: float = 0.1
    connection_timeout: float = 3.5
    leader_fallback_timeout: float = 3.0
    compact_entries: int = 20000
    compact_seconds: float = 600.0
    propose_timeout: float = 5.0
    apply_fail_timeout: float = 30.0
    # Committed entries nobody on this node waits for are delivered to the engine
    # in batches gathered over this long (applier.py); 0 delivers each at once.
    apply_batch_delay: float = 0.02
    join_tries: int = 20
    join_interval: float = 2.0
    # Warnings found while parsing, logged by main() once logging is set up.
    notices: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def mgmt_advertise(self) -> str:
        return f"{self.advertise.rsplit(':', 1)[0]}:{self.mgmt_port}"

    @property
    def journal_file(self) -> str:
        return f"{self.data_dir}/raft.journal"

    @property
    def dump_file(self) -> str:
        return f"{self.data_dir}/raft.dump"

    @property
    def members_file(self) -> str:
        return f"{self.data_dir}/members.json"


def _bool(text: str) -> bool:
    t = str(text).lower()
    if t in ("1", "true", "t", "yes", "y", "on"):
        return True
    if t in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text}")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return value


def _go_style(argv: Sequence[str]) -> list[str]:
    """Go's flag package takes `-name value` and `-name=value`; argparse wants `--name`."""
    out = []
    for a in argv:
        if a.startswith("-") and not a.startswith("--") and len(a) > 2 and not a[1].isdigit():
            a = "-" + a
        out.append(a)
    return out


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> SidecarConfig:
    env = env or {}
    p = argparse.ArgumentParser(prog="python -m raft_sidecar",
                                description="RaftKV Raft sidecar (PySyncObj). Flags accept -name or --name.")
    p.add_argument("--id", default="node1", help="node id (node1)")
    p.add_argument("--raft", type=_port, default=8088, help="Raft TCP port (8088)")
    p.add_argument("--srv", type=_port, default=50052, help="RaftNode gRPC port (50052)")
    p.add_argument("--app", default="localhost:50051", help="engine StateMachine address (localhost:50051)")
    p.add_argument("--mgmt", type=_port, default=6000, help="management HTTP port (6000)")
    p.add_argument("--bootstrap", type=_bool, nargs="?", const=True, default=False,
                   help="start a new cluster with this node as its only member")
    p.add_argument("--data", default="raft-data", help="Raft data directory (raft-data)")
    p.add_argument("--join", default="", help="management address HOST:PORT of any member to join")
    p.add_argument("--advertise", default="", help="host[:raftport] other nodes use to reach this one")
    p.add_argument("--bind-host", default=env.get("BIND_HOST", "0.0.0.0"),
                   help="listen address for Raft and management (0.0.0.0)")
    p.add_argument("--grpc-host", default="127.0.0.1", help="RaftNode gRPC listen address (127.0.0.1)")
    p.add_argument("--cluster-token", default=None,
                   help="DEPRECATED (visible in ps): token required by /join and /leave; "
                        "use env CLUSTER_TOKEN or --cluster-token-file")
    p.add_argument("--cluster-token-file", default=None,
                   help="file holding the token required by /join and /leave (or env CLUSTER_TOKEN)")
    p.add_argument("--raft-secret-file", default=None,
                   help="file holding the secret that encrypts and authenticates Raft traffic "
                        "(or env RAFT_SECRET); every member needs the same one")
    p.add_argument("--log-level", default=env.get("LOG_LEVEL", "INFO"))
    p.add_argument("--election-timeout", type=float, nargs=2, metavar=("MIN", "MAX"), default=(1.0, 2.0))
    p.add_argument("--compact-entries", type=int, default=20000,
                   help="compact the Raft log into a snapshot beyond this many entries")
    p.add_argument("--compact-seconds", type=float, default=600.0,
                   help="and at least this often (seconds)")
    p.add_argument("--propose-timeout", type=float, default=5.0)
    p.add_argument("--apply-fail-timeout", type=float, default=30.0,
                   help="exit (fail-stop) if the engine refuses committed entries this long")
    p.add_argument("--apply-batch-delay", type=float, default=0.02,
                   help="seconds this node may hold committed entries that no request on it waits for, "
                        "to hand them to its engine several per call (0.02; 0 = one by one at once). "
                        "Only `local` reads on this node see such writes up to this much later")
    p.add_argument("--join-tries", type=int, default=20)
    p.add_argument("--join-interval", type=float, default=2.0)
    grpc_tls.add_arguments(p, env, peer="engine's StateMachine")
    a = p.parse_args(_go_style(argv))

    advertise = a.advertise
    if not advertise:
        advertise = a.bind_host if a.bind_host not in ("0.0.0.0", "::", "") else socket.gethostname()
    if ":" not in advertise:
        advertise = f"{advertise}:{a.raft}"
    lo, hi = a.election_timeout
    if not 0 < lo < hi:
        p.error("--election-timeout needs 0 < MIN < MAX")
    if not 0 <= a.apply_batch_delay <= 1.0:
        p.error(f"--apply-batch-delay must be between 0 and 1 second, got {a.apply_batch_delay}")
    try:
        cluster_token, token_notices = resolve_secret(
            "cluster token", file=a.cluster_token_file, env=env, env_var="CLUSTER_TOKEN",
            argv_value=a.cluster_token, argv_flag="--cluster-token")
        raft_secret, secret_notices = resolve_secret("raft secret", file=a.raft_secret_file, env=env,
                                                     env_var="RAFT_SECRET")
    except SecretError as exc:
        p.error(str(exc))
    tls = grpc_tls.from_parsed(p, a)
    return SidecarConfig(
        node_id=a.id, raft_port=a.raft, grpc_port=a.srv, app_addr=a.app, mgmt_port=a.mgmt,
        bootstrap=a.bootstrap, data_dir=a.data, join_addr=a.join, advertise=advertise,
        bind_host=a.bind_host, grpc_host=a.grpc_host,
        cluster_token=cluster_token, raft_secret=raft_secret,
        log_level=a.log_level.upper(), raft_min_timeout=lo, raft_max_timeout=hi,
        connection_timeout=max(3.5, hi + 1.0), leader_fallback_timeout=max(3.0, hi * 1.5),
        compact_entries=a.compact_entries, compact_seconds=a.compact_seconds,
        propose_timeout=a.propose_timeout, apply_fail_timeout=a.apply_fail_timeout,
        apply_batch_delay=a.apply_batch_delay,
        join_tries=a.join_tries, join_interval=a.join_interval, grpc_tls=tls,
        notices=tuple(token_notices + secret_notices),
    )


def setup_logging(level: str, node_id: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s %(levelname)s sidecar[{node_id}] %(name)s: %(message)s",
    )
