"""Support for the boundary fuzz tests (tests/e2e/test_fuzz_boundary.py): the two brokers they
fuzz, the ways to call them, and the checks every example makes.

- `dev_target`: a broker as `token-broker serve --dev` runs it (broker.devmode.dev_settings: the
  dev policy, the API key and unix-socket identity `dev`) on an emulator with the dev seed;
  optionally with mutual TLS (`serve --dev --config` with `server.tls`), for certificate names.
- `configured_target`: every authentication method at once: mutual TLS with a client CA, an API
  key, a JWT issuer with a JWKS file and the unix socket's identity, under FUZZ_POLICY.

Both with the rate limits and the per-address limit on failed authentication off: they would
turn most examples into RESOURCE_EXHAUSTED before the parsers these tests fuzz ever ran (they
are tested in test_ratelimit*.py and test_hardening_amplification.py).

`Target.observe()` marks what was written before an example; `Target.check()` then asserts,
for that example: never UNKNOWN or INTERNAL; its audit line(s) written and each under
MAX_AUDIT_LINE_BYTES; nothing of the example's secrets in any log record (as logged, before any
redaction), audit line, answer (message, trailers, initial metadata) or /metrics; and no
TokenRequest at the API server for a call refused as unauthenticated or not a valid request.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc import aio
from hypothesis import HealthCheck, settings
from prometheus_client import generate_latest

from broker.audit import MAX_AUDIT_LINE_BYTES
from broker.authn_apikeys import generate_api_key, hash_api_key
from broker.config import KubernetesSettings, load_settings
from broker.devmode import DEV_IDENTITY, DEV_SEED, broker_user_token, dev_settings
from broker.emulator import Emulator
from broker.errors import ERROR_DOMAIN, RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.reasons import Reason
from broker.request_id import REQUEST_ID_METADATA_KEY
from broker.server import SERVICE_NAME, BrokerServer
from tests.support.certs import client_cert
from tests.support.cli import Pki
from tests.support.hardening import eventually, new_signer
from tests.support.jwt_issuer import Signer, issuer_settings, write_jwks
from tests.support.suite_secrets import record_text

CREATE_TOKEN = f"/{SERVICE_NAME}/CreateToken"
OK = grpc.StatusCode.OK
NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# The fuzz tests' settings (these and test_reliability.py's), each with a bounded number of
# examples of its own (`@settings(FUZZ_SETTINGS, max_examples=N)`).
FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,  # nothing written to the repository
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
NO_LIMITS = {"enabled": False, "authFailuresPerPeer": None}
CALL_TIMEOUT = 20.0  # seconds: only to stop a hung call

# The configured broker's callers and policy.
API_KEY_CALLER = "fuzz-caller"
LOCAL_CALLER = "fuzz-local"
JWT_CALLER = "ci/runner"
ALLOWED_SPIFFE_ID = "spiffe://example.org/ci/runner"
NAMESPACE = "demo"
SERVICE_ACCOUNT = "build-robot"
_RULE = {
    "namespaces": [NAMESPACE],
    "serviceAccounts": [SERVICE_ACCOUNT],
    "audiences": ["vault", "sts.example.com"],
    "defaultAudiences": ["vault"],
    "maxExpiration": "1h",
    "onLongerExpiration": "cap",
    "allowDryRun": True,
}
# In this order: the first matching rule decides (the mtls rules are the README's examples).
FUZZ_POLICY = {
    "rules": [
        {
            "name": "spiffe-ci",
            "subjects": [{"method": "mtls", "name": "spiffe://example.org/ci/*"}],
        },
        {
            "name": "spiffe-deep",
            "subjects": [{"method": "mtls", "name": "spiffe://example.org/deep/**"}],
        },
        {
            "name": "uri-urn",
            "subjects": [{"method": "mtls", "field": "uri", "name": "urn:example:*"}],
        },
        {
            "name": "by-dns",
            "subjects": [{"method": "mtls", "field": "dns", "name": "*.runners.example"}],
        },
        {"name": "by-cn", "subjects": [{"method": "mtls", "field": "cn", "name": "legacy-client"}]},
        {
            "name": "callers",
            "subjects": [
                {"method": "apiKey", "name": API_KEY_CALLER},
                {"method": "jwt", "issuer": "https://issuer.example", "name": JWT_CALLER},
                {"method": "unixSocket", "name": LOCAL_CALLER},
            ],
        },
    ]
}
for _rule in FUZZ_POLICY["rules"]:
    _rule.update(_RULE)


def marker() -> str:
    """A per-example secret marker: unique, so that finding it anywhere is a leak, and made of
    characters every credential shape allows (base64url, printable ASCII)."""
    return "Zq" + secrets.token_hex(12)


def token_claims(token: str) -> dict[str, Any]:
    """The payload of a minted token (read, not verified: the emulator signed it)."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


# --- what the broker wrote -----------------------------------------------------------------------


class LogCapture(logging.Handler):
    """Every record of every logger (the session runs at DEBUG), as the broker logged it: its
    message, extra fields, exception and stack, before any formatter or redaction."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.texts.append(record_text(record))
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def captured_logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        yield capture
    finally:
        root.removeHandler(capture)


# --- calling -------------------------------------------------------------------------------------

Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Route:
    """One way to reach a broker: a channel, and the metadata every call on it carries."""

    name: str
    channel: aio.Channel = field(repr=False)
    # Never in a repr (hypothesis prints the examples that fail): it holds credentials.
    metadata: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # Who a call with no other credential is, (authMethod, user) as audited, when the policy
    # allows it; None: such a call is not authenticated.
    identity: tuple[str, str] | None = None

    @property
    def authenticated(self) -> bool:
        return self.identity is not None


@dataclass
class Outcome:
    """What the caller saw of one CreateToken call."""

    code: grpc.StatusCode
    status: RichStatus | None = None
    # Holds the token: never in a repr.
    response: pb.CreateTokenResponse | None = field(default=None, repr=False)
    # The broker's x-request-id (initial metadata): present when the broker's handler ran.
    request_id: str | None = None
    # Everything the caller received as text (messages, trailers, metadata, the response).
    texts: list[str] = field(default_factory=list, repr=False)

    @property
    def reason(self) -> str | None:
        if self.status is None or self.status.error_info is None:
            return None
        return str(self.status.error_info.reason)

    @property
    def broker_answered(self) -> bool:
        """An answer of the broker's (OK, or a refusal with its ErrorInfo), not gRPC's."""
        return self.code == OK or (
            self.status is not None
            and self.status.error_info is not None
            and self.status.error_info.domain == ERROR_DOMAIN
        )

    @property
    def token(self) -> str:
        assert self.response is not None
        return str(self.response.token_request.status.token)


async def call_raw(route: Route, body: bytes, metadata: Metadata = ()) -> Outcome:
    """CreateToken with `body` as the request message, bytes as they are (no serializer)."""
    method = route.channel.unary_unary(CREATE_TOKEN)
    call = method(body, metadata=(*route.metadata, *metadata), timeout=CALL_TIMEOUT)
    try:
        raw = await call
    except aio.AioRpcError as err:
        initial = err.initial_metadata() or ()
        outcome = Outcome(err.code(), status=rich_status_from_call(err))
        outcome.texts += [
            err.details() or "",
            err.debug_error_string() or "",
            _metadata_text(err.trailing_metadata() or ()),
        ]
    else:
        initial = await call.initial_metadata() or ()
        response = pb.CreateTokenResponse.FromString(raw)
        outcome = Outcome(OK, response=response)
        outcome.texts.append("\n".join(response.warnings))
        without_token = pb.CreateTokenResponse()
        without_token.CopyFrom(response)
        without_token.token_request.status.token = ""
        outcome.texts.append(str(without_token))
    outcome.texts.append(_metadata_text(initial))
    for key, value in initial:
        if key == REQUEST_ID_METADATA_KEY and isinstance(value, str):
            outcome.request_id = value
    return outcome


def _metadata_text(metadata: Any) -> str:
    return "\n".join(
        f"{key}={value.decode('latin-1') if isinstance(value, bytes) else value}"
        for key, value in metadata
    )


# --- the targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Where each output stood before an example."""

    logs: int
    audit_bytes: int
    token_requests: int


@dataclass
class Target:
    """A running broker to fuzz, with what it writes and what its policy allows."""

    name: str
    server: BrokerServer
    emulator: Emulator
    audit_file: Path
    logs: LogCapture
    api_key: str = field(repr=False)
    # The identity the API key proves.
    api_key_caller: str
    routes: dict[str, Route]
    # What a valid request looks like here (the bodies' starting point).
    valid_request: pb.CreateTokenRequest
    # What the policy allows anyone at all (the only rule's, or every rule's: they agree).
    namespaces: frozenset[str]
    service_accounts: frozenset[str] | None  # None: any
    audiences: frozenset[str]
    max_lifetime_seconds: int
    signer: Signer | None = None
    # Certificates are made with this CA (mutual TLS), and the server's name in them.
    pki: Pki | None = None

    def observe(self) -> Window:
        size = self.audit_file.stat().st_size if self.audit_file.exists() else 0
        return Window(len(self.logs.texts), size, self.emulator.token_request_count)

    def audit_text(self, window: Window) -> str:
        if not self.audit_file.exists():
            return ""
        with self.audit_file.open("rb") as f:
            f.seek(window.audit_bytes)
            return f.read().decode("utf-8")

    def audit_lines(self, window: Window, request_id: str) -> list[dict[str, Any]]:
        """The audit lines of the call with this request id (the last one is its outcome)."""
        lines = [json.loads(line) for line in self.audit_text(window).splitlines()]
        return [line for line in lines if line["requestID"] == request_id]

    def audit_line(self, window: Window, request_id: str) -> dict[str, Any]:
        mine = self.audit_lines(window, request_id)
        assert mine, f"no audit line for {request_id!r}"
        return mine[-1]

    async def check(self, window: Window, outcome: Outcome, secret_texts: Sequence[str]) -> None:
        """The checks every example makes (see the module docstring)."""
        assert outcome.code not in NEVER, outcome.status
        request_id = outcome.request_id
        if request_id is not None:
            # Written by the audit writer thread, maybe just after the answer.
            await eventually(
                lambda: bool(self.audit_lines(window, request_id)),
                f"the audit line of {request_id!r}",
            )
        else:
            assert not outcome.broker_answered, "an answer of the broker's without a request id"
        audit = self.audit_text(window)
        for line in audit.splitlines():
            assert len(line.encode("utf-8")) <= MAX_AUDIT_LINE_BYTES, len(line)
        outputs = [
            ("log", "\n".join(self.logs.texts[window.logs :])),
            ("audit", audit),
            ("answer", "\n".join(outcome.texts)),
            ("metrics", generate_latest(self.server.metrics.registry).decode()),
        ]
        for secret in secret_texts:
            for where, text in outputs:
                assert secret not in text, f"secret material in the {where}"
        refused_early = outcome.code == grpc.StatusCode.UNAUTHENTICATED or outcome.reason in (
            Reason.REQUEST_MALFORMED,
            Reason.REQUEST_INVALID,
        )
        if refused_early:
            assert self.emulator.token_request_count == window.token_requests

    def check_issued(self, outcome: Outcome, request: pb.CreateTokenRequest) -> None:
        """An OK answer: a token within what the policy allows anyone, for what was asked."""
        assert outcome.code == OK
        assert request.namespace in self.namespaces, request.namespace
        if self.service_accounts is not None:
            assert request.service_account in self.service_accounts, request.service_account
        claims = token_claims(outcome.token)
        private = claims["kubernetes.io"]
        assert private["namespace"] == request.namespace
        assert private["serviceaccount"]["name"] == request.service_account
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        assert set(audiences) <= self.audiences, audiences
        requested = request.token_request.spec.audiences
        if requested:
            assert set(audiences) == set(requested), (audiences, list(requested))
        assert claims["exp"] - claims["iat"] <= self.max_lifetime_seconds


def _short_directory() -> Path:
    """A directory for unix sockets (their paths are limited to ~107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="tb-fz-"))


def _tls_settings(pki: Pki) -> dict[str, Any]:
    return {
        "certFile": str(pki.cert),
        "keyFile": str(pki.key),
        "clientCaFile": str(pki.ca_file),
        "requireClientCert": True,
    }


def mtls_channel(pki: Pki, address: str, *, cert: bytes, key: bytes) -> aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_file.read_bytes(), private_key=key, certificate_chain=cert
    )
    return aio.secure_channel(address, creds)


def _bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


@contextlib.asynccontextmanager
async def dev_target(directory: Path, *, pki: Pki | None = None) -> AsyncIterator[Target]:
    """A broker as `serve --dev` builds it, on its own emulator with the dev seed. Routes:
    `tcp` (no credential), `tcp+key` (the dev API key), `tcp+wrong` (an unknown key), `unix`,
    `unix+wrong`; with `pki`, mutual TLS on TCP (and no TCP routes)."""
    seed = yaml.safe_load(DEV_SEED.read_text(encoding="utf-8"))
    workdir = _short_directory()
    audit_file = directory / "dev-audit.jsonl"
    server_section: dict[str, Any] = {"listen": "127.0.0.1:0"}
    extra: dict[str, Any] = {}
    if pki is not None:
        server_section["tls"] = _tls_settings(pki)
        extra["authentication"] = {"mtls": {"enabled": True}}
    try:
        async with Emulator(seed=seed, host="127.0.0.1", port=0) as emulator:
            emulator.write_kubeconfig(workdir / "kubeconfig", user_token=broker_user_token(seed))
            api_key = generate_api_key()
            base = load_settings(
                None,
                {
                    "dev": True,
                    "server": server_section,
                    "audit": {"sink": "file", "file": str(audit_file)},
                    "rateLimit": NO_LIMITS,
                    **extra,
                },
            )
            wrong = "tbk_" + marker()
            with captured_logs() as logs:
                async with (
                    BrokerServer(dev_settings(base, workdir, api_key)) as server,
                    aio.insecure_channel(server.address) as tcp,
                    aio.insecure_channel(f"unix:{server.unix_socket}") as unix,
                ):
                    dev = ("unixSocket", DEV_IDENTITY)
                    routes = [
                        Route("unix", unix, identity=dev),
                        Route("unix+wrong", unix, _bearer(wrong)),
                    ]
                    if pki is None:
                        routes += [
                            Route("tcp", tcp),
                            Route("tcp+key", tcp, _bearer(api_key), ("apiKey", DEV_IDENTITY)),
                            Route("tcp+wrong", tcp, _bearer(wrong)),
                        ]
                    yield Target(
                        name="dev",
                        server=server,
                        emulator=emulator,
                        audit_file=audit_file,
                        logs=logs,
                        api_key=api_key,
                        api_key_caller=DEV_IDENTITY,
                        routes={route.name: route for route in routes},
                        valid_request=_valid_request(audiences=["vault"]),
                        namespaces=frozenset({"demo", "ci"}),
                        service_accounts=None,
                        audiences=frozenset(
                            {
                                "token-broker-demo",
                                "vault",
                                "https://kubernetes.default.svc.cluster.local",
                            }
                        ),
                        max_lifetime_seconds=24 * 3600,
                        pki=pki,
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def configured_target(
    kube: KubernetesSettings, emulator: Emulator, directory: Path, pki: Pki
) -> AsyncIterator[Target]:
    """Every authentication method on: mutual TLS (client CA, client certificates required),
    an API key, a JWT issuer (JWKS file) and the unix socket's identity; FUZZ_POLICY decides.
    Routes: `mtls` (a certificate FUZZ_POLICY allows), `mtls+key`, `mtls+wrong` (an unknown key
    with that allowed certificate: the bearer decides alone), `nameless` (a certificate with
    no name), `unix`, `unix+wrong`."""
    signer = new_signer()
    jwks = write_jwks(directory / "jwks.json", signer.jwk())
    policy = directory / "fuzz-policy.yaml"
    policy.write_text(yaml.safe_dump(FUZZ_POLICY), encoding="utf-8")
    audit_file = directory / "configured-audit.jsonl"
    sockets = _short_directory()
    api_key = generate_api_key()
    settings = load_settings(
        None,
        {
            "server": {
                "listen": "127.0.0.1:0",
                "tls": _tls_settings(pki),
                "unixSocket": str(sockets / "broker.sock"),
            },
            "kubernetes": kube,
            "authentication": {
                "mtls": {"enabled": True},
                "apiKeys": {"keys": [{"name": API_KEY_CALLER, "sha256": hash_api_key(api_key)}]},
                **issuer_settings(jwksFile=str(jwks)),
                "unixSocket": {"identity": LOCAL_CALLER},
            },
            "policy": {"file": str(policy)},
            "audit": {"sink": "file", "file": str(audit_file)},
            "rateLimit": NO_LIMITS,
        },
    )
    allowed_cert, allowed_key = client_cert(pki.ca, uris=(ALLOWED_SPIFFE_ID,))
    nameless_cert, nameless_key = client_cert(pki.ca)
    wrong = "tbk_" + marker()
    try:
        with captured_logs() as logs:
            async with (
                BrokerServer(settings) as server,
                mtls_channel(pki, server.address, cert=allowed_cert, key=allowed_key) as mtls,
                mtls_channel(pki, server.address, cert=nameless_cert, key=nameless_key) as nameless,
                aio.insecure_channel(f"unix:{server.unix_socket}") as unix,
            ):
                routes = [
                    Route("mtls", mtls, identity=("mtls", ALLOWED_SPIFFE_ID)),
                    Route("mtls+key", mtls, _bearer(api_key), ("apiKey", API_KEY_CALLER)),
                    Route("mtls+wrong", mtls, _bearer(wrong)),
                    Route("nameless", nameless),
                    Route("unix", unix, identity=("unixSocket", LOCAL_CALLER)),
                    Route("unix+wrong", unix, _bearer(wrong)),
                ]
                yield Target(
                    name="configured",
                    server=server,
                    emulator=emulator,
                    audit_file=audit_file,
                    logs=logs,
                    api_key=api_key,
                    api_key_caller=API_KEY_CALLER,
                    routes={route.name: route for route in routes},
                    valid_request=_valid_request(audiences=["vault"]),
                    namespaces=frozenset({NAMESPACE}),
                    service_accounts=frozenset({SERVICE_ACCOUNT}),
                    audiences=frozenset({"vault", "sts.example.com"}),
                    max_lifetime_seconds=3600,
                    signer=signer,
                    pki=pki,
                )
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _valid_request(*, audiences: list[str]) -> pb.CreateTokenRequest:
    spec = pb.TokenRequestSpec(audiences=audiences, expiration_seconds=600)
    spec.bound_object_ref.CopyFrom(pb.BoundObjectReference(kind="Pod", name="web-0"))
    return pb.CreateTokenRequest(
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        token_request=pb.TokenRequest(metadata=pb.ObjectMeta(name=SERVICE_ACCOUNT), spec=spec),
    )
