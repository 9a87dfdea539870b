"""The TokenRequest create path after decoding: generic create checks, then the token handler.

Order and texts follow `staging/.../endpoints/handlers/create.go` and
`pkg/registry/core/serviceaccount/storage/token.go` (v1.30); the rule numbers are those of
the project's reference document.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.apiserver import status
from broker.apiserver.body import (
    GROUP,
    GROUP_VERSION,
    KIND,
    BoundRef,
    DecodedTokenRequest,
    parse_group_version,
)
from broker.emulator.config import EmulatorConfig
from broker.emulator.store import ObjectNotFound, ObjectStore, ServiceAccount, rfc3339
from broker.emulator.tokens import (
    EXPIRATION_EXTENSION_SECONDS,
    WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS,
    BoundObject,
    TokenSigner,
    build_claims,
)

DEFAULT_EXPIRATION_SECONDS = 3600  # pkg/apis/authentication/v1/defaults.go
MIN_EXPIRATION_SECONDS = 10 * 60
MAX_EXPIRATION_SECONDS = 1 << 32
AUDIT_ISSUED_CREDENTIAL_ID = "authentication.kubernetes.io/issued-credential-id"

# ObjectMeta members in Go's field order (the order JSON output uses).
_META_ORDER = (
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
)
# rest.WipeObjectMetaSystemFields.
_WIPED = ("creationTimestamp", "uid", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink")


@dataclass
class TokenResult:
    body: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    audit_annotations: dict[str, str] = field(default_factory=dict)


def _not_found(err: ObjectNotFound) -> status.StatusError:
    return status.not_found(err.resource, err.name)


def create_token(
    *,
    namespace: str,
    name: str,
    request: DecodedTokenRequest,
    config: EmulatorConfig,
    store: ObjectStore,
    signer: TokenSigner,
    sign_hook: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> TokenResult:
    """Everything after decoding; raises StatusError for every refusal. The steps below run
    in the reference's order of checks (each raises the first refusal it finds)."""
    metadata = _checked_object(request, namespace, name, store)  # create.go, rule 1
    service_account = _service_account(store, namespace, name)  # rule 2
    grant = _defaults(request, config, metadata, service_account, clock)  # rule 3
    _validate_expiration(grant.seconds)  # rule 4
    bound = _bound_objects(request.bound, namespace, name, config, store)  # rules 6, 7
    seconds, warnings = _server_maximum(grant.seconds, config)  # rule 8
    jwt_seconds, warn_after = _jwt_lifetime(seconds, grant.audiences, bound, config)
    claims = build_claims(
        issuer=config.issuer,
        namespace=namespace,
        service_account=BoundObject(service_account.name, service_account.uid),
        audiences=grant.audiences,
        now=grant.now,
        expiration_seconds=jwt_seconds,
        warn_after_seconds=warn_after,
        pod=bound.pod,
        secret=bound.secret,
        node=bound.node,
    )
    token = _sign(signer, claims, sign_hook)  # rule 10
    body = {
        "kind": KIND,
        "apiVersion": GROUP_VERSION,
        "metadata": {k: metadata[k] for k in _META_ORDER if k in metadata},
        "spec": {
            "audiences": grant.audiences,
            "expirationSeconds": seconds,
            "boundObjectRef": None if request.bound is None else request.bound.to_json(),
        },
        "status": {
            "token": token,
            "expirationTimestamp": rfc3339(datetime.fromtimestamp(grant.now + seconds, UTC)),
        },
    }
    return TokenResult(
        body=body,
        warnings=warnings,
        audit_annotations={AUDIT_ISSUED_CREDENTIAL_ID: f"JTI={claims['jti']}"},
    )


def _checked_object(
    request: DecodedTokenRequest, namespace: str, name: str, store: ObjectStore
) -> dict[str, Any]:
    """The generic create checks (create.go, admission), then rule 1; the object's metadata,
    system fields wiped and the namespace set."""
    # create.go: the decoded object's group/version must be the endpoint's.
    if request.group_version != GROUP_VERSION:
        raise status.bad_request(
            f"the API version in the data ({request.group_version}) does not match the "
            f"expected API version ({GROUP_VERSION})"
        )
    metadata = {k: v for k, v in request.metadata.items() if k not in _WIPED}
    # rest.EnsureObjectNamespaceMatchesRequestNamespace.
    body_namespace = metadata.get("namespace", "")
    if body_namespace and body_namespace != namespace:
        raise status.bad_request(status.NAMESPACE_MISMATCH)
    metadata["namespace"] = namespace
    # NamespaceLifecycle admission: creating anything in a missing namespace.
    if not store.has_namespace(namespace):
        raise status.not_found("namespaces", namespace)

    # Rule 1: metadata.name, when set, must be the service account's.
    body_name = metadata.get("name", "")
    if body_name and body_name != name:
        raise status.new_invalid(
            GROUP,
            KIND,
            name,
            [
                status.invalid(
                    "metadata.name", body_name, "must match the service account name if specified"
                )
            ],
        )
    return metadata


def _service_account(store: ObjectStore, namespace: str, name: str) -> ServiceAccount:
    """Rule 2: the service account."""
    try:
        return store.get_service_account(namespace, name)
    except ObjectNotFound as err:
        raise _not_found(err) from None


@dataclass(frozen=True)
class _Defaults:
    audiences: list[str]
    now: int  # the issue time, seconds since the epoch
    seconds: int  # the requested expiration, else the default


def _defaults(
    request: DecodedTokenRequest,
    config: EmulatorConfig,
    metadata: dict[str, Any],
    service_account: ServiceAccount,
    clock: Callable[[], float],
) -> _Defaults:
    """Rule 3: defaults (audiences, name, creationTimestamp, expiration)."""
    audiences = list(request.audiences) or config.audiences
    metadata["name"] = service_account.name
    now = int(clock())
    metadata["creationTimestamp"] = rfc3339(datetime.fromtimestamp(now, UTC))
    seconds = (
        DEFAULT_EXPIRATION_SECONDS
        if request.expiration_seconds is None
        else request.expiration_seconds
    )
    return _Defaults(audiences=audiences, now=now, seconds=seconds)


def _validate_expiration(seconds: int) -> None:
    """Rule 4: ValidateTokenRequest (an empty object name in the message)."""
    errors: list[status.FieldError] = []
    if seconds < MIN_EXPIRATION_SECONDS:
        errors.append(
            status.invalid(
                "spec.expirationSeconds", seconds, "may not specify a duration less than 10 minutes"
            )
        )
    if seconds > MAX_EXPIRATION_SECONDS:
        errors.append(
            status.invalid(
                "spec.expirationSeconds",
                seconds,
                "may not specify a duration larger than 2^32 seconds",
            )
        )
    if errors:
        raise status.new_invalid(GROUP, KIND, "", errors)


@dataclass(frozen=True)
class _Bound:
    """The objects the token's claims name (rules 6, 7)."""

    pod: BoundObject | None = None
    secret: BoundObject | None = None
    node: BoundObject | None = None


def _bound_objects(
    ref: BoundRef | None,
    namespace: str,
    name: str,
    config: EmulatorConfig,
    store: ObjectStore,
) -> _Bound:
    """Rule 6: the bound object; rule 7: its UID."""
    if ref is None:
        return _Bound()
    try:
        group, version = parse_group_version(ref.api_version)
    except ValueError:
        group, version = "", ""
    if group == "" and ref.kind == "Pod":
        bound, bound_uid = _bound_pod(ref, namespace, name, config, store)
    elif group == "" and ref.kind == "Node":
        if not config.node_binding:
            raise status.bad_request(
                "cannot bind token to a Node object as the "
                '"ServiceAccountTokenNodeBinding" feature-gate is disabled'
            )
        try:
            node_obj = store.get_node(ref.name)
        except ObjectNotFound as err:
            raise _not_found(err) from None
        bound_uid = node_obj.uid
        bound = _Bound(node=BoundObject(node_obj.name, node_obj.uid))
    elif group == "" and ref.kind == "Secret":
        try:
            secret_obj = store.get_secret(namespace, ref.name)
        except ObjectNotFound as err:
            raise _not_found(err) from None
        bound_uid = secret_obj.uid
        bound = _Bound(secret=BoundObject(secret_obj.name, secret_obj.uid))
    else:
        raise status.bad_request(
            f"cannot bind token to object of type {group}/{version}, Kind={ref.kind}"
        )
    if ref.uid and ref.uid != bound_uid:
        raise status.conflict(
            ref.kind,
            ref.name,
            f"the UID in the bound object reference ({ref.uid}) does not match the UID in "
            "record. The object might have been deleted and then recreated",
        )
    return bound


def _bound_pod(
    ref: BoundRef, namespace: str, name: str, config: EmulatorConfig, store: ObjectStore
) -> tuple[_Bound, str]:
    """Rule 6 for a Pod: it exists and runs as the service account; its node, when the
    pod-node-info claims are on (a missing node only drops the node claim). And its UID."""
    try:
        pod_obj = store.get_pod(namespace, ref.name)
    except ObjectNotFound as err:
        raise _not_found(err) from None
    if pod_obj.service_account_name != name:
        raise status.bad_request(
            f"cannot bind token for serviceaccount {status.go_quote(name)} to pod "
            "running with different serviceaccount name."
        )
    node = None
    if config.pod_node_info and pod_obj.node_name:
        with contextlib.suppress(ObjectNotFound):
            node_obj = store.get_node(pod_obj.node_name)
            node = BoundObject(node_obj.name, node_obj.uid)
    return _Bound(pod=BoundObject(pod_obj.name, pod_obj.uid), node=node), pod_obj.uid


def _server_maximum(seconds: int, config: EmulatorConfig) -> tuple[int, list[str]]:
    """Rule 8: the server's maximum, with a warning; (seconds, warnings)."""
    maximum = config.max_expiration_seconds
    if maximum is not None and seconds > maximum:
        return maximum, [
            f"requested expiration of {seconds} seconds shortened to {maximum} seconds"
        ]
    return seconds, []


def _jwt_lifetime(
    seconds: int, audiences: list[str], bound: _Bound, config: EmulatorConfig
) -> tuple[int, int]:
    """The JWT's own lifetime and warn-after (0: none): kubelet-style extension warns (not
    fails) after 3607 s, and fails after a year."""
    if (
        config.extend_expiration
        and bound.pod is not None
        and seconds == WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS
        and set(audiences) <= set(config.audiences)
    ):
        return EXPIRATION_EXTENSION_SECONDS, seconds
    return seconds, 0


def _sign(signer: TokenSigner, claims: dict[str, Any], sign_hook: Callable[[], None] | None) -> str:
    """Rule 10: signing failures are plain errors: HTTP 500 with no reason."""
    try:
        if sign_hook is not None:
            sign_hook()
        return signer.sign(claims)
    except Exception as err:
        raise status.unknown_error(500, f"failed to generate token: {err}") from err
