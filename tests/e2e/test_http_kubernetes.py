"""The Kubernetes-compatible HTTP door, end to end: HTTPS client -> the broker's HTTP door ->
the request path -> kubernetes.aio -> the emulator. JSON and protobuf bodies and answers, the
query parameters, the Status of every refusal path, the audit line's door."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.apiserver import wire
from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.server import BrokerServer
from tests.support.http_door import (
    JSON,
    PROTOBUF,
    TOKEN_PATH,
    HttpPki,
    http_settings,
    kube_post,
    request,
    serving,
    token_request_body,
    write_policy,
)
from tests.support.jwt_issuer import ISSUER
from tests.support.stack import (
    NAMESPACE,
    OTHER_NAMESPACE,
    POD,
    SERVICE_ACCOUNT,
    claims_of,
)

AUDIENCE = "https://vault.example.com"
POLICY = {
    "rules": [
        {
            "name": "http-tests",
            "subjects": [
                {"method": "apiKey", "name": "test-caller"},
                {"method": "jwt", "issuer": ISSUER, "name": "ci/runner"},
            ],
            "namespaces": [NAMESPACE],
            "serviceAccounts": [SERVICE_ACCOUNT],
            "audiences": [AUDIENCE, "sts.example.com"],
            "maxExpiration": "2h",
            "onLongerExpiration": "reject",
            "allowDryRun": False,
        }
    ]
}


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    return write_policy(tmp_path, POLICY)


@pytest.fixture
async def door(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, policy_file: Path, tmp_path: Path
) -> AsyncIterator[BrokerServer]:
    settings = http_settings(
        kubernetes_settings, pki, policy=policy_file, audit_file=tmp_path / "audit.jsonl"
    )
    async with serving(settings) as server:
        yield server


def audit_lines(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


async def test_json_body_json_answer(
    door: BrokerServer, pki: HttpPki, emulator: Emulator, tmp_path: Path
) -> None:
    answer = await kube_post(
        door, pki, token_request_body([AUDIENCE], 600), headers={"X-Request-Id": "req-http-1"}
    )
    assert answer.status == 201, answer.body
    assert answer.headers["Content-Type"].startswith(JSON)
    assert answer.headers["X-Request-Id"] == "req-http-1"
    assert answer.headers["Audit-Id"] == "req-http-1"
    body = answer.json()
    assert (body["kind"], body["apiVersion"]) == ("TokenRequest", "authentication.k8s.io/v1")
    assert body["metadata"]["name"] == SERVICE_ACCOUNT
    assert body["metadata"]["namespace"] == NAMESPACE
    assert body["spec"] == {
        "audiences": [AUDIENCE],
        "expirationSeconds": 600,
        "boundObjectRef": None,
    }
    claims = claims_of(emulator, body["status"]["token"])
    assert claims["aud"] == [AUDIENCE]
    assert claims["sub"] == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    (line,) = audit_lines(tmp_path)
    assert line["door"] == "http-kubernetes"
    assert line["requestID"] == "req-http-1"
    assert (line["decision"], line["user"], line["jti"]) == (
        "allowed",
        "test-caller",
        claims["jti"],
    )


async def test_protobuf_body_and_answer(
    door: BrokerServer, pki: HttpPki, emulator: Emulator
) -> None:
    message = pb.TokenRequest(
        spec=pb.TokenRequestSpec(
            audiences=[AUDIENCE],
            expiration_seconds=900,
            bound_object_ref=pb.BoundObjectReference(kind="Pod", api_version="v1", name=POD),
        )
    )
    body = wire.encode_envelope(
        message.SerializeToString(), "authentication.k8s.io/v1", "TokenRequest"
    )
    answer = await kube_post(door, pki, body, content_type=PROTOBUF, accept=f"{PROTOBUF},{JSON}")
    assert answer.status == 201, answer.body
    assert answer.headers["Content-Type"].startswith(PROTOBUF)
    envelope = wire.decode_envelope(answer.body)
    assert (envelope.api_version, envelope.kind) == ("authentication.k8s.io/v1", "TokenRequest")
    token_request = pb.TokenRequest.FromString(envelope.raw)
    assert list(token_request.spec.audiences) == [AUDIENCE]
    assert token_request.spec.expiration_seconds == 900
    assert token_request.spec.bound_object_ref.name == POD
    claims = claims_of(emulator, token_request.status.token)
    assert claims["kubernetes.io"]["pod"]["name"] == POD
    assert token_request.status.expiration_timestamp.seconds == claims["exp"]


async def test_yaml_body(door: BrokerServer, pki: HttpPki, emulator: Emulator) -> None:
    body = yaml.safe_dump(token_request_body([AUDIENCE], 1200)).encode()
    answer = await kube_post(door, pki, body, content_type="application/yaml")
    assert answer.status == 201, answer.body
    assert answer.json()["spec"]["expirationSeconds"] == 1200


async def test_unknown_fields_warn_or_are_refused(door: BrokerServer, pki: HttpPki) -> None:
    body = {**token_request_body([AUDIENCE]), "extra": 1}
    answer = await kube_post(door, pki, body)
    assert answer.status == 201, answer.body
    assert answer.headers.getall("Warning") == ['299 - "unknown field \\"extra\\""']
    strict = await kube_post(door, pki, body, path=TOKEN_PATH + "?fieldValidation=Strict")
    assert strict.status == 400
    assert 'strict decoding error: unknown field "extra"' in strict.json()["message"]


async def test_pretty_and_query_parameters(
    door: BrokerServer, pki: HttpPki, emulator: Emulator
) -> None:
    answer = await kube_post(
        door,
        pki,
        token_request_body([AUDIENCE]),
        path=TOKEN_PATH + "?pretty=true&fieldManager=kubectl&fieldValidation=Strict",
    )
    assert answer.status == 201
    assert answer.body.startswith(b'{\n  "kind": "TokenRequest"')
    seen = emulator.token_requests[-1]
    assert seen.query.get("fieldManager") == "kubectl"
    assert seen.query.get("fieldValidation") == "Strict"


async def test_dry_run_follows_the_policy(door: BrokerServer, pki: HttpPki) -> None:
    answer = await kube_post(
        door, pki, token_request_body([AUDIENCE]), path=TOKEN_PATH + "?dryRun=All"
    )
    assert answer.status == 403
    status = answer.json()
    assert status["reason"] == "Forbidden"
    assert status["details"]["causes"][0]["reason"] == "DRY_RUN_NOT_ALLOWED"
    assert answer.headers["Token-Broker-Reason"] == "DRY_RUN_NOT_ALLOWED"


def _status(answer: Any) -> dict[str, Any]:
    body: dict[str, Any] = answer.json()
    assert (body["kind"], body["apiVersion"], body["status"]) == ("Status", "v1", "Failure")
    assert body["code"] == answer.status
    return body


@pytest.mark.parametrize(
    ("label", "kwargs", "code", "reason"),
    [
        ("no credentials", {"bearer": None}, 401, "Unauthorized"),
        ("wrong key", {"bearer": "tbk_not-a-configured-key-000000"}, 401, "Unauthorized"),
        ("malformed JSON", {"body": b"{not json"}, 400, "BadRequest"),
        ("wrong content type", {"content_type": "text/plain"}, 415, "UnsupportedMediaType"),
        ("bad protobuf", {"body": b"k8s\x00\xff\xff", "content_type": PROTOBUF}, 400, "BadRequest"),
        ("unacceptable answer type", {"accept": "text/html"}, 406, "NotAcceptable"),
        (
            "body namespace differs",
            {"body": {**token_request_body([AUDIENCE]), "metadata": {"namespace": "x"}}},
            400,
            "BadRequest",
        ),
        (
            "wrong apiVersion",
            {"body": {**token_request_body([AUDIENCE]), "apiVersion": "authentication.k8s.io/v2"}},
            400,
            "BadRequest",
        ),
        ("expiration too short", {"body": token_request_body([AUDIENCE], 60)}, 422, "Invalid"),
        ("audience not allowed", {"body": token_request_body(["evil"])}, 403, "Forbidden"),
        (
            "namespace not allowed",
            {"path": f"/api/v1/namespaces/{OTHER_NAMESPACE}/serviceaccounts/x/token"},
            403,
            "Forbidden",
        ),
        ("too long", {"body": token_request_body([AUDIENCE], 4 * 3600)}, 403, "Forbidden"),
    ],
)
async def test_refusals_are_statuses(
    door: BrokerServer,
    pki: HttpPki,
    emulator: Emulator,
    label: str,
    kwargs: dict[str, Any],
    code: int,
    reason: str,
) -> None:
    before = emulator.token_request_count
    kwargs.setdefault("body", token_request_body([AUDIENCE]))
    body = kwargs.pop("body")
    answer = await kube_post(door, pki, body, **kwargs)
    assert answer.status == code, (label, answer.body)
    status = _status(answer)
    assert status.get("reason") == reason, label
    if code == 401:
        assert status["message"] == "Unauthorized"
        assert "details" not in status
    if code == 422:
        (cause, *_) = status["details"]["causes"]
        assert cause["field"] == "spec.expirationSeconds"
        assert "may not specify a duration less than 10 minutes" in status["message"]
    assert emulator.token_request_count == before, label


async def test_unauthenticated_learns_nothing_about_its_body(
    door: BrokerServer, pki: HttpPki
) -> None:
    answer = await kube_post(door, pki, b"{not json", bearer=None, content_type="text/plain")
    assert answer.status == 401


async def test_relayed_not_found(door: BrokerServer, pki: HttpPki, tmp_path: Path) -> None:
    # The policy allows only SERVICE_ACCOUNT; a missing pod to bind to is the API server's 404.
    body = token_request_body([AUDIENCE], bound={"kind": "Pod", "apiVersion": "v1", "name": "nope"})
    answer = await kube_post(door, pki, body)
    assert answer.status == 404, answer.body
    status = _status(answer)
    assert status["reason"] == "NotFound"
    assert status["message"] == 'pods "nope" not found'
    assert status["details"]["name"] == "nope"


async def test_unknown_paths_and_methods(door: BrokerServer, pki: HttpPki) -> None:
    answer = await request(door, pki, "GET", "/api")
    assert answer.status == 404
    assert _status(answer)["reason"] == "NotFound"
    answer = await request(door, pki, "GET", TOKEN_PATH)
    assert answer.status == 405
    assert answer.headers["Allow"] == "POST"
    assert _status(answer)["reason"] == "MethodNotAllowed"


async def test_huge_body_refused_before_it_is_read(door: BrokerServer, pki: HttpPki) -> None:
    answer = await kube_post(door, pki, b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert answer.status == 413
    assert _status(answer)["reason"] == "RequestEntityTooLarge"


async def test_grpc_and_http_share_the_cache(
    kubernetes_settings: KubernetesSettings,
    pki: HttpPki,
    policy_file: Path,
    emulator: Emulator,
) -> None:
    settings = http_settings(kubernetes_settings, pki, policy=policy_file, cache={"enabled": True})
    async with BrokerServer(settings) as server:
        first = await kube_post(server, pki, token_request_body([AUDIENCE]))
        second = await kube_post(server, pki, token_request_body([AUDIENCE]))
        assert (first.status, second.status) == (201, 201)
        assert first.json()["status"]["token"] == second.json()["status"]["token"]
        assert emulator.token_request_count == 1
        await asyncio.sleep(0)
