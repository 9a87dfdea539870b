"""Decoding a TokenRequest body the way the apiserver's serializers do.

JSON follows `sigs.k8s.io/json` (case-sensitive, typed, strict-mode unknown and duplicate
fields), YAML is converted to JSON first, and protobuf is the `k8s\\x00` envelope around the
upstream TokenRequest message. Failures carry the apiserver's `transformDecodeError` wording.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml

from broker.apiserver import wire
from broker.apiserver.status import go_quote
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb

GROUP = "authentication.k8s.io"
VERSION = "v1"
KIND = "TokenRequest"
GROUP_VERSION = f"{GROUP}/{VERSION}"
SCHEME = "pkg/api/legacyscheme/scheme.go:30"
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class DecodeFailure(ValueError):
    """The body cannot be decoded: a 400 BadRequest with this message."""


# --- the decoded request ------------------------------------------------------------------


@dataclass(frozen=True)
class BoundRef:
    kind: str = ""
    api_version: str = ""
    name: str = ""
    uid: str = ""

    def to_json(self) -> dict[str, str]:
        """BoundObjectReference JSON: every member omitempty."""
        out: dict[str, str] = {}
        for key, value in (
            ("kind", self.kind),
            ("apiVersion", self.api_version),
            ("name", self.name),
            ("uid", self.uid),
        ):
            if value:
                out[key] = value
        return out


@dataclass
class DecodedTokenRequest:
    group: str
    version: str
    metadata: dict[str, Any]  # known ObjectMeta members, zero values left out
    audiences: list[str]
    expiration_seconds: int | None
    bound: BoundRef | None
    strict_errors: list[str] = field(default_factory=list)  # unknown / duplicate fields

    @property
    def group_version(self) -> str:
        """GroupVersion.String()."""
        return f"{self.group}/{self.version}" if self.group else self.version


# --- helpers ------------------------------------------------------------------------------


def parse_group_version(text: str) -> tuple[str, str]:
    """schema.ParseGroupVersion; raises DecodeFailure-worthy ValueError for a/b/c."""
    if not text or text == "/":
        return "", ""
    slashes = text.count("/")
    if slashes == 0:
        return "", text
    if slashes == 1:
        group, _, version = text.partition("/")
        return group, version
    raise ValueError(f"unexpected GroupVersion string: {text}")


def summarize(data: bytes, limit: int = 30) -> str:
    """apiserver summarizeData: the body's start, as text for `{...`, else as hex."""
    if not data:
        return "<empty>"
    if data[:1] == b"{":
        text = data[:limit].decode("utf-8", errors="replace")
        return text + " ..." if len(data) > limit else text
    return data[:limit].hex() + (" ..." if len(data) > limit else "")


def unrecognized(reason: str, data: bytes) -> DecodeFailure:
    return DecodeFailure(
        f"the object provided is unrecognized (must be of type {KIND}): "
        f"{reason} ({summarize(data)})"
    )


def cannot_handle(kind: str, version: str, reason: str) -> DecodeFailure:
    return DecodeFailure(
        f"{kind} in version {go_quote(version)} cannot be handled as a {KIND}: {reason}"
    )


def _defaults(group: str, version: str, kind: str) -> tuple[str, str, str]:
    """gvkWithDefaults against authentication.k8s.io/v1, Kind=TokenRequest."""
    kind = kind or KIND
    if not version and not group:
        group, version = GROUP, VERSION
    if not version and group == GROUP:
        version = VERSION
    return group, version, kind


def _check_kind(group: str, version: str, kind: str) -> None:
    if kind != KIND:
        gv = f"{group}/{version}" if group else version
        raise cannot_handle(
            kind,
            version,
            f"no kind {go_quote(kind)} is registered for version {go_quote(gv)} in scheme "
            f"{go_quote(SCHEME)}",
        )


# --- JSON ---------------------------------------------------------------------------------


class _Object(list[tuple[str, Any]]):
    """A JSON object as its member list, so that duplicate members can be seen."""


@dataclass(frozen=True)
class _Float:
    """A JSON number that is not an integer literal; its text is kept for error messages."""

    text: str


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (Python's parser accepts them; Go's does not)."""
    raise ValueError(f"invalid character '{name.lstrip('-')[0]}' looking for beginning of value")


def plain(value: Any) -> Any:
    """Parsed JSON back to ordinary Python values (last duplicate member wins)."""
    if isinstance(value, _Object):
        return {k: plain(v) for k, v in value}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, _Float):
        return float(value.text)
    return value


def _go_json_error(err: json.JSONDecodeError) -> str:
    """encoding/json's syntax error text for the same position (close, not always exact)."""
    doc, pos = err.doc, err.pos
    if pos >= len(doc) or not doc.strip():
        return "unexpected end of JSON input"
    char = doc[pos]
    shown = "'" + (char if char.isprintable() and char != "'" else go_quote(char)[1:-1]) + "'"
    context = {
        "Expecting value": "looking for beginning of value",
        "Expecting ',' delimiter": "after object key:value pair",
        "Expecting ':' delimiter": "after object key",
        "Expecting property name enclosed in double quotes": (
            "looking for beginning of object key string"
        ),
        "Extra data": "after top-level value",
    }.get(err.msg, "in string literal")
    return f"invalid character {shown} {context}"


def _parse_json(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise unrecognized(
            "couldn't get version/kind; json parse error: invalid character looking for "
            "beginning of value",
            data,
        ) from err
    try:
        return json.loads(
            text,
            object_pairs_hook=_Object,
            parse_float=_Float,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as err:
        reason = f"couldn't get version/kind; json parse error: {_go_json_error(err)}"
        raise unrecognized(reason, data) from err
    except ValueError as err:
        raise unrecognized(f"couldn't get version/kind; json parse error: {err}", data) from err


def _json_type(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, _Float)):
        return "number"
    if isinstance(value, _Object):
        return "object"
    return "array"


# Schemas: ("string"|"int64"|"bool"|"time"|"any"), _List, _Map or _Struct.
@dataclass(frozen=True)
class _List:
    elem: Any
    type_name: str


@dataclass(frozen=True)
class _Map:
    elem: Any
    type_name: str


@dataclass(frozen=True)
class _Struct:
    go_name: str  # for "Go struct field <go_name>.<path>"
    type_name: str  # for "of type <type_name>"
    fields: dict[str, Any]


_STRINGS = _List("string", "[]string")
_OWNER_REFERENCE = _Struct(
    "OwnerReference",
    "v1.OwnerReference",
    {
        "apiVersion": "string",
        "kind": "string",
        "name": "string",
        "uid": "string",
        "controller": "bool",
        "blockOwnerDeletion": "bool",
    },
)
_MANAGED_FIELDS_ENTRY = _Struct(
    "ManagedFieldsEntry",
    "v1.ManagedFieldsEntry",
    {
        "manager": "string",
        "operation": "string",
        "apiVersion": "string",
        "time": "time",
        "fieldsType": "string",
        "fieldsV1": "any",
        "subresource": "string",
    },
)
_OBJECT_META = _Struct(
    "ObjectMeta",
    "v1.ObjectMeta",
    {
        "name": "string",
        "generateName": "string",
        "namespace": "string",
        "selfLink": "string",
        "uid": "string",
        "resourceVersion": "string",
        "generation": "int64",
        "creationTimestamp": "time",
        "deletionTimestamp": "time",
        "deletionGracePeriodSeconds": "int64",
        "labels": _Map("string", "map[string]string"),
        "annotations": _Map("string", "map[string]string"),
        "ownerReferences": _List(_OWNER_REFERENCE, "[]v1.OwnerReference"),
        "finalizers": _STRINGS,
        "managedFields": _List(_MANAGED_FIELDS_ENTRY, "[]v1.ManagedFieldsEntry"),
    },
)
_BOUND_OBJECT_REFERENCE = _Struct(
    "BoundObjectReference",
    "v1.BoundObjectReference",
    {"kind": "string", "apiVersion": "string", "name": "string", "uid": "string"},
)
_TOKEN_REQUEST = _Struct(
    "TokenRequest",
    "v1.TokenRequest",
    {
        "kind": "string",
        "apiVersion": "string",
        "metadata": _OBJECT_META,
        "spec": _Struct(
            "TokenRequestSpec",
            "v1.TokenRequestSpec",
            {
                "audiences": _STRINGS,
                "expirationSeconds": "int64",
                "boundObjectRef": _BOUND_OBJECT_REFERENCE,
            },
        ),
        "status": _Struct(
            "TokenRequestStatus",
            "v1.TokenRequestStatus",
            {"token": "string", "expirationTimestamp": "time"},
        ),
    },
)


class _Decoder:
    """Walks parsed JSON against a schema; keeps the first type error and all strict errors."""

    def __init__(self) -> None:
        self.type_error: str | None = None
        self.strict: list[str] = []

    def _type_error(self, value: Any, struct: str, path: str, type_name: str) -> None:
        if self.type_error is None:
            shown = _json_type(value)
            if isinstance(value, _Float):
                shown = f"number {value.text}"
            elif isinstance(value, int) and not isinstance(value, bool) and type_name == "int64":
                shown = f"number {value}"
            self.type_error = (
                f"json: cannot unmarshal {shown} into Go struct field {struct}.{path} "
                f"of type {type_name}"
            )

    def decode(self, value: Any, schema: Any, struct: str, path: str) -> Any:
        if value is None:
            return None  # null leaves the Go value at its zero
        if schema == "any":
            return plain(value)
        if schema == "string":
            if isinstance(value, str):
                return value
            return self._type_error(value, struct, path, "string")
        if schema == "bool":
            if isinstance(value, bool):
                return value
            return self._type_error(value, struct, path, "bool")
        if schema == "int64":
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if is_int and _INT64_MIN <= value <= _INT64_MAX:
                return value
            return self._type_error(value, struct, path, "int64")
        if schema == "time":
            return self._time(value)
        if isinstance(schema, _List):
            if not isinstance(value, list) or isinstance(value, _Object):
                return self._type_error(value, struct, path, schema.type_name)
            return [self.decode(v, schema.elem, struct, path) for v in value]
        if isinstance(schema, _Map):
            if not isinstance(value, _Object):
                return self._type_error(value, struct, path, schema.type_name)
            return {k: self.decode(v, schema.elem, struct, f"{path}.{k}") for k, v in value}
        assert isinstance(schema, _Struct)
        if not isinstance(value, _Object):
            return self._type_error(value, struct, path, schema.type_name)
        out: dict[str, Any] = {}
        seen: set[str] = set()
        for key, member in value:
            member_path = f"{path}.{key}" if path else key
            if key in seen:
                self.strict.append(f"duplicate field {go_quote(member_path)}")
            seen.add(key)
            if key not in schema.fields:
                self.strict.append(f"unknown field {go_quote(member_path)}")
                continue
            out[key] = self.decode(member, schema.fields[key], schema.go_name, member_path)
        return out

    def _time(self, value: Any) -> str | None:
        # metav1.Time has its own UnmarshalJSON: no struct context in its errors.
        if not isinstance(value, str):
            if self.type_error is None:
                self.type_error = (
                    f"json: cannot unmarshal {_json_type(value)} into Go value of type string"
                )
            return None
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            if self.type_error is None:
                self.type_error = (
                    f"parsing time {go_quote(value)} as {go_quote('2006-01-02T15:04:05Z07:00')}: "
                    f"cannot parse {go_quote(value)} as {go_quote('2006')}"
                )
            return None
        return value


def _nonzero(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v not in (None, "", 0, [], {})}


def decode_json(data: bytes) -> DecodedTokenRequest:
    parsed = _parse_json(data)
    if not isinstance(parsed, _Object):
        raise unrecognized(
            "couldn't get version/kind; json parse error: json: cannot unmarshal "
            f"{_json_type(parsed)} into Go value of type struct {{ APIVersion string "
            '"json:\\"apiVersion,omitempty\\""; Kind string "json:\\"kind,omitempty\\"" }',
            data,
        )
    members = dict(parsed)
    for key in ("apiVersion", "kind"):
        if members.get(key) is not None and not isinstance(members[key], str):
            raise unrecognized(
                "couldn't get version/kind; json parse error: json: cannot unmarshal "
                f"{_json_type(members[key])} into Go struct field .{key} of type string",
                data,
            )
    try:
        group, version = parse_group_version(members.get("apiVersion") or "")
    except ValueError as err:
        raise unrecognized(str(err), data) from err
    group, version, kind = _defaults(group, version, members.get("kind") or "")
    _check_kind(group, version, kind)

    decoder = _Decoder()
    obj = decoder.decode(parsed, _TOKEN_REQUEST, "", "")
    if decoder.type_error is not None:
        raise cannot_handle(kind, version, decoder.type_error)
    spec = obj.get("spec") or {}
    bound = spec.get("boundObjectRef")
    return DecodedTokenRequest(
        group=group,
        version=version,
        metadata=_nonzero(obj.get("metadata") or {}),
        audiences=list(spec.get("audiences") or []),
        expiration_seconds=spec.get("expirationSeconds"),
        bound=None
        if bound is None
        else BoundRef(
            kind=bound.get("kind") or "",
            api_version=bound.get("apiVersion") or "",
            name=bound.get("name") or "",
            uid=bound.get("uid") or "",
        ),
        strict_errors=decoder.strict,
    )


def parse_json_for_record(data: bytes) -> Any:
    """Best-effort plain JSON of a body (for the request log); None when it does not parse."""
    try:
        return plain(_parse_json(data))
    except DecodeFailure:
        return None


# --- YAML ---------------------------------------------------------------------------------


def yaml_to_json(data: bytes) -> bytes:
    try:
        loaded = yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise unrecognized(f"error converting YAML to JSON: yaml: {err}", data) from err
    return json.dumps(loaded, default=str).encode("utf-8")


# --- protobuf -----------------------------------------------------------------------------


def decode_protobuf(data: bytes) -> tuple[DecodedTokenRequest, dict[str, Any]]:
    """The decoded request, and its JSON form (for the request log)."""
    try:
        envelope = wire.decode_envelope(data)
    except wire.WireError as err:
        raise unrecognized(str(err), data) from err
    try:
        group, version = parse_group_version(envelope.api_version)
    except ValueError:
        group, version = "", ""  # FromAPIVersionAndKind drops an unparsable version
    group, version, kind = _defaults(group, version, envelope.kind)
    _check_kind(group, version, kind)
    message = pb.TokenRequest()
    try:
        message.ParseFromString(envelope.raw)
    except Exception as err:  # DecodeError, or a nested-message failure
        raise cannot_handle(kind, version, "unexpected EOF") from err

    metadata: dict[str, Any] = {}
    if message.metadata.name:
        metadata["name"] = message.metadata.name
    if message.metadata.namespace:
        metadata["namespace"] = message.metadata.namespace
    if message.metadata.uid:
        metadata["uid"] = message.metadata.uid
    spec = message.spec
    bound = None
    if spec.HasField("bound_object_ref"):
        ref = spec.bound_object_ref
        bound = BoundRef(ref.kind, ref.api_version, ref.name, ref.uid)
    expiration = spec.expiration_seconds if spec.HasField("expiration_seconds") else None
    decoded = DecodedTokenRequest(
        group=group,
        version=version,
        metadata=metadata,
        audiences=list(spec.audiences),
        expiration_seconds=expiration,
        bound=bound,
    )
    record_spec: dict[str, Any] = {"audiences": list(spec.audiences)}
    if expiration is not None:
        record_spec["expirationSeconds"] = expiration
    if bound is not None:
        record_spec["boundObjectRef"] = bound.to_json()
    record: dict[str, Any] = {
        "apiVersion": envelope.api_version,
        "kind": envelope.kind,
        "metadata": metadata,
        "spec": record_spec,
    }
    return decoded, record
