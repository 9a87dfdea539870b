"""Kubernetes `Status` bodies and the Go formatting their messages depend on.

Each constructor mirrors its apimachinery counterpart (`k8s.io/apimachinery/pkg/api/errors`,
`pkg/util/validation/field`) so that message texts, reasons and `details` match the real API
server byte for byte: callers relay these texts verbatim, so near enough is not enough.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.apiserver import wire

# --- Go formatting ------------------------------------------------------------------------

_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def go_quote(text: str) -> str:
    """Go's `strconv.Quote` / `%q`: what every `%q` in an upstream message produces."""
    out = ['"']
    for ch in text:
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\ufffd")  # Go decoded it as U+FFFD, which is printable
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def go_string_slice(values: Sequence[str]) -> str:
    """Go's `%#v` of a `[]string`, e.g. `[]string{"a", "b"}`."""
    return "[]string{" + ", ".join(go_quote(v) for v in values) + "}"


# --- field errors (apimachinery pkg/util/validation/field) --------------------------------


@dataclass(frozen=True)
class FieldError:
    """One `field.Error`; `body` is its ErrorBody (the message without the field path)."""

    type: str  # the CauseType, e.g. FieldValueInvalid
    field: str
    body: str

    def __str__(self) -> str:
        return f"{self.field}: {self.body}"


def _bad_value(value: int | str | list[str]) -> str:
    if isinstance(value, bool):  # pragma: no cover - no boolean fields are validated here
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return go_quote(value)
    return go_string_slice(value)


def invalid(path: str, value: int | str, detail: str) -> FieldError:
    return FieldError("FieldValueInvalid", path, f"Invalid value: {_bad_value(value)}: {detail}")


def not_supported(path: str, value: str | list[str], supported: Sequence[str]) -> FieldError:
    detail = "supported values: " + ", ".join(go_quote(v) for v in supported)
    return FieldError(
        "FieldValueNotSupported", path, f"Unsupported value: {_bad_value(value)}: {detail}"
    )


def required(path: str, detail: str) -> FieldError:
    return FieldError("FieldValueRequired", path, f"Required value: {detail}")


def too_long(path: str, max_bytes: int) -> FieldError:
    # ErrorBody omits the (too long) value for this type.
    return FieldError("FieldValueTooLong", path, f"Too long: must have at most {max_bytes} bytes")


def aggregate(errors: Sequence[FieldError]) -> str:
    """`ErrorList.ToAggregate().Error()`: duplicates dropped, brackets when more than one."""
    seen: list[str] = []
    for err in errors:
        text = str(err)
        if text not in seen:
            seen.append(text)
    return seen[0] if len(seen) == 1 else "[" + ", ".join(seen) + "]"


# --- Status -------------------------------------------------------------------------------


@dataclass
class StatusError(Exception):
    """A failure answered with a `Status` body (apimachinery `StatusError`)."""

    code: int
    reason: str  # "" is StatusReasonUnknown and is omitted from the body
    message: str
    details: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The Status object, fields in the order Go serializes them."""
        out: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
        }
        if self.message:
            out["message"] = self.message
        if self.reason:
            out["reason"] = self.reason
        if self.details is not None:
            out["details"] = self.details
        out["code"] = self.code
        return out

    def protobuf(self) -> bytes:
        """The Status in the Kubernetes protobuf encoding (`k8s\\0` + runtime.Unknown of kind
        Status, apiVersion v1), as kube-apiserver answers a client that prefers protobuf."""
        return wire.encode_envelope(wire.encode_status(self.body()), "v1", "Status")


def _details(
    name: str = "",
    group: str = "",
    kind: str = "",
    causes: list[dict[str, str]] | None = None,
    retry_after_seconds: int = 0,
) -> dict[str, Any]:
    """StatusDetails with Go's omitempty: field order name, group, kind, causes, retry."""
    out: dict[str, Any] = {}
    if name:
        out["name"] = name
    if group:
        out["group"] = group
    if kind:
        out["kind"] = kind
    if causes:
        out["causes"] = causes
    if retry_after_seconds:
        out["retryAfterSeconds"] = retry_after_seconds
    return out


def qualified(group: str, resource: str) -> str:
    """GroupResource.String() / GroupKind.String()."""
    return f"{resource}.{group}" if group else resource


NAMESPACE_MISMATCH = (
    "the namespace of the provided object does not match the namespace sent on the request"
)


def unauthorized() -> StatusError:
    return StatusError(401, "Unauthorized", "Unauthorized")


def bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def not_found(resource: str, name: str, group: str = "") -> StatusError:
    return StatusError(
        404,
        "NotFound",
        f"{qualified(group, resource)} {go_quote(name)} not found",
        _details(name=name, group=group, kind=resource),
    )


def path_not_found() -> StatusError:
    """go-restful's unmatched route: NewGenericServerResponse(404) with empty details."""
    return StatusError(404, "NotFound", "the server could not find the requested resource", {})


def already_exists(resource: str, name: str, group: str = "") -> StatusError:
    return StatusError(
        409,
        "AlreadyExists",
        f"{qualified(group, resource)} {go_quote(name)} already exists",
        _details(name=name, group=group, kind=resource),
    )


def conflict(resource: str, name: str, cause: str, group: str = "") -> StatusError:
    return StatusError(
        409,
        "Conflict",
        f"Operation cannot be fulfilled on {qualified(group, resource)} {go_quote(name)}: {cause}",
        _details(name=name, group=group, kind=resource),
    )


def forbidden(resource: str, name: str, reason: str, group: str = "") -> StatusError:
    if not resource and not group:
        message = f"forbidden: {reason}"
    elif not name:
        message = f"{qualified(group, resource)} is forbidden: {reason}"
    else:
        message = f"{qualified(group, resource)} {go_quote(name)} is forbidden: {reason}"
    return StatusError(403, "Forbidden", message, _details(name=name, group=group, kind=resource))


def forbidden_message(
    user: str,
    verb: str,
    *,
    resource: str = "",
    subresource: str = "",
    group: str = "",
    namespace: str = "",
    path: str = "",
) -> str:
    """apiserver `forbiddenMessage` (endpoints/handlers/responsewriters/errors.go)."""
    if not resource:
        return f"User {go_quote(user)} cannot {verb} path {go_quote(path)}"
    full = f"{resource}/{subresource}" if subresource else resource
    if namespace:
        return (
            f"User {go_quote(user)} cannot {verb} resource {go_quote(full)} in API group "
            f"{go_quote(group)} in the namespace {go_quote(namespace)}"
        )
    return (
        f"User {go_quote(user)} cannot {verb} resource {go_quote(full)} in API group "
        f"{go_quote(group)} at the cluster scope"
    )


def new_invalid(group: str, kind: str, name: str, errors: Sequence[FieldError]) -> StatusError:
    """NewInvalid: 422 with one cause per field error, the name shown (quoted) even if empty."""
    causes = [{"reason": e.type, "message": e.body, "field": e.field} for e in errors]
    return StatusError(
        422,
        "Invalid",
        f"{qualified(group, kind)} {go_quote(name)} is invalid: {aggregate(errors)}",
        _details(name=name, group=group, kind=kind, causes=causes),
    )


def internal_error(cause: str, retry_after_seconds: int = 0) -> StatusError:
    return StatusError(
        500,
        "InternalError",
        f"Internal error occurred: {cause}",
        _details(causes=[{"message": cause}], retry_after_seconds=retry_after_seconds),
    )


def unknown_error(code: int, message: str) -> StatusError:
    """A plain Go error returned by a handler: StatusReasonUnknown, so no reason, no details."""
    return StatusError(code, "", message)


def service_unavailable(message: str, retry_after_seconds: int = 0) -> StatusError:
    details = _details(retry_after_seconds=retry_after_seconds) if retry_after_seconds else None
    return StatusError(503, "ServiceUnavailable", message, details)


# NewGenericServerResponse: reason and message for codes without a dedicated constructor.
_GENERIC: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "the server rejected our request for an unknown reason"),
    401: ("Unauthorized", "the server has asked for the client to provide credentials"),
    403: ("Forbidden", "the server does not allow access to the requested resource"),
    404: ("NotFound", "the server could not find the requested resource"),
    405: ("MethodNotAllowed", "the server does not allow this method on the requested resource"),
    406: (
        "NotAcceptable",
        "the server was unable to respond with a content type that the client supports",
    ),
    409: ("Conflict", "the server reported a conflict"),
    410: ("Expired", "the server could not find the requested resource"),
    413: ("RequestEntityTooLarge", "the server has received a request that is too large"),
    415: (
        "UnsupportedMediaType",
        "the server was unable to respond with a content type that the client supports",
    ),
    422: ("Invalid", "the server rejected our request due to an error in our request"),
    429: (
        "TooManyRequests",
        "the server has received too many requests and has asked us to try again later",
    ),
    500: ("InternalError", "an error on the server has prevented the request from succeeding"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: (
        "Timeout",
        "the server was unable to return a response in the time allotted, "
        "but may still be processing the request",
    ),
}


def generic(code: int, message: str | None = None, retry_after_seconds: int = 0) -> StatusError:
    reason, default_message = _GENERIC.get(
        code, ("", f"an error on the server ({code}) has prevented the request from succeeding")
    )
    details = _details(retry_after_seconds=retry_after_seconds) if retry_after_seconds else None
    return StatusError(code, reason, message or default_message, details)


def request_entity_too_large(limit: int) -> StatusError:
    return StatusError(413, "RequestEntityTooLarge", f"Request entity too large: limit is {limit}")


def unsupported_media_type(accepted: Sequence[str]) -> StatusError:
    return StatusError(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: "
        + ", ".join(accepted),
    )


def method_not_allowed() -> StatusError:
    """go-restful's 405 through NewGenericServerResponse (no resource, no name)."""
    return StatusError(405, "MethodNotAllowed", _GENERIC[405][1], {})


# --- JSON as Go writes it -----------------------------------------------------------------

_GO_HTML_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_HTML_RE = re.compile("[<>&\u2028\u2029]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def go_json(obj: Any, *, pretty: bool = False) -> bytes:
    """encoding/json output: compact (or 2-space indented), HTML-escaped, newline-terminated.

    The characters escaped only ever occur inside JSON strings, so a textual substitution
    over the serialized document is exact.
    """
    if pretty:
        text = json.dumps(obj, ensure_ascii=False, indent=2)
    else:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    text = _GO_HTML_RE.sub(lambda m: _GO_HTML_ESCAPES[m.group(0)], text)
    text = _SURROGATE_RE.sub("\ufffd", text)
    return (text + "\n").encode("utf-8")


def warning_header(text: str) -> str:
    """A `Warning` header value as the apiserver writes it: code 299, agent "-"."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 - "{escaped}"'
