"""OIDC/JWT bearer tokens from external issuers, verified with the issuers' public keys.

The issuer is chosen by the token's unverified `iss` (exact match), then everything is
verified with that issuer's settings: the algorithm (its allow-list only: never `none`, never
HS*), the signature with the key named by `kid`, and `exp`, `iat`, `iss`, `aud` (required),
`nbf` (when present), with `clockSkewSeconds` of leeway. The key is built for the token's
algorithm from the JWK and must match the JWK's own `alg` when it declares one, so a public
key is never used as an HMAC secret. Keys named or embedded in the token's header (`jku`,
`x5u`, `jwk`, `x5c`) are ignored: only the configured key set counts.

`exp`, `nbf` and `iat` must be NumericDates (RFC 7519): JSON numbers (not strings, not
booleans), finite, between 0 and the end of year 9999; PyJWT alone would take the string
"9999999999" or 1e300.

The header and payload are attacker-controlled until the signature is verified: they are
parsed by broker.bounded_json (size and nesting depth bounded before the parser runs), which
also parses JWKS documents.

Keys come from a JWKS file (read at start) or a JWKS URL (fetched at start, cached):
- after `jwksCacheSeconds` the next request that uses the keys triggers a refetch in the
  background and is itself verified with the cached keys (stale-while-revalidate);
- a `kid` not in the cache triggers a refetch on the request path, at most once per
  `jwksMinRefreshSeconds` per issuer (concurrent misses share one fetch);
- a failed fetch keeps the last good keys.

A token that verified is remembered (`JwtVerifier.remembered`), by its SHA-256 (never the
token), with its identity and the time window in which PyJWT would accept it again
(`exp`, `nbf` and `iat` with the leeway, read as PyJWT reads them), as long as its issuer's
key set is the very one that verified it: a JWKS file reloaded or a JWKS URL refetched
(rotation) forgets it, and so does its expiry. At most MAX_REMEMBERED_TOKENS are kept.
Everything else a verification checks depends on the token and the settings alone.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import jwt

from broker import bounded_json
from broker.bounded import bounded
from broker.config import ConfigError, JwtAuthSettings, JwtIssuerSettings
from broker.file_reload import DEFAULT_RELOAD_INTERVAL_SECONDS, ReloadingFiles
from broker.identity import Identity

logger = logging.getLogger("broker.authn")

MAX_JWKS_BYTES = 1024 * 1024
# A decoded header or payload; the bearer itself is at most 16 KiB (broker.authn).
MAX_SEGMENT_BYTES = 16 * 1024
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_REGISTERED = ("exp", "iat", "iss", "aud")
# RFC 7519 NumericDate claims, and the latest one accepted: 9999-12-31T23:59:59Z.
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
MAX_NUMERIC_DATE = 253_402_300_799
# Verified tokens remembered (by digest); beyond, the table is emptied.
MAX_REMEMBERED_TOKENS = 4096


class JwtRejected(Exception):
    """A token that does not verify. `detail` and `fields` are for the operator log: they never
    hold the token (an issuer, kid or subject at most)."""

    def __init__(self, detail: str, **fields: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fields = fields


def _b64_json(segment: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return bounded_json.loads(raw, max_bytes=MAX_SEGMENT_BYTES)
    except (binascii.Error, ValueError):  # bounded_json.JsonRejected is a ValueError
        return None


def _split(value: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """(header, unverified payload) of a compact JWS, or None if `value` is not one; the
    payload is None when it is not a JSON object within the bounds."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[0] or not all(_SEGMENT.fullmatch(p) for p in parts):
        return None
    header = _b64_json(parts[0])
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        return None
    payload = _b64_json(parts[1])
    return header, payload if isinstance(payload, dict) else None


def looks_like_jwt(value: str) -> bool:
    """Three base64url segments whose first decodes to a JSON object with an `alg`."""
    return _split(value) is not None


def _short(value: object, limit: int = 120) -> str:
    """An attacker-chosen header/claim value, bounded for the log."""
    return bounded(value if isinstance(value, str) else repr(value), limit)


def numeric_date_problem(claims: Mapping[str, Any]) -> str | None:
    """Why an `exp`, `nbf` or `iat` present in `claims` is not a sane NumericDate (None: all
    are): a JSON number (not a string or a boolean), finite, in [0, MAX_NUMERIC_DATE]."""
    for name in NUMERIC_DATE_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"claim {name!r} is not a NumericDate (a JSON number)"
        # An int is compared as an int: a 4000-digit one must not overflow a float.
        if (isinstance(value, float) and not math.isfinite(value)) or not (
            0 <= value <= MAX_NUMERIC_DATE
        ):
            return f"claim {name!r} is out of range for a NumericDate"
    return None


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


class KeySet:
    """Public signing keys of one issuer, from a JWKS document."""

    def __init__(self, jwks: Sequence[Mapping[str, Any]]) -> None:
        self._jwks = tuple(jwks)
        self._built: dict[tuple[str | None, str], jwt.PyJWK | None] = {}

    @classmethod
    def parse(cls, data: object) -> KeySet:
        """Usable signature keys of a JWKS (`{"keys": [...]}`); ValueError if there are none.

        Symmetric (`oct`) keys, encryption keys and private key material are ignored.
        """
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError('not a JWKS (a JSON object with a "keys" list)')
        usable = []
        for jwk in data["keys"]:
            if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
                continue
            if jwk.get("use", "sig") != "sig" or "d" in jwk:
                continue
            try:
                jwt.PyJWK(jwk)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                continue
            usable.append(jwk)
        if not usable:
            raise ValueError("the JWKS holds no usable public signature key")
        return cls(usable)

    def __len__(self) -> int:
        return len(self._jwks)

    def has_kid(self, kid: str | None) -> bool:
        if kid is None:
            return len(self._jwks) == 1
        return any(jwk.get("kid") == kid for jwk in self._jwks)

    def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        """The key for a token's `kid` and `alg` (no `kid`: the only key of a one-key set)."""
        if not self.has_kid(kid):
            return None  # not cached: the cache holds only the set's kids (callers' alg-checked)
        if (kid, alg) not in self._built:
            self._built[(kid, alg)] = self._build(kid, alg)
        return self._built[(kid, alg)]

    def _build(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        if kid is None:
            candidates = list(self._jwks) if len(self._jwks) == 1 else []
        else:
            candidates = [jwk for jwk in self._jwks if jwk.get("kid") == kid]
        for jwk in candidates:
            if jwk.get("alg", alg) != alg:
                continue
            try:
                return jwt.PyJWK(dict(jwk), algorithm=alg)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                continue  # key type does not fit the algorithm (e.g. an EC key for RS256)
        return None


def parse_jwks_file(data: bytes, path: Path, key: str) -> KeySet:
    """A JWKS file's key set; ConfigError naming the setting."""
    try:
        return KeySet.parse(bounded_json.loads(data, max_bytes=MAX_JWKS_BYTES))
    except ValueError as exc:  # our own wording (bounded_json, KeySet), never the content
        raise ConfigError(f"{key}: {path}: {exc}") from None


def jwks_file(
    path: Path, key: str, *, reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS
) -> ReloadingFiles[KeySet]:
    """A JWKS file, followed as it changes (the issuer's keys rotate)."""
    return ReloadingFiles(
        "JWKS file",
        [path],
        lambda contents: parse_jwks_file(contents[0], path, key),
        settings_keys=[key],
        reload_interval_seconds=reload_interval_seconds,
        describe=lambda keys: f"{len(keys)} keys",
        log=logger,
    )


class JwksUrlCache:
    """The key set behind a JWKS URL: cached, refreshed in the background when stale,
    refetched (rate limited) on an unknown kid; a failed fetch keeps the last good keys."""

    def __init__(
        self,
        settings: JwtIssuerSettings,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.jwks_url is not None
        self._url = settings.jwks_url
        self._ca_file = settings.jwks_ca_file
        self._issuer = settings.issuer
        self._ttl = settings.jwks_cache_seconds
        self._min_interval = settings.jwks_min_refresh_seconds
        self._timeout = aiohttp.ClientTimeout(total=settings.jwks_fetch_timeout_seconds)
        self._session = session
        self._clock = clock
        self._keys: KeySet | None = None
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._fetches_done = 0
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"JwksUrlCache({self._url!r}, keys={len(self._keys) if self._keys else 0})"

    async def start(self) -> None:
        # An unreachable issuer at start is not fatal: requests retry (rate limited).
        await self.refresh()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        if self._keys is None or not self._keys.has_kid(kid):
            await self.refresh()  # rate limited; concurrent misses share one fetch
        else:
            self.refresh_if_stale()
        return self._keys.key_for(kid, alg) if self._keys is not None else None

    @property
    def current(self) -> KeySet | None:
        """The key set in force (a new object after every successful fetch)."""
        return self._keys

    def refresh_if_stale(self) -> None:
        """Stale-while-revalidate: after `jwksCacheSeconds`, refetch in the background."""
        if self._fetched_at is None or self._clock() - self._fetched_at >= self._ttl:
            self._refresh_in_background()

    def _may_fetch(self) -> bool:
        return self._attempted_at is None or (
            self._clock() - self._attempted_at >= self._min_interval
        )

    def _refresh_in_background(self) -> None:
        if self._background or not self._may_fetch():
            return
        task = asyncio.create_task(self.refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def refresh(self) -> None:
        """Fetch the keys unless a fetch was attempted within the min-refresh interval or
        finished while this call waited for the one in progress."""
        fetches_done = self._fetches_done
        async with self._lock:
            if self._fetches_done != fetches_done or not self._may_fetch():
                return
            self._attempted_at = self._clock()
            try:
                keys = await self._fetch()
            except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
                logger.warning(
                    "JWKS fetch failed; keeping the last good keys",
                    extra={
                        "auth_method": "jwt",
                        "issuer": self._issuer,
                        "jwks_url": self._url,
                        "error": _short(f"{type(exc).__name__}: {exc}", 300),
                    },
                )
                return
            finally:
                self._fetches_done += 1
            self._keys = keys
            self._fetched_at = self._clock()
            logger.info(
                "JWKS fetched",
                extra={"issuer": self._issuer, "jwks_url": self._url, "keys": len(keys)},
            )

    async def _fetch(self) -> KeySet:
        tls: ssl.SSLContext | bool = True  # the system's CAs
        if self._ca_file is not None:
            tls = await asyncio.to_thread(ca_bundle_context, self._ca_file)
        async with self._session.get(
            self._url, timeout=self._timeout, allow_redirects=False, ssl=tls
        ) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP status {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS larger than 1 MiB")
        try:
            data = bounded_json.loads(bytes(body), max_bytes=MAX_JWKS_BYTES)
        except bounded_json.JsonRejected as exc:
            raise ValueError(f"JWKS document: {exc}") from None
        return KeySet.parse(data)


def ca_bundle_context(path: Path) -> ssl.SSLContext:
    """A client TLS context trusting the CA certificates in `path` (PEM) only.

    Raises OSError when the file cannot be read, ssl.SSLError (an OSError too) when it holds
    no certificate."""
    return ssl.create_default_context(cafile=str(path))


class _FileKeys:
    def __init__(self, files: ReloadingFiles[KeySet]) -> None:
        self.files = files

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        return self.files.current.key_for(kid, alg)

    @property
    def current(self) -> KeySet | None:
        return self.files.current

    def refresh_if_stale(self) -> None:
        """Files are followed by their own task (broker.file_reload)."""


@dataclass(frozen=True, eq=False)
class _Verified:
    """A token that verified: its identity, while `keys` stay in force, and the seconds
    since the epoch in which PyJWT accepts its `nbf`/`iat` and `exp`. Holds no token."""

    identity: Identity
    issuer: IssuerVerifier
    keys: KeySet
    not_before: float
    not_after: float

    def valid(self, now: float) -> bool:
        return self.issuer.keys.current is self.keys and self.not_before <= now < self.not_after


def _acceptance_window(claims: Mapping[str, Any], leeway: float) -> tuple[float, float]:
    """When PyJWT accepts these (verified) claims: `exp` (required here) read as
    `int(exp) > now - leeway`, and `nbf`/`iat` as `int(x) <= now + leeway`."""
    not_before = -math.inf
    for name in ("nbf", "iat"):
        if name in claims:
            not_before = max(not_before, int(claims[name]) - leeway)
    return not_before, int(claims["exp"]) + leeway


class IssuerVerifier:
    """Verifies tokens of one configured issuer."""

    def __init__(self, settings: JwtIssuerSettings, keys: JwksUrlCache | _FileKeys) -> None:
        self.settings = settings
        self.keys = keys
        self._require = list(dict.fromkeys((*_REGISTERED, settings.identity_claim)))

    async def verify(
        self, token: str, header: Mapping[str, Any], unverified: Mapping[str, Any]
    ) -> _Verified:
        """`header` and `unverified` (the payload): the token's, as parsed (bounded)."""
        s = self.settings
        alg = header.get("alg")
        if alg not in s.algorithms:
            raise JwtRejected("algorithm not allowed", issuer=s.issuer, alg=_short(alg, 20))
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise JwtRejected("kid is not a string", issuer=s.issuer)
        key = await self.keys.key_for(kid, alg)
        # The set the key came from (no await since): what the verification stands on.
        keys = self.keys.current
        if key is None or keys is None:
            raise JwtRejected(
                "no key for the token's kid and alg", issuer=s.issuer, kid=_short(kid), alg=alg
            )
        # Checked before PyJWT reads them: it would take int("9999999999") or int(1e300).
        problem = numeric_date_problem(unverified)
        if problem is not None:
            raise JwtRejected(problem, issuer=s.issuer, kid=_short(kid))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(s.audiences),
                issuer=s.issuer,
                leeway=s.clock_skew_seconds,
                options={
                    "require": self._require,
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_aud": True,
                    "verify_iss": True,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.PyJWTError as exc:
            # The exception text is PyJWT's, never the token; still, log only our wording.
            raise JwtRejected(_describe(exc), issuer=s.issuer, kid=_short(kid)) from None
        name = claims.get(s.identity_claim)
        if not isinstance(name, str) or not name:
            raise JwtRejected(
                f"identity claim {s.identity_claim!r} is not a non-empty string", issuer=s.issuer
            )
        identity = Identity(method="jwt", name=name, issuer=s.issuer, claims=_freeze(claims))
        not_before, not_after = _acceptance_window(claims, s.clock_skew_seconds)
        return _Verified(identity, self, keys, not_before, not_after)


def _describe(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid (nbf or iat in the future)"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "audience not accepted"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "issuer mismatch"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing required claim {_short(exc.claim, 40)!r}"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "signature verification failed"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed for the key"
    if isinstance(exc, jwt.InvalidKeyError):
        return "key rejected (too short?)"
    return f"invalid token ({type(exc).__name__})"


class JwtVerifier:
    """All configured issuers; `start()` loads JWKS files and does the first URL fetches."""

    def __init__(
        self,
        settings: JwtAuthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._reload_interval = reload_interval_seconds
        self._issuers: dict[str, IssuerVerifier] = {}
        self._caches: list[JwksUrlCache] = []
        self._files: list[ReloadingFiles[KeySet]] = []
        self._session: aiohttp.ClientSession | None = None
        # SHA-256 of a token -> what its verification found.
        self._verified: dict[bytes, _Verified] = {}

    def __repr__(self) -> str:
        return f"JwtVerifier(issuers={[i.issuer for i in self._settings.issuers]!r})"

    async def start(self) -> None:
        try:
            for index, issuer in enumerate(self._settings.issuers):
                keys: JwksUrlCache | _FileKeys
                if issuer.jwks_file is not None:
                    key = f"authentication.jwt.issuers[{index}].jwksFile"
                    files = jwks_file(
                        issuer.jwks_file, key, reload_interval_seconds=self._reload_interval
                    )
                    keys = _FileKeys(await files.open())
                    self._files.append(files)
                else:
                    if issuer.jwks_ca_file is not None:
                        key = f"authentication.jwt.issuers[{index}].jwksCaFile"
                        try:
                            await asyncio.to_thread(ca_bundle_context, issuer.jwks_ca_file)
                        except OSError as exc:
                            raise ConfigError(
                                f"{key}: {issuer.jwks_ca_file} is not a readable PEM CA "
                                f"bundle ({exc.strerror or type(exc).__name__})"
                            ) from None
                    if self._session is None:
                        self._session = aiohttp.ClientSession()
                    keys = JwksUrlCache(issuer, self._session, self._clock)
                    self._caches.append(keys)
                self._issuers[issuer.issuer] = IssuerVerifier(issuer, keys)
            await asyncio.gather(*(cache.start() for cache in self._caches))
        except BaseException:
            await self.close()
            raise

    @property
    def jwks_files(self) -> list[ReloadingFiles[KeySet]]:
        """The JWKS files of the issuers configured with one (after `start`)."""
        return list(self._files)

    async def close(self) -> None:
        for cache in self._caches:
            await cache.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def remembered(self, token: str) -> Identity | None:
        """The identity of a token that verified before, if PyJWT would accept it now
        with the keys in force (else None: verify it)."""
        if not self._verified:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        verified = self._verified.get(digest)
        if verified is None:
            return None
        if not verified.valid(time.time()):
            del self._verified[digest]
            return None
        verified.issuer.keys.refresh_if_stale()  # as a verification would
        return verified.identity

    async def verify(self, token: str) -> Identity:
        verified = await self._verify(token)
        if len(self._verified) >= MAX_REMEMBERED_TOKENS:
            self._verified.clear()
        self._verified[hashlib.sha256(token.encode()).digest()] = verified
        return verified.identity

    async def _verify(self, token: str) -> _Verified:
        split = _split(token)
        if split is None:
            raise JwtRejected("malformed token")
        header, unverified = split
        if unverified is None:
            raise JwtRejected("payload is not a JSON object (within the size and depth bounds)")
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise JwtRejected("token has no iss claim")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise JwtRejected("issuer not configured", issuer=_short(iss))
        return await issuer.verify(token, header, unverified)
