"""Fixtures and hooks of the whole suite.

The fixtures start the real path, end to end: grpc.aio client stub -> the broker's
BrokerServer -> kubernetes.aio -> the API-server emulator over HTTPS. Nothing on the path is
stubbed; failures are injected with the emulator's own fault knobs. The names, callers and
settings they use are in tests/support/stack.py.

Per-test knobs:
- `@pytest.mark.emulator_config(max_expiration_seconds=3600, node_binding=True, ...)`
- `@pytest.mark.retry(max_attempts=2, max_retry_after_seconds=0.5, ...)`

The hooks mark each test with its kind, its folder (`unit`, `e2e`, `emulator`, `client`,
`packaging`: `pytest -m unit`), and run the tests that check what other tests left behind
after them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from broker.config import KubernetesSettings, RetrySettings
from broker.emulator import Emulator, EmulatorConfig
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.logs import stop_log_writer
from broker.server import BrokerServer
from broker.upstream import UpstreamClient
from tests.support import suite_secrets
from tests.support.stack import (
    BROKER_TOKEN,
    CALLER_KEY,
    SEED,
    TEST_RETRY,
    BearerCredential,
    RunningBroker,
    broker_settings,
)

TESTS = Path(__file__).parent
# The folders of the suite, each the marker of its tests (registered in pyproject.toml).
KINDS = ("unit", "e2e", "emulator", "client", "packaging")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = item.path.relative_to(TESTS).parts[0]
        if kind in KINDS:
            item.add_marker(kind)
    run_checks_last(items)


def run_checks_last(items: list[pytest.Item]) -> None:
    """Tests that check what the tests before them left behind run after them, whatever the
    order of the files: `last_in_session` (the suite-wide secrets scan) after every other test,
    `last_in_module` after the other tests of its module."""
    modules: dict[Path, int] = {}
    for item in items:
        modules.setdefault(item.path, len(modules))

    def place(item: pytest.Item) -> tuple[bool, int, bool]:
        return (
            item.get_closest_marker("last_in_session") is not None,
            modules[item.path],
            item.get_closest_marker("last_in_module") is not None,
        )

    items.sort(key=place)  # stable: the order within each group stays


# The suite-wide secrets scan (tests/support/suite_secrets.py): collected all session, checked
# by tests/test_secrets_suite.py, the last test of the session.
@pytest.fixture(scope="session", autouse=True)
def _watch_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield from suite_secrets.watch(tmp_path_factory)


@pytest.fixture(autouse=True)
def _admin_on_a_free_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Brokers built in tests put their admin listener on a free port, not the default port."""
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
