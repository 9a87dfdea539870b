"""CreateToken end to end: gRPC stub -> broker -> kubernetes.aio -> emulator (HTTPS)."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import jwt
import pytest

from broker.emulator import Emulator
from broker.errors import KUBERNETES_DOMAIN
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import Reason
from tests.support.stack import (
    NAMESPACE,
    NODE,
    OTHER_NAMESPACE,
    OTHER_POD,
    OTHER_SERVICE_ACCOUNT,
    POD,
    SECRET,
    SERVICE_ACCOUNT,
    RunningBroker,
    call_error,
    create_request,
)


def verify(emulator: Emulator, token: str, audience: str | list[str]) -> dict[str, Any]:
    """Verify the JWT against the emulator's JWKS; the claims."""
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert "typ" not in header
    keys = jwt.PyJWKSet.from_dict(emulator.jwks())
    key = next(k for k in keys.keys if k.key_id == header["kid"])
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=audience,
        issuer=emulator.config.issuer,
    )
    assert isinstance(claims["aud"], list)  # always a JSON array
    return claims


def pod_uid(emulator: Emulator, name: str = POD, namespace: str = NAMESPACE) -> str:
    return str(emulator.store.get_pod(namespace, name).uid)


def secret_uid(emulator: Emulator, name: str = SECRET, namespace: str = NAMESPACE) -> str:
    return str(emulator.store.get_secret(namespace, name).uid)


def sa_uid(emulator: Emulator, name: str = SERVICE_ACCOUNT, namespace: str = NAMESPACE) -> str:
    return str(emulator.store.get_service_account(namespace, name).uid)


def expect_kubernetes_error(
    status: Any,
    code: grpc.StatusCode,
    message: str,
    reason: str,
    http_code: int,
    k8s_reason: str,
    **details: str,
) -> None:
    assert status.code == code, status
    assert status.message == message
    info = status.error_info
    assert info is not None
    assert (info.reason, info.domain) == (reason, KUBERNETES_DOMAIN)
    assert info.metadata["kubernetesReason"] == k8s_reason
    assert info.metadata["kubernetesCode"] == str(http_code)
    for key, value in details.items():
        assert info.metadata[key] == value, key
    if not details:
        assert "kubernetesName" not in info.metadata


def expect_not_found(status: Any, kind: str, name: str) -> None:
    """The API server's 404 for a missing object, as NOT_FOUND with its kind and name."""
    expect_kubernetes_error(
        status,
        grpc.StatusCode.NOT_FOUND,
        f'{kind} "{name}" not found',
        Reason.KUBERNETES_NOT_FOUND,
        404,
        "NotFound",
        kubernetesKind=kind,
        kubernetesName=name,
    )


# --- success -------------------------------------------------------------------------------


async def test_defaults(stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator) -> None:
    resp = await stub.CreateToken(create_request(), timeout=10)
    tr = resp.token_request
    assert tr.metadata.name == SERVICE_ACCOUNT
    assert tr.metadata.namespace == NAMESPACE
    assert tr.metadata.HasField("creation_timestamp")
    assert tr.spec.HasField("expiration_seconds") and tr.spec.expiration_seconds == 3600
    assert list(tr.spec.audiences) == list(emulator.config.api_audiences)
    assert not tr.spec.HasField("bound_object_ref")
    lifetime = tr.status.expiration_timestamp.seconds - tr.metadata.creation_timestamp.seconds
    assert lifetime == 3600
    assert list(resp.warnings) == []

    claims = verify(emulator, tr.status.token, list(emulator.config.api_audiences))
    assert claims["sub"] == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    assert claims["aud"] == list(emulator.config.api_audiences)
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] == tr.status.expiration_timestamp.seconds
    assert claims["jti"]
    k8s = claims["kubernetes.io"]
    assert k8s["namespace"] == NAMESPACE
    assert k8s["serviceaccount"] == {"name": SERVICE_ACCOUNT, "uid": sa_uid(emulator)}
    assert not {"pod", "secret", "node"} & set(k8s)
    assert emulator.token_request_count == 1


async def test_explicit_audiences_and_expiration(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    audiences = ["https://vault.example.com", "sts.example.com"]
    resp = await stub.CreateToken(
        create_request(audiences=audiences, expiration_seconds=7200, metadata_name=SERVICE_ACCOUNT),
        timeout=10,
    )
    tr = resp.token_request
    assert list(tr.spec.audiences) == audiences
    assert tr.spec.expiration_seconds == 7200
    claims = verify(emulator, tr.status.token, "sts.example.com")
    assert claims["aud"] == audiences
    assert claims["exp"] - claims["iat"] == 7200


async def test_pod_bound_token(stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator) -> None:
    uid = pod_uid(emulator)
    bound = pb.BoundObjectReference(kind="Pod", api_version="v1", name=POD, uid=uid)
    resp = await stub.CreateToken(create_request(bound=bound), timeout=10)
    ref = resp.token_request.spec.bound_object_ref
    assert (ref.kind, ref.api_version, ref.name, ref.uid) == ("Pod", "v1", POD, uid)
    claims = verify(emulator, resp.token_request.status.token, list(emulator.config.api_audiences))
    k8s = claims["kubernetes.io"]
    assert k8s["pod"] == {"name": POD, "uid": uid}
    assert k8s["serviceaccount"]["name"] == SERVICE_ACCOUNT
    assert "secret" not in k8s


async def test_pod_bound_without_uid(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    bound = pb.BoundObjectReference(kind="Pod", name=POD)
    resp = await stub.CreateToken(create_request(bound=bound), timeout=10)
    claims = verify(emulator, resp.token_request.status.token, list(emulator.config.api_audiences))
    assert claims["kubernetes.io"]["pod"] == {"name": POD, "uid": pod_uid(emulator)}


async def test_secret_bound_token(stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator) -> None:
    uid = secret_uid(emulator)
    bound = pb.BoundObjectReference(kind="Secret", api_version="v1", name=SECRET, uid=uid)
    resp = await stub.CreateToken(create_request(bound=bound), timeout=10)
    claims = verify(emulator, resp.token_request.status.token, list(emulator.config.api_audiences))
    assert claims["kubernetes.io"]["secret"] == {"name": SECRET, "uid": uid}
    assert "pod" not in claims["kubernetes.io"]


@pytest.mark.emulator_config(node_binding=True)
async def test_node_bound_token_when_enabled(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    bound = pb.BoundObjectReference(kind="Node", api_version="v1", name=NODE)
    resp = await stub.CreateToken(create_request(bound=bound), timeout=10)
    claims = verify(emulator, resp.token_request.status.token, list(emulator.config.api_audiences))
    assert claims["kubernetes.io"]["node"]["name"] == NODE


@pytest.mark.emulator_config(max_expiration_seconds=3600)
async def test_rule8_shortened_with_warning(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    resp = await stub.CreateToken(create_request(expiration_seconds=7200), timeout=10)
    assert resp.token_request.spec.expiration_seconds == 3600
    assert list(resp.warnings) == ["requested expiration of 7200 seconds shortened to 3600 seconds"]
    tr = resp.token_request
    lifetime = tr.status.expiration_timestamp.seconds - tr.metadata.creation_timestamp.seconds
    assert lifetime == 3600


async def test_dry_run_and_options_are_forwarded(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    resp = await stub.CreateToken(
        create_request(dry_run=["All"], field_manager="ci-bot", field_validation="Strict"),
        timeout=10,
    )
    # dryRun=All still returns a real signed token.
    verify(emulator, resp.token_request.status.token, list(emulator.config.api_audiences))
    seen = emulator.token_requests[-1]
    assert seen.query.get("dryRun") == "All"
    assert seen.query.get("fieldManager") == "ci-bot"
    assert seen.query.get("fieldValidation") == "Strict"


async def test_request_body_sent_upstream(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    await stub.CreateToken(create_request(), timeout=10)
    body = emulator.token_requests[-1].body
    assert body["apiVersion"] == "authentication.k8s.io/v1"
    assert body["kind"] == "TokenRequest"
    # audiences=[] (server default), no expirationSeconds (server default), no status.
    assert body["spec"]["audiences"] == []
    assert "expirationSeconds" not in body["spec"]
    assert "status" not in body


# --- API-server refusals relayed (the broker lets these through) -------------------------


async def test_uid_conflict_after_pod_recreated(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    old_uid = pod_uid(emulator)
    emulator.store.delete_pod(NAMESPACE, POD)
    emulator.store.create_pod(NAMESPACE, POD, service_account_name=SERVICE_ACCOUNT, node_name=NODE)
    assert pod_uid(emulator) != old_uid
    bound = pb.BoundObjectReference(kind="Pod", api_version="v1", name=POD, uid=old_uid)
    status = await call_error(stub, create_request(bound=bound))
    expect_kubernetes_error(
        status,
        grpc.StatusCode.FAILED_PRECONDITION,
        f'Operation cannot be fulfilled on Pod "{POD}": the UID in the bound object reference '
        f"({old_uid}) does not match the UID in record. The object might have been deleted and "
        "then recreated",
        Reason.KUBERNETES_CONFLICT,
        409,
        "Conflict",
        kubernetesKind="Pod",
        kubernetesName=POD,
    )


async def test_bound_pod_deleted(stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator) -> None:
    emulator.store.delete_pod(NAMESPACE, POD)
    bound = pb.BoundObjectReference(kind="Pod", name=POD)
    status = await call_error(stub, create_request(bound=bound))
    expect_not_found(status, "pods", POD)


async def test_service_account_missing(stub: pb_grpc.TokenBrokerServiceStub) -> None:
    status = await call_error(stub, create_request(service_account="nobody"))
    expect_not_found(status, "serviceaccounts", "nobody")


async def test_pod_runs_as_other_service_account(stub: pb_grpc.TokenBrokerServiceStub) -> None:
    bound = pb.BoundObjectReference(kind="Pod", name=OTHER_POD)
    status = await call_error(stub, create_request(bound=bound))
    expect_kubernetes_error(
        status,
        grpc.StatusCode.INVALID_ARGUMENT,
        f'cannot bind token for serviceaccount "{SERVICE_ACCOUNT}" to pod running with '
        "different serviceaccount name.",
        Reason.KUBERNETES_BAD_REQUEST,
        400,
        "BadRequest",
    )
    assert status.bad_request is None


async def test_node_binding_disabled(stub: pb_grpc.TokenBrokerServiceStub) -> None:
    bound = pb.BoundObjectReference(kind="Node", api_version="v1", name=NODE)
    status = await call_error(stub, create_request(bound=bound))
    expect_kubernetes_error(
        status,
        grpc.StatusCode.INVALID_ARGUMENT,
        'cannot bind token to a Node object as the "ServiceAccountTokenNodeBinding" '
        "feature-gate is disabled",
        Reason.KUBERNETES_BAD_REQUEST,
        400,
        "BadRequest",
    )


@pytest.mark.emulator_config(node_binding=True)
async def test_bound_node_missing(stub: pb_grpc.TokenBrokerServiceStub) -> None:
    bound = pb.BoundObjectReference(kind="Node", name="node-9")
    status = await call_error(stub, create_request(bound=bound))
    expect_not_found(status, "nodes", "node-9")


async def test_bound_secret_missing(stub: pb_grpc.TokenBrokerServiceStub) -> None:
    bound = pb.BoundObjectReference(kind="Secret", name="nope")
    status = await call_error(stub, create_request(bound=bound))
    expect_not_found(status, "secrets", "nope")


async def test_forbidden_namespace(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    status = await call_error(stub, create_request(namespace=OTHER_NAMESPACE))
    from tests.support.stack import BROKER_USER

    expect_kubernetes_error(
        status,
        grpc.StatusCode.PERMISSION_DENIED,
        f'serviceaccounts "{SERVICE_ACCOUNT}" is forbidden: User "{BROKER_USER}" cannot create '
        f'resource "serviceaccounts/token" in API group "" in the namespace "{OTHER_NAMESPACE}"',
        Reason.KUBERNETES_FORBIDDEN,
        403,
        "Forbidden",
        kubernetesKind="serviceaccounts",
        kubernetesName=SERVICE_ACCOUNT,
    )


async def test_other_service_account_token(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    bound = pb.BoundObjectReference(kind="Pod", name=OTHER_POD)
    resp = await stub.CreateToken(
        create_request(service_account=OTHER_SERVICE_ACCOUNT, bound=bound), timeout=10
    )
    claims = verify(emulator, resp.token_request.status.token, list(emulator.config.api_audiences))
    assert claims["sub"] == f"system:serviceaccount:{NAMESPACE}:{OTHER_SERVICE_ACCOUNT}"


async def test_token_not_logged(
    stub: pb_grpc.TokenBrokerServiceStub,
    emulator: Emulator,
    broker: RunningBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.faults.fail_next(1, 503)
    resp = await stub.CreateToken(create_request(), timeout=10)
    token = resp.token_request.status.token
    result = await broker.upstream.create_token(NAMESPACE, SERVICE_ACCOUNT, pb.TokenRequest())
    for text in (repr(result), str(result), repr(broker.upstream)):
        assert result.token_request.status.token not in text
        assert "<redacted>" in text or text.startswith("UpstreamClient(")
    from tests.support.stack import BROKER_TOKEN

    assert caplog.records, "expected the retry to be logged"
    for record in caplog.records:
        text = record.getMessage()
        for secret in (token, result.token_request.status.token, BROKER_TOKEN):
            assert secret not in text
