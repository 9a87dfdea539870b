"""Caller authentication through a real grpc.aio server: mTLS (trustme CA, real handshakes),
API-key files, JWTs signed with real RSA/EC keys (JWKS file and JWKS over HTTP), the unix
socket, precedence, deny-by-default, and what reaches callers and logs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio

from broker.authn import (
    Authenticator,
    generate_api_key,
    hash_api_key,
)
from broker.authn_jwt import looks_like_jwt
from broker.config import (
    AuthenticationSettings,
    ConfigError,
    ServerSettings,
    TLSSettings,
    load_settings,
)
from broker.errors import BrokerError, RichStatus, rich_status_from_call
from broker.reasons import Reason
from broker.service import grpc_credentials
from tests.support.certs import client_cert
from tests.support.jwt_issuer import (
    AUDIENCE,
    ISSUER,
    Signer,
    b64,
    issuer_settings,
    rsa_key,
    write_jwks,
)

SPIFFE_ID = "spiffe://example.org/ci/runner"
MESSAGE_MISSING = "the request carries no credentials"
MESSAGE_INVALID = "the credentials could not be verified"

# --- a tiny service that answers with the caller's identity --------------------------------


@contextlib.asynccontextmanager
async def serve_who(
    authn: Authenticator,
    *,
    creds: grpc.ServerCredentials | None = None,
    unix: Path | None = None,
) -> AsyncIterator[str]:
    """A grpc.aio server whose only method answers with authenticate()'s identity."""

    async def who(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        try:
            identity = await authn.authenticate(grpc_credentials(context))
        except BrokerError as err:
            await err.abort(context)
        body = {
            "method": identity.method,
            "name": identity.name,
            "issuer": identity.issuer,
            "claims": dict(identity.claims),
        }
        return json.dumps(body, default=dict).encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Authn", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    if creds is not None:
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    if unix is not None:
        server.add_insecure_port(f"unix:{unix}")
    await server.start()
    try:
        yield f"localhost:{port}"
    finally:
        await server.stop(None)


async def call(channel: aio.Channel, bearer: str | None = None, raw: str | None = None) -> Any:
    metadata: list[tuple[str, str]] = []
    if bearer is not None:
        metadata.append(("authorization", f"Bearer {bearer}"))
    if raw is not None:
        metadata.append(("authorization", raw))
    who: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Authn/Who")
    reply = await who(b"", metadata=metadata, timeout=10)
    return json.loads(reply)


async def refused(channel: aio.Channel, bearer: str | None = None, raw: str | None = None) -> Any:
    try:
        await call(channel, bearer, raw)
    except aio.AioRpcError as err:
        return rich_status_from_call(err)
    raise AssertionError("the call was accepted")


def assert_refused(status: RichStatus, reason: str = Reason.CREDENTIALS_INVALID) -> None:
    assert status.code == grpc.StatusCode.UNAUTHENTICATED
    assert status.error_info is not None
    assert status.error_info.reason == reason
    assert status.message == (
        MESSAGE_INVALID if reason == Reason.CREDENTIALS_INVALID else MESSAGE_MISSING
    )


@contextlib.asynccontextmanager
async def authenticator(
    settings: dict[str, Any] | AuthenticationSettings,
    server: ServerSettings | None = None,
    **kwargs: Any,
) -> AsyncIterator[Authenticator]:
    if isinstance(settings, dict):
        settings = AuthenticationSettings.model_validate(settings)
    authn = Authenticator.from_settings(settings, server or ServerSettings(), **kwargs)
    async with authn:
        yield authn


@contextlib.asynccontextmanager
async def plaintext_server(authn: Authenticator) -> AsyncIterator[aio.Channel]:
    async with serve_who(authn) as address, aio.insecure_channel(address) as channel:
        yield channel


# --- mutual TLS ----------------------------------------------------------------------------


@dataclass
class PKI:
    ca: trustme.CA
    server_cert: trustme.LeafCert
    other_ca: trustme.CA
    directory: Path

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [
                (
                    self.server_cert.private_key_pem.bytes(),
                    self.server_cert.cert_chain_pems[0].bytes(),
                )
            ],
            root_certificates=self.ca.cert_pem.bytes(),
            require_client_auth=True,
        )

    def server_settings(self) -> ServerSettings:
        return ServerSettings(
            listen="127.0.0.1:0",
            tls=TLSSettings(
                cert_file=self.directory / "tls.crt",
                key_file=self.directory / "tls.key",
                client_ca_file=self.directory / "ca.crt",
            ),
        )

    def client_channel(self, address: str, cert: tuple[bytes, bytes]) -> aio.Channel:
        creds = grpc.ssl_channel_credentials(
            self.ca.cert_pem.bytes(), private_key=cert[1], certificate_chain=cert[0]
        )
        return aio.secure_channel(address, creds)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost")
    directory = tmp_path_factory.mktemp("pki")
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    server_cert.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
    server_cert.private_key_pem.write_to_path(str(directory / "tls.key"))
    return PKI(ca=ca, server_cert=server_cert, other_ca=trustme.CA(), directory=directory)


MTLS = {"mtls": {"enabled": True}}


@pytest.mark.parametrize(
    ("cert_kwargs", "expected"),
    [
        ({"cn": "ignored-cn", "uris": (SPIFFE_ID,), "dns": ("runner.example",)}, SPIFFE_ID),
        ({"cn": "ignored-cn", "dns": ("runner.example", "second.example")}, "runner.example"),
        ({"cn": "legacy-client"}, "legacy-client"),
    ],
    ids=["uri-san", "dns-san", "cn"],
)
async def test_mtls_identity_from_verified_certificate(
    pki: PKI, cert_kwargs: dict[str, Any], expected: str
) -> None:
    cert = client_cert(pki.ca, **cert_kwargs)
    async with (
        authenticator(MTLS, pki.server_settings()) as authn,
        serve_who(authn, creds=pki.server_credentials()) as address,
        pki.client_channel(address, cert) as channel,
    ):
        assert await call(channel) == {
            "method": "mtls",
            "name": expected,
            "issuer": None,
            "claims": {},
        }


async def test_mtls_certificate_from_another_ca_fails_the_handshake(pki: PKI) -> None:
    cert = client_cert(pki.other_ca, uris=(SPIFFE_ID,))
    async with (
        authenticator(MTLS, pki.server_settings()) as authn,
        serve_who(authn, creds=pki.server_credentials()) as address,
        pki.client_channel(address, cert) as channel,
    ):
        with pytest.raises(aio.AioRpcError) as err:
            await call(channel)
        # The TLS layer refused it: the handler (and so authenticate()) never ran.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_certificate_without_any_name_is_refused(pki: PKI) -> None:
    cert = client_cert(pki.ca)
    async with (
        authenticator(MTLS, pki.server_settings()) as authn,
        serve_who(authn, creds=pki.server_credentials()) as address,
        pki.client_channel(address, cert) as channel,
    ):
        assert_refused(await refused(channel))


def test_mtls_needs_a_client_ca_that_grpc_enforces(pki: PKI) -> None:
    auth = AuthenticationSettings.model_validate(MTLS)
    tls = pki.server_settings().tls
    assert tls is not None
    for server in (
        ServerSettings(),
        ServerSettings(tls=tls.model_copy(update={"client_ca_file": None})),
        ServerSettings(tls=tls.model_copy(update={"require_client_cert": False})),
    ):
        with pytest.raises(ConfigError, match=r"authentication\.mtls\.enabled"):
            Authenticator.from_settings(auth, server)


# --- API keys ------------------------------------------------------------------------------


def test_hash_api_key() -> None:
    assert hash_api_key("test") == hashlib.sha256(b"test").hexdigest()
    key = generate_api_key()
    assert len(key) > 40 and not looks_like_jwt(key)
    assert generate_api_key() != key


@pytest.fixture
def api_key_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    keys = {"ci-deployer": generate_api_key(), "nightly": generate_api_key()}
    path = tmp_path / "api-keys.yaml"
    path.write_text(
        "keys:\n"
        + "".join(f"  - name: {name}\n    sha256: {hash_api_key(k)}\n" for name, k in keys.items()),
        encoding="utf-8",
    )
    return path, keys


async def test_api_keys_from_a_file_and_inline(api_key_file: tuple[Path, dict[str, str]]) -> None:
    path, keys = api_key_file
    text = path.read_text()
    assert all(key not in text for key in keys.values())  # only hashes on disk
    inline = generate_api_key()
    settings = {
        "apiKeys": {"file": str(path), "keys": [{"name": "inline", "sha256": hash_api_key(inline)}]}
    }
    async with authenticator(settings) as authn, plaintext_server(authn) as channel:
        for name, key in keys.items():
            assert await call(channel, key) == {
                "method": "apiKey",
                "name": name,
                "issuer": None,
                "claims": {},
            }
        assert (await call(channel, inline))["name"] == "inline"
        # Scheme is case-insensitive.
        assert (await call(channel, raw=f"bearer {inline}"))["name"] == "inline"
        assert_refused(await refused(channel, "tbk_not-a-configured-key"))
        assert_refused(await refused(channel, keys["nightly"][:-1]))
        assert_refused(await refused(channel, raw=f"Basic {inline}"))
        assert_refused(await refused(channel, raw="Bearer "))
        assert_refused(await refused(channel, raw=f"Bearer {inline[:9]} {inline[9:]}"))
        assert_refused(await refused(channel), Reason.CREDENTIALS_MISSING)


def write_api_keys(path: Path, keys: dict[str, str]) -> None:
    path.write_text(
        "keys:\n"
        + "".join(f"  - name: {name}\n    sha256: {hash_api_key(k)}\n" for name, k in keys.items()),
        encoding="utf-8",
    )


async def test_api_key_file_changes_count_without_a_restart(
    api_key_file: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    path, keys = api_key_file
    newcomer = generate_api_key()
    async with authenticator({"apiKeys": {"file": str(path)}}) as authn:
        [files] = authn.reloading_files()
        async with plaintext_server(authn) as channel:
            assert_refused(await refused(channel, newcomer))
            # A key added for a new caller, one revoked: the Secret's new content.
            write_api_keys(path, {"ci-deployer": keys["ci-deployer"], "newcomer": newcomer})
            assert await files.check() is True
            assert (await call(channel, newcomer))["name"] == "newcomer"
            assert (await call(channel, keys["ci-deployer"]))["name"] == "ci-deployer"
            assert_refused(await refused(channel, keys["nightly"]))
            # A broken version is refused; the keys in force stay.
            caplog.set_level(logging.ERROR)
            path.write_text("keys: [\n", encoding="utf-8")
            assert await files.check() is False
            assert files.reload_failures == 1
            assert (await call(channel, newcomer))["name"] == "newcomer"
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "API key file reload refused, keeping the API key file in force" in error
    assert "authentication.apiKeys.file" in error and "not valid YAML" in error
    assert newcomer not in caplog.text and hash_api_key(newcomer) not in caplog.text


async def test_inline_api_keys_have_no_file_to_follow() -> None:
    key = generate_api_key()
    settings = {"apiKeys": {"keys": [{"name": "inline", "sha256": hash_api_key(key)}]}}
    async with authenticator(settings) as authn:
        assert authn.reloading_files() == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("keys:\n  - {name: a, sha256: my-plaintext-key}\n", r"keys\.0\.sha256: .*64 hex"),
        ("keys:\n  - {name: a, key: my-plaintext-key}\n", r"keys\.0\.key: Extra inputs"),
        ("- just a list\n", "must hold a mapping"),
        ("keys: [\n", "not valid YAML"),
    ],
)
async def test_api_key_file_errors_name_the_problem_not_the_value(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(content, encoding="utf-8")
    settings = AuthenticationSettings.model_validate({"apiKeys": {"file": str(path)}})
    with pytest.raises(ConfigError, match=expected) as err:
        async with authenticator(settings):
            pass
    assert "authentication.apiKeys.file" in str(err.value)
    assert "my-plaintext-key" not in str(err.value)


async def test_api_key_file_missing_or_duplicate_hashes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"authentication\.apiKeys\.file: cannot read"):
        async with authenticator({"apiKeys": {"file": str(tmp_path / "absent.yaml")}}):
            pass
    digest = hash_api_key("k")
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys: [{{name: a, sha256: {digest}}}]\n", encoding="utf-8")
    settings = {"apiKeys": {"file": str(path), "keys": [{"name": "b", "sha256": digest}]}}
    with pytest.raises(ConfigError, match="listed twice"):
        async with authenticator(settings):
            pass


# --- JWT -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    return Signer(rsa_key(), "rsa-1", "RS256")


@pytest.fixture(scope="module")
def ec_signer() -> Signer:
    return Signer(ec.generate_private_key(ec.SECP256R1()), "ec-1", "ES256")


@pytest.fixture
async def jwt_channel(
    tmp_path: Path, rsa_signer: Signer, ec_signer: Signer
) -> AsyncIterator[aio.Channel]:
    # The EC key's JWK declares no alg: the token's (allowed) alg is used with it.
    jwks = write_jwks(tmp_path / "jwks.json", rsa_signer.jwk(), ec_signer.jwk(with_alg=False))
    async with (
        authenticator(issuer_settings(jwksFile=str(jwks))) as authn,
        plaintext_server(authn) as channel,
    ):
        yield channel


async def test_jwt_rsa_and_ec_tokens_from_a_jwks_file(
    jwt_channel: aio.Channel, rsa_signer: Signer, ec_signer: Signer
) -> None:
    for signer in (rsa_signer, ec_signer):
        reply = await call(jwt_channel, signer.mint(aud=["other", "unrelated"], groups=["ci"]))
        assert reply["method"] == "jwt"
        assert reply["name"] == "ci/runner"
        assert reply["issuer"] == ISSUER
        assert reply["claims"]["groups"] == ["ci"]
        assert reply["claims"]["aud"] == ["other", "unrelated"]


def alg_none(signer: Signer) -> str:
    now = int(time.time())
    header = b64(json.dumps({"alg": "none", "kid": signer.kid}).encode())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "admin", "exp": now + 300, "iat": now}
    return f"{header}.{b64(json.dumps(payload).encode())}."


def hs256_with_public_key(signer: Signer) -> str:
    """The key-confusion forgery: HMAC keyed with the issuer's published public key."""
    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "admin", "exp": now + 300, "iat": now}
    signing_input = f"{header}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(signer.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def tampered(signer: Signer) -> str:
    header, _, signature = signer.mint().split(".")
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "admin", "exp": now + 300, "iat": now}
    return f"{header}.{b64(json.dumps(payload).encode())}.{signature}"


NOT_YET_VALID = "token not yet valid (nbf or iat in the future)"
# case -> (how to make the token from the configured RSA signer, the reason the log gives)
BAD_TOKENS: dict[str, tuple[Any, str]] = {
    "expired": (lambda s: s.mint(exp=-3600, iat=-7200), "token expired"),
    "not-yet-valid-nbf": (lambda s: s.mint(nbf=3600), NOT_YET_VALID),
    "issued-in-the-future": (lambda s: s.mint(iat=3600, exp=7200), NOT_YET_VALID),
    "wrong-issuer": (lambda s: s.mint(iss="https://evil.example"), "issuer not configured"),
    "issuer-by-prefix": (lambda s: s.mint(iss=ISSUER + "/"), "issuer not configured"),
    "wrong-audience": (lambda s: s.mint(aud="someone-else"), "audience not accepted"),
    "no-exp": (lambda s: s.mint(drop=("exp",)), "missing required claim 'exp'"),
    "no-iat": (lambda s: s.mint(drop=("iat",)), "missing required claim 'iat'"),
    "no-aud": (lambda s: s.mint(drop=("aud",)), "missing required claim 'aud'"),
    "no-sub": (lambda s: s.mint(drop=("sub",)), "missing required claim 'sub'"),
    "alg-none": (alg_none, "algorithm not allowed"),
    "hs256-with-public-key": (hs256_with_public_key, "algorithm not allowed"),
    "rs512-not-allowed": (lambda s: Signer(s.key, s.kid, "RS512").mint(), "algorithm not allowed"),
    "tampered-payload": (tampered, "signature verification failed"),
    "other-key-same-kid": (
        lambda s: Signer(rsa_key(), s.kid, "RS256").mint(),
        "signature verification failed",
    ),
    "unknown-kid": (lambda s: s.mint(kid="rotated-away"), "no key for the token's kid and alg"),
}


def failure_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        getattr(r, "auth_failure", "")
        for r in caplog.records
        if r.name == "broker.authn" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize("case", BAD_TOKENS)
async def test_jwt_rejected(
    jwt_channel: aio.Channel, rsa_signer: Signer, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, reason = BAD_TOKENS[case]
    token = make(rsa_signer)
    assert looks_like_jwt(token)
    caplog.set_level(logging.WARNING, logger="broker.authn")
    assert_refused(await refused(jwt_channel, token))
    assert failure_reasons(caplog) == [reason]


async def test_jwt_key_of_the_wrong_type_for_the_alg_is_refused(
    jwt_channel: aio.Channel, ec_signer: Signer
) -> None:
    # The EC JWK declares no alg; an RS256 header naming it must not find a usable key.
    token = Signer(rsa_key(), ec_signer.kid, "RS256").mint()
    assert_refused(await refused(jwt_channel, token))


async def test_jwt_alg_must_match_the_alg_the_jwk_declares(
    tmp_path: Path, rsa_signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", rsa_signer.jwk())  # declares RS256
    settings = issuer_settings(jwksFile=str(jwks), algorithms=["RS256", "PS256"])
    caplog.set_level(logging.WARNING, logger="broker.authn")
    async with authenticator(settings) as authn, plaintext_server(authn) as channel:
        assert await call(channel, rsa_signer.mint())
        assert_refused(await refused(channel, Signer(rsa_signer.key, "rsa-1", "PS256").mint()))
    assert failure_reasons(caplog) == ["no key for the token's kid and alg"]


async def test_jwt_clock_skew_is_honoured(tmp_path: Path, rsa_signer: Signer) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", rsa_signer.jwk())
    settings = issuer_settings(jwksFile=str(jwks), clockSkewSeconds=60)
    async with authenticator(settings) as authn, plaintext_server(authn) as channel:
        assert await call(channel, rsa_signer.mint(exp=-30, iat=-600))
        assert await call(channel, rsa_signer.mint(nbf=30, iat=30))
        assert_refused(await refused(channel, rsa_signer.mint(exp=-90, iat=-600)))
        assert_refused(await refused(channel, rsa_signer.mint(nbf=90)))


async def test_jwt_identity_claim_and_read_only_claims(tmp_path: Path, rsa_signer: Signer) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", rsa_signer.jwk())
    settings = AuthenticationSettings.model_validate(
        issuer_settings(jwksFile=str(jwks), identityClaim="email")
    )
    async with authenticator(settings) as authn, plaintext_server(authn) as channel:
        reply = await call(channel, rsa_signer.mint(email="ci@example.org"))
        assert reply["name"] == "ci@example.org"
        assert_refused(await refused(channel, rsa_signer.mint()))  # no email claim

        # Directly: the verified claims cannot be changed by policy or audit code.
        identity = await authn._jwt.verify(rsa_signer.mint(email="a@b", ctx={"k": [1]}))  # type: ignore[union-attr]
        with pytest.raises(TypeError):
            identity.claims["sub"] = "admin"  # type: ignore[index]
        with pytest.raises(TypeError):
            identity.claims["ctx"]["k"] = 2
        assert identity.claims["ctx"]["k"] == (1,)


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        ({"algorithms": ["RS256", "HS256"]}, r"issuers\.0\.algorithms: .*HS256 is not allowed"),
        ({"algorithms": ["none"]}, r"issuers\.0\.algorithms: .*none is not allowed"),
        ({"algorithms": ["XX1"]}, r"issuers\.0\.algorithms: .*XX1 is not one of"),
        ({"audiences": []}, r"issuers\.0\.audiences: .*at least one"),
        ({"jwksUrl": "https://issuer.example/jwks"}, r"issuers\.0: .*exactly one of"),
        ({"jwksFile": None}, r"issuers\.0: .*exactly one of"),
        ({"jwksCaFile": "/ca.crt"}, r"issuers\.0: .*jwksCaFile is for an https jwksUrl"),
    ],
)
def test_jwt_config_errors_name_the_key(issuer: dict[str, Any], expected: str) -> None:
    base = {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksFile": "/jwks.json"}
    with pytest.raises(ConfigError, match=r"authentication\.jwt\." + expected):
        load_settings(None, {"authentication": {"jwt": {"issuers": [{**base, **issuer}]}}})


def test_jwks_url_must_be_https_off_loopback() -> None:
    issuer = {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksUrl": "http://idp.example/jwks"}
    with pytest.raises(ConfigError, match=r"issuers\.0\.jwksUrl: .*must be https"):
        load_settings(None, {"authentication": {"jwt": {"issuers": [issuer]}}})


async def test_jwks_file_rotation_is_followed(
    tmp_path: Path, rsa_signer: Signer, ec_signer: Signer
) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", rsa_signer.jwk())
    async with (
        authenticator(issuer_settings(jwksFile=str(jwks))) as authn,
        plaintext_server(authn) as channel,
    ):
        [files] = authn.reloading_files()
        assert files.what == "JWKS file"
        assert (await call(channel, rsa_signer.mint()))["name"] == "ci/runner"
        assert_refused(await refused(channel, ec_signer.mint()))
        # The issuer rotates to the EC key and retires the RSA one.
        write_jwks(jwks, ec_signer.jwk())
        assert await files.check() is True
        assert (await call(channel, ec_signer.mint()))["name"] == "ci/runner"
        assert_refused(await refused(channel, rsa_signer.mint()))


async def test_jwks_file_errors(tmp_path: Path) -> None:
    for content, expected in (
        ("{", "not JSON"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no usable"),
    ):
        path = tmp_path / "jwks.json"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(ConfigError, match=r"issuers\[0\]\.jwksFile: .*" + expected):
            async with authenticator(issuer_settings(jwksFile=str(path))):
                pass


# --- JWKS over HTTP ------------------------------------------------------------------------


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class JwksServer:
    jwks: list[dict[str, Any]]
    status: int = 200
    padding: int = 0
    fetches: int = 0
    url: str = ""
    fetched: Any = None
    app: web.Application = field(default_factory=web.Application)

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.fetched.set()
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": self.jwks, "padding": "x" * self.padding})

    async def next_fetch(self) -> None:
        await asyncio.wait_for(self.fetched.wait(), 10)
        self.fetched.clear()


@pytest.fixture
async def jwks_server(rsa_signer: Signer) -> AsyncIterator[JwksServer]:
    server = JwksServer(jwks=[rsa_signer.jwk()], fetched=asyncio.Event())
    server.app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(server.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/jwks"
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_jwks_url_cached_refetched_on_unknown_kid_rate_limited(
    jwks_server: JwksServer, rsa_signer: Signer, ec_signer: Signer
) -> None:
    clock = FakeClock()
    settings = issuer_settings(
        jwksUrl=jwks_server.url, jwksCacheSeconds=300, jwksMinRefreshSeconds=30
    )
    async with authenticator(settings, clock=clock) as authn, plaintext_server(authn) as channel:
        assert jwks_server.fetches == 1  # at start
        for _ in range(3):
            assert (await call(channel, rsa_signer.mint()))["method"] == "jwt"
        assert jwks_server.fetches == 1  # cached

        # The issuer rotates in a new key. Right after a fetch a new kid does not refetch...
        jwks_server.jwks = [rsa_signer.jwk(), ec_signer.jwk()]
        assert_refused(await refused(channel, ec_signer.mint()))
        assert jwks_server.fetches == 1
        # ...once the min-refresh interval has passed it does, and the new key verifies.
        clock.now += 31
        assert (await call(channel, ec_signer.mint()))["name"] == "ci/runner"
        assert jwks_server.fetches == 2
        # Unknown kids cannot make the broker hammer the issuer.
        for _ in range(3):
            assert_refused(await refused(channel, rsa_signer.mint(kid="bogus")))
        assert jwks_server.fetches == 2

        # Past the TTL a request is served from the cache and triggers a background refresh.
        jwks_server.fetched.clear()
        clock.now += 301
        assert await call(channel, rsa_signer.mint())
        await jwks_server.next_fetch()
        assert jwks_server.fetches == 3

        # A failing issuer: the last good keys stay in use.
        jwks_server.status = 500
        clock.now += 301
        assert await call(channel, rsa_signer.mint())
        await jwks_server.next_fetch()
        assert jwks_server.fetches == 4
        assert await call(channel, ec_signer.mint())
        assert await call(channel, rsa_signer.mint())


@pytest.fixture
async def https_jwks_server(
    rsa_signer: Signer, tmp_path: Path
) -> AsyncIterator[tuple[JwksServer, trustme.CA]]:
    """The JWKS behind a private CA (an in-house identity provider)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = JwksServer(jwks=[rsa_signer.jwk()], fetched=asyncio.Event())
    server.app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(server.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"https://{host}:{port}/jwks"
    try:
        yield server, ca
    finally:
        await runner.cleanup()


async def test_jwks_url_behind_a_private_ca(
    https_jwks_server: tuple[JwksServer, trustme.CA],
    rsa_signer: Signer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, ca = https_jwks_server
    ca_file, stranger = tmp_path / "ca.crt", tmp_path / "stranger.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    trustme.CA().cert_pem.write_to_path(str(stranger))
    settings = issuer_settings(jwksUrl=server.url, jwksCaFile=str(ca_file))
    async with authenticator(settings) as authn, plaintext_server(authn) as channel:
        assert (await call(channel, rsa_signer.mint()))["method"] == "jwt"
    assert server.fetches == 1
    # The system's CAs, or a CA that did not sign the server's certificate: no keys.
    caplog.set_level(logging.WARNING, logger="broker.authn")
    for trust in ({}, {"jwksCaFile": str(stranger)}):
        caplog.clear()
        settings = issuer_settings(jwksUrl=server.url, jwksMinRefreshSeconds=0, **trust)
        async with authenticator(settings) as authn, plaintext_server(authn) as channel:
            assert_refused(await refused(channel, rsa_signer.mint()))
        failures = [r for r in caplog.records if r.getMessage().startswith("JWKS fetch failed")]
        assert failures
        assert all("CERTIFICATE_VERIFY_FAILED" in str(r.__dict__["error"]) for r in failures)
    assert server.fetches == 1  # no request got past a handshake


async def test_jwks_ca_file_is_checked_at_start(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate")
    for path in (tmp_path / "missing.crt", not_pem):
        settings = issuer_settings(jwksUrl="https://idp.example/jwks", jwksCaFile=str(path))
        with pytest.raises(ConfigError, match=r"issuers\[0\]\.jwksCaFile: .* PEM CA bundle"):
            async with authenticator(settings):
                pass


async def test_jwks_url_unreachable_at_start_recovers(
    jwks_server: JwksServer, rsa_signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    jwks_server.status = 503
    settings = issuer_settings(jwksUrl=jwks_server.url, jwksMinRefreshSeconds=30)
    caplog.set_level(logging.WARNING, logger="broker.authn")
    async with authenticator(settings, clock=clock) as authn, plaintext_server(authn) as channel:
        assert jwks_server.fetches == 1
        assert any("JWKS fetch failed" in r.getMessage() for r in caplog.records)
        assert_refused(await refused(channel, rsa_signer.mint()))
        assert jwks_server.fetches == 1  # rate limited
        jwks_server.status = 200
        clock.now += 31
        assert (await call(channel, rsa_signer.mint()))["method"] == "jwt"
        assert jwks_server.fetches == 2


async def test_jwks_url_concurrent_misses_share_one_fetch_and_size_limit(
    jwks_server: JwksServer, rsa_signer: Signer, ec_signer: Signer
) -> None:
    clock = FakeClock()
    settings = issuer_settings(jwksUrl=jwks_server.url, jwksMinRefreshSeconds=0)
    # Far more than one read's worth of body, still under the 1 MiB limit.
    jwks_server.padding = 600_000
    async with authenticator(settings, clock=clock) as authn, plaintext_server(authn) as channel:
        assert jwks_server.fetches == 1
        assert await call(channel, rsa_signer.mint())
        jwks_server.jwks = [rsa_signer.jwk(), ec_signer.jwk()]
        replies = await asyncio.gather(*(call(channel, ec_signer.mint()) for _ in range(5)))
        assert {r["name"] for r in replies} == {"ci/runner"}
        assert jwks_server.fetches == 2
        # Over the limit: refused as a fetch failure, the last good keys stay.
        jwks_server.padding = 1024 * 1024
        assert_refused(await refused(channel, rsa_signer.mint(kid="new")))
        assert jwks_server.fetches == 3
        assert await call(channel, ec_signer.mint())


# --- unix socket, precedence, deny by default ----------------------------------------------


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Short: unix socket paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="tb-") as directory:
        yield Path(directory) / "broker.sock"


async def test_unix_socket_fixed_identity(socket_path: Path) -> None:
    key = generate_api_key()
    settings = {
        "unixSocket": {"identity": "sidecar"},
        "apiKeys": {"keys": [{"name": "ci", "sha256": hash_api_key(key)}]},
    }
    async with (
        authenticator(settings) as authn,
        serve_who(authn, unix=socket_path) as address,
        aio.insecure_channel(f"unix:{socket_path}") as unix_channel,
        aio.insecure_channel(address) as tcp_channel,
    ):
        assert await call(unix_channel) == {
            "method": "unixSocket",
            "name": "sidecar",
            "issuer": None,
            "claims": {},
        }
        # A bearer credential on the socket decides: a valid one wins, a bad one fails.
        assert (await call(unix_channel, key))["name"] == "ci"
        assert_refused(await refused(unix_channel, "tbk_wrong"))
        # TCP callers do not get the socket's identity.
        assert_refused(await refused(tcp_channel), Reason.CREDENTIALS_MISSING)


async def test_bearer_takes_precedence_over_mtls_and_never_falls_back(
    pki: PKI, tmp_path: Path, rsa_signer: Signer
) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", rsa_signer.jwk())
    settings = {**MTLS, **issuer_settings(jwksFile=str(jwks))}
    cert = client_cert(pki.ca, uris=(SPIFFE_ID,))
    async with (
        authenticator(settings, pki.server_settings()) as authn,
        serve_who(authn, creds=pki.server_credentials()) as address,
        pki.client_channel(address, cert) as channel,
    ):
        assert (await call(channel))["name"] == SPIFFE_ID
        reply = await call(channel, rsa_signer.mint())
        assert (reply["method"], reply["name"]) == ("jwt", "ci/runner")
        assert_refused(await refused(channel, rsa_signer.mint(exp=-3600, iat=-7200)))
        assert_refused(await refused(channel, "tbk_some-api-key"))  # API keys not enabled
        assert_refused(await refused(channel, raw="Basic dXNlcjpwYXNz"))


async def test_nothing_configured_refuses_everything(pki: PKI, socket_path: Path) -> None:
    assert AuthenticationSettings() == load_settings().authentication
    assert Authenticator(AuthenticationSettings()).methods == ()
    cert = client_cert(pki.ca, uris=(SPIFFE_ID,))
    async with (
        authenticator({}, pki.server_settings()) as authn,
        serve_who(authn, creds=pki.server_credentials(), unix=socket_path) as address,
        pki.client_channel(address, cert) as tls_channel,
        aio.insecure_channel(f"unix:{socket_path}") as unix_channel,
    ):
        assert_refused(await refused(tls_channel), Reason.CREDENTIALS_MISSING)
        assert_refused(await refused(unix_channel), Reason.CREDENTIALS_MISSING)
        assert_refused(await refused(unix_channel, "tbk_anything"))
        assert_refused(await refused(unix_channel, rsa_key_token()))


def rsa_key_token() -> str:
    now = int(time.time())
    return jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 60, "iat": now},
        rsa_key(),
        algorithm="RS256",
    )


async def test_settings_yaml_shape(tmp_path: Path, rsa_signer: Signer) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", rsa_signer.jwk())
    key = generate_api_key()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""\
authentication:
  mtls: {{enabled: false}}
  apiKeys:
    keys:
      - {{name: ci-deployer, sha256: {hash_api_key(key)}}}
  jwt:
    issuers:
      - issuer: {ISSUER}
        audiences: [{AUDIENCE}]
        jwksFile: {jwks}
        algorithms: [RS256, ES256]
        clockSkewSeconds: 30
        identityClaim: sub
  unixSocket:
    identity: sidecar
""",
        encoding="utf-8",
    )
    settings = load_settings(config)
    async with (
        authenticator(settings.authentication, settings.server) as authn,
        plaintext_server(authn) as channel,
    ):
        assert authn.methods == ("jwt", "apiKey", "unixSocket")
        assert (await call(channel, key))["name"] == "ci-deployer"
        assert (await call(channel, rsa_signer.mint()))["issuer"] == ISSUER


# --- what callers and logs see -------------------------------------------------------------


async def test_no_credential_in_logs_messages_or_reprs(
    tmp_path: Path,
    rsa_signer: Signer,
    api_key_file: tuple[Path, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, keys = api_key_file
    jwks = write_jwks(tmp_path / "jwks.json", rsa_signer.jwk())
    settings = {"apiKeys": {"file": str(path)}, **issuer_settings(jwksFile=str(jwks))}
    good_token = rsa_signer.mint()
    bad = [
        "tbk_wrong-key-5c1f0e",
        keys["ci-deployer"] + "x",
        rsa_signer.mint(exp=-3600, iat=-7200),
        rsa_signer.mint(aud="else"),
        rsa_signer.mint(kid="unknown-kid"),
        rsa_signer.mint(iss="https://unknown-issuer.example"),
        tampered(rsa_signer),
        hs256_with_public_key(rsa_signer),
        alg_none(rsa_signer),
    ]
    caplog.set_level(logging.DEBUG)
    async with authenticator(settings) as authn, plaintext_server(authn) as channel:
        await call(channel, keys["ci-deployer"])
        await call(channel, good_token)
        statuses = [await refused(channel, value) for value in bad]
        statuses.append(await refused(channel))
        reprs = repr(authn) + repr(authn._api_keys) + repr(authn._jwt)
    for status in statuses:
        assert status.message in (MESSAGE_MISSING, MESSAGE_INVALID)
        assert status.error_info is not None and not status.error_info.metadata
        assert status.error_info.reason in (Reason.CREDENTIALS_MISSING, Reason.CREDENTIALS_INVALID)
    failures = [
        r for r in caplog.records if r.name == "broker.authn" and r.levelno == logging.WARNING
    ]
    assert len(failures) == len(bad) + 1
    assert all(
        getattr(r, "auth_method", None) and getattr(r, "auth_failure", None) for r in failures
    )
    logged = (
        "\n".join(r.getMessage() + repr(vars(r)) for r in caplog.records)
        + "\n".join(s.message for s in statuses)
        + reprs
    )
    secrets = [*keys.values(), good_token, *bad]
    # Each JWT's signature segment alone is enough to know a token leaked.
    secrets += [
        s.split(".")[2] for s in [good_token, *bad] if s.count(".") == 2 and s.split(".")[2]
    ]
    for secret in secrets:
        assert secret not in logged
    # The operator log does say why, with the method.
    reasons = {getattr(r, "auth_failure", "") for r in failures}
    assert {"unknown API key", "token expired", "audience not accepted"} <= reasons
    assert "signature verification failed" in reasons
    assert "algorithm not allowed" in reasons
