"""Caller authentication: who is calling, proven by mTLS, an API key, a JWT or the unix socket.

`Authenticator.authenticate(credentials)` returns an `Identity` or raises `BrokerError`
UNAUTHENTICATED. It reads only the caller's `Credentials` (broker.credentials: the authorization
header, the verified client certificate, the peer), which each transport extracts at its edge.
Nothing is enabled by default, and with nothing enabled every call is refused.

Precedence, when several methods could apply to one call:

1. A bearer credential (`authorization: Bearer <value>` metadata), if present, decides alone:
   it must verify, and a bad one fails the call even when the connection also has a valid
   client certificate or comes over the unix socket (no silent fallback to a weaker or
   different identity). A value with the JWT shape (three base64url segments, the first a
   JSON header with `alg`) is verified as a JWT, anything else as an API key. Any other
   `authorization` value (another scheme, several headers) is refused the same way.
2. Else the verified client certificate (`authentication.mtls.enabled`): its URI SAN (a
   SPIFFE ID such as spiffe://example.org/ci/runner), else its first DNS SAN, else its
   subject CN (the first URI SAN if there are several), with the field it came from and all
   of the certificate's names (`Identity.certificate`): a policy subject matches one field
   only, the URI SAN unless it says otherwise (broker.policy). gRPC verified the chain against
   `server.tls.clientCaFile` during the handshake, which is why this method requires that CA
   and `requireClientCert: true` (without it grpcio does not even ask for a certificate).
3. Else the fixed identity of the unix socket (`authentication.unixSocket.identity`), for
   callers whose peer is `unix:` (who may connect is decided by the socket's file mode, and
   by the peer's uid/gid with `allowedUids`/`allowedGids`: broker.unix_socket).
4. Else UNAUTHENTICATED.

Callers only ever see one of two generic messages with ErrorInfo reason CREDENTIALS_MISSING or
CREDENTIALS_INVALID. Why a credential was refused goes to the operator log (logger
`broker.authn`, warning, fields `auth_method` and `auth_failure`, plus issuer/kid/alg where
relevant), never the credential itself.

A credential is attacker input of any shape: it is bounded before it is parsed (at most
MAX_BEARER_CHARS; JWT segments through broker.bounded_json), and an exception of any type
while checking one is a refusal like the others (CREDENTIALS_INVALID, a warning naming the
exception type), never an INTERNAL error.

Every call is authenticated, and cheaply: an API key is one SHA-256 and a constant-time
comparison per configured key, an mtls identity is cached by certificate, and a JWT that
verified is remembered by its SHA-256 (broker.authn_jwt: never the token itself) until it
expires or its issuer's keys change. The same caller gets the same `Identity` object, whose
`memo_key` keys the request path's decision memo (broker.decision_memo).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from broker.authn_apikeys import (
    ApiKeyStore,
    FixedApiKeys,
    generate_api_key,
    hash_api_key,
    open_api_keys,
)
from broker.authn_jwt import JwtRejected, JwtVerifier, looks_like_jwt
from broker.config import AuthenticationSettings, ConfigError, ServerSettings
from broker.credentials import Credentials
from broker.errors import BrokerError
from broker.file_reload import ReloadingFiles
from broker.identity import AuthMethod, CertificateNames, Identity
from broker.reasons import Reason

__all__ = [
    "AuthenticationFailed",
    "Authenticator",
    "generate_api_key",
    "hash_api_key",
]

logger = logging.getLogger("broker.authn")

MESSAGE_MISSING: Final = "the request carries no credentials"
MESSAGE_INVALID: Final = "the credentials could not be verified"
# Far above any real JWT or key; gRPC's default metadata limit is 8 KiB anyway.
MAX_BEARER_CHARS: Final = 16 * 1024
# API-key identities kept (one object per name, so the decision memo keys stay the same).
MAX_API_KEY_IDENTITIES: Final = 4096


@dataclasses.dataclass
class AuthenticationFailed(BrokerError):
    """UNAUTHENTICATED, and which kind of credential failed (for operators' metrics; the
    caller's status carries no hint of it): jwt, apiKey, bearer (a malformed authorization
    header), mtls, or none (no credentials at all)."""

    method: str = "none"


class _Refused(Exception):
    """Internal: a presented credential did not verify (detail for the log only)."""

    def __init__(self, method: str, detail: str, fields: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.method = method
        self.detail = detail
        self.fields = dict(fields or {})


class _Bearer:
    """A bearer value; never shown in a repr, str or log."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "_Bearer(<redacted>)"

    __str__ = __repr__


class Authenticator:
    """Authenticates calls with the configured methods. `await start()` before use (it loads
    key files and fetches JWKS), `await close()` after; or `async with`."""

    def __init__(
        self,
        settings: AuthenticationSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._mtls = settings.mtls.enabled
        self._unix_identity = (
            Identity(method="unixSocket", name=settings.unix_socket.identity)
            if settings.unix_socket.identity is not None
            else None
        )
        self._api_key_identities: dict[str, Identity] = {}
        self._api_keys: FixedApiKeys | ReloadingFiles[ApiKeyStore] | None = None
        self._jwt = (
            JwtVerifier(
                settings.jwt, clock=clock, reload_interval_seconds=settings.reload_interval_seconds
            )
            if settings.jwt.issuers
            else None
        )
        self._started = False

    @classmethod
    def from_settings(
        cls,
        settings: AuthenticationSettings,
        server: ServerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> Authenticator:
        """Check the methods against the server's listeners; ConfigError naming the key."""
        if settings.mtls.enabled:
            tls = server.tls
            if tls is None or tls.client_ca_file is None or not tls.require_client_cert:
                raise ConfigError(
                    "authentication.mtls.enabled: needs server.tls.clientCaFile with "
                    "server.tls.requireClientCert: true (only certificates gRPC verified "
                    "identify callers)"
                )
        if settings.unix_socket.checks_peers and server.unix_socket is None:
            raise ConfigError(
                "authentication.unixSocket.allowedUids/allowedGids: needs server.unixSocket "
                "(they decide who may use it)"
            )
        return cls(settings, clock=clock)

    def __repr__(self) -> str:
        return f"Authenticator(methods={list(self.methods)!r})"

    @property
    def methods(self) -> tuple[AuthMethod, ...]:
        """The enabled methods, in precedence order (bearer methods first)."""
        s = self.settings
        enabled: list[AuthMethod] = []
        if s.jwt.issuers:
            enabled.append("jwt")
        if s.api_keys.keys or s.api_keys.file is not None:
            enabled.append("apiKey")
        if s.mtls.enabled:
            enabled.append("mtls")
        if s.unix_socket.identity is not None:
            enabled.append("unixSocket")
        return tuple(enabled)

    async def start(self) -> None:
        """Load the API-key file and JWKS files (off the event loop) and fetch JWKS URLs.
        A bad file is a ConfigError; an unreachable JWKS URL is only logged."""
        if self._started:
            return
        if "apiKey" in self.methods:
            self._api_keys = await open_api_keys(
                self.settings.api_keys,
                reload_interval_seconds=self.settings.reload_interval_seconds,
            )
        if self._jwt is not None:
            await self._jwt.start()
        self._started = True
        if not self.methods:
            logger.warning("no authentication method is configured: every call is refused")

    def reloading_files(self) -> list[ReloadingFiles[Any]]:
        """The key files followed while serving (the API key file, JWKS files)."""
        files: list[ReloadingFiles[Any]] = []
        if isinstance(self._api_keys, ReloadingFiles):
            files.append(self._api_keys)
        if self._jwt is not None:
            files.extend(self._jwt.jwks_files)
        return files

    async def close(self) -> None:
        if self._jwt is not None:
            await self._jwt.close()

    async def __aenter__(self) -> Authenticator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def authenticate(self, credentials: Credentials) -> Identity:
        """The caller's identity, or BrokerError UNAUTHENTICATED."""
        if not self._started:
            raise RuntimeError("Authenticator.start() was not awaited")
        try:
            identity = await self._identify(credentials)
        except _Refused as refused:
            raise self._refusal(credentials, refused) from None
        except Exception as exc:
            # A credential nobody foresaw (the root causes are bounded where they are parsed):
            # still a refusal. Only the exception's type: its text could quote the credential.
            method = "bearer" if credentials.authorization else "none"
            detail = f"the credential could not be checked ({type(exc).__name__})"
            raise self._refusal(credentials, _Refused(method, detail)) from None
        if identity is None:
            logger.warning(
                "authentication failed: no credentials",
                extra={
                    "auth_method": "none",
                    "auth_failure": "no credentials"
                    if self.methods
                    else "no authentication method is configured",
                    "peer": credentials.peer,
                },
            )
            raise AuthenticationFailed.of(
                Reason.CREDENTIALS_MISSING, MESSAGE_MISSING, method="none"
            )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("authenticated %s", identity, extra={"auth_method": identity.method})
        return identity

    @staticmethod
    def _refusal(credentials: Credentials, refused: _Refused) -> AuthenticationFailed:
        """Log why (warning, never the credential); the caller's generic CREDENTIALS_INVALID."""
        logger.warning(
            "authentication failed: %s",
            refused.detail,
            extra={
                "auth_method": refused.method,
                "auth_failure": refused.detail,
                "peer": credentials.peer,
                **refused.fields,
            },
        )
        return AuthenticationFailed.of(
            Reason.CREDENTIALS_INVALID, MESSAGE_INVALID, method=refused.method
        )

    async def _identify(self, credentials: Credentials) -> Identity | None:
        bearer = _bearer(credentials)
        if bearer is not None:
            if credentials.jwt_only and not looks_like_jwt(bearer.value):
                raise _Refused("bearer", "not a JWT where only a JWT is accepted")
            return await self._verify_bearer(bearer)
        if self._mtls:
            identity = _mtls_identity(credentials)
            if identity is not None:
                return identity
        if self._unix_identity is not None and credentials.peer.startswith("unix:"):
            return self._unix_identity
        return None

    async def _verify_bearer(self, bearer: _Bearer) -> Identity:
        if self._jwt is not None:
            # A JWT that verified before (by its digest), its keys and validity unchanged.
            remembered = self._jwt.remembered(bearer.value)
            if remembered is not None:
                return remembered
        if looks_like_jwt(bearer.value):
            if self._jwt is None:
                raise _Refused("jwt", "JWT presented but no JWT issuer is configured")
            try:
                return await self._jwt.verify(bearer.value)
            except JwtRejected as exc:
                raise _Refused("jwt", exc.detail, exc.fields) from None
        if self._api_keys is None:
            raise _Refused("apiKey", "API key presented but API keys are not configured")
        name = self._api_keys.current.lookup(bearer.value)
        if name is None:
            raise _Refused("apiKey", "unknown API key")
        identity = self._api_key_identities.get(name)
        if identity is None:
            if len(self._api_key_identities) >= MAX_API_KEY_IDENTITIES:
                self._api_key_identities.clear()
            identity = self._api_key_identities[name] = Identity(method="apiKey", name=name)
        return identity


def authorization_values(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str | bytes, ...]:
    """The `authorization` values of gRPC-style metadata (key, value) pairs."""
    return tuple(value for key, value in metadata if key.lower() == "authorization")


def _bearer(credentials: Credentials) -> _Bearer | None:
    values = credentials.authorization
    if not values:
        return None
    if len(values) > 1:
        raise _Refused("bearer", "several authorization headers")
    value = values[0]
    if not isinstance(value, str):
        raise _Refused("bearer", "authorization header is not text")
    scheme, _, credential = value.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise _Refused("bearer", "authorization header is not 'Bearer <credential>'")
    # split() breaks at any str.isspace() character: one part means no whitespace inside.
    if len(credential) > MAX_BEARER_CHARS or len(credential.split()) != 1:
        raise _Refused("bearer", "malformed bearer credential")
    return _Bearer(credential)


def _mtls_identity(credentials: Credentials) -> Identity | None:
    pem = credentials.client_certificate()
    if pem is None:
        return None
    try:
        identity = certificate_identity(pem)
    except ValueError:
        raise _Refused("mtls", "client certificate could not be parsed") from None
    if identity is None:
        raise _Refused("mtls", "client certificate has no URI SAN, DNS SAN or CN")
    return identity


@functools.lru_cache(maxsize=256)
def certificate_identity(pem: bytes) -> Identity | None:
    """The mtls identity of a PEM certificate (None: it has no name); ValueError if unreadable.

    Its name is the URI SAN, else the first DNS SAN, else the subject CN, and it keeps which
    field that was and all of the certificate's names: policy subjects say which field they
    match (broker.policy), never falling back from one field to another.
    """
    return Identity.from_certificate(certificate_names(x509.load_pem_x509_certificate(pem)))


def certificate_names(cert: x509.Certificate) -> CertificateNames:
    """URI SANs, DNS SANs and the subject CN (None when there are none or several)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    uris: list[str] = san.get_values_for_type(x509.UniformResourceIdentifier) if san else []
    dns_names: list[str] = san.get_values_for_type(x509.DNSName) if san else []
    common_names = []
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if text:
            common_names.append(text)
    return CertificateNames(
        uris=tuple(uris),
        dns_names=tuple(dns_names),
        common_name=common_names[0] if len(common_names) == 1 else None,
    )
