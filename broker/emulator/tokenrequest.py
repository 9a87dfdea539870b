"""The TokenRequest create path after decoding: generic create checks, then the token handler.

Order and texts follow `staging/.../endpoints/handlers/create.go` and
`pkg/registry/core/serviceaccount/storage/token.go` (v1.30); the rule numbers are those of
the project's reference document.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.emulator import status
from broker.emulator.body import (
    GROUP,
    GROUP_VERSION,
    KIND,
    DecodedTokenRequest,
    parse_group_version,
)
from broker.emulator.config import EmulatorConfig
from broker.emulator.store import ObjectNotFound, ObjectStore, rfc3339
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
    """Everything after decoding; raises StatusError for every refusal."""
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
    # Rule 2: the service account.
    try:
        service_account = store.get_service_account(namespace, name)
    except ObjectNotFound as err:
        raise _not_found(err) from None

    # Rule 3: defaults.
    audiences = list(request.audiences) or config.audiences
    metadata["name"] = service_account.name
    now = int(clock())
    metadata["creationTimestamp"] = rfc3339(datetime.fromtimestamp(now, UTC))
    seconds = (
        DEFAULT_EXPIRATION_SECONDS
        if request.expiration_seconds is None
        else request.expiration_seconds
    )

    # Rule 4: ValidateTokenRequest (an empty object name in the message).
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

    # Rule 6: the bound object; rule 7: its UID.
    pod = secret = node = None
    ref = request.bound
    if ref is not None:
        try:
            group, version = parse_group_version(ref.api_version)
        except ValueError:
            group, version = "", ""
        bound_uid = ""
        if group == "" and ref.kind == "Pod":
            try:
                pod_obj = store.get_pod(namespace, ref.name)
            except ObjectNotFound as err:
                raise _not_found(err) from None
            if pod_obj.service_account_name != name:
                raise status.bad_request(
                    f"cannot bind token for serviceaccount {status.go_quote(name)} to pod "
                    "running with different serviceaccount name."
                )
            bound_uid = pod_obj.uid
            pod = BoundObject(pod_obj.name, pod_obj.uid)
            if config.pod_node_info and pod_obj.node_name:
                try:  # a missing node only drops the node claim
                    node_obj = store.get_node(pod_obj.node_name)
                    node = BoundObject(node_obj.name, node_obj.uid)
                except ObjectNotFound:
                    node = None
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
            node = BoundObject(node_obj.name, node_obj.uid)
        elif group == "" and ref.kind == "Secret":
            try:
                secret_obj = store.get_secret(namespace, ref.name)
            except ObjectNotFound as err:
                raise _not_found(err) from None
            bound_uid = secret_obj.uid
            secret = BoundObject(secret_obj.name, secret_obj.uid)
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

    # Rule 8: the server's maximum, with a warning.
    warnings: list[str] = []
    maximum = config.max_expiration_seconds
    if maximum is not None and seconds > maximum:
        warnings.append(f"requested expiration of {seconds} seconds shortened to {maximum} seconds")
        seconds = maximum

    # Kubelet-style extension: warn (not fail) after 3607 s, fail after a year.
    jwt_seconds, warn_after = seconds, 0
    if (
        config.extend_expiration
        and pod is not None
        and seconds == WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS
        and set(audiences) <= set(config.audiences)
    ):
        jwt_seconds, warn_after = EXPIRATION_EXTENSION_SECONDS, seconds

    claims = build_claims(
        issuer=config.issuer,
        namespace=namespace,
        service_account=BoundObject(service_account.name, service_account.uid),
        audiences=audiences,
        now=now,
        expiration_seconds=jwt_seconds,
        warn_after_seconds=warn_after,
        pod=pod,
        secret=secret,
        node=node,
    )
    # Rule 10: signing failures are plain errors: HTTP 500 with no reason.
    try:
        if sign_hook is not None:
            sign_hook()
        token = signer.sign(claims)
    except Exception as err:
        raise status.unknown_error(500, f"failed to generate token: {err}") from err

    body = {
        "kind": KIND,
        "apiVersion": GROUP_VERSION,
        "metadata": {k: metadata[k] for k in _META_ORDER if k in metadata},
        "spec": {
            "audiences": audiences,
            "expirationSeconds": seconds,
            "boundObjectRef": None if ref is None else ref.to_json(),
        },
        "status": {
            "token": token,
            "expirationTimestamp": rfc3339(datetime.fromtimestamp(now + seconds, UTC)),
        },
    }
    return TokenResult(
        body=body,
        warnings=warnings,
        audit_annotations={AUDIT_ISSUED_CREDENTIAL_ID: f"JTI={claims['jti']}"},
    )
