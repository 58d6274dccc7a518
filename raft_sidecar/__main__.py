"""`python -m raft_sidecar` with the original's Go-style flags."""
from __future__ import annotations

from raftkv.grpc_env import use_iomgr_endpoints

use_iomgr_endpoints()  # before grpc is imported

import asyncio
import logging
import os
import signal
import sys
import time

import grpc
from aiohttp import web

from raftkv import grpc_tls
from raftkv.pb import consensus_pb2_grpc as pb_grpc

from . import fresh_start, joiner, shutdown
from .durable import DurableError, check_data_dir
from .applier import Applier
from .config import SidecarConfig, parse_args, setup_logging
from .management import Management
from .node import MembersFile, RaftKVNode
from .rpc import RaftNodeService, RaftOutcome, call_replicated
from .snapshot import Snapshots, read_header

log = logging.getLogger("raft_sidecar")

ENGINE_WAIT = 60.0


async def initial_peers(cfg: SidecarConfig, members_file: MembersFile,
                        engine_index: int = 0) -> tuple[list[str], bool]:
    """Returns (peers, joining). Persisted membership wins over -bootstrap/-join; with none,
    a node that lost its Raft state is refused (fresh_start.py, docs/recovery.md)."""
    stored = members_file.load()
    if stored:
        if cfg.bootstrap or cfg.join_addr:
            log.info("restarting with the persisted membership %s; ignoring -bootstrap/-join", stored)
        return stored, False
    if os.path.exists(cfg.journal_file):
        raise SystemExit(f"{cfg.journal_file} exists but {cfg.members_file} does not: refusing to guess the "
                         f"membership. Restore members.json or wipe {cfg.data_dir} and join again.")
    try:
        fresh_start.refuse_engine_data_without_raft_state(cfg, engine_index)
        if cfg.join_addr:
            members = await joiner.fetch_members(cfg)
            fresh_start.refuse_if_member(cfg, members)
            return members, True
        if cfg.bootstrap:
            await fresh_start.refuse_if_cluster_exists(cfg, fresh_start.peers_from_env(os.environ))
            return [cfg.advertise], False
    except fresh_start.FreshStartRefused as exc:
        raise SystemExit(f"refusing to start: {exc}") from None
    raise SystemExit("no cluster to be part of: pass -bootstrap on the first node or -join HOST:MGMTPORT")


async def register_self(cfg: SidecarConfig, node: RaftKVNode) -> None:
    """Keeps this node's id and management address in the replicated registry:
    followers need the leader's management address to forward /join and /leave."""
    while True:
        info = node.registry_snapshot().get(cfg.advertise, {})
        if node.selfNode.address in node.members() and node.leader_address() and \
                (info.get("id") != cfg.node_id or info.get("mgmt") != cfg.mgmt_advertise):
            try:
                await call_replicated(node.register, cfg.advertise, cfg.node_id, cfg.mgmt_advertise, timeout=5.0)
            except RaftOutcome as out:
                log.debug("self-registration not confirmed yet: %s", out)
        await asyncio.sleep(0.5)


async def serve(cfg: SidecarConfig) -> int:
    try:
        os.makedirs(cfg.data_dir, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"refusing to start: cannot create the Raft data dir {cfg.data_dir}: {exc}") from None
    try:
        # Refuse an inconsistent data dir (compacted journal without its dump, torn
        # dump, corrupt meta) instead of starting empty and rejoining as if new.
        check_data_dir(cfg.journal_file, cfg.dump_file, dump_header_check=read_header)
    except DurableError as exc:
        raise SystemExit(f"refusing to start: {exc}")
    loop = asyncio.get_running_loop()
    log.info("%s", cfg.grpc_tls.describe())
    applier = Applier(cfg.app_addr, cfg.apply_fail_timeout, tls=cfg.grpc_tls, batch_delay=cfg.apply_batch_delay)
    engine_index = await loop.run_in_executor(None, applier.connect, time.monotonic() + ENGINE_WAIT)
    log.info("engine at %s has applied index %d", cfg.app_addr, engine_index)
    applier.start()
    members_file = MembersFile(cfg.members_file)
    peers, joining = await initial_peers(cfg, members_file, engine_index)
    snapshots = Snapshots(applier, wait_timeout=30.0, dump_path=cfg.dump_file)
    try:
        node = RaftKVNode(cfg, peers, applier, members_file, snapshots, persist_members=not joining)
    except DurableError as exc:
        raise SystemExit(f"refusing to start: {exc}")
    except OSError as exc:  # e.g. ENOSPC creating the journal: name the file, no traceback
        raise SystemExit(f"refusing to start: cannot write the Raft data in {cfg.data_dir}: {exc}") from None
    log.info("raft node %s at %s, peers %s", cfg.node_id, cfg.advertise, [p for p in peers if p != cfg.advertise])

    # A proposal carries up to the engine's batch budget (several MiB); gRPC's 4 MiB default is too small.
    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                           ("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_RaftNodeServicer_to_server(RaftNodeService(cfg, node, applier), grpc_server)
    grpc_addr = f"{cfg.grpc_host}:{cfg.grpc_port}"
    try:
        if grpc_tls.add_port(grpc_server, grpc_addr, cfg.grpc_tls) == 0:
            raise RuntimeError("port in use")
    except (RuntimeError, grpc_tls.GrpcTLSError) as exc:
        log.error("cannot listen for gRPC on %s: %s", grpc_addr, exc)
        node.destroy()
        return 1
    await grpc_server.start()
    runner = web.AppRunner(Management(cfg, node, applier).app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.bind_host, cfg.mgmt_port).start()
    except OSError as exc:
        log.error("cannot listen for management HTTP on %s:%d: %s", cfg.bind_host, cfg.mgmt_port, exc)
        node.destroy()
        return 1
    log.info("RaftNode gRPC on %s, management on %s:%d", grpc_addr, cfg.bind_host, cfg.mgmt_port)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if joining:
        try:
            await joiner.join(cfg)
        except joiner.JoinError as exc:
            log.error("%s", exc)
            node.destroy()
            return 1
        node.persist_members = True
    registrar = asyncio.create_task(register_self(cfg, node))

    await stop.wait()
    await stop_gracefully(node, applier, runner, grpc_server, registrar)
    return 0


async def stop_gracefully(node: RaftKVNode, applier: Applier, runner: web.AppRunner,
                          grpc_server: grpc.aio.Server, registrar: asyncio.Task) -> None:
    """SIGTERM: hand leadership over, serve the local engine until it is gone, then stop;
    bounded by ShutdownConfig.total (see shutdown.py)."""
    limits = shutdown.ShutdownConfig()
    deadline = time.monotonic() + limits.total
    log.info("shutting down%s", ": handing leadership over first" if node._isLeader() else "")
    registrar.cancel()
    await shutdown.hand_over_leadership(node, limits)
    left = deadline - time.monotonic() - 2.5  # keep room for closing servers and threads
    engine_gone = await shutdown.wait_engine_gone(applier, min(limits.engine_drain, max(left, 0.0)))
    if engine_gone:
        log.info("the local engine has stopped")
    await runner.cleanup()
    await grpc_server.stop(min(1.0, max(deadline - time.monotonic() - 1.0, 0.1)))
    node.destroy()
    # With the engine gone the applier can only be retrying a delivery: nothing to wait for.
    applier_wait = 0.2 if engine_gone else min(1.0, max(deadline - time.monotonic(), 0.1))
    await applier.stop(applier_wait)
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    setup_logging(cfg.log_level, cfg.node_id)
    for notice in cfg.notices:
        log.warning("%s", notice)
    try:
        return asyncio.run(serve(cfg))
    except SystemExit as exc:
        if isinstance(exc.code, str):
            log.error("%s", exc.code)
            return 2
        raise
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
