"""What a caller presents to prove who it is, as its transport received it.

The request path (broker.request_path) is transport-independent: it takes a caller's
`Credentials` and a request, and authentication (broker.authn) reads only this. Each transport
extracts them at its edge: the gRPC adapter (broker.service) from the call's metadata, peer and
auth context.

- `authorization`: the values of the `authorization` header(s), as received (several values, or
  one that is not text, are refused by authentication); a bearer credential, so never shown in
  a repr.
- `peer`: the transport's peer address (gRPC's `ipv4:10.0.0.7:51234`, `unix:...`): the per-address
  failed-authentication throttle and the unix-socket identity use it.
- the verified client certificate (PEM), or None: the one the TLS handshake verified against the
  configured client CA. Read only when authentication needs it (a call with a bearer credential
  never does), through `load_client_certificate`.
- `jwt_only`: the bearer credential is accepted only as a JWT (the OAuth door's `subject_token`:
  an API key presented there is refused like any credential that does not verify).
"""

from __future__ import annotations

from collections.abc import Callable


class Credentials:
    """One call's credentials (see the module docstring). Never shows the bearer value."""

    __slots__ = ("_certificate", "_load_certificate", "authorization", "jwt_only", "peer")

    def __init__(
        self,
        *,
        authorization: tuple[str | bytes, ...] = (),
        peer: str = "",
        client_certificate: bytes | None = None,
        load_client_certificate: Callable[[], bytes | None] | None = None,
        jwt_only: bool = False,
    ) -> None:
        self.authorization = authorization
        self.jwt_only = jwt_only
        self.peer = peer
        self._certificate = client_certificate
        self._load_certificate = load_client_certificate

    def client_certificate(self) -> bytes | None:
        """The verified client certificate (PEM), or None (no TLS, or no certificate)."""
        if self._load_certificate is not None:
            load, self._load_certificate = self._load_certificate, None
            self._certificate = load()
        return self._certificate

    def __repr__(self) -> str:
        shown = f"<{len(self.authorization)} redacted>" if self.authorization else "none"
        return f"Credentials(peer={self.peer!r}, authorization={shown})"

    __str__ = __repr__
