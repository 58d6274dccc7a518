"""Engine configuration: built once from the command line and environment, passed down."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from raftkv import grpc_tls
from raftkv.grpc_tls import GrpcTLS
from raftkv.secretfile import SecretError, resolve_secret

DEFAULT_MAX_VALUE_BYTES = 1 << 20
# Room for the msgpack framing and a key next to the largest value.
BODY_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class EngineConfig:
    http_port: int = 8080
    grpc_port: int = 50051
    sidecar_port: int = 50052
    db_path: str = "kv.db"
    http_host: str = "0.0.0.0"
    grpc_host: str = "127.0.0.1"
    sidecar_host: str = "127.0.0.1"
    max_key_bytes: int = 4096
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    propose_timeout: float = 5.0
    read_timeout: float = 5.0
    max_inflight_writes: int = 4096
    max_batch_commands: int = 512
    # Under load, the next proposal waits up to batch_window seconds for as many
    # writes as the last one held (raft_client.RaftClient._fill_batch); never when
    # the last proposal held fewer than batch_wait_min writes, so light load pays nothing.
    batch_window: float = 0.004
    batch_wait_min: int = 8
    max_scan_limit: int = 10_000     # /v1/range: most keys in one page
    max_txn_ops: int = 1_000         # /v1/txn: most ops in one transaction
    apply_audit: str | None = None
    log_level: str = "INFO"
    # Security and limits (docs/security.md). The token never goes into repr/logs.
    client_token: str | None = field(default=None, repr=False)
    metrics_public: bool = False
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    max_concurrent_requests: int = 1024
    # TLS on the StateMachine server and the channel to the sidecar (raftkv/grpc_tls.py).
    grpc_tls: GrpcTLS = GrpcTLS()
    # Warnings found while parsing, logged by main() once logging is set up.
    notices: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def max_body_bytes(self) -> int:
        return self.max_value_bytes + self.max_key_bytes + BODY_OVERHEAD_BYTES

    @property
    def sidecar_target(self) -> str:
        return f"{self.sidecar_host}:{self.sidecar_port}"


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return value


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> EngineConfig:
    """The original's positional form `HTTP_PORT GRPC_PORT SIDECAR_PORT DB_PATH` plus long options."""
    env = env or {}
    p = argparse.ArgumentParser(
        prog="python -m storage_engine",
        description="RaftKV storage engine (client HTTP API + gRPC StateMachine).",
    )
    p.add_argument("http_port", type=_port, help="client HTTP port (original: 8080)")
    p.add_argument("grpc_port", type=_port, help="StateMachine gRPC port the sidecar calls (50051)")
    p.add_argument("sidecar_port", type=_port, help="the local sidecar's RaftNode gRPC port (50052)")
    p.add_argument("db_path", help="LevelDB directory (created if missing)")
    p.add_argument("--http-host", default=env.get("ENGINE_HTTP_HOST", "0.0.0.0"))
    p.add_argument("--grpc-host", default="127.0.0.1", help="StateMachine listen address")
    p.add_argument("--sidecar-host", default="127.0.0.1")
    p.add_argument("--max-key-bytes", type=int, default=4096)
    p.add_argument("--max-value-bytes", type=int, default=DEFAULT_MAX_VALUE_BYTES)
    p.add_argument("--propose-timeout", type=float, default=5.0,
                   help="seconds a write waits for commit before answering 'outcome unknown'")
    p.add_argument("--read-timeout", type=float, default=5.0,
                   help="seconds a linearizable read waits for its barrier")
    p.add_argument("--max-inflight-writes", type=int, default=4096,
                   help="writes waiting for commit on this node; beyond it clients get 503 at once")
    p.add_argument("--batch-window-ms", type=float, default=4.0,
                   help="under load, how long the next Raft proposal may wait to fill up "
                        "(0 turns it off; default 4)")
    p.add_argument("--batch-wait-min", type=int, default=8,
                   help="wait only when the previous proposal held at least this many writes (8)")
    p.add_argument("--max-scan-limit", type=int, default=10_000,
                   help="most keys one /v1/range page may ask for (limit=)")
    p.add_argument("--max-txn-ops", type=int, default=1_000,
                   help="most operations in one /v1/txn")
    p.add_argument("--apply-audit", default=None,
                   help="append '<raft index>' per applied entry to this file (testing aid)")
    p.add_argument("--log-level", default=env.get("LOG_LEVEL", "INFO"))
    p.add_argument("--client-token-file", default=None,
                   help="file holding the bearer token every client request must carry "
                        "(or env RAFTKV_CLIENT_TOKEN); /health is always open")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without the client token")
    p.add_argument("--tls-cert-file", default=None, help="serve the client API over HTTPS with this PEM chain")
    p.add_argument("--tls-key-file", default=None, help="private key (PEM) for --tls-cert-file")
    p.add_argument("--max-concurrent-requests", type=int, default=1024,
                   help="client requests handled at once; beyond it clients get 429 (/v1) or 503 at once")
    grpc_tls.add_arguments(p, env, peer="sidecar's RaftNode")
    a = p.parse_args(list(argv))
    if a.max_value_bytes <= 0 or a.max_key_bytes <= 0:
        p.error("size limits must be positive")
    if a.max_scan_limit <= 0 or a.max_txn_ops <= 0:
        p.error("--max-scan-limit and --max-txn-ops must be positive")
    if not 0 <= a.batch_window_ms <= 1000 or a.batch_wait_min < 1:
        p.error("--batch-window-ms must be 0..1000 and --batch-wait-min at least 1")
    if a.max_concurrent_requests <= 0:
        p.error("--max-concurrent-requests must be positive")
    if bool(a.tls_cert_file) != bool(a.tls_key_file):
        p.error("--tls-cert-file and --tls-key-file go together")
    try:
        client_token, notices = resolve_secret("client token", file=a.client_token_file, env=env,
                                               env_var="RAFTKV_CLIENT_TOKEN")
    except SecretError as exc:
        p.error(str(exc))
    tls = grpc_tls.from_parsed(p, a)
    return EngineConfig(
        http_port=a.http_port, grpc_port=a.grpc_port, sidecar_port=a.sidecar_port,
        db_path=a.db_path, http_host=a.http_host, grpc_host=a.grpc_host,
        sidecar_host=a.sidecar_host, max_key_bytes=a.max_key_bytes,
        max_value_bytes=a.max_value_bytes, propose_timeout=a.propose_timeout,
        read_timeout=a.read_timeout, max_inflight_writes=a.max_inflight_writes,
        batch_window=a.batch_window_ms / 1000.0, batch_wait_min=a.batch_wait_min,
        apply_audit=a.apply_audit, log_level=a.log_level.upper(),
        max_scan_limit=a.max_scan_limit, max_txn_ops=a.max_txn_ops,
        client_token=client_token, metrics_public=a.metrics_public,
        tls_cert_file=a.tls_cert_file, tls_key_file=a.tls_key_file,
        max_concurrent_requests=a.max_concurrent_requests, grpc_tls=tls, notices=tuple(notices),
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s engine %(name)s: %(message)s",
    )
