"""The Kubernetes-compatible door:
`POST /api/v1/namespaces/{namespace}/serviceaccounts/{name}/token` answered as kube-apiserver
answers it, on the broker's request path (broker.request_path).

A stock Kubernetes client (kubectl create token, client-go, the official Python client) sends
the TokenRequest as JSON or in the Kubernetes protobuf encoding (`k8s\\0` + `runtime.Unknown`,
whose raw bytes are the TokenRequest message: the broker's own `TokenRequest` has the upstream
field numbers). This module turns that HTTP request into the broker's `CreateTokenRequest`
(path parameters, body, query parameters `dryRun`, `fieldManager`, `fieldValidation`), and the
answer back into a `TokenRequest` (201, JSON or protobuf as the client's Accept prefers, JSON
indented with `pretty`), or a refusal into a `Status` (broker.http_errors has the mapping;
the door writes it in protobuf or JSON, as the client's Accept prefers).

What kube-apiserver checks before its token handler (the body's media type 415, decoding 400,
strict field validation 400, the body's apiVersion 400, its namespace against the URL's 400)
is checked here, with the API server's texts (broker.apiserver, which the emulator shares:
broker.apiserver.body, broker.apiserver.status); such a refusal is the call's
`TokenCall.refusal`, answered after authentication, so an unauthenticated caller still learns
nothing but 401. Everything else (validation, policy, rate limits, cache, upstream, audit)
is the request path's, as on gRPC.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from multidict import MultiMapping

from broker.apiserver import status as kstatus
from broker.apiserver import wire
from broker.apiserver.body import (
    GROUP,
    GROUP_VERSION,
    KIND,
    DecodedTokenRequest,
    DecodeFailure,
    cannot_handle,
    decode_json,
    decode_protobuf,
    yaml_to_json,
)
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.http_errors import answer_for
from broker.reasons import Reason

ROUTE = "/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
JSON = "application/json"
YAML = "application/yaml"
PROTOBUF = wire.PROTOBUF_MEDIA_TYPE
ACCEPTED_MEDIA_TYPES = (JSON, YAML, PROTOBUF)
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})


@dataclasses.dataclass
class StatusRefusal(BrokerError):
    """A refusal kube-apiserver makes before its token handler: answered with this Status
    (the ErrorInfo reason, for the audit line and gRPC-side vocabulary, is REQUEST_MALFORMED)."""

    status: kstatus.StatusError | None = None


def _refusal(status_error: kstatus.StatusError) -> StatusRefusal:
    return StatusRefusal.of(Reason.REQUEST_MALFORMED, status_error.message, status=status_error)


def media_type(header: str) -> str:
    return header.split(";", 1)[0].strip().lower() if header else JSON


def request_message(
    namespace: str, name: str, query: MultiMapping[str], content_type: str, body: bytes
) -> tuple[bytes, list[str]]:
    """The CreateTokenRequest (serialized) of one HTTP request, and the warnings of a lenient
    decoding (unknown fields under `fieldValidation` Warn, the default); StatusRefusal when
    kube-apiserver would refuse it before its token handler."""
    media = media_type(content_type)
    if media not in ACCEPTED_MEDIA_TYPES:
        raise _refusal(kstatus.unsupported_media_type(ACCEPTED_MEDIA_TYPES))
    try:
        if media == PROTOBUF:
            decoded = decode_protobuf(body)[0]
        elif media == YAML:
            decoded = decode_json(yaml_to_json(body))
        else:
            decoded = decode_json(body)
    except DecodeFailure as err:
        raise _refusal(kstatus.bad_request(str(err))) from None
    except Exception:  # a decoder's failure on hostile bytes nobody foresaw: still a 400
        raise _refusal(kstatus.bad_request("the request body could not be decoded")) from None
    warnings: list[str] = []
    directive = query.get("fieldValidation", "") or "Warn"
    if decoded.strict_errors:
        if directive == "Strict":
            reason = "strict decoding error: " + ", ".join(decoded.strict_errors)
            raise _refusal(kstatus.bad_request(str(cannot_handle(KIND, decoded.version, reason))))
        if directive == "Warn":
            warnings.extend(decoded.strict_errors)
    if decoded.group_version != GROUP_VERSION:
        raise _refusal(
            kstatus.bad_request(
                f"the API version in the data ({decoded.group_version}) does not match the "
                f"expected API version ({GROUP_VERSION})"
            )
        )
    body_namespace = decoded.metadata.get("namespace", "")
    if body_namespace and body_namespace != namespace:
        raise _refusal(kstatus.bad_request(kstatus.NAMESPACE_MISMATCH))
    return _create_token_request(namespace, name, query, decoded).SerializeToString(), warnings


def _create_token_request(
    namespace: str, name: str, query: MultiMapping[str], decoded: DecodedTokenRequest
) -> pb.CreateTokenRequest:
    spec = pb.TokenRequestSpec(audiences=decoded.audiences)
    if decoded.expiration_seconds is not None:
        spec.expiration_seconds = decoded.expiration_seconds
    if decoded.bound is not None:
        bound = decoded.bound
        spec.bound_object_ref.CopyFrom(
            pb.BoundObjectReference(
                kind=bound.kind, api_version=bound.api_version, name=bound.name, uid=bound.uid
            )
        )
    body_name = decoded.metadata.get("name", "")
    return pb.CreateTokenRequest(
        namespace=namespace,
        service_account=name,
        token_request=pb.TokenRequest(
            metadata=pb.ObjectMeta(name=body_name if isinstance(body_name, str) else ""),
            spec=spec,
        ),
        dry_run=query.getall("dryRun", []),
        field_manager=query.get("fieldManager", ""),
        field_validation=query.get("fieldValidation", ""),
    )


# --- answers -------------------------------------------------------------------------------


def is_pretty(query: Mapping[str, str], user_agent: str) -> bool:
    """kube-apiserver's isPrettyPrint: ?pretty=<bool>, else curl/wget/browser user agents."""
    value = query.get("pretty", "")
    if value:
        return value in _TRUE
    return user_agent.startswith(("curl", "Wget", "Mozilla/5.0"))


def answer_media_type(accept: str) -> str | None:
    """The media type of a success answer: the client's most preferred of protobuf and JSON
    (JSON when it states no preference), or None when it accepts neither (406)."""
    if not accept.strip():
        return JSON
    best: tuple[float, int, str] | None = None
    for position, part in enumerate(accept.split(",")):
        media, _, params = part.partition(";")
        media = media.strip().lower()
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality <= 0:
            continue
        if media == PROTOBUF:
            chosen = PROTOBUF
        elif media in (JSON, "application/*", "*/*"):
            chosen = JSON
        else:
            continue
        candidate = (-quality, position, chosen)
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[2]


def not_acceptable() -> kstatus.StatusError:
    return kstatus.StatusError(
        406,
        "NotAcceptable",
        "only the following media types are accepted: " + ", ".join((JSON, PROTOBUF)),
    )


def _rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_request_json(token_request: pb.TokenRequest) -> dict[str, Any]:
    """The TokenRequest as kube-apiserver writes it (members in Go's order, `boundObjectRef`
    null when unbound, `creationTimestamp` null when unknown)."""
    meta = token_request.metadata
    metadata: dict[str, Any] = {}
    if meta.name:
        metadata["name"] = meta.name
    if meta.namespace:
        metadata["namespace"] = meta.namespace
    if meta.uid:
        metadata["uid"] = meta.uid
    metadata["creationTimestamp"] = (
        _rfc3339(meta.creation_timestamp.seconds) if meta.HasField("creation_timestamp") else None
    )
    spec = token_request.spec
    bound: dict[str, str] | None = None
    if spec.HasField("bound_object_ref"):
        ref = spec.bound_object_ref
        bound = {
            key: value
            for key, value in (
                ("kind", ref.kind),
                ("apiVersion", ref.api_version),
                ("name", ref.name),
                ("uid", ref.uid),
            )
            if value
        }
    status = token_request.status
    return {
        "kind": KIND,
        "apiVersion": GROUP_VERSION,
        "metadata": metadata,
        "spec": {
            "audiences": list(spec.audiences),
            "expirationSeconds": spec.expiration_seconds
            if spec.HasField("expiration_seconds")
            else None,
            "boundObjectRef": bound,
        },
        "status": {
            "token": status.token,
            "expirationTimestamp": _rfc3339(status.expiration_timestamp.seconds),
        },
    }


def token_request_protobuf(token_request: pb.TokenRequest) -> bytes:
    """The TokenRequest in the Kubernetes protobuf encoding (`k8s\\0` + runtime.Unknown)."""
    return wire.encode_envelope(token_request.SerializeToString(), GROUP_VERSION, KIND)


# --- refusals ------------------------------------------------------------------------------

_OPTIONS = {
    "dry_run": "dryRun",
    "field_manager": "fieldManager",
    "field_validation": "fieldValidation",
}


def _camel(segment: str) -> str:
    head, *rest = segment.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def kubernetes_field(path: str) -> str:
    """A request field path (proto names) as kube-apiserver names the field:
    "token_request.spec.expiration_seconds" -> "spec.expirationSeconds"."""
    if path.startswith("token_request."):
        path = path[len("token_request.") :]
    elif path == "namespace":
        return "metadata.namespace"
    elif path == "service_account":
        return "metadata.name"
    else:
        match = re.fullmatch(r"([a-z_]+)(.*)", path)
        if match is not None and match.group(1) in _OPTIONS:
            return _OPTIONS[match.group(1)] + match.group(2)
    return ".".join(_camel(segment) for segment in path.split("."))


def status_for(error: BrokerError, namespace: str, name: str) -> kstatus.StatusError:
    """The Status a refusal is answered with (broker.http_errors decides code and reason)."""
    if isinstance(error, StatusRefusal) and error.status is not None:
        return error.status
    answer = answer_for(error)
    code, reason = answer.status, answer.status_reason
    if code == 401:
        return kstatus.unauthorized()  # nothing more, as kube-apiserver
    causes = [{"reason": error.reason, "message": error.message}]
    if code == 422:
        field_errors = [
            kstatus.FieldError(
                v.reason or "FieldValueInvalid", kubernetes_field(v.field), v.description
            )
            for v in error.field_violations
        ]
        if field_errors:
            shown = name if any(e.field == "metadata.name" for e in field_errors) else ""
            invalid = kstatus.new_invalid(GROUP, KIND, shown, field_errors)
            if invalid.details is not None:
                invalid.details["causes"] = [
                    *invalid.details.get("causes", []),
                    {"reason": error.reason, "message": error.message},
                ]
            return invalid
    if code == 403 and error.domain != "k8s.io":
        forbidden = kstatus.forbidden("serviceaccounts", name, error.message)
        assert forbidden.details is not None
        forbidden.details["causes"] = causes
        return forbidden
    details: dict[str, Any] = {}
    meta = error.metadata
    if error.domain == "k8s.io":
        for key, meta_key in (
            ("name", "kubernetesName"),
            ("group", "kubernetesGroup"),
            ("kind", "kubernetesKind"),
        ):
            if meta.get(meta_key):
                details[key] = meta[meta_key]
    else:
        details.update({"name": name, "kind": "serviceaccounts"})
    details["causes"] = causes
    if error.retry_after is not None:
        details["retryAfterSeconds"] = max(1, int(-(-error.retry_after // 1)))
    return kstatus.StatusError(code, reason, error.message, details)


def warning_headers(warnings: Sequence[str]) -> list[str]:
    return [kstatus.warning_header(text) for text in dict.fromkeys(warnings)]
