"""`python -m storage_engine HTTP_PORT GRPC_PORT SIDECAR_PORT DB_PATH [options]`."""
from __future__ import annotations

from raftkv.grpc_env import use_iomgr_endpoints

use_iomgr_endpoints()  # before grpc is imported

import asyncio
import logging
import os
import signal
import ssl
import sys

import grpc
from aiohttp import web

from raftkv import grpc_tls
from raftkv.pb import consensus_pb2_grpc as pb_grpc

from .config import EngineConfig, parse_args, setup_logging
from .datadir import EngineDataDirError, check_engine_data_dir
from .http_api import ClientAPI
from .raft_client import RaftClient
from .state_machine import StateMachineService
from .store import Store

log = logging.getLogger("storage_engine")

# SIGTERM: how long in-flight client requests may take before they are answered 503.
DRAIN_SECONDS = 5.0


def tls_context(cfg: EngineConfig) -> ssl.SSLContext | None:
    """Server-side TLS for the client HTTP port (--tls-cert-file/--tls-key-file), TLS 1.2+."""
    if not cfg.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    return ctx


async def serve(cfg: EngineConfig) -> int:
    try:
        # Refuse a damaged LevelDB dir, naming the file, before Store opens it: LevelDB
        # itself would start empty over it or silently skip what it cannot read.
        check_engine_data_dir(cfg.db_path)
    except EngineDataDirError as exc:
        log.error("%s", exc)
        return 2
    try:
        store = Store(cfg.db_path, cfg.apply_audit)
    except Exception as exc:  # plyvel.Error, OSError: name the file, no traceback
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        log.error("cannot open the LevelDB store at %s: %s", cfg.db_path, reason)
        return 1
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_StateMachineServicer_to_server(StateMachineService(store), server)
    grpc_addr = f"{cfg.grpc_host}:{cfg.grpc_port}"
    try:
        if grpc_tls.add_port(server, grpc_addr, cfg.grpc_tls) == 0:
            raise RuntimeError("port in use")
    except (RuntimeError, grpc_tls.GrpcTLSError) as exc:
        log.error("cannot listen for gRPC on %s: %s", grpc_addr, exc)
        store.close()
        return 1
    try:
        ssl_ctx = tls_context(cfg)
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot load the TLS certificate %s / key %s: %s", cfg.tls_cert_file, cfg.tls_key_file, exc)
        await server.stop(0)
        store.close()
        return 1
    await server.start()
    log.info("%s", cfg.grpc_tls.describe())
    raft = RaftClient(cfg, store)
    await raft.start()
    runner = web.AppRunner(ClientAPI(cfg, store, raft).app(), access_log=None, shutdown_timeout=DRAIN_SECONDS)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.http_host, cfg.http_port, backlog=1024, ssl_context=ssl_ctx).start()
    except OSError as exc:
        log.error("cannot listen for HTTP on %s:%d: %s", cfg.http_host, cfg.http_port, exc)
        await server.stop(0)
        store.close()
        return 1
    log.info("serving %s on %s:%d, StateMachine gRPC on %s, sidecar at %s; client token %s, "
             "at most %d concurrent requests", "HTTPS" if ssl_ctx else "HTTP", cfg.http_host, cfg.http_port,
             grpc_addr, cfg.sidecar_target, "required" if cfg.client_token else "not required",
             cfg.max_concurrent_requests)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining client requests")
    cleanup = asyncio.create_task(runner.cleanup())
    await asyncio.wait({cleanup}, timeout=DRAIN_SECONDS)
    if not cleanup.done():
        # Requests still waiting on the sidecar (stopped, or no quorum) get an answer
        # now instead of a reset connection.
        raft.abandon("the engine is shutting down")
    await cleanup
    await raft.close()
    await server.stop(2.0)
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    setup_logging(cfg.log_level)
    for notice in cfg.notices:
        log.warning("%s", notice)
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
