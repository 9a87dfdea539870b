"""The HTTP door in the tests: a broker serving it over HTTPS (trustme PKI), and clients.

`HttpBroker` is a started BrokerServer with `server.httpListen` (and gRPC) on loopback, TLS
from one test CA, callers authenticating with CALLER_KEY (tests.support.stack) or a JWT of a
test issuer; `kube_post` and `oauth_post` send raw requests with aiohttp.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from broker.authn import hash_api_key
from broker.config import KubernetesSettings, Settings, load_settings
from broker.server import BrokerServer
from tests.support.cli import Pki, issue
from tests.support.jwt_issuer import AUDIENCE, ISSUER, Signer, rsa_key, write_jwks
from tests.support.stack import CALLER, CALLER_KEY, CORE_POLICY, NAMESPACE, SERVICE_ACCOUNT

TOKEN_PATH = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{SERVICE_ACCOUNT}/token"
JSON = "application/json"
PROTOBUF = "application/vnd.kubernetes.protobuf"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
# The JWT caller of the test issuer (tests.support.jwt_issuer), as the policy names it.
JWT_SUBJECT = "ci/runner"


@dataclass
class HttpPki:
    server: Pki
    signer: Signer
    jwks_file: Path


def http_pki(tmp_path: Path) -> HttpPki:
    server = issue(tmp_path, "http-server", "localhost", "127.0.0.1")
    signer = Signer(rsa_key(), "http-door-kid", "RS256")
    jwks_file = write_jwks(tmp_path / "jwks.json", signer.jwk())
    return HttpPki(server, signer, jwks_file)


def write_policy(directory: Path, policy: Mapping[str, Any]) -> Path:
    """`policy` as `directory`/policy.yaml, for `http_settings(policy=...)`."""
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(dict(policy)), encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[BrokerServer]:
    """A started broker; stopped at once afterwards (calls still in flight cancelled)."""
    server = BrokerServer(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(None)


def http_settings(
    kube: KubernetesSettings,
    pki: HttpPki,
    *,
    policy: Path = CORE_POLICY,
    tls: bool = True,
    client_ca: bool = False,
    cache: dict[str, Any] | None = None,
    rate_limit: dict[str, Any] | None = None,
    audit_file: Path | None = None,
    **server: Any,
) -> Settings:
    server.setdefault("listen", "127.0.0.1:0")
    server.setdefault("httpListen", "127.0.0.1:0")
    if tls:
        server["tls"] = {"certFile": str(pki.server.cert), "keyFile": str(pki.server.key)}
        if client_ca:
            server["tls"] |= {"clientCaFile": str(pki.server.ca_file), "requireClientCert": True}
    else:
        server["allowPlaintext"] = True
    authentication: dict[str, Any] = {
        "apiKeys": {"keys": [{"name": CALLER, "sha256": hash_api_key(CALLER_KEY)}]},
        "jwt": {
            "issuers": [
                {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "jwksFile": str(pki.jwks_file),
                    "algorithms": ["RS256"],
                }
            ]
        },
    }
    if client_ca:
        authentication["mtls"] = {"enabled": True}
    return load_settings(
        None,
        {
            "server": server,
            "kubernetes": kube,
            "authentication": authentication,
            "policy": {"file": str(policy)},
            "cache": cache if cache is not None else {"enabled": False},
            "rateLimit": rate_limit if rate_limit is not None else {"enabled": False},
            **({"audit": {"sink": "file", "file": str(audit_file)}} if audit_file else {}),
        },
    )


def client_ssl(pki: HttpPki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.server.ca_file))
    if cert is not None:
        context.load_cert_chain(cert[0], cert[1])
    return context


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(
    server: BrokerServer,
    pki: HttpPki | None,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    cert: tuple[Path, Path] | None = None,
) -> Answer:
    url = server.http_url
    assert url is not None
    connector = aiohttp.TCPConnector(
        ssl=client_ssl(pki, cert) if pki is not None and url.startswith("https") else False
    )
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(
            method,
            url + path,
            data=body,
            headers=dict(headers or {}),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response,
    ):
        return Answer(response.status, response.headers, await response.read())


async def kube_post(
    server: BrokerServer,
    pki: HttpPki | None,
    body: dict[str, Any] | bytes,
    *,
    path: str = TOKEN_PATH,
    bearer: str | None = CALLER_KEY,
    content_type: str = JSON,
    accept: str = JSON,
    headers: Mapping[str, str] | None = None,
    cert: tuple[Path, Path] | None = None,
) -> Answer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": content_type, "Accept": accept, **(headers or {})}
    if bearer is not None:
        sent["Authorization"] = f"Bearer {bearer}"
    return await request(server, pki, "POST", path, body=raw, headers=sent, cert=cert)


def token_request_body(
    audiences: list[str] | None = None,
    expiration: int | None = None,
    bound: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"audiences": audiences or []}
    if expiration is not None:
        spec["expirationSeconds"] = expiration
    if bound is not None:
        spec["boundObjectRef"] = bound
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}


def exchange_form(
    subject_token: str | None,
    resource: str | None = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}",
    audiences: tuple[str, ...] = (),
    **extra: str,
) -> list[tuple[str, str]]:
    form = [("grant_type", TOKEN_EXCHANGE), ("subject_token_type", JWT_TYPE)]
    if subject_token is not None:
        form.append(("subject_token", subject_token))
    if resource is not None:
        form.append(("resource", resource))
    form += [("audience", a) for a in audiences]
    form += list(extra.items())
    return form


async def oauth_post(
    server: BrokerServer, pki: HttpPki | None, form: list[tuple[str, str]] | bytes, **kw: Any
) -> Answer:
    from urllib.parse import urlencode

    raw = form if isinstance(form, bytes) else urlencode(form).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", **kw.pop("headers", {})}
    return await request(server, pki, "POST", "/oauth2/token", body=raw, headers=headers, **kw)
