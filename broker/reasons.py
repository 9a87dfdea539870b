"""The catalogue of ErrorInfo reasons: every reason the broker answers, in one place.

Callers branch on `ErrorInfo.reason` (with `ErrorInfo.domain`), so each reason is a contract:
here it is tied to its gRPC status code, its domain, whether retrying can help, the
`ErrorInfo.metadata` keys it carries, a one-line meaning and what the caller should do. The
broker raises its refusals from these entries (`BrokerError.of(Reason.X, message, ...)` takes
the code and domain from the entry), the tests compare with them, and `markdown_table()`
renders the catalogue for the docs (docs/troubleshooting.md holds it, kept in step by a
test).

Two domains:
- `tokenbroker.dev`: the broker's own refusals;
- `k8s.io`: answers of the Kubernetes API server relayed to the caller, a family of reasons
  `KUBERNETES_<REASON>`, the Status `reason` in UPPER_SNAKE (`NotFound` ->
  `KUBERNETES_NOT_FOUND`; `kubernetes_reason`), the gRPC code following the HTTP status
  (`kubernetes_code`). The family is open (the API server names the reason); the catalogue lists
  the reason each HTTP status carries by default (client-go's), with that status's code, which
  covers what TokenRequest answers, plus `KUBERNETES_UNKNOWN` for a status without one.

Besides ErrorInfo reasons, the audit line and the metrics use two outcome names that are
never answered as ErrorInfo: `ALLOWED` and `CANCELLED` (below).

Dependency-light on purpose (grpc only, nothing of the broker): the client side imports it too.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final, NamedTuple

import grpc

# ErrorInfo.domain of every error the broker itself produces.
ERROR_DOMAIN: Final = "tokenbroker.dev"
# ErrorInfo.domain of errors relayed from the Kubernetes API server.
KUBERNETES_DOMAIN: Final = "k8s.io"

# The reason of an allowed decision (policy metrics, audit lines); never an ErrorInfo reason.
ALLOWED: Final = "ALLOWED"
# The audit line of a call its caller cancelled (nothing is answered); never an ErrorInfo reason.
CANCELLED: Final = "CANCELLED"

_C = grpc.StatusCode

# HTTP status -> the gRPC code of a relayed answer. Other statuses: UNAVAILABLE when a retry
# may succeed (429, 5xx), else FAILED_PRECONDITION (`kubernetes_code`).
_KUBERNETES_CODES: Final = {
    400: _C.INVALID_ARGUMENT,
    413: _C.INVALID_ARGUMENT,
    422: _C.INVALID_ARGUMENT,
    # The broker's own credentials: not the caller's fault, and not theirs to fix.
    401: _C.UNAVAILABLE,
    403: _C.PERMISSION_DENIED,
    404: _C.NOT_FOUND,
    409: _C.FAILED_PRECONDITION,
    429: _C.UNAVAILABLE,
}
_KUBERNETES_METADATA: Final = (
    "kubernetesReason",
    "kubernetesCode",
    "kubernetesKind",
    "kubernetesName",
    "kubernetesGroup",
)
_MAX_REASON_CHARS: Final = 63  # ErrorInfo: [A-Z][A-Z0-9_]+[A-Z0-9], at most 63 characters


def kubernetes_retryable(http_status: int) -> bool:
    """A relayed answer a later call may get past: 429 (API Priority and Fairness) and 5xx."""
    return http_status == 429 or 500 <= http_status <= 599


def kubernetes_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code of a Kubernetes API answer with this (non-2xx) HTTP status."""
    code = _KUBERNETES_CODES.get(http_status)
    if code is not None:
        return code
    return _C.UNAVAILABLE if kubernetes_retryable(http_status) else _C.FAILED_PRECONDITION


def kubernetes_reason(status_reason: str) -> str:
    """ErrorInfo.reason of a relayed Status: KUBERNETES_ + UPPER_SNAKE of its reason."""
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", status_reason)
    snake = re.sub(r"[^A-Za-z0-9]+", "_", snake).strip("_").upper() or "UNKNOWN"
    return ("KUBERNETES_" + snake)[:_MAX_REASON_CHARS]


class _Entry(NamedTuple):
    name: str
    codes: tuple[grpc.StatusCode, ...]
    retryable: bool
    meaning: str
    action: str
    metadata: tuple[str, ...] = ()
    domain: str = ERROR_DOMAIN
    # Relayed reasons: the HTTP status that carries this Status reason by default.
    http_status: int | None = None
    status_reason: str | None = None


def _own(
    name: str,
    code: grpc.StatusCode,
    retryable: bool,
    meaning: str,
    action: str,
    *metadata: str,
) -> _Entry:
    return _Entry(name, (code,), retryable, meaning, action, metadata)


def _relayed(http_status: int, status_reason: str, meaning: str, action: str) -> _Entry:
    """A Status reason the API server answers with `http_status` (client-go's default)."""
    code = kubernetes_code(http_status)
    return _Entry(
        kubernetes_reason(status_reason),
        (code,),
        code == _C.UNAVAILABLE,  # 401 too: once the broker's credentials are fixed
        meaning,
        action,
        _KUBERNETES_METADATA,
        KUBERNETES_DOMAIN,
        http_status,
        status_reason,
    )


_FIX_CREDENTIALS = "the broker's own Kubernetes credentials or RBAC need fixing (an operator)"
_BACKOFF = "retry with exponential backoff and jitter, never sooner than RetryInfo says"
_DONT_RETRY = "don't retry the same request: it fails the same way"


class Reason(StrEnum):
    """Every ErrorInfo reason the broker answers. A member is its reason string (a `str`)."""

    codes: tuple[grpc.StatusCode, ...]
    retryable: bool
    meaning: str
    action: str
    metadata: tuple[str, ...]
    domain: str
    http_status: int | None
    status_reason: str | None

    def __new__(cls, *fields: object) -> Reason:
        entry = _Entry(*fields)  # type: ignore[arg-type]
        member = str.__new__(cls, entry.name)
        member._value_ = entry.name
        member.codes = entry.codes
        member.retryable = entry.retryable
        member.meaning = entry.meaning
        member.action = entry.action
        member.metadata = entry.metadata
        member.domain = entry.domain
        member.http_status = entry.http_status
        member.status_reason = entry.status_reason
        return member

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC code of this reason: one for each reason, except KUBERNETES_UNKNOWN
        (ValueError), whose code follows the HTTP status."""
        if len(self.codes) != 1:
            raise ValueError(f"{self.value}: the code follows the HTTP status")
        return self.codes[0]

    # --- admission and receiving the request (admission.py, receive.py, service.py) ---------

    TOO_MANY_PENDING_CALLS = _own(
        "TOO_MANY_PENDING_CALLS",
        _C.UNAVAILABLE,
        True,
        "the broker process has `server.maxPendingCalls` calls waiting for authentication or "
        "their request message; the call was shed at once",
        _BACKOFF + " (RetryInfo 1 s)",
    )
    REQUEST_MALFORMED = _own(
        "REQUEST_MALFORMED",
        _C.INVALID_ARGUMENT,
        False,
        "the request bytes are not a valid request message, or the call ended its stream "
        "without one",
        _DONT_RETRY + "; fix the client (its protobuf encoding)",
    )
    REQUEST_RECEIVE_TIMEOUT = _own(
        "REQUEST_RECEIVE_TIMEOUT",
        _C.DEADLINE_EXCEEDED,
        True,
        "the request message did not arrive within `server.receiveTimeoutSeconds`",
        "a client or network problem: retry once the client sends its message promptly",
        "timeoutSeconds",
    )
    DEFAULT_DEADLINE_EXCEEDED = _own(
        "DEFAULT_DEADLINE_EXCEEDED",
        _C.DEADLINE_EXCEEDED,
        True,
        "a call without a gRPC deadline did not finish within `server.defaultDeadlineSeconds`",
        "retry with backoff, and set a deadline of your own",
        "deadlineSeconds",
    )

    # --- authentication (authn_throttle.py, authn.py) ----------------------------------------

    PEER_THROTTLED = _own(
        "PEER_THROTTLED",
        _C.RESOURCE_EXHAUSTED,
        True,
        "calls from this peer address failed authentication too often "
        "(`rateLimit.authFailuresPerPeer`); refused before authentication",
        "fix the credential of every client behind this address, then retry after the "
        "RetryInfo delay",
        "scope",
    )
    CREDENTIALS_MISSING = _own(
        "CREDENTIALS_MISSING",
        _C.UNAUTHENTICATED,
        False,
        "the call carries no credential of an enabled authentication method",
        "send an API key or JWT (`authorization: Bearer ...`), or a client certificate",
    )
    CREDENTIALS_INVALID = _own(
        "CREDENTIALS_INVALID",
        _C.UNAUTHENTICATED,
        False,
        "the credential did not verify (why is in the operator log, never in the answer)",
        "fix or renew the credential; " + _DONT_RETRY,
    )

    # --- validation (validation.py) ------------------------------------------------------------

    REQUEST_INVALID = _own(
        "REQUEST_INVALID",
        _C.INVALID_ARGUMENT,
        False,
        "the request breaks the API server's validation rules (BadRequest lists each field)",
        "fix the fields named in BadRequest; " + _DONT_RETRY,
        "violations",
    )

    # --- policy (policy.py), in the order the deciding rule's constraints are checked ---------

    NO_MATCHING_RULE = _own(
        "NO_MATCHING_RULE",
        _C.PERMISSION_DENIED,
        False,
        "no policy rule matches the caller, namespace and service account",
        "ask for a rule that grants this caller this service account; " + _DONT_RETRY,
    )
    DRY_RUN_NOT_ALLOWED = _own(
        "DRY_RUN_NOT_ALLOWED",
        _C.PERMISSION_DENIED,
        False,
        "`dry_run` is set and the deciding rule has `allowDryRun: false`",
        "drop `dry_run`, or ask for `allowDryRun` on the rule",
        "rule",
    )
    BOUND_OBJECT_REQUIRED = _own(
        "BOUND_OBJECT_REQUIRED",
        _C.PERMISSION_DENIED,
        False,
        "the deciding rule requires a bound object (`boundObject.required`) and the request "
        "binds none",
        "bind the token to an object of an allowed kind (`bound_object_ref`)",
        "rule",
    )
    BOUND_KIND_NOT_ALLOWED = _own(
        "BOUND_KIND_NOT_ALLOWED",
        _C.PERMISSION_DENIED,
        False,
        "the bound object's kind is not in the deciding rule's `boundObject.kinds`",
        "bind to an allowed kind (the message lists them)",
        "rule",
    )
    AUDIENCE_REQUIRED = _own(
        "AUDIENCE_REQUIRED",
        _C.PERMISSION_DENIED,
        False,
        "no audience requested, the rule has no `defaultAudiences` and does not allow the API "
        "server's own audience",
        "request an audience (`token_request.spec.audiences`)",
        "rule",
    )
    AUDIENCE_NOT_ALLOWED = _own(
        "AUDIENCE_NOT_ALLOWED",
        _C.PERMISSION_DENIED,
        False,
        "a requested audience is not in the deciding rule's `audiences`",
        "request only allowed audiences, or ask for the audience on the rule",
        "rule",
    )
    EXPIRATION_TOO_LONG = _own(
        "EXPIRATION_TOO_LONG",
        _C.PERMISSION_DENIED,
        False,
        "the (requested or default) expiration is longer than the rule's `maxExpiration` and "
        "the rule says `onLongerExpiration: reject`",
        "request at most `maxExpiration` seconds",
        "rule",
    )

    # --- rate limits (ratelimit.py, upstream_guard.py) ----------------------------------------

    RATE_LIMITED = _own(
        "RATE_LIMITED",
        _C.RESOURCE_EXHAUSTED,
        True,
        "a rate limit refused the call (metadata `scope`: caller, serviceaccount or global; "
        "QuotaFailure names the limit)",
        "wait for the RetryInfo delay, then retry (sooner is refused again); a `caller` scope "
        "means this client asks too often",
        "scope",
    )
    RATE_LIMIT_UNAVAILABLE = _own(
        "RATE_LIMIT_UNAVAILABLE",
        _C.UNAVAILABLE,
        True,
        "the rate limits' Redis does not answer and `rateLimit.onRedisUnavailable` is `refuse`",
        _BACKOFF,
    )
    UPSTREAM_BUSY = _own(
        "UPSTREAM_BUSY",
        _C.UNAVAILABLE,
        True,
        "`rateLimit.upstream.maxConcurrent` calls to the API server are in flight and no slot "
        "freed up in time",
        _BACKOFF + " (RetryInfo 1 s)",
        "maxConcurrent",
    )
    UPSTREAM_THROTTLED = _own(
        "UPSTREAM_THROTTLED",
        _C.UNAVAILABLE,
        True,
        "the API server asked to slow down (429) for this service account; refused without "
        "calling it until its Retry-After has passed",
        "retry after the RetryInfo delay (the time left)",
        "namespace",
        "serviceAccount",
    )

    # --- the token cache and the upstream call (cache.py, upstream.py) ------------------------

    TOKEN_CACHE_CLOSED = _own(
        "TOKEN_CACHE_CLOSED",
        _C.UNAVAILABLE,
        True,
        "the broker is shutting down",
        "retry (another replica answers)",
    )
    UPSTREAM_TIMEOUT = _own(
        "UPSTREAM_TIMEOUT",
        _C.DEADLINE_EXCEEDED,
        True,
        "the deadline expired before the Kubernetes API server answered",
        "retry with backoff and a fresh deadline; a longer one leaves the broker room to wait",
        "timeoutSeconds",
    )
    KUBERNETES_UNREACHABLE = _own(
        "KUBERNETES_UNREACHABLE",
        _C.UNAVAILABLE,
        True,
        "the broker could not connect to the Kubernetes API server (retries exhausted)",
        _BACKOFF,
    )
    KUBERNETES_INVALID_RESPONSE = _own(
        "KUBERNETES_INVALID_RESPONSE",
        _C.UNAVAILABLE,
        True,
        "the Kubernetes API server's success answer could not be read as a TokenRequest",
        _BACKOFF + "; an operator should check what answers at the API server's address",
        "kubernetesCode",
    )

    # --- a token minted but withheld (issued_token.py, audit.py) ------------------------------

    TOKEN_LIFETIME_EXCEEDS_POLICY = _own(
        "TOKEN_LIFETIME_EXCEEDS_POLICY",
        _C.FAILED_PRECONDITION,
        False,
        "the token the API server minted is valid longer than the rule's `maxExpiration` (or "
        "its lifetime cannot be read); withheld, not cached",
        "an operator should align the API server's token extension with the policy",
        "maxExpirationSeconds",
        "rule",
        "tokenLifetimeSeconds",
    )
    AUDIT_UNAVAILABLE = _own(
        "AUDIT_UNAVAILABLE",
        _C.UNAVAILABLE,
        True,
        "`audit.failClosed` and the token's audit line could not be written in time; the "
        "token was withheld, not cached",
        _BACKOFF,
    )

    # --- anything else --------------------------------------------------------------------------

    INTERNAL = _own(
        "INTERNAL",
        _C.INTERNAL,
        False,
        "an unexpected error in the broker (logged with its traceback and the request id)",
        "report it with the request id",
    )

    # --- relayed from the Kubernetes API server (domain k8s.io) --------------------------------

    KUBERNETES_BAD_REQUEST = _relayed(
        400,
        "BadRequest",
        "the API server refused the request (e.g. a bound pod of another service account)",
        "fix the request; " + _DONT_RETRY,
    )
    KUBERNETES_UNAUTHORIZED = _relayed(
        401,
        "Unauthorized",
        "the API server rejected the broker's own credentials (not the caller's)",
        _FIX_CREDENTIALS + "; retry later",
    )
    KUBERNETES_FORBIDDEN = _relayed(
        403,
        "Forbidden",
        "the broker's RBAC does not allow creating tokens for this service account",
        _FIX_CREDENTIALS,
    )
    KUBERNETES_NOT_FOUND = _relayed(
        404,
        "NotFound",
        "the namespace, service account or bound object does not exist",
        "check the names; " + _DONT_RETRY,
    )
    KUBERNETES_METHOD_NOT_ALLOWED = _relayed(
        405,
        "MethodNotAllowed",
        "the API server does not serve TokenRequest here",
        "an operator should check the API server",
    )
    KUBERNETES_NOT_ACCEPTABLE = _relayed(
        406,
        "NotAcceptable",
        "the API server cannot answer in the format asked for",
        "an operator should check the API server",
    )
    KUBERNETES_CONFLICT = _relayed(
        409,
        "Conflict",
        "the bound object's UID is not the one in the request (deleted and recreated?)",
        "bind to the object's current UID",
    )
    KUBERNETES_EXPIRED = _relayed(
        410,
        "Expired",
        "the API server answered 410 Gone",
        _DONT_RETRY,
    )
    KUBERNETES_REQUEST_ENTITY_TOO_LARGE = _relayed(
        413,
        "RequestEntityTooLarge",
        "the request body is too large for the API server",
        "send a smaller request; " + _DONT_RETRY,
    )
    KUBERNETES_UNSUPPORTED_MEDIA_TYPE = _relayed(
        415,
        "UnsupportedMediaType",
        "the API server does not accept the request's content type",
        "an operator should check the API server",
    )
    KUBERNETES_INVALID = _relayed(
        422,
        "Invalid",
        "the API server's validation refused the request (BadRequest lists each cause)",
        "fix the fields named in BadRequest; " + _DONT_RETRY,
    )
    KUBERNETES_TOO_MANY_REQUESTS = _relayed(
        429,
        "TooManyRequests",
        "the API server's priority and fairness limits refused the call (retries exhausted)",
        "retry after the RetryInfo delay (the API server's Retry-After)",
    )
    KUBERNETES_INTERNAL_ERROR = _relayed(
        500,
        "InternalError",
        "the API server failed (e.g. signing the token)",
        _BACKOFF,
    )
    KUBERNETES_SERVICE_UNAVAILABLE = _relayed(
        503,
        "ServiceUnavailable",
        "the API server is unavailable",
        _BACKOFF,
    )
    KUBERNETES_TIMEOUT = _relayed(
        504,
        "Timeout",
        "the API server timed out",
        _BACKOFF,
    )
    KUBERNETES_UNKNOWN = _Entry(
        "KUBERNETES_UNKNOWN",
        (_C.UNAVAILABLE, _C.FAILED_PRECONDITION),
        True,
        "the API server answered a status without a reason (UNAVAILABLE for 5xx, else "
        "FAILED_PRECONDITION)",
        "5xx: " + _BACKOFF + "; otherwise don't retry",
        _KUBERNETES_METADATA,
        KUBERNETES_DOMAIN,
    )


def default_status_reason(http_status: int) -> str:
    """The Status reason an API server answer with this HTTP status carries when its body
    names none (client-go's `NewGenericServerResponse`); "" when there is none."""
    return _DEFAULT_STATUS_REASONS.get(http_status, "")


_DEFAULT_STATUS_REASONS: Final = {
    r.http_status: r.status_reason
    for r in Reason
    if r.http_status is not None and r.status_reason is not None
}
# Every gRPC code a relayed answer can have.
KUBERNETES_CODES: Final = frozenset(
    kubernetes_code(status) for status in (*_KUBERNETES_CODES, 418, 500)
)
_KUBERNETES_FAMILY: Final = re.compile(r"KUBERNETES_[A-Z0-9_]*[A-Z0-9]")


def is_relayed(reason: str, domain: str) -> bool:
    """Whether (reason, domain) is of the relayed family `KUBERNETES_<REASON>` (k8s.io)."""
    return domain == KUBERNETES_DOMAIN and _KUBERNETES_FAMILY.fullmatch(reason) is not None


def markdown_table() -> str:
    """The catalogue as one Markdown table: reason, code, retry, meaning, what to do."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [
        "| reason | gRPC code | retry | meaning | what to do |",
        "|---|---|---|---|---|",
    ]
    for reason in Reason:
        name = f"`{reason.value}`"
        if reason.domain != ERROR_DOMAIN:
            name += f" (`{reason.domain}`"
            name += f", HTTP {reason.http_status})" if reason.http_status is not None else ")"
        if reason.metadata and reason.domain == ERROR_DOMAIN:
            name += " (metadata " + ", ".join(f"`{key}`" for key in reason.metadata) + ")"
        codes = ", ".join(f"`{code.name}`" for code in reason.codes)
        retry = "yes" if reason.retryable else "no"
        if len(reason.codes) > 1:
            retry = "5xx: yes"
        rows.append(
            f"| {name} | {codes} | {retry} | {cell(reason.meaning)} | {cell(reason.action)} |"
        )
    family_codes = ", ".join(f"`{code.name}`" for code in sorted(KUBERNETES_CODES, key=str))
    rows.append(
        f"| `KUBERNETES_<REASON>` (`{KUBERNETES_DOMAIN}`) | {family_codes} (by HTTP status) | "
        "when `UNAVAILABLE` | any other Status reason of the API server, in UPPER_SNAKE | "
        "as for its HTTP status above |"
    )
    return "\n".join(rows) + "\n"
