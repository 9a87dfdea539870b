"""What the client sends and gets: `build_request` (with a `BoundObject`), `TokenResult`, and
`jwt_claims` (a JWT's claims, not verified: for expiry, lifetime and display)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.lifetime import lifetime_seconds, numeric_date

# kubectl's boundObjectKinds: kind -> apiVersion.
BOUND_OBJECT_KINDS = {"Node": "v1", "Pod": "v1", "Secret": "v1"}
METHOD = "/tokenbroker.v1.TokenBrokerService/CreateToken"


@dataclass(frozen=True)
class BoundObject:
    """The object a token is bound to (Pod, Secret or Node); `uid` optional."""

    kind: str
    name: str
    uid: str = ""

    def to_proto(self) -> pb.BoundObjectReference:
        if self.kind not in BOUND_OBJECT_KINDS:
            raise ValueError(f"bound object kind must be one of {', '.join(BOUND_OBJECT_KINDS)}")
        if not self.name:
            raise ValueError("a bound object needs a name")
        return pb.BoundObjectReference(
            kind=self.kind, api_version=BOUND_OBJECT_KINDS[self.kind], name=self.name, uid=self.uid
        )


@dataclass(frozen=True)
class TokenResult:
    """A minted token. `token_request` is the whole TokenRequest the broker returned.

    `expiration_timestamp` is timezone-aware (UTC); a dry run, which mints nothing, has an
    empty token and the Unix epoch there.
    """

    token: str = field(repr=False)
    expiration_timestamp: datetime
    audiences: tuple[str, ...]
    warnings: tuple[str, ...]
    token_request: pb.TokenRequest = field(repr=False)

    @classmethod
    def from_response(cls, response: pb.CreateTokenResponse) -> TokenResult:
        tr = response.token_request
        expires = (
            tr.status.expiration_timestamp.ToDatetime(tzinfo=UTC)
            if tr.status.HasField("expiration_timestamp")
            else datetime.fromtimestamp(0, UTC)
        )
        return cls(
            token=tr.status.token,
            expiration_timestamp=expires,
            audiences=tuple(tr.spec.audiences),
            warnings=tuple(response.warnings),
            token_request=tr,
        )

    @property
    def issued_at(self) -> datetime | None:
        """The JWT's `iat`, else metadata.creationTimestamp (the API server's clock)."""
        seconds = self._issued_at_seconds()
        if seconds is not None:
            with contextlib.suppress(OverflowError, ValueError, OSError):  # not a datetime
                return datetime.fromtimestamp(seconds, UTC)
        return None

    def lifetime_seconds(self) -> float | None:
        """Seconds from issue to expiry by the API server's clock (None: unknown): the rule of
        the broker's cache (broker.lifetime)."""
        status = self.token_request.status
        if not status.HasField("expiration_timestamp"):
            return None
        spec = self.token_request.spec
        return lifetime_seconds(
            _seconds(status.expiration_timestamp),
            self._issued_at_seconds(),
            spec.expiration_seconds if spec.HasField("expiration_seconds") else None,
        )

    def _issued_at_seconds(self) -> float | None:
        iat = numeric_date(jwt_claims(self.token).get("iat"))
        if iat is None and self.token_request.metadata.HasField("creation_timestamp"):
            return _seconds(self.token_request.metadata.creation_timestamp)
        return iat


def _seconds(timestamp: Timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


def build_request(
    namespace: str,
    service_account: str,
    *,
    audiences: Sequence[str] = (),
    expiration_seconds: int | None = None,
    bound_object: BoundObject | None = None,
    dry_run: bool = False,
) -> pb.CreateTokenRequest:
    spec = pb.TokenRequestSpec(audiences=list(audiences))
    if expiration_seconds is not None:
        spec.expiration_seconds = expiration_seconds
    if bound_object is not None:
        spec.bound_object_ref.CopyFrom(bound_object.to_proto())
    return pb.CreateTokenRequest(
        namespace=namespace,
        service_account=service_account,
        token_request=pb.TokenRequest(spec=spec),
        dry_run=["All"] if dry_run else [],
    )


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, NOT verified ({} when it is not one): for expiry and display."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}
