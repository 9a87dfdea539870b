"""Conversion between the broker's protobuf messages and the Kubernetes TokenRequest.

The proto mirrors authentication.k8s.io/v1 so that proto3 JSON (camelCase names) of spec and
status equals the Kubernetes JSON: the request body is written as plain JSON values, and the
response is read straight from the API server's bytes into the proto (field by field for the
answers the API server gives, else with json_format), never through the client library's
models.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb

TOKEN_REQUEST_API_VERSION = "authentication.k8s.io/v1"
TOKEN_REQUEST_KIND = "TokenRequest"


class ConversionError(ValueError):
    """The API server's answer is not a TokenRequest. The message never includes the body."""


def token_request_body(token_request: pb.TokenRequest) -> dict[str, Any]:
    """The request body, as JSON values: what the client library's models of it serialize
    to (None values left out). Only spec and metadata.name/namespace are sent; status never."""
    spec = token_request.spec
    metadata: dict[str, Any] = {}
    # The caller's metadata.name/namespace, if any (validated equal to the path's).
    if token_request.metadata.name:
        metadata["name"] = token_request.metadata.name
    if token_request.metadata.namespace:
        metadata["namespace"] = token_request.metadata.namespace
    # [] (not left out) asks for the API server's own audiences.
    body_spec: dict[str, Any] = {"audiences": list(spec.audiences)}
    if spec.HasField("bound_object_ref"):
        ref = spec.bound_object_ref
        bound = {
            key: value
            for key, value in (
                ("apiVersion", ref.api_version),
                ("kind", ref.kind),
                ("name", ref.name),
                ("uid", ref.uid),
            )
            if value
        }
        body_spec["boundObjectRef"] = bound
    # Left out: the server default (3600 s) applies.
    if spec.HasField("expiration_seconds"):
        body_spec["expirationSeconds"] = spec.expiration_seconds
    return {
        "apiVersion": TOKEN_REQUEST_API_VERSION,
        "kind": TOKEN_REQUEST_KIND,
        "metadata": metadata,
        "spec": body_spec,
    }


def token_request_from_json(raw: bytes) -> pb.TokenRequest:
    """Parse the API server's JSON TokenRequest (unknown fields ignored, nulls allowed)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ConversionError("the response body is not JSON") from None
    if not isinstance(data, dict) or data.get("kind", TOKEN_REQUEST_KIND) != TOKEN_REQUEST_KIND:
        raise ConversionError("the response is not a TokenRequest")
    # kind/apiVersion are implied by the message type.
    body = {k: v for k, v in data.items() if k not in ("kind", "apiVersion")}
    out = _read_token_request(body)
    if out is None:
        out = pb.TokenRequest()
        try:
            json_format.ParseDict(body, out, ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, TypeError):
            # ParseError texts quote the offending value, which may be the token.
            raise ConversionError("the response TokenRequest does not parse") from None
    if not out.status.token:
        raise ConversionError("the response TokenRequest has no status.token")
    return out


_TIMESTAMP = "google.protobuf.Timestamp"
_INT64_RANGE = range(-(1 << 63), 1 << 63)


@functools.cache
def _json_fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    return {field.json_name: field for field in descriptor.fields}


def _read_token_request(body: dict[str, Any]) -> pb.TokenRequest | None:
    """`json_format.ParseDict(body, pb.TokenRequest(), ignore_unknown_fields=True)` for the
    answers the API server gives (JSON names, plain strings, ints, lists of strings, objects
    and RFC 3339 timestamps where the message has them), read field by field: the same
    message, without json_format's generic machinery. None for anything else (a proto field
    name as key, a value json_format would convert or refuse): then ParseDict reads it."""
    out = pb.TokenRequest()
    try:
        return out if _read_message(out, body) else None
    except (ValueError, TypeError):
        return None  # json_format words the refusal


def _read_message(message: Message, values: dict[str, Any]) -> bool:
    descriptor = message.DESCRIPTOR
    fields = _json_fields(descriptor)
    for key, value in values.items():
        field = fields.get(key)
        if field is None:
            if key in descriptor.fields_by_name:
                return False  # a proto field name: json_format's to read
            continue  # an unknown field
        if value is None:
            continue  # null: not set
        name = field.name
        if field.is_repeated:
            if field.type != FieldDescriptor.TYPE_STRING or type(value) is not list:
                return False
            if any(type(item) is not str for item in value):
                return False
            getattr(message, name).extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type is not None and field.message_type.full_name == _TIMESTAMP:
                if type(value) is not str:
                    return False
                getattr(message, name).FromJsonString(value)
            else:
                if type(value) is not dict:
                    return False
                child = getattr(message, name)
                child.SetInParent()
                if not _read_message(child, value):
                    return False
        elif field.type == FieldDescriptor.TYPE_STRING:
            if type(value) is not str:
                return False
            setattr(message, name, value)
        elif field.type == FieldDescriptor.TYPE_INT64:
            if type(value) is not int or value not in _INT64_RANGE:
                return False
            setattr(message, name, value)
        else:
            return False
    return True


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
