"""`token-broker exec-credential`: a kubectl / client-go credential plugin.

kubectl runs it (kubeconfig `users[].user.exec`) and reads an ExecCredential from stdout:

    {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
     "status": {"token": "...", "expirationTimestamp": "2026-11-29T06:00:00Z"}}

`KUBERNETES_EXEC_INFO`, when kubectl sets it, names the apiVersion to answer in (v1, or
v1beta1 for older clients; anything else is an error). `spec.interactive` is read only to
confirm that nothing is ever prompted: the plugin never reads stdin.

Tokens are cached on disk so kubectl does not call the broker on every command: one file per
key in `--cache-dir` (default `$XDG_CACHE_HOME/token-broker`, else `~/.cache/token-broker`;
directory 0700, files 0600, written atomically), served until the broker cache's refresh point
(80% of the lifetime minus jitter, `broker.lifetime.refresh_due_at`). The key is a SHA-256 of the
broker address (and TLS server name), the whole request, and the credential's *identity*, never
the credential: a JWT's issuer and subject; an opaque key's salted SHA-256 fingerprint; the
client certificate's SHA-256. Concurrent runs for one key take a lock, so one of them calls the
broker. `--no-cache` turns the cache off.

kubectl runs the plugin for every command: it imports only the client side (see broker.client),
and the command (broker.cli.exec_credential) imports this module only when it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.client import ClientConfig, TokenBrokerClient, TokenResult, jwt_claims
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.lifetime import default_jitter, refresh_due_at

API_VERSION_V1 = "client.authentication.k8s.io/v1"
API_VERSION_V1BETA1 = "client.authentication.k8s.io/v1beta1"
SUPPORTED_API_VERSIONS = (API_VERSION_V1, API_VERSION_V1BETA1)
KIND = "ExecCredential"
EXEC_INFO_ENV = "KUBERNETES_EXEC_INFO"
CACHE_FORMAT = 1
_FINGERPRINT_SALT = b"token-broker exec-credential cache v1\0"


class ExecCredentialError(Exception):
    """The plugin cannot answer (printed as `error: ...`, exit 1)."""


def exec_api_version(environ: Mapping[str, str]) -> str:
    """The apiVersion to answer in, from KUBERNETES_EXEC_INFO (absent: v1)."""
    raw = environ.get(EXEC_INFO_ENV, "").strip()
    if not raw:
        return API_VERSION_V1
    try:
        info = json.loads(raw)
    except ValueError:
        raise ExecCredentialError(f"{EXEC_INFO_ENV} is not JSON") from None
    if not isinstance(info, dict):
        raise ExecCredentialError(f"{EXEC_INFO_ENV} is not an ExecCredential object")
    version = info.get("apiVersion")
    if version not in SUPPORTED_API_VERSIONS:
        raise ExecCredentialError(
            f"{EXEC_INFO_ENV}: apiVersion {version!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_API_VERSIONS)})"
        )
    spec = info.get("spec")
    # spec.interactive says whether stdin may be used for prompts: this plugin never prompts,
    # so the answer changes nothing; it is validated, not acted on.
    if spec is not None and not isinstance(spec, dict):
        raise ExecCredentialError(f"{EXEC_INFO_ENV}: spec is not an object")
    return str(version)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def exec_credential(api_version: str, token: str, expiration: datetime) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": KIND,
        "status": {"token": token, "expirationTimestamp": rfc3339(expiration)},
    }


# --- the cache key ----------------------------------------------------------------------------


def credential_identity(config: ClientConfig) -> dict[str, str]:
    """Who the broker will see, without the credential: tokens of one identity are shared."""
    identity: dict[str, str] = {}
    bearer = dict(config.call_metadata()).get("authorization", "").removeprefix("Bearer ")
    if bearer:
        claims = jwt_claims(bearer)
        if claims.get("iss") and claims.get("sub"):
            # A JWT is rotated often; its issuer and subject are who it proves.
            identity.update(jwtIssuer=str(claims["iss"]), jwtSubject=str(claims["sub"]))
        else:
            digest = hashlib.sha256(_FINGERPRINT_SALT + bearer.encode("utf-8")).hexdigest()
            identity["bearerFingerprint"] = digest
    certificate = config.client_certificate()
    if certificate is not None:
        identity["clientCertificate"] = hashlib.sha256(certificate).hexdigest()
    return identity


def cache_key(config: ClientConfig, request: pb.CreateTokenRequest) -> str:
    material = {
        "address": config.address,
        "serverName": config.server_name or "",
        "request": request.SerializeToString(deterministic=True).hex(),
        "identity": credential_identity(config),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "token-broker"


# --- the cache --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedToken:
    token: str
    expiration: datetime
    refresh_at: float  # Unix time

    def fresh(self, now: float) -> bool:
        return now < self.refresh_at and now < self.expiration.timestamp()


class TokenFileCache:
    """One file per key in a private directory; see the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def prepare(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self.directory.stat()
        if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
            self.directory.chmod(0o700)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """An exclusive lock per key, across processes (flock on `<key>.lock`)."""
        fd = os.open(self.directory / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self, key: str) -> CachedToken | None:
        """The cached token of `key`, or None (absent, unreadable, not ours, not 0600)."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o600:
                return None
            with os.fdopen(fd, "rb", closefd=False) as file:
                data = json.loads(file.read())
            if data.get("format") != CACHE_FORMAT or data.get("key") != key:
                return None
            return CachedToken(
                token=str(data["token"]),
                expiration=datetime.fromisoformat(data["expirationTimestamp"]),
                refresh_at=float(data["refreshAt"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        finally:
            os.close(fd)

    def write(self, key: str, cached: CachedToken) -> None:
        # Imported here: tempfile (and what it imports) only on a miss, not on every hit.
        from broker.client.files import write_atomically

        data = {
            "format": CACHE_FORMAT,
            "key": key,
            "token": cached.token,
            "expirationTimestamp": rfc3339(cached.expiration),
            "refreshAt": cached.refresh_at,
        }
        write_atomically(self.path(key), json.dumps(data).encode("utf-8"), 0o600)


# --- the command ------------------------------------------------------------------------------


def obtain_token(
    config: ClientConfig,
    request: pb.CreateTokenRequest,
    cache: TokenFileCache | None,
    *,
    clock: Any = time.time,
) -> tuple[CachedToken, tuple[str, ...]]:
    """A token for the request: from the cache while fresh, else from the broker (cached)."""
    if cache is None:
        result = _create(config, request)
        return _cached(result, clock()), result.warnings
    cache.prepare()
    key = cache_key(config, request)
    with cache.locked(key):
        cached = cache.read(key)
        if cached is not None and cached.fresh(clock()):
            return cached, ()
        result = _create(config, request)
        cached = _cached(result, clock())
        try:
            cache.write(key, cached)
        except OSError as exc:  # a read-only home must not break kubectl
            print(f"Warning: cannot cache the token in {cache.directory}: {exc}", file=sys.stderr)
        return cached, result.warnings


def _create(config: ClientConfig, request: pb.CreateTokenRequest) -> TokenResult:
    with TokenBrokerClient(config) as client:
        result = client.create_token_request(request)
    if not result.token:
        raise ExecCredentialError("the broker answered without a token")
    return result


def _cached(result: TokenResult, now: float) -> CachedToken:
    lifetime = result.lifetime_seconds()
    if lifetime is None:
        lifetime = result.expiration_timestamp.timestamp() - now
    # Never past the token's own expiry on this machine's clock, whatever the skew.
    refresh_at = min(
        refresh_due_at(now, now + lifetime, default_jitter()),
        result.expiration_timestamp.timestamp(),
    )
    return CachedToken(result.token, result.expiration_timestamp, refresh_at)
