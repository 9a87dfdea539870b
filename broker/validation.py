"""Validation of CreateToken requests, before anything reaches the Kubernetes API.

Where the API server validates the same thing, the texts are the API server's own
(k8s.io/apimachinery `pkg/util/validation`, `pkg/util/validation/field`,
`pkg/apis/meta/v1/validation`, and the TokenRequest handler), so a caller sees one
vocabulary whether the broker or the API server refused the request. Field paths use the
proto field names (`token_request.spec.audiences[2]`).

All violations are collected, not just the first; the reported set is bounded so the rich
status always fits in gRPC's trailing-metadata limit (8 KiB by default), whatever the input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from broker.errors import BrokerError, FieldViolation
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.reasons import Reason

# Our own limits (the API server has none for audiences).
MAX_AUDIENCES = 32
MAX_AUDIENCE_LENGTH = 1024
# The API server's bounds for spec.expirationSeconds (inclusive).
MIN_EXPIRATION_SECONDS = 600
MAX_EXPIRATION_SECONDS = 1 << 32
# apimachinery metav1 validation.FieldManagerMaxLength.
FIELD_MANAGER_MAX_LENGTH = 128
# Our own bounds for a bound object's reference, beyond which the API server could never find
# the object: an apiVersion is a group (a DNS-1123 subdomain) "/" a version (a DNS-1123
# label); a UID the API server assigns is a 36-character UUID (a longer one can only end in
# 409 Conflict), with room to spare.
MAX_API_VERSION_LENGTH = 253 + 1 + 63
MAX_UID_LENGTH = 128

DRY_RUN_ALL = "All"
FIELD_VALIDATION_VALUES = ("", "Ignore", "Strict", "Warn")  # sorted, as sets.List() prints them
BOUND_OBJECT_KINDS = ("Node", "Pod", "Secret")


# Echoed values are cut here so a huge input cannot blow up the messages.
MAX_ECHO_CHARS = 64
# Budgets (UTF-8 bytes) for what one error carries: the gRPC message travels percent-encoded
# and the details base64-encoded in trailers, which clients cap at 8 KiB by default.
MESSAGE_BUDGET = 1024
DETAILS_BUDGET = 2048

# --- apimachinery pkg/util/validation/validation.go --------------------------------------
DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL_ERR_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character"
)
DNS1123_LABEL_MAX_LENGTH = 63
DNS1123_SUBDOMAIN_FMT = DNS1123_LABEL_FMT + "(\\." + DNS1123_LABEL_FMT + ")*"
DNS1123_SUBDOMAIN_ERR_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character"
)
DNS1123_SUBDOMAIN_MAX_LENGTH = 253

_LABEL_RE = re.compile(DNS1123_LABEL_FMT)
_SUBDOMAIN_RE = re.compile(DNS1123_SUBDOMAIN_FMT)


def max_len_error(length: int) -> str:
    return f"must be no more than {length} characters"


def regex_error(msg: str, fmt: str, *examples: str) -> str:
    # Byte-for-byte the Go RegexError, including its odd "',  or '" spacing.
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    msg += " (e.g. "
    for i, example in enumerate(examples):
        if i > 0:
            msg += " or "
        msg += f"'{example}', "
    return msg + f"regex used for validation is '{fmt}')"


def is_dns1123_label(value: str) -> list[str]:
    errs = []
    # Go's len() counts bytes.
    if len(value.encode()) > DNS1123_LABEL_MAX_LENGTH:
        errs.append(max_len_error(DNS1123_LABEL_MAX_LENGTH))
    if not _LABEL_RE.fullmatch(value):
        if _SUBDOMAIN_RE.fullmatch(value):
            errs.append("must not contain dots")
        else:
            errs.append(regex_error(DNS1123_LABEL_ERR_MSG, DNS1123_LABEL_FMT, "my-name", "123-abc"))
    return errs


def is_dns1123_subdomain(value: str) -> list[str]:
    errs = []
    if len(value.encode()) > DNS1123_SUBDOMAIN_MAX_LENGTH:
        errs.append(max_len_error(DNS1123_SUBDOMAIN_MAX_LENGTH))
    if not _SUBDOMAIN_RE.fullmatch(value):
        errs.append(regex_error(DNS1123_SUBDOMAIN_ERR_MSG, DNS1123_SUBDOMAIN_FMT, "example.com"))
    return errs


# --- apimachinery pkg/util/validation/field/errors.go (ErrorBody) --------------------------


def go_quote(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Go's %q of a string, cut after `limit` characters (the cut is marked after the quote)."""
    cut = len(value) > limit
    shown = value[:limit] if cut else value
    out = ['"']
    for ch in shown:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    if cut:
        out.append(f"... (truncated, {len(value)} characters)")
    return "".join(out)


def invalid(value: str | int, detail: str) -> str:
    shown = str(value) if isinstance(value, int) else go_quote(value)
    return f"Invalid value: {shown}: {detail}"


def not_supported(value: str, supported: Iterable[str]) -> str:
    values = ", ".join(go_quote(v) for v in supported)
    return f"Unsupported value: {go_quote(value)}: supported values: {values}"


def required(detail: str = "") -> str:
    return f"Required value: {detail}" if detail else "Required value"


def too_long(detail: str) -> str:
    return f"Too long: {detail}"


def too_many(actual: int, maximum: int, note: str = "") -> str:
    return f"Too many: {actual}: must have at most {maximum} items{note}"


# --- the request --------------------------------------------------------------------------

_OUR_LIMIT = " (a token-broker limit)"


def validate_create_token(req: pb.CreateTokenRequest) -> None:
    """Raise BrokerError(INVALID_ARGUMENT, REQUEST_INVALID) listing every violation found."""
    violations = list(create_token_violations(req))
    if violations:
        raise invalid_request_error("CreateTokenRequest is invalid", violations)


def create_token_violations(req: pb.CreateTokenRequest) -> Iterable[FieldViolation]:
    yield from _name_violations("namespace", req.namespace, is_dns1123_label)
    yield from _name_violations("service_account", req.service_account, is_dns1123_subdomain)

    tr = req.token_request
    meta = tr.metadata
    if meta.name and meta.name != req.service_account:
        # TokenRequest handler, rule 1.
        yield _v(
            "token_request.metadata.name",
            invalid(meta.name, "must match the service account name if specified"),
        )
    if meta.namespace and meta.namespace != req.namespace:
        # Generic create handler (rest.go): a 400 there, a field violation here.
        yield _v(
            "token_request.metadata.namespace",
            invalid(
                meta.namespace,
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            ),
        )

    yield from _spec_violations(tr.spec)
    yield from _options_violations(req)


def _name_violations(
    path: str, value: str, check: Callable[[str], list[str]]
) -> list[FieldViolation]:
    if not value:
        return [_v(path, required(), "FieldValueRequired")]
    return [_v(path, invalid(value, msg)) for msg in check(value)]


def _spec_violations(spec: pb.TokenRequestSpec) -> Iterable[FieldViolation]:
    base = "token_request.spec"
    audiences = spec.audiences
    if len(audiences) > MAX_AUDIENCES:
        yield _v(
            f"{base}.audiences",
            too_many(len(audiences), MAX_AUDIENCES, _OUR_LIMIT),
            "FieldValueTooMany",
        )
    for i, audience in enumerate(audiences):
        path = f"{base}.audiences[{i}]"
        if not audience:
            yield _v(path, required("an audience must be non-empty"), "FieldValueRequired")
        elif len(audience) > MAX_AUDIENCE_LENGTH:
            yield _v(
                path,
                too_long(f"may not be longer than {MAX_AUDIENCE_LENGTH} characters{_OUR_LIMIT}"),
                "FieldValueTooLong",
            )

    if spec.HasField("expiration_seconds"):
        seconds = spec.expiration_seconds
        path = f"{base}.expiration_seconds"
        # pkg/apis/authentication/validation: ValidateTokenRequest.
        if seconds < MIN_EXPIRATION_SECONDS:
            yield _v(path, invalid(seconds, "may not specify a duration less than 10 minutes"))
        if seconds > MAX_EXPIRATION_SECONDS:
            yield _v(path, invalid(seconds, "may not specify a duration larger than 2^32 seconds"))

    if spec.HasField("bound_object_ref"):
        yield from _bound_object_violations(spec.bound_object_ref, f"{base}.bound_object_ref")


def _cut(value: str) -> str:
    # An unquoted echo (inside an API-server text), bounded like go_quote's.
    return value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + "..."


def _gvk_string(api_version: str, kind: str) -> str:
    # schema.FromAPIVersionAndKind(...).String(): "group/version, Kind=kind".
    group, _, version = api_version.rpartition("/")
    return f"{group}/{version}, Kind={kind}"


def _bound_object_violations(ref: pb.BoundObjectReference, base: str) -> Iterable[FieldViolation]:
    for path, value, limit in (
        ("api_version", ref.api_version, MAX_API_VERSION_LENGTH),
        ("uid", ref.uid, MAX_UID_LENGTH),
    ):
        if len(value.encode()) > limit:
            yield _v(
                f"{base}.{path}",
                too_long(f"may not be longer than {limit} bytes{_OUR_LIMIT}"),
                "FieldValueTooLong",
            )
    group = ref.api_version.rpartition("/")[0]
    kind_ok = ref.kind in BOUND_OBJECT_KINDS
    if not ref.kind:
        yield _v(f"{base}.kind", required(), "FieldValueRequired")
    elif not kind_ok:
        # The TokenRequest handler's 400 text (rule 6g).
        yield _v(
            f"{base}.kind",
            "cannot bind token to object of type "
            + _gvk_string(_cut(ref.api_version), _cut(ref.kind)),
            "FieldValueNotSupported",
        )
    elif group:
        # The API server only checks the group of a Pod/Secret/Node reference, and says this.
        yield _v(
            f"{base}.api_version",
            "cannot bind token to object of type " + _gvk_string(_cut(ref.api_version), ref.kind),
            "FieldValueNotSupported",
        )
    if not ref.name:
        yield _v(f"{base}.name", required(), "FieldValueRequired")
    else:
        # Pods, Secrets and Nodes all have DNS-1123 subdomain names; anything else is a 404.
        for msg in is_dns1123_subdomain(ref.name):
            yield _v(f"{base}.name", invalid(ref.name, msg))


def _options_violations(req: pb.CreateTokenRequest) -> Iterable[FieldViolation]:
    # apimachinery metav1 validation: ValidateCreateOptions.
    for i, value in enumerate(req.dry_run):
        if value != DRY_RUN_ALL:
            yield _v(
                f"dry_run[{i}]", not_supported(value, (DRY_RUN_ALL,)), "FieldValueNotSupported"
            )
    if req.field_validation not in FIELD_VALIDATION_VALUES:
        yield _v(
            "field_validation",
            not_supported(req.field_validation, FIELD_VALIDATION_VALUES),
            "FieldValueNotSupported",
        )
    manager = req.field_manager
    if len(manager.encode()) > FIELD_MANAGER_MAX_LENGTH:
        yield _v(
            "field_manager",
            too_long(f"must have at most {FIELD_MANAGER_MAX_LENGTH} bytes"),
            "FieldValueTooLong",
        )
    else:
        position = 0
        for ch in manager:
            if not ch.isprintable():
                yield _v(
                    "field_manager",
                    invalid(manager, f"invalid character U+{ord(ch):04X} (at position {position})"),
                )
            position += len(ch.encode())


def _v(path: str, description: str, reason: str = "FieldValueInvalid") -> FieldViolation:
    # reason: the apimachinery CauseType, as the API server puts in Status causes.
    return FieldViolation(field=path, description=description, reason=reason)


# --- bounded errors -----------------------------------------------------------------------


def fit_violations(
    violations: Sequence[FieldViolation], budget: int = DETAILS_BUDGET
) -> tuple[list[FieldViolation], int]:
    """The violations that fit the byte budget, in order, and how many were left out."""
    kept: list[FieldViolation] = []
    used = 0
    for v in violations:
        description = truncate_utf8(v.description, 512)
        cost = len(v.field.encode()) + len(description.encode()) + len(v.reason) + 8
        if used + cost > budget:
            break
        used += cost
        kept.append(
            FieldViolation(
                field=truncate_utf8(v.field, 256), description=description, reason=v.reason
            )
        )
    return kept, len(violations) - len(kept)


def truncate_utf8(text: str, limit: int) -> str:
    """Cut text to at most `limit` UTF-8 bytes, marking the cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    marker = "... (truncated)"
    return raw[: max(0, limit - len(marker))].decode(errors="ignore") + marker


def invalid_request_error(prefix: str, violations: Sequence[FieldViolation]) -> BrokerError:
    """INVALID_ARGUMENT listing the violations, as apimachinery's NewInvalid words it."""
    kept, _ = fit_violations(violations)
    # The message lists what fits its own budget; the details carry the rest.
    texts: list[str] = []
    used = len(prefix) + 64
    for v in kept:
        text = f"{v.field}: {v.description}"
        if texts and used + len(text.encode()) > MESSAGE_BUDGET:
            break
        texts.append(truncate_utf8(text, MESSAGE_BUDGET - used))
        used += len(text.encode()) + 2
    omitted = len(violations) - len(texts)
    if len(texts) == 1 and not omitted:
        message = f"{prefix}: {texts[0]}"
    else:
        message = f"{prefix}: [{', '.join(texts)}]"
    if omitted:
        message += f" (and {omitted} more)"
    return BrokerError.of(
        Reason.REQUEST_INVALID,
        message,
        metadata={"violations": str(len(violations))},
        field_violations=kept,
    )
