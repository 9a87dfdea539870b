"""Stock clients against the broker's HTTP door: `kubectl create token` (protobuf body, JSON or
protobuf answer) and the official Python client's `create_namespaced_service_account_token`,
over HTTPS with the test CA, authenticated with an API key; a refusal shows the policy's
reason."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import kubernetes
import pytest

from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.server import BrokerServer
from tests.support.http_door import HttpPki, http_settings, serving, write_policy
from tests.support.stack import (
    CALLER_KEY,
    NAMESPACE,
    OTHER_SERVICE_ACCOUNT,
    POD,
    SERVICE_ACCOUNT,
    claims_of,
)

AUDIENCE = "https://vault.example.com"
POLICY = {
    "rules": [
        {
            "name": "kubectl-door",
            "subjects": [{"method": "apiKey", "name": "test-caller"}],
            "namespaces": [NAMESPACE],
            "serviceAccounts": [SERVICE_ACCOUNT],
            "audiences": [AUDIENCE],
            "allowApiServerAudience": True,
            "maxExpiration": "2h",
        }
    ]
}


def _kubectl() -> str | None:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("kubectl", path=path)


KUBECTL = _kubectl()


@pytest.fixture
async def door(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, tmp_path: Path
) -> AsyncIterator[BrokerServer]:
    policy = write_policy(tmp_path, POLICY)
    async with serving(http_settings(kubernetes_settings, pki, policy=policy)) as server:
        yield server


async def kubectl(
    door: BrokerServer, pki: HttpPki, tmp_path: Path, *args: str
) -> tuple[int, str, str]:
    assert KUBECTL is not None and door.http_url is not None
    empty = tmp_path / "empty-kubeconfig"
    empty.write_text("", encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        "--kubeconfig",
        str(empty),
        "--server",
        door.http_url,
        "--certificate-authority",
        str(pki.server.ca_file),
        "--token",
        CALLER_KEY,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_kubectl_create_token(
    door: BrokerServer, pki: HttpPki, emulator: Emulator, tmp_path: Path
) -> None:
    code, out, err = await kubectl(
        door, pki, tmp_path, "create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE
    )
    assert code == 0, err
    claims = claims_of(emulator, out.strip())
    assert claims["sub"] == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    assert claims["aud"] == emulator.config.audiences
    # kubectl sends the Kubernetes protobuf encoding.
    assert emulator.token_requests[-1].namespace == NAMESPACE


async def test_kubectl_audience_and_duration(
    door: BrokerServer, pki: HttpPki, emulator: Emulator, tmp_path: Path
) -> None:
    code, out, err = await kubectl(
        door, pki, tmp_path,
        "create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE,
        "--audience", AUDIENCE, "--duration", "10m",
    )  # fmt: skip
    assert code == 0, err
    claims = claims_of(emulator, out.strip())
    assert claims["aud"] == [AUDIENCE]
    assert claims["exp"] - claims["iat"] == 600


async def test_kubectl_bound_object(
    door: BrokerServer, pki: HttpPki, emulator: Emulator, tmp_path: Path
) -> None:
    code, out, err = await kubectl(
        door, pki, tmp_path,
        "create", "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--audience", AUDIENCE,
        "--bound-object-kind", "Pod", "--bound-object-name", POD,
    )  # fmt: skip
    assert code == 0, err
    claims = claims_of(emulator, out.strip())
    assert claims["kubernetes.io"]["pod"]["name"] == POD


async def test_kubectl_refusal_shows_the_policy_reason(
    door: BrokerServer, pki: HttpPki, emulator: Emulator, tmp_path: Path
) -> None:
    code, out, err = await kubectl(
        door, pki, tmp_path,
        "create", "token", OTHER_SERVICE_ACCOUNT, "-n", NAMESPACE, "--audience", AUDIENCE,
    )  # fmt: skip
    assert code != 0
    assert out == ""
    assert f'serviceaccounts "{OTHER_SERVICE_ACCOUNT}" is forbidden' in err
    assert "no policy rule allows" in err, err
    assert emulator.token_request_count == 0


def _python_client(door: BrokerServer, pki: HttpPki) -> kubernetes.client.CoreV1Api:
    configuration = kubernetes.client.Configuration()
    assert door.http_url is not None
    configuration.host = door.http_url
    configuration.ssl_ca_cert = str(pki.server.ca_file)
    configuration.api_key = {"authorization": CALLER_KEY}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))


async def test_official_python_client(door: BrokerServer, pki: HttpPki, emulator: Emulator) -> None:
    api = _python_client(door, pki)
    body = kubernetes.client.AuthenticationV1TokenRequest(
        spec=kubernetes.client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=1200)
    )
    result = await asyncio.to_thread(
        api.create_namespaced_service_account_token, SERVICE_ACCOUNT, NAMESPACE, body
    )
    claims = claims_of(emulator, result.status.token)
    assert claims["aud"] == [AUDIENCE]
    assert result.spec.expiration_seconds == 1200
    assert result.status.expiration_timestamp.timestamp() == claims["exp"]

    refused = kubernetes.client.AuthenticationV1TokenRequest(
        spec=kubernetes.client.V1TokenRequestSpec(audiences=["https://evil.example"])
    )
    with pytest.raises(kubernetes.client.ApiException) as info:
        await asyncio.to_thread(
            api.create_namespaced_service_account_token, SERVICE_ACCOUNT, NAMESPACE, refused
        )
    assert info.value.status == 403
    status = json.loads(info.value.body)
    assert status["reason"] == "Forbidden"
    assert status["details"]["causes"][0]["reason"] == "AUDIENCE_NOT_ALLOWED"
