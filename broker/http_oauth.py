"""The OAuth 2.0 Token Exchange door (RFC 8693): `POST /oauth2/token`, form-encoded, on the
broker's request path (broker.request_path).

    grant_type=urn:ietf:params:oauth:grant-type:token-exchange
    subject_token=<a JWT of a configured issuer>
    subject_token_type=urn:ietf:params:oauth:token-type:jwt   (or ...:id_token)
    resource=system:serviceaccount:<namespace>:<name>
    audience=<aud>            (repeatable; none: the policy's default audiences)
    expiration_seconds=<n>    (optional; an extension parameter, RFC 6749 §8.2)

The subject token IS the caller's credential: it is verified exactly as a bearer JWT on gRPC
(its issuer's identity claim is the caller, its claims go to the policy), and only as a JWT
(`Credentials.jwt_only`). An API key is not a subject token (see docs/http-door.md), and
there is no client authentication besides it: an `Authorization` header or client certificate
on this door is not looked at. `actor_token` (delegation) is not supported.

The answer: `{access_token, issued_token_type: ...:token-type:jwt, token_type: "N_A",
expires_in}` (RFC 8693 §2.2.1: the token is not an OAuth access token, so "N_A"); refusals are
RFC 6749 §5.2 JSON (`error`, `error_description`) with the statuses of broker.http_errors.
Every answer carries `Cache-Control: no-store` and `Pragma: no-cache`.

A form that is not a valid exchange request is the call's `TokenCall.refusal`: answered after
the subject token authenticated (a caller whose token does not verify learns only that).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.parse
from typing import Any

from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.http_errors import answer_for
from broker.reasons import Reason
from broker.validation import MAX_EXPIRATION_SECONDS

ROUTE = "/oauth2/token"
FORM = "application/x-www-form-urlencoded"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
SUBJECT_TOKEN_TYPES = (TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN)
RESOURCE_PREFIX = "system:serviceaccount:"
EXPIRATION_PARAMETER = "expiration_seconds"
# Parameters that may appear once at most (RFC 6749 §3.2); `audience` may repeat.
_SINGLE = (
    "grant_type",
    "subject_token",
    "subject_token_type",
    "requested_token_type",
    "resource",
    "scope",
    "actor_token",
    "actor_token_type",
    EXPIRATION_PARAMETER,
)
MAX_FIELDS = 64
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclasses.dataclass
class OAuthRefusal(BrokerError):
    """A request the door refuses before the request path decides (its ErrorInfo reason,
    for the audit line, is REQUEST_MALFORMED); answered with this OAuth error."""

    oauth_error: str = "invalid_request"


def _refuse(error: str, description: str) -> OAuthRefusal:
    return OAuthRefusal.of(Reason.REQUEST_MALFORMED, description, oauth_error=error)


class ExchangeForm:
    """The parsed form: the subject token (the credential) and the request, or the refusal
    to answer once the subject token authenticated."""

    __slots__ = ("refusal", "request", "subject_token")

    def __init__(
        self, subject_token: str | None, request: bytes, refusal: OAuthRefusal | None
    ) -> None:
        self.subject_token = subject_token
        self.request = request
        self.refusal = refusal

    def __repr__(self) -> str:
        return f"ExchangeForm(refusal={self.refusal!r}, subject_token=<redacted>)"


def parse_form(content_type: str, body: bytes) -> ExchangeForm:
    """The exchange request of a form body; never raises (a refusal is `ExchangeForm.refusal`)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != FORM:
        return ExchangeForm(
            None, b"", _refuse("invalid_request", f"the request body must be {FORM}")
        )
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError):
        return ExchangeForm(
            None, b"", _refuse("invalid_request", "the request body is not a valid form")
        )
    params: dict[str, list[str]] = {}
    for key, value in pairs:
        params.setdefault(key, []).append(value)
    tokens = params.get("subject_token", [])
    subject_token = tokens[0] if len(tokens) == 1 and tokens[0] else None
    try:
        request = _exchange_request(params)
    except OAuthRefusal as refusal:
        return ExchangeForm(subject_token, b"", refusal)
    return ExchangeForm(subject_token, request.SerializeToString(), None)


def _one(params: dict[str, list[str]], name: str, *, required: bool = False) -> str | None:
    values = params.get(name)
    if not values:
        if required:
            raise _refuse("invalid_request", f"missing parameter {name}")
        return None
    if len(values) > 1:
        raise _refuse("invalid_request", f"parameter {name} is repeated")
    return values[0]


def _exchange_request(params: dict[str, list[str]]) -> pb.CreateTokenRequest:
    for name in _SINGLE:
        _one(params, name)  # repeated parameters first: each is refused whatever its value
    grant_type = _one(params, "grant_type", required=True)
    if grant_type != GRANT_TYPE:
        raise _refuse("unsupported_grant_type", f"grant_type must be {GRANT_TYPE}")
    _one(params, "subject_token", required=True)
    token_type = _one(params, "subject_token_type", required=True)
    if token_type not in SUBJECT_TOKEN_TYPES:
        raise _refuse(
            "invalid_request",
            "subject_token_type must be "
            + " or ".join(SUBJECT_TOKEN_TYPES)
            + " (API keys are not subject tokens: use the Kubernetes door or gRPC)",
        )
    if params.get("actor_token") or params.get("actor_token_type"):
        raise _refuse("invalid_request", "actor_token (delegation) is not supported")
    requested = _one(params, "requested_token_type")
    if requested not in (None, TOKEN_TYPE_JWT):
        raise _refuse("invalid_request", f"requested_token_type must be {TOKEN_TYPE_JWT}")
    if _one(params, "scope"):
        raise _refuse(
            "invalid_scope", "scopes are not granted: name the service account as resource"
        )
    resource = _one(params, "resource")
    if resource is None:
        raise _refuse(
            "invalid_target",
            f"missing parameter resource ({RESOURCE_PREFIX}<namespace>:<name>)",
        )
    namespace, name = _service_account(resource)
    spec = pb.TokenRequestSpec(audiences=params.get("audience", []))
    expiration = _one(params, EXPIRATION_PARAMETER)
    if expiration is not None:
        if not re.fullmatch(r"[0-9]{1,11}", expiration) or int(expiration) > MAX_EXPIRATION_SECONDS:
            raise _refuse(
                "invalid_request",
                f"{EXPIRATION_PARAMETER} must be a number of seconds (600 to 2^32)",
            )
        spec.expiration_seconds = int(expiration)
    return pb.CreateTokenRequest(
        namespace=namespace, service_account=name, token_request=pb.TokenRequest(spec=spec)
    )


def _service_account(resource: str) -> tuple[str, str]:
    if resource.startswith(RESOURCE_PREFIX):
        namespace, sep, name = resource[len(RESOURCE_PREFIX) :].partition(":")
        if sep and namespace and name and ":" not in name:
            return namespace, name
    raise _refuse(
        "invalid_target",
        f"resource must name a service account as {RESOURCE_PREFIX}<namespace>:<name>",
    )


def token_answer(response: pb.CreateTokenResponse, now: float | None = None) -> bytes:
    """RFC 8693 §2.2.1's answer."""
    status = response.token_request.status
    now = time.time() if now is None else now
    expires_in = max(0, int(status.expiration_timestamp.seconds - now))
    return json.dumps(
        {
            "access_token": status.token,
            "issued_token_type": TOKEN_TYPE_JWT,
            "token_type": "N_A",
            "expires_in": expires_in,
        },
        separators=(",", ":"),
    ).encode()


def error_answer(error: BrokerError) -> tuple[int, bytes]:
    """The HTTP status and RFC 6749 §5.2 body of a refusal."""
    if isinstance(error, OAuthRefusal):
        status, code = 400, error.oauth_error
    else:
        answer = answer_for(error)
        status, code = answer.oauth_status, answer.oauth_error
    body: dict[str, Any] = {"error": code, "error_description": _description(error.message)}
    return status, json.dumps(body, separators=(",", ":")).encode()


def method_not_allowed() -> bytes:
    return json.dumps(
        {"error": "invalid_request", "error_description": f"use POST on {ROUTE}"},
        separators=(",", ":"),
    ).encode()


def _description(message: str) -> str:
    # RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E.
    return "".join(_DESCRIPTION_CHAR.get(ch, ch) if " " <= ch <= "~" else "?" for ch in message)


_DESCRIPTION_CHAR = {'"': "'", "\\": "/"}
