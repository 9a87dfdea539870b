"""`TokenBrokerError`: a failed CreateToken call as the client sees it — the gRPC code and
message, the ErrorInfo reason/domain/metadata, field violations and the retry delay — and
`describe()`, the one rendering of it that every command prints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from grpc import aio

from broker.errors import RETRY_PUSHBACK_TRAILER, FieldViolation, rich_status_from_call
from broker.reasons import Reason

# FieldViolation: the one definition (broker.errors), as the server sends it.
__all__ = ["FieldViolation", "TokenBrokerError"]

# The TLS library's error when the server's first bytes are not a TLS record (BoringSSL's
# spelling, then OpenSSL's): a TLS client talking to a plaintext server.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "wrong version number")
PLAINTEXT_HINT = (
    "the server does not speak TLS; a plaintext broker (dev mode: `make run`, "
    "`token-broker serve --dev`) needs --plaintext (the agent's YAML: `plaintext: true`; "
    "the Python client: plaintext=True)"
)


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
                FieldViolation(v.field, v.description, v.reason)
                for v in status.bad_request.field_violations
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
    def catalogued(self) -> Reason | None:
        """The catalogue's entry of this error's reason (broker.reasons: code, whether a
        retry can help, meaning, what to do); None for a reason it does not list (another
        server, a newer broker)."""
        try:
            reason = Reason(self.reason)
        except ValueError:
            return None
        return reason if reason.domain == self.domain else None

    @property
    def retryable(self) -> bool:
        """UNAVAILABLE; RESOURCE_EXHAUSTED only with a retry delay from the server; never a
        reason the catalogue says a retry cannot help."""
        entry = self.catalogued
        if entry is not None and not entry.retryable:
            return False
        if self.code == grpc.StatusCode.UNAVAILABLE:
            return True
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_delay is not None

    @property
    def hint(self) -> str | None:
        """What to change, when the failure is the caller's setup rather than the broker's
        answer: a TLS client at a plaintext server (the handshake fails at its first byte)."""
        if self.code == grpc.StatusCode.UNAVAILABLE and any(m in self.message for m in _NOT_TLS):
            return PLAINTEXT_HINT
        return None

    def describe(self) -> str:
        """Several lines: code, message, reason, metadata, violations, retry delay, hint."""
        lines = [f"{self.code.name}: {self.message}"]
        if self.reason:
            lines.append(f"  reason: {self.reason} (domain {self.domain})")
        lines += [f"  {k}: {v}" for k, v in sorted(self.metadata.items())]
        lines += [f"  field {v.field}: {v.description}" for v in self.field_violations]
        if self.retry_delay is not None:
            lines.append(f"  retry after: {self.retry_delay:g}s")
        if self.hint is not None:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"TokenBrokerError({self.code.name}, {self.message!r}, reason={self.reason!r}, "
            f"retry_delay={self.retry_delay!r}, attempts={self.attempts})"
        )
