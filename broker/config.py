"""Broker settings: a YAML file, overridden by TOKEN_BROKER_* variables, overridden by flags.

Keys are camelCase in YAML (like Kubernetes and Helm values). Environment variables use the
same names, upper-cased, with `__` between levels: `TOKEN_BROKER_SERVER__LISTEN=0.0.0.0:8443`,
`TOKEN_BROKER_KUBERNETES__KUBECONFIG=/etc/kube/config`. Unknown keys are errors, so a typo
fails fast instead of silently falling back to a default.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel, to_snake
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from broker.filemodes import FileMode

ENV_PREFIX = "TOKEN_BROKER_"


class ConfigError(Exception):
    """A configuration file or override is invalid; the message names the bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class TLSSettings(_Section):
    """Server TLS. With `clientCaFile` set, clients must present a certificate (mutual TLS)."""

    # The server certificate (PEM; the chain may follow the leaf) and its key, checked at start.
    cert_file: Path
    key_file: Path
    # CA of client certificates; None: no mutual TLS.
    client_ca_file: Path | None = None
    # With clientCaFile: false makes a client certificate optional.
    require_client_cert: bool = True
    # How often the files are checked for changes (by content hash); SIGHUP reloads at once.
    reload_interval_seconds: float = Field(default=5.0, gt=0)


class ServerSettings(_Section):
    # host:port for TCP (IPv6 as [::1]:50051); None disables TCP.
    listen: str | None = "127.0.0.1:50051"
    # Path of a unix socket to listen on as well (or instead).
    unix_socket: Path | None = None
    # File mode of the unix socket: who may connect is decided by file permissions.
    # Octal: YAML 0660 or "0660"/"0o660" (a string from the environment is read as octal).
    unix_socket_mode: Annotated[int, FileMode("0660")] = 0o660
    tls: TLSSettings | None = None
    # Plaintext TCP needs this AND a loopback address (dev mode sets it).
    allow_plaintext: bool = False
    # host:port of a plaintext listener serving only grpc.health.v1, for kubelet gRPC probes
    # (they cannot speak TLS). No tokens are served there, so any address is allowed.
    health_listen: str | None = None
    # After SIGTERM, keep serving this long while not ready (health NOT_SERVING, /readyz 503)
    # before the listeners close: Kubernetes removes a terminating pod from its endpoints at
    # the same time as it signals it, so new connections may still arrive for a few seconds.
    # The Helm chart sets 5.
    shutdown_delay_seconds: float = Field(default=0.0, ge=0)
    # How long in-flight calls may run after the listeners close before they are cancelled.
    shutdown_grace_seconds: float = Field(default=15.0, ge=0)
    # Close connections after this age so clients rebalance across replicas (None: never).
    max_connection_age_seconds: float | None = Field(default=300.0, gt=0)
    # How long calls on a connection past its age may still run.
    max_connection_age_grace_seconds: float = Field(default=30.0, ge=0)
    # HTTP/2 streams (calls) one connection may have open at once (grpc.max_concurrent_streams);
    # a client queues the calls beyond it.
    max_concurrent_streams: int = Field(default=100, ge=1, le=2**31 - 1)
    # How long a call may take to send its request message (and end its side of the stream),
    # whatever its deadline: a call that sends nothing is ended, not held.
    receive_timeout_seconds: float = Field(default=10.0, gt=0)
    # The deadline of a CreateToken call that sets none; kubernetes.requestTimeoutSeconds
    # bounds the upstream part of such a call within it.
    default_deadline_seconds: float = Field(default=60.0, gt=0)
    # CreateToken calls in flight not yet authenticated or still waiting for their request
    # message, per process; calls beyond it are shed at once (UNAVAILABLE).
    max_pending_calls: int = Field(default=2000, ge=1)
    http_listen: str | None = Field(
        default=None,
        description=(
            "host:port of the HTTP door (broker.http_door): the Kubernetes-compatible "
            "TokenRequest endpoint and OAuth 2.0 token exchange, on the same request path as "
            "gRPC. Off by default. HTTPS with the certificate of `server.tls` (client "
            "certificates verified against its `clientCaFile`); plaintext only on a loopback "
            "address with `allowPlaintext` (or in dev mode), like `server.listen`."
        ),
    )

    http_tls: TLSSettings | None = Field(
        default=None,
        description=(
            "TLS of the HTTP door when it is not `server.tls` (another certificate for the "
            "HTTP door, or HTTPS there while gRPC is plaintext in dev mode); default: "
            "`server.tls`. Its files are followed and reloaded like `server.tls`'s."
        ),
    )

    @field_validator("http_listen", mode="before")
    @classmethod
    def _http_disabled(cls, value: object) -> object:
        # The environment cannot say null: TOKEN_BROKER_SERVER__HTTP_LISTEN="" does.
        if isinstance(value, str) and value.strip().lower() in ("", "null"):
            return None
        return value

    @model_validator(mode="after")
    def _some_listener(self) -> ServerSettings:
        if self.listen is None and self.unix_socket is None:
            raise ValueError("set server.listen or server.unixSocket (or both)")
        return self


class RetrySettings(_Section):
    """Retries of retryable upstream failures (connection errors, 429, 5xx), within the deadline."""

    # Attempts at most, the first included.
    max_attempts: int = Field(default=4, ge=1, le=20)
    # Exponential backoff with full jitter between attempts, from this to max_backoff_seconds.
    initial_backoff_seconds: float = Field(default=0.1, gt=0)
    max_backoff_seconds: float = Field(default=2.0, gt=0)
    # A Retry-After longer than this is not waited for: the caller gets UNAVAILABLE + RetryInfo.
    max_retry_after_seconds: float = Field(default=5.0, ge=0)


class KubernetesSettings(_Section):
    """How the broker reaches the Kubernetes API."""

    # auto: in-cluster when running in a pod, else the kubeconfig.
    mode: Literal["auto", "inCluster", "kubeconfig"] = "auto"
    # None: $KUBECONFIG, else ~/.kube/config.
    kubeconfig: Path | None = None
    # None: the kubeconfig's current context.
    context: str | None = None
    # Upper bound of one upstream call when the caller sets no gRPC deadline.
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    # Concurrent connections to the API server.
    connection_pool_size: int = Field(default=64, ge=1)
    retry: RetrySettings = RetrySettings()


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class PolicySettings(_Section):
    """Who may get which tokens (broker.policy). Without a file every request is denied."""

    # The policy YAML; None: every request is denied.
    file: Path | None = None
    # How often the file is checked for changes (by content hash); SIGHUP reloads at once.
    reload_interval_seconds: float = Field(default=5.0, gt=0)


class AuditSettings(_Section):
    """The audit log: one JSON line per CreateToken decision, its own stream (not logging)."""

    sink: Literal["stdout", "file"] = "stdout"
    # Appended to (created with mode 0640 if missing); required with sink: file.
    file: Path | None = None
    # Refuse to issue a token (UNAVAILABLE, AUDIT_UNAVAILABLE) when its line cannot be written.
    fail_closed: bool = False
    # A call waits at most this long for its line (a blocked sink: a pipe nobody reads).
    write_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    # Lines waiting to be written, at most; beyond, a line is not queued (refused or lost).
    max_queued_lines: int = Field(default=10_000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _file_iff_file_sink(self) -> AuditSettings:
        if self.sink == "file" and self.file is None:
            raise ValueError("set audit.file when audit.sink is file")
        if self.sink != "file" and self.file is not None:
            raise ValueError("audit.file is only written with audit.sink: file")
        return self


class AdminSettings(_Section):
    """The plaintext admin HTTP listener: /metrics, /healthz, /readyz. No tokens are served
    there, so any address is allowed (a pod sets 0.0.0.0:8082).

    Port 8082 by default: 9090 is Prometheus's own port (a broker and a Prometheus on one
    developer's machine would clash), and 9091-9999 are taken by Prometheus components and
    exporters (pushgateway 9091, alertmanager 9093, node exporter 9100, ...)."""

    # host:port (IPv6 as [::1]:8082); None (an empty TOKEN_BROKER_ADMIN__LISTEN, or
    # --admin-listen '') disables the listener.
    listen: str | None = "127.0.0.1:8082"

    @field_validator("listen", mode="before")
    @classmethod
    def _disabled(cls, value: object) -> object:
        # The environment cannot say null: TOKEN_BROKER_ADMIN__LISTEN="" or "null" does.
        if isinstance(value, str) and value.strip().lower() in ("", "null"):
            return None
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                split_host_port(value, "admin.listen")
            except ConfigError:
                raise ValueError(f"{value!r} is not host:port") from None
        return value


class MetricsSettings(_Section):
    """What the Prometheus metrics may reveal."""

    # Add a `caller` label (the authenticated identity) to the token and policy-decision
    # counters. Off by default: identities are operator-bounded but can be many.
    caller_labels: bool = False
    # With callerLabels: distinct callers labelled by name; later ones share `caller="other"`.
    caller_label_limit: int = Field(default=100, ge=1, le=10_000)


class ReadinessSettings(_Section):
    """When the broker is ready: the policy is loaded and the Kubernetes API is reachable."""

    # How often an idle broker checks the API server (GET /readyz).
    probe_interval_seconds: float = Field(default=10.0, gt=0)
    # Not ready once the API server has been unreachable (no answer, or a 5xx) this long.
    unreachable_after_seconds: float = Field(default=30.0, gt=0)


# --- authentication -----------------------------------------------------------------------

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Asymmetric JWS algorithms a JWT issuer may be configured with. `none` and HS* never: a
# shared-secret algorithm verified against a published public key is the classic forgery.
JWT_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class MTLSAuthSettings(_Section):
    """Callers identified by their verified client certificate (needs server.tls.clientCaFile)."""

    # Callers identified by their verified client certificate (needs server.tls.clientCaFile).
    enabled: bool = False


class ApiKeyEntry(_Section):
    """An API key, by the SHA-256 (hex) of the key: the key itself is never configured."""

    # The caller's identity (Identity.name) when it presents this key.
    name: str = Field(min_length=1)
    # The key's SHA-256, 64 hex digits (token-broker apikey hash): never the key itself.
    sha256: str = Field(repr=False)

    @field_validator("sha256", mode="before")
    @classmethod
    def _hex_digest(cls, value: object) -> object:
        # The value is not quoted back: it might be a key pasted where its hash belongs.
        if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value.strip().lower()):
            raise ValueError(
                "must be the 64 hex digits of the key's SHA-256 (token-broker apikey hash)"
            )
        return value.strip().lower()


def check_unique_api_keys(entries: typing.Iterable[ApiKeyEntry]) -> None:
    seen: set[str] = set()
    for entry in entries:
        if entry.sha256 in seen:
            raise ValueError(f"the key of {entry.name!r} is listed twice")
        seen.add(entry.sha256)


class ApiKeySettings(_Section):
    """`Authorization: Bearer <key>` callers: key hashes inline and/or in a mounted YAML file
    (`keys: [{name: ci-deployer, sha256: <hex>}]`)."""

    # A mounted YAML file with a `keys:` list like the one below, followed while serving.
    file: Path | None = None
    # Inline {name, sha256} entries.
    keys: tuple[ApiKeyEntry, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> ApiKeySettings:
        check_unique_api_keys(self.keys)
        return self


class JwtIssuerSettings(_Section):
    """One external OIDC/JWT issuer whose bearer tokens identify callers."""

    # Exact `iss` value.
    issuer: str = Field(min_length=1)
    # Accepted `aud` values: a token must carry at least one of them.
    audiences: tuple[str, ...] = ()
    # The issuer's public keys: a JWKS file, or a URL fetched and cached.
    jwks_file: Path | None = None
    # https (plain http only on a loopback address); exactly one of jwksFile and jwksUrl.
    jwks_url: str | None = None
    # jwksUrl: the CA bundle its TLS certificate must chain to (default: the system's CAs),
    # for an issuer behind a private CA. Read at every fetch, so a rotated bundle counts.
    jwks_ca_file: Path | None = None
    # Asymmetric algorithms only: `none` and HS* are refused.
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    # Leeway for exp, nbf and iat.
    clock_skew_seconds: int = Field(default=60, ge=0, le=600)
    # The claim naming the caller.
    identity_claim: str = Field(default="sub", min_length=1)
    # jwksUrl: refetch after this age; unknown `kid`s refetch at most once per min-refresh.
    jwks_cache_seconds: float = Field(default=300.0, gt=0)
    jwks_min_refresh_seconds: float = Field(default=30.0, ge=0)
    # Bound of one JWKS fetch.
    jwks_fetch_timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(value):
            raise ValueError("at least one non-empty audience is required")
        return value

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one algorithm is required")
        for alg in value:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                raise ValueError(f"{alg} is not allowed (only asymmetric algorithms)")
            if alg not in JWT_ALGORITHMS:
                raise ValueError(f"{alg} is not one of {', '.join(sorted(JWT_ALGORITHMS))}")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = urllib.parse.urlsplit(value)
        if not url.hostname or url.scheme not in ("https", "http"):
            raise ValueError(f"{value!r} is not an http(s) URL")
        if url.scheme == "http" and not is_loopback_address(f"{url.hostname}:0"):
            raise ValueError("must be https (plain http only on a loopback address)")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtIssuerSettings:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of jwksFile or jwksUrl")
        if self.jwks_ca_file is not None and not (self.jwks_url or "").startswith("https:"):
            raise ValueError("jwksCaFile is for an https jwksUrl")
        return self


class JwtAuthSettings(_Section):
    # The issuers whose JWTs identify callers (authorization: Bearer <jwt>).
    issuers: tuple[JwtIssuerSettings, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> JwtAuthSettings:
        names = [i.issuer for i in self.issuers]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"issuer {name!r} is configured twice")
        return self


class UnixSocketAuthSettings(_Section):
    # The identity of every caller on server.unixSocket (None: they need credentials too).
    identity: str | None = Field(default=None, min_length=1)
    # Not only the file mode: when either is set, only processes whose uid is in allowedUids
    # or whose gid is in allowedGids (the peer credentials the kernel recorded at connect,
    # SO_PEERCRED) may use server.unixSocket; other connections are closed (broker.unix_socket).
    allowed_uids: tuple[Annotated[int, Field(ge=0)], ...] = ()
    # Empty, with allowedUids empty too: no peer check (the file mode alone decides).
    allowed_gids: tuple[Annotated[int, Field(ge=0)], ...] = ()

    @property
    def checks_peers(self) -> bool:
        return bool(self.allowed_uids or self.allowed_gids)


class AuthenticationSettings(_Section):
    """How callers prove who they are. The default enables nothing: every call is refused."""

    mtls: MTLSAuthSettings = MTLSAuthSettings()
    api_keys: ApiKeySettings = ApiKeySettings()
    jwt: JwtAuthSettings = JwtAuthSettings()
    unix_socket: UnixSocketAuthSettings = UnixSocketAuthSettings()
    # How often the API key file and JWKS files are checked for changes (by content hash);
    # SIGHUP reloads at once.
    reload_interval_seconds: float = Field(default=5.0, gt=0)


class CacheSettings(_Section):
    """The in-memory token cache (broker.cache): one token per caller and token shape.

    Tokens are served while younger than 80% of their lifetime and `maxAgeSeconds` (kubelet's
    rule), then refreshed. Tokens live only in this process's memory.
    """

    # false: every request is a fresh TokenRequest.
    enabled: bool = True
    # LRU bound on cached tokens.
    max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    # Refresh recently requested tokens in the background at their refresh point.
    refresh_ahead: bool = False
    # When a refresh cannot reach the API server, serve the cached token while it is valid.
    serve_stale_on_error: bool = True
    # A cached token is refreshed once this old, whatever its lifetime (kubelet: 24 h).
    max_age_seconds: float = Field(default=86_400.0, gt=0, le=86_400.0)


# --- rate limits ------------------------------------------------------------------------


class RateSettings(_Section):
    """One GCRA limit: `rate` requests per second sustained, up to `burst` at once (in the
    environment, set both)."""

    rate: float = Field(gt=0, allow_inf_nan=False)
    burst: int = Field(ge=1, le=1_000_000)


class RedisTLSSettings(_Section):
    enabled: bool = False
    # CA bundle that signed the Redis server's certificate (default: the system's).
    ca_file: Path | None = None
    # A client certificate and its key, when Redis requires TLS client authentication.
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _cert_and_key(self) -> RedisTLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both certFile and keyFile, or neither")
        return self


class RedisSettings(_Section):
    """The Redis holding the limits shared by all replicas (rateLimit.backend: redis)."""

    # host:port (IPv6 as [::1]:6379).
    address: str = "127.0.0.1:6379"
    tls: RedisTLSSettings = RedisTLSSettings()
    # ACL user; None: the default user.
    username: str | None = None
    # A file holding the password (a mounted Secret), re-read for each new connection.
    password_file: Path | None = None
    # Prefix of every key the broker writes.
    key_prefix: str = "token-broker:"
    # Bound of one check (connecting included); slower counts as Redis unavailable.
    timeout_seconds: float = Field(default=0.5, gt=0)
    # While Redis is unavailable it is tried again after this long, not on every call.
    retry_interval_seconds: float = Field(default=2.0, gt=0)

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        try:
            split_host_port(value, "rateLimit.redis.address")
        except ConfigError:
            raise ValueError(f"{value!r} is not host:port") from None
        return value


class UpstreamLimitSettings(_Section):
    """Protection of the Kubernetes API server (broker.upstream_guard)."""

    # Concurrent TokenRequest calls to the API server, per broker process.
    max_concurrent: int = Field(default=32, ge=1)
    # How long a call may wait for a free slot (never past the caller's deadline).
    max_wait_seconds: float = Field(default=2.0, ge=0)
    # After a 429 with Retry-After for a service account, its requests are refused early
    # for that long, up to this bound.
    max_retry_after_seconds: float = Field(default=60.0, ge=0)


class RateLimitSettings(_Section):
    """Rate limits (broker.ratelimit): per caller, per target service account, and global.

    A scope set to null has no limit. Policy rules may override perCaller and
    perServiceAccount for the requests they decide.
    """

    # false: no per-caller, per-service-account or global limits (the upstream cap, the 429
    # feedback and authFailuresPerPeer stay).
    enabled: bool = True
    # Per caller identity (auth method, issuer and name).
    per_caller: RateSettings | None = RateSettings(rate=10, burst=20)
    # Per target namespace/serviceaccount, whoever asks.
    per_service_account: RateSettings | None = RateSettings(rate=50, burst=100)
    # All calls to this broker (all replicas, with redis). YAML `global` (a Python keyword).
    global_limit: RateSettings | None = Field(
        default=RateSettings(rate=200, burst=400), alias="global"
    )
    # memory: per process; redis: shared by every replica (rateLimit.redis).
    backend: Literal["memory", "redis"] = "memory"
    redis: RedisSettings = RedisSettings()
    # While Redis is unavailable: local (per-process) limits, or refuse calls (UNAVAILABLE).
    on_redis_unavailable: Literal["local", "refuse"] = "local"
    upstream: UpstreamLimitSettings = UpstreamLimitSettings()
    # Calls that fail authentication, per peer address (broker.authn_throttle; per process,
    # whatever `backend` and `enabled` say). Beyond it a peer is refused before authentication.
    auth_failures_per_peer: RateSettings | None = RateSettings(rate=1, burst=100)


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
    policy: PolicySettings = PolicySettings()
    audit: AuditSettings = AuditSettings()
    admin: AdminSettings = AdminSettings()
    metrics: MetricsSettings = MetricsSettings()
    readiness: ReadinessSettings = ReadinessSettings()
    authentication: AuthenticationSettings = AuthenticationSettings()
    cache: CacheSettings = CacheSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
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
        return tuple(
            _CanonicalKeys(settings_cls, source)
            for source in (init_settings, env_settings, file_settings)
        )


class _CanonicalKeys(PydanticBaseSettingsSource):
    """A source with every known key spelled as its field name.

    The file and flags say `unixSocket`, the environment `unix_socket` (or `unixsocket`):
    pydantic-settings merges sources by key, so two spellings of one setting would both
    reach validation and fail as extra inputs instead of overriding each other.
    """

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource):
        super().__init__(settings_cls)
        self._inner = inner

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ delegates to the inner source

    def __call__(self) -> dict[str, Any]:
        return canonical_keys(self._inner(), self.settings_cls)


def _squash(name: str) -> str:
    return name.replace("_", "").lower()


def _section_model(annotation: Any) -> type[BaseModel] | None:
    candidates = (annotation, *typing.get_args(annotation))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def canonical_keys(data: Mapping[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`data` with keys matched to `model`'s fields case- and underscore-insensitively
    renamed to the field names, recursively; unknown keys are kept (and rejected later)."""
    fields = {_squash(name): (name, info) for name, info in model.model_fields.items()}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name, info = fields.get(_squash(key), (key, None))
        if name in out:
            raise SettingsError(f"{to_camel(name)} is given twice (as {key!r} too)")
        section = _section_model(info.annotation) if info is not None else None
        if section is not None and isinstance(value, Mapping):
            value = canonical_keys(value, section)
        out[name] = value
    return out


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


def env_var_name(loc: tuple[int | str, ...]) -> str:
    """The TOKEN_BROKER_* variable of a settings key: ("server", "unixSocket") ->
    TOKEN_BROKER_SERVER__UNIX_SOCKET."""
    return ENV_PREFIX + "__".join(to_snake(str(p)).upper() for p in loc)


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    environ = {k.upper() for k in os.environ}
    for err in exc.errors():
        # Keys as the YAML spells them, whichever source used the snake_case name.
        key = ".".join(to_camel(p) if isinstance(p, str) else str(p) for p in err["loc"])
        key = key or "(top level)"
        # Name the variable when one is set for this key: the bad value may be its.
        env = env_var_name(err["loc"])
        hint = f" ({env} is set)" if err["loc"] and env in environ else ""
        lines.append(f"  {key}{hint}: {err['msg']}")
    return "\n".join(lines)


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Load settings from the file, TOKEN_BROKER_* variables and flag overrides (nested dict)."""
    file_data = read_yaml_file(config_file) if config_file is not None else {}
    source = (f"{config_file}, " if config_file is not None else "") + (
        f"{ENV_PREFIX}* environment, flags"
    )
    token = _file_data.set(file_data)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    except SettingsError as exc:
        # A key given twice, or a TOKEN_BROKER_* value that is not valid JSON.
        raise ConfigError(f"invalid configuration ({source}): {exc}") from None
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


def split_host_port(listen: str, key: str = "server.listen") -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:50051`); the host keeps its brackets."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{key}: {listen!r} is not host:port")
    return host, int(port)


def check_transport_security(settings: Settings) -> None:
    """Refuse plaintext TCP except on loopback with allowPlaintext (or in dev mode).

    Tokens are bearer credentials: over plaintext anyone on the path could replay them. Dev
    mode implies allowPlaintext but still only on loopback. Unix sockets may be plaintext:
    their file mode decides who may connect.
    """
    server = settings.server
    if server.health_listen is not None:
        split_host_port(server.health_listen, "server.healthListen")
    if server.http_listen is not None:
        _check_listener_security(settings, server.http_listen, "server.httpListen")
    if server.listen is None:
        return
    split_host_port(server.listen)
    if server.tls is not None:
        return
    if not (server.allow_plaintext or settings.dev):
        raise ConfigError(
            f"server.tls: plaintext TCP on {server.listen} refused; configure server.tls "
            "(certFile, keyFile), or set server.allowPlaintext on a loopback address"
        )
    if not is_loopback_address(server.listen):
        raise ConfigError(
            f"server.listen: plaintext is only allowed on a loopback address, not "
            f"{server.listen}; configure server.tls to listen there"
        )


def _check_listener_security(settings: Settings, listen: str, key: str) -> None:
    """check_transport_security's rule for one more TCP listener that serves tokens."""
    server = settings.server
    split_host_port(listen, key)
    if server.tls is not None or server.http_tls is not None:
        return
    if not (server.allow_plaintext or settings.dev):
        raise ConfigError(
            f"server.tls: plaintext HTTP on {listen} ({key}) refused; configure server.tls "
            "(certFile, keyFile), or set server.allowPlaintext on a loopback address"
        )
    if not is_loopback_address(listen):
        raise ConfigError(
            f"{key}: plaintext is only allowed on a loopback address, not {listen}; configure "
            "server.tls to listen there"
        )
