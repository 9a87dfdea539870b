"""The HTTP doors' vocabulary for the broker's refusals: every ErrorInfo reason of the catalogue
(broker.reasons) mapped, deliberately, to the HTTP status and Kubernetes `Status` reason of the
Kubernetes-compatible door and to the RFC 6749 §5.2 error of the OAuth token-exchange door.

The rules behind the table:

- Authentication failures are kube-apiserver's 401 `Unauthorized` (message `Unauthorized`,
  nothing else); on the OAuth door RFC 8693 §2.2.2 says `invalid_request` for a subject token
  that is invalid "for any reason".
- The policy's refusals are 403 `Forbidden` (kubectl prints the policy's message); on the OAuth
  door RFC 8693 §2.2.2's `invalid_target` ("unwilling or unable to issue a token for any target
  service indicated by the resource or audience parameters"), or `invalid_request` for a
  refused parameter (lifetime, dry run).
- Validation is kube-apiserver's 422 `Invalid` with `details.causes`; a body or envelope that
  cannot be decoded its 400 `BadRequest`.
- Rate limits are 429 `TooManyRequests` with `Retry-After`: client-go (kubectl, controllers)
  waits for Retry-After and retries a 429 by itself, while the API server's own
  priority-and-fairness 429 is a plain-text body; the broker answers a Status, which client-go
  decodes into a message naming the limit. Pending-call shedding is a 429 too (the API
  server's max-in-flight filter answers 429).
- What may succeed later (the API server unreachable or overloaded, the broker's own
  credentials refused upstream, the audit sink, shutting down) is 503 `ServiceUnavailable`, with
  `Retry-After` when the error knows a delay; timeouts are 504 `Timeout`.
- 500 `InternalError` only for what is truly internal: a bug, an API server that does not
  serve TokenRequest as the broker calls it (405, 406, 410, 415 to the broker), or a token the
  API server minted longer than the policy allows.
- Relayed answers of the API server keep its status where it is the caller's business (400,
  404, 409, 413, 422, 429; 403 is the broker's RBAC, still a refusal for this service
  account); its 401 (the broker's credentials) and 5xx are 503.

OAuth statuses: 400 for every client error (RFC 6749 §5.2), 429/503/504 with `Retry-After` as
on the Kubernetes door, 500 `server_error`.

`markdown_table()` renders the table for docs/http-door.md (a test keeps the page in step).
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple

from broker.errors import BrokerError
from broker.reasons import Reason


class HttpAnswer(NamedTuple):
    """How one reason is answered over HTTP."""

    status: int  # the Kubernetes door's HTTP status
    status_reason: str  # its Status `reason` ("" : none, as kube-apiserver's unknown errors)
    oauth_error: str  # RFC 6749 §5.2 / RFC 8693 §2.2.2 `error`
    oauth_status: int  # the OAuth door's HTTP status


def _a(status: int, status_reason: str, oauth_error: str, oauth_status: int = 400) -> HttpAnswer:
    return HttpAnswer(status, status_reason, oauth_error, oauth_status)


_UNAVAILABLE = _a(503, "ServiceUnavailable", "temporarily_unavailable", 503)
_TIMEOUT = _a(504, "Timeout", "temporarily_unavailable", 503)
_TOO_MANY = _a(429, "TooManyRequests", "temporarily_unavailable", 429)
_INTERNAL = _a(500, "InternalError", "server_error", 500)
_DENIED_TARGET = _a(403, "Forbidden", "invalid_target")
_DENIED_PARAMETER = _a(403, "Forbidden", "invalid_request")
_UNAUTHORIZED = _a(401, "Unauthorized", "invalid_request")

ANSWERS: Final[dict[Reason, HttpAnswer]] = {
    Reason.TOO_MANY_PENDING_CALLS: _TOO_MANY,
    Reason.REQUEST_MALFORMED: _a(400, "BadRequest", "invalid_request"),
    Reason.REQUEST_RECEIVE_TIMEOUT: _a(408, "Timeout", "invalid_request"),
    Reason.DEFAULT_DEADLINE_EXCEEDED: _TIMEOUT,
    Reason.PEER_THROTTLED: _TOO_MANY,
    Reason.CREDENTIALS_MISSING: _UNAUTHORIZED,
    Reason.CREDENTIALS_INVALID: _UNAUTHORIZED,
    Reason.REQUEST_INVALID: _a(422, "Invalid", "invalid_request"),
    Reason.NO_MATCHING_RULE: _DENIED_TARGET,
    Reason.DRY_RUN_NOT_ALLOWED: _DENIED_PARAMETER,
    Reason.BOUND_OBJECT_REQUIRED: _DENIED_TARGET,
    Reason.BOUND_KIND_NOT_ALLOWED: _DENIED_TARGET,
    Reason.AUDIENCE_REQUIRED: _DENIED_TARGET,
    Reason.AUDIENCE_NOT_ALLOWED: _DENIED_TARGET,
    Reason.EXPIRATION_TOO_LONG: _DENIED_PARAMETER,
    Reason.RATE_LIMITED: _TOO_MANY,
    Reason.RATE_LIMIT_UNAVAILABLE: _UNAVAILABLE,
    Reason.UPSTREAM_BUSY: _UNAVAILABLE,
    Reason.UPSTREAM_THROTTLED: _UNAVAILABLE,
    Reason.TOKEN_CACHE_CLOSED: _UNAVAILABLE,
    Reason.UPSTREAM_TIMEOUT: _TIMEOUT,
    Reason.KUBERNETES_UNREACHABLE: _UNAVAILABLE,
    Reason.KUBERNETES_INVALID_RESPONSE: _UNAVAILABLE,
    Reason.TOKEN_LIFETIME_EXCEEDS_POLICY: _INTERNAL,
    Reason.AUDIT_UNAVAILABLE: _UNAVAILABLE,
    Reason.INTERNAL: _INTERNAL,
    Reason.KUBERNETES_BAD_REQUEST: _a(400, "BadRequest", "invalid_request"),
    Reason.KUBERNETES_UNAUTHORIZED: _UNAVAILABLE,
    Reason.KUBERNETES_FORBIDDEN: _DENIED_TARGET,
    Reason.KUBERNETES_NOT_FOUND: _a(404, "NotFound", "invalid_target"),
    Reason.KUBERNETES_METHOD_NOT_ALLOWED: _INTERNAL,
    Reason.KUBERNETES_NOT_ACCEPTABLE: _INTERNAL,
    Reason.KUBERNETES_CONFLICT: _a(409, "Conflict", "invalid_request"),
    Reason.KUBERNETES_EXPIRED: _INTERNAL,
    Reason.KUBERNETES_REQUEST_ENTITY_TOO_LARGE: _a(413, "RequestEntityTooLarge", "invalid_request"),
    Reason.KUBERNETES_UNSUPPORTED_MEDIA_TYPE: _INTERNAL,
    Reason.KUBERNETES_INVALID: _a(422, "Invalid", "invalid_request"),
    Reason.KUBERNETES_TOO_MANY_REQUESTS: _TOO_MANY,
    Reason.KUBERNETES_INTERNAL_ERROR: _UNAVAILABLE,
    Reason.KUBERNETES_SERVICE_UNAVAILABLE: _UNAVAILABLE,
    Reason.KUBERNETES_TIMEOUT: _TIMEOUT,
    # Any other relayed reason: by the API server's HTTP status (`answer_for`).
    Reason.KUBERNETES_UNKNOWN: _UNAVAILABLE,
}

# A relayed reason outside the catalogue, with a client-error status: relayed as it came.
_RELAYED_CLIENT_ERROR = HttpAnswer(400, "", "invalid_request", 400)


def answer_for(error: BrokerError) -> HttpAnswer:
    """How `error` is answered over HTTP (a reason outside the catalogue: by its gRPC code's
    family, never 200 and never a silent 500 for a client's mistake)."""
    try:
        reason = Reason(error.reason)
    except ValueError:
        reason = None
    if reason is not None and reason is not Reason.KUBERNETES_UNKNOWN:
        return ANSWERS[reason]
    # The open family KUBERNETES_<REASON> (and KUBERNETES_UNKNOWN): the API server's status.
    try:
        status = int(error.metadata.get("kubernetesCode", "0"))
    except ValueError:
        status = 0
    if 400 <= status < 500 and status not in (401, 429):
        return _RELAYED_CLIENT_ERROR._replace(
            status=status, status_reason=error.metadata.get("kubernetesReason", "")
        )
    if status == 429:
        return _TOO_MANY
    return _UNAVAILABLE


def retry_after_header(error: BrokerError) -> str | None:
    """The `Retry-After` value (whole seconds, rounded up, at least 1) of an error that knows
    a delay."""
    if error.retry_after is None:
        return None
    return str(max(1, math.ceil(error.retry_after)))


def markdown_table() -> str:
    """The mapping as one Markdown table (docs/http-door.md holds it)."""
    rows = [
        "| reason | gRPC code | HTTP (Kubernetes door) | Status reason | OAuth error (HTTP) |",
        "|---|---|---|---|---|",
    ]
    for reason, answer in ANSWERS.items():
        codes = ", ".join(f"`{code.name}`" for code in reason.codes)
        status = str(answer.status)
        status_reason = f"`{answer.status_reason}`" if answer.status_reason else "(none)"
        if reason is Reason.KUBERNETES_UNKNOWN:
            status = "the API server's 4xx, else 503"
            status_reason = "the API server's, else `ServiceUnavailable`"
        rows.append(
            f"| `{reason.value}` | {codes} | {status} | {status_reason} | "
            f"`{answer.oauth_error}` ({answer.oauth_status}) |"
        )
    rows.append(
        "| `KUBERNETES_<REASON>` (any other) | by HTTP status | the API server's 4xx "
        "(401: 503), 429, else 503 | the API server's | `invalid_request` (400), "
        "`temporarily_unavailable` (429/503) |"
    )
    return "\n".join(rows) + "\n"
