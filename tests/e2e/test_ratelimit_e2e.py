"""Rate limits and overload protection end to end: real brokers, the emulator, a real Redis.

- memory backend through gRPC (BrokerServer): the refusal as a client sees it, isolation of
  callers, the metric, a policy rule's override;
- the upstream cap (concurrency, bounded wait, the caller's deadline) and the 429 feedback,
  with the emulator slowed down or answering 429;
- the Redis backend shared by two `python -m broker serve` processes, Redis killed and
  restarted under them.

Waits are bounded; no assertion depends on how long something took.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from broker.config import KubernetesSettings, Settings
from broker.emulator import Emulator
from broker.errors import ERROR_DOMAIN, RETRY_PUSHBACK_TRAILER, RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import Reason
from broker.server import BrokerServer
from tests.support.cli import Process, serve_config, start_broker
from tests.support.redis_server import RedisServer
from tests.support.stack import (
    CALLER_KEY,
    CORE_POLICY,
    OTHER_SERVICE_ACCOUNT,
    SERVICE_ACCOUNT,
    BearerCredential,
    broker_settings,
    call_error,
    create_request,
)

NO_LIMITS: dict[str, Any] = {"perCaller": None, "perServiceAccount": None, "global": None}
REFUSALS = "token_broker_rate_limit_refusals_total"


# --- helpers ----------------------------------------------------------------------------------


async def outcome(
    stub: pb_grpc.TokenBrokerServiceStub,
    request: pb.CreateTokenRequest | None = None,
    timeout: float = 10.0,
) -> RichStatus | None:
    """None when CreateToken succeeded (with a token), else the decoded status."""
    try:
        response = await stub.CreateToken(request or create_request(), timeout=timeout)
    except aio.AioRpcError as err:
        status = rich_status_from_call(err)
        assert status.code != grpc.StatusCode.UNKNOWN, status
        return status
    assert response.token_request.status.token
    return None


def retry_seconds(status: RichStatus) -> float:
    assert status.retry_info is not None, f"expected RetryInfo: {status}"
    delay = status.retry_info.retry_delay
    return float(delay.seconds + delay.nanos / 1e9)


def reason(status: RichStatus | None) -> str | None:
    if status is None:
        return None
    assert status.error_info is not None, status
    assert status.error_info.domain == ERROR_DOMAIN, status
    return str(status.error_info.reason)


async def metric(server: BrokerServer, name: str, **labels: str) -> float:
    """A sample of the broker's /metrics (admin listener); 0 when the series does not exist."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.admin_url}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


StartServer = Callable[[Settings], Awaitable[BrokerServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    started: list[BrokerServer] = []

    async def start(settings: Settings) -> BrokerServer:
        server = BrokerServer(settings)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(None)


def caller_channel(target: str) -> aio.Channel:
    return aio.insecure_channel(target, interceptors=[BearerCredential(CALLER_KEY)])


# --- memory backend through gRPC ----------------------------------------------------------------


async def test_per_caller_limit_refusal_isolation_and_metric(
    kubernetes_settings: KubernetesSettings,
    emulator: Emulator,
    start_server: StartServer,
    tmp_path: Path,
) -> None:
    socket = tmp_path / "b.sock"
    server = await start_server(
        broker_settings(
            kubernetes_settings,
            rate_limit={**NO_LIMITS, "perCaller": {"rate": 1, "burst": 3}},
            unix_socket=socket,
        )
    )
    async with caller_channel(server.address) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        assert [await outcome(stub) for _ in range(3)] == [None] * 3
        status = await call_error(stub, create_request())

        assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status.error_info is not None
        assert status.error_info.reason == Reason.RATE_LIMITED
        assert dict(status.error_info.metadata) == {"scope": "caller"}
        assert 0 < retry_seconds(status) <= 1.0  # one request's share of 1/s
        assert status.quota_failure is not None
        assert [v.subject for v in status.quota_failure.violations] == ["caller"]
        assert int(status.trailers[RETRY_PUSHBACK_TRAILER]) > 0
        assert status.message.startswith("rate limit exceeded for this caller (1/s, burst 3)")
        assert "test-caller" not in status.message  # never the caller's name
        assert emulator.token_request_count == 3  # the refused call never reached it

        # Another caller (the unix socket's identity) has a bucket of its own.
        async with aio.insecure_channel(f"unix:{socket}") as local:
            local_stub = pb_grpc.TokenBrokerServiceStub(local)
            assert [await outcome(local_stub) for _ in range(3)] == [None] * 3
        assert emulator.token_request_count == 6

    assert await metric(server, REFUSALS, scope="caller") == 1
    assert await metric(server, REFUSALS, scope="global") == 0
    assert server.limiter.stats.refusals == {"caller": 1}


async def test_policy_rule_override(
    kubernetes_settings: KubernetesSettings,
    emulator: Emulator,
    start_server: StartServer,
    tmp_path: Path,
) -> None:
    policy = yaml.safe_load(CORE_POLICY.read_text())
    policy["rules"][0]["rateLimit"] = {"perCaller": {"rate": 1, "burst": 1}}
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy))
    server = await start_server(
        broker_settings(
            kubernetes_settings,
            policy=policy_file,
            rate_limit={**NO_LIMITS, "perCaller": {"rate": 1, "burst": 3}},
        )
    )
    async with caller_channel(server.address) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        assert await outcome(stub) is None
        status = await call_error(stub, create_request())
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(status) == Reason.RATE_LIMITED
    assert "(1/s, burst 1)" in status.message  # the rule's limit, not the settings' burst 3
    assert status.quota_failure is not None
    assert "burst 1" in status.quota_failure.violations[0].description
    assert emulator.token_request_count == 1


# --- protection of the API server -------------------------------------------------------------


async def test_upstream_concurrency_cap(
    kubernetes_settings: KubernetesSettings, emulator: Emulator, start_server: StartServer
) -> None:
    server = await start_server(
        broker_settings(
            kubernetes_settings,
            rate_limit={**NO_LIMITS, "upstream": {"maxConcurrent": 2, "maxWaitSeconds": 0.2}},
        )
    )
    emulator.reset_counters()  # the readiness probe is not a token request, but be sure
    emulator.faults.latency = 30.0  # holds both slots until lowered
    async with caller_channel(server.address) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        calls = [asyncio.ensure_future(outcome(stub, timeout=20)) for _ in range(8)]
        try:
            # Two calls hold the slots; the six others wait 0.2 s for one, then are refused.
            await eventually(lambda: sum(c.done() for c in calls) == 6, "six refusals")
        finally:
            emulator.faults.latency = 0.0  # releases the two
            results = await asyncio.gather(*calls)

    assert emulator.in_flight_max == 2
    succeeded = [r for r in results if r is None]
    busy = [r for r in results if r is not None]
    assert len(succeeded) == 2
    assert len(busy) == 6
    for status in busy:
        assert status.code == grpc.StatusCode.UNAVAILABLE, status
        assert reason(status) == Reason.UPSTREAM_BUSY
        assert status.error_info is not None
        assert status.error_info.metadata["maxConcurrent"] == "2"
        assert retry_seconds(status) > 0
        assert int(status.trailers[RETRY_PUSHBACK_TRAILER]) > 0
    assert emulator.token_request_count == len(succeeded)  # refusals never reached it
    assert await metric(server, REFUSALS, scope="upstream") == len(busy)
    assert await metric(
        server, "token_broker_rate_limit_wait_seconds_count", scope="upstream"
    ) == len(succeeded)


async def test_upstream_wait_ends_before_the_callers_deadline(
    kubernetes_settings: KubernetesSettings, emulator: Emulator, start_server: StartServer
) -> None:
    # maxWaitSeconds far beyond the caller's deadline: the deadline bounds the wait.
    server = await start_server(
        broker_settings(
            kubernetes_settings,
            rate_limit={**NO_LIMITS, "upstream": {"maxConcurrent": 2, "maxWaitSeconds": 30}},
        )
    )
    emulator.faults.latency = 30.0  # holds both slots until lowered
    async with caller_channel(server.address) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        holders = [asyncio.ensure_future(outcome(stub, timeout=20)) for _ in range(2)]
        try:
            await eventually(lambda: emulator.in_flight == 2, "two calls at the emulator")
            status = await call_error(stub, create_request(), timeout=1.0)
        finally:
            emulator.faults.latency = 0.0  # releases the waiting requests
            held = await asyncio.gather(*holders)
    # Refused by the broker with time to spare, not cut by the deadline.
    assert status.code == grpc.StatusCode.UNAVAILABLE, status
    assert reason(status) == Reason.UPSTREAM_BUSY
    assert retry_seconds(status) > 0
    assert held == [None, None]
    assert emulator.token_request_count == 2
    assert emulator.in_flight_max == 2


@pytest.mark.retry(max_attempts=1)
async def test_429_holds_the_service_account_back(
    kubernetes_settings: KubernetesSettings, emulator: Emulator, start_server: StartServer
) -> None:
    server = await start_server(
        broker_settings(
            kubernetes_settings,
            rate_limit={**NO_LIMITS, "upstream": {"maxRetryAfterSeconds": 10}},
        )
    )
    emulator.faults.fail_next(1, 429, retry_after=30)
    async with caller_channel(server.address) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        relayed = await call_error(stub, create_request())
        assert relayed.code == grpc.StatusCode.UNAVAILABLE
        assert relayed.error_info is not None
        assert relayed.error_info.reason == Reason.KUBERNETES_TOO_MANY_REQUESTS
        assert retry_seconds(relayed) == 30  # the API server's own Retry-After
        assert emulator.token_request_count == 1

        early = await call_error(stub, create_request())
        assert early.code == grpc.StatusCode.UNAVAILABLE
        assert reason(early) == Reason.UPSTREAM_THROTTLED
        assert early.error_info is not None
        assert dict(early.error_info.metadata) == {
            "namespace": "demo",
            "serviceAccount": SERVICE_ACCOUNT,
        }
        assert 0 < retry_seconds(early) <= 10  # the window, capped by maxRetryAfterSeconds
        assert emulator.token_request_count == 1  # refused without calling the API server

        # Another service account is not held back.
        assert await outcome(stub, create_request(service_account=OTHER_SERVICE_ACCOUNT)) is None
        assert emulator.token_request_count == 2
    assert await metric(server, REFUSALS, scope="upstream_retry_after") == 1


# --- Redis: two broker processes share the limits -------------------------------------------------

REDIS_KEY = "token-broker:rl:global"
GLOBAL_BURST = 5


def redis_broker_config(tmp_path: Path, name: str, kubeconfig: Path, redis_address: str) -> Path:
    return serve_config(
        tmp_path / f"{name}.yaml",
        kubeconfig,
        cache={"enabled": False},
        log={"format": "json", "level": "info"},
        rateLimit={
            **NO_LIMITS,
            # Effectively no refill during the test: exactly the burst is admitted.
            "global": {"rate": 0.001, "burst": GLOBAL_BURST},
            "backend": "redis",
            "redis": {
                "address": redis_address,
                "timeoutSeconds": 0.5,
                "retryIntervalSeconds": 0.3,
            },
            "onRedisUnavailable": "local",
        },
    )


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()


def log_lines(process: Process) -> list[dict[str, Any]]:
    out = []
    for line in process.stderr:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


async def test_two_brokers_share_limits_in_redis_and_survive_its_restart(
    kubeconfig: Path,
    emulator: Emulator,
    redis_server: RedisServer,
    processes: list[Process],
    tmp_path: Path,
) -> None:
    async def start(name: str) -> tuple[Process, str]:
        config = redis_broker_config(tmp_path, name, kubeconfig, redis_server.address)
        process = await start_broker("serve", "--config", str(config))
        processes.append(process)
        index = await process.wait_for("token broker serving", stream="stderr")
        return process, json.loads(process.stderr[index])["listen"]

    (first, first_addr), (second, second_addr) = await asyncio.gather(start("a"), start("b"))
    async with caller_channel(first_addr) as a, caller_channel(second_addr) as b:
        stubs = [pb_grpc.TokenBrokerServiceStub(a), pb_grpc.TokenBrokerServiceStub(b)]

        # 1. One global bucket in Redis for both: exactly the burst, whoever spends it.
        results = await asyncio.gather(*(outcome(stubs[i % 2]) for i in range(12)))
        assert results.count(None) == GLOBAL_BURST
        for status in (r for r in results if r is not None):
            assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED, status
            assert reason(status) == Reason.RATE_LIMITED
            assert status.error_info is not None
            assert dict(status.error_info.metadata) == {"scope": "global"}
            assert retry_seconds(status) > 0
        assert emulator.token_request_count == GLOBAL_BURST
        with redis_server.client() as client:
            assert client.exists(REDIS_KEY)

        # 2. Redis gone: each broker limits on its own (a fresh local bucket of 5) and warns.
        redis_server.kill()
        for stub in stubs:
            local = [await outcome(stub) for _ in range(GLOBAL_BURST + 1)]
            assert local[:GLOBAL_BURST] == [None] * GLOBAL_BURST
            assert reason(local[-1]) == Reason.RATE_LIMITED
        assert emulator.token_request_count == 3 * GLOBAL_BURST
        for process in (first, second):
            index = await process.wait_for("is unavailable", stream="stderr")
            warning = json.loads(process.stderr[index])
            assert warning["level"] == "warning"
            assert "onRedisUnavailable: local" in warning["message"]

        # 3. Redis back (same port, empty): each broker's next try after its retry interval
        # uses it again. Its local bucket is spent, so an admitted call was admitted by Redis.
        redis_server.start()
        for stub, process in zip(stubs, (first, second), strict=True):
            deadline = time.monotonic() + 10
            while (refused := await outcome(stub)) is not None:
                assert reason(refused) == Reason.RATE_LIMITED
                assert time.monotonic() < deadline, "the broker did not go back to Redis"
                await asyncio.sleep(0.05)
            await process.wait_for("available again", stream="stderr")
        with redis_server.client() as client:
            assert client.exists(REDIS_KEY)  # the key is back
        # Shared again: 2 of the fresh burst are spent; the rest goes to whoever asks first.
        results = await asyncio.gather(*(outcome(stubs[i % 2]) for i in range(8)))
        assert results.count(None) == GLOBAL_BURST - 2
        assert emulator.token_request_count == 4 * GLOBAL_BURST

    for process in (first, second):
        assert await process.terminate() == 0
        warnings = [e for e in log_lines(process) if e.get("level") == "warning"]
        assert len(warnings) == 1, warnings  # the outage is logged once, not per call


@pytest.mark.retry(max_attempts=1)
async def test_429_also_holds_back_calls_already_waiting_for_a_slot(
    kubernetes_settings: KubernetesSettings, emulator: Emulator, start_server: StartServer
) -> None:
    server = await start_server(
        broker_settings(
            kubernetes_settings,
            rate_limit={**NO_LIMITS, "upstream": {"maxConcurrent": 1, "maxWaitSeconds": 30}},
        )
    )
    emulator.faults.latency = 30.0  # holds the only slot until lowered
    emulator.faults.fail_next(1, 429, retry_after=30)
    async with caller_channel(server.address) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        first = asyncio.ensure_future(outcome(stub, timeout=20))
        await eventually(lambda: emulator.in_flight == 1, "the first call at the emulator")
        second = asyncio.ensure_future(outcome(stub, timeout=20))
        deadline = time.monotonic() + 10
        while await metric(server, "token_broker_in_flight_requests") < 2:
            assert time.monotonic() < deadline, "the second call never reached the broker"
            await asyncio.sleep(0.01)
        # Let it reach the slot queue; if it has not yet, it is refused on arrival instead
        # (the same outcome: this test cannot pass by going to the API server).
        await asyncio.sleep(0.1)
        emulator.faults.latency = 0.0  # the first call gets its 429
        relayed, held_back = await asyncio.gather(first, second)
    assert relayed is not None and relayed.code == grpc.StatusCode.UNAVAILABLE
    assert relayed.error_info is not None
    assert relayed.error_info.reason == Reason.KUBERNETES_TOO_MANY_REQUESTS
    # The call that waited for the slot during the 429 is refused without calling the API.
    assert held_back is not None, "the waiting call went to the API server inside the window"
    assert reason(held_back) == Reason.UPSTREAM_THROTTLED
    assert emulator.token_request_count == 1
