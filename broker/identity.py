"""Who is calling: the result of authentication, the input of policy and audit.

Kept in its own module so authentication (which produces it), policy (which matches it) and
the audit log (which records it) depend on this small type and not on each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

# How the caller proved who it is.
AuthMethod = Literal["mtls", "apiKey", "jwt", "unixSocket"]
AUTH_METHODS: tuple[AuthMethod, ...] = ("mtls", "apiKey", "jwt", "unixSocket")


@dataclass(frozen=True)
class Identity:
    """A proven caller identity. Never holds the credential that proved it.

    - mtls: `name` is the client certificate's URI SAN (e.g. a SPIFFE ID), else its first DNS
      SAN, else its subject CN.
    - apiKey: `name` is the identity the key's hash is mapped to in the key file.
    - jwt: `name` is the `sub` claim (or the issuer's configured identity claim), `issuer` the
      token's `iss`, `claims` the verified claims (for policy claim matchers and audit).
    - unixSocket: `name` is the fixed identity configured for the socket.
    """

    method: AuthMethod
    name: str
    issuer: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __str__(self) -> str:
        return (
            f"{self.method}:{self.name}"
            if self.issuer is None
            else (f"{self.method}:{self.issuer}#{self.name}")
        )
