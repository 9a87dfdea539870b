"""Shared fixtures: the real path, end to end.

grpc.aio client stub -> the broker's BrokerServer -> kubernetes.aio -> the API-server
emulator over HTTPS. Nothing on the path is stubbed; failures are injected with the
emulator's own fault knobs.

Per-test knobs:
- `@pytest.mark.emulator_config(max_expiration_seconds=3600, node_binding=True, ...)`
- `@pytest.mark.retry(max_attempts=2, max_retry_after_seconds=0.5, ...)`
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import suite_secrets
from grpc import aio

from broker.authn import hash_api_key
from broker.config import KubernetesSettings, RetrySettings, Settings, load_settings
from broker.emulator import Emulator, EmulatorConfig
from broker.errors import RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.logs import stop_log_writer
from broker.server import BrokerServer
from broker.upstream import UpstreamClient

pytest_plugins = ["emulator_support", "cli_support"]  # shared fixtures; rewritten asserts

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
CORE_POLICY = Path(__file__).parent / "data" / "core-policy.yaml"

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "emulator_config(**fields): EmulatorConfig overrides")
    config.addinivalue_line("markers", "retry(**fields): RetrySettings overrides")


# The suite-wide secrets scan (tests/suite_secrets.py): collected all session, checked by the
# last test of the session.
SECRETS_SCAN_TEST = (
    "test_secrets_suite.py::test_no_token_or_credential_in_anything_the_broker_wrote"
)


@pytest.fixture(scope="session", autouse=True)
def _watch_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield from suite_secrets.watch(tmp_path_factory)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The suite-wide secrets scan runs after every other test."""
    last = [item for item in items if item.nodeid.endswith(SECRETS_SCAN_TEST)]
    items[:] = [item for item in items if item not in last] + last


@pytest.fixture(autouse=True)
def _admin_on_a_free_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Brokers built in tests put their admin listener on a free port, not 9090."""
    monkeypatch.setenv("TOKEN_BROKER_ADMIN__LISTEN", "127.0.0.1:0")


def _marker_kwargs(request: pytest.FixtureRequest, name: str) -> dict[str, Any]:
    marker = request.node.get_closest_marker(name)
    return dict(marker.kwargs) if marker else {}


@pytest.fixture
async def emulator(request: pytest.FixtureRequest) -> AsyncIterator[Emulator]:
    config = EmulatorConfig(host="127.0.0.1", port=0, **_marker_kwargs(request, "emulator_config"))
    emu = Emulator(config, seed=SEED)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.fixture
def kubeconfig(emulator: Emulator, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    emulator.write_kubeconfig(path, user_token=BROKER_TOKEN)
    return path


@pytest.fixture
def kubernetes_settings(request: pytest.FixtureRequest, kubeconfig: Path) -> KubernetesSettings:
    retry = RetrySettings(**{**TEST_RETRY, **_marker_kwargs(request, "retry")})
    return KubernetesSettings(
        mode="kubeconfig", kubeconfig=kubeconfig, request_timeout_seconds=10.0, retry=retry
    )


@pytest.fixture
async def upstream(kubernetes_settings: KubernetesSettings) -> AsyncIterator[UpstreamClient]:
    client = await UpstreamClient.from_settings(kubernetes_settings)
    try:
        yield client
    finally:
        await client.close()


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


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger's handlers and level back after a test that sets up logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # setup_logging also turns off logging's per-record lookups (module globals).
    lookups = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved = {name: getattr(logging, name) for name in lookups}
    yield
    stop_log_writer()
    logging.captureWarnings(False)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, value in saved.items():
        setattr(logging, name, value)


@pytest.fixture
async def broker(
    kubernetes_settings: KubernetesSettings, upstream: UpstreamClient
) -> AsyncIterator[RunningBroker]:
    """The broker's own gRPC server (BrokerServer) on loopback, plaintext."""
    server = BrokerServer(broker_settings(kubernetes_settings), upstream=upstream)
    await server.start()
    try:
        yield RunningBroker(address=server.address, upstream=upstream, server=server)
    finally:
        await server.stop(None)


@pytest.fixture
async def channel(broker: RunningBroker) -> AsyncIterator[aio.Channel]:
    """A channel to the broker whose calls carry the test caller's API key."""
    async with aio.insecure_channel(
        broker.address, interceptors=[BearerCredential(CALLER_KEY)]
    ) as ch:
        yield ch


@pytest.fixture
def stub(channel: aio.Channel) -> pb_grpc.TokenBrokerServiceStub:
    return pb_grpc.TokenBrokerServiceStub(channel)


# --- helpers used across test modules ------------------------------------------------------


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
