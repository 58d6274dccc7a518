"""The `raftkv` command (docs/cli.md).

Each subcommand is a `cmd_*` function taking the parsed arguments and returning an exit
status, registered in `build_parser`. Data and management commands go through the client
library (raftkv/client.py); its typed errors become one message on stderr and one exit
status (EXIT_* below) in `main`. Output is for people by default and JSON with --json.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from raftkv import __version__

if TYPE_CHECKING:
    from raftkv.client import Client

# Exit statuses (docs/cli.md): scripts can tell "no such key" from "cluster down".
EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2  # bad arguments, bad request, bad range (argparse also exits 2)
EXIT_COMPARE_FAILED = 3
EXIT_UNAVAILABLE = 4  # unreachable, no leader, no quorum, overloaded: nothing was written
EXIT_OUTCOME_UNKNOWN = 5  # a write may or may not have been applied
EXIT_AUTH = 6
EXIT_BACKUP = 7  # corrupt backup file, restore refused or not verified
EXIT_ERROR = 8  # anything else (server error, local file error)


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


# -- data and management commands ---------------------------------------------------------------

class CommandError(Exception):
    """A failure the command explains itself (message for stderr, exit status)."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def _secret(what: str, file: str | None, env_var: str, argv_value: str | None = None,
            argv_flag: str | None = None) -> str | None:
    from raftkv.secretfile import SecretError, resolve_secret

    try:
        value, notices = resolve_secret(what, file=file, env=os.environ, env_var=env_var,
                                        argv_value=argv_value, argv_flag=argv_flag)
    except SecretError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    for n in notices:
        print(f"warning: {n}", file=sys.stderr, flush=True)
    return value


def _make_client(args: argparse.Namespace) -> "Client":
    from raftkv import _endpoints
    from raftkv.client import Client

    try:
        ep = _endpoints.resolve(args.nodes, args.mgmt, args.cluster_dir)
    except ValueError as exc:
        raise CommandError(f"bad node list: {exc}", EXIT_USAGE) from None
    args._endpoints = ep
    cluster_token = None
    if hasattr(args, "token_file"):
        cluster_token = _secret("cluster token", args.token_file, "CLUSTER_TOKEN", args.token, "--token")
    client_token = _secret("client token", args.client_token_file, "RAFTKV_CLIENT_TOKEN")
    try:
        return Client(ep.urls, ep.mgmt_urls, token=client_token, cluster_token=cluster_token,
                      timeout=args.timeout, retry_for=args.retry_for, ca_file=args.ca_file,
                      consistency=getattr(args, "consistency", None))
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def _text(b: bytes | None) -> str:
    """Bytes for people: UTF-8 text as is, anything else (or control characters) escaped."""
    if b is None:
        return ""
    try:
        t = b.decode("utf-8")
    except UnicodeDecodeError:
        return repr(b)[2:-1]
    if any(ord(c) < 32 or ord(c) == 127 for c in t):  # incl. tab and newline: one key per line
        return t.encode("unicode_escape").decode("ascii")
    return t


def _json_bytes(doc: dict[str, Any], name: str, b: bytes | None) -> None:
    """The /v1 JSON convention: `name` for UTF-8 text, `name_b64` for other bytes."""
    if b is None:
        return
    try:
        doc[name] = b.decode("utf-8")
    except UnicodeDecodeError:
        doc[f"{name}_b64"] = base64.b64encode(b).decode("ascii")


def _kv_json(kv) -> dict[str, Any]:  # noqa: ANN001 - KeyValue
    doc: dict[str, Any] = {}
    _json_bytes(doc, "key", kv.key)
    _json_bytes(doc, "value", kv.value)
    doc.update(create_revision=kv.create_revision, mod_revision=kv.mod_revision, version=kv.version)
    if kv.revision:
        doc["revision"] = kv.revision
    return doc


def _emit(args: argparse.Namespace, doc: Any, human: str | None) -> None:
    if args.json:
        print(json.dumps(doc, sort_keys=False), flush=True)
    elif human is not None:
        print(human, flush=True)


def _arg_bytes(text: str) -> bytes:
    """Keys and values on the command line are text (UTF-8). '-' as a value: read stdin."""
    return text.encode("utf-8", "surrogateescape")


def _value_arg(text: str) -> bytes:
    if text == "-":
        return sys.stdin.buffer.read()
    return _arg_bytes(text)


def _progress(args: argparse.Namespace, label: str, unit: str):  # noqa: ANN202
    from raftkv._progress import ProgressLine

    return ProgressLine(label, unit, enabled=True if args.progress else (False if args.progress is False else None))


def cmd_get(args: argparse.Namespace) -> int:
    with _make_client(args) as kv:
        item = kv.get(_arg_bytes(args.key), consistency=args.consistency)
    if args.json:
        _emit(args, _kv_json(item), None)
    else:
        value = item.value or b""
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            sys.stdout.buffer.write(value)  # binary: exactly the bytes, no newline added
            sys.stdout.flush()
            return EXIT_OK
        print(value.decode("utf-8"), flush=True)
    return EXIT_OK


def _write_json(r) -> dict[str, Any]:  # noqa: ANN001 - PutResult
    doc: dict[str, Any] = {}
    _json_bytes(doc, "key", r.key)
    doc.update(revision=r.revision, version=r.version, create_revision=r.create_revision,
               mod_revision=r.mod_revision)
    return doc


def cmd_put(args: argparse.Namespace) -> int:
    value = _value_arg(args.value)
    with _make_client(args) as kv:
        r = kv.put(_arg_bytes(args.key), value)
    _emit(args, _write_json(r), f"OK (revision {r.revision}, version {r.version})")
    return EXIT_OK


def cmd_cas(args: argparse.Namespace) -> int:
    expect_version = 0 if args.create else args.expect_version
    if args.expect_value is None and expect_version is None and args.expect_mod_revision is None:
        raise CommandError("cas needs a condition: --expect-value, --expect-version, --expect-mod-revision "
                           "or --create", EXIT_USAGE)
    value = _value_arg(args.value)
    with _make_client(args) as kv:
        r = kv.cas(_arg_bytes(args.key), value,
                   expect_value=None if args.expect_value is None else _arg_bytes(args.expect_value),
                   expect_version=expect_version, expect_mod_revision=args.expect_mod_revision)
    _emit(args, _write_json(r), f"OK (revision {r.revision}, version {r.version})")
    return EXIT_OK


def cmd_del(args: argparse.Namespace) -> int:
    with _make_client(args) as kv:
        r = kv.delete(_arg_bytes(args.key),
                      expect_value=None if args.expect_value is None else _arg_bytes(args.expect_value),
                      expect_version=args.expect_version, expect_mod_revision=args.expect_mod_revision)
    human = f"deleted (revision {r.revision})" if r.deleted else f"{args.key!r} did not exist; nothing deleted"
    _emit(args, {"deleted": r.deleted, "revision": r.revision}, human)
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    if args.prefix is not None and (args.start is not None or args.end is not None):
        raise CommandError("give either START/END or --prefix, not both", EXIT_USAGE)
    b = lambda t: None if t is None else _arg_bytes(t)  # noqa: E731
    n = 0
    with _make_client(args) as kv:
        for item in kv.scan(b(args.start), b(args.end), prefix=b(args.prefix), limit=args.limit,
                            keys_only=args.keys_only, page_size=args.page_size, consistency=args.consistency):
            n += 1
            if args.json:
                print(json.dumps(_kv_json(item)))
            elif args.keys_only:
                print(_text(item.key))
            else:
                print(f"{_text(item.key)}\t{_text(item.value)}")
    if not args.json and sys.stderr.isatty():
        print(f"({n} key{'s' if n != 1 else ''})", file=sys.stderr)
    sys.stdout.flush()
    return EXIT_OK


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _need_mgmt(kv: "Client", args: argparse.Namespace) -> None:
    if not kv.mgmt_urls:
        raise CommandError(f"{args.command} needs the management URLs: pass --mgmt (or RAFTKV_MGMT), "
                           "in the same order as --nodes", EXIT_USAGE)


def cmd_status(args: argparse.Namespace) -> int:
    with _make_client(args) as kv:
        _need_mgmt(kv, args)
        statuses = kv.status()
    ok = [s for s in statuses if s.ok]
    leader = next((s for s in ok if s.is_leader), None)
    leader_id = leader.node_id if leader else next((s.leader_id for s in ok if s.leader_id), "")
    commit = leader.commit_index if leader else max((s.commit_index for s in ok), default=0)
    term = leader.term if leader else max((s.term for s in ok), default=0)
    members = (leader or (ok[0] if ok else None))
    nodes = []
    for s in statuses:
        d: dict[str, Any] = {"mgmt_url": s.mgmt_url, "ok": s.ok}
        if s.ok:
            d.update(node_id=s.node_id, role="leader" if s.is_leader else "follower", term=s.term,
                     commit_index=s.commit_index, applied_index=s.applied_index,
                     lag=max(0, commit - s.applied_index))
        else:
            d["error"] = s.error
        nodes.append(d)
    if args.json:
        _emit(args, {"leader": leader_id or None, "term": term, "commit_index": commit,
                     "members": [m.__dict__ for m in members.members] if members else [],
                     "nodes": nodes}, None)
    else:
        rows = [["NODE", "MANAGEMENT", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG"]]
        for d in nodes:
            if d["ok"]:
                rows.append([d["node_id"], d["mgmt_url"], d["role"], str(d["term"]), str(d["commit_index"]),
                             str(d["applied_index"]), str(d["lag"])])
            else:
                rows.append(["?", d["mgmt_url"], "unreachable", "-", "-", "-", "-"])
        print(f"leader: {leader_id or 'none known'}   term: {term}   commit index: {commit}   "
              f"members: {len(members.members) if members else '?'}")
        print(_table(rows))
        for d in nodes:
            if not d["ok"]:
                print(f"  {d['mgmt_url']}: {d['error']}")
        sys.stdout.flush()
    if not ok:
        raise CommandError("no node answered on its management port: " +
                           "; ".join(f"{s.mgmt_url}: {s.error}" for s in statuses), EXIT_UNAVAILABLE)
    return EXIT_OK if leader_id else EXIT_UNAVAILABLE


def cmd_members(args: argparse.Namespace) -> int:
    with _make_client(args) as kv:
        _need_mgmt(kv, args)
        statuses = kv.status()
        members = kv.members_from(statuses)
    leader_id = next((s.node_id for s in statuses if s.ok and s.is_leader), "") or \
        next((s.leader_id for s in statuses if s.ok and s.leader_id), "")
    members = sorted(members, key=lambda m: m.id)
    if args.json:
        _emit(args, [{"id": m.id, "address": m.address, "mgmt": m.mgmt, "leader": m.id == leader_id}
                     for m in members], None)
    else:
        rows = [["ID", "RAFT ADDRESS", "MANAGEMENT", "ROLE"]]
        rows += [[m.id, m.address, m.mgmt or "-", "leader" if m.id == leader_id else "follower"] for m in members]
        print(_table(rows), flush=True)
    return EXIT_OK


def _members_line(doc: dict[str, Any]) -> str:
    return ", ".join(f"{m.get('id')} ({m.get('address')})" for m in doc.get("members", []))


def cmd_join(args: argparse.Namespace) -> int:
    with _make_client(args) as kv:
        _need_mgmt(kv, args)
        doc = kv.join(args.node_id, args.raft_address, args.mgmt_address)
    _emit(args, doc, f"{args.node_id} is a member; members: {_members_line(doc)}")
    return EXIT_OK


def cmd_leave(args: argparse.Namespace) -> int:
    with _make_client(args) as kv:
        _need_mgmt(kv, args)
        doc = kv.leave(args.node_id)
    what = "was not a member" if doc.get("status") == "not a member" else "removed"
    _emit(args, doc, f"{args.node_id} {what}; members: {_members_line(doc)}")
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    from raftkv._progress import human_bytes

    dest = Path(args.file)
    if dest.exists() and not args.overwrite:
        raise CommandError(f"{dest} exists; pass --overwrite to replace it", EXIT_USAGE)
    if not dest.parent.is_dir():
        raise CommandError(f"folder {dest.parent} does not exist", EXIT_USAGE)
    bar = _progress(args, "backup", "bytes")
    with _make_client(args) as kv:
        info = kv.backup(dest, consistency=args.consistency, progress=bar)
    bar.done(info.bytes)
    _emit(args, {"file": info.path, "keys": info.count, "bytes": info.bytes, "revision": info.revision,
                 "applied_index": info.applied_index, "node": info.node, "seconds": round(info.seconds, 3)},
          f"wrote {info.path}: {info.count:,} keys, {human_bytes(info.bytes)}, revision {info.revision} "
          f"(from {info.node}, {info.seconds:.1f} s)")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    if not Path(args.file).is_file():
        raise CommandError(f"no such file: {args.file}", EXIT_USAGE)
    bar = _progress(args, "restore", "keys")
    with _make_client(args) as kv:
        info = kv.restore(args.file, force=args.force, txn_ops=args.txn_ops, parallel=args.parallel,
                          progress=bar)
    bar.done(info.count, info.count)
    _emit(args, {"file": info.path, "keys": info.count, "txns": info.txns, "keys_after": info.keys_after,
                 "seconds": round(info.seconds, 3)},
          f"restored {info.count:,} keys from {info.path} in {info.txns} txns ({info.seconds:.1f} s); "
          f"the cluster now holds {info.keys_after:,} keys")
    return EXIT_OK


def _suite_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "run.py").is_file():
        raise CommandError("the benchmark suite lives in the bench/ folder of a source checkout of raftkv; "
                           f"it is not next to this installation ({root})", EXIT_USAGE)
    return root


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite is not None:
        root = _suite_root()
        cmd = [sys.executable, "-m", "bench.run", *shlex.split(args.suite)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
        return subprocess.call(cmd, cwd=str(root), env=env)
    import asyncio

    from raftkv import _bench
    from raftkv.client import AsyncClient

    spec = _bench.BenchSpec(workload=args.workload, concurrency=args.concurrency, duration=args.duration,
                            warmup=args.warmup, keys=args.keys, value_size=args.value_size,
                            read_ratio=args.read_ratio, consistency=args.consistency or "linearizable",
                            prefix=args.prefix)
    probe = _make_client(args)  # resolves nodes and tokens exactly like every other command
    probe.close()
    bars: dict[str, Any] = {}

    def progress(phase: str, done: float, total: float | None, extra: str) -> None:
        bar = bars.get(phase)
        if bar is None:
            for other in bars.values():
                other.done()
            bar = bars[phase] = _progress(args, phase, "keys" if phase == "preload" else "s")
        bar.update(done, total, extra)

    async def go():  # noqa: ANN202
        async with AsyncClient(probe.urls, probe.mgmt_urls, options=probe.options, ca_file=args.ca_file) as kv:
            return await _bench.run(kv, spec, progress)

    result = asyncio.run(go())
    for bar in bars.values():
        bar.done()
    doc = result.to_json()
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    _emit(args, doc,
          f"{spec.workload} c={spec.concurrency} {spec.duration:g} s: {doc['ok']:,} ok, {doc['errors']} errors, "
          f"{doc['ops_per_s']:,.0f} ops/s, p50 {fmt(doc['p50_ms'])} ms, p99 {fmt(doc['p99_ms'])} ms, "
          f"max {fmt(doc['max_ms'])} ms" + (f"; errors: {doc['errors_by_kind']}" if doc["errors"] else ""))
    return EXIT_OK if doc["ok"] and not doc["errors"] else EXIT_ERROR


# -- errors -> messages and exit statuses -------------------------------------------------------

def _explain(exc: BaseException, args: argparse.Namespace) -> tuple[str, int]:
    from raftkv import _errors as E
    from raftkv.backup import BackupError

    if isinstance(exc, CommandError):
        return str(exc), exc.status
    if isinstance(exc, BackupError):
        return f"bad backup file: {exc}", EXIT_BACKUP
    if isinstance(exc, E.NotFound):
        return f"key {getattr(args, 'key', '')!r} not found", EXIT_NOT_FOUND
    if isinstance(exc, E.CompareFailed):
        cur = exc.current
        if cur is None:
            where = f" (failed ops: {exc.failed})" if exc.failed else ""
            return f"compare failed{where}: nothing was written", EXIT_COMPARE_FAILED
        now = (f"it has version {cur.version}, mod_revision {cur.mod_revision}" if cur.exists
               else "it does not exist")
        return f"compare failed for {getattr(args, 'key', '')!r}: {now}; nothing was written", EXIT_COMPARE_FAILED
    if isinstance(exc, E.RestoreError):
        return str(exc), EXIT_BACKUP
    if isinstance(exc, (E.Unauthorized, E.Forbidden)):
        hint = ("the cluster token (--token-file, $CLUSTER_TOKEN)" if args.command in ("join", "leave")
                else "the client token (--client-token-file, $RAFTKV_CLIENT_TOKEN)")
        return f"{exc} (check {hint})", EXIT_AUTH
    if isinstance(exc, E.OutcomeUnknown):
        return (f"{exc}. The write may or may not have been applied (never twice); read the key to find out",
                EXIT_OUTCOME_UNKNOWN)
    if isinstance(exc, E.Unavailable):
        ep = getattr(args, "_endpoints", None)
        if exc.code == "connection" and ep is not None:
            nodes = ", ".join(ep.mgmt_urls if args.command in ("join", "leave") else ep.urls)
            return (f"cannot reach the cluster ({exc}). Tried {nodes} (from {ep.source}). Is it running? "
                    "Start a local one with `raftkv cluster up`, or point --nodes / RAFTKV_NODES at it",
                    EXIT_UNAVAILABLE)
        return f"cluster unavailable: {exc}", EXIT_UNAVAILABLE
    if isinstance(exc, E.Overloaded):
        return f"cluster overloaded: {exc}", EXIT_UNAVAILABLE
    if isinstance(exc, (E.BadRange, E.BadRequest, E.TooLarge)):
        return exc.reason, EXIT_USAGE
    if isinstance(exc, E.RaftKVError):
        return str(exc), EXIT_ERROR
    if isinstance(exc, ValueError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", EXIT_ERROR
    raise exc


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


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return v


def _txn_ops(text: str) -> int:
    v = _positive_int(text)
    if v > 500:
        raise argparse.ArgumentTypeError("at most 500 keys per transaction")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return v


def _connection_options() -> argparse.ArgumentParser:
    """Options every data and management command takes (after the command name)."""
    from raftkv._core import DEFAULT_RETRY_FOR, DEFAULT_TIMEOUT

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", metavar="URLS",
                   help="client URLs of the nodes, comma-separated ('http://h:8080,8081,8082': a bare port "
                        "reuses the previous host). Default: $RAFTKV_NODES, else DIR/cluster.json of "
                        "`raftkv cluster up`, else http://127.0.0.1:8080,8081,8082")
    g.add_argument("--mgmt", metavar="URLS",
                   help="management URLs of the same nodes in the same order (default: $RAFTKV_MGMT, "
                        "else from cluster.json, else http://127.0.0.1:6000,6001,6002 with the default nodes)")
    g.add_argument("--cluster-dir", metavar="DIR",
                   help="folder of a `raftkv cluster up` cluster to read cluster.json from "
                        "(default: $RAFTKV_CLUSTER_DIR, else .raftkv-cluster)")
    g.add_argument("--client-token-file", metavar="FILE",
                   help="file with the client token sent as 'Authorization: Bearer' (default: "
                        "$RAFTKV_CLIENT_TOKEN)")
    g.add_argument("--ca-file", metavar="FILE", help="CA certificate(s) to verify https:// nodes with")
    g.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="seconds per attempt (default %(default)s)")
    g.add_argument("--retry-for", type=float, default=DEFAULT_RETRY_FOR, metavar="S",
                   help="seconds to keep retrying through other nodes (default %(default)s)")
    g.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")
    return p


def _consistency_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--consistency", choices=["linearizable", "leader", "local"], default=None,
                   help="read consistency (default linearizable)")


def _condition_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expect-value", metavar="V", help="only if the current value is V")
    p.add_argument("--expect-version", type=_non_negative_int, metavar="N",
                   help="only if the key's version is N (0: the key must not exist)")
    p.add_argument("--expect-mod-revision", type=_non_negative_int, metavar="R",
                   help="only if the key was last modified at revision R")


def _progress_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show a progress line on stderr (default: only when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")


def _token_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", metavar="FILE",
                   help="file with the cluster token for join/leave (default: $CLUSTER_TOKEN)")
    p.add_argument("--token", help="the cluster token itself (visible in ps; prefer --token-file or "
                                   "$CLUSTER_TOKEN)")


def _add_data_parsers(sub: argparse._SubParsersAction) -> None:
    common = [_connection_options()]

    p = sub.add_parser("get", parents=common, help="print the value of a key",
                       description="Print the value of KEY (exit status 1 when it does not exist). "
                                   "--json adds its metadata (versions and revisions).")
    p.add_argument("key")
    _consistency_option(p)
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("put", parents=common, help="set a key",
                       description="Set KEY to VALUE ('-': read the value from stdin).")
    p.add_argument("key")
    p.add_argument("value")
    p.set_defaults(func=cmd_put)

    p = sub.add_parser("del", parents=common, help="delete a key",
                       description="Delete KEY, optionally only if a condition holds. Deleting a key "
                                   "that does not exist succeeds and says so.")
    p.add_argument("key")
    _condition_options(p)
    p.set_defaults(func=cmd_del)

    p = sub.add_parser("cas", parents=common, help="compare-and-set a key",
                       description="Set KEY to VALUE only if the condition(s) hold; otherwise nothing is "
                                   "written and the exit status is 3.")
    p.add_argument("key")
    p.add_argument("value", help="new value ('-': read it from stdin)")
    _condition_options(p)
    p.add_argument("--create", action="store_true", help="only if the key does not exist "
                                                         "(= --expect-version 0)")
    p.set_defaults(func=cmd_cas)

    p = sub.add_parser("scan", parents=common, help="list keys in a range or under a prefix",
                       description="List keys from START (inclusive) to END (exclusive) in byte order, or "
                                   "every key under --prefix; without arguments, every key. One "
                                   "'key<TAB>value' line per key (JSON Lines with --json).")
    p.add_argument("start", nargs="?")
    p.add_argument("end", nargs="?")
    p.add_argument("--prefix")
    p.add_argument("--limit", type=_positive_int, help="at most this many keys")
    p.add_argument("--keys-only", action="store_true")
    p.add_argument("--page-size", type=_positive_int, default=1000,
                   help="keys per request (default %(default)s, at most 10000)")
    _consistency_option(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("status", parents=common, help="members, leader, term, commit/applied index, lag",
                       description="Ask every node's management API for its Raft state and print a table. "
                                   "Exit status 4 when no node answers or no leader is known.")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("members", parents=common, help="list the Raft members")
    p.set_defaults(func=cmd_members)

    p = sub.add_parser("join", parents=common, help="add a member through the management API",
                       description="Add NODE_ID at RAFT_ADDRESS (host:raft-port) to the cluster. A node "
                                   "started with -join / JOIN_ADDR does this itself; this is the manual "
                                   "form. Idempotent.")
    p.add_argument("node_id")
    p.add_argument("raft_address", help="HOST:RAFTPORT the other members reach the new node at")
    p.add_argument("--mgmt-address", metavar="HOST:PORT", help="the new node's management address")
    _token_options(p)
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("leave", parents=common, help="remove a member through the management API",
                       description="Remove NODE_ID from the cluster (a leader hands leadership over "
                                   "first). Stop its processes afterwards. Idempotent.")
    p.add_argument("node_id")
    _token_options(p)
    p.set_defaults(func=cmd_leave)

    p = sub.add_parser("backup", parents=common, help="save a consistent snapshot of all keys to FILE",
                       description="Stream a consistent snapshot from one node into FILE (written to a "
                                   "temporary file, verified, then renamed).")
    p.add_argument("file")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    _consistency_option(p)
    _progress_options(p)
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", parents=common, help="write every key of a backup FILE into the cluster",
                       description="Verify FILE completely, then write its keys as transactions; refuses a "
                                   "cluster that holds any key unless --force (then the backup's keys "
                                   "overwrite, other keys stay). Checks the key count at the end. "
                                   "Revisions and versions start anew; values are preserved.")
    p.add_argument("file")
    p.add_argument("--force", action="store_true", help="restore into a non-empty cluster")
    p.add_argument("--txn-ops", type=_txn_ops, default=500, help="keys per transaction, 1-500 (default %(default)s)")
    p.add_argument("--parallel", type=_positive_int, default=4,
                   help="transactions in flight (default %(default)s)")
    _progress_options(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("bench", parents=common, help="load the cluster and report throughput and latency",
                       description="A closed-loop load through the client library: CONCURRENCY workers "
                                   "for DURATION seconds on keys PREFIX00000000..., every answer checked. "
                                   "--suite runs the repository's full benchmark (bench/run.py, RaftKV vs "
                                   "etcd) instead, from a source checkout.")
    p.add_argument("--workload", choices=["write", "read", "mixed"], default="write")
    p.add_argument("-c", "--concurrency", type=_positive_int, default=16)
    p.add_argument("-d", "--duration", type=_positive_float, default=10.0, help="seconds (default %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default %(default)s)")
    p.add_argument("--keys", type=_positive_int, default=1000)
    p.add_argument("--value-size", type=_positive_int, default=100)
    p.add_argument("--read-ratio", type=float, default=0.5, help="share of reads in 'mixed' (default %(default)s)")
    p.add_argument("--prefix", default="bench/", help="key prefix (default %(default)s)")
    p.add_argument("--suite", metavar="ARGS", default=None,
                   help="run `python -m bench.run ARGS` from the source checkout instead (e.g. --suite="
                        "'--quick --etcd')")
    _consistency_option(p)
    _progress_options(p)
    p.set_defaults(func=cmd_bench)


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
    _add_data_parsers(sub)
    _add_cluster_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is cmd_cluster_up:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"raftkv {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `raftkv scan | head`: the reader left; not an error
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stop the interpreter's final flush
        except OSError:
            pass
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - every known error becomes one line and a status
        message, status = _explain(exc, args)
        print(f"raftkv {args.command}: {message}", file=sys.stderr, flush=True)
        if getattr(args, "json", False):
            print(json.dumps(_error_json(exc, message, status)), flush=True)
        return status


def _error_json(exc: BaseException, message: str, status: int) -> dict[str, Any]:
    """With --json a failure is also a document on stdout: {"error": {"code", "message", "exit"}}
    plus what the server said about it ("current" of a failed compare, "failed" txn ops)."""
    from raftkv import _errors as E

    code = getattr(exc, "code", None) or {EXIT_BACKUP: "bad_backup", EXIT_USAGE: "usage"}.get(status, "error")
    doc: dict[str, Any] = {"error": {"code": code, "message": message, "exit": status}}
    if isinstance(exc, E.CompareFailed):
        if exc.current is not None:
            doc["current"] = dict(exc.current.__dict__)
        if exc.failed:
            doc["failed"] = exc.failed
    return doc


if __name__ == "__main__":
    raise SystemExit(main())
