"""One authorization matrix through every door: the access tests' identities and requests
(tests/e2e/test_access.py: mTLS, API key, JWT, a JWT whose claims do not match, a wrong key)
sent over gRPC, the Kubernetes-compatible HTTP door and, for JWT callers, the OAuth token
exchange door, to one broker. Each decision (allowed or the refusal's reason, the deciding
rule, the caller's identity) and its audit line must be the same whichever door; only the
status vocabulary differs, and it follows broker.http_errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import pytest
from grpc import aio

from broker.config import KubernetesSettings, load_settings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.http_errors import ANSWERS
from broker.reasons import ALLOWED, Reason
from broker.server import BrokerServer
from tests.e2e.test_access import (
    CALLERS,
    MATRIX,
    POLICY,
    Case,
    Material,
    authentication,
    bearer_for,
    journal,  # noqa: F401 (the fixture `material` needs)
    material,  # noqa: F401 (a fixture)
    server_tls,
)

HTTP_CALLERS = ("mtls", "api-key", "jwt", "jwt-feature-branch", "wrong-key")
DECISION_FIELDS = (
    "decision",
    "rule",
    "reason",
    "code",
    "user",
    "authMethod",
    "issuer",
    "certificateField",
    "namespace",
    "serviceAccount",
    "audiences",
    "requestedExpirationSeconds",
    "grantedAudiences",
    "grantedExpirationSeconds",
    "boundObjectRef",
    "dryRun",
)


@dataclass
class Doors:
    server: BrokerServer
    material: Material
    audit_file: Path

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]


@pytest.fixture
async def doors(
    emulator: Emulator,
    kubernetes_settings: KubernetesSettings,
    material: Material,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[Doors]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY, encoding="utf-8")
    audit = tmp_path / "audit.jsonl"
    settings = load_settings(
        None,
        {
            "server": {
                "listen": "127.0.0.1:0",
                "httpListen": "127.0.0.1:0",
                "tls": server_tls(material),
            },
            "kubernetes": kubernetes_settings,
            "authentication": authentication(material),
            "policy": {"file": str(policy_file)},
            "audit": {"sink": "file", "file": str(audit)},
            "cache": {"enabled": False},
            "rateLimit": {"enabled": False},
        },
    )
    server = BrokerServer(settings)
    await server.start()
    try:
        yield Doors(server, material, audit)
    finally:
        await server.stop(None)


async def via_grpc(doors: Doors, case: Case, bearer: str | None) -> str:
    """The gRPC call; its ErrorInfo reason (ALLOWED when it succeeded)."""
    cert_pem, key_pem = doors.material.client
    creds = grpc.ssl_channel_credentials(
        root_certificates=doors.material.server.ca_file.read_bytes(),
        private_key=key_pem,
        certificate_chain=cert_pem,
    )
    metadata = [("authorization", f"Bearer {bearer}")] if bearer is not None else []
    async with aio.secure_channel(doors.server.address, creds) as channel:
        try:
            await pb_grpc.TokenBrokerServiceStub(channel).CreateToken(
                case.request(), metadata=metadata, timeout=15
            )
        except aio.AioRpcError as err:
            from broker.errors import rich_status_from_call

            info = rich_status_from_call(err).error_info
            assert info is not None
            return info.reason
    return ALLOWED


def _ssl(doors: Doors) -> Any:
    import ssl

    context = ssl.create_default_context(cafile=str(doors.material.server.ca_file))
    cert_pem, key_pem = doors.material.client
    directory = doors.audit_file.parent
    cert, key = directory / "client.crt", directory / "client.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    context.load_cert_chain(cert, key)
    return context


async def _post(doors: Doors, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    import aiohttp

    assert doors.server.http_url is not None
    connector = aiohttp.TCPConnector(ssl=_ssl(doors))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(doors.server.http_url + path, data=body, headers=headers) as response,
    ):
        return response.status, json.loads(await response.read())


def kubernetes_body(case: Case) -> dict[str, Any]:
    spec: dict[str, Any] = {"audiences": list(case.audiences)}
    if case.expiration is not None:
        spec["expirationSeconds"] = case.expiration
    if case.bound is not None:
        spec["boundObjectRef"] = {"kind": case.bound[0], "apiVersion": "v1", "name": case.bound[1]}
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}


async def via_kubernetes(doors: Doors, case: Case, bearer: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    query = "?dryRun=All" if case.dry_run else ""
    path = (
        f"/api/v1/namespaces/{case.namespace}/serviceaccounts/{case.service_account}/token{query}"
    )
    return await _post(doors, path, json.dumps(kubernetes_body(case)).encode(), headers)


async def via_oauth(doors: Doors, case: Case, bearer: str) -> tuple[int, Any]:
    form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token", bearer),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("resource", f"system:serviceaccount:{case.namespace}:{case.service_account}"),
        *(("audience", a) for a in case.audiences),
    ]
    if case.expiration is not None:
        form.append(("expiration_seconds", str(case.expiration)))
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return await _post(doors, "/oauth2/token", urlencode(form).encode(), headers)


CASES = [
    pytest.param(caller, case, id=f"{caller}: {case.label}")
    for caller in HTTP_CALLERS
    for case in MATRIX[caller]
]


@pytest.mark.parametrize(("caller", "case"), CASES)
async def test_same_decision_through_every_door(doors: Doors, caller: str, case: Case) -> None:
    who = CALLERS[caller]
    bearer = bearer_for(who.credential, doors.material)
    assert await via_grpc(doors, case, bearer) == case.reason
    grpc_line = doors.audit_lines()[-1]

    status, body = await via_kubernetes(doors, case, bearer)
    kube_line = doors.audit_lines()[-1]
    if case.allowed:
        assert status == 201, body
        assert body["status"]["token"]
    else:
        answer = ANSWERS[Reason(case.reason)]
        assert status == answer.status, body
        assert body["reason"] == answer.status_reason
        if status == 403:
            assert body["details"]["causes"][0] == {"reason": case.reason, "message": case.message}
    lines = [(grpc_line, "grpc"), (kube_line, "http-kubernetes")]

    oauth_able = case.bound is None and not case.dry_run
    if who.method == "jwt" and oauth_able:
        assert bearer is not None
        status, body = await via_oauth(doors, case, bearer)
        lines.append((doors.audit_lines()[-1], "http-oauth"))
        if case.allowed:
            assert status == 200, body
            assert body["token_type"] == "N_A"
        else:
            answer = ANSWERS[Reason(case.reason)]
            assert (status, body["error"]) == (answer.oauth_status, answer.oauth_error), body
            assert body["error_description"] == case.message.replace('"', "'")

    decisions = {door: {key: line[key] for key in DECISION_FIELDS} for line, door in lines}
    for line, door in lines:
        assert line["door"] == door
    first = decisions["grpc"]
    assert first["reason"] == case.reason
    assert first["rule"] == case.rule
    for door, decision in decisions.items():
        assert decision == first, door
