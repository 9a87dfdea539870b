"""Broker settings: a YAML file, overridden by TOKEN_BROKER_* variables, overridden by flags.

Keys are camelCase in YAML (like Kubernetes and Helm values). Environment variables use the
same names, upper-cased, with `__` between levels: `TOKEN_BROKER_SERVER__LISTEN=0.0.0.0:8443`,
`TOKEN_BROKER_KUBERNETES__KUBECONFIG=/etc/kube/config`. Unknown keys are errors, so a typo
fails fast instead of silently falling back to a default.
"""

from __future__ import annotations

import contextvars
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "TOKEN_BROKER_"


class ConfigError(Exception):
    """A configuration file or override is invalid; the message names the bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class TLSSettings(_Section):
    """Server TLS. With `clientCaFile` set, clients must present a certificate (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    require_client_cert: bool = True


class ServerSettings(_Section):
    # host:port for TCP (IPv6 as [::1]:50051); None disables TCP.
    listen: str | None = "127.0.0.1:50051"
    # Path of a unix socket to listen on as well (or instead).
    unix_socket: Path | None = None
    # File mode of the unix socket: who may connect is decided by file permissions.
    unix_socket_mode: int = 0o660
    tls: TLSSettings | None = None
    # Plaintext TCP needs this AND a loopback address (dev mode sets it).
    allow_plaintext: bool = False
    # How long in-flight calls may run after SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = Field(default=15.0, ge=0)
    # Close connections after this age so clients rebalance across replicas.
    max_connection_age_seconds: float | None = Field(default=300.0, gt=0)
    max_connection_age_grace_seconds: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _some_listener(self) -> ServerSettings:
        if self.listen is None and self.unix_socket is None:
            raise ValueError("set server.listen or server.unixSocket (or both)")
        return self


class RetrySettings(_Section):
    """Retries of retryable upstream failures (connection errors, 429, 5xx), within the deadline."""

    max_attempts: int = Field(default=4, ge=1, le=20)
    initial_backoff_seconds: float = Field(default=0.1, gt=0)
    max_backoff_seconds: float = Field(default=2.0, gt=0)
    # A Retry-After longer than this is not waited for: the caller gets UNAVAILABLE + RetryInfo.
    max_retry_after_seconds: float = Field(default=5.0, ge=0)


class KubernetesSettings(_Section):
    """How the broker reaches the Kubernetes API."""

    # auto: in-cluster when running in a pod, else the kubeconfig.
    mode: Literal["auto", "inCluster", "kubeconfig"] = "auto"
    kubeconfig: Path | None = None
    context: str | None = None
    # Upper bound of one upstream call when the caller sets no gRPC deadline.
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    # Concurrent connections to the API server.
    connection_pool_size: int = Field(default=64, ge=1)
    retry: RetrySettings = RetrySettings()


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class Settings(BaseSettings):
    """All broker settings. Build with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    log: LogSettings = LogSettings()
    # Dev mode: embedded emulator, plaintext loopback. Never in production.
    dev: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: flags (init) > environment > the YAML file.
        file_settings = InitSettingsSource(settings_cls, dict(_file_data.get()))
        return (init_settings, env_settings, file_settings)


# The YAML file's content for the load in progress: pydantic-settings builds its sources
# inside the constructor, so the file is handed over out of band.
_file_data: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "token_broker_config_file_data", default=MappingProxyType({})
)


def read_yaml_file(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Load settings from the file, TOKEN_BROKER_* variables and flag overrides (nested dict)."""
    file_data = read_yaml_file(config_file) if config_file is not None else {}
    source = str(config_file) if config_file is not None else "environment and flags"
    token = _file_data.set(file_data)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    finally:
        _file_data.reset(token)


def is_loopback_address(listen: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost listen addresses (host:port)."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
