"""The real stack the tests drive: the names the emulator is seeded with, the broker's own
Kubernetes credential, the test callers and their policy, broker settings, and request helpers.

The fixtures that start the stack (`emulator`, `kubeconfig`, `kubernetes_settings`, `upstream`,
`broker`, `channel`, `stub`) are in tests/conftest.py and use these; so do the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from grpc import aio

from broker.authn import hash_api_key
from broker.config import KubernetesSettings, Settings, load_settings
from broker.emulator import Emulator
from broker.errors import RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.server import BrokerServer
from broker.upstream import UpstreamClient

NAMESPACE = "demo"
OTHER_NAMESPACE = "other"  # exists, but the broker's user has no RBAC grant there
SERVICE_ACCOUNT = "build-robot"
OTHER_SERVICE_ACCOUNT = "db-robot"
POD = "web-0"
OTHER_POD = "db-0"  # runs as OTHER_SERVICE_ACCOUNT
SECRET = "s1"
NODE = "node-1"
BROKER_USER = "system:serviceaccount:token-broker:token-broker"
BROKER_TOKEN = "broker-test-credential-5f2c9a"  # the broker's own bearer credential
# The broker's callers: an API key (over TCP) and the unix socket's fixed identity.
CALLER = "test-caller"
CALLER_KEY = "tbk_test-caller-key-3c1d8e0f9a"
CALLER_METADATA = (("authorization", f"Bearer {CALLER_KEY}"),)
LOCAL_CALLER = "test-local"
CORE_POLICY = Path(__file__).resolve().parents[1] / "data" / "core-policy.yaml"

SEED: dict[str, Any] = {
    "namespaces": [
        {
            "name": NAMESPACE,
            "serviceAccounts": [{"name": SERVICE_ACCOUNT}, {"name": OTHER_SERVICE_ACCOUNT}],
            "pods": [
                {"name": POD, "serviceAccountName": SERVICE_ACCOUNT, "nodeName": NODE},
                {"name": OTHER_POD, "serviceAccountName": OTHER_SERVICE_ACCOUNT},
            ],
            "secrets": [{"name": SECRET}],
        },
        {"name": OTHER_NAMESPACE, "serviceAccounts": [{"name": SERVICE_ACCOUNT}]},
    ],
    "nodes": [{"name": NODE}],
    "users": [{"token": BROKER_TOKEN, "name": BROKER_USER}],
    "rbac": [{"user": BROKER_USER, "namespaces": [NAMESPACE]}],
}

# Fast retries for the suite; the deadline logic does not depend on the values.
TEST_RETRY = {
    "max_attempts": 4,
    "initial_backoff_seconds": 0.01,
    "max_backoff_seconds": 0.05,
    "max_retry_after_seconds": 5.0,
}


@dataclass(frozen=True)
class RunningBroker:
    address: str
    upstream: UpstreamClient
    server: BrokerServer


def broker_settings(
    kube: KubernetesSettings,
    *,
    policy: Path = CORE_POLICY,
    cache: dict[str, Any] | None = None,
    rate_limit: dict[str, Any] | None = None,
    **server: Any,
) -> Settings:
    """Settings for a broker on 127.0.0.1:<free port>, plaintext unless TLS is given.

    Callers authenticate with CALLER_KEY (identity CALLER) or, on a unix socket, as
    LOCAL_CALLER; `policy` decides (default: the permissive core-tests policy). The token
    cache and the rate limits are off unless their settings are given: most tests count what
    reaches the API server per call, and some call in bursts.
    """
    server.setdefault("listen", "127.0.0.1:0")
    if server["listen"] is not None and "tls" not in server:
        server.setdefault("allow_plaintext", True)
    return load_settings(
        None,
        {
            "server": server,
            "kubernetes": kube,
            "cache": cache if cache is not None else {"enabled": False},
            "rateLimit": rate_limit if rate_limit is not None else {"enabled": False},
            **access_config(policy),
        },
    )


def access_config(policy: Path = CORE_POLICY) -> dict[str, Any]:
    """The `authentication` and `policy` settings of the test callers (YAML-ready)."""
    return {
        "authentication": {
            "apiKeys": {"keys": [{"name": CALLER, "sha256": hash_api_key(CALLER_KEY)}]},
            "unixSocket": {"identity": LOCAL_CALLER},
        },
        "policy": {"file": str(policy)},
    }


class BearerCredential(aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds `authorization: Bearer <credential>` to every call of a channel."""

    def __init__(self, credential: str) -> None:
        self._metadata = ("authorization", f"Bearer {credential}")

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = aio.Metadata(*(details.metadata or ()), self._metadata)
        return await continuation(details._replace(metadata=metadata), request)


def create_request(
    namespace: str = NAMESPACE,
    service_account: str = SERVICE_ACCOUNT,
    *,
    audiences: list[str] | None = None,
    expiration_seconds: int | None = None,
    bound: pb.BoundObjectReference | None = None,
    metadata_name: str = "",
    dry_run: list[str] | None = None,
    field_manager: str = "",
    field_validation: str = "",
) -> pb.CreateTokenRequest:
    spec = pb.TokenRequestSpec(audiences=audiences or [])
    if expiration_seconds is not None:
        spec.expiration_seconds = expiration_seconds
    if bound is not None:
        spec.bound_object_ref.CopyFrom(bound)
    return pb.CreateTokenRequest(
        namespace=namespace,
        service_account=service_account,
        token_request=pb.TokenRequest(metadata=pb.ObjectMeta(name=metadata_name), spec=spec),
        dry_run=dry_run or [],
        field_manager=field_manager,
        field_validation=field_validation,
    )


async def call_error(
    stub: pb_grpc.TokenBrokerServiceStub, request: pb.CreateTokenRequest, timeout: float = 10.0
) -> RichStatus:
    """Call CreateToken expecting a failure; the decoded rich status."""
    try:
        await stub.CreateToken(request, timeout=timeout)
    except aio.AioRpcError as err:
        status = rich_status_from_call(err)
        assert status.code not in (grpc.StatusCode.UNKNOWN,), status
        return status
    raise AssertionError("CreateToken succeeded; expected an error")


def claims_of(emulator: Emulator, token: str) -> dict[str, Any]:
    """The token's claims, signature verified against the emulator's JWKS."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwt.PyJWKSet.from_dict(emulator.jwks()).keys if k.key_id == kid)
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["RS256"], options={"verify_aud": False}
    )
    return claims
