"""The sidecar agent's configuration (`token-broker agent --config agent.yaml`).

```yaml
broker:                          # the default connection of every sink (a sink's own wins)
  address: broker.example:8443   # host:port (TLS unless plaintext), or unix:/path
  plaintext: false               # loopback/dev only
  caFile: /etc/token-broker/ca.crt
  certFile: /etc/token-broker/client/tls.crt   # mutual TLS (with keyFile)
  keyFile: /etc/token-broker/client/tls.key
  serverName: broker.example     # the name to verify in the server certificate
  credentialFile: /var/run/secrets/token-broker/credential   # bearer: API key or OIDC JWT
  timeoutSeconds: 10             # one CreateToken call, the client's retries included
sinks:
  - name: vault                  # default: the path
    namespace: demo
    serviceAccount: build-robot
    audiences: [vault]           # [] / absent: the API server's own
    duration: 1h                 # Go duration or seconds (>= 10m); absent: server default
    boundObject: {kind: Pod, name: web-0, uid: 6c2f...}   # optional
    path: /var/run/secrets/tokens/vault-token
    mode: 0600                   # octal; default 0600
retry:                           # after a failed refresh (the client's own retries first)
  initialBackoffSeconds: 1
  maxBackoffSeconds: 60
health:
  listen: 127.0.0.1:8081         # GET /healthz: 200, or 503 when a sink has no valid token
```

Keys are camelCase; unknown keys are errors; every error names its key (`sinks.0.path: ...`).
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from broker.client import (
    BOUND_OBJECT_KINDS,
    BoundObject,
    ClientConfig,
    ClientConfigError,
    RetryPolicy,
)
from broker.durations import parse_go_duration
from broker.filemodes import FileMode

# The API server refuses shorter tokens.
MIN_DURATION_SECONDS = 600
DEFAULT_MODE = 0o600
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


class AgentConfigError(Exception):
    """The agent's configuration is invalid; the message names the bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class BrokerConnection(_Section):
    address: str = Field(min_length=1)
    plaintext: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    credential_file: Path | None = None
    timeout_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> BrokerConnection:
        try:
            self.client_config()  # ClientConfig's own checks (cert+key, plaintext vs TLS files)
        except ClientConfigError as exc:
            raise ValueError(exc.spelled({f: to_camel(f) for f in exc.fields})) from None
        return self

    def client_config(self) -> ClientConfig:
        return ClientConfig(
            address=self.address,
            plaintext=self.plaintext,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            server_name=self.server_name,
            credential_file=self.credential_file,
            timeout=self.timeout_seconds,
            retry=RetryPolicy(),
        )


class BoundObjectConfig(_Section):
    kind: Literal["Pod", "Secret", "Node"]
    name: str = Field(min_length=1)
    uid: str = ""

    def to_client(self) -> BoundObject:
        return BoundObject(kind=self.kind, name=self.name, uid=self.uid)


class SinkConfig(_Section):
    name: str = ""
    broker: BrokerConnection | None = None
    namespace: str
    service_account: str
    audiences: list[str] = Field(default_factory=list)
    # Seconds; None: the API server's default (3600 s).
    duration: int | None = None
    bound_object: BoundObjectConfig | None = None
    path: Path
    mode: Annotated[int, FileMode("0600")] = DEFAULT_MODE

    @field_validator("namespace")
    @classmethod
    def _label(cls, value: str) -> str:
        if len(value) > 63 or not _DNS1123_LABEL.match(value):
            raise ValueError(f"{value!r} is not a DNS-1123 label")
        return value

    @field_validator("service_account")
    @classmethod
    def _subdomain(cls, value: str) -> str:
        if len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
            raise ValueError(f"{value!r} is not a DNS-1123 subdomain")
        return value

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, value: list[str]) -> list[str]:
        if any(not a for a in value):
            raise ValueError("an audience must not be empty")
        return value

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                seconds = parse_go_duration(value)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = Decimal(str(value))
        else:
            return value
        if seconds != seconds.to_integral_value():
            raise ValueError("cannot be expressed in units less than seconds")
        if seconds < MIN_DURATION_SECONDS:
            raise ValueError("may not specify a duration less than 10 minutes")
        return int(seconds)

    @field_validator("mode")
    @classmethod
    def _owner_reads(cls, value: int) -> int:
        if not value & 0o400:
            raise ValueError("the owner must be able to read the token (e.g. 0600)")
        return value

    @property
    def label(self) -> str:
        return self.name or str(self.path)

    def describe(self) -> str:
        return f"{self.label} ({self.namespace}/{self.service_account} -> {self.path})"


class RetryConfig(_Section):
    initial_backoff_seconds: float = Field(default=1.0, gt=0)
    max_backoff_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> RetryConfig:
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise ValueError("maxBackoffSeconds must be at least initialBackoffSeconds")
        return self


class HealthConfig(_Section):
    # host:port of the plaintext /healthz listener (port 0: a free one).
    listen: str

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r} is not host:port")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class AgentConfig(_Section):
    broker: BrokerConnection | None = None
    sinks: list[SinkConfig] = Field(min_length=1)
    retry: RetryConfig = RetryConfig()
    health: HealthConfig | None = None

    @model_validator(mode="after")
    def _sinks(self) -> AgentConfig:
        paths: set[Path] = set()
        names: set[str] = set()
        for i, sink in enumerate(self.sinks):
            if sink.broker is None and self.broker is None:
                raise ValueError(f"sinks.{i}.broker: required when there is no top-level broker")
            path = Path(sink.path).absolute()
            if path in paths:
                raise ValueError(f"sinks.{i}.path: {sink.path} is the path of another sink")
            paths.add(path)
            if sink.label in names:
                raise ValueError(f"sinks.{i}.name: {sink.label!r} names another sink")
            names.add(sink.label)
        return self

    def connection(self, sink: SinkConfig) -> BrokerConnection:
        connection = sink.broker or self.broker
        assert connection is not None  # checked by _sinks
        return connection

    def check_files(self, source: str = "agent configuration") -> None:
        """Read every file the connections name once — the TLS files and the credential
        file — so that one that cannot be read (or an empty credential file) is a
        configuration error naming its key, like every other bad setting, rather than a
        traceback or a failed first refresh. The credential file is re-read for every call
        afterwards (a rotated credential is picked up; a failure then is retried)."""
        # The connections the sinks use (as the agent opens them), by the key that sets each.
        used = {
            f"sinks.{i}.broker" if sink.broker is not None else "broker": self.connection(sink)
            for i, sink in enumerate(self.sinks)
        }
        for key, connection in used.items():
            config = connection.client_config()
            try:
                if config.secure:
                    config.channel_credentials()
                config.call_metadata()
            except ClientConfigError as exc:
                spelled = exc.spelled({f: to_camel(f) for f in exc.fields})
                raise AgentConfigError(
                    f"invalid agent configuration ({source}):\n  {key}.{spelled}"
                ) from None


def format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid agent configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(to_camel(p) if isinstance(p, str) else str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"  {key or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_agent_config(data: Any, source: str = "agent configuration") -> AgentConfig:
    if not isinstance(data, dict):
        raise AgentConfigError(f"{source}: top level must be a mapping")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise AgentConfigError(format_errors(exc, source)) from None


def load_agent_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AgentConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AgentConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_agent_config({} if data is None else data, str(path))


__all__ = [
    "BOUND_OBJECT_KINDS",
    "AgentConfig",
    "AgentConfigError",
    "BoundObjectConfig",
    "BrokerConnection",
    "HealthConfig",
    "RetryConfig",
    "SinkConfig",
    "load_agent_config",
    "parse_agent_config",
]
