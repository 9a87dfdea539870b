"""Service-account JWTs as kube-apiserver signs them (`pkg/serviceaccount/{claims,jwt}.go`).

Header `{"alg","kid"}` (no `typ`), `kid` = base64url(SHA-256(DER SubjectPublicKeyInfo)) without
padding, claims with sorted keys (go-jose marshals a merged map), `aud` always an array.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# Kubelet-style extension (pkg/serviceaccount/claims.go).
WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS = 60 * 60 + 7
EXPIRATION_EXTENSION_SECONDS = 24 * 365 * 60 * 60

_KEY_CACHE: dict[str, SigningKey] = {}
_KEY_CACHE_LOCK = threading.Lock()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_b64url(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64url(value.to_bytes(size, "big"))


def generate_key(algorithm: str) -> SigningKey:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def shared_key(algorithm: str) -> SigningKey:
    """One generated key per algorithm and process (RSA generation is slow enough to matter)."""
    with _KEY_CACHE_LOCK:
        if algorithm not in _KEY_CACHE:
            _KEY_CACHE[algorithm] = generate_key(algorithm)
        return _KEY_CACHE[algorithm]


def load_key(pem: bytes, algorithm: str) -> SigningKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if algorithm == "RS256" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if (
        algorithm == "ES256"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise ValueError(f"the signing key does not fit {algorithm}")


def key_id(key: SigningKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _b64url(hashlib.sha256(der).digest())


@dataclass(frozen=True)
class BoundObject:
    """A resolved bound object (or a pod's node) for the private claims."""

    name: str
    uid: str


class TokenSigner:
    def __init__(self, key: SigningKey, algorithm: str, issuer: str) -> None:
        self._key = key
        self.algorithm = algorithm
        self.issuer = issuer
        self.kid = key_id(key)

    def __repr__(self) -> str:
        return f"TokenSigner(algorithm={self.algorithm!r}, kid={self.kid!r})"

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def jwks(self) -> dict[str, Any]:
        """The JWK set, members in go-jose's order (use, kty, kid, crv, alg, x, y / n, e)."""
        public = self._key.public_key()
        jwk: dict[str, Any]
        if isinstance(public, rsa.RSAPublicKey):
            numbers = public.public_numbers()
            jwk = {
                "use": "sig",
                "kty": "RSA",
                "kid": self.kid,
                "alg": self.algorithm,
                "n": _int_b64url(numbers.n),
                "e": _int_b64url(numbers.e),
            }
        else:
            point = public.public_numbers()
            jwk = {
                "use": "sig",
                "kty": "EC",
                "kid": self.kid,
                "crv": "P-256",
                "alg": self.algorithm,
                "x": _int_b64url(point.x, 32),
                "y": _int_b64url(point.y, 32),
            }
        return {"keys": [jwk]}

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims,
            self._key,
            algorithm=self.algorithm,
            headers={"kid": self.kid, "typ": None},  # typ None: PyJWT then omits it
        )


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return value


def build_claims(
    *,
    issuer: str,
    namespace: str,
    service_account: BoundObject,
    audiences: list[str],
    now: int,
    expiration_seconds: int,
    warn_after_seconds: int = 0,
    pod: BoundObject | None = None,
    secret: BoundObject | None = None,
    node: BoundObject | None = None,
) -> dict[str, Any]:
    """`serviceaccount.Claims` plus the issuer: public and `kubernetes.io` private claims."""
    private: dict[str, Any] = {
        "namespace": namespace,
        "serviceaccount": {"name": service_account.name, "uid": service_account.uid},
    }
    if pod is not None:
        private["pod"] = {"name": pod.name, "uid": pod.uid}
        if node is not None:
            private["node"] = {"name": node.name, "uid": node.uid}
    elif secret is not None:
        private["secret"] = {"name": secret.name, "uid": secret.uid}
    elif node is not None:
        private["node"] = {"name": node.name, "uid": node.uid}
    if warn_after_seconds:
        private["warnafter"] = now + warn_after_seconds
    claims = {
        "aud": list(audiences),
        "exp": now + expiration_seconds,
        "iat": now,
        "iss": issuer,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": private,
        "nbf": now,
        "sub": f"system:serviceaccount:{namespace}:{service_account.name}",
    }
    return dict(_sorted(claims))
