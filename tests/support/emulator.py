"""The emulator tests' own world (tests/emulator/), the emulator called over HTTPS.

The seed and its names, Status-body helpers and JWT verification against the served JWKS.
The fixtures `make_emu`, `emu`, `client` (the broker's credential) and `admin` are in
tests/emulator/conftest.py.

Not to be confused with tests/support/stack.py, whose own seed and names (and the `emulator`
fixture of tests/conftest.py) drive the broker end to end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import jwt

from broker.emulator import Emulator, EmulatorConfig
from broker.emulator.client import EmulatorClient, Reply

ISSUER = "https://kubernetes.default.svc.cluster.local"
NS = "default"
OTHER_NS = "other"
MISSING_NS = "ghost"  # granted, but does not exist
SA = "build-robot"
OTHER_SA = "deployer"
POD = "web-0"  # runs as SA on NODE
OTHER_POD = "db-0"  # runs as OTHER_SA, no node
NODELESS_POD = "lonely-0"  # runs as SA on a node that does not exist
SECRET = "s1"
NODE = "node-1"
BROKER = "system:serviceaccount:token-broker:token-broker"
BROKER_TOKEN = "broker-test-token"
ALICE_TOKEN = "alice-test-token"
ADMIN_TOKEN = "admin-test-token"

SEED: dict[str, Any] = {
    "namespaces": [
        {
            "name": NS,
            "serviceAccounts": [{"name": SA}, {"name": OTHER_SA}],
            "pods": [
                {"name": POD, "serviceAccountName": SA, "nodeName": NODE},
                {"name": OTHER_POD, "serviceAccountName": OTHER_SA},
                {"name": NODELESS_POD, "serviceAccountName": SA, "nodeName": "gone-node"},
            ],
            "secrets": [{"name": SECRET}],
        },
        {"name": OTHER_NS, "serviceAccounts": [{"name": SA}]},
    ],
    "nodes": [{"name": NODE}],
    "users": [
        {"token": BROKER_TOKEN, "name": BROKER},
        {"token": ALICE_TOKEN, "name": "alice"},
        {"token": ADMIN_TOKEN, "name": "admin", "admin": True},
    ],
    "rbac": [{"user": BROKER, "namespaces": [NS, OTHER_NS, MISSING_NS]}],
}

MakeEmulator = Callable[..., Awaitable[Emulator]]


async def started(**overrides: Any) -> Emulator:
    emu = Emulator(EmulatorConfig(**overrides), seed=SEED)
    await emu.start()
    return emu


def status_body(code: int, reason: str | None, message: str, details: Any = None) -> dict[str, Any]:
    """A Status object in the apiserver's member order."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
    }
    if reason is not None:
        body["reason"] = reason
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def assert_status(
    reply: Reply, code: int, reason: str | None, message: str, details: Any = None
) -> None:
    assert reply.status == code, reply.text
    assert reply.headers["Content-Type"] == "application/json"
    expected = status_body(code, reason, message, details)
    assert reply.json() == expected
    assert list(reply.json()) == list(expected)  # member order, as Go writes it


def assert_not_found(reply: Reply, kind: str, name: str) -> None:
    """The apiserver's 404 for a missing object: `<kind> "<name>" not found`."""
    message = f'{kind} "{name}" not found'
    assert_status(reply, 404, "NotFound", message, {"name": name, "kind": kind})


def invalid_details(field: str, message: str, name: str = "") -> dict[str, Any]:
    details: dict[str, Any] = {"group": "authentication.k8s.io", "kind": "TokenRequest"}
    if name:
        details = {"name": name, **details}
    details["causes"] = [{"reason": "FieldValueInvalid", "message": message, "field": field}]
    return details


async def verify(
    client: EmulatorClient, token: str, audience: str | list[str] = ISSUER
) -> dict[str, Any]:
    """Verify a token against the keys the emulator serves; the claims."""
    jwks = (await client.request("GET", "/openid/v1/jwks", token=None)).json()
    header = jwt.get_unverified_header(token)
    key = next(k for k in jwt.PyJWKSet.from_dict(jwks).keys if k.key_id == header["kid"])
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=[header["alg"]], audience=audience, issuer=ISSUER
    )
    return claims


def token_path(namespace: str = NS, name: str = SA) -> str:
    return f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
