"""The HTTP door's remaining answer paths, end to end: the API server's 409 relayed, the
broker's rate limits (429 + Retry-After on both doors), the API server failing (503 +
Retry-After), a body that never arrives (408), the per-address failed-authentication throttle
and the pending-call limit shared with gRPC, and client certificates (the same mTLS identity
as gRPC; a bearer credential still decides alone)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.server import BrokerServer
from tests.support.certs import client_cert
from tests.support.http_door import (
    TOKEN_PATH,
    HttpPki,
    exchange_form,
    http_settings,
    kube_post,
    oauth_post,
    token_request_body,
    write_policy,
)
from tests.support.jwt_issuer import ISSUER
from tests.support.stack import NAMESPACE, POD, SERVICE_ACCOUNT

AUDIENCE = "https://vault.example.com"
SPIFFE = "spiffe://example.org/ci/runner"
POLICY = {
    "rules": [
        {
            "name": "limits",
            "subjects": [
                {"method": "apiKey", "name": "test-caller"},
                {"method": "jwt", "issuer": ISSUER, "name": "ci/runner"},
                {"method": "mtls", "name": "spiffe://example.org/ci/*"},
            ],
            "namespaces": [NAMESPACE],
            "serviceAccounts": [SERVICE_ACCOUNT],
            "audiences": [AUDIENCE],
            "maxExpiration": "2h",
        }
    ]
}
NO_LIMITS: dict[str, Any] = {"perCaller": None, "perServiceAccount": None, "global": None}


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(tmp_path, POLICY)


@pytest.fixture
async def door(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, policy: Path
) -> AsyncIterator[BrokerServer]:
    async with BrokerServer(http_settings(kubernetes_settings, pki, policy=policy)) as server:
        yield server


def status_of(answer: Any) -> dict[str, Any]:
    body: dict[str, Any] = answer.json()
    assert body["kind"] == "Status" and body["code"] == answer.status
    return body


async def test_relayed_conflict(door: BrokerServer, pki: HttpPki) -> None:
    bound = {"kind": "Pod", "apiVersion": "v1", "name": POD, "uid": "not-the-pods-uid"}
    answer = await kube_post(door, pki, token_request_body([AUDIENCE], bound=bound))
    assert answer.status == 409, answer.body
    status = status_of(answer)
    assert status["reason"] == "Conflict"
    assert status["message"].startswith(f'Operation cannot be fulfilled on Pod "{POD}"')
    assert answer.headers["Token-Broker-Reason"] == "KUBERNETES_CONFLICT"


async def test_rate_limited_on_both_doors(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, policy: Path
) -> None:
    settings = http_settings(
        kubernetes_settings,
        pki,
        policy=policy,
        rate_limit={**NO_LIMITS, "enabled": True, "perCaller": {"rate": 0.01, "burst": 1}},
    )
    async with BrokerServer(settings) as server:
        assert (await kube_post(server, pki, token_request_body([AUDIENCE]))).status == 201
        answer = await kube_post(server, pki, token_request_body([AUDIENCE]))
        assert answer.status == 429, answer.body
        status = status_of(answer)
        assert status["reason"] == "TooManyRequests"
        assert int(answer.headers["Retry-After"]) >= 1
        assert status["details"]["retryAfterSeconds"] == int(answer.headers["Retry-After"])
        assert status["details"]["causes"][0]["reason"] == "RATE_LIMITED"
        # The OAuth door: its own caller (the JWT), the same limit per caller.
        form = exchange_form(pki.signer.mint(), audiences=(AUDIENCE,))
        assert (await oauth_post(server, pki, form)).status == 200
        answer = await oauth_post(
            server, pki, exchange_form(pki.signer.mint(), audiences=(AUDIENCE,))
        )
        assert answer.status == 429, answer.body
        assert answer.json()["error"] == "temporarily_unavailable"
        assert int(answer.headers["Retry-After"]) >= 1


@pytest.mark.retry(max_attempts=1)
async def test_api_server_unavailable(door: BrokerServer, pki: HttpPki, emulator: Emulator) -> None:
    emulator.faults.fail_next(1, 503, retry_after=7)
    answer = await kube_post(door, pki, token_request_body([AUDIENCE]))
    assert answer.status == 503, answer.body
    status = status_of(answer)
    assert status["reason"] == "ServiceUnavailable"
    assert answer.headers["Retry-After"] == "7"


async def test_a_body_that_never_arrives(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, policy: Path
) -> None:
    settings = http_settings(
        kubernetes_settings, pki, policy=policy, tls=False, receiveTimeoutSeconds=0.3
    )
    async with BrokerServer(settings) as server:
        assert server.http_address is not None
        host, port = server.http_address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {TOKEN_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 408 "), head
        writer.close()


async def test_failed_authentication_is_throttled_per_address(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, policy: Path
) -> None:
    settings = http_settings(
        kubernetes_settings,
        pki,
        policy=policy,
        rate_limit={"enabled": False, "authFailuresPerPeer": {"rate": 0.001, "burst": 2}},
    )
    async with BrokerServer(settings) as server:
        codes = [
            (await kube_post(server, pki, token_request_body(), bearer="tbk_wrong-key-000")).status
            for _ in range(3)
        ]
        assert codes == [401, 401, 429]
        # The address is throttled on the OAuth door too: one peer, whichever door.
        answer = await oauth_post(server, pki, exchange_form("a.b.c"))
        assert answer.status == 429
        assert answer.headers["Token-Broker-Reason"] == "PEER_THROTTLED"


async def test_pending_calls_are_bounded(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, policy: Path
) -> None:
    settings = http_settings(kubernetes_settings, pki, policy=policy, tls=False, maxPendingCalls=1)
    async with BrokerServer(settings) as server:
        assert server.http_address is not None
        host, port = server.http_address.rsplit(":", 1)
        # One call holds the only pending slot: its body does not come.
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {TOKEN_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n".encode()
        )
        await writer.drain()
        for _ in range(200):
            answer = await kube_post(server, None, token_request_body([AUDIENCE]))
            if answer.status == 429:
                break
            await asyncio.sleep(0.01)
        assert answer.status == 429, answer.body
        assert status_of(answer)["details"]["causes"][0]["reason"] == "TOO_MANY_PENDING_CALLS"
        assert answer.headers["Retry-After"] == "1"
        writer.close()


async def test_client_certificates_are_the_grpc_identity(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, policy: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    settings = http_settings(
        kubernetes_settings, pki, policy=policy, client_ca=True, audit_file=audit
    )
    cert_pem, key_pem = client_cert(pki.server.ca, cn="ignored", uris=(SPIFFE,))
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    async with BrokerServer(settings) as server:
        answer = await kube_post(
            server, pki, token_request_body([AUDIENCE]), bearer=None, cert=(cert, key)
        )
        assert answer.status == 201, answer.body
        # A bearer credential decides alone, the certificate notwithstanding (as on gRPC).
        answer = await kube_post(server, pki, token_request_body([AUDIENCE]), cert=(cert, key))
        assert answer.status == 201, answer.body
    first = json.loads(audit.read_text().splitlines()[0])
    assert (first["user"], first["authMethod"], first["certificateField"]) == (
        SPIFFE,
        "mtls",
        "uri",
    )
    assert first["door"] == "http-kubernetes"
    second = json.loads(audit.read_text().splitlines()[1])
    assert (second["user"], second["authMethod"]) == ("test-caller", "apiKey")
