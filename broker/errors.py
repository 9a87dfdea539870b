"""Errors answered to callers as rich gRPC statuses.

Every refusal the broker makes is a `BrokerError`: a gRPC code, a message that is safe to show
the caller, and `google.rpc` details (ErrorInfo always; BadRequest, RetryInfo, QuotaFailure
where they apply) sent in the `grpc-status-details-bin` trailer. When a retry delay is known
it is also sent as the `grpc-retry-pushback-ms` trailer, which gRPC retry policies honour.

The reasons, with their codes and meanings, are catalogued in `broker.reasons`; a refusal is
built from its entry: `BrokerError.of(Reason.RATE_LIMITED, message, metadata=...)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Self, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio

from broker.reasons import ERROR_DOMAIN, KUBERNETES_DOMAIN, Reason

__all__ = [
    "ERROR_DOMAIN",
    "KUBERNETES_DOMAIN",
    "RETRY_PUSHBACK_TRAILER",
    "BrokerError",
    "FieldViolation",
    "RichStatus",
    "retry_delay_ms",
    "rich_status_from_call",
]

RETRY_PUSHBACK_TRAILER = "grpc-retry-pushback-ms"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: `field` is a path in the request message (proto field names)."""

    field: str
    description: str
    reason: str = ""


@dataclass
class BrokerError(Exception):
    """A failure to answer as a gRPC status with rich details."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str = ERROR_DOMAIN
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: Sequence[FieldViolation] = ()
    # Seconds after which a retry may succeed (RetryInfo + pushback trailer).
    retry_after: float | None = None
    # Further google.rpc detail messages (QuotaFailure, ...).
    extra_details: Sequence[Message] = ()

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @classmethod
    def of(cls, reason: Reason, message: str, **fields: Any) -> Self:
        """The refusal `reason` (code and domain from the catalogue, broker.reasons) with
        `message` and further fields (metadata, retry_after, ...; a subclass's own)."""
        return cls(
            code=reason.code, message=message, reason=reason.value, domain=reason.domain, **fields
        )

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message} ({self.reason})"

    def details(self) -> list[Message]:
        out: list[Message] = [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=self.domain, metadata=dict(self.metadata)
            )
        ]
        if self.field_violations:
            out.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description, reason=v.reason
                        )
                        for v in self.field_violations
                    ]
                )
            )
        if self.retry_after is not None:
            out.append(error_details_pb2.RetryInfo(retry_delay=_duration(self.retry_after)))
        out.extend(self.extra_details)
        return out

    def status_proto(self) -> status_pb2.Status:
        packed = []
        for detail in self.details():
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(
            code=_CODE_NUMBERS[self.code], message=self.message, details=packed
        )

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        trailers: list[tuple[str, str | bytes]] = [
            ("grpc-status-details-bin", self.status_proto().SerializeToString())
        ]
        if self.retry_after is not None:
            trailers.append((RETRY_PUSHBACK_TRAILER, str(retry_delay_ms(self.retry_after))))
        return tuple(trailers)

    async def abort(self, context: aio.ServicerContext[object, object]) -> NoReturn:
        await context.abort(self.code, self.message, self.trailing_metadata())
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def retry_delay_ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(retry_delay_ms(seconds))
    return d


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: code_pb2.OK,
    grpc.StatusCode.CANCELLED: code_pb2.CANCELLED,
    grpc.StatusCode.UNKNOWN: code_pb2.UNKNOWN,
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE: code_pb2.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED: code_pb2.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: code_pb2.DATA_LOSS,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
}


@dataclass(frozen=True)
class RichStatus:
    """The client's view of a failed call: code, message and the decoded details."""

    code: grpc.StatusCode
    message: str
    error_info: error_details_pb2.ErrorInfo | None
    bad_request: error_details_pb2.BadRequest | None
    retry_info: error_details_pb2.RetryInfo | None
    quota_failure: error_details_pb2.QuotaFailure | None
    trailers: Mapping[str, str]


def rich_status_from_call(error: aio.AioRpcError | grpc.Call) -> RichStatus:
    """Decode the rich details of a failed call (used by the CLI, the client and tests)."""
    code = error.code()
    message = error.details() or ""
    # grpc-stubs types trailers as objects; at run time they are (key, value) pairs.
    raw_trailers = cast(Iterable[tuple[str, str | bytes]], error.trailing_metadata() or ())
    found: dict[str, Message | None] = {
        "ErrorInfo": None,
        "BadRequest": None,
        "RetryInfo": None,
        "QuotaFailure": None,
    }
    trailers: dict[str, str] = {}
    for key, value in raw_trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                for name, cls in (
                    ("ErrorInfo", error_details_pb2.ErrorInfo),
                    ("BadRequest", error_details_pb2.BadRequest),
                    ("RetryInfo", error_details_pb2.RetryInfo),
                    ("QuotaFailure", error_details_pb2.QuotaFailure),
                ):
                    if detail.Is(cls.DESCRIPTOR):
                        msg = cls()
                        detail.Unpack(msg)
                        found[name] = msg
        elif isinstance(value, str):
            trailers[key] = value
    return RichStatus(
        code=code,
        message=message,
        error_info=found["ErrorInfo"],
        bad_request=found["BadRequest"],
        retry_info=found["RetryInfo"],
        quota_failure=found["QuotaFailure"],
        trailers=trailers,
    )
