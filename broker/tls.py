"""Server TLS credentials from PEM files, checked up front.

gRPC accepts any bytes at bind time and only fails (obscurely) at the first handshake, so the
files are parsed here first: a missing file, a non-PEM file or a key that does not match the
certificate is a ConfigError that names the setting.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import types as asym_types

from broker.config import ConfigError, TLSSettings


@dataclass(frozen=True, repr=False)
class ServerTLSMaterial:
    """The PEM bytes of a server's TLS setup (the key never in a repr)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    require_client_auth: bool

    def __repr__(self) -> str:
        return (
            f"ServerTLSMaterial(client_ca={'yes' if self.client_ca else 'no'}, "
            f"require_client_auth={self.require_client_auth}, private_key=<redacted>)"
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            # Without a client CA there is nothing to verify client certificates against.
            require_client_auth=self.require_client_auth and self.client_ca is not None,
        )


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


def _certificates(data: bytes, path: Path, key: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{key}: {path} holds no PEM certificate")
    return certs


def load_tls_material(tls: TLSSettings) -> ServerTLSMaterial:
    """Read and check the files (blocking: call via `load_tls_material_async` on a loop)."""
    cert_chain = _read(tls.cert_file, "server.tls.certFile")
    private_key = _read(tls.key_file, "server.tls.keyFile")
    leaf = _certificates(cert_chain, tls.cert_file, "server.tls.certFile")[0]
    try:
        key: asym_types.PrivateKeyTypes = serialization.load_pem_private_key(
            private_key, password=None
        )
    except (ValueError, TypeError):
        # No key material in the message: only what is wrong with the file.
        raise ConfigError(
            f"server.tls.keyFile: {tls.key_file} is not an unencrypted PEM private key"
        ) from None
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(pem, spki) != leaf.public_key().public_bytes(pem, spki):
        raise ConfigError(
            f"server.tls.keyFile: {tls.key_file} does not match the certificate in {tls.cert_file}"
        )
    client_ca: bytes | None = None
    if tls.client_ca_file is not None:
        client_ca = _read(tls.client_ca_file, "server.tls.clientCaFile")
        _certificates(client_ca, tls.client_ca_file, "server.tls.clientCaFile")
    return ServerTLSMaterial(
        cert_chain=cert_chain,
        private_key=private_key,
        client_ca=client_ca,
        require_client_auth=tls.require_client_cert,
    )


async def load_tls_material_async(tls: TLSSettings) -> ServerTLSMaterial:
    # File reads and key parsing: off the event loop.
    return await asyncio.to_thread(load_tls_material, tls)
