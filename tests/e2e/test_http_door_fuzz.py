"""Fuzzing the HTTP door with what an unauthenticated or hostile caller controls, in the style
of test_fuzz_boundary.py: methods, paths, content types, raw bodies (random bytes, mutated and
hostile JSON, protobuf envelopes around random bytes, forms), authorization values and request
ids, through the real stack (aiohttp client -> the HTTP door -> the request path ->
kubernetes.aio -> the emulator).

For every example: never a 5xx, never a stack trace; every answer of the token routes is a
Kubernetes Status or an RFC 6749 error (JSON); a token (201/200) only for an authenticated
caller, and only for what the policy allows (its audit line says allowed, by the one rule, for
the one namespace and service account); an unauthenticated caller learns nothing but 401 /
invalid_request; every audit line within MAX_AUDIT_LINE_BYTES; the example's secret marker
(inside every credential drawn) nowhere in the logs, audit lines, answers or /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
import yarl
from hypothesis import event, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from broker.apiserver import wire
from broker.audit import MAX_AUDIT_LINE_BYTES
from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.server import BrokerServer
from tests.support.fuzz import FUZZ_SETTINGS, captured_logs, marker, token_claims
from tests.support.http_door import HttpPki, http_pki, http_settings, write_policy
from tests.support.jwt_issuer import ISSUER
from tests.support.stack import CALLER_KEY, NAMESPACE, SERVICE_ACCOUNT

AUDIENCES = ["https://vault.example.com", "sts.example.com"]
RULE = "fuzz-http"
POLICY = {
    "rules": [
        {
            "name": RULE,
            "subjects": [
                {"method": "apiKey", "name": "test-caller"},
                {"method": "jwt", "issuer": ISSUER, "name": "ci/runner"},
            ],
            "namespaces": [NAMESPACE],
            "serviceAccounts": [SERVICE_ACCOUNT],
            "audiences": AUDIENCES,
            "allowApiServerAudience": True,
            "maxExpiration": "2h",
        }
    ]
}
TOKEN_ROUTE = re.compile(r"/api/v1/namespaces/[^/]+/serviceaccounts/[^/]+/token")
TOKEN_PATH = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{SERVICE_ACCOUNT}/token"


@dataclass
class Door:
    server: BrokerServer
    pki: HttpPki
    emulator: Emulator
    audit_file: Path
    session: aiohttp.ClientSession


@pytest.fixture
async def door(
    kubernetes_settings: KubernetesSettings, emulator: Emulator, tmp_path: Path
) -> AsyncIterator[Door]:
    pki = http_pki(tmp_path)
    policy = write_policy(tmp_path, POLICY)
    audit = tmp_path / "audit.jsonl"
    settings = http_settings(kubernetes_settings, pki, policy=policy, tls=False, audit_file=audit)
    async with BrokerServer(settings) as server, aiohttp.ClientSession() as session:
        yield Door(server, pki, emulator, audit, session)


# --- what is drawn --------------------------------------------------------------------------

METHODS = st.sampled_from(["POST"] * 12 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
SEGMENT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=20)
PATHS = st.one_of(
    st.just(TOKEN_PATH),
    st.just(TOKEN_PATH),
    st.just(TOKEN_PATH),
    st.just("/oauth2/token"),
    st.just("/oauth2/token"),
    st.builds(
        lambda ns, name: (
            f"/api/v1/namespaces/{quote(ns, safe='')}/serviceaccounts/{quote(name, safe='')}/token"
        ),
        st.sampled_from([NAMESPACE, "other", "kube-system"]) | SEGMENT,
        st.sampled_from([SERVICE_ACCOUNT, "db-robot"]) | SEGMENT,
    ),
    st.lists(SEGMENT, max_size=6).map(lambda parts: "/" + "/".join(quote(p) for p in parts)),
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json",
        "application/json",
        "application/vnd.kubernetes.protobuf",
        "application/yaml",
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/json; charset=utf-8",
        "",
    ]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def token_request_json(draw: st.DrawFn) -> bytes:
    spec: dict[str, Any] = {
        "audiences": draw(st.lists(st.sampled_from([*AUDIENCES, "evil", ""]), max_size=3))
    }
    if draw(st.booleans()):
        spec["expirationSeconds"] = draw(st.integers(min_value=-10, max_value=2**33) | JSON_VALUES)
    if draw(st.booleans()):
        spec["boundObjectRef"] = draw(
            st.fixed_dictionaries({"kind": st.sampled_from(["Pod", "Secret", "X"])}) | JSON_VALUES
        )
    body: dict[str, Any] = {
        "apiVersion": draw(st.sampled_from(["authentication.k8s.io/v1"] * 6 + ["v1", "x/y/z", ""])),
        "kind": draw(st.sampled_from(["TokenRequest"] * 6 + ["Pod", ""])),
        "spec": spec,
    }
    if draw(st.booleans()):
        body["metadata"] = draw(st.fixed_dictionaries({"name": st.text(max_size=10)}) | JSON_VALUES)
    if draw(st.booleans()):
        body[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    return json.dumps(body).encode()


@st.composite
def bodies(draw: st.DrawFn, secret: str) -> bytes:
    kind = draw(
        st.sampled_from(["json", "json", "json", "bytes", "mutated", "protobuf", "form", "empty"])
    )
    if kind == "json":
        return draw(token_request_json())
    if kind == "mutated":
        raw = bytearray(draw(token_request_json()))
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    if kind == "protobuf":
        raw = draw(st.binary(max_size=200))
        return wire.encode_envelope(raw, "authentication.k8s.io/v1", "TokenRequest")
    if kind == "form":
        pairs = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(
                        [
                            "grant_type",
                            "subject_token",
                            "subject_token_type",
                            "resource",
                            "audience",
                            "scope",
                            "actor_token",
                            "expiration_seconds",
                            "x",
                        ]
                    ),
                    st.text(max_size=40) | st.just(secret),
                ),
                max_size=8,
            )
        )
        return urlencode(pairs).encode()
    if kind == "empty":
        return b""
    return draw(st.binary(max_size=400))


@st.composite
def authorizations(draw: st.DrawFn, secret: str) -> tuple[str | None, bool]:
    """(the Authorization value or None, whether it is the valid API key)."""
    kind = draw(st.sampled_from(["key", "key", "key", "none", "bad", "garbage"]))
    if kind == "key":
        return f"Bearer {CALLER_KEY}", True
    if kind == "none":
        return None, False
    if kind == "bad":
        return f"Bearer tbk_{secret}", False
    text = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60))
    return text[:10] + secret + text[10:], False


# --- the property ---------------------------------------------------------------------------


@settings(FUZZ_SETTINGS, max_examples=200)
@given(data=st.data())
async def test_the_http_door_under_hostile_input(door: Door, data: st.DataObject) -> None:
    secret = marker()
    method = data.draw(METHODS, "method")
    path = data.draw(PATHS, "path")
    query = data.draw(
        st.sampled_from(["", "?dryRun=All", "?pretty=true", "?fieldValidation=Strict", "?x=%ff"]),
        "query",
    )
    content_type = data.draw(CONTENT_TYPES, "content type")
    body = data.draw(bodies(secret), "body")
    authorization, authenticated = data.draw(authorizations(secret), "authorization")
    headers = {"X-Request-Id": data.draw(SEGMENT, "request id")}
    if content_type:
        headers["Content-Type"] = content_type
    if authorization is not None:
        headers["Authorization"] = authorization
    before_requests = door.emulator.token_request_count
    audit_before = door.audit_file.stat().st_size if door.audit_file.exists() else 0
    url = yarl.URL(str(door.server.http_url) + path + query, encoded=True)

    with captured_logs() as logs:
        async with door.session.request(
            method, url, data=body, headers=headers, skip_auto_headers=("Content-Type",)
        ) as response:
            status = response.status
            answer = await response.read()
            answer_headers = dict(response.headers)

    event(f"HTTP {status}")
    assert status < 500, (status, answer)
    assert b"Traceback" not in answer
    on_token_route = TOKEN_ROUTE.fullmatch(path) is not None
    if status in (200, 201):
        assert method == "POST"
        claims = token_claims(
            json.loads(answer)["access_token"]
            if path == "/oauth2/token"
            else _token_of(answer, answer_headers)
        )
        assert claims["sub"] == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
        assert set(claims["aud"]) <= {*AUDIENCES, *door.emulator.config.audiences}
        if path != "/oauth2/token":
            assert authenticated
    else:
        assert json.loads(answer) is not None  # a Status or an OAuth error, as JSON
        if on_token_route and method == "POST" and not authenticated:
            assert status in (401, 413), status
        if path == "/oauth2/token" and method == "POST":
            assert json.loads(answer)["error"]
            assert answer_headers["Cache-Control"] == "no-store"
    if status not in (200, 201):
        assert door.emulator.token_request_count == before_requests or authenticated

    audit = door.audit_file.read_bytes()[audit_before:].decode() if door.audit_file.exists() else ""
    for line in audit.splitlines():
        assert len(line.encode()) <= MAX_AUDIT_LINE_BYTES
        entry = json.loads(line)
        if entry["decision"] == "allowed":
            assert entry["rule"] == RULE
            assert (entry["namespace"], entry["serviceAccount"]) == (NAMESPACE, SERVICE_ACCOUNT)
    outputs = {
        "logs": "\n".join(logs.texts),
        "audit": audit,
        "answer": answer.decode("utf-8", "replace") + json.dumps(answer_headers),
        "metrics": generate_latest(door.server.metrics.registry).decode(),
    }
    for where, text in outputs.items():
        assert secret not in text, f"secret material in the {where}"
        assert CALLER_KEY not in text, f"the API key in the {where}"


def _token_of(answer: bytes, headers: dict[str, str]) -> str:
    if headers.get("Content-Type", "").startswith("application/vnd.kubernetes.protobuf"):
        return pb.TokenRequest.FromString(wire.decode_envelope(answer).raw).status.token
    token: str = json.loads(answer)["status"]["token"]
    return token
