"""Who may talk to whom (docs/security.md), on real processes.

One 3-node cluster runs with all three secrets: the client token (env
RAFTKV_CLIENT_TOKEN), the cluster token (--cluster-token-file) and the Raft secret
(--raft-secret-file), with the client, management and Raft ports on 0.0.0.0 as in a
real deployment. The tests refuse requests without or with wrong credentials and check
that nothing changed; a 4th sidecar with the wrong Raft secret tries to join; forged
Raft messages try to depose the leader; and no secret may show up in logs, /status or
command lines. A separate single node serves the client API over TLS with a CA made at
test time.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pickle
import secrets
import socket
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import requests

from tests.cluster import HOST, Cluster, Node, _session, http_get, http_post, insert_body, wait_until

pytestmark = pytest.mark.timeout(300)

CLIENT_TOKEN = "client-" + secrets.token_hex(20)
CLUSTER_TOKEN = "cluster-" + secrets.token_hex(20)
RAFT_SECRET = "raft-" + secrets.token_hex(20)
WRONG_SECRET = "wrong-" + secrets.token_hex(20)
ALL_SECRETS = {"client token": CLIENT_TOKEN, "cluster token": CLUSTER_TOKEN,
               "raft secret": RAFT_SECRET, "wrong raft secret": WRONG_SECRET}

AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
WRONG_AUTH = {"Authorization": "Bearer not-the-token"}
MGMT_AUTH = {"Authorization": f"Bearer {CLUSTER_TOKEN}"}


def write_secret(path: Path, value: str) -> str:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


@dataclass
class Secure:
    cluster: Cluster
    secret_dir: Path
    base_sidecar_args: list[str]

    def sidecar_args(self, raft_secret_file: str) -> list[str]:
        args = list(self.base_sidecar_args)
        args[args.index("--raft-secret-file") + 1] = raft_secret_file
        return args


@pytest.fixture(scope="module")
def secure(module_cluster_factory, tmp_path_factory) -> Secure:
    d = tmp_path_factory.mktemp("secrets")
    sidecar_args = ["--bind-host", "0.0.0.0",
                    "--cluster-token-file", write_secret(d / "cluster-token", CLUSTER_TOKEN),
                    "--raft-secret-file", write_secret(d / "raft-secret", RAFT_SECRET)]
    c = module_cluster_factory(3, sidecar_args=sidecar_args, engine_args=["--http-host", "0.0.0.0"],
                               env={"RAFTKV_CLIENT_TOKEN": CLIENT_TOKEN}, name="secure")
    return Secure(c, d, sidecar_args)


# -- helpers ---------------------------------------------------------------------------

def insert(node: Node, op: str, key: str, value: str | None = None, headers=AUTH) -> requests.Response:
    return http_post(f"{node.http_url}/insert-val", data=insert_body(op, key, value),
                     headers={"Content-Type": "application/msgpack", **headers})


def read(node: Node, key: str, consistency: str = "linearizable", headers=AUTH) -> requests.Response:
    return http_get(f"{node.http_url}/get-val", params={"key": key, "consistency": consistency}, headers=headers)


def applied_index(node: Node) -> int:
    r = http_get(f"{node.http_url}/debug/stats", headers=AUTH)
    r.raise_for_status()
    return r.json()["applied_index"]


def v1_available(node: Node) -> bool:
    r = http_get(f"{node.http_url}/v1/health", headers=AUTH)
    return r.status_code == 200


def members(c: Cluster) -> dict[str, list[str]]:
    return {nid: sorted(m["id"] for m in s["members"]) for nid, s in c.statuses().items()}


def converged(c: Cluster, key: str, value: str | None, nodes=None) -> None:
    def ok() -> bool:
        for n in (nodes or c.running()):
            r = read(n, key, "local")
            if (value is None and r.status_code != 404) or (value is not None and r.text != value):
                return False
        return True
    wait_until(ok, 30, what=f"{key}={value!r} everywhere")


# -- client token -----------------------------------------------------------------------------

def test_original_endpoints_need_the_client_token(secure: Secure):
    c = secure.cluster
    ldr = c.leader()
    node = c.followers()[0]
    assert insert(ldr, "SET", "guarded", "v0").status_code == 200
    converged(c, "guarded", "v0")
    before = {n.node_id: applied_index(n) for n in c.nodes}

    for headers, status in (({}, 401), (WRONG_AUTH, 403), ({"Authorization": "Basic Zm9vOmJhcg=="}, 401),
                            ({"Authorization": f"bearer {CLIENT_TOKEN}x"}, 403)):
        for target in (ldr, node):
            r = insert(target, "SET", "guarded", "evil", headers=headers)
            assert r.status_code == status and r.text.startswith("error: "), (r.status_code, r.text)
            r = insert(target, "DELETE", "guarded", headers=headers)
            assert r.status_code == status, (r.status_code, r.text)
            r = read(target, "guarded", headers=headers)
            assert r.status_code == status and "v0" not in r.text, (r.status_code, r.text)
            r = http_get(f"{target.http_url}/debug/stats", headers=headers)
            assert r.status_code == status
            r = http_get(f"{target.http_url}/metrics", headers=headers)
            assert r.status_code == status, "/metrics needs the token unless --metrics-public"
    r = insert(ldr, "SET", "guarded", "evil", headers={})
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")

    # Health checks stay open (orchestrators probe without secrets).
    for n in c.nodes:
        r = http_get(f"{n.http_url}/health")
        assert (r.status_code, r.text) == (200, "OK")
    # Nothing was proposed: no node applied anything while the requests were refused.
    time.sleep(0.3)
    assert {n.node_id: applied_index(n) for n in c.nodes} == before
    # And with the token everything works, everywhere.
    for n in c.nodes:
        r = read(n, "guarded")
        assert (r.status_code, r.text) == (200, "v0")
    assert http_get(f"{ldr.http_url}/metrics", headers=AUTH).status_code == 200
    engine_log = "\n".join(n.engine_log.read_text() for n in c.nodes)
    assert "refused" in engine_log and "unauthenticated client request" in engine_log


def test_v1_paths_answer_401_403_in_the_v1_error_shape(secure: Secure):
    # The check runs before routing, so it holds whether or not the /v1 routes exist yet.
    node = secure.cluster.nodes[0]
    cases = (({}, 401, "unauthorized"), (WRONG_AUTH, 403, "forbidden"))
    for headers, status, code in cases:
        r = _request("PUT", f"{node.http_url}/v1/kv/x", data=b"evil",
                     headers={"Content-Type": "application/octet-stream", "Accept": "application/json", **headers})
        assert r.status_code == status
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
        r = _request("GET", f"{node.http_url}/v1/kv/x", headers=headers)   # msgpack by default
        assert r.status_code == status
        assert msgpack.unpackb(r.content)["error"]["code"] == code
        r = _request("GET", f"{node.http_url}/v1/kv/x?format=json", headers=headers)
        assert r.status_code == status and r.json()["error"]["code"] == code
        r = _request("POST", f"{node.http_url}/v1/txn", headers={"Accept": "application/json", **headers},
                     data=json.dumps({"ops": [{"op": "put", "key": "x", "value": "evil"}]}))
        assert r.status_code == status and r.json()["error"]["code"] == code
    # Same keyspace as the original API: x was never written.
    assert read(node, "x").status_code == 404


def test_v1_refused_writes_leave_the_data_unchanged(secure: Secure):
    node = secure.cluster.nodes[1]
    if not v1_available(node):
        pytest.skip("the /v1 routes are not in this build yet (GET /v1/health with the token is not 200); "
                    "the 401/403 shape is covered by test_v1_paths_answer_401_403_in_the_v1_error_shape")
    h = {"Content-Type": "application/octet-stream", "Accept": "application/json"}
    r = _request("PUT", f"{node.http_url}/v1/kv/v1guarded", data=b"good", headers={**h, **AUTH})
    assert r.status_code == 200, r.text
    rev = r.json()["revision"]
    for headers in ({}, WRONG_AUTH):
        assert _request("PUT", f"{node.http_url}/v1/kv/v1guarded", data=b"evil",
                        headers={**h, **headers}).status_code in (401, 403)
        assert _request("DELETE", f"{node.http_url}/v1/kv/v1guarded",
                        headers={**h, **headers}).status_code in (401, 403)
    r = _request("GET", f"{node.http_url}/v1/kv/v1guarded?format=json", headers=AUTH)
    assert r.status_code == 200 and r.json()["value"] == "good" and r.json()["mod_revision"] == rev


def _request(method: str, url: str, **kw) -> requests.Response:
    with _session() as s:
        return s.request(method, url, timeout=5.0, **kw)


# -- cluster token ------------------------------------------------------------------------------

def test_join_and_leave_need_the_cluster_token(secure: Secure):
    c = secure.cluster
    before = members(c)
    assert all(len(m) == 3 for m in before.values()), before
    ghost = f"{HOST}:1"
    for n in c.nodes:   # leader and followers alike (a follower would forward)
        for headers, params in (({}, {}), ({"Authorization": "Bearer nope"}, {}), ({}, {"token": "nope"}),
                                ({"Authorization": f"Bearer {CLIENT_TOKEN}"}, {})):
            r = http_post(f"{n.mgmt_url}/join", params={"peerID": "ghost", "peerAddress": ghost, **params},
                          headers=headers, timeout=20)
            assert r.status_code == 401, (r.status_code, r.text)
            r = http_post(f"{n.mgmt_url}/leave", params={"peerID": "node3", **params}, headers=headers, timeout=20)
            assert r.status_code == 401, (r.status_code, r.text)
    time.sleep(0.5)
    assert members(c) == before


# -- raft secret -----------------------------------------------------------------------------------

class TermWatch:
    """Samples every member's /status in the background: term and leader must not move."""

    def __init__(self, c: Cluster, nodes: list[Node]) -> None:
        self._c = c
        self._nodes = nodes
        self.samples: list[tuple[str, int, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for nid, s in self._c.statuses(self._nodes).items():
                self.samples.append((nid, s["term"], s["leader_addr"]))
            time.sleep(0.1)

    def __enter__(self) -> "TermWatch":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(10)


class Writer:
    """Writes (with the token) to one node in the background; every write must succeed."""

    def __init__(self, node: Node, prefix: str) -> None:
        self._node = node
        self._prefix = prefix
        self.ok = 0
        self.failures: list[str] = []
        self.last: tuple[str, str] | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key, value = f"{self._prefix}-{i % 50}", f"v{i}"
            try:
                r = insert(self._node, "SET", key, value)
                if r.status_code == 200:
                    self.ok += 1
                    self.last = (key, value)
                else:
                    self.failures.append(f"{r.status_code} {r.text}")
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            i += 1
            time.sleep(0.01)

    def __enter__(self) -> "Writer":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(10)


def test_a_node_with_the_wrong_raft_secret_cannot_join_or_disturb(secure: Secure):
    c = secure.cluster
    ldr = c.leader()
    before_members = members(c)
    term = ldr.status()["term"]
    wrong = write_secret(secure.secret_dir / "wrong-secret", WRONG_SECRET)
    members3 = list(c.nodes[:3])
    with TermWatch(c, members3) as watch, Writer(ldr, "wrongjoin") as writer:
        intruder = c.add_node(via=c.followers()[0], node_id="intruder", wait=False,
                              sidecar_args=secure.sidecar_args(wrong))
        try:
            wait_until(lambda: intruder.sidecar.poll() is not None, 60, what="the intruder's sidecar to give up")
            time.sleep(1.0)   # keep watching a little after it gave up
        finally:
            intruder.kill9()
    assert intruder.sidecar.returncode not in (0, None)
    log = intruder.sidecar_log.read_text()
    assert "refused" in log and "raft secret" in log, log[-3000:]
    assert "closed before the secret handshake completed" in log, log[-3000:]
    leader_log = ldr.sidecar_log.read_text()
    assert "refusing to add intruder" in leader_log
    # Membership, term and leader never moved; writes kept succeeding all along.
    assert members(c) == before_members
    assert watch.samples and {t for _, t, _ in watch.samples} == {term}, sorted(set(watch.samples))[:10]
    assert {a for _, _, a in watch.samples} == {ldr.raft_addr}
    assert not writer.failures, writer.failures[:5]
    assert writer.ok >= 20, f"only {writer.ok} writes in the window"
    converged(c, *writer.last, nodes=members3)


def _frame(fernet, obj) -> bytes:
    data = zlib.compress(pickle.dumps(obj), 3)
    if fernet is not None:
        data = fernet.encrypt(data)
    return struct.pack("i", len(data)) + data


def _read_frame(sock: socket.socket) -> bytes | None:
    buf = b""
    while len(buf) < 4:
        chunk = sock.recv(4 - len(buf))
        if not chunk:
            return None
        buf += chunk
    (length,) = struct.unpack("i", buf)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return body


def forge_vote(raft_addr: str, secret: str | None, term: int) -> str:
    """Speaks PySyncObj's wire protocol to a member: key exchange (with `secret`, or
    plaintext if None), then a request_vote with a far higher term from a 'readonly'
    identity. Returns what happened. A member that accepts it steps down at once."""
    from pysyncobj.encryptor import getEncryptor
    fernet = getEncryptor(secret) if secret else None
    host, port = raft_addr.rsplit(":", 1)
    vote = {"type": "request_vote", "term": term, "last_log_index": 10 ** 9, "last_log_term": term}
    with socket.create_connection((host, int(port)), timeout=3) as s:
        try:
            if fernet is None:
                s.sendall(_frame(None, "readonly") + _frame(None, vote))
            else:
                key = os.urandom(32)
                s.sendall(_frame(fernet, key))
                reply = _read_frame(s)
                if reply is None:
                    return "closed during the key exchange"
                echo, their_key = pickle.loads(zlib.decompress(fernet.decrypt(reply)))
                assert echo == key
                s.sendall(_frame(fernet, (their_key, "readonly")) + _frame(fernet, (their_key, vote)))
            time.sleep(0.5)
            s.settimeout(0.5)
            try:
                return "closed after the vote" if s.recv(1) == b"" else "answered"
            except socket.timeout:
                return "kept open"
        except (ConnectionError, OSError) as exc:
            return f"connection error {exc!r}"


def test_forged_raft_messages_need_the_secret(secure: Secure):
    c = secure.cluster
    members3 = [n for n in c.nodes if n.alive()]
    ldr = c.leader(nodes=members3)
    term = ldr.status()["term"]
    with TermWatch(c, members3) as watch:
        outcomes = {
            "wrong secret": forge_vote(ldr.raft_addr, WRONG_SECRET, term + 100),
            "no secret": forge_vote(ldr.raft_addr, None, term + 100),
        }
        time.sleep(0.5)
    assert {t for _, t, _ in watch.samples} == {term}, f"a forged vote moved the term: {outcomes}"
    assert {a for _, _, a in watch.samples} == {ldr.raft_addr}
    for what, outcome in outcomes.items():
        assert outcome.startswith("closed") or outcome.startswith("connection error"), (what, outcome)
    # Control: the same forged vote WITH the secret does depose the leader, so the
    # check above can fail (and a cluster without RAFT_SECRET is open to anyone).
    forge_vote(ldr.raft_addr, RAFT_SECRET, term + 100)
    wait_until(lambda: ldr.status()["term"] >= term + 100, 10, what="the control vote to move the term")
    c.leader(timeout=30, nodes=members3)
    c.wait_healthy(nodes=members3)


def test_a_node_with_the_right_raft_secret_joins(secure: Secure):
    c = secure.cluster
    members3 = [n for n in c.nodes if n.alive()]
    ldr = c.leader(nodes=members3)
    node = c.add_node(via=ldr, node_id="newcomer", timeout=90)
    c.wait_members(4, nodes=members3 + [node])
    assert insert(ldr, "SET", "after-join", "yes").status_code == 200
    converged(c, "after-join", "yes", nodes=[node])
    r = http_post(f"{ldr.mgmt_url}/leave", params={"peerID": "newcomer"}, headers=MGMT_AUTH, timeout=30)
    assert r.status_code == 200, r.text
    c.wait_members(3, nodes=members3)
    node.kill9()


# -- ports -----------------------------------------------------------------------------------------

def _listening(pid: int) -> dict[int, set[str]]:
    """port -> local addresses of the TCP sockets process `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out: dict[int, set[str]] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:   # 0A = LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if v6:
                v6addr = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                addr = str(v6addr.ipv4_mapped or v6addr)   # gRPC listens on ::ffff:127.0.0.1
            else:
                addr = str(ipaddress.IPv4Address(raw[::-1]))
            out.setdefault(int(hexport, 16), set()).add(addr)
    return out


def _non_loopback_ipv4() -> str | None:
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            addr = line.split()[3].split("/")[0]
            if not ipaddress.IPv4Address(addr).is_loopback:
                return addr
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        pass
    try:
        for addr in socket.gethostbyname_ex(socket.gethostname())[2]:
            if not ipaddress.IPv4Address(addr).is_loopback:
                return addr
    except OSError:
        pass
    return None


def _connects(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=2):
            return True
    except OSError:
        return False


def test_grpc_ports_listen_on_loopback_only_by_default(secure: Secure):
    """The client, management and Raft ports are on 0.0.0.0 here; the engine's StateMachine
    and the sidecar's RaftNode gRPC ports (no authentication of their own) must still be
    bound to 127.0.0.1 only."""
    for n in [n for n in secure.cluster.nodes if n.alive()]:
        eng, side = _listening(n.engine.pid), _listening(n.sidecar.pid)
        assert eng.get(n.ports.app_grpc) == {"127.0.0.1"}, eng
        assert side.get(n.ports.side_grpc) == {"127.0.0.1"}, side
        assert eng.get(n.ports.http) == {"0.0.0.0"}, eng        # control: this one is public here
        assert side.get(n.ports.mgmt) == {"0.0.0.0"}, side
    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine to connect from")
    n = secure.cluster.nodes[0]
    assert _connects(ip, n.ports.http), f"control: the public client port is not reachable on {ip}"
    assert not _connects(ip, n.ports.app_grpc), f"engine gRPC reachable on {ip}"
    assert not _connects(ip, n.ports.side_grpc), f"sidecar gRPC reachable on {ip}"


# -- no secret anywhere it should not be ----------------------------------------------------------------

def test_secrets_never_appear_in_logs_status_or_command_lines(secure: Secure):
    c = secure.cluster
    # Wrong credentials that happen to be the other secrets must not be echoed either.
    for n in c.running():
        assert read(n, "x", headers={"Authorization": f"Bearer {RAFT_SECRET}"}).status_code == 403
        assert http_post(f"{n.mgmt_url}/join", params={"peerID": "x", "peerAddress": f"{HOST}:1"},
                         headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}).status_code == 401
    texts: dict[str, str] = {}
    for path in c.base_dir.rglob("*.log"):
        texts[str(path)] = path.read_text(errors="replace")
    assert any("sidecar.log" in p for p in texts) and any("engine.log" in p for p in texts)
    for n in c.running():
        texts[f"{n.node_id} /status"] = http_get(f"{n.mgmt_url}/status").text
        texts[f"{n.node_id} /health"] = http_get(f"{n.mgmt_url}/health").text
        for p in n.procs():
            texts[f"{n.node_id} cmdline {p.pid}"] = Path(f"/proc/{p.pid}/cmdline").read_bytes().decode(errors="replace")
    for what, secret in ALL_SECRETS.items():
        leaks = [where for where, text in texts.items() if secret in text]
        assert not leaks, f"the {what} appears in {leaks}"
    # The logs did record the refusals (without the secrets).
    assert all("unauthenticated client request" in t for p, t in texts.items() if p.endswith("engine.log")
               and ("/node1/" in p or "/node2/" in p or "/node3/" in p))


# -- the container path: entrypoint.sh passes the secrets on through the environment ------------------

def test_entrypoint_passes_the_secrets_through_the_environment(tmp_path):
    from raftkv import launcher
    from tests.helpers_proc import free_port_block

    d = tmp_path / "secrets"
    d.mkdir()
    env = {"RAFT_SECRET_FILE": write_secret(d / "raft", RAFT_SECRET),
           "RAFTKV_CLIENT_TOKEN": CLIENT_TOKEN,
           "CLUSTER_TOKEN_FILE": write_secret(d / "cluster", CLUSTER_TOKEN)}
    with launcher.launch(2, tmp_path / "ep", http_port=free_port_block(2), mgmt_port=free_port_block(2),
                         raft_port=free_port_block(2), grpc_port=free_port_block(4), host=HOST,
                         env=env, timeout=120) as lc:
        first, second = lc.nodes
        # node2 could only join through node1's secret probe, and both serve with the token.
        r = http_get(f"{first.mgmt_url}/status")
        assert len(r.json()["members"]) == 2
        for n in lc.nodes:
            assert http_get(f"{n.http_url}/get-val", params={"key": "k"}).status_code == 401
            assert http_get(f"{n.http_url}/get-val", params={"key": "k"}, headers=AUTH).status_code == 404
            assert http_post(f"{n.mgmt_url}/leave", params={"peerID": "node2"}).status_code == 401
            # Raft traffic is encrypted: a plaintext peer is cut off.
            outcome = forge_vote(f"{HOST}:{n.spec.raft_port}", None, 10 ** 6)
            assert outcome.startswith(("closed", "connection error")), outcome
        assert http_get(f"{first.mgmt_url}/status").json()["term"] < 10 ** 6
        logs = "\n".join(Path(n.log_path).read_text(errors="replace") for n in lc.nodes)
        for what, secret in ALL_SECRETS.items():
            assert secret not in logs, f"the {what} is in the entrypoint logs"


# -- TLS on the client port -----------------------------------------------------------------------------

def make_test_pki(d: Path) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1, made now (no committed keys). Returns
    (ca_file, cert_file, key_file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raftkv test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = d / "ca.pem", d / "server.pem", d / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return str(ca_file), str(cert_file), str(key_file)


@dataclass(eq=False)
class TLSNode(Node):
    ca_file: str = ""

    @property
    def http_url(self) -> str:
        return f"https://{HOST}:{self.ports.http}"

    def engine_health(self) -> tuple[int, str]:
        r = http_get(f"{self.http_url}/health", timeout=2.0, verify=self.ca_file)
        return r.status_code, r.text


def test_client_api_over_tls(cluster_factory, tmp_path):
    ca, cert, key = make_test_pki(tmp_path)
    c = cluster_factory(0, name="tls")
    node = TLSNode("tls1", c.base_dir, bootstrap=True, ca_file=ca,
                   engine_args=["--tls-cert-file", cert, "--tls-key-file", key])
    c.nodes.append(node)
    node.start().wait_healthy(60)
    url = node.http_url
    with _session() as s:
        r = s.post(f"{url}/insert-val", data=insert_body("SET", "tls-key", "over tls"), verify=ca,
                   headers={"Content-Type": "application/msgpack"}, timeout=5)
        assert (r.status_code, r.text) == (200, "ok")
        r = s.get(f"{url}/get-val", params={"key": "tls-key"}, verify=ca, timeout=5)
        assert (r.status_code, r.text) == (200, "over tls")
        # Without trusting the test CA the certificate is rejected...
        with pytest.raises(requests.exceptions.SSLError):
            s.get(f"{url}/health", timeout=5, verify=True)
        # ...and plain HTTP to the TLS port gets no answer.
        try:
            r = s.get(f"http://{HOST}:{node.ports.http}/get-val", params={"key": "tls-key"}, timeout=5)
        except requests.exceptions.ConnectionError:
            pass
        else:
            assert r.status_code >= 400 and "over tls" not in r.text, (r.status_code, r.text)
    assert "serving HTTPS" in node.engine_log.read_text()
