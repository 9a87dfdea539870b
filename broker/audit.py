"""The audit log: one JSON line per CreateToken decision, allowed or refused.

Lines are their own stream (stdout or an append-only file), not log records: no log level or
handler configuration can drop them. Field names follow Kubernetes' own audit events
(lowerCamelCase, `requestID`, `kind`/`apiVersion`/`stage`), and an issued token is recorded by
its `jti` (the API server audits the same id as
`authentication.kubernetes.io/issued-credential-id`), a short SHA-256 fingerprint and the
lifetime its own claims give it — never the token itself, never a key or a caller's
credential: `AuditRecord` has no field that could hold one.

Writing (`AuditLog`): one writer thread writes the lines in order, off the event loop; the
lines of concurrent calls go together (group commit: the thread is woken once per pass of
the event loop, for all the lines that pass queued), each with its own outcome. A line for a
stdout that is a pipe with room for it (a container's), nothing queued before it, is written
at once instead, by the event loop, on a non-blocking description of the pipe (broker.pipes):
such a write cannot block, and saves the thread's wake-up. A caller waits
at most `audit.writeTimeoutSeconds` for its line, and at most `audit.maxQueuedLines` lines wait
in memory, so a sink that blocks (a stdout pipe nobody reads, a hung mount) or fails (a full
disk) never stalls the broker:

- fail-closed (`audit.failClosed`): `write` raises AuditWriteError when the line was not
  written in time or could not be written, and the caller must not hand out the token. A line
  still queued when its caller gave up is withdrawn (never written: it would say a token was
  handed out); while the sink is blocked (a write outstanding for longer than the timeout)
  calls are refused at once instead of waiting.
- fail-open: the failure is logged (once per run of failures) and the call proceeds. A line
  that timed out stays queued and is written when the sink takes lines again; lines that are
  never written are counted (`lost_lines`).

The sink's health (`problem()`: blocked, or its last write failed) feeds readiness and the
metrics; while it fails it is checked every few seconds (the file reopened, its free space
looked at), so a broker out of rotation notices the repair without traffic. The file sink
follows its path: before each batch it compares the path's (st_dev, st_ino) with the open
file's and reopens the path (created 0640) when the file was moved or deleted (logrotate
without copytruncate); `reopen()` (SIGHUP) reopens it in any case.

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
import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TextIO

import grpc

from broker.bounded import MAX_FIELD_CHARS, bounded, bounded_list
from broker.config import AuditSettings, ConfigError
from broker.errors import KUBERNETES_DOMAIN, BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import AuthMethod, CertificateField, Identity
from broker.issued_token import read_token
from broker.pipes import close_quietly, nonblocking_pipe, write_lines
from broker.reasons import ALLOWED, CANCELLED, Reason
from broker.utc_text import utc_second_and_micros

if TYPE_CHECKING:
    from broker.upstream import UpstreamResult

logger = logging.getLogger(__name__)

AUDIT_KIND = "TokenBrokerAudit"
AUDIT_API_VERSION = "audit.tokenbroker.dev/v1"
# Written once the answer is known, as Kubernetes names that stage.
AUDIT_STAGE = "ResponseComplete"


# The API server answers a TokenRequest create with 201 Created.
HTTP_CREATED = 201
# RetryInfo of an AUDIT_UNAVAILABLE refusal: a full disk is not fixed in milliseconds.
AUDIT_RETRY_AFTER_SECONDS = 5.0
AUDIT_FILE_MODE = 0o640
# Audiences per list in a line (the request's own limit, broker.validation.MAX_AUDIENCES).
MAX_AUDIT_LIST_ITEMS = 32
# No line is longer. The normal bounds keep a line of ASCII values under it; tighter ones,
# (characters per field, items per list), apply when escaping made a line longer.
MAX_AUDIT_LINE_BYTES = 32 * 1024
_TIGHTER_BOUNDS = ((64, 8), (16, 1))
DEFAULT_WRITE_TIMEOUT_SECONDS = 2.0
DEFAULT_MAX_QUEUED_LINES = 10_000
# While the sink fails, it is checked (reopened, its free space looked at) this often.
SINK_CHECK_INTERVAL_SECONDS = AUDIT_RETRY_AFTER_SECONDS

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

    Read by `broker.issued_token.read_token` (the payload, not verified; remembered by the
    token's SHA-256). A token that is not a JWT, or has no string `jti`, gives jti None. The
    fingerprint is the first 16 hex digits of SHA-256 of the token. An empty token gives
    (None, None).
    """
    facts = read_token(token)
    return facts.jti, facts.fingerprint


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
    # The token's own lifetime, `exp - iat` of the JWT: what it is really valid for, which the
    # API server may have extended beyond granted_expiration_seconds.
    token_lifetime_seconds: int | None = None
    time: datetime = field(default_factory=_utc_now)
    # mtls only: the client certificate field `user` came from (uri, dns or cn).
    certificate_field: CertificateField | None = None
    # Refusals of a throttled peer (reason PEER_THROTTLED) not audited line by line since
    # the previous line for that peer; the key is only written when set.
    suppressed_refusals: int | None = None
    # The door the call came through: grpc, http-kubernetes or http-oauth
    # (broker.request_path.DOORS); None: a summary of refusals, whichever door they came to.
    door: str | None = "grpc"

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
        door: str | None = "grpc",
    ) -> AuditRecord:
        """The record of one CreateToken call.

        - `result` (the API server's answer) gives the granted audiences and expiration, the
          jti, the fingerprint and the token's own lifetime; `error` (what the caller is
          answered) gives decision, reason and code. Both: a token was minted but not
          handed out (e.g. a later step failed); the line says so with the error and the
          token's jti and lifetime.
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
        lifetime: int | None = None
        granted_audiences: tuple[str, ...] = ()
        granted_expiration: int | None = None
        if result is not None:
            answered = result.token_request
            facts = read_token(answered.status.token)
            jti, fingerprint, lifetime = facts.jti, facts.fingerprint, facts.lifetime_seconds
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
            token_lifetime_seconds=lifetime,
            time=time if time is not None else _utc_now(),
            suppressed_refusals=suppressed_refusals,
            door=door,
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
            "door": self.door,
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
            "tokenLifetimeSeconds": self.token_lifetime_seconds,
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


# What `_dumps` makes of a str (ensure_ascii).
_json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii
# Stand-ins for the fields an AuditTemplate fills in (a NUL no value of a line holds twice).
_TEMPLATE_FIELDS = ("time", "requestID", "peer", "door", "latencyMs")
_MARKS = tuple(f"\x00{name}\x00" for name in _TEMPLATE_FIELDS)


class AuditTemplate:
    """The line of one kind of call, rendered once: an AuditRecord's line with its `time`,
    `requestID`, `peer`, `door` and `latencyMs` left open. `line()` fills them in, giving
    exactly the line `to_json()` gives for the same record with those values (a cache hit's line:
    the request path keeps one per decision and cached token)."""

    __slots__ = ("_parts",)

    def __init__(self, parts: tuple[str, ...]) -> None:
        self._parts = parts

    @classmethod
    def of(cls, record: AuditRecord) -> AuditTemplate | None:
        """The template of `record`'s line, or None when its other values do not allow one
        (a value holding a mark, or a line near the length bound: `to_json()` then)."""
        entry = record.to_dict()
        for name, mark in zip(_TEMPLATE_FIELDS, _MARKS, strict=True):
            entry[name] = mark
        text = _dumps(entry)
        if len(text) > MAX_AUDIT_LINE_BYTES // 2:
            return None
        parts: list[str] = []
        for mark in _MARKS:
            encoded = _json_str(mark)
            if text.count(encoded) != 1:
                return None
            head, _, text = text.partition(encoded)
            parts.append(head)
        parts.append(text)
        return cls(tuple(parts))

    def line(
        self,
        *,
        request_id: str,
        peer: str | None,
        latency_ms: float,
        now: float,
        door: str = "grpc",
    ) -> str | None:
        """The line (no newline) of a call at `now` (seconds since the epoch); None when it
        would be longer than a line may be (then `AuditRecord.to_json()` bounds it)."""
        p = self._parts
        line = (
            f'{p[0]}"{rfc3339_micro_at(now)}"{p[1]}{_json_str(bounded(request_id))}{p[2]}'
            f"{'null' if peer is None else _json_str(bounded(peer))}{p[3]}"
            f"{_json_str(door)}{p[4]}{round(latency_ms, 3)!r}{p[5]}"
        )
        return line if len(line) <= MAX_AUDIT_LINE_BYTES else None


def _bounded_or_none(value: str | None, limit: int) -> str | None:
    return None if value is None else bounded(value, limit)


def rfc3339_micro(when: datetime) -> str:
    """`2024-05-01T12:00:00.123456Z`, as Kubernetes writes audit timestamps."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_micro_at(timestamp: float) -> str:
    """`rfc3339_micro(datetime.fromtimestamp(timestamp, UTC))`, with the seconds' text made
    once per second: microseconds rounded half to even, as datetime rounds them."""
    text, micros = utc_second_and_micros(timestamp)
    return f"{text}.{micros:06d}Z"


def _outcome(error: BaseException | None) -> tuple[Decision, str, str, int | None]:
    """(decision, reason, code name, relayed HTTP status) of what the caller is answered."""
    if error is None:
        return "allowed", ALLOWED, grpc.StatusCode.OK.name, None
    if isinstance(error, BrokerError):
        raw_status = error.metadata.get("kubernetesCode", "")
        status = int(raw_status) if raw_status.isdigit() else None
        denied = error.code in _DENIAL_CODES and error.domain != KUBERNETES_DOMAIN
        return ("denied" if denied else "error"), error.reason, error.code.name, status
    if isinstance(error, AuditWriteError):
        return "error", Reason.AUDIT_UNAVAILABLE, Reason.AUDIT_UNAVAILABLE.code.name, None
    if isinstance(error, asyncio.CancelledError):
        return "error", CANCELLED, grpc.StatusCode.CANCELLED.name, None
    return "error", Reason.INTERNAL, Reason.INTERNAL.code.name, None


class AuditWriteError(Exception):
    """An audit line was not written (in time) and the audit log is fail-closed.

    `cause` says why, briefly and without the sink's path (the log names the sink): it is
    quoted to the caller."""

    def __init__(self, message: str, *, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause or message

    def as_broker_error(self, *, cache_hit: bool = False) -> BrokerError:
        """The answer to a caller whose token is withheld: UNAVAILABLE, AUDIT_UNAVAILABLE,
        retry later. The call had a token (minted for it, or `cache_hit`: from the cache)
        that the caller does not get, and that the caller (service) removes from the cache."""
        token = (
            "the token broker withheld a cached token"
            if cache_hit
            else "the Kubernetes API server minted a token, but the token broker withheld it"
        )
        return BrokerError.of(
            Reason.AUDIT_UNAVAILABLE,
            f"{token}: its audit line could not be written ({self.cause}); the token is not "
            "cached; retry later",
            retry_after=AUDIT_RETRY_AFTER_SECONDS,
        )


class _QueueFull(Exception):
    """`audit.maxQueuedLines` lines are waiting already: the line is not queued."""


class _WaitExpired(Exception):
    """A caller waited `write_timeout_seconds` for its line (set on its future)."""


def _cause(exc: BaseException) -> str:
    """A short reason for logs and callers: the OS error text, or the exception's message."""
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


class _Sink:
    """Where lines go; called from the writer thread only. The defaults: nothing to follow,
    check or reopen."""

    def write(self, line: str) -> None:
        raise NotImplementedError

    def writes_now(self) -> bool:
        """Whether the event loop may write lines itself (`write_lines_now`): a pipe."""
        return False

    def write_lines_now(self, lines: list[str]) -> int:
        """Write the first lines that the sink takes at once without blocking (broker.pipes);
        how many."""
        return 0

    def prepare(self) -> None:
        """Before each batch of lines (the file sink follows its path)."""

    def check(self) -> None:
        """While failing: raise OSError if the sink is still unwritable, as far as can be
        told without writing a line (by default it cannot be: the next line tells)."""

    def reopen(self) -> bool:
        """Reopen (SIGHUP); False when there is nothing to reopen."""
        return False

    def close(self) -> None:
        pass


class _StreamSink(_Sink):
    """A text stream the caller owns (a StringIO in tests): flushed, not closed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __str__(self) -> str:
        return getattr(self._stream, "name", None) or type(self._stream).__name__

    def write(self, line: str) -> None:
        self._stream.write(line)
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class _FdSink(_Sink):
    """A file descriptor (stdout: not ours to close): one unbuffered write(2) per line, so
    nothing lingers in a buffer after a failure to be written later, and a writer blocked in
    write(2) holds no Python lock (a buffered stdout's lock would stop the interpreter's
    exit). When it is a pipe, `write_now` writes a line that fits at once, non-blocking."""

    def __init__(self, fd: int | None, name: str, *, direct: int | None = None) -> None:
        self._fd = fd
        self._name = name
        # The file ends in a partial line (a write failed half-way): start on a new line.
        self._torn = False
        # A non-blocking description of the pipe `fd` writes to (broker.pipes), ours.
        self._direct = direct

    def writes_now(self) -> bool:
        return self._direct is not None and not self._torn

    def write_lines_now(self, lines: list[str]) -> int:
        if self._direct is None or self._torn:
            return 0
        return write_lines(self._direct, [line.encode("utf-8") for line in lines])

    def close(self) -> None:
        close_quietly(self._direct)
        self._direct = None

    def __str__(self) -> str:
        return self._name

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


class _FileSink(_FdSink):
    """An append-only file (O_APPEND keeps whole lines together across processes) that
    follows its path: moved or deleted, the path is reopened (created 0640)."""

    _FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

    def __init__(self, path: Path) -> None:
        super().__init__(None, str(path))
        self._path = path
        self._identity: tuple[int, int] | None = None
        self._open()

    def _open(self) -> None:
        """Open the path (a new file descriptor first: never without one), then close the old."""
        fd = os.open(self._path, self._FLAGS, AUDIT_FILE_MODE)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        self._identity = (st.st_dev, st.st_ino)
        self._torn = False
        if old is not None:
            os.close(old)

    def prepare(self) -> None:
        # One stat(2) per batch: the lines go to the file the path names now.
        if self._fd is None:
            raise ValueError("the audit file is closed")
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            what = "deleted"
        else:
            if (st.st_dev, st.st_ino) == self._identity:
                return
            what = "moved or replaced"
        self._open()
        logger.warning("audit log %s was %s; reopened the path", self._path, what)

    def check(self) -> None:
        self._open()
        assert self._fd is not None
        if os.fstatvfs(self._fd).f_bavail == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def reopen(self) -> bool:
        self._open()
        return True

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _open_sink(sink: TextIO | Path | None) -> _Sink:
    if isinstance(sink, Path):
        return _FileSink(sink)
    if sink is not None:
        return _StreamSink(sink)
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a stream without a descriptor
        return _StreamSink(sys.stdout)
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()  # what was written through it before goes first
    return _FdSink(fd, "<stdout>", direct=nonblocking_pipe(fd))


# A line's state; changed under AuditLog._lock (by the writer thread, or by a caller that
# withdraws a queued line).
_QUEUED, _WRITING, _DONE, _WITHDRAWN = range(4)


class _Line:
    __slots__ = ("deadline", "error", "future", "lost_if_unwritten", "state", "text")

    def __init__(
        self, text: str, future: asyncio.Future[None] | None, *, lost_if_unwritten: bool
    ) -> None:
        self.text = text
        # The waiting caller's (None: nobody waits), and when it stops waiting (loop.time()).
        self.future = future
        self.deadline = 0.0
        # Counted lost when not written: its call went on without it (not a fail-closed
        # refusal, which answers for its own line).
        self.lost_if_unwritten = lost_if_unwritten
        self.state = _QUEUED
        self.error: OSError | ValueError | None = None


class _Action:
    """Work for the writer thread, in order with the lines: reopen, check, close."""

    __slots__ = ("future", "last", "run")

    def __init__(
        self,
        run: Callable[[], object],
        future: asyncio.Future[BaseException | None] | None,
        *,
        last: bool = False,
    ) -> None:
        self.run = run
        self.future = future
        self.last = last  # the writer thread ends after it


class AuditLog:
    """Writes audit lines to stdout (default), a text stream, or an append-only file.

    See the module docstring: one writer thread (a daemon: a write blocked forever does not
    hold up the process's exit), group commit, bounded waits and queue, the sink's health.
    `close()` (after the server has stopped) writes what is queued, unless the sink is blocked.
    """

    def __init__(
        self,
        sink: TextIO | Path | None = None,
        *,
        fail_closed: bool = False,
        write_timeout_seconds: float = DEFAULT_WRITE_TIMEOUT_SECONDS,
        max_queued_lines: int = DEFAULT_MAX_QUEUED_LINES,
    ) -> None:
        """`sink`: a path (opened here, appended to, created 0640), a text stream (not
        closed by `close`), or None for stdout. Raises OSError if the file cannot be opened."""
        if write_timeout_seconds <= 0:
            raise ValueError("write_timeout_seconds must be positive")
        if max_queued_lines < 1:
            raise ValueError("max_queued_lines must be at least 1")
        self._sink: _Sink = _open_sink(sink)
        self._fail_closed = fail_closed
        self._write_timeout = write_timeout_seconds
        self._max_queued = max_queued_lines
        self._closed = False
        # Counters, and the health last reported; kept on the event loop.
        self._lost_lines = 0
        self._written_lines = 0
        self._pending = 0  # lines queued or being written (withdrawn ones not counted)
        self._sink_error: str | None = None  # why the last line failed; None: it was written
        self._healthy = True
        self._listeners: list[Callable[[], None]] = []
        self._checker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The lines callers wait for, in order (their deadlines too), and the one timer that
        # ends the waits that run out: cheaper than a timeout per call.
        self._waiting: deque[_Line] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        # Shared with the writer thread: the queue (appended to here, emptied there) and
        # the lines' states.
        self._lock = threading.Lock()
        self._queue: deque[_Line | _Action] = deque()
        self._wake = threading.Event()
        # A wake-up of the writer is scheduled for the end of this pass of the event loop.
        self._wake_scheduled = False
        # The lines of this pass of the loop that go straight to the pipe at its end.
        self._for_this_pass: list[_Line] = []
        # time.monotonic() when the write in progress started (None: none in progress).
        self._write_started: float | None = None
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    @classmethod
    async def from_settings(cls, settings: AuditSettings) -> AuditLog:
        """The configured audit log; a file that cannot be opened is a ConfigError."""
        options: dict[str, Any] = {
            "fail_closed": settings.fail_closed,
            "write_timeout_seconds": settings.write_timeout_seconds,
            "max_queued_lines": settings.max_queued_lines,
        }
        if settings.sink == "stdout" or settings.file is None:
            return cls(None, **options)
        try:
            return await asyncio.to_thread(cls, settings.file, **options)
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
        """Lines never written although their call went on (fail-open), or written without
        waiting (`write_nowait`): the write failed, the queue was full, or the sink was still
        blocked at `close()`. A fail-closed refusal is not counted: it answers for its line."""
        return self._lost_lines

    @property
    def written_lines(self) -> int:
        """Lines written to the sink since start."""
        return self._written_lines

    @property
    def pending_lines(self) -> int:
        """Lines queued or being written now."""
        return self._pending

    def problem(self) -> str | None:
        """Why the sink is not taking lines (blocked, or its last write failed); None when it
        is healthy as far as is known. For readiness and the metrics."""
        blocked = self._blocked_for()
        if blocked is not None:
            return f"the audit log {self._sink} has not taken a line for {blocked:.0f}s (blocked)"
        if self._sink_error is not None:
            return f"cannot write the audit log {self._sink} ({self._sink_error})"
        return None

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called (on the event loop) whenever `problem()` turns None or not None."""
        self._listeners.append(listener)

    def _blocked_for(self) -> float | None:
        started = self._write_started
        if started is None:
            return None
        waited = time.monotonic() - started
        return waited if waited >= self._write_timeout else None

    # --- writing, on the event loop ---------------------------------------------------------

    async def write(self, record: AuditRecord) -> None:
        """Append the record's line, waiting at most `write_timeout_seconds`. Fail-closed:
        raises AuditWriteError if it was not written (in time); fail-open: returns."""
        await self.write_line(record.to_json())

    async def write_line(self, line: str) -> None:
        """`write` of a line already rendered (an AuditTemplate's): one line, no newline."""
        try:
            await self._write_line(line + "\n")
        except (OSError, ValueError, _QueueFull) as exc:  # TimeoutError is an OSError
            if self._fail_closed:
                raise AuditWriteError(
                    f"audit line not written to {self._sink}", cause=_cause(exc)
                ) from exc

    def write_nowait(self, record: AuditRecord) -> None:
        """Queue the record's line without waiting for it (best effort: a refusal's own line
        after its first line failed). Counted lost if it cannot be queued or written."""
        try:
            if self._closed:
                raise ValueError("the audit log is closed")
            self._enqueue(record.to_json() + "\n", awaited=False)
        except (ValueError, _QueueFull):
            self._lost_lines += 1

    async def _write_line(self, text: str) -> None:
        if self._closed:
            self._count_unqueued()
            raise ValueError("the audit log is closed")
        blocked = self._blocked_for()
        if blocked is not None:
            self._health_changed()
            if self._fail_closed:
                raise TimeoutError(f"the audit log has not taken a line for {blocked:.0f}s")
        try:
            line = self._enqueue(text, awaited=blocked is None)
        except _QueueFull:
            self._count_unqueued()
            self._health_changed()
            raise
        if line.future is None:
            return  # fail-open, and the sink is stuck: waiting would only delay the call
        try:
            # A cancelled caller stops waiting (its future is cancelled); the line is still
            # written.
            await line.future
            return
        except _WaitExpired:
            pass
        with self._lock:
            state = line.state
            if state == _QUEUED and self._fail_closed:
                line.state = _WITHDRAWN
        if state == _DONE:
            # Written (or failed) while a later line of its batch holds the writer.
            if line.error is not None:
                raise line.error
            return
        if state == _QUEUED and self._fail_closed:
            self._pending -= 1  # withdrawn: the writer skips it
        self._health_changed()
        raise TimeoutError(f"not written within {self._write_timeout:g}s")

    def _count_unqueued(self) -> None:
        if not self._fail_closed:
            self._lost_lines += 1

    def _enqueue(self, text: str, *, awaited: bool) -> _Line:
        if self._pending >= self._max_queued:
            raise _QueueFull(f"{self._pending} lines are waiting to be written")
        loop = asyncio.get_running_loop()
        self._loop = loop
        line = _Line(
            text,
            loop.create_future() if awaited else None,
            lost_if_unwritten=not (awaited and self._fail_closed),
        )
        if awaited:
            line.deadline = loop.time() + self._write_timeout
            self._waiting.append(line)
            if self._watchdog is None:
                self._watchdog = loop.call_at(line.deadline, self._end_expired_waits)
        if self._for_this_pass or (
            not self._pending
            and self._healthy
            and self._sink_error is None
            and self._sink.writes_now()
        ):
            # The pipe's: written at the end of this pass of the loop (`_write_pass`).
            if not self._for_this_pass:
                loop.call_soon(self._write_pass)
            self._for_this_pass.append(line)
        else:
            self._queue.append(line)  # deque.append: atomic, no lock against the writer
            if not self._wake_scheduled:
                # Woken once for all the lines this pass of the event loop queues (the lines
                # of concurrent calls go together), not once per line: a wake-up is a system
                # call and a thread switch.
                self._wake_scheduled = True
                loop.call_soon(self._wake_writer)
        self._pending += 1
        return line

    def _wake_writer(self) -> None:
        self._wake_scheduled = False
        self._wake.set()

    def _write_pass(self) -> None:
        """The end of a pass of the event loop: the lines it queued for the pipe, written
        now, whole lines in non-blocking writes of at most PIPE_BUF bytes (atomic) as far as
        the pipe takes them; the rest (a full pipe) to the writer thread, in order."""
        lines, self._for_this_pass = self._for_this_pass, []
        done: list[_Line] = []
        with self._lock:
            for line in lines:
                if line.state == _QUEUED:
                    line.state = _WRITING
                    done.append(line)
        written = self._sink.write_lines_now([line.text for line in done])
        with self._lock:
            for line in done[:written]:
                line.state = _DONE
            for line in done[written:]:
                line.state = _QUEUED
        for line in done[written:]:
            self._queue.append(line)
        if written < len(done):
            self._wake_writer()
        self._resolve(done[:written])

    def _end_expired_waits(self) -> None:
        """The watchdog: the callers whose wait ran out stop waiting (`_WaitExpired`)."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = self._waiting
        while waiting:
            line = waiting[0]
            assert line.future is not None
            if not line.future.done():
                if line.deadline > now:
                    self._watchdog = loop.call_at(line.deadline, self._end_expired_waits)
                    return
                line.future.set_exception(_WaitExpired())
            waiting.popleft()

    def _submit(self, run: Callable[[], object], *, last: bool = False) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[BaseException | None] = loop.create_future()
        self._queue.append(_Action(run, future, last=last))
        self._wake.set()
        return future

    def _resolve(self, lines: list[_Line]) -> None:
        """On the loop: the writer thread is done with these lines."""
        for line in lines:
            self._pending -= 1
            if line.error is None:
                self._written_lines += 1
                self._sink_error = None
                if line.future is not None and not line.future.done():
                    line.future.set_result(None)
            else:
                if line.lost_if_unwritten:
                    self._lost_lines += 1
                self._sink_error = _cause(line.error)
                if line.future is not None and not line.future.done():
                    line.future.set_exception(line.error)
        # Lines are done in order: forget the waits that ended.
        waiting = self._waiting
        while waiting and waiting[0].future is not None and waiting[0].future.done():
            waiting.popleft()
        self._health_changed()

    def _health_changed(self) -> None:
        """Log and tell the listeners when the sink turned healthy or not."""
        problem = self.problem()
        healthy = problem is None
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            logger.warning(
                "audit log %s is writable again (%d line(s) lost so far)",
                self._sink,
                self._lost_lines,
            )
        elif self._fail_closed:
            logger.error(
                "%s; refusing to issue tokens until it is writable (audit.failClosed)", problem
            )
        elif self._blocked_for() is not None:
            logger.error(
                "%s; tokens are issued while their lines wait, at most %d in memory, the rest "
                "lost (audit.failClosed is off)",
                problem,
                self._max_queued,
            )
        else:
            logger.error(
                "%s; tokens are issued without audit lines until it is writable "
                "(audit.failClosed is off)",
                problem,
            )
        if not healthy and self._sink_error is not None and self._checker is None:
            self._checker = asyncio.get_running_loop().create_task(
                self._check_until_writable(), name="audit-log-check"
            )
        for listener in self._listeners:
            listener()

    async def _check_until_writable(self) -> None:
        """While the last write failed: check the sink now and then, so that a broker taken
        out of rotation (no calls, no lines) sees the repair."""
        try:
            while self._sink_error is not None and not self._closed:
                await asyncio.sleep(SINK_CHECK_INTERVAL_SECONDS)
                if self._sink_error is None or self._closed:
                    break
                error = await self._submit(self._sink.check)
                if error is None and self._sink_error is not None:
                    self._sink_error = None
                    self._health_changed()
        finally:
            self._checker = None

    def reopen(self) -> None:
        """Reopen the file (SIGHUP), after the lines queued before; the outcome is logged."""
        if not self._closed:
            self._submit(self._reopen_in_thread)

    def _reopen_in_thread(self) -> None:
        try:
            if self._sink.reopen():
                logger.info("audit log %s reopened", self._sink)
        except OSError as exc:
            logger.error("audit log %s: cannot reopen: %s", self._sink, exc.strerror)
            raise

    async def close(self) -> None:
        """Write the queued lines, then close the file (a stream is only flushed). Gives up
        (the lines left are lost) when the sink is blocked."""
        if self._closed:
            return
        self._closed = True
        # Lines waiting for the end of this pass go first, by the thread, before it closes.
        self._queue.extend(self._for_this_pass)
        self._for_this_pass = []
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        closed = self._submit(self._sink.close, last=True)
        while True:
            try:
                error = await asyncio.wait_for(asyncio.shield(closed), self._write_timeout)
            except TimeoutError:
                blocked = self._blocked_for()
                if blocked is None:
                    continue  # still writing
                logger.error(
                    "audit log %s: %d line(s) not written at shutdown: it has not taken a line "
                    "for %.0fs",
                    self._sink,
                    self._pending,
                    blocked,
                )
                self._lost_lines += self._pending
                return
            break
        if isinstance(error, OSError):
            logger.warning("closing the audit log %s failed: %s", self._sink, error.strerror)

    async def __aenter__(self) -> AuditLog:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait()
            # Cleared before taking the items: one queued after this is woken for again.
            self._wake.clear()
            items: list[_Line | _Action] = []
            with contextlib.suppress(IndexError):
                while True:
                    items.append(self._queue.popleft())
            done: list[_Line] = []
            # The sink is prepared (the file's path followed) once per batch.
            prepared = False
            prepare_error: OSError | ValueError | None = None
            for item in items:
                if isinstance(item, _Action):
                    if done:
                        self._post(self._resolve, done)
                        done = []
                    error: BaseException | None = None
                    try:
                        item.run()
                    except Exception as exc:  # reported to whoever asked
                        error = exc
                    if item.future is not None:
                        self._post(_set_result, item.future, error)
                    if item.last:
                        return
                    prepared = False  # the sink may be another file now
                    continue
                with self._lock:
                    if item.state == _WITHDRAWN:
                        continue
                    item.state = _WRITING
                # A stat(2) or write(2) that hangs (a full pipe, a hung mount) shows as
                # blocked once it has taken longer than the write timeout.
                self._write_started = time.monotonic()
                try:
                    if not prepared:
                        prepared = True
                        try:
                            self._sink.prepare()
                            prepare_error = None
                        except (OSError, ValueError) as exc:
                            prepare_error = exc  # not written where the path names: all fail
                    written_error = prepare_error
                    if written_error is None:
                        try:
                            self._sink.write(item.text)
                        except (OSError, ValueError) as exc:
                            written_error = exc
                finally:
                    self._write_started = None
                with self._lock:
                    item.error = written_error
                    item.state = _DONE
                done.append(item)
            if done:
                self._post(self._resolve, done)

    def _post(self, callback: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(callback, *args)


def _set_result(future: asyncio.Future[BaseException | None], error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)
