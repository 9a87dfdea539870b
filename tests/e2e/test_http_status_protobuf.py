"""The Kubernetes door answers a refusal's `Status` in the content type the client's Accept
prefers, as kube-apiserver negotiates errors: protobuf (`k8s\\0` + runtime.Unknown of kind
Status) when it prefers `application/vnd.kubernetes.protobuf`, else JSON (the 406 too). Decoded
with this suite's own wire reader (tests/unit/test_status_protobuf.py), and by stock kubectl,
which still prints the policy's reason."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.server import BrokerServer
from tests.e2e.test_http_clients import AUDIENCE, POLICY, kubectl
from tests.support.http_door import (
    JSON,
    PROTOBUF,
    HttpPki,
    http_settings,
    kube_post,
    serving,
    token_request_body,
    write_policy,
)
from tests.support.stack import NAMESPACE, OTHER_SERVICE_ACCOUNT
from tests.unit.test_status_protobuf import fields, status_of, value

REFUSED_PATH = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{OTHER_SERVICE_ACCOUNT}/token"


@pytest.fixture
async def door(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, tmp_path: Path
) -> AsyncIterator[BrokerServer]:
    policy = write_policy(tmp_path, POLICY)
    async with serving(http_settings(kubernetes_settings, pki, policy=policy)) as server:
        yield server


def text(message: list[tuple[int, int, int | bytes]], number: int) -> str:
    found = value(message, number)
    assert isinstance(found, bytes)
    return found.decode("utf-8")


async def test_a_refusal_in_protobuf_says_what_the_json_one_says(
    door: BrokerServer, pki: HttpPki, emulator: Emulator
) -> None:
    body = token_request_body([AUDIENCE])
    as_json = await kube_post(door, pki, body, path=REFUSED_PATH, accept=JSON)
    assert as_json.status == 403
    assert as_json.headers["Content-Type"].startswith(JSON)
    expected = as_json.json()
    # kubectl's Accept: protobuf first.
    answer = await kube_post(door, pki, body, path=REFUSED_PATH, accept=f"{PROTOBUF}, {JSON}")
    assert answer.status == 403
    assert answer.headers["Content-Type"] == PROTOBUF
    assert answer.headers["Token-Broker-Reason"] == "NO_MATCHING_RULE"
    status = status_of(answer.body)
    assert text(status, 2) == "Failure"
    assert text(status, 3) == expected["message"]
    assert "no policy rule allows" in text(status, 3)
    assert text(status, 4) == expected["reason"] == "Forbidden"
    assert value(status, 6) == expected["code"] == 403
    details = value(status, 5)
    assert isinstance(details, bytes)
    decoded = fields(details)
    assert text(decoded, 1) == expected["details"]["name"] == OTHER_SERVICE_ACCOUNT
    assert text(decoded, 3) == expected["details"]["kind"] == "serviceaccounts"
    [cause] = [v for n, _, v in decoded if n == 4]
    assert isinstance(cause, bytes)
    assert text(fields(cause), 1) == expected["details"]["causes"][0]["reason"]
    assert text(fields(cause), 2) == expected["details"]["causes"][0]["message"]
    assert emulator.token_request_count == 0


@pytest.mark.parametrize(
    ("accept", "media"),
    [
        (PROTOBUF, PROTOBUF),
        (f"{JSON};q=0.5, {PROTOBUF}", PROTOBUF),
        (f"{PROTOBUF};q=0.5, {JSON}", JSON),
        ("*/*", JSON),
        ("", JSON),
    ],
)
async def test_the_accept_header_chooses(
    door: BrokerServer, pki: HttpPki, accept: str, media: str
) -> None:
    answer = await kube_post(door, pki, token_request_body(), path=REFUSED_PATH, accept=accept)
    assert answer.status == 403
    assert answer.headers["Content-Type"].split(";")[0] == media
    if media == JSON:
        assert answer.json()["reason"] == "Forbidden"
    else:
        assert text(status_of(answer.body), 4) == "Forbidden"


async def test_before_the_policy_too_and_json_when_nothing_fits(
    door: BrokerServer, pki: HttpPki
) -> None:
    # Unauthenticated: kube-apiserver's 401 is negotiated as well (no details: no field 5).
    answer = await kube_post(door, pki, token_request_body(), bearer="wrong", accept=PROTOBUF)
    assert (answer.status, answer.headers["Content-Type"]) == (401, PROTOBUF)
    status = status_of(answer.body)
    assert [n for n, _, _ in status] == [1, 2, 3, 4, 6]
    assert text(status, 3) == "Unauthorized"
    # A body that does not decode: 400 BadRequest, in protobuf.
    answer = await kube_post(door, pki, b"{", accept=PROTOBUF)
    assert (answer.status, answer.headers["Content-Type"]) == (400, PROTOBUF)
    assert text(status_of(answer.body), 4) == "BadRequest"
    # An unknown path and a wrong method: protobuf too.
    answer = await kube_post(door, pki, b"", path="/api/v1/nothing", accept=PROTOBUF)
    assert (answer.status, answer.headers["Content-Type"]) == (404, PROTOBUF)
    # Accepts neither: the 406 is JSON (nothing else it could be).
    answer = await kube_post(door, pki, token_request_body(), accept="text/html")
    assert answer.status == 406
    assert answer.headers["Content-Type"].startswith(JSON)
    assert json.loads(answer.body)["reason"] == "NotAcceptable"


async def test_kubectl_gets_protobuf_and_prints_the_policy_reason(
    door: BrokerServer, pki: HttpPki, emulator: Emulator, tmp_path: Path
) -> None:
    code, out, err = await kubectl(
        door, pki, tmp_path,
        "create", "token", OTHER_SERVICE_ACCOUNT, "-n", NAMESPACE, "--audience", AUDIENCE,
        "-v=8",
    )  # fmt: skip
    assert code != 0 and out == ""
    # -v=8 logs the response headers: the Status came as protobuf, and kubectl decoded it.
    response_headers = err.split('"Response" status="403 Forbidden" headers=<', 1)[1]
    assert f"Content-Type: {PROTOBUF}\n" in response_headers.split("\n >", 1)[0]
    assert f'serviceaccounts "{OTHER_SERVICE_ACCOUNT}" is forbidden' in err
    assert "no policy rule allows" in err
    assert emulator.token_request_count == 0
