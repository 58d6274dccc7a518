"""Secrets and limits without a cluster: where secrets come from (raftkv.secretfile and
both process configurations), that they stay out of repr, the client-token and
concurrency middlewares, and the Raft-secret handshake against a real PySyncObj node
(in-process, on a loopback port)."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import msgpack
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.encryptor import getEncryptor

from raft_sidecar import config as sidecar
from raft_sidecar import raft_secret
from raftkv.procs import free_ports
from raftkv.secretfile import MIN_RECOMMENDED_LENGTH, SecretError, read_secret_file, resolve_secret, same_secret
from storage_engine import auth, limits
from storage_engine import config as engine

POSITIONAL = ["8080", "50051", "50052", "kv.db"]
LONG = "s" * MIN_RECOMMENDED_LENGTH


def secret_file(tmp_path, text: str, mode: int = 0o600, name: str = "secret") -> str:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(mode)
    return str(p)


# -- raftkv.secretfile ------------------------------------------------------------------------

def test_secret_file_content_is_stripped_and_private_files_give_no_warning(tmp_path):
    value, notices = read_secret_file(secret_file(tmp_path, f"  {LONG}\n"), "client token")
    assert value == LONG and notices == []


def test_secret_file_readable_by_others_gives_a_warning_without_the_secret(tmp_path):
    value, notices = read_secret_file(secret_file(tmp_path, LONG, 0o644), "raft secret")
    assert value == LONG
    assert len(notices) == 1 and "chmod 600" in notices[0] and LONG not in notices[0]


@pytest.mark.parametrize("content, message", [("", "is empty"), ("\n \n", "is empty"),
                                              (b"\xff\xfe", "not UTF-8")])
def test_unusable_secret_files_are_refused(tmp_path, content, message):
    p = tmp_path / "bad"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SecretError, match=message):
        read_secret_file(str(p), "cluster token")


def test_missing_secret_file_names_the_file(tmp_path):
    with pytest.raises(SecretError, match=str(tmp_path / "nope")):
        read_secret_file(str(tmp_path / "nope"), "cluster token")


def test_sources_in_order_file_then_command_line_then_environment(tmp_path):
    f = secret_file(tmp_path, "from-file-" + LONG)
    env = {"X": "from-env-" + LONG}
    assert resolve_secret("t", file=f, env=env, env_var="X")[0] == "from-file-" + LONG
    value, notices = resolve_secret("t", file=None, env=env, env_var="X", argv_value="from-argv-" + LONG,
                                    argv_flag="--t")
    assert value == "from-argv-" + LONG
    assert len(notices) == 1 and "command line" in notices[0] and "from-argv" not in notices[0]
    assert resolve_secret("t", file=None, env=env, env_var="X") == ("from-env-" + LONG, [])
    # $X_FILE (Docker-secrets style) names a file and beats $X.
    assert resolve_secret("t", file=None, env={**env, "X_FILE": f}, env_var="X")[0] == "from-file-" + LONG
    assert resolve_secret("t", file=None, env={"X": "  "}, env_var="X") == (None, [])
    assert resolve_secret("t", file=None, env={}, env_var="X") == (None, [])
    with pytest.raises(SecretError, match="not both"):
        resolve_secret("t", file=f, env={}, env_var="X", argv_value="a", argv_flag="--t")


def test_short_secrets_are_accepted_with_a_warning():
    value, notices = resolve_secret("raft secret", file=None, env={"S": "short"}, env_var="S")
    assert value == "short" and any("shorter than" in n for n in notices)


def test_same_secret():
    assert same_secret("abc", "abc") and same_secret(b"abc", "abc")
    assert not same_secret("abd", "abc") and not same_secret("ab", "abc") and not same_secret("", "abc")


# -- engine configuration -----------------------------------------------------------------------

def test_engine_defaults_have_no_token_and_no_tls():
    cfg = engine.parse_args(POSITIONAL)
    assert cfg.client_token is None and cfg.tls_cert_file is None and not cfg.metrics_public
    assert cfg.max_concurrent_requests == 1024


def test_engine_client_token_from_environment_or_file(tmp_path):
    cfg = engine.parse_args(POSITIONAL, {"RAFTKV_CLIENT_TOKEN": "env-" + LONG})
    assert cfg.client_token == "env-" + LONG
    assert "env-" + LONG not in repr(cfg)
    f = secret_file(tmp_path, "file-" + LONG)
    cfg = engine.parse_args(POSITIONAL + ["--client-token-file", f], {"RAFTKV_CLIENT_TOKEN": "env-" + LONG})
    assert cfg.client_token == "file-" + LONG and cfg.notices == ()


def test_engine_has_no_command_line_token_flag():
    with pytest.raises(SystemExit):
        engine.parse_args(POSITIONAL + ["--client-token", "x"])


def test_engine_refuses_a_missing_token_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        engine.parse_args(POSITIONAL + ["--client-token-file", str(tmp_path / "missing")])
    assert "cannot read the client token file" in capsys.readouterr().err


def test_engine_tls_flags_go_together_and_limits_are_checked():
    cfg = engine.parse_args(POSITIONAL + ["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem",
                                          "--max-concurrent-requests", "7", "--metrics-public"])
    assert (cfg.tls_cert_file, cfg.tls_key_file, cfg.max_concurrent_requests, cfg.metrics_public) == \
        ("c.pem", "k.pem", 7, True)
    for bad in (["--tls-cert-file", "c.pem"], ["--tls-key-file", "k.pem"], ["--max-concurrent-requests", "0"]):
        with pytest.raises(SystemExit):
            engine.parse_args(POSITIONAL + bad)


# -- sidecar configuration -----------------------------------------------------------------------

def test_sidecar_secrets_from_files_and_environment(tmp_path):
    tok = secret_file(tmp_path, "tok-" + LONG, name="tok")
    sec = secret_file(tmp_path, "sec-" + LONG, name="sec")
    cfg = sidecar.parse_args(["--cluster-token-file", tok, "--raft-secret-file", sec],
                             {"CLUSTER_TOKEN": "env", "RAFT_SECRET": "env"})
    assert (cfg.cluster_token, cfg.raft_secret) == ("tok-" + LONG, "sec-" + LONG)
    assert "tok-" not in repr(cfg) and "sec-" not in repr(cfg)
    cfg = sidecar.parse_args([], {"RAFT_SECRET": "env-" + LONG})
    assert cfg.raft_secret == "env-" + LONG and cfg.cluster_token is None
    assert sidecar.parse_args([]).raft_secret is None


def test_sidecar_command_line_token_still_works_but_warns():
    cfg = sidecar.parse_args(["-cluster-token", "argv-" + LONG])
    assert cfg.cluster_token == "argv-" + LONG
    assert any("--cluster-token-file" in n and "argv-" not in n for n in cfg.notices)


def test_sidecar_refuses_token_on_command_line_and_in_a_file(tmp_path):
    with pytest.raises(SystemExit):
        sidecar.parse_args(["--cluster-token", "a", "--cluster-token-file", secret_file(tmp_path, LONG)])


# -- middlewares -------------------------------------------------------------------------------------

def run(coro):
    return asyncio.run(coro)


async def ok_handler(request):
    return web.Response(text="handled")


def token_mw(metrics_public: bool = False):
    cfg = engine.EngineConfig(client_token="tok-" + LONG, metrics_public=metrics_public)
    mws = auth.middlewares(cfg)
    assert len(mws) == 2   # token check, then the concurrency limit
    return mws[0]


@pytest.mark.parametrize("path, headers, status", [
    ("/get-val", {}, 401),
    ("/get-val", {"Authorization": "Bearer wrong"}, 403),
    ("/get-val", {"Authorization": "Basic dG9rOg=="}, 401),
    ("/get-val", {"Authorization": "Bearer "}, 401),
    ("/get-val", {"Authorization": f"Bearer tok-{LONG}"}, 200),
    ("/get-val", {"Authorization": f"bearer tok-{LONG}"}, 200),
    ("/health", {}, 200),
    ("/v1/health", {}, 200),
    ("/metrics", {}, 401),
    ("/debug/stats", {}, 401),
])
def test_token_middleware(path, headers, status):
    resp = run(token_mw()(make_mocked_request("GET", path, headers=headers), ok_handler))
    assert resp.status == status
    if status != 200:
        assert resp.text.startswith("error: ")
        assert f"tok-{LONG}" not in resp.text


def test_metrics_can_be_made_public():
    resp = run(token_mw(metrics_public=True)(make_mocked_request("GET", "/metrics"), ok_handler))
    assert resp.status == 200


def test_v1_refusals_use_the_v1_error_shape():
    mw = token_mw()
    resp = run(mw(make_mocked_request("GET", "/v1/kv/a", headers={"Accept": "application/json"}), ok_handler))
    assert resp.status == 401 and resp.content_type == "application/json"
    assert json.loads(resp.text)["error"]["code"] == "unauthorized"
    resp = run(mw(make_mocked_request("GET", "/v1/kv/a", headers={"Authorization": "Bearer x"}), ok_handler))
    assert resp.status == 403 and resp.content_type == "application/msgpack"
    assert msgpack.unpackb(resp.body)["error"]["code"] == "forbidden"
    resp = run(mw(make_mocked_request("GET", "/v1/kv/a?format=json"), ok_handler))
    assert json.loads(resp.text)["error"]["code"] == "unauthorized"


def test_no_token_means_only_the_concurrency_limit():
    mws = auth.middlewares(engine.EngineConfig())
    assert len(mws) == 1
    assert run(mws[0](make_mocked_request("GET", "/get-val"), ok_handler)).status == 200


def test_concurrency_limit_refuses_at_once_and_frees_slots():
    async def scenario():
        lim = limits.ConcurrencyLimit(2)
        gate = asyncio.Event()

        async def slow(request):
            await gate.wait()
            return web.Response(text="slow")

        held = [asyncio.create_task(lim.middleware(make_mocked_request("POST", "/insert-val"), slow))
                for _ in range(2)]
        await asyncio.sleep(0)
        assert lim.active == 2
        t0 = time.monotonic()
        plain = await lim.middleware(make_mocked_request("POST", "/insert-val"), slow)
        v1 = await lim.middleware(make_mocked_request("PUT", "/v1/kv/a", headers={"Accept": "application/json"}),
                                  slow)
        refused_in = time.monotonic() - t0
        health = await lim.middleware(make_mocked_request("GET", "/health"), ok_handler)
        held[0].cancel()     # a client that went away frees its slot
        await asyncio.sleep(0)
        assert lim.active == 1
        gate.set()
        done = await held[1]
        assert lim.active == 0
        return plain, v1, refused_in, health, done, lim.rejected

    plain, v1, refused_in, health, done, rejected = run(scenario())
    assert plain.status == 503 and plain.headers["Retry-After"] == "1" and plain.text.startswith("error: overloaded")
    assert v1.status == 429 and v1.headers["Retry-After"] == "1"
    assert json.loads(v1.text)["error"]["code"] == "overloaded"
    assert refused_in < 0.05
    assert health.status == 200 and done.status == 200 and rejected == 2


# -- the Raft secret handshake against a real PySyncObj node -------------------------------------------

@pytest.fixture
def secret_node():
    """A single-member PySyncObj node with a password, on SecretTransport (memory journal)."""
    port = free_ports(1)[0]
    addr = f"127.0.0.1:{port}"
    node = SyncObj(addr, [], SyncObjConf(password="right-" + LONG, dynamicMembershipChange=True),
                   transportClass=raft_secret.SecretTransport)
    deadline = time.monotonic() + 10
    while not node._isLeader() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield node, addr
    finally:
        node.destroy()


def test_probe_succeeds_only_with_the_same_secret(secret_node, caplog):
    node, addr = secret_node
    caplog.set_level(logging.WARNING, logger="raft_sidecar.raft_secret")
    transport = node._SyncObj__transport
    run(raft_secret.probe_peer(addr, getEncryptor("right-" + LONG)))
    time.sleep(0.2)   # the node sees the probe's close on its next tick
    assert transport.handshake_failures == 0   # a completed key exchange is not a failure
    with pytest.raises(raft_secret.ProbeRefused, match="raft secret"):
        run(raft_secret.probe_peer(addr, getEncryptor("wrong-" + LONG)))
    # PySyncObj dropped that connection silently; the transport says why.
    deadline = time.monotonic() + 5
    while "closed before the secret handshake" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "closed before the secret handshake" in caplog.text and transport.handshake_failures == 1
    assert "wrong-" + LONG not in caplog.text and "right-" + LONG not in caplog.text


def test_probe_of_a_closed_port_is_unreachable():
    port = free_ports(1)[0]
    with pytest.raises(raft_secret.ProbeUnreachable):
        run(raft_secret.probe_peer(f"127.0.0.1:{port}", getEncryptor("x"), timeout=1.0))


def test_probe_of_a_port_that_hangs_up_is_refused():
    async def scenario():
        async def hang_up(reader, writer):
            await reader.read(10)
            writer.close()
        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(raft_secret.ProbeRefused):
                await raft_secret.probe_peer(f"127.0.0.1:{port}", getEncryptor("x"), timeout=2.0)
        finally:
            server.close()
            await server.wait_closed()
    run(scenario())
