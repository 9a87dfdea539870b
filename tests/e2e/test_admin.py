"""The admin listener (/healthz, /readyz) and readiness: /readyz and the gRPC health statuses
follow the Kubernetes API server going down and coming back (the emulator stopped and
restarted on its port, or answering 503), with an injected clock and the prober's check()
called directly instead of waiting for its interval."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.config import (
    AdminSettings,
    ConfigError,
    KubernetesSettings,
    ReadinessSettings,
    Settings,
    load_settings,
)
from broker.devmode import banner
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.readiness import Readiness
from broker.server import SERVICE_NAME, BrokerServer
from tests.support.stack import (
    CALLER_KEY,
    BearerCredential,
    broker_settings,
    call_error,
    create_request,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNREACHABLE_AFTER = 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings_for(kube: KubernetesSettings, **server: object) -> Settings:
    # A long probe interval: the tests call check() themselves.
    return broker_settings(kube, **server).model_copy(
        update={
            "readiness": ReadinessSettings(
                probe_interval_seconds=3600, unreachable_after_seconds=UNREACHABLE_AFTER
            )
        }
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def server(
    kubernetes_settings: KubernetesSettings, clock: FakeClock
) -> AsyncIterator[BrokerServer]:
    srv = BrokerServer(settings_for(kubernetes_settings, health_listen="127.0.0.1:0"), clock=clock)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(None)


async def get(server: BrokerServer, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.admin_url}{path}") as response,
    ):
        return response.status, await response.text()


async def health(address: str, service: str = "") -> int:
    async with aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(response.status)


async def all_health(server: BrokerServer) -> set[int]:
    """The statuses of "" and the service, on the main port and the health port."""
    assert server.health_address is not None
    return {
        await health(address, service)
        for address in (server.address, server.health_address)
        for service in ("", SERVICE_NAME)
    }


async def test_healthz_readyz_and_unknown_paths(server: BrokerServer) -> None:
    assert server.admin_address is not None
    assert server.admin_address.startswith("127.0.0.1:")
    assert await get(server, "/healthz") == (200, "ok\n")
    assert await get(server, "/readyz") == (200, "ok\n")
    status, _ = await get(server, "/tokens")
    assert status == 404


async def test_readiness_follows_the_api_server_going_down_and_up(
    server: BrokerServer, emulator: Emulator, clock: FakeClock
) -> None:
    assert await all_health(server) == {SERVING}
    await emulator.stop()
    # Unreachable, but not for long yet: still ready.
    state = await server.prober.check()
    assert state.ready
    assert (await get(server, "/readyz"))[0] == 200
    clock.now += UNREACHABLE_AFTER + 1
    state = await server.prober.check()
    assert not state.ready
    status, text = await get(server, "/readyz")
    assert status == 503
    assert text.startswith("not ready: the Kubernetes API server has been unreachable for 31s")
    assert await all_health(server) == {NOT_SERVING}
    # /healthz: the process is alive, whatever the API server does.
    assert await get(server, "/healthz") == (200, "ok\n")

    await emulator.start()  # the same port, CA and state
    state = await server.prober.check()
    assert state.ready
    assert await get(server, "/readyz") == (200, "ok\n")
    assert await all_health(server) == {SERVING}


async def test_a_health_watch_sees_the_flips(
    server: BrokerServer, emulator: Emulator, clock: FakeClock
) -> None:
    async with aio.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert (await watch.read()).status == SERVING
        await emulator.stop()
        await server.prober.check()
        clock.now += UNREACHABLE_AFTER + 1
        await server.prober.check()
        assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
        await emulator.start()
        await server.prober.check()
        assert (await asyncio.wait_for(watch.read(), 10)).status == SERVING
        watch.cancel()


async def test_5xx_answers_count_as_unreachable_and_calls_feed_readiness(
    server: BrokerServer, emulator: Emulator, clock: FakeClock
) -> None:
    """No probe here: CreateToken's own upstream outcomes move readiness."""
    async with aio.insecure_channel(
        server.address, interceptors=[BearerCredential(CALLER_KEY)]
    ) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        emulator.faults.set_error_rate(503, 1.0)
        await call_error(stub, create_request())
        assert server.readiness.state().ready  # not for long yet
        clock.now += UNREACHABLE_AFTER + 1
        status = await call_error(stub, create_request())
        assert status.code == grpc.StatusCode.UNAVAILABLE
        assert not server.readiness.state().ready
        assert (await get(server, "/readyz"))[0] == 503
        for _ in range(100):  # the health flip is scheduled by the failing call
            if await health(server.address, SERVICE_NAME) == NOT_SERVING:
                break
            await asyncio.sleep(0.01)
        assert await all_health(server) == {NOT_SERVING}

        # The first success makes it ready again (no probe needed).
        emulator.faults.reset()
        await stub.CreateToken(create_request(), timeout=10)
        assert server.readiness.state().ready
        for _ in range(100):
            if await health(server.address, SERVICE_NAME) == SERVING:
                break
            await asyncio.sleep(0.01)
        assert await all_health(server) == {SERVING}
        assert (await get(server, "/readyz"))[0] == 200


async def test_4xx_answers_mean_reachable(server: BrokerServer, emulator: Emulator) -> None:
    async with aio.insecure_channel(
        server.address, interceptors=[BearerCredential(CALLER_KEY)]
    ) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        emulator.faults.fail_next(1, 403)
        await call_error(stub, create_request())
    assert server.readiness.state().ready
    assert server.readiness.last_success is not None


async def test_not_ready_until_the_api_server_first_answers(
    kubernetes_settings: KubernetesSettings, emulator: Emulator, clock: FakeClock
) -> None:
    await emulator.stop()
    server = BrokerServer(settings_for(kubernetes_settings), clock=clock)
    await server.start()  # starts anyway: the API server may come later
    try:
        status, text = await get(server, "/readyz")
        assert status == 503
        assert "has not answered yet" in text
        assert await health(server.address) == NOT_SERVING
        assert await health(server.address, SERVICE_NAME) == NOT_SERVING
        await emulator.start()
        await server.prober.check()
        assert (await get(server, "/readyz"))[0] == 200
        assert await health(server.address, SERVICE_NAME) == SERVING
    finally:
        await server.stop(None)


async def test_not_ready_once_shutting_down(server: BrokerServer) -> None:
    # What stop() does first; /readyz and health say so while calls drain.
    server.readiness.shutting_down()
    status, text = await get(server, "/readyz")
    assert (status, text) == (503, "not ready: shutting down\n")


def test_readiness_rules_with_a_clock() -> None:
    clock = FakeClock()
    readiness = Readiness(unreachable_after_seconds=10, clock=clock)
    assert readiness.state().reason == "the policy is not loaded"
    readiness.policy_loaded()
    assert not readiness.state().ready
    readiness.record(True)
    assert readiness.state().ready
    readiness.record(False)
    clock.now += 10
    assert readiness.state().ready  # exactly the limit: still ready
    readiness.record(False)  # a later failure does not restart the count
    clock.now += 0.5
    assert not readiness.state().ready
    readiness.record(True)
    assert readiness.state().ready


async def test_the_prober_runs_on_its_interval(
    kubernetes_settings: KubernetesSettings, emulator: Emulator
) -> None:
    settings = broker_settings(kubernetes_settings).model_copy(
        update={
            "readiness": ReadinessSettings(
                probe_interval_seconds=0.05, unreachable_after_seconds=0.01
            )
        }
    )
    server = BrokerServer(settings)
    await server.start()
    try:
        await emulator.stop()
        for _ in range(200):
            if (await get(server, "/readyz"))[0] == 503:
                break
            await asyncio.sleep(0.02)
        assert (await get(server, "/readyz"))[0] == 503
        await emulator.start()
        for _ in range(200):
            if (await get(server, "/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.02)
        assert (await get(server, "/readyz"))[0] == 200
    finally:
        await server.stop(None)


async def test_admin_listener_disabled_with_null(
    kubernetes_settings: KubernetesSettings,
) -> None:
    settings = broker_settings(kubernetes_settings).model_copy(
        update={"admin": AdminSettings(listen=None)}
    )
    server = BrokerServer(settings)
    await server.start()
    try:
        assert server.admin_address is None and server.admin_url is None
    finally:
        await server.stop(None)


async def test_busy_admin_port_fails_the_start(kubernetes_settings: KubernetesSettings) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = broker_settings(kubernetes_settings).model_copy(
            update={"admin": AdminSettings(listen=f"127.0.0.1:{port}")}
        )
        server = BrokerServer(settings)
        with pytest.raises(ConfigError, match=r"admin\.listen: cannot listen on 127\.0\.0\.1:"):
            await server.start()


async def test_admin_listener_stops_with_the_server(
    kubernetes_settings: KubernetesSettings,
) -> None:
    server = BrokerServer(broker_settings(kubernetes_settings))
    await server.start()
    url = server.admin_url
    await server.stop(None)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{url}/healthz")


async def test_the_health_port_never_serves_tokens(server: BrokerServer) -> None:
    """Each gRPC server has its own interceptor: a method wrapped for the main port is not
    served on the health port."""
    assert server.health_address is not None
    for address, code in (
        (server.address, None),
        (server.health_address, grpc.StatusCode.UNIMPLEMENTED),
    ):
        async with aio.insecure_channel(
            address, interceptors=[BearerCredential(CALLER_KEY)]
        ) as channel:
            stub = pb_grpc.TokenBrokerServiceStub(channel)
            if code is None:
                await stub.CreateToken(create_request(), timeout=10)
            else:
                with pytest.raises(aio.AioRpcError) as info:
                    await stub.CreateToken(create_request(), timeout=10)
                assert info.value.code() == code


async def test_dev_banner_prints_the_admin_url(
    server: BrokerServer, emulator: Emulator, tmp_path: Path
) -> None:
    text = banner(server, emulator, tmp_path)
    assert f"admin:      {server.admin_url} (/metrics, /healthz, /readyz)" in text
    assert f"curl {server.admin_url}/metrics" in text


def test_admin_and_readiness_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKEN_BROKER_ADMIN__LISTEN")
    defaults = load_settings()
    assert defaults.admin.listen == "127.0.0.1:8082"
    assert defaults.metrics.caller_labels is False
    assert defaults.readiness.probe_interval_seconds == 10
    assert defaults.readiness.unreachable_after_seconds == 30
    monkeypatch.setenv("TOKEN_BROKER_ADMIN__LISTEN", "")  # the environment's "null"
    assert load_settings().admin.listen is None
    monkeypatch.setenv("TOKEN_BROKER_ADMIN__LISTEN", "0.0.0.0:9090")
    monkeypatch.setenv("TOKEN_BROKER_READINESS__PROBE_INTERVAL_SECONDS", "2.5")
    settings = load_settings()
    assert settings.admin.listen == "0.0.0.0:9090"
    assert settings.readiness.probe_interval_seconds == 2.5
    with pytest.raises(ConfigError, match=r"admin\.listen.*is not host:port"):
        load_settings(None, {"admin": {"listen": "9090"}})
    with pytest.raises(ConfigError, match=r"readiness\.unreachableAfterSeconds"):
        load_settings(None, {"readiness": {"unreachableAfterSeconds": 0}})
