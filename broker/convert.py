"""Conversion between the broker's protobuf messages and the Kubernetes TokenRequest.

The proto mirrors authentication.k8s.io/v1 so that proto3 JSON (camelCase names) of spec and
status equals the Kubernetes JSON: the response is parsed straight from the API server's bytes
with json_format, rather than through the client library's models.
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf import json_format
from kubernetes.aio import client as kclient

from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb

TOKEN_REQUEST_API_VERSION = "authentication.k8s.io/v1"
TOKEN_REQUEST_KIND = "TokenRequest"


class ConversionError(ValueError):
    """The API server's answer is not a TokenRequest. The message never includes the body."""


def to_kubernetes_body(
    token_request: pb.TokenRequest,
) -> Any:  # kclient.AuthenticationV1TokenRequest (the library is untyped)
    """The request body. Only spec and metadata.name/namespace are sent; status never."""
    spec = token_request.spec
    bound = None
    if spec.HasField("bound_object_ref"):
        ref = spec.bound_object_ref
        bound = kclient.V1BoundObjectReference(
            kind=ref.kind or None,
            api_version=ref.api_version or None,
            name=ref.name or None,
            uid=ref.uid or None,
        )
    return kclient.AuthenticationV1TokenRequest(
        api_version=TOKEN_REQUEST_API_VERSION,
        kind=TOKEN_REQUEST_KIND,
        # The caller's metadata.name/namespace, if any (validated equal to the path's).
        metadata=kclient.V1ObjectMeta(
            name=token_request.metadata.name or None,
            namespace=token_request.metadata.namespace or None,
        ),
        spec=kclient.V1TokenRequestSpec(
            # [] (not None) asks for the API server's own audiences.
            audiences=list(spec.audiences),
            # None is left out of the JSON: the server default (3600 s) applies.
            expiration_seconds=(
                spec.expiration_seconds if spec.HasField("expiration_seconds") else None
            ),
            bound_object_ref=bound,
        ),
    )


def token_request_from_json(raw: bytes) -> pb.TokenRequest:
    """Parse the API server's JSON TokenRequest (unknown fields ignored, nulls allowed)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ConversionError("the response body is not JSON") from None
    if not isinstance(data, dict) or data.get("kind", TOKEN_REQUEST_KIND) != TOKEN_REQUEST_KIND:
        raise ConversionError("the response is not a TokenRequest")
    out = pb.TokenRequest()
    # kind/apiVersion are implied by the message type.
    body = {k: v for k, v in data.items() if k not in ("kind", "apiVersion")}
    try:
        json_format.ParseDict(body, out, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError):
        # ParseError texts quote the offending value, which may be the token.
        raise ConversionError("the response TokenRequest does not parse") from None
    if not out.status.token:
        raise ConversionError("the response TokenRequest has no status.token")
    return out


def to_kubernetes_json(message: pb.TokenRequest | pb.TokenRequestSpec) -> dict[str, Any]:
    """proto3 JSON with camelCase names: the Kubernetes JSON shape of spec and status."""
    return json_format.MessageToDict(message)


_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])([A-Z])")


def camel_to_snake(name: str) -> str:
    # "expirationSeconds" -> "expiration_seconds", "boundObjectRef" -> "bound_object_ref".
    return _CAMEL_BOUNDARY.sub(r"_\1", name).lower()


def kubernetes_field_to_proto(path: str, *, options: bool = False) -> str:
    """A Status cause field ("spec.expirationSeconds") as a request field path.

    "spec.audiences[2]" -> "token_request.spec.audiences[2]"; CreateOptions fields
    ("dryRun") -> "dry_run". Index and key suffixes are kept as they are.
    """
    if not path:
        return "token_request" if not options else ""
    segments = []
    for segment in path.split("."):
        match = re.fullmatch(r"([A-Za-z0-9_]+)(.*)", segment)
        if match is None:
            segments.append(segment)
            continue
        head, rest = match.groups()
        if head == "uID":  # BoundObjectReference's Go/proto name of JSON "uid"
            head = "uid"
        segments.append(camel_to_snake(head) + rest)
    converted = ".".join(segments)
    # CreateOptions fields are query parameters: top-level fields of the request.
    return converted if options else "token_request." + converted
