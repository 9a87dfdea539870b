"""The Kubernetes protobuf envelope: `k8s\\x00` + a `runtime.Unknown` message.

`runtime.Unknown` (apimachinery pkg/runtime/generated.proto) is declared here from a
hand-built descriptor, so the real protobuf runtime parses it. Its `raw` bytes are the object
itself; a TokenRequest decodes with the project's generated `pb.TokenRequest`, whose field
numbers are the upstream ones.

`metav1.Status` (apimachinery pkg/apis/meta/v1/generated.proto: Status, StatusDetails,
StatusCause, ListMeta) is declared the same way, for the Status bodies kube-apiserver writes in
protobuf when the client prefers it. Its Go marshaller (gogo-generated) writes every
non-pointer field, empty or zero included, in field-number order; only `details` (a pointer)
and `ListMeta.remainingItemCount` are left out when unset. `encode_status` sets the fields so
that the Python runtime writes the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

MAGIC = b"k8s\x00"
PROTOBUF_MEDIA_TYPE = "application/vnd.kubernetes.protobuf"

_PACKAGE = "k8s.io.apimachinery.pkg.runtime"


def _unknown_class() -> Any:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="k8s.io/apimachinery/pkg/runtime/generated.proto", package=_PACKAGE, syntax="proto2"
    )
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    type_meta = fdp.message_type.add(name="TypeMeta")
    type_meta.field.add(name="apiVersion", number=1, type=string, label=optional)
    type_meta.field.add(name="kind", number=2, type=string, label=optional)
    unknown = fdp.message_type.add(name="Unknown")
    unknown.field.add(
        name="typeMeta",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        type_name=f".{_PACKAGE}.TypeMeta",
        label=optional,
    )
    unknown.field.add(
        name="raw", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES, label=optional
    )
    unknown.field.add(name="contentEncoding", number=3, type=string, label=optional)
    unknown.field.add(name="contentType", number=4, type=string, label=optional)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Unknown"))


_Unknown = _unknown_class()

_META_PACKAGE = "k8s.io.apimachinery.pkg.apis.meta.v1"


def _status_class() -> Any:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto",
        package=_META_PACKAGE,
        syntax="proto2",
    )
    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED
    string, int32, int64 = field.TYPE_STRING, field.TYPE_INT32, field.TYPE_INT64
    message = field.TYPE_MESSAGE
    list_meta = fdp.message_type.add(name="ListMeta")
    list_meta.field.add(name="selfLink", number=1, type=string, label=optional)
    list_meta.field.add(name="resourceVersion", number=2, type=string, label=optional)
    list_meta.field.add(name="continue", number=3, type=string, label=optional)
    list_meta.field.add(name="remainingItemCount", number=4, type=int64, label=optional)
    cause = fdp.message_type.add(name="StatusCause")
    cause.field.add(name="reason", number=1, type=string, label=optional)
    cause.field.add(name="message", number=2, type=string, label=optional)
    cause.field.add(name="field", number=3, type=string, label=optional)
    details = fdp.message_type.add(name="StatusDetails")
    details.field.add(name="name", number=1, type=string, label=optional)
    details.field.add(name="group", number=2, type=string, label=optional)
    details.field.add(name="kind", number=3, type=string, label=optional)
    details.field.add(
        name="causes",
        number=4,
        type=message,
        type_name=f".{_META_PACKAGE}.StatusCause",
        label=repeated,
    )
    details.field.add(name="retryAfterSeconds", number=5, type=int32, label=optional)
    details.field.add(name="uid", number=6, type=string, label=optional)
    status = fdp.message_type.add(name="Status")
    status.field.add(
        name="metadata",
        number=1,
        type=message,
        type_name=f".{_META_PACKAGE}.ListMeta",
        label=optional,
    )
    status.field.add(name="status", number=2, type=string, label=optional)
    status.field.add(name="message", number=3, type=string, label=optional)
    status.field.add(name="reason", number=4, type=string, label=optional)
    status.field.add(
        name="details",
        number=5,
        type=message,
        type_name=f".{_META_PACKAGE}.StatusDetails",
        label=optional,
    )
    status.field.add(name="code", number=6, type=int32, label=optional)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_META_PACKAGE}.Status"))


_Status = _status_class()
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: object) -> str:
    """A string as Go holds it: valid UTF-8 (a lone surrogate is U+FFFD, as encoding/json
    and the JSON Status bodies write it)."""
    return _SURROGATE.sub("\ufffd", str(value or ""))


def encode_status(body: Mapping[str, Any]) -> bytes:
    """A Status (the JSON object broker.apiserver.status writes) as its protobuf message, the
    bytes Go's marshaller writes for the same Status."""
    message = _Status()
    metadata = message.metadata
    metadata.selfLink = ""
    metadata.resourceVersion = ""
    setattr(metadata, "continue", "")  # a Python keyword
    message.status = _text(body.get("status"))
    message.message = _text(body.get("message"))
    message.reason = _text(body.get("reason"))
    details = body.get("details")
    if details is not None:
        out = message.details
        out.name = _text(details.get("name"))
        out.group = _text(details.get("group"))
        out.kind = _text(details.get("kind"))
        for cause in details.get("causes") or ():
            added = out.causes.add()
            added.reason = _text(cause.get("reason"))
            added.message = _text(cause.get("message"))
            added.field = _text(cause.get("field"))
        out.retryAfterSeconds = int(details.get("retryAfterSeconds") or 0)
        out.uid = _text(details.get("uid"))
    message.code = int(body.get("code") or 0)
    data: bytes = message.SerializeToString()
    return data


class WireError(ValueError):
    """The bytes are not a Kubernetes protobuf envelope; the message is Go's wording."""


@dataclass(frozen=True)
class Envelope:
    api_version: str
    kind: str
    raw: bytes
    content_encoding: str = ""
    content_type: str = ""


def decode_envelope(data: bytes) -> Envelope:
    if not data.startswith(MAGIC):
        raise WireError(
            "provided data does not appear to be a protobuf message, expected prefix [107 56 115 0]"
        )
    message = _Unknown()
    try:
        message.ParseFromString(data[len(MAGIC) :])
    except DecodeError as err:
        raise WireError("unexpected EOF") from err
    return Envelope(
        api_version=message.typeMeta.apiVersion,
        kind=message.typeMeta.kind,
        raw=bytes(message.raw),
        content_encoding=message.contentEncoding,
        content_type=message.contentType,
    )


def encode_envelope(raw: bytes, api_version: str, kind: str) -> bytes:
    """Wrap an object's protobuf bytes as Kubernetes clients send them."""
    message = _Unknown()
    message.typeMeta.apiVersion = api_version
    message.typeMeta.kind = kind
    message.raw = raw
    # client-go writes the (empty) contentEncoding and contentType fields too.
    message.contentEncoding = ""
    message.contentType = ""
    payload: bytes = message.SerializeToString()
    return MAGIC + payload
