"""The Kubernetes protobuf envelope: `k8s\\x00` + a `runtime.Unknown` message.

`runtime.Unknown` (apimachinery pkg/runtime/generated.proto) is declared here from a
hand-built descriptor, so the real protobuf runtime parses it. Its `raw` bytes are the object
itself; a TokenRequest decodes with the project's generated `pb.TokenRequest`, whose field
numbers are the upstream ones.
"""

from __future__ import annotations

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
