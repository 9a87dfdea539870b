"""OAuth 2.0 Token Exchange (RFC 8693) at the HTTP door's /oauth2/token, end to end: raw
form posts as curl sends them, and a maintained OAuth client library (authlib), through the
same policy as gRPC (a JWT subject matched by a policy rule)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from authlib.integrations.requests_client import OAuth2Session
from authlib.integrations.requests_client import OAuthError as AuthlibOAuthError

from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.server import BrokerServer
from tests.support.http_door import (
    JWT_TYPE,
    TOKEN_EXCHANGE,
    Answer,
    HttpPki,
    exchange_form,
    http_settings,
    oauth_post,
    request,
    serving,
    write_policy,
)
from tests.support.jwt_issuer import ISSUER
from tests.support.stack import (
    CALLER_KEY,
    NAMESPACE,
    OTHER_SERVICE_ACCOUNT,
    SERVICE_ACCOUNT,
    claims_of,
)

AUDIENCE = "sts.example.com"
RESOURCE = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
POLICY = {
    "rules": [
        {
            "name": "oauth-door",
            "subjects": [
                {"method": "jwt", "issuer": ISSUER, "name": "ci/*", "claims": {"ref": "main"}},
                {"method": "apiKey", "name": "test-caller"},
            ],
            "namespaces": [NAMESPACE],
            "serviceAccounts": [SERVICE_ACCOUNT],
            "audiences": [AUDIENCE, "https://b.example"],
            "defaultAudiences": [AUDIENCE],
            "maxExpiration": "1h",
            "onLongerExpiration": "reject",
        }
    ]
}


@pytest.fixture
async def door(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, tmp_path: Path
) -> AsyncIterator[BrokerServer]:
    policy = write_policy(tmp_path, POLICY)
    settings = http_settings(
        kubernetes_settings, pki, policy=policy, audit_file=tmp_path / "audit.jsonl"
    )
    async with serving(settings) as server:
        yield server


def subject(pki: HttpPki, **claims: Any) -> str:
    return pki.signer.mint(**{"ref": "main", **claims})


def oauth_error(answer: Answer) -> str:
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["Pragma"] == "no-cache"
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert set(body) <= {"error", "error_description"}
    error: str = body["error"]
    return error


async def test_exchange(
    door: BrokerServer, pki: HttpPki, emulator: Emulator, tmp_path: Path
) -> None:
    answer = await oauth_post(
        door,
        pki,
        exchange_form(
            subject(pki), audiences=(AUDIENCE, "https://b.example"), expiration_seconds="900"
        ),
    )
    assert answer.status == 200, answer.body
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["Pragma"] == "no-cache"
    body = answer.json()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in"}
    assert body["issued_token_type"] == JWT_TYPE
    assert body["token_type"] == "N_A"
    assert 890 <= body["expires_in"] <= 900
    claims = claims_of(emulator, body["access_token"])
    assert claims["aud"] == [AUDIENCE, "https://b.example"]
    assert claims["sub"] == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    (line,) = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert line["door"] == "http-oauth"
    assert (line["user"], line["authMethod"], line["issuer"]) == ("ci/runner", "jwt", ISSUER)
    assert line["decision"] == "allowed"


async def test_default_audience_and_id_token_type(
    door: BrokerServer, pki: HttpPki, emulator: Emulator
) -> None:
    form = [
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", subject(pki)),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:id_token"),
        ("resource", RESOURCE),
        ("requested_token_type", JWT_TYPE),
        ("client_id", "ignored-by-the-broker"),
    ]
    answer = await oauth_post(door, pki, form)
    assert answer.status == 200, answer.body
    assert claims_of(emulator, answer.json()["access_token"])["aud"] == [AUDIENCE]


@pytest.mark.parametrize(
    ("label", "form", "status", "error"),
    [
        ("claims do not match", "feature-branch", 400, "invalid_target"),
        ("service account not allowed", "other-sa", 400, "invalid_target"),
        ("audience not allowed", "evil-audience", 400, "invalid_target"),
        ("lifetime too long", "too-long", 400, "invalid_request"),
        ("invalid subject token", "bad-signature", 400, "invalid_request"),
        ("an API key is not a subject token", "api-key", 400, "invalid_request"),
        ("API key as access_token type", "api-key-typed", 400, "invalid_request"),
        ("no subject token", "missing-token", 400, "invalid_request"),
        ("wrong grant type", "grant", 400, "unsupported_grant_type"),
        ("malformed resource", "resource", 400, "invalid_target"),
        ("missing resource", "no-resource", 400, "invalid_target"),
        ("repeated parameter", "repeated", 400, "invalid_request"),
        ("actor token", "actor", 400, "invalid_request"),
        ("other token type asked", "requested", 400, "invalid_request"),
        ("scope", "scope", 400, "invalid_scope"),
        ("bad lifetime", "bad-lifetime", 400, "invalid_request"),
        ("short lifetime", "short-lifetime", 400, "invalid_request"),
    ],
)
async def test_errors(
    door: BrokerServer,
    pki: HttpPki,
    emulator: Emulator,
    label: str,
    form: str,
    status: int,
    error: str,
) -> None:
    token = subject(pki)
    forms: dict[str, list[tuple[str, str]]] = {
        "feature-branch": exchange_form(subject(pki, ref="feature")),
        "other-sa": exchange_form(
            token, resource=f"system:serviceaccount:{NAMESPACE}:{OTHER_SERVICE_ACCOUNT}"
        ),
        "evil-audience": exchange_form(token, audiences=("https://evil.example",)),
        "too-long": exchange_form(token, expiration_seconds="7200"),
        "bad-signature": exchange_form(token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")),
        "api-key": exchange_form(CALLER_KEY),
        "api-key-typed": [
            *exchange_form(CALLER_KEY)[:1],
            ("subject_token", CALLER_KEY),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ("resource", RESOURCE),
        ],
        "missing-token": exchange_form(None),
        "grant": [("grant_type", "client_credentials"), *exchange_form(token)[1:]],
        "resource": exchange_form(token, resource=f"https://{NAMESPACE}/{SERVICE_ACCOUNT}"),
        "no-resource": exchange_form(token, resource=None),
        "repeated": [*exchange_form(token), ("resource", RESOURCE)],
        "actor": exchange_form(token, actor_token=token, actor_token_type=JWT_TYPE),
        "requested": exchange_form(
            token, requested_token_type="urn:ietf:params:oauth:token-type:access_token"
        ),
        "scope": exchange_form(token, scope="openid"),
        "bad-lifetime": exchange_form(token, expiration_seconds="ten"),
        "short-lifetime": exchange_form(token, expiration_seconds="60"),
    }
    answer = await oauth_post(door, pki, forms[form])
    assert answer.status == status, (label, answer.body)
    assert oauth_error(answer) == error, (label, answer.body)
    assert emulator.token_request_count == 0


async def test_not_a_form_and_wrong_method(door: BrokerServer, pki: HttpPki) -> None:
    answer = await request(
        door,
        pki,
        "POST",
        "/oauth2/token",
        body=b'{"grant_type": "x"}',
        headers={"Content-Type": "application/json"},
    )
    assert answer.status == 400
    assert oauth_error(answer) == "invalid_request"
    answer = await request(door, pki, "GET", "/oauth2/token")
    assert answer.status == 405
    assert answer.headers["Allow"] == "POST"
    assert oauth_error(answer) == "invalid_request"


def _authlib_exchange(url: str, ca_file: Path, token: str, audience: str) -> dict[str, Any]:
    with OAuth2Session(token_endpoint_auth_method="none") as session:
        result: dict[str, Any] = session.fetch_token(
            url,
            verify=str(ca_file),
            grant_type=TOKEN_EXCHANGE,
            subject_token=token,
            subject_token_type=JWT_TYPE,
            resource=RESOURCE,
            audience=audience,
        )
        return result


async def test_with_an_oauth_client_library(
    door: BrokerServer, pki: HttpPki, emulator: Emulator
) -> None:
    assert door.http_url is not None
    url = door.http_url + "/oauth2/token"
    token = await asyncio.to_thread(
        _authlib_exchange, url, pki.server.ca_file, subject(pki), AUDIENCE
    )
    assert token["token_type"] == "N_A"
    assert token["issued_token_type"] == JWT_TYPE
    assert claims_of(emulator, token["access_token"])["aud"] == [AUDIENCE]
    with pytest.raises(AuthlibOAuthError) as info:
        await asyncio.to_thread(
            _authlib_exchange, url, pki.server.ca_file, subject(pki), "https://evil.example"
        )
    assert info.value.error == "invalid_target"
