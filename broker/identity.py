"""Who is calling: the result of authentication, the input of policy and audit.

Kept in its own module so authentication (which produces it), policy (which matches it) and
the audit log (which records it) depend on this small type and not on each other.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from broker.spiffe import spiffe_id_problem

# How the caller proved who it is.
AuthMethod = Literal["mtls", "apiKey", "jwt", "unixSocket"]
AUTH_METHODS: tuple[AuthMethod, ...] = ("mtls", "apiKey", "jwt", "unixSocket")

# The client certificate's name fields: URI SAN (a SPIFFE ID), DNS SAN, subject CN.
CertificateField = Literal["uri", "dns", "cn"]
CERTIFICATE_FIELDS: tuple[CertificateField, ...] = ("uri", "dns", "cn")
FIELD_TITLES: Mapping[CertificateField, str] = MappingProxyType(
    {"uri": "URI SAN", "dns": "DNS SAN", "cn": "subject CN"}
)


@dataclass(frozen=True)
class CertificateNames:
    """The names of a verified client certificate, every one of them, by field."""

    uris: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    # The subject's CN; None without one, or with several (which would be ambiguous).
    common_name: str | None = None

    @classmethod
    def only(cls, field: CertificateField, name: str) -> CertificateNames:
        """A certificate with this one name (`policy explain --subject`, tests)."""
        if field == "uri":
            return cls(uris=(name,))
        if field == "dns":
            return cls(dns_names=(name,))
        return cls(common_name=name)

    def values(self, field: CertificateField) -> tuple[str, ...]:
        if field == "uri":
            return self.uris
        if field == "dns":
            return self.dns_names
        return (self.common_name,) if self.common_name is not None else ()

    def primary(self) -> tuple[CertificateField, str] | None:
        """The name the caller is known by: the URI SAN, else the first DNS SAN, else the CN
        (the first URI SAN when there are several)."""
        for f in CERTIFICATE_FIELDS:
            values = self.values(f)
            if values:
                return f, values[0]
        return None

    @functools.cached_property
    def spiffe_id(self) -> str | None:
        """The SPIFFE ID of an X509-SVID: the certificate's only URI SAN, when it is a valid
        SPIFFE ID. None otherwise (no URI SAN, several, or not a valid SPIFFE ID)."""
        if len(self.uris) != 1 or spiffe_id_problem(self.uris[0]) is not None:
            return None
        return self.uris[0]

    def describe(self) -> str:
        """Every name, by field (for operators: `policy explain`)."""
        parts = []
        for f in CERTIFICATE_FIELDS:
            values = self.values(f)
            if values:
                parts.append(f"{FIELD_TITLES[f]} {', '.join(repr(v) for v in values)}")
        if self.spiffe_id is not None:
            parts[0] += " (a SPIFFE ID)"
        return "; ".join(parts) or "no names"


@dataclass(frozen=True)
class Identity:
    """A proven caller identity. Never holds the credential that proved it.

    - mtls: `name` is the client certificate's URI SAN (e.g. a SPIFFE ID), else its first DNS
      SAN, else its subject CN, and `certificate_field` says which (uri, dns or cn);
      `certificate` holds all of its names, which policy subjects match field by field
      (broker.policy).
    - apiKey: `name` is the identity the key's hash is mapped to in the key file.
    - jwt: `name` is the `sub` claim (or the issuer's configured identity claim), `issuer` the
      token's `iss`, `claims` the verified claims (for policy claim matchers and audit).
    - unixSocket: `name` is the fixed identity configured for the socket.

    An mtls identity made from a name alone (`Identity(method="mtls", name=...)`) stands for
    a certificate with just that name, in `certificate_field` (default uri).
    """

    method: AuthMethod
    name: str
    issuer: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    certificate_field: CertificateField | None = None
    certificate: CertificateNames | None = None

    def __post_init__(self) -> None:
        if self.method != "mtls":
            if self.certificate_field is not None or self.certificate is not None:
                raise ValueError("only mtls identities have certificate names")
            return
        if self.certificate_field is None:
            object.__setattr__(self, "certificate_field", "uri")
        if self.certificate is None:
            names = CertificateNames.only(self.certificate_field or "uri", self.name)
            object.__setattr__(self, "certificate", names)

    @classmethod
    def from_certificate(cls, names: CertificateNames) -> Identity | None:
        """The identity of a verified client certificate; None when it has no name at all."""
        primary = names.primary()
        if primary is None:
            return None
        field, name = primary
        return cls(method="mtls", name=name, certificate_field=field, certificate=names)

    @functools.cached_property
    def memo_key(self) -> str:
        """Everything this identity is, as one string: equal strings, equal identities (every
        field, the claims with their JSON types). Keys the decision memo
        (broker.decision_memo); computed once per object."""
        certificate = self.certificate
        names = (
            None
            if certificate is None
            else (certificate.uris, certificate.dns_names, certificate.common_name)
        )
        return repr(
            (
                self.method,
                self.name,
                self.issuer,
                self.certificate_field,
                names,
                _canonical(self.claims),
            )
        )

    def __str__(self) -> str:
        if self.certificate_field is not None:
            return f"{self.method}:{self.certificate_field}:{self.name}"
        return (
            f"{self.method}:{self.name}"
            if self.issuer is None
            else (f"{self.method}:{self.issuer}#{self.name}")
        )


def _canonical(value: Any) -> Any:
    """A JSON value as nested tuples, each leaf with its type (1, 1.0 and true differ)."""
    if isinstance(value, Mapping):
        return ("object", tuple(sorted((str(k), _canonical(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return ("array", tuple(_canonical(v) for v in value))
    return (type(value).__name__, value)
