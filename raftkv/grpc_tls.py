"""Optional TLS for the two gRPC links between a node's engine and its Raft sidecar.

Both processes take the same three flags (or environment variables): this process's
server certificate and key (`--grpc-tls-cert-file`, `--grpc-tls-key-file`) and the CA
that signed the OTHER process's server certificate (`--grpc-tls-ca-file`), which the
client side uses to verify it. Without them the links stay plaintext on 127.0.0.1,
as before. The checks live here so that both configurations refuse the same mistakes
with the same messages, and both `__main__`s build credentials the same way.
"""
from __future__ import annotations

import argparse

from dataclasses import dataclass
from typing import Mapping, Sequence

import grpc

CERT_FLAG, KEY_FLAG, CA_FLAG = "--grpc-tls-cert-file", "--grpc-tls-key-file", "--grpc-tls-ca-file"
CERT_ENV, KEY_ENV, CA_ENV = "GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE", "GRPC_TLS_CA_FILE"
MAX_PEM_BYTES = 1 << 20

ChannelOptions = Sequence[tuple[str, object]]


class GrpcTLSError(ValueError):
    """The gRPC TLS settings cannot be used (half a pair, unreadable or non-PEM file)."""


@dataclass(frozen=True)
class GrpcTLS:
    """File paths only: key material is read when the server or channel is built, never kept in config."""
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None

    @property
    def server_enabled(self) -> bool:
        return bool(self.cert_file)

    @property
    def client_enabled(self) -> bool:
        return bool(self.ca_file)

    def describe(self) -> str:
        """One line for the startup log: which side is TLS, file paths only."""
        server = f"TLS (cert {self.cert_file})" if self.server_enabled else "plaintext"
        client = f"TLS (CA {self.ca_file})" if self.client_enabled else "plaintext"
        state = "on" if self.server_enabled or self.client_enabled else "off"
        return f"gRPC TLS {state}: server {server}, client {client}"


def add_arguments(parser, env: Mapping[str, str], peer: str) -> None:
    """The three flags, defaulting to the GRPC_TLS_* environment variables."""
    parser.add_argument(CERT_FLAG, default=env.get(CERT_ENV) or None,
                        help=f"serve gRPC over TLS with this PEM certificate chain (or env {CERT_ENV})")
    parser.add_argument(KEY_FLAG, default=env.get(KEY_ENV) or None,
                        help=f"private key (PEM) for {CERT_FLAG} (or env {KEY_ENV})")
    parser.add_argument(CA_FLAG, default=env.get(CA_ENV) or None,
                        help=f"connect to the {peer} over TLS, verifying its certificate against "
                             f"this CA (PEM) (or env {CA_ENV})")


def read_pem(path: str, what: str) -> bytes:
    """The file's bytes; refuses an unreadable, oversized or non-PEM file, naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise GrpcTLSError(f"cannot read the gRPC TLS {what} file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise GrpcTLSError(f"the gRPC TLS {what} file {path} is larger than 1 MiB; is it the right file?")
    if b"-----BEGIN " not in data:
        raise GrpcTLSError(f"the gRPC TLS {what} file {path} is not PEM")
    return data


def from_args(cert_file: str | None, key_file: str | None, ca_file: str | None) -> GrpcTLS:
    """Checks the combination and that every given file is readable PEM."""
    if bool(cert_file) != bool(key_file):
        given, missing = (CERT_FLAG, KEY_FLAG) if cert_file else (KEY_FLAG, CERT_FLAG)
        raise GrpcTLSError(f"{given} needs {missing} too (env {CERT_ENV} / {KEY_ENV})")
    tls = GrpcTLS(cert_file or None, key_file or None, ca_file or None)
    for path, what in ((tls.cert_file, "certificate"), (tls.key_file, "key"), (tls.ca_file, "CA")):
        if path:
            read_pem(path, what)
    return tls


def from_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> GrpcTLS:
    """from_args for a parsed command line; a bad combination or file is a usage error."""
    try:
        return from_args(args.grpc_tls_cert_file, args.grpc_tls_key_file, args.grpc_tls_ca_file)
    except GrpcTLSError as exc:
        parser.error(str(exc))


def add_port(server: grpc.aio.Server, addr: str, tls: GrpcTLS) -> int:
    """Binds `addr` with TLS when a certificate is configured; returns the port (0 = failed)."""
    if not tls.server_enabled:
        return server.add_insecure_port(addr)
    creds = grpc.ssl_server_credentials([(read_pem(tls.key_file, "key"), read_pem(tls.cert_file, "certificate"))])
    return server.add_secure_port(addr, creds)


def channel_credentials(tls: GrpcTLS) -> grpc.ChannelCredentials | None:
    if not tls.client_enabled:
        return None
    return grpc.ssl_channel_credentials(root_certificates=read_pem(tls.ca_file, "CA"))


def aio_channel(target: str, tls: GrpcTLS, options: ChannelOptions | None = None) -> grpc.aio.Channel:
    creds = channel_credentials(tls)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)


def sync_channel(target: str, tls: GrpcTLS, options: ChannelOptions | None = None) -> grpc.Channel:
    creds = channel_credentials(tls)
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)
