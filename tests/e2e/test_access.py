"""Authentication, default-deny policy and audit, end to end through the real stack.

A real BrokerServer (mutual TLS with trustme PKI, plus a unix socket listener), real gRPC
clients, the API-server emulator over HTTPS, a policy YAML file, API keys in the settings, a
JWT issuer with a JWKS file (keys generated here, tokens signed with PyJWT) and the audit log
in a file that is read back. Nothing on the path is stubbed.

Every log record (all loggers, DEBUG) and every audit file of the module is kept in a
module-wide journal; the last test checks that no issued token, API key, JWT or private key
ever reached them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.authn import generate_api_key, hash_api_key
from broker.config import KubernetesSettings, load_settings
from broker.emulator import Emulator
from broker.errors import ERROR_DOMAIN, RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.policy import DENY_REASONS
from broker.policy_reload import PolicyStore
from broker.reasons import ALLOWED, Reason
from broker.server import BrokerServer
from broker.validation import go_quote
from tests.support.certs import client_cert
from tests.support.cli import Pki, issue
from tests.support.stack import (
    BROKER_TOKEN,
    NAMESPACE,
    OTHER_NAMESPACE,
    OTHER_POD,
    OTHER_SERVICE_ACCOUNT,
    POD,
    SECRET,
    SERVICE_ACCOUNT,
    create_request,
)

# --- identities, keys and the policy ----------------------------------------------------------

SPIFFE_ID = "spiffe://example.org/ci/runner"
MTLS_ID = f"mtls:uri:{SPIFFE_ID}"
BOT = "deploy-bot"
BOT_KEY = generate_api_key()
ZETA_KEY = generate_api_key()  # configured, never used: its rule must never be revealed
WRONG_KEY = generate_api_key()  # not configured
LOCAL = "local-ops"
JWT_ISSUER = "https://issuer.test.example"
JWT_AUDIENCE = "token-broker"
JWT_KID = "test-rsa-1"
GH_MAIN = "repo:example/app:ref:refs/heads/main"
GH_FEATURE = "repo:example/app:ref:refs/heads/feature"

VAULT = "vault.internal"
STS = "https://sts.example.com"
LOCAL_AUD = "local-audit.example"
HIDDEN_AUD = "https://hidden-zeta.example"
EVIL = "https://evil.example"

RULE_CI = "rule-ci-spiffe"
RULE_BOT = "rule-bot-bound"
RULE_GH = "rule-gh-main"
RULE_LOCAL = "rule-local-ops"
RULE_HIDDEN = "rule-hidden-zeta"
RULE_CI_DB = "rule-ci-db"  # only in the reloaded policy

RULES: list[dict[str, Any]] = [
    {
        "name": RULE_CI,
        "subjects": [{"method": "mtls", "name": "spiffe://example.org/ci/*"}],
        "namespaces": [NAMESPACE],
        "serviceAccounts": [SERVICE_ACCOUNT],
        "audiences": [VAULT, STS],
        "defaultAudiences": [VAULT],
        "maxExpiration": "1h",
        "onLongerExpiration": "cap",
        "allowDryRun": True,
    },
    {
        "name": RULE_BOT,
        "subjects": [{"method": "apiKey", "name": BOT}],
        "namespaces": [NAMESPACE],
        "serviceAccounts": [SERVICE_ACCOUNT],
        "audiences": [VAULT],
        "defaultAudiences": [VAULT],
        "defaultExpiration": "20m",
        "maxExpiration": "30m",
        "onLongerExpiration": "reject",
        "boundObject": {"required": True, "kinds": ["Pod"]},
    },
    {
        "name": RULE_GH,
        "subjects": [
            {
                "method": "jwt",
                "issuer": JWT_ISSUER,
                "name": "repo:example/app:*",
                "claims": {
                    "repository_owner": "example",
                    "ref": ["refs/heads/main", "refs/tags/v*"],
                },
            }
        ],
        "namespaces": [NAMESPACE],
        "serviceAccounts": [OTHER_SERVICE_ACCOUNT],
        "audiences": [STS],
        "defaultExpiration": "15m",
        "maxExpiration": "2h",
    },
    {
        "name": RULE_LOCAL,
        "subjects": [{"method": "unixSocket", "name": LOCAL}],
        "namespaces": [NAMESPACE, "team-*"],
        "serviceAccounts": ["*"],
        "audiences": [LOCAL_AUD],
        "allowApiServerAudience": True,
        "maxExpiration": "24h",
    },
    {
        "name": RULE_HIDDEN,
        "subjects": [{"method": "apiKey", "name": "zeta-*"}],
        "namespaces": ["*"],
        "serviceAccounts": ["*"],
        "audiences": [HIDDEN_AUD],
        "allowDryRun": True,
        "maxExpiration": 4294967296,
        "onLongerExpiration": "reject",
    },
]
RULE_NAMES = [r["name"] for r in RULES] + [RULE_CI_DB]
ALLOWLISTED = sorted({a for r in RULES for a in r["audiences"]})
CI_DB_RULE = {
    "name": RULE_CI_DB,
    "subjects": [{"method": "mtls", "name": SPIFFE_ID}],
    "namespaces": [NAMESPACE],
    "serviceAccounts": [OTHER_SERVICE_ACCOUNT],
    "audiences": [VAULT],
    "defaultAudiences": [VAULT],
}


def policy_yaml(*extra: dict[str, Any]) -> str:
    return yaml.safe_dump({"rules": [*RULES, *extra]}, sort_keys=False)


POLICY = policy_yaml()
POLICY_WITH_CI_DB = policy_yaml(CI_DB_RULE)
BROKEN_YAML = "rules: [\n  - name: half-written\n"
BROKEN_SCHEMA = policy_yaml({**CI_DB_RULE, "name": "too-short", "maxExpiration": "5m"})

MESSAGE_INVALID = "the credentials could not be verified"
MESSAGE_MISSING = "the request carries no credentials"
SERVER_DEFAULT_EXPIRATION = 3600
AUDIT_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
TCP_PEER = re.compile(r"ipv4:127\.0\.0\.1:\d+")


# --- the module-wide journal: every log record, audit file and secret -----------------------


@dataclass
class Journal:
    secrets: dict[str, str] = field(default_factory=dict)  # value -> what it is
    audit_files: list[Path] = field(default_factory=list)
    records: list[logging.LogRecord] = field(default_factory=list)
    tokens: int = 0

    def secret(self, what: str, value: str) -> None:
        assert len(value) >= 16, what
        self.secrets[value] = what

    def token(self, what: str, token: str) -> None:
        """A bearer (issued token or JWT): the whole of it and its signature alone."""
        self.secret(what, token)
        signature = token.rsplit(".", 1)[-1]
        if len(signature) >= 16:
            self.secret(f"{what} (signature)", signature)

    def pem(self, what: str, pem: bytes) -> None:
        for line in pem.decode().splitlines():
            if not line.startswith("-----") and len(line) >= 16:
                self.secret(what, line)


@pytest.fixture(scope="module")
def journal() -> Journal:
    return Journal()


@pytest.fixture(autouse=True)
def capture_all_logs(caplog: pytest.LogCaptureFixture, journal: Journal) -> Iterator[None]:
    """caplog at DEBUG for every logger (also those with a level of their own); the records
    of setup, call and teardown go into the journal."""
    caplog.set_level(logging.DEBUG)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level > logging.DEBUG:
            caplog.set_level(logging.DEBUG, logger=name)
    yield
    for when in ("setup", "call"):
        journal.records.extend(caplog.get_records(when))
    journal.records.extend(caplog.records)  # teardown, up to here


def record_text(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except (TypeError, ValueError):
        message = ""
    parts = [message, repr(vars(record))]
    if record.exc_info:
        parts.append("".join(traceback.format_exception(*record.exc_info)))  # type: ignore[misc]
    return "\n".join(parts)


# --- PKI, JWT keys ----------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Material:
    server: Pki  # the broker's certificate; its CA also signs the client certificates
    client: tuple[bytes, bytes]  # SPIFFE_ID, from the server's CA
    other: Pki  # a leaf (DNS SAN client.example) of an unrelated CA
    jwt_key: rsa.RSAPrivateKey
    jwks_file: Path
    journal: Journal

    def jwt(self, *, key: rsa.RSAPrivateKey | None = None, **overrides: Any) -> str:
        """A JWT of the configured issuer (claims matching RULE_GH unless overridden)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": JWT_ISSUER,
            "aud": JWT_AUDIENCE,
            "sub": GH_MAIN,
            "iat": now,
            "exp": now + 300,
            "repository_owner": "example",
            "ref": "refs/heads/main",
        }
        claims.update(overrides)
        token = jwt.encode(claims, key or self.jwt_key, algorithm="RS256", headers={"kid": JWT_KID})
        self.journal.token("a JWT bearer", token)
        return token

    def alg_none(self) -> str:
        now = int(time.time())
        header = b64(json.dumps({"alg": "none", "kid": JWT_KID}).encode())
        payload = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": GH_MAIN, "iat": now}
        payload |= {"exp": now + 300, "repository_owner": "example", "ref": "refs/heads/main"}
        token = f"{header}.{b64(json.dumps(payload).encode())}."
        self.journal.secret("a JWT bearer (alg none)", token)
        return token

    def tampered(self) -> str:
        """A signed feature-branch token whose payload now claims the main branch."""
        header, _, signature = self.jwt(sub=GH_FEATURE, ref="refs/heads/feature").split(".")
        now = int(time.time())
        payload = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": GH_MAIN, "iat": now}
        payload |= {"exp": now + 300, "repository_owner": "example", "ref": "refs/heads/main"}
        token = f"{header}.{b64(json.dumps(payload).encode())}.{signature}"
        self.journal.token("a JWT bearer (tampered)", token)
        return token


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory, journal: Journal) -> Material:
    directory = tmp_path_factory.mktemp("access-pki")
    server = issue(directory, "server", "localhost", "127.0.0.1")
    other = issue(directory, "other", "client.example")
    client = client_cert(server.ca, cn="ignored-cn", uris=(SPIFFE_ID,))
    jwt_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(jwt_key.public_key(), as_dict=True)
    jwk.update(kid=JWT_KID, use="sig", alg="RS256")
    jwks_file = directory / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}), encoding="utf-8")

    for what, pem in (
        ("the CA key", server.ca.private_key_pem.bytes()),
        ("the other CA key", other.ca.private_key_pem.bytes()),
        ("the server key", server.key.read_bytes()),
        ("the other leaf key", other.key.read_bytes()),
        ("the client key", client[1]),
        (
            "the JWT signing key",
            jwt_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
    ):
        journal.pem(what, pem)
    for what, key in (("an API key", BOT_KEY), ("an API key", ZETA_KEY), ("a bad key", WRONG_KEY)):
        journal.secret(what, key)
    journal.secret("the broker's own credential", BROKER_TOKEN)
    return Material(server, client, other, jwt_key, jwks_file, journal)


# --- the broker -------------------------------------------------------------------------------


@dataclass
class Outcome:
    response: pb.CreateTokenResponse | None
    status: RichStatus | None
    request_id: str | None  # the x-request-id of the response's initial metadata


@dataclass
class Broker:
    server: BrokerServer
    emulator: Emulator
    material: Material
    audit_file: Path
    policy_file: Path
    unix_socket: Path

    @property
    def store(self) -> PolicyStore:
        assert isinstance(self.server.policy, PolicyStore)
        return self.server.policy

    def tcp(self, cert: tuple[bytes, bytes] | None = None) -> aio.Channel:
        """A mutual-TLS channel presenting `cert` (default: the SPIFFE client certificate)."""
        cert_pem, key_pem = cert or self.material.client
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.material.server.ca_file.read_bytes(),
            private_key=key_pem,
            certificate_chain=cert_pem,
        )
        return aio.secure_channel(self.server.address, creds)

    def unix(self) -> aio.Channel:
        return aio.insecure_channel(f"unix:{self.unix_socket}")

    def channel(self, transport: str) -> aio.Channel:
        return self.tcp() if transport == "tcp" else self.unix()

    async def create(
        self,
        channel: aio.Channel,
        request: pb.CreateTokenRequest,
        *,
        bearer: str | None = None,
        request_id: str | None = None,
    ) -> Outcome:
        metadata: list[tuple[str, str]] = []
        if bearer is not None:
            metadata.append(("authorization", f"Bearer {bearer}"))
        if request_id is not None:
            metadata.append(("x-request-id", request_id))
        call = pb_grpc.TokenBrokerServiceStub(channel).CreateToken(
            request, metadata=metadata, timeout=15
        )
        try:
            response = await call
        except aio.AioRpcError as err:
            initial = err.initial_metadata() or aio.Metadata()
            return Outcome(None, rich_status_from_call(err), initial.get("x-request-id"))
        initial = await call.initial_metadata()
        self.material.journal.token("an issued token", response.token_request.status.token)
        self.material.journal.tokens += 1
        return Outcome(response, None, initial.get("x-request-id"))

    def audit_lines(self) -> list[dict[str, Any]]:
        text = self.audit_file.read_text(encoding="utf-8")
        assert text == "" or text.endswith("\n")
        return [json.loads(line) for line in text.splitlines()]

    def write_policy(self, text: str) -> None:
        """Replace the policy file atomically (a poll never sees it half-written)."""
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.policy_file)


MakeBroker = Callable[..., Awaitable[Broker]]


def server_tls(material: Material) -> dict[str, Any]:
    """server.tls of the access tests' brokers: mutual TLS against the test CA."""
    pki = material.server
    return {
        "certFile": str(pki.cert),
        "keyFile": str(pki.key),
        "clientCaFile": str(pki.ca_file),
        "requireClientCert": True,
    }


def authentication(material: Material) -> dict[str, Any]:
    """The access tests' callers: mTLS, two API keys, the JWT issuer."""
    return {
        "mtls": {"enabled": True},
        "apiKeys": {
            "keys": [
                {"name": BOT, "sha256": hash_api_key(BOT_KEY)},
                {"name": "zeta-ops", "sha256": hash_api_key(ZETA_KEY)},
            ]
        },
        "jwt": {
            "issuers": [
                {
                    "issuer": JWT_ISSUER,
                    "audiences": [JWT_AUDIENCE],
                    "jwksFile": str(material.jwks_file),
                    "algorithms": ["RS256"],
                }
            ]
        },
    }


@pytest.fixture
async def make_broker(
    emulator: Emulator,
    kubernetes_settings: KubernetesSettings,
    material: Material,
    journal: Journal,
    tmp_path: Path,
) -> AsyncIterator[MakeBroker]:
    """Starts brokers: mutual TLS on 127.0.0.1:0 plus a unix socket, every auth method, the
    policy in a file, the audit log in a file; all stopped at the end of the test."""
    started: list[BrokerServer] = []
    # Short: unix socket paths are limited to ~107 bytes; tmp_path can be longer.
    sockets = tempfile.TemporaryDirectory(prefix="tb-")

    async def make(
        *,
        policy: str = POLICY,
        unix_identity: str | None = LOCAL,
        audit_file: Path | None = None,
        fail_closed: bool = False,
        reload_interval: float = 3600.0,
    ) -> Broker:
        n = len(started)
        policy_file = tmp_path / f"policy-{n}.yaml"
        policy_file.write_text(policy, encoding="utf-8")
        audit = audit_file or tmp_path / f"audit-{n}.jsonl"
        socket_path = Path(sockets.name) / f"broker-{n}.sock"
        settings = load_settings(
            None,
            {
                "server": {
                    "listen": "127.0.0.1:0",
                    "unixSocket": str(socket_path),
                    "tls": server_tls(material),
                },
                "kubernetes": kubernetes_settings,
                "authentication": {
                    **authentication(material),
                    "unixSocket": {"identity": unix_identity},
                },
                "policy": {"file": str(policy_file), "reloadIntervalSeconds": reload_interval},
                "audit": {"sink": "file", "file": str(audit), "failClosed": fail_closed},
                # Every allowed call must reach the API server here (the cache has its own tests).
                "cache": {"enabled": False},
                "rateLimit": {"enabled": False},
            },
        )
        server = BrokerServer(settings)
        await server.start()
        started.append(server)
        if audit.parent == tmp_path:
            journal.audit_files.append(audit)
        return Broker(server, emulator, material, audit, policy_file, socket_path)

    try:
        yield make
    finally:
        for server in started:
            await server.stop(None)
        sockets.cleanup()


# --- checks -----------------------------------------------------------------------------------


def verify(emulator: Emulator, token: str, audience: list[str]) -> dict[str, Any]:
    """The claims of a token, verified against the emulator's JWKS."""
    header = jwt.get_unverified_header(token)
    keys = jwt.PyJWKSet.from_dict(emulator.jwks())
    key = next(k for k in keys.keys if k.key_id == header["kid"])
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=[header["alg"]], audience=audience, issuer=emulator.config.issuer
    )
    return claims


def nmr(identity: str, namespace: str, service_account: str) -> str:
    return (
        f"no policy rule allows {go_quote(identity)} to request tokens for service account "
        f'"{service_account}" in namespace "{namespace}"'
    )


def not_allowed(audience: str) -> str:
    return f'audience "{audience}" is not allowed for this service account'


def shortened(requested: int, granted: int) -> str:
    return f"requested expiration of {requested} seconds shortened to {granted} seconds"


DRY_RUN_MESSAGE = "dry-run requests are not allowed for this service account"
BOUND_REQUIRED_MESSAGE = (
    "tokens for this service account must be bound to an object "
    "(token_request.spec.bound_object_ref, kind Pod)"
)
AUDIENCE_REQUIRED_MESSAGE = (
    "an audience is required: tokens for this service account are not issued for the API "
    "server's own audience; set token_request.spec.audiences"
)
UNAUTHENTICATED_REASONS = (Reason.CREDENTIALS_INVALID, Reason.CREDENTIALS_MISSING)


@dataclass(frozen=True)
class Case:
    label: str
    namespace: str = NAMESPACE
    service_account: str = SERVICE_ACCOUNT
    audiences: tuple[str, ...] = ()
    expiration: int | None = None
    bound: tuple[str, str] | None = None  # (kind, name)
    dry_run: bool = False
    # The answer.
    reason: str = ALLOWED
    rule: str | None = None
    message: str = ""  # refused: the exact message
    granted: tuple[str, ...] = ()  # allowed: audiences sent upstream (none: the API server's)
    sent_expiration: int | None = None  # allowed: expirationSeconds sent upstream
    warning: str | None = None

    @property
    def allowed(self) -> bool:
        return self.reason == ALLOWED

    @property
    def code(self) -> grpc.StatusCode:
        if self.allowed:
            return grpc.StatusCode.OK
        if self.reason in UNAUTHENTICATED_REASONS:
            return grpc.StatusCode.UNAUTHENTICATED
        return grpc.StatusCode.PERMISSION_DENIED

    @property
    def lifetime(self) -> int:
        return self.sent_expiration or SERVER_DEFAULT_EXPIRATION

    def request(self) -> pb.CreateTokenRequest:
        bound = None
        if self.bound is not None:
            bound = pb.BoundObjectReference(
                kind=self.bound[0], api_version="v1", name=self.bound[1]
            )
        return create_request(
            self.namespace,
            self.service_account,
            audiences=list(self.audiences),
            expiration_seconds=self.expiration,
            bound=bound,
            dry_run=["All"] if self.dry_run else None,
        )

    def undisclosed(self) -> list[str]:
        """What a refusal must not say: other rules' names, and allowlisted audiences the
        caller did not ask for."""
        names = [n for n in RULE_NAMES if n != self.rule]
        return names + [a for a in ALLOWLISTED if a not in self.audiences]


def ok(label: str, rule: str, granted: tuple[str, ...], sent: int | None, **kw: Any) -> Case:
    return Case(label, rule=rule, granted=granted, sent_expiration=sent, **kw)


def no(label: str, reason: str, message: str, rule: str | None = None, **kw: Any) -> Case:
    return Case(label, reason=reason, rule=rule, message=message, **kw)


POD_REF = ("Pod", POD)
SECRET_REF = ("Secret", SECRET)
SA2 = OTHER_SERVICE_ACCOUNT


@dataclass(frozen=True)
class Caller:
    transport: str  # tcp (mutual TLS, the SPIFFE certificate) or unix
    credential: str | None  # the bearer: None, "key", "wrong-key", "jwt", "jwt-feature"
    user: str | None  # the identity the audit records (None: unauthenticated)
    method: str | None
    issuer: str | None = None
    unix_identity: str | None = LOCAL  # the broker's unixSocket.identity


CALLERS: dict[str, Caller] = {
    "mtls": Caller("tcp", None, SPIFFE_ID, "mtls"),
    "api-key": Caller("tcp", "key", BOT, "apiKey"),
    "jwt": Caller("tcp", "jwt", GH_MAIN, "jwt", JWT_ISSUER),
    "jwt-feature-branch": Caller("tcp", "jwt-feature", GH_FEATURE, "jwt", JWT_ISSUER),
    "unix-socket": Caller("unix", None, LOCAL, "unixSocket"),
    # A bad bearer over a connection whose (valid) certificate policy would allow: no fallback.
    "wrong-key": Caller("tcp", "wrong-key", None, None),
    "no-credentials": Caller("unix", None, None, None, unix_identity=None),
}

MATRIX: dict[str, list[Case]] = {
    "mtls": [
        ok("default audience, server-default expiration", RULE_CI, (VAULT,), None),
        ok("allowlisted audience, shorter expiration", RULE_CI, (STS,), 1800,
           audiences=(STS,), expiration=1800),
        ok("longer expiration capped", RULE_CI, (VAULT, STS), 3600,
           audiences=(VAULT, STS), expiration=7200, warning=shortened(7200, 3600)),
        ok("dry run allowed", RULE_CI, (VAULT,), None, dry_run=True),
        ok("bound object optional, any kind", RULE_CI, (VAULT,), None, bound=SECRET_REF),
        no("audience outside the allowlist", Reason.AUDIENCE_NOT_ALLOWED, not_allowed(EVIL),
           RULE_CI, audiences=(EVIL,)),
        no("another rule's audience", Reason.AUDIENCE_NOT_ALLOWED, not_allowed(HIDDEN_AUD), RULE_CI,
           audiences=(VAULT, HIDDEN_AUD)),
        no("service account not allowed", Reason.NO_MATCHING_RULE, nmr(MTLS_ID, NAMESPACE, SA2),
           service_account=SA2),
        no("namespace not allowed", Reason.NO_MATCHING_RULE,
           nmr(MTLS_ID, OTHER_NAMESPACE, SERVICE_ACCOUNT), namespace=OTHER_NAMESPACE),
    ],
    "api-key": [
        ok("bound pod, rule defaults", RULE_BOT, (VAULT,), 1200, bound=POD_REF),
        ok("bound pod, explicit audience and expiration", RULE_BOT, (VAULT,), 1500,
           bound=POD_REF, audiences=(VAULT,), expiration=1500),
        no("bound object required", Reason.BOUND_OBJECT_REQUIRED, BOUND_REQUIRED_MESSAGE, RULE_BOT),
        no("bound kind not allowed", Reason.BOUND_KIND_NOT_ALLOWED,
           'tokens for this service account may not be bound to a "Secret" (allowed kinds: Pod)',
           RULE_BOT, bound=SECRET_REF),
        no("expiration above the maximum rejected", Reason.EXPIRATION_TOO_LONG,
           "requested expiration of 3600 seconds is longer than the maximum of 1800 seconds "
           "for this service account", RULE_BOT, bound=POD_REF, expiration=3600),
        no("dry run not allowed", Reason.DRY_RUN_NOT_ALLOWED, DRY_RUN_MESSAGE, RULE_BOT,
           bound=POD_REF, dry_run=True),
        no("audience outside the allowlist", Reason.AUDIENCE_NOT_ALLOWED, not_allowed(STS),
           RULE_BOT, bound=POD_REF, audiences=(STS,)),
        no("namespace not allowed", Reason.NO_MATCHING_RULE,
           nmr(f"apiKey:{BOT}", OTHER_NAMESPACE, SERVICE_ACCOUNT),
           namespace=OTHER_NAMESPACE, bound=POD_REF),
        no("service account not allowed", Reason.NO_MATCHING_RULE,
           nmr(f"apiKey:{BOT}", NAMESPACE, SA2), service_account=SA2, bound=("Pod", OTHER_POD)),
    ],
    "jwt": [
        ok("rule default expiration", RULE_GH, (STS,), 900, service_account=SA2, audiences=(STS,)),
        ok("longer expiration capped", RULE_GH, (STS,), 7200, service_account=SA2,
           audiences=(STS,), expiration=10800, warning=shortened(10800, 7200)),
        ok("bound pod allowed", RULE_GH, (STS,), 900, service_account=SA2, audiences=(STS,),
           bound=("Pod", OTHER_POD)),
        no("audience required", Reason.AUDIENCE_REQUIRED, AUDIENCE_REQUIRED_MESSAGE, RULE_GH,
           service_account=SA2),
        no("audience outside the allowlist", Reason.AUDIENCE_NOT_ALLOWED, not_allowed(VAULT),
           RULE_GH, service_account=SA2, audiences=(VAULT,)),
        no("dry run not allowed", Reason.DRY_RUN_NOT_ALLOWED, DRY_RUN_MESSAGE, RULE_GH,
           service_account=SA2, audiences=(STS,), dry_run=True),
        no("service account not allowed", Reason.NO_MATCHING_RULE,
           nmr(f"jwt:{JWT_ISSUER}#{GH_MAIN}", NAMESPACE, SERVICE_ACCOUNT), audiences=(STS,)),
    ],
    "jwt-feature-branch": [
        no("claims do not match", Reason.NO_MATCHING_RULE,
           nmr(f"jwt:{JWT_ISSUER}#{GH_FEATURE}", NAMESPACE, SA2),
           service_account=SA2, audiences=(STS,)),
    ],
    "unix-socket": [
        ok("the API server's own audience", RULE_LOCAL, (), None),
        ok("bound object optional", RULE_LOCAL, (), None, bound=POD_REF),
        ok("longer expiration capped", RULE_LOCAL, (LOCAL_AUD,), 86400, service_account=SA2,
           audiences=(LOCAL_AUD,), expiration=172800, warning=shortened(172800, 86400)),
        no("audience outside the allowlist", Reason.AUDIENCE_NOT_ALLOWED, not_allowed(EVIL),
           RULE_LOCAL, audiences=(EVIL,)),
        no("dry run not allowed", Reason.DRY_RUN_NOT_ALLOWED, DRY_RUN_MESSAGE, RULE_LOCAL,
           dry_run=True),
        no("namespace not allowed", Reason.NO_MATCHING_RULE,
           nmr(f"unixSocket:{LOCAL}", OTHER_NAMESPACE, SERVICE_ACCOUNT),
           namespace=OTHER_NAMESPACE),
    ],
    "wrong-key": [
        no("a target the certificate would get", Reason.CREDENTIALS_INVALID, MESSAGE_INVALID),
        no("a target nobody gets", Reason.CREDENTIALS_INVALID, MESSAGE_INVALID,
           namespace=OTHER_NAMESPACE, audiences=(HIDDEN_AUD,)),
    ],
    "no-credentials": [
        no("an allowed target", Reason.CREDENTIALS_MISSING, MESSAGE_MISSING),
        no("a disallowed target", Reason.CREDENTIALS_MISSING, MESSAGE_MISSING,
           namespace=OTHER_NAMESPACE),
    ],
}  # fmt: skip


def case_of(caller: str, label: str) -> Case:
    return next(case for case in MATRIX[caller] if case.label == label)


def bearer_for(credential: str | None, material: Material) -> str | None:
    if credential == "key":
        return BOT_KEY
    if credential == "wrong-key":
        return WRONG_KEY
    if credential == "jwt":
        return material.jwt()
    if credential == "jwt-feature":
        return material.jwt(sub=GH_FEATURE, ref="refs/heads/feature")
    return None


def check_minted(emulator: Emulator, case: Case, out: Outcome, before: int) -> dict[str, Any]:
    """An allowed case: exactly one token request upstream, with the granted audiences and
    expiration, and a real token with the expected claims; the claims."""
    assert out.status is None, (case.label, out.status)
    assert out.response is not None
    assert emulator.token_request_count == before + 1, case.label
    seen = emulator.token_requests[-1]
    assert (seen.namespace, seen.name) == (case.namespace, case.service_account)
    assert seen.body["spec"]["audiences"] == list(case.granted), case.label
    assert seen.body["spec"].get("expirationSeconds") == case.sent_expiration, case.label
    assert seen.query.get("dryRun") == ("All" if case.dry_run else None), case.label

    tr = out.response.token_request
    audiences = list(case.granted) or emulator.config.audiences
    assert list(tr.spec.audiences) == audiences, case.label
    assert tr.spec.expiration_seconds == case.lifetime, case.label
    assert list(out.response.warnings) == ([case.warning] if case.warning else []), case.label
    claims = verify(emulator, tr.status.token, audiences)
    assert claims["sub"] == f"system:serviceaccount:{case.namespace}:{case.service_account}"
    assert claims["aud"] == audiences, case.label
    assert claims["exp"] - claims["iat"] == case.lifetime, case.label
    assert claims["exp"] == tr.status.expiration_timestamp.seconds
    k8s = claims["kubernetes.io"]
    for kind in ("pod", "secret", "node"):
        if case.bound is not None and kind == case.bound[0].lower():
            assert k8s[kind]["name"] == case.bound[1], case.label
        elif kind != "node":  # a pod-bound token also names the pod's node
            assert kind not in k8s, case.label
    issued_id = seen.audit_annotations["authentication.kubernetes.io/issued-credential-id"]
    assert issued_id == f"JTI={claims['jti']}"  # as the API server audits it
    return claims


def check_refused(emulator: Emulator, case: Case, out: Outcome, before: int) -> None:
    """A refused case: the code, reason and message, nothing else revealed, nothing minted."""
    assert out.response is None, case.label
    assert emulator.token_request_count == before, case.label
    status = out.status
    assert status is not None
    assert status.code == case.code, (case.label, status)
    assert status.message == case.message, case.label
    info = status.error_info
    assert info is not None
    assert (info.reason, info.domain) == (case.reason, ERROR_DOMAIN), case.label
    assert dict(info.metadata) == ({"rule": case.rule} if case.rule else {}), case.label
    assert status.bad_request is None
    shown = [status.message, *info.metadata.keys(), *info.metadata.values()]
    shown += [*status.trailers.keys(), *status.trailers.values()]
    leaked = [s for s in case.undisclosed() if any(s in text for text in shown)]
    assert not leaked, (case.label, leaked)


def check_audit_line(
    line: dict[str, Any],
    case: Case,
    caller: Caller,
    request_id: str,
    claims: dict[str, Any] | None,
    emulator: Emulator,
) -> None:
    authenticated = case.reason not in UNAUTHENTICATED_REASONS
    assert line["requestID"] == request_id
    assert line["user"] == (caller.user if authenticated else None), case.label
    assert line["authMethod"] == (caller.method if authenticated else None), case.label
    assert line["issuer"] == (caller.issuer if authenticated else None), case.label
    if caller.transport == "tcp":
        assert TCP_PEER.fullmatch(line["peer"]), line["peer"]
    else:
        assert line["peer"].startswith("unix:"), line["peer"]
    assert (line["namespace"], line["serviceAccount"]) == (case.namespace, case.service_account)
    if not authenticated:  # the request's other fields are not recorded
        assert (line["audiences"], line["requestedExpirationSeconds"]) == (None, None)
        assert (line["dryRun"], line["boundObjectRef"]) == (None, None)
    else:
        assert line["audiences"] == list(case.audiences)
        assert line["requestedExpirationSeconds"] == case.expiration
        assert line["dryRun"] is case.dry_run
        bound = line["boundObjectRef"]
        assert (bound and (bound["kind"], bound["name"])) == (case.bound or None), case.label
    assert line["decision"] == ("allowed" if case.allowed else "denied"), case.label
    assert (line["rule"], line["reason"], line["code"]) == (
        case.rule,
        case.reason,
        case.code.name,
    ), case.label
    if case.allowed:
        assert claims is not None
        assert line["grantedAudiences"] == (list(case.granted) or emulator.config.audiences)
        assert line["grantedExpirationSeconds"] == case.lifetime
        assert line["upstreamStatus"] == 201
        assert line["jti"] == claims["jti"]
        assert isinstance(line["tokenSHA256"], str) and len(line["tokenSHA256"]) == 16
    else:
        assert line["grantedAudiences"] == []
        assert line["grantedExpirationSeconds"] is None
        assert (line["upstreamStatus"], line["jti"], line["tokenSHA256"]) == (None, None, None)


# --- 1. the matrix -----------------------------------------------------------------------------


@pytest.mark.parametrize("caller_name", list(MATRIX))
async def test_access_matrix(
    caller_name: str, make_broker: MakeBroker, emulator: Emulator, material: Material
) -> None:
    caller = CALLERS[caller_name]
    cases = MATRIX[caller_name]
    broker = await make_broker(unix_identity=caller.unix_identity)
    bearer = bearer_for(caller.credential, material)
    claims: list[dict[str, Any] | None] = []
    async with broker.channel(caller.transport) as channel:
        for i, case in enumerate(cases):
            before = emulator.token_request_count
            request_id = f"{caller_name}-{i}"
            out = await broker.create(channel, case.request(), bearer=bearer, request_id=request_id)
            assert out.request_id == request_id, case.label
            if case.allowed:
                claims.append(check_minted(emulator, case, out, before))
            else:
                check_refused(emulator, case, out, before)
                claims.append(None)

    lines = broker.audit_lines()
    assert [line["requestID"] for line in lines] == [
        f"{caller_name}-{i}" for i in range(len(cases))
    ]
    for i, (line, case, case_claims) in enumerate(zip(lines, cases, claims, strict=True)):
        check_audit_line(line, case, caller, f"{caller_name}-{i}", case_claims, emulator)


def test_the_matrix_covers_every_reason() -> None:
    reasons = {case.reason for cases in MATRIX.values() for case in cases}
    assert reasons == {
        ALLOWED,
        *DENY_REASONS,
        Reason.CREDENTIALS_INVALID,
        Reason.CREDENTIALS_MISSING,
    }
    assert {caller.method for caller in CALLERS.values()} == {
        "mtls",
        "apiKey",
        "jwt",
        "unixSocket",
        None,
    }


# --- 2. credentials that do not verify -----------------------------------------------------------

# case -> (the token, from the configured key unless said otherwise; what the operator log says)
BAD_JWTS: dict[str, tuple[Callable[[Material], str], str]] = {
    "expired": (
        lambda m: m.jwt(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        "token expired",
    ),
    "wrong issuer": (lambda m: m.jwt(iss="https://evil.example"), "issuer not configured"),
    "wrong audience": (lambda m: m.jwt(aud="someone-else"), "audience not accepted"),
    "alg none": (Material.alg_none, "algorithm not allowed"),
    "tampered": (Material.tampered, "signature verification failed"),
    "signed by another key": (
        lambda m: m.jwt(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "signature verification failed",
    ),
}


async def test_jwt_rejections_end_to_end(
    make_broker: MakeBroker,
    emulator: Emulator,
    material: Material,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = await make_broker()
    # A request the good token gets (RULE_GH), over a connection whose certificate is valid.
    request = MATRIX["jwt"][0].request()
    async with broker.tcp() as channel:
        for i, (case, (make, _)) in enumerate(BAD_JWTS.items()):
            out = await broker.create(
                channel, request, bearer=make(material), request_id=f"bad-{i}"
            )
            assert out.response is None, case
            assert out.status is not None
            assert out.status.code == grpc.StatusCode.UNAUTHENTICATED, case
            assert out.status.message == MESSAGE_INVALID, case
            assert out.status.error_info is not None
            assert out.status.error_info.reason == Reason.CREDENTIALS_INVALID, case
            assert dict(out.status.error_info.metadata) == {}, case
        assert emulator.token_request_count == 0
        good = await broker.create(channel, request, bearer=material.jwt(), request_id="good")
        assert good.response is not None and emulator.token_request_count == 1

    failures = [
        getattr(r, "auth_failure", None)
        for r in caplog.records
        if r.name == "broker.authn" and r.levelno == logging.WARNING
    ]
    assert failures == [reason for _, reason in BAD_JWTS.values()]
    lines = broker.audit_lines()
    assert [line["requestID"] for line in lines] == [f"bad-{i}" for i in range(len(BAD_JWTS))] + [
        "good"
    ]
    for line in lines[:-1]:
        assert (line["user"], line["authMethod"], line["rule"]) == (None, None, None)
        assert (line["decision"], line["reason"]) == ("denied", Reason.CREDENTIALS_INVALID)
    assert (lines[-1]["user"], lines[-1]["decision"]) == (GH_MAIN, "allowed")


async def test_client_certificate_from_another_ca_fails_the_handshake(
    make_broker: MakeBroker, emulator: Emulator, material: Material
) -> None:
    broker = await make_broker()
    other = (material.other.cert.read_bytes(), material.other.key.read_bytes())
    no_cert = grpc.ssl_channel_credentials(material.server.ca_file.read_bytes())
    request = create_request()
    for channel in (broker.tcp(other), aio.secure_channel(broker.server.address, no_cert)):
        async with channel:
            with pytest.raises(aio.AioRpcError) as err:
                # An API key that is valid: the TLS layer refuses before anyone looks at it.
                await pb_grpc.TokenBrokerServiceStub(channel).CreateToken(
                    request, metadata=(("authorization", f"Bearer {BOT_KEY}"),), timeout=15
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The calls never reached the service: nothing audited, nothing minted.
    assert broker.audit_lines() == []
    assert emulator.token_request_count == 0
    async with broker.tcp() as channel:
        assert (await broker.create(channel, request)).response is not None
    assert len(broker.audit_lines()) == 1


# --- 3. policy reload on the running broker ------------------------------------------------------


async def health(channel: aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int((await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)).status)


DB_REQUEST = Case("db-robot for the certificate", service_account=SA2)


async def expect_db_denied(broker: Broker, channel: aio.Channel) -> None:
    before = broker.emulator.token_request_count
    out = await broker.create(channel, DB_REQUEST.request())
    assert out.status is not None and out.status.error_info is not None
    assert out.status.error_info.reason == Reason.NO_MATCHING_RULE
    assert broker.emulator.token_request_count == before


async def expect_db_allowed(broker: Broker, channel: aio.Channel) -> None:
    before = broker.emulator.token_request_count
    out = await broker.create(channel, DB_REQUEST.request())
    case = ok("db-robot", RULE_CI_DB, (VAULT,), None, service_account=SA2)
    check_minted(broker.emulator, case, out, before)


async def test_policy_reload_explicit(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    store = broker.store
    async with broker.tcp() as channel:
        await expect_db_denied(broker, channel)

        broker.write_policy(POLICY_WITH_CI_DB)
        assert await store.reload() is True
        await expect_db_allowed(broker, channel)
        in_force = store.current

        broken_files = ((BROKEN_YAML, "is not valid YAML"), (BROKEN_SCHEMA, "maxExpiration"))
        for broken, problem in broken_files:
            broker.write_policy(broken)
            assert await store.reload() is False
            assert store.last_error is not None and problem in store.last_error
            assert store.current is in_force  # the last good policy stays in force
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
            await expect_db_allowed(broker, channel)
        assert (store.reload_count, store.reload_failures) == (1, 2)

        # And back: a good file that no longer allows it.
        broker.write_policy(POLICY)
        assert await store.reload() is True
        assert store.last_error is None
        await expect_db_denied(broker, channel)

    rules = [line["rule"] for line in broker.audit_lines()]
    assert rules == [None, RULE_CI_DB, RULE_CI_DB, RULE_CI_DB, None]


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_policy_reload_by_polling(make_broker: MakeBroker) -> None:
    broker = await make_broker(reload_interval=0.05)
    store = broker.store
    async with broker.tcp() as channel:
        await expect_db_denied(broker, channel)
        broker.write_policy(POLICY_WITH_CI_DB)
        await wait_until(lambda: store.reload_count >= 1)
        await expect_db_allowed(broker, channel)

        broker.write_policy(BROKEN_YAML)
        await wait_until(lambda: store.reload_failures >= 1)
        assert store.last_error is not None and "is not valid YAML" in store.last_error
        await expect_db_allowed(broker, channel)
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert store.reload_count == 1


# --- 4. the audit log ----------------------------------------------------------------------------


async def test_audit_lines_field_by_field(
    make_broker: MakeBroker, emulator: Emulator, material: Material
) -> None:
    broker = await make_broker()
    uid = str(emulator.store.get_pod(NAMESPACE, POD).uid)
    allowed = create_request(
        audiences=[STS],
        expiration_seconds=7200,
        bound=pb.BoundObjectReference(kind="Pod", api_version="v1", name=POD, uid=uid),
    )
    denied = case_of("api-key", "dry run not allowed").request()
    async with broker.tcp() as channel:
        ok_out = await broker.create(channel, allowed, request_id="audit-allowed-1")
        denied_out = await broker.create(
            channel, denied, bearer=BOT_KEY, request_id="audit-denied-2"
        )
        # No x-request-id: the broker makes one up, returns it and audits it.
        unauth_out = await broker.create(channel, create_request(), bearer=WRONG_KEY)

    assert ok_out.response is not None and ok_out.request_id == "audit-allowed-1"
    token = ok_out.response.token_request.status.token
    claims = verify(emulator, token, [STS])
    assert denied_out.status is not None and denied_out.request_id == "audit-denied-2"
    assert unauth_out.status is not None and unauth_out.request_id
    assert re.fullmatch(r"[0-9a-f-]{36}", unauth_out.request_id)

    lines = broker.audit_lines()
    assert len(lines) == 3
    for line in lines:
        assert AUDIT_TIME.fullmatch(line.pop("time"))
        latency = line.pop("latencyMs")
        assert isinstance(latency, float | int) and latency >= 0
        assert TCP_PEER.fullmatch(line.pop("peer"))
    common = {"kind": "TokenBrokerAudit", "apiVersion": "audit.tokenbroker.dev/v1"}
    common |= {"stage": "ResponseComplete", "namespace": NAMESPACE, "door": "grpc"}
    assert lines[0] == {
        **common,
        "requestID": "audit-allowed-1",
        "user": SPIFFE_ID,
        "authMethod": "mtls",
        "issuer": None,
        "certificateField": "uri",
        "serviceAccount": SERVICE_ACCOUNT,
        "audiences": [STS],
        "grantedAudiences": [STS],
        "requestedExpirationSeconds": 7200,
        "grantedExpirationSeconds": 3600,
        "tokenLifetimeSeconds": 3600,
        "boundObjectRef": {"kind": "Pod", "name": POD, "uid": uid},
        "dryRun": False,
        "decision": "allowed",
        "rule": RULE_CI,
        "reason": ALLOWED,
        "code": "OK",
        "upstreamStatus": 201,
        "jti": claims["jti"],
        "tokenSHA256": hashlib.sha256(token.encode()).hexdigest()[:16],
    }
    assert lines[1] == {
        **common,
        "requestID": "audit-denied-2",
        "user": BOT,
        "authMethod": "apiKey",
        "issuer": None,
        "certificateField": None,
        "serviceAccount": SERVICE_ACCOUNT,
        "audiences": [],
        "grantedAudiences": [],
        "requestedExpirationSeconds": None,
        "grantedExpirationSeconds": None,
        "tokenLifetimeSeconds": None,
        "boundObjectRef": {"kind": "Pod", "name": POD, "uid": None},
        "dryRun": True,
        "decision": "denied",
        "rule": RULE_BOT,
        "reason": Reason.DRY_RUN_NOT_ALLOWED,
        "code": "PERMISSION_DENIED",
        "upstreamStatus": None,
        "jti": None,
        "tokenSHA256": None,
    }
    assert lines[2] == {
        **common,
        "requestID": unauth_out.request_id,
        "user": None,
        "authMethod": None,
        "issuer": None,
        "certificateField": None,
        "serviceAccount": SERVICE_ACCOUNT,
        "audiences": None,
        "grantedAudiences": [],
        "requestedExpirationSeconds": None,
        "grantedExpirationSeconds": None,
        "tokenLifetimeSeconds": None,
        "boundObjectRef": None,
        "dryRun": None,
        "decision": "denied",
        "rule": None,
        "reason": Reason.CREDENTIALS_INVALID,
        "code": "UNAUTHENTICATED",
        "upstreamStatus": None,
        "jti": None,
        "tokenSHA256": None,
    }
    assert emulator.token_request_count == 1


async def test_audit_fail_closed_withholds_the_token(
    make_broker: MakeBroker, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await make_broker(audit_file=Path("/dev/full"), fail_closed=True)  # ENOSPC
    async with broker.tcp() as channel:
        out = await broker.create(channel, create_request(), request_id="fail-closed-1")
    assert out.response is None  # no token reaches the caller
    assert out.status is not None and out.request_id == "fail-closed-1"
    assert out.status.code == grpc.StatusCode.UNAVAILABLE
    assert out.status.message == (
        "the Kubernetes API server minted a token, but the token broker withheld it: its audit "
        "line could not be written (No space left on device); the token is not cached; retry "
        "later"
    )
    assert out.status.error_info is not None
    assert out.status.error_info.reason == Reason.AUDIT_UNAVAILABLE
    assert out.status.retry_info is not None
    assert out.status.retry_info.retry_delay.seconds == 5
    # Minted upstream, then withheld: the caller got nothing that could be used.
    assert emulator.token_request_count == 1
    assert any(
        r.name == "broker.audit" and r.levelno == logging.ERROR and "failClosed" in r.getMessage()
        for r in caplog.records
    )
    # A refused call keeps its own status: there was no token to withhold.
    async with broker.tcp() as channel:
        out = await broker.create(channel, create_request(namespace="nowhere"))
    assert out.status is not None and out.status.code == grpc.StatusCode.PERMISSION_DENIED
    assert out.status.error_info is not None
    assert out.status.error_info.reason == Reason.NO_MATCHING_RULE
    assert emulator.token_request_count == 1


# --- 5. secrets never reach the logs or the audit log -----------------------------------------


@pytest.mark.last_in_module
async def test_no_secret_in_any_log_or_audit_line(
    make_broker: MakeBroker,
    material: Material,
    journal: Journal,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Runs last in the module (conftest.py orders it): the journal holds every record and
    audit file of the module. One call per method here too, so the check is not empty when
    this test runs alone."""
    broker = await make_broker()
    async with broker.tcp() as channel:
        for case, bearer in (
            (MATRIX["mtls"][0], None),
            (MATRIX["api-key"][0], BOT_KEY),
            (MATRIX["jwt"][0], material.jwt()),
            (MATRIX["wrong-key"][0], WRONG_KEY),
        ):
            out = await broker.create(channel, case.request(), bearer=bearer)
            assert (out.response is not None) is case.allowed
    async with broker.unix() as channel:
        assert (await broker.create(channel, MATRIX["unix-socket"][0].request())).response

    records = [
        *journal.records,
        *caplog.get_records("setup"),
        *caplog.records,
    ]
    texts = [(f"log record {r.name}:{r.lineno}", record_text(r)) for r in records]
    audits = [(f"audit file {p.name}", p.read_text(encoding="utf-8")) for p in journal.audit_files]
    assert journal.tokens >= 4
    assert all(text for _, text in audits)
    assert any("authentication failed" in text for _, text in texts)
    found = [
        (what, where)
        for secret, what in journal.secrets.items()
        for where, text in [*texts, *audits]
        if secret in text
    ]
    assert not found, found
