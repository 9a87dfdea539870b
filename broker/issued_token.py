"""A token the API server minted: what the broker reads from it, and the lifetime it checks.

`read_token` decodes the JWT's payload segment without verifying the signature: the token came
from the API server over TLS, and only the broker's own bookkeeping reads it (the audit line's
`jti` and lifetime, the cache's `iat`, the lifetime check below). It is remembered by the
token's SHA-256 (never the token itself), in a bounded table simply emptied when full: a cache
hit hands out the same token again and again, and decoding costs more than the rest of the
audit line.

`check_lifetime`: the deciding rule's `maxExpiration` holds for the token actually issued, i.e.
for the JWT's own `exp - iat` (and `kubernetes.io.warnafter - iat`), not for what the
TokenRequest's `spec.expirationSeconds` and `status.expirationTimestamp` say. They differ when
the API server extends the token: with `--service-account-extend-token-expiration` (on by
default) a Pod-bound request of exactly 3607 s for the API server's own audiences gets a JWT
valid for a year, while spec and status still say 3607 s. A token longer than the rule allows
is refused (`IssuedTokenRefused`, carrying the minted result for the audit line) before the
cache stores it or anyone receives it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jwt.utils import base64url_decode

from broker.errors import BrokerError
from broker.lifetime import numeric_date
from broker.reasons import Reason

if TYPE_CHECKING:
    from broker.upstream import UpstreamResult

FINGERPRINT_HEX_CHARS = 16
_MEMO_ENTRIES = 4096


@dataclass(frozen=True)
class TokenFacts:
    """What the broker records about a token instead of the token. Holds no secret."""

    # First 16 hex digits of the token's SHA-256: matches a token someone holds against the
    # audit log, useless to rebuild it. None for an empty token.
    fingerprint: str | None = None
    jti: str | None = None
    # NumericDate claims (seconds since the epoch); None when missing or not a number.
    issued_at: float | None = None
    expires_at: float | None = None
    # `kubernetes.io.warnafter`: only on tokens the API server extended.
    warn_after: float | None = None
    # `kubernetes.io.serviceaccount.uid`: which service account of that name it was minted for
    # (a deleted and recreated one has another UID).
    service_account_uid: str | None = None

    @property
    def lifetime_seconds(self) -> int | None:
        """How long the token is valid: `exp - iat`, rounded up; None when either is missing."""
        if self.issued_at is None or self.expires_at is None:
            return None
        return math.ceil(self.expires_at - self.issued_at)

    @property
    def longest_validity_seconds(self) -> int | None:
        """The longest any claim says the token lasts: `max(exp, warnafter) - iat`."""
        lifetime = self.lifetime_seconds
        if lifetime is None or self.warn_after is None or self.issued_at is None:
            return lifetime
        return max(lifetime, math.ceil(self.warn_after - self.issued_at))


def read_token(token: str) -> TokenFacts:
    """The facts of a token (see the module docstring); a token that is not a JWT has only
    a fingerprint, and an empty one none."""
    if not token:
        return TokenFacts()
    digest = hashlib.sha256(token.encode("utf-8")).digest()
    try:
        return _facts_by_digest[digest]
    except KeyError:
        pass
    facts = _decode(token, digest.hex()[:FINGERPRINT_HEX_CHARS])
    if len(_facts_by_digest) >= _MEMO_ENTRIES:
        _facts_by_digest.clear()
    _facts_by_digest[digest] = facts
    return facts


_facts_by_digest: dict[bytes, TokenFacts] = {}


def _decode(token: str, fingerprint: str) -> TokenFacts:
    # Only the payload segment is read. jwt.decode(verify_signature=False) also parses the
    # header and runs its claim checks: 8x the cost, on every cache miss, for a few fields.
    header, dot, rest = token.partition(".")
    payload, dot2, signature = rest.partition(".")
    if not (header and dot and dot2) or "." in signature:
        return TokenFacts(fingerprint=fingerprint)
    try:
        claims = json.loads(base64url_decode(payload))
    except ValueError:  # bad base64 (binascii.Error), bad UTF-8 or bad JSON
        return TokenFacts(fingerprint=fingerprint)
    if not isinstance(claims, dict):
        return TokenFacts(fingerprint=fingerprint)
    jti = claims.get("jti")
    private = claims.get("kubernetes.io")
    if not isinstance(private, dict):
        private = {}
    account = private.get("serviceaccount")
    uid = account.get("uid") if isinstance(account, dict) else None
    return TokenFacts(
        fingerprint=fingerprint,
        jti=jti if isinstance(jti, str) and jti else None,
        issued_at=numeric_date(claims.get("iat")),
        expires_at=numeric_date(claims.get("exp")),
        warn_after=numeric_date(private.get("warnafter")),
        service_account_uid=uid if isinstance(uid, str) and uid else None,
    )


@dataclass
class IssuedTokenRefused(BrokerError):
    """A token the API server minted that the broker does not hand out. `result` (the minted
    token, for the audit line's jti and lifetime) never appears in a repr or message."""

    result: UpstreamResult | None = field(default=None, repr=False, compare=False)


def check_lifetime(result: UpstreamResult, *, maximum: int, rule: str | None) -> None:
    """Raise IssuedTokenRefused (FAILED_PRECONDITION, TOKEN_LIFETIME_EXCEEDS_POLICY) unless
    the minted token's own lifetime is known and at most `maximum` seconds."""
    facts = read_token(result.token_request.status.token)
    longest = facts.longest_validity_seconds
    if longest is not None and longest <= maximum:
        return
    if longest is None:
        what = "a token whose lifetime cannot be read (no exp or iat claim)"
    else:
        what = (
            f"a token valid for {longest} seconds, longer than the maximum of {maximum} seconds "
            "for this service account (the API server extends some tokens, e.g. with "
            "--service-account-extend-token-expiration)"
        )
    metadata = {"maxExpirationSeconds": str(maximum)}
    if rule is not None:
        metadata["rule"] = rule
    if longest is not None:
        metadata["tokenLifetimeSeconds"] = str(longest)
    raise IssuedTokenRefused.of(
        Reason.TOKEN_LIFETIME_EXCEEDS_POLICY,
        f"the Kubernetes API server minted {what}; the token broker withheld it: it was "
        "not handed out and not cached",
        metadata=metadata,
        result=result,
    )
