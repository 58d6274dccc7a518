"""The gRPC TLS flags of both processes (issue 6): same names, same checks, same messages.

Half a certificate/key pair and unreadable or non-PEM files must stop the process at
startup with a message naming the flag or the file; without any flag (or env) the
links stay plaintext as before.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from raft_sidecar import config as sidecar
from raftkv.grpc_tls import GrpcTLS
from storage_engine import config as engine

ENGINE_POS = ["8080", "50051", "50052", "kv.db"]
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
CERT_PEM = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


def parse_engine(extra: list[str], env: dict[str, str] | None = None):
    return engine.parse_args(ENGINE_POS + extra, env)


def parse_sidecar(extra: list[str], env: dict[str, str] | None = None):
    return sidecar.parse_args(["-id", "n1", "-bootstrap"] + extra, env)


PARSERS = pytest.mark.parametrize("parse", [parse_engine, parse_sidecar], ids=["engine", "sidecar"])


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    files = {"cert": tmp_path / "server.pem", "key": tmp_path / "server.key", "ca": tmp_path / "ca.pem"}
    files["cert"].write_text(CERT_PEM)
    files["key"].write_text(KEY_PEM)
    files["ca"].write_text(CERT_PEM)
    return {k: str(v) for k, v in files.items()}


def refused(parse, extra: list[str], capsys, env: dict[str, str] | None = None) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(extra, env)
    assert exc.value.code == 2
    return capsys.readouterr().err


@PARSERS
def test_defaults_stay_plaintext(parse):
    tls = parse([]).grpc_tls
    assert tls == GrpcTLS()
    assert not tls.server_enabled and not tls.client_enabled
    assert tls.describe().startswith("gRPC TLS off")


@PARSERS
def test_all_three_flags_are_kept_as_paths(parse, pem):
    tls = parse(["--grpc-tls-cert-file", pem["cert"], "--grpc-tls-key-file", pem["key"],
                 "--grpc-tls-ca-file", pem["ca"]]).grpc_tls
    assert (tls.cert_file, tls.key_file, tls.ca_file) == (pem["cert"], pem["key"], pem["ca"])
    assert tls.server_enabled and tls.client_enabled
    line = tls.describe()
    assert line.startswith("gRPC TLS on") and pem["cert"] in line and pem["ca"] in line
    assert "PRIVATE KEY" not in line and "c2VjcmV0" not in line and "c2VjcmV0" not in repr(tls)


@PARSERS
def test_environment_variables_are_read(parse, pem):
    env = {"GRPC_TLS_CERT_FILE": pem["cert"], "GRPC_TLS_KEY_FILE": pem["key"], "GRPC_TLS_CA_FILE": pem["ca"]}
    tls = parse([], env).grpc_tls
    assert (tls.cert_file, tls.key_file, tls.ca_file) == (pem["cert"], pem["key"], pem["ca"])


@PARSERS
def test_client_side_alone_is_allowed(parse, pem):
    tls = parse(["--grpc-tls-ca-file", pem["ca"]]).grpc_tls
    assert tls.client_enabled and not tls.server_enabled


@PARSERS
def test_cert_without_key_names_the_missing_flag(parse, pem, capsys):
    err = refused(parse, ["--grpc-tls-cert-file", pem["cert"]], capsys)
    assert "--grpc-tls-cert-file needs --grpc-tls-key-file" in err


@PARSERS
def test_key_without_cert_names_the_missing_flag(parse, pem, capsys):
    err = refused(parse, ["--grpc-tls-key-file", pem["key"]], capsys)
    assert "--grpc-tls-key-file needs --grpc-tls-cert-file" in err
    err = refused(parse, [], capsys, env={"GRPC_TLS_KEY_FILE": pem["key"]})
    assert "--grpc-tls-key-file needs --grpc-tls-cert-file" in err


@PARSERS
@pytest.mark.parametrize("which", ["cert", "key", "ca"])
def test_unreadable_file_is_named(parse, pem, tmp_path, capsys, which):
    missing = str(tmp_path / f"missing-{which}.pem")
    files = dict(pem, **{which: missing})
    err = refused(parse, ["--grpc-tls-cert-file", files["cert"], "--grpc-tls-key-file", files["key"],
                          "--grpc-tls-ca-file", files["ca"]], capsys)
    assert missing in err and "cannot read" in err


@PARSERS
def test_non_pem_file_is_named(parse, pem, tmp_path, capsys):
    junk = tmp_path / "ca.der"
    junk.write_bytes(b"\x30\x82\x01\x0a not pem")
    err = refused(parse, ["--grpc-tls-ca-file", str(junk)], capsys)
    assert str(junk) in err and "not PEM" in err


def test_sidecar_takes_go_style_single_dash(pem):
    tls = sidecar.parse_args(["-id", "n1", "-bootstrap", "-grpc-tls-ca-file", pem["ca"],
                              f"-grpc-tls-cert-file={pem['cert']}", "-grpc-tls-key-file", pem["key"]]).grpc_tls
    assert (tls.cert_file, tls.key_file, tls.ca_file) == (pem["cert"], pem["key"], pem["ca"])
