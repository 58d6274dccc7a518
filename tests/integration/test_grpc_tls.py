"""Issue 6: TLS on the two gRPC links between each engine and its Raft sidecar.

A 3-node cluster runs with --grpc-tls-cert-file/--grpc-tls-key-file/--grpc-tls-ca-file on
both processes of every node (one CA and a 127.0.0.1 certificate made at test time).
Writes through every node, read back from every node, prove both links work over TLS:
each write goes engine -> sidecar (RaftNode) and comes back sidecar -> engine
(StateMachine). Then the gRPC ports themselves: plaintext clients are refused, clients
that verify against the CA are served, and clients trusting another CA are refused.
"""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from raftkv.pb import consensus_pb2 as pb
from raftkv.pb import consensus_pb2_grpc as pb_grpc
from tests.cluster import HOST, Cluster, get, put
from tests.integration.test_security import make_test_pki

pytestmark = pytest.mark.timeout(240)

RPC_TIMEOUT = 5.0


@pytest.fixture
def tls_cluster(cluster_factory, tmp_path: Path) -> tuple[Cluster, str]:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca, cert, key = make_test_pki(pki)
    args = ["--grpc-tls-cert-file", cert, "--grpc-tls-key-file", key, "--grpc-tls-ca-file", ca]
    c = cluster_factory(3, engine_args=args, sidecar_args=args, name="grpctls")
    return c, ca


def _applied_index(channel: grpc.Channel) -> int:
    return pb_grpc.StateMachineStub(channel).AppliedIndex(pb.Empty(), timeout=RPC_TIMEOUT).applied_index


def _read_barrier(channel: grpc.Channel) -> pb.ReadBarrierResponse:
    return pb_grpc.RaftNodeStub(channel).ReadBarrier(pb.ReadBarrierRequest(mode=pb.LEADER), timeout=RPC_TIMEOUT)


def test_both_links_work_over_tls_and_refuse_plaintext(tls_cluster, tmp_path: Path):
    c, ca_file = tls_cluster
    leader = c.leader()
    for w in [leader] + [n for n in c.nodes if n is not leader]:
        key, value = f"grpctls/{w.node_id}", f"via-{w.node_id}"
        r = put(w.http_url, key, value)
        assert (r.status_code, r.text) == (200, "ok"), f"write via {w.node_id}: {r.status_code} {r.text!r}"
        for reader in c.nodes:
            g = get(reader.http_url, key)
            assert (g.status_code, g.text) == (200, value), f"read of {key} via {reader.node_id}: {g.text!r}"

    for n in c.nodes:
        assert "gRPC TLS on" in n.engine_log.read_text(errors="replace"), f"{n.node_id} engine log"
        assert "gRPC TLS on" in n.sidecar_log.read_text(errors="replace"), f"{n.node_id} sidecar log"

    ca = Path(ca_file).read_bytes()
    other_ca_dir = tmp_path / "other"
    other_ca_dir.mkdir()
    other_ca = Path(make_test_pki(other_ca_dir)[0]).read_bytes()
    node = c.nodes[0]
    engine_addr, sidecar_addr = f"{HOST}:{node.ports.app_grpc}", f"{HOST}:{node.ports.side_grpc}"

    # Plaintext to either TLS port: the handshake never happens, the call fails.
    for addr, call in ((engine_addr, _applied_index), (sidecar_addr, _read_barrier)):
        with grpc.insecure_channel(addr) as ch, pytest.raises(grpc.RpcError) as err:
            call(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, f"plaintext to {addr}: {err.value}"

    # Verifying against a CA that did not sign the server's certificate: refused.
    with grpc.secure_channel(engine_addr, grpc.ssl_channel_credentials(root_certificates=other_ca)) as ch, \
            pytest.raises(grpc.RpcError) as err:
        _applied_index(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # With the right CA: served, and the engine has applied the writes above.
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(engine_addr, creds) as ch:
        assert _applied_index(ch) > 0
    with grpc.secure_channel(sidecar_addr, creds) as ch:
        resp = _read_barrier(ch)
        assert resp.success and resp.index > 0, resp
