"""How to reach a broker: `ClientConfig` (address, TLS, bearer credential, deadline, retries)
and the gRPC channel it opens.

The one place for the transport rules of every front end (the Python clients, `token-broker
token`, `exec-credential` and the agent's YAML): cert and key together, plaintext without TLS
files, a unix socket always plaintext. A `ClientConfigError` names ClientConfig's fields;
`spelled()` names them as the front end's user wrote them (`--cert`, `certFile`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from broker import __version__
from broker.client.retries import RetryPolicy

DEFAULT_TIMEOUT_SECONDS = 10.0
# The service config clients can copy (clients/service-config.json says the same).
SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": "tokenbroker.v1.TokenBrokerService", "method": "CreateToken"}],
            "timeout": "10s",
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
# Reconnect quickly after a broker restart (gRPC's default backoff grows to 120 s).
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.primary_user_agent", f"token-broker-client/{__version__}"),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)


class ClientConfigError(ValueError):
    """A ClientConfig that cannot work: fields that do not go together, or a file that cannot
    be read. `template` has a `{}` per name in `fields` (ClientConfig's field names); `detail`
    (a path, an OS error) follows it verbatim."""

    def __init__(self, template: str, *fields: str, detail: str = "") -> None:
        self.template = template
        self.fields = fields
        self.detail = detail
        super().__init__(self.spelled({}))

    def spelled(self, names: Mapping[str, str]) -> str:
        """The message with each field as `names` spells it (a field not in it: as is)."""
        return self.template.format(*(names.get(f, f) for f in self.fields)) + self.detail


@dataclass(frozen=True)
class ClientConfig:
    """How to reach a broker. `address`: host:port, or unix:/path (plaintext)."""

    address: str
    plaintext: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    credential: str | None = field(default=None, repr=False)
    credential_file: Path | None = None
    timeout: float | None = DEFAULT_TIMEOUT_SECONDS
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    channel_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.address:
            raise ClientConfigError("{} is required", "address")
        if (self.cert_file is None) != (self.key_file is None):
            raise ClientConfigError("{} and {} must be given together", "cert_file", "key_file")
        if self.credential is not None and self.credential_file is not None:
            raise ClientConfigError("give {} or {}, not both", "credential", "credential_file")
        tls_files = ("ca_file", "cert_file", "key_file")
        if self.unix_socket:
            if self.ca_file or self.cert_file:
                raise ClientConfigError("a unix socket is plaintext: no {}, {} or {}", *tls_files)
        elif self.plaintext and (self.ca_file or self.cert_file):
            raise ClientConfigError(
                "{} cannot be combined with {}, {} or {}", "plaintext", *tls_files
            )

    @property
    def unix_socket(self) -> bool:
        return self.address.startswith("unix:")

    @property
    def secure(self) -> bool:
        return not (self.unix_socket or self.plaintext)

    def options(self) -> list[tuple[str, Any]]:
        options = list(_CHANNEL_OPTIONS)
        if self.server_name and self.secure:
            options += [
                ("grpc.ssl_target_name_override", self.server_name),
                ("grpc.default_authority", self.server_name),
            ]
        overridden = {key for key, _ in self.channel_options}
        return [o for o in options if o[0] not in overridden] + list(self.channel_options)

    def client_certificate(self) -> bytes | None:
        """The client certificate chain (PEM) for mutual TLS, or None."""
        return _read(self.cert_file, "cert_file")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "ca_file"),
            private_key=_read(self.key_file, "key_file"),
            certificate_chain=self.client_certificate(),
        )

    def open_channel(self, channels: Any) -> Any:
        """A channel to the broker, from `grpc` (blocking) or `grpc.aio`: both modules take
        the same arguments."""
        if self.secure:
            return channels.secure_channel(
                self.address, self.channel_credentials(), options=self.options()
            )
        return channels.insecure_channel(self.address, options=self.options())

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """`authorization: Bearer ...` (the file is re-read: rotated credentials work)."""
        credential = self.credential
        if self.credential_file is not None:
            raw = _read(self.credential_file, "credential_file")
            credential = (raw or b"").decode("utf-8", "replace").strip()
            if not credential:
                raise ClientConfigError(
                    "{}: ", "credential_file", detail=f"{self.credential_file} is empty"
                )
        if not credential:
            return ()
        return (("authorization", f"Bearer {credential}"),)


def _read(path: Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientConfigError(
            "{}: ", name, detail=f"cannot read {path}: {exc.strerror}"
        ) from None


def client_config(address: str | ClientConfig, kwargs: dict[str, Any]) -> ClientConfig:
    """`address` and ClientConfig's fields as keywords (paths as str or Path), or a
    ClientConfig (the keywords replace its fields)."""
    if isinstance(address, ClientConfig):
        return replace(address, **kwargs) if kwargs else address
    for key in ("ca_file", "cert_file", "key_file", "credential_file"):
        if kwargs.get(key) is not None:
            kwargs[key] = Path(kwargs[key])
    return ClientConfig(address, **kwargs)
