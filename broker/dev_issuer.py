"""Dev mode's throwaway JWT issuer, so that the OAuth door (`POST /oauth2/token`) can be tried
locally: a key generated at each start in the dev directory, its JWKS file (what
`authentication.jwt` reads, as for any issuer configured with `jwksFile`), and a subject token
for a CI-like caller written to `subject.jwt`.

DEV ONLY: the issuer's name is under `.invalid` (RFC 2606), so it cannot be a real one; the key
and the token live and die with the dev directory. The token is a credential: only its file's
path is ever printed. Signing reuses the emulator's `TokenSigner` (ES256, kid from the key).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from broker.emulator.tokens import TokenSigner, generate_key

ISSUER = "https://dev-issuer.token-broker.invalid"
AUDIENCE = "token-broker"
SUBJECT = "dev-ci"
ALGORITHM = "ES256"
SUBJECT_TOKEN_SECONDS = 3600
# Files in the dev directory.
DIRECTORY = "jwt-issuer"
SUBJECT_TOKEN_FILE = "subject.jwt"


@dataclass(frozen=True)
class DevIssuer:
    """What `write_dev_issuer` wrote: the key set the broker verifies with, the signing key,
    and the subject token's file (the token itself is not kept)."""

    jwks_file: Path
    key_file: Path
    subject_token_file: Path


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600)
    path.write_bytes(data)


def write_dev_issuer(workdir: Path, *, now: float | None = None) -> DevIssuer:
    """A new key (`jwt-issuer/signing-key.pem`, 0600), its JWKS (`jwt-issuer/jwks.json`) and a
    subject token for SUBJECT valid SUBJECT_TOKEN_SECONDS (`subject.jwt`, 0600, no newline:
    `curl --data-urlencode subject_token@FILE` sends the file as it is)."""
    directory = workdir / DIRECTORY
    directory.mkdir(mode=0o700)
    key = generate_key(ALGORITHM)
    signer = TokenSigner(key, ALGORITHM, ISSUER)
    key_file = directory / "signing-key.pem"
    _write_private(
        key_file,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    jwks_file = directory / "jwks.json"
    jwks_file.write_text(json.dumps(signer.jwks(), indent=2) + "\n", encoding="utf-8")
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "iat": issued,
        "nbf": issued,
        "exp": issued + SUBJECT_TOKEN_SECONDS,
    }
    subject_token_file = workdir / SUBJECT_TOKEN_FILE
    _write_private(subject_token_file, signer.sign(claims).encode("ascii"))
    return DevIssuer(jwks_file, key_file, subject_token_file)


def issuer_settings(issuer: DevIssuer) -> dict[str, object]:
    """The `authentication.jwt.issuers` entry (model_dump form) for the dev issuer."""
    return {
        "issuer": ISSUER,
        "audiences": (AUDIENCE,),
        "jwks_file": issuer.jwks_file,
        "algorithms": (ALGORITHM,),
    }
