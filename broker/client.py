"""A small Python client of the broker: `TokenBrokerClient` (sync) and `AsyncTokenBrokerClient`.

    async with AsyncTokenBrokerClient("broker.example:8443", ca_file="ca.crt",
                                      credential_file="/var/run/secrets/tb/key") as client:
        result = await client.create_token("demo", "build-robot", audiences=["vault"])
        result.token, result.expiration_timestamp

Transport: TLS (the default for TCP; `ca_file` for a private CA), mutual TLS (`cert_file` +
`key_file`), plaintext TCP only when asked (`plaintext=True`: loopback/dev), or a unix socket
(`unix:/path`, always plaintext: the socket's file mode decides who connects). A bearer
credential (an API key or an OIDC JWT) is sent as `authorization: Bearer ...`; a
`credential_file` is re-read for every call, so a rotated (projected) token is picked up.

Retries (`RetryPolicy`): bounded attempts, all within the caller's deadline (`timeout`: the
whole call, retries included), and only when a retry may succeed:

- `UNAVAILABLE`: always (the broker or the API server could not answer);
- `RESOURCE_EXHAUSTED`: only when the status carries `RetryInfo` (or the
  `grpc-retry-pushback-ms` trailer): a rate limit that says when to come back. Without one
  (e.g. a message too large) it is final.

Nothing else is retried (`DEADLINE_EXCEEDED` is the caller's own deadline). The server's delay
(RetryInfo, else the pushback trailer) replaces the backoff; otherwise the delay is exponential
with full jitter, capped at `max_backoff`. A delay that would not fit in the remaining deadline,
or longer than `max_retry_delay`, ends the retries: the last error is raised, with its delay.

Results are `TokenResult`s; failures raise `TokenBrokerError` with the gRPC code, message,
ErrorInfo reason/domain/metadata, field violations and retry delay. No repr, str or exception
message here contains a token or a credential.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from grpc import aio

from broker import __version__
from broker.errors import RETRY_PUSHBACK_TRAILER, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc

# kubectl's boundObjectKinds: kind -> apiVersion.
BOUND_OBJECT_KINDS = {"Node": "v1", "Pod": "v1", "Secret": "v1"}
DEFAULT_TIMEOUT_SECONDS = 10.0
METHOD = "/tokenbroker.v1.TokenBrokerService/CreateToken"
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


# --- results and errors -----------------------------------------------------------------------


@dataclass(frozen=True)
class BoundObject:
    """The object a token is bound to (Pod, Secret or Node); `uid` optional."""

    kind: str
    name: str
    uid: str = ""

    def to_proto(self) -> pb.BoundObjectReference:
        if self.kind not in BOUND_OBJECT_KINDS:
            raise ValueError(f"bound object kind must be one of {', '.join(BOUND_OBJECT_KINDS)}")
        if not self.name:
            raise ValueError("a bound object needs a name")
        return pb.BoundObjectReference(
            kind=self.kind, api_version=BOUND_OBJECT_KINDS[self.kind], name=self.name, uid=self.uid
        )


@dataclass(frozen=True)
class TokenResult:
    """A minted token. `token_request` is the whole TokenRequest the broker returned.

    `expiration_timestamp` is timezone-aware (UTC); a dry run, which mints nothing, has an
    empty token and the Unix epoch there.
    """

    token: str = field(repr=False)
    expiration_timestamp: datetime
    audiences: tuple[str, ...]
    warnings: tuple[str, ...]
    token_request: pb.TokenRequest = field(repr=False)

    @classmethod
    def from_response(cls, response: pb.CreateTokenResponse) -> TokenResult:
        tr = response.token_request
        expires = (
            tr.status.expiration_timestamp.ToDatetime(tzinfo=UTC)
            if tr.status.HasField("expiration_timestamp")
            else datetime.fromtimestamp(0, UTC)
        )
        return cls(
            token=tr.status.token,
            expiration_timestamp=expires,
            audiences=tuple(tr.spec.audiences),
            warnings=tuple(response.warnings),
            token_request=tr,
        )

    @property
    def issued_at(self) -> datetime | None:
        """The JWT's `iat`, else metadata.creationTimestamp (the API server's clock)."""
        iat = jwt_claims(self.token).get("iat")
        if isinstance(iat, int | float) and not isinstance(iat, bool):
            return datetime.fromtimestamp(iat, UTC)
        if self.token_request.metadata.HasField("creation_timestamp"):
            return self.token_request.metadata.creation_timestamp.ToDatetime(tzinfo=UTC)
        return None

    def lifetime_seconds(self) -> float | None:
        """Seconds from issue to expiry by the API server's clock (None: unknown): the
        broker cache's rule (`broker.cache.token_lifetime`)."""
        from broker.cache import token_lifetime  # the cache pulls in the server side

        return token_lifetime(self.token_request)


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class TokenBrokerError(Exception):
    """A failed CreateToken call: the gRPC status and its `google.rpc` details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        # Seconds after which a retry may succeed (RetryInfo, else grpc-retry-pushback-ms).
        self.retry_delay = retry_delay
        # Calls made, retries included.
        self.attempts = attempts

    @classmethod
    def from_rpc_error(cls, error: aio.AioRpcError | grpc.Call) -> TokenBrokerError:
        status = rich_status_from_call(error)
        reason, domain, metadata = "", "", {}
        if status.error_info is not None:
            reason, domain = status.error_info.reason, status.error_info.domain
            metadata = dict(status.error_info.metadata)
        violations: tuple[FieldViolation, ...] = ()
        if status.bad_request is not None:
            violations = tuple(
                FieldViolation(v.field, v.description) for v in status.bad_request.field_violations
            )
        delay: float | None = None
        if status.retry_info is not None:
            delay = status.retry_info.retry_delay.ToTimedelta().total_seconds()
        elif RETRY_PUSHBACK_TRAILER in status.trailers:
            try:
                pushback = int(status.trailers[RETRY_PUSHBACK_TRAILER])
            except ValueError:
                pushback = -1
            # gRPC: a negative or malformed pushback means "do not retry".
            delay = pushback / 1000 if pushback >= 0 else None
        return cls(
            status.code,
            status.message,
            reason=reason,
            domain=domain,
            metadata=metadata,
            field_violations=violations,
            retry_delay=delay,
        )

    @property
    def retryable(self) -> bool:
        """UNAVAILABLE; RESOURCE_EXHAUSTED only with a retry delay from the server."""
        if self.code == grpc.StatusCode.UNAVAILABLE:
            return True
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_delay is not None

    def describe(self) -> str:
        """Several lines: code, message, reason, metadata, violations, retry delay."""
        lines = [f"{self.code.name}: {self.message}"]
        if self.reason:
            lines.append(f"  reason: {self.reason} (domain {self.domain})")
        lines += [f"  {k}: {v}" for k, v in sorted(self.metadata.items())]
        lines += [f"  field {v.field}: {v.description}" for v in self.field_violations]
        if self.retry_delay is not None:
            lines.append(f"  retry after: {self.retry_delay:g}s")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"TokenBrokerError({self.code.name}, {self.message!r}, reason={self.reason!r}, "
            f"retry_delay={self.retry_delay!r}, attempts={self.attempts})"
        )


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    # A server asking for a longer wait than this ends the retries (the error carries it).
    max_retry_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and the multiplier >= 1")

    def backoff(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """The delay before retry number `retry` (1-based): full jitter under the cap."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return ceiling * rng()


NO_RETRIES = RetryPolicy(max_attempts=1)


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
    retry: RetryPolicy = RetryPolicy()
    channel_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("address is required")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if self.credential is not None and self.credential_file is not None:
            raise ValueError("give credential or credential_file, not both")
        if self.unix_socket:
            if self.ca_file or self.cert_file:
                raise ValueError("a unix socket is plaintext: no ca_file, cert_file or key_file")
        elif self.plaintext and (self.ca_file or self.cert_file):
            raise ValueError("plaintext cannot be combined with ca_file, cert_file or key_file")

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

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
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
            raw = _read(self.credential_file)
            credential = (raw or b"").decode("utf-8", "replace").strip()
            if not credential:
                raise ValueError(f"the credential file {self.credential_file} is empty")
        if not credential:
            return ()
        return (("authorization", f"Bearer {credential}"),)


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def _config(address: str | ClientConfig, kwargs: dict[str, Any]) -> ClientConfig:
    if isinstance(address, ClientConfig):
        return replace(address, **kwargs) if kwargs else address
    for key in ("ca_file", "cert_file", "key_file", "credential_file"):
        if kwargs.get(key) is not None:
            kwargs[key] = Path(kwargs[key])
    return ClientConfig(address, **kwargs)


def build_request(
    namespace: str,
    service_account: str,
    *,
    audiences: Sequence[str] = (),
    expiration_seconds: int | None = None,
    bound_object: BoundObject | None = None,
    dry_run: bool = False,
) -> pb.CreateTokenRequest:
    spec = pb.TokenRequestSpec(audiences=list(audiences))
    if expiration_seconds is not None:
        spec.expiration_seconds = expiration_seconds
    if bound_object is not None:
        spec.bound_object_ref.CopyFrom(bound_object.to_proto())
    return pb.CreateTokenRequest(
        namespace=namespace,
        service_account=service_account,
        token_request=pb.TokenRequest(spec=spec),
        dry_run=["All"] if dry_run else [],
    )


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, NOT verified ({} when it is not one): for expiry and display."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


class _Retrier:
    """The retry decisions shared by the sync and async clients."""

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        clock: Callable[[], float],
        rng: Callable[[], float],
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.rng = rng
        self.deadline = None if timeout is None else clock() + timeout
        self.attempts = 0

    def attempt_timeout(self) -> float | None:
        """The timeout of the next attempt: what is left of the deadline (None: none)."""
        self.attempts += 1
        if self.deadline is None:
            return None
        return max(0.001, self.deadline - self.clock())

    def delay(self, err: TokenBrokerError) -> float | None:
        """Seconds to wait before the next attempt, or None: raise `err`."""
        err.attempts = self.attempts
        if not err.retryable or self.attempts >= self.policy.max_attempts:
            return None
        if err.retry_delay is not None:
            if err.retry_delay > self.policy.max_retry_delay:
                return None
            wait = err.retry_delay
        else:
            wait = self.policy.backoff(self.attempts, self.rng)
        if self.deadline is not None and self.clock() + wait >= self.deadline:
            return None  # the next attempt could not start (let alone finish) in time
        return wait


# --- the clients ------------------------------------------------------------------------------


class AsyncTokenBrokerClient:
    """grpc.aio client. Use as `async with`, or call `close()`. One channel, reused."""

    def __init__(
        self,
        address: str | ClientConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        **kwargs: Any,
    ) -> None:
        """`address` and ClientConfig's fields as keywords, or a ClientConfig."""
        self.config = _config(address, kwargs)
        self._clock = clock
        self._rng = rng
        self._channel: aio.Channel = self.config.open_channel(aio)
        self._stub = pb_grpc.TokenBrokerServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"AsyncTokenBrokerClient({self.config.address!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def create_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: Sequence[str] = (),
        expiration_seconds: int | None = None,
        bound_object: BoundObject | None = None,
        dry_run: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, not a wait
    ) -> TokenResult:
        """A token for the service account. `timeout`: the whole call, retries included
        (default: the config's)."""
        request = build_request(
            namespace,
            service_account,
            audiences=audiences,
            expiration_seconds=expiration_seconds,
            bound_object=bound_object,
            dry_run=dry_run,
        )
        return await self.create_token_request(request, timeout=timeout)

    async def create_token_request(
        self,
        request: pb.CreateTokenRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, not a wait
    ) -> TokenResult:
        """CreateToken with a request built by the caller."""
        cfg = self.config
        retrier = _Retrier(
            cfg.retry, cfg.timeout if timeout is None else timeout, self._clock, self._rng
        )
        while True:
            metadata = cfg.call_metadata()
            try:
                response: pb.CreateTokenResponse = await self._stub.CreateToken(
                    request, timeout=retrier.attempt_timeout(), metadata=metadata
                )
            except aio.AioRpcError as rpc_error:
                err = TokenBrokerError.from_rpc_error(rpc_error)
                wait = retrier.delay(err)
                if wait is None:
                    raise err from None
                await asyncio.sleep(wait)
                continue
            return TokenResult.from_response(response)


class TokenBrokerClient:
    """Blocking client (grpc sync channel). Use as `with`, or call `close()`."""

    def __init__(
        self,
        address: str | ClientConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], None] = time.sleep,
        **kwargs: Any,
    ) -> None:
        self.config = _config(address, kwargs)
        self._clock = clock
        self._rng = rng
        self._sleep = sleep
        self._channel: grpc.Channel = self.config.open_channel(grpc)
        self._stub = pb_grpc.TokenBrokerServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"TokenBrokerClient({self.config.address!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def create_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: Sequence[str] = (),
        expiration_seconds: int | None = None,
        bound_object: BoundObject | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> TokenResult:
        request = build_request(
            namespace,
            service_account,
            audiences=audiences,
            expiration_seconds=expiration_seconds,
            bound_object=bound_object,
            dry_run=dry_run,
        )
        return self.create_token_request(request, timeout=timeout)

    def create_token_request(
        self, request: pb.CreateTokenRequest, *, timeout: float | None = None
    ) -> TokenResult:
        cfg = self.config
        retrier = _Retrier(
            cfg.retry, cfg.timeout if timeout is None else timeout, self._clock, self._rng
        )
        while True:
            metadata = cfg.call_metadata()
            try:
                response: pb.CreateTokenResponse = self._stub.CreateToken(
                    request, timeout=retrier.attempt_timeout(), metadata=metadata
                )
            except grpc.RpcError as rpc_error:
                if not isinstance(rpc_error, grpc.Call):
                    raise
                err = TokenBrokerError.from_rpc_error(rpc_error)
                wait = retrier.delay(err)
                if wait is None:
                    raise err from None
                self._sleep(wait)
                continue
            return TokenResult.from_response(response)
