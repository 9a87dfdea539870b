"""The audit log: one JSON line per CreateToken decision, allowed or refused.

Lines are their own stream (stdout or an append-only file), not log records: no log level or
handler configuration can drop them. Field names follow Kubernetes' own audit events
(lowerCamelCase, `requestID`, `kind`/`apiVersion`/`stage`), and an issued token is recorded by
its `jti` (the API server audits the same id as
`authentication.kubernetes.io/issued-credential-id`) and a short SHA-256 fingerprint — never
the token itself, never a key or a caller's credential: `AuditRecord` has no field that could
hold one.

With `audit.failClosed` a line that cannot be written raises `AuditWriteError`, and the caller
must not hand out the token; without it the failure is logged (once per run of failures) and
the call proceeds.

Lines are bounded whatever the request (a caller must not be able to fill the disk, least of
all before proving who it is): every string a request, a credential or an answer supplied is
cut by broker.bounded (253 characters, then a marker with its length and SHA-256 prefix), lists
to MAX_AUDIT_LIST_ITEMS, and a line still longer than MAX_AUDIT_LINE_BYTES (only possible with
escaped non-ASCII everywhere) is written again with tighter bounds. A call without a proven
identity records none of the request's fields but the namespace and service account:
`audiences`, `requestedExpirationSeconds`, `boundObjectRef` and `dryRun` are null.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO

import grpc
from jwt.utils import base64url_decode

from broker.bounded import MAX_FIELD_CHARS, bounded, bounded_list
from broker.config import AuditSettings, ConfigError
from broker.errors import KUBERNETES_DOMAIN, BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import AuthMethod, CertificateField, Identity

if TYPE_CHECKING:
    from broker.upstream import UpstreamResult

logger = logging.getLogger(__name__)

AUDIT_KIND = "TokenBrokerAudit"
AUDIT_API_VERSION = "audit.tokenbroker.dev/v1"
# Written once the answer is known, as Kubernetes names that stage.
AUDIT_STAGE = "ResponseComplete"

REASON_ALLOWED = "ALLOWED"
REASON_AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"
REASON_CANCELLED = "CANCELLED"
REASON_INTERNAL = "INTERNAL"

# The API server answers a TokenRequest create with 201 Created.
HTTP_CREATED = 201
FINGERPRINT_HEX_CHARS = 16
# RetryInfo of an AUDIT_UNAVAILABLE refusal: a full disk is not fixed in milliseconds.
AUDIT_RETRY_AFTER_SECONDS = 5.0
AUDIT_FILE_MODE = 0o640
# Audiences per list in a line (the request's own limit, broker.validation.MAX_AUDIENCES).
MAX_AUDIT_LIST_ITEMS = 32
# No line is longer. The normal bounds keep a line of ASCII values under it; tighter ones,
# (characters per field, items per list), apply when escaping made a line longer.
MAX_AUDIT_LINE_BYTES = 32 * 1024
_TIGHTER_BOUNDS = ((64, 8), (16, 1))

Decision = Literal["allowed", "denied", "error"]

# Refusals by the broker's own checks (validation, authentication, policy, rate limits).
# Everything else, and anything the API server answered, is an "error".
_DENIAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def token_fields(token: str) -> tuple[str | None, str | None]:
    """(jti, fingerprint) of a token: what the audit line records instead of the token.

    The payload is decoded without verifying the signature (the token comes from the API
    server over TLS; this only reads its id). A token that is not a JWT, or has no string
    `jti`, gives jti None. The fingerprint is the first 16 hex digits of SHA-256 of the
    token: enough to match a token someone holds against the log, useless to rebuild it.
    An empty token gives (None, None).
    """
    if not token:
        return None, None
    digest = hashlib.sha256(token.encode("utf-8")).digest()
    fingerprint = digest.hex()[:FINGERPRINT_HEX_CHARS]
    # Cache hits hand out the same token again and again, and decoding it costs more than
    # the rest of the audit line: the jti is remembered by the token's SHA-256 (no token is
    # kept), in a bounded table that is simply emptied when full.
    try:
        return _jti_by_digest[digest], fingerprint
    except KeyError:
        pass
    jti = _decode_jti(token)
    if len(_jti_by_digest) >= _JTI_MEMO_ENTRIES:
        _jti_by_digest.clear()
    _jti_by_digest[digest] = jti
    return jti, fingerprint


_JTI_MEMO_ENTRIES = 4096
_jti_by_digest: dict[bytes, str | None] = {}


def _decode_jti(token: str) -> str | None:
    # Only the payload segment is read. jwt.decode(verify_signature=False) also parses the
    # header and runs its claim checks: 8x the cost, on every cache miss, for one field.
    header, dot, rest = token.partition(".")
    payload, dot2, signature = rest.partition(".")
    if not (header and dot and dot2) or "." in signature:
        return None
    try:
        claims = json.loads(base64url_decode(payload))
    except ValueError:  # bad base64 (binascii.Error), bad UTF-8 or bad JSON
        return None
    if not isinstance(claims, dict):
        return None
    jti = claims.get("jti")
    return jti if isinstance(jti, str) and jti else None


@dataclass(frozen=True)
class BoundObjectRef:
    kind: str
    name: str
    uid: str | None = None

    @classmethod
    def from_proto(cls, ref: pb.BoundObjectReference) -> BoundObjectRef:
        return cls(kind=ref.kind, name=ref.name, uid=ref.uid or None)

    def to_dict(self, limit: int = MAX_FIELD_CHARS) -> dict[str, Any]:
        return {
            "kind": bounded(self.kind, limit),
            "name": bounded(self.name, limit),
            "uid": _bounded_or_none(self.uid, limit),
        }


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AuditRecord:
    """One decision. Build it with `for_call`, or field by field (then use `token_fields`)."""

    request_id: str
    # The proven caller; None when authentication failed or did not run.
    user: str | None
    auth_method: AuthMethod | None
    issuer: str | None  # jwt only
    peer: str | None  # the gRPC peer, e.g. "ipv4:10.0.0.7:51234"
    namespace: str
    service_account: str
    audiences: tuple[str, ...] | None  # None: not recorded (no proven identity)
    granted_audiences: tuple[str, ...]
    requested_expiration_seconds: int | None
    granted_expiration_seconds: int | None
    bound_object_ref: BoundObjectRef | None
    dry_run: bool | None  # None: not recorded (no proven identity)
    decision: Decision
    rule: str | None  # the deciding policy rule
    reason: str  # ALLOWED, or the ErrorInfo.reason answered
    code: str  # the gRPC status code name answered ("OK", "PERMISSION_DENIED", ...)
    upstream_status: int | None  # HTTP status of the API server's answer; None: no answer
    latency_ms: float
    jti: str | None = None
    token_sha256: str | None = None
    time: datetime = field(default_factory=_utc_now)
    # mtls only: the client certificate field `user` came from (uri, dns or cn).
    certificate_field: CertificateField | None = None
    # Refusals of a throttled peer (reason PEER_THROTTLED) not audited line by line since
    # the previous line for that peer; the key is only written when set.
    suppressed_refusals: int | None = None

    def __post_init__(self) -> None:
        if self.time.tzinfo is None:
            raise ValueError("AuditRecord.time must be timezone-aware")

    @classmethod
    def for_call(
        cls,
        request: pb.CreateTokenRequest,
        *,
        request_id: str,
        identity: Identity | None,
        peer: str | None,
        latency_ms: float,
        result: UpstreamResult | None = None,
        error: BaseException | None = None,
        rule: str | None = None,
        decision: Decision | None = None,
        upstream_status: int | None = None,
        cache_hit: bool = False,
        time: datetime | None = None,
        suppressed_refusals: int | None = None,
    ) -> AuditRecord:
        """The record of one CreateToken call.

        - `result` (the API server's answer) gives the granted audiences and expiration, the
          jti and the fingerprint; `error` (what the caller is answered) gives decision,
          reason and code. Both: a token was minted but not handed out (e.g. a later step
          failed); the line says so with the error and the token's jti.
        - `decision` defaults to "allowed" without an error; for a BrokerError, "denied"
          when the broker's own checks refused (INVALID_ARGUMENT, UNAUTHENTICATED,
          PERMISSION_DENIED, RESOURCE_EXHAUSTED not relayed from Kubernetes), else "error".
        - `upstream_status` defaults to the relayed HTTP status of the error, or 201 for a
          result; with `cache_hit` (the result came from the token cache, not from the API
          server) to None.
        - Without `identity` (authentication failed or did not run) the request is recorded
          minimally: namespace and service account only (bounded like every field).
        """
        spec = request.token_request.spec
        proven = identity is not None
        jti: str | None = None
        fingerprint: str | None = None
        granted_audiences: tuple[str, ...] = ()
        granted_expiration: int | None = None
        if result is not None:
            answered = result.token_request
            jti, fingerprint = token_fields(answered.status.token)
            granted_audiences = tuple(answered.spec.audiences)
            if answered.spec.HasField("expiration_seconds"):
                granted_expiration = answered.spec.expiration_seconds
        outcome, reason, code, relayed_status = _outcome(error)
        if upstream_status is None and not cache_hit:
            upstream_status = relayed_status
            if upstream_status is None and result is not None:
                upstream_status = HTTP_CREATED
        return cls(
            request_id=request_id,
            user=identity.name if identity is not None else None,
            auth_method=identity.method if identity is not None else None,
            issuer=identity.issuer if identity is not None else None,
            certificate_field=identity.certificate_field if identity is not None else None,
            peer=peer,
            namespace=request.namespace,
            service_account=request.service_account,
            audiences=tuple(spec.audiences) if proven else None,
            granted_audiences=granted_audiences,
            requested_expiration_seconds=(
                spec.expiration_seconds if proven and spec.HasField("expiration_seconds") else None
            ),
            granted_expiration_seconds=granted_expiration,
            bound_object_ref=(
                BoundObjectRef.from_proto(spec.bound_object_ref)
                if proven and spec.HasField("bound_object_ref")
                else None
            ),
            dry_run=bool(request.dry_run) if proven else None,
            decision=decision if decision is not None else outcome,
            rule=rule,
            reason=reason,
            code=code,
            upstream_status=upstream_status,
            latency_ms=latency_ms,
            jti=jti,
            token_sha256=fingerprint,
            time=time if time is not None else _utc_now(),
            suppressed_refusals=suppressed_refusals,
        )

    def to_dict(
        self, limit: int = MAX_FIELD_CHARS, max_items: int = MAX_AUDIT_LIST_ITEMS
    ) -> dict[str, Any]:
        """The audit event, keys in lowerCamelCase as Kubernetes audit events spell them;
        strings cut at `limit` characters and lists at `max_items` (broker.bounded)."""
        entry = {
            "kind": AUDIT_KIND,
            "apiVersion": AUDIT_API_VERSION,
            "stage": AUDIT_STAGE,
            "time": rfc3339_micro(self.time),
            "requestID": bounded(self.request_id, limit),
            "user": _bounded_or_none(self.user, limit),
            "authMethod": self.auth_method,
            "issuer": _bounded_or_none(self.issuer, limit),
            "certificateField": self.certificate_field,
            "peer": _bounded_or_none(self.peer, limit),
            "namespace": bounded(self.namespace, limit),
            "serviceAccount": bounded(self.service_account, limit),
            "audiences": (
                bounded_list(self.audiences, max_items, limit)
                if self.audiences is not None
                else None
            ),
            "grantedAudiences": bounded_list(self.granted_audiences, max_items, limit),
            "requestedExpirationSeconds": self.requested_expiration_seconds,
            "grantedExpirationSeconds": self.granted_expiration_seconds,
            "boundObjectRef": (
                self.bound_object_ref.to_dict(limit) if self.bound_object_ref is not None else None
            ),
            "dryRun": self.dry_run,
            "decision": self.decision,
            "rule": _bounded_or_none(self.rule, limit),
            "reason": bounded(self.reason, limit),
            "code": self.code,
            "upstreamStatus": self.upstream_status,
            "latencyMs": round(self.latency_ms, 3),
            "jti": _bounded_or_none(self.jti, limit),
            "tokenSHA256": self.token_sha256,
        }
        if self.suppressed_refusals is not None:
            entry["suppressedRefusals"] = self.suppressed_refusals
        return entry

    def to_json(self) -> str:
        """The line (without its newline): at most MAX_AUDIT_LINE_BYTES, whatever the values."""
        line = _dumps(self.to_dict())
        for limit, max_items in _TIGHTER_BOUNDS:
            if len(line) <= MAX_AUDIT_LINE_BYTES:
                break
            line = _dumps(self.to_dict(limit, max_items))
        return line


def _dumps(entry: dict[str, Any]) -> str:
    # ASCII only: no raw U+2028 or other line breaks a JSON-lines reader could split on.
    return json.dumps(entry, ensure_ascii=True, separators=(",", ":"))


def _bounded_or_none(value: str | None, limit: int) -> str | None:
    return None if value is None else bounded(value, limit)


def rfc3339_micro(when: datetime) -> str:
    """`2024-05-01T12:00:00.123456Z`, as Kubernetes writes audit timestamps."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _outcome(error: BaseException | None) -> tuple[Decision, str, str, int | None]:
    """(decision, reason, code name, relayed HTTP status) of what the caller is answered."""
    if error is None:
        return "allowed", REASON_ALLOWED, grpc.StatusCode.OK.name, None
    if isinstance(error, BrokerError):
        raw_status = error.metadata.get("kubernetesCode", "")
        status = int(raw_status) if raw_status.isdigit() else None
        denied = error.code in _DENIAL_CODES and error.domain != KUBERNETES_DOMAIN
        return ("denied" if denied else "error"), error.reason, error.code.name, status
    if isinstance(error, AuditWriteError):
        return "error", REASON_AUDIT_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE.name, None
    if isinstance(error, asyncio.CancelledError):
        return "error", REASON_CANCELLED, grpc.StatusCode.CANCELLED.name, None
    return "error", REASON_INTERNAL, grpc.StatusCode.INTERNAL.name, None


class AuditWriteError(Exception):
    """An audit line could not be written and the audit log is fail-closed."""

    def as_broker_error(self) -> BrokerError:
        """The caller's answer: UNAVAILABLE, AUDIT_UNAVAILABLE, retry later."""
        return BrokerError(
            code=grpc.StatusCode.UNAVAILABLE,
            message="the token broker cannot write its audit log; no token was issued",
            reason=REASON_AUDIT_UNAVAILABLE,
            retry_after=AUDIT_RETRY_AFTER_SECONDS,
        )


class _Sink(Protocol):
    def write(self, line: str) -> None: ...

    def close(self) -> None: ...


class _StreamSink:
    """A text stream the caller owns (stdout, or a StringIO in tests): flushed, not closed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __str__(self) -> str:
        return getattr(self._stream, "name", None) or type(self._stream).__name__

    def write(self, line: str) -> None:
        self._stream.write(line)
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class _FileSink:
    """An append-only file: one unbuffered write(2) per line, so nothing lingers in a buffer
    after a failure to be written later, and O_APPEND keeps whole lines together."""

    def __init__(self, path: Path) -> None:
        self._path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd: int | None = os.open(path, flags, AUDIT_FILE_MODE)
        # The file ends in a partial line (a write failed half-way): start on a new line.
        self._torn = False

    def __str__(self) -> str:
        return str(self._path)

    def write(self, line: str) -> None:
        if self._fd is None:
            raise ValueError("the audit file is closed")
        data = (b"\n" if self._torn else b"") + line.encode("utf-8")
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        finally:
            if written:
                self._torn = data[written - 1] != ord("\n")

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class AuditLog:
    """Writes audit lines to stdout (default), a text stream, or an append-only file.

    Lines are written by one worker thread, in order, off the event loop: concurrent writes
    never interleave. The lines of concurrent calls are written together (group commit): one
    trip to the worker thread for all the lines queued while the previous trip was out,
    instead of one per call, which is most of what an audit line costs on a busy event loop.
    Each line still has its own outcome, so a caller only hands out a token whose line was
    written. `close()` (after the server has stopped) waits for queued lines.
    """

    def __init__(self, sink: TextIO | Path | None = None, *, fail_closed: bool = False) -> None:
        """`sink`: a path (opened here, appended to, created 0640), a text stream (not
        closed by `close`), or None for stdout. Raises OSError if the file cannot be opened."""
        self._sink: _Sink = (
            _FileSink(sink)
            if isinstance(sink, Path)
            else _StreamSink(sink if sink is not None else sys.stdout)
        )
        self._fail_closed = fail_closed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-log")
        self._closed = False
        self._failing = False
        self._lost_lines = 0
        # Lines waiting for the next trip to the worker thread, each with its caller's future,
        # and the task making the trips (None while nothing is queued).
        self._queued: list[tuple[str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def from_settings(cls, settings: AuditSettings) -> AuditLog:
        """The configured audit log; a file that cannot be opened is a ConfigError."""
        if settings.sink == "stdout" or settings.file is None:
            return cls(None, fail_closed=settings.fail_closed)
        try:
            return await asyncio.to_thread(cls, settings.file, fail_closed=settings.fail_closed)
        except OSError as exc:
            raise ConfigError(
                f"audit.file: cannot open {settings.file} for appending: {exc.strerror}"
            ) from None

    def __repr__(self) -> str:
        return f"AuditLog(sink={str(self._sink)!r}, fail_closed={self._fail_closed})"

    @property
    def fail_closed(self) -> bool:
        return self._fail_closed

    @property
    def lost_lines(self) -> int:
        """Lines not written since start (fail-open only; fail-closed refuses instead)."""
        return self._lost_lines

    async def write(self, record: AuditRecord) -> None:
        """Append the record's line. Fail-closed: raises AuditWriteError if it could not be
        written; fail-open: logs the failure and returns."""
        line = record.to_json() + "\n"
        try:
            if self._closed:
                raise ValueError("the audit log is closed")
            loop = asyncio.get_running_loop()
            written = loop.create_future()
            self._queued.append((line, written))
            if self._flusher is None:
                self._flusher = loop.create_task(self._flush(), name="audit-log-flush")
            # A cancelled caller stops waiting (its future is cancelled); the line is still
            # written.
            await written
        except (OSError, ValueError, RuntimeError) as exc:
            self._failed(exc)
            if self._fail_closed:
                raise AuditWriteError(f"audit line not written to {self._sink}") from exc
            return
        if self._failing:
            self._failing = False
            logger.warning(
                "audit log %s is writable again (%d line(s) lost so far)",
                self._sink,
                self._lost_lines,
            )

    async def _flush(self) -> None:
        """Write the queued lines, a batch per trip to the worker thread, until none is left."""
        loop = asyncio.get_running_loop()
        batch: list[tuple[str, asyncio.Future[None]]] = []
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                outcomes = await loop.run_in_executor(
                    self._executor, self._write_lines, [line for line, _ in batch]
                )
                for (_, written), outcome in zip(batch, outcomes, strict=True):
                    if written.done():
                        continue  # its caller was cancelled
                    if outcome is None:
                        written.set_result(None)
                    else:
                        written.set_exception(outcome)
                batch = []
        finally:
            # Cancelled (the loop is closing): nobody may take these lines for written.
            for _, written in [*batch, *self._queued]:
                if not written.done():
                    written.set_exception(RuntimeError("the audit log stopped writing"))
            self._queued = []
            self._flusher = None

    def _write_lines(self, lines: list[str]) -> list[OSError | ValueError | None]:
        """In the worker thread: write each line, and say which ones failed."""
        outcomes: list[OSError | ValueError | None] = []
        for line in lines:
            try:
                self._sink.write(line)
            except (OSError, ValueError) as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes

    def _failed(self, exc: BaseException) -> None:
        if not self._fail_closed:
            self._lost_lines += 1
        if self._failing:
            return  # logged at the start of this run of failures
        self._failing = True
        cause = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        if self._fail_closed:
            logger.error(
                "cannot write the audit log %s (%s); refusing to issue tokens until it is "
                "writable (audit.failClosed)",
                self._sink,
                cause,
            )
        else:
            logger.error(
                "cannot write the audit log %s (%s); tokens are issued without audit lines "
                "until it is writable (audit.failClosed is off)",
                self._sink,
                cause,
            )

    async def close(self) -> None:
        """Write the queued lines, then close the file (a stream is only flushed)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._flusher is not None:
            await asyncio.wait([self._flusher])
        try:
            await loop.run_in_executor(self._executor, self._sink.close)
        except OSError as exc:
            logger.warning("closing the audit log %s failed: %s", self._sink, exc.strerror)
        finally:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AuditLog:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
