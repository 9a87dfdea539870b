"""JWT test support: a signer with real RSA/EC keys, its JWKS file, an issuer's settings.

Shared by tests/unit/test_authn.py and the hardening tests; plain helpers only (no fixtures).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://issuer.example"
AUDIENCE = "token-broker"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Signer:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    kid: str
    alg: str

    def jwk(self, *, with_alg: bool = True) -> dict[str, Any]:
        public = self.key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        data.update(kid=self.kid, use="sig")
        if with_alg:
            data["alg"] = self.alg
        return data

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def mint(
        self,
        *,
        exp: float = 300,
        iat: float = 0,
        nbf: float | None = None,
        drop: tuple[str, ...] = (),
        kid: str | None = None,
        **claims: Any,
    ) -> str:
        """A signed token; exp/iat/nbf are offsets from now in seconds."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "ci/runner",
            "exp": now + exp,
            "iat": now + iat,
        }
        if nbf is not None:
            payload["nbf"] = now + nbf
        payload.update(claims)
        for name in drop:
            payload.pop(name)
        return self.sign(payload, kid=kid)

    def sign(self, payload: dict[str, Any], *, kid: str | None = None) -> str:
        """`payload` signed as it is (claims of any JSON type)."""
        return jwt.encode(payload, self.key, algorithm=self.alg, headers={"kid": kid or self.kid})


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_jwks(path: Path, *jwks: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"keys": list(jwks)}), encoding="utf-8")
    return path


def issuer_settings(**overrides: Any) -> dict[str, Any]:
    return {"jwt": {"issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE, "other"], **overrides}]}}
