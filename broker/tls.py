"""Server TLS credentials from PEM files, checked up front and reloaded when they change.

gRPC accepts any bytes at bind time and only fails (obscurely) at the first handshake, so the
files are parsed here first: a missing file, a non-PEM file or a key that does not match the
certificate is a ConfigError that names the setting (at start), or a refused reload that
keeps the certificate in force (later; broker.file_reload).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import types as asym_types

from broker.config import ConfigError, TLSSettings
from broker.file_reload import ReloadingFiles

logger = logging.getLogger(__name__)


@dataclass(frozen=True, repr=False)
class ServerTLSMaterial:
    """The PEM bytes of a server's TLS setup (the key never in a repr)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    require_client_auth: bool
    # The server certificate's notAfter.
    not_after: datetime

    def __repr__(self) -> str:
        return (
            f"ServerTLSMaterial(client_ca={'yes' if self.client_ca else 'no'}, "
            f"require_client_auth={self.require_client_auth}, private_key=<redacted>)"
        )

    def certificate_configuration(self) -> Any:
        """For `grpc.dynamic_ssl_server_credentials`."""
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


def _certificates(data: bytes, path: Path, key: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{key}: {path} holds no PEM certificate")
    return certs


def tls_material(tls: TLSSettings, contents: Sequence[bytes]) -> ServerTLSMaterial:
    """Check the files' bytes (`tls_paths(tls)` order): PEM certificates, an unencrypted
    PEM key matching the first certificate, a PEM client CA. ConfigError naming the setting."""
    cert_chain, private_key = contents[0], contents[1]
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
        client_ca = contents[2]
        _certificates(client_ca, tls.client_ca_file, "server.tls.clientCaFile")
    return ServerTLSMaterial(
        cert_chain=cert_chain,
        private_key=private_key,
        client_ca=client_ca,
        require_client_auth=tls.require_client_cert,
        not_after=leaf.not_valid_after_utc,
    )


def tls_paths(tls: TLSSettings) -> list[tuple[str, Path]]:
    """The files, each with the setting that names it."""
    paths = [("server.tls.certFile", tls.cert_file), ("server.tls.keyFile", tls.key_file)]
    if tls.client_ca_file is not None:
        paths.append(("server.tls.clientCaFile", tls.client_ca_file))
    return paths


class ServerCertificates:
    """The server's certificate, key and client CA, following their files (ReloadingFiles).

    gRPC asks for the certificate configuration at each TLS handshake
    (`grpc.dynamic_ssl_server_credentials`): after a reload new connections get the new
    certificate (and client CA), while open connections keep the one they were made with. A
    renewed certificate is picked up without a restart (cert-manager renews into the same
    Secret); a half-written or mismatched pair is refused and the last good one kept.
    """

    def __init__(self, tls: TLSSettings) -> None:
        keys, paths = zip(*tls_paths(tls), strict=True)
        self.files = ReloadingFiles(
            "TLS certificate",
            paths,
            lambda contents: tls_material(tls, contents),
            settings_keys=keys,
            reload_interval_seconds=tls.reload_interval_seconds,
            describe=lambda material: f"valid until {material.not_after.isoformat()}",
            log=logger,
            on_reload=self._installed,
        )
        # (version, configuration) of the newest material, read by gRPC's handshake threads;
        # replaced whole, so a reader sees one or the other.
        self._newest: tuple[int, Any] = (0, None)
        self._served = 0

    async def open(self) -> ServerCertificates:
        """Read and check the files (off the event loop); ConfigError naming the setting."""
        await self.files.open()
        return self

    @property
    def material(self) -> ServerTLSMaterial:
        return self.files.current

    def credentials(self) -> grpc.ServerCredentials:
        material = self.files.current
        return grpc.dynamic_ssl_server_credentials(
            material.certificate_configuration(),
            self._fetch,
            # Without a client CA there is nothing to verify client certificates against.
            require_client_authentication=(
                material.require_client_auth and material.client_ca is not None
            ),
        )

    def _installed(self, material: ServerTLSMaterial) -> None:
        self._newest = (self._newest[0] + 1, material.certificate_configuration())

    def _fetch(self) -> Any:
        """gRPC's question at a handshake: a new configuration, or None to keep the current."""
        version, configuration = self._newest
        if version == self._served:
            return None
        self._served = version
        return configuration
