"""/metrics: the gRPC server metrics and the broker's own, scraped over HTTP from a real broker.

A known sequence of calls (allowed, refused by policy, unauthenticated, invalid, failing
upstream through the emulator's fault knobs) and then exact counter values and labels.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from broker.config import KubernetesSettings, MetricsSettings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import ALLOWED, Reason
from broker.server import SERVICE_NAME, BrokerServer
from tests.support.stack import (
    CALLER,
    CALLER_KEY,
    CORE_POLICY,
    LOCAL_CALLER,
    NAMESPACE,
    BearerCredential,
    RunningBroker,
    broker_settings,
    call_error,
    create_request,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CREATE = {"grpc_type": "unary", "grpc_service": SERVICE_NAME, "grpc_method": "CreateToken"}


async def scrape(server: BrokerServer, accept: str | None = None) -> tuple[str, str]:
    """(content type, body) of GET /metrics."""
    headers = {"Accept": accept} if accept else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.admin_url}/metrics", headers=headers) as response,
    ):
        assert response.status == 200
        return response.headers["Content-Type"], await response.text()


async def scrape_settled(server: BrokerServer) -> tuple[str, str]:
    """`scrape` once every call started has been counted as handled. A call refused with
    context.abort() has its status sent from inside the handler, and the interceptor counts
    it just after: its caller can scrape first. (Bounded: a call never counted fails here.)"""
    for _ in range(1000):
        content_type, text = await scrape(server)
        samples, _ = parse(text)
        started = sum(series(samples, "grpc_server_started_total").values())
        if started == sum(series(samples, "grpc_server_handled_total").values()):
            return content_type, text
        await asyncio.sleep(0.01)
    raise AssertionError(f"calls started but never counted as handled:\n{text}")


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type; the text must parse."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


@pytest.fixture
def server(broker: RunningBroker) -> BrokerServer:
    return broker.server


@pytest.mark.retry(max_attempts=4)
async def test_exact_counts_after_a_known_sequence_of_calls(
    server: BrokerServer, stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    tokens = []
    # 3 allowed: one asks 2 h, one the default, one after a dropped connection (1 retry).
    tokens.append(await stub.CreateToken(create_request(expiration_seconds=7200), timeout=10))
    tokens.append(await stub.CreateToken(create_request(), timeout=10))
    emulator.faults.drop_next(1)
    tokens.append(await stub.CreateToken(create_request(), timeout=10))
    # 1 refused by policy.
    denied = await call_error(stub, create_request(audiences=["https://nope.example"]))
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    assert denied.error_info is not None and denied.error_info.reason == Reason.AUDIENCE_NOT_ALLOWED
    # 2 unauthenticated: no credentials, and an unknown API key.
    async with aio.insecure_channel(server.address) as bare:
        missing = await call_error(pb_grpc.TokenBrokerServiceStub(bare), create_request())
    async with aio.insecure_channel(
        server.address, interceptors=[BearerCredential("tbk_not-a-known-key")]
    ) as wrong:
        invalid_key = await call_error(pb_grpc.TokenBrokerServiceStub(wrong), create_request())
    assert missing.code == invalid_key.code == grpc.StatusCode.UNAUTHENTICATED
    # 1 invalid.
    invalid = await call_error(stub, create_request(expiration_seconds=60))
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    # 1 upstream failure: 503 on all 4 attempts (3 retries).
    emulator.faults.fail_next(4, 503)
    unavailable = await call_error(stub, create_request())
    assert unavailable.code == grpc.StatusCode.UNAVAILABLE

    content_type, text = await scrape_settled(server)
    assert content_type.startswith("text/plain; version=0.0.4")
    samples, types = parse(text)

    # gRPC server metrics: every call counted under its real code, never UNKNOWN.
    assert value(samples, "grpc_server_started_total", **CREATE) == 8
    assert value(samples, "grpc_server_msg_received_total", **CREATE) == 8
    assert value(samples, "grpc_server_msg_sent_total", **CREATE) == 3
    handled = {
        dict(labels)["grpc_code"]: v
        for labels, v in series(samples, "grpc_server_handled_total").items()
        if dict(labels)["grpc_method"] == "CreateToken" and v
    }
    assert handled == {
        "OK": 3,
        "PERMISSION_DENIED": 1,
        "UNAUTHENTICATED": 2,
        "INVALID_ARGUMENT": 1,
        "UNAVAILABLE": 1,
    }
    # Every code's series exists (at zero) from the start, as go-grpc-prometheus does.
    assert value(samples, "grpc_server_handled_total", **CREATE, grpc_code="UNKNOWN") == 0
    assert (
        "grpc_server_handled_total",
        frozenset({**CREATE, "grpc_code": "UNKNOWN"}.items()),
    ) in samples
    assert value(samples, "grpc_server_handling_seconds_count", **CREATE) == 8
    assert value(samples, "grpc_server_handling_seconds_bucket", **CREATE, le="+Inf") == 8
    assert types["grpc_server_handling_seconds"] == "histogram"
    assert types["grpc_server_handled"] == "counter"

    # Domain metrics.
    assert series(samples, "token_broker_tokens_issued_total") == {
        frozenset({("namespace", NAMESPACE)}): 3
    }
    # Requested: the 5 calls that passed authentication and validation (absent = 3600 s).
    assert value(samples, "token_broker_token_requested_lifetime_seconds_count") == 5
    assert value(samples, "token_broker_token_requested_lifetime_seconds_sum") == 7200 + 4 * 3600
    assert value(samples, "token_broker_token_requested_lifetime_seconds_bucket", le="3600.0") == 4
    # Granted: the 3 tokens handed out, as the API server granted them.
    assert value(samples, "token_broker_token_granted_lifetime_seconds_count") == 3
    assert value(samples, "token_broker_token_granted_lifetime_seconds_sum") == 7200 + 2 * 3600
    assert series(samples, "token_broker_upstream_requests_total") == {
        frozenset({("code", "201")}): 3,
        frozenset({("code", "503")}): 4,
        frozenset({("code", "error")}): 1,
    }
    assert value(samples, "token_broker_upstream_request_duration_seconds_count") == 8
    assert value(samples, "token_broker_upstream_retries_total") == 4
    assert series(samples, "token_broker_policy_decisions_total") == {
        frozenset({("result", "allowed"), ("reason", ALLOWED)}): 4,
        frozenset({("result", "denied"), ("reason", Reason.AUDIENCE_NOT_ALLOWED)}): 1,
    }
    assert series(samples, "token_broker_authentication_failures_total") == {
        frozenset({("method", "none"), ("reason", Reason.CREDENTIALS_MISSING)}): 1,
        frozenset({("method", "apiKey"), ("reason", Reason.CREDENTIALS_INVALID)}): 1,
    }
    assert value(samples, "token_broker_in_flight_requests") == 0
    policy_file = {"source": "policy", "file": str(CORE_POLICY)}
    assert value(samples, "token_broker_file_reloads_total", **policy_file) == 0
    assert value(samples, "token_broker_file_reload_failures_total", **policy_file) == 0
    assert value(samples, "token_broker_file_last_reload_successful", **policy_file) == 1
    assert value(samples, "token_broker_audit_lines_lost_total") == 0
    assert value(samples, "token_broker_ready") == 1
    for name in ("hits", "misses", "evictions"):
        assert ("token_broker_cache_" + name + "_total", frozenset()) in samples
    assert value(samples, "token_broker_cache_entries") == 0
    # Defined now, fed by the rate limiter later: no series until then.
    assert types["token_broker_rate_limit_refusals"] == "counter"
    assert types["token_broker_rate_limit_wait_seconds"] == "histogram"
    [build] = series(samples, "token_broker_build_info").items()
    assert build[1] == 1
    assert {k for k, _ in build[0]} == {"version", "python_version", "grpc_version"}
    assert dict(build[0])["grpc_version"] == grpc.__version__
    # No _created series.
    assert not any(name.endswith("_created") for name, _ in samples)

    # No token, no credential anywhere in the exposition.
    for response in tokens:
        assert response.token_request.status.token not in text
    assert CALLER_KEY not in text and "tbk_" not in text and "eyJ" not in text


async def test_aborts_are_counted_under_their_code(
    server: BrokerServer, stub: pb_grpc.TokenBrokerServiceStub
) -> None:
    """context.abort() raises: the interceptor reads the code from the context."""
    async with aio.insecure_channel(server.address) as bare:
        await call_error(pb_grpc.TokenBrokerServiceStub(bare), create_request())
    await call_error(stub, create_request(audiences=["https://nope.example"]))
    await call_error(stub, create_request(audiences=["https://nope.example"]))
    samples, _ = parse((await scrape_settled(server))[1])
    assert value(samples, "grpc_server_handled_total", **CREATE, grpc_code="UNAUTHENTICATED") == 1
    assert value(samples, "grpc_server_handled_total", **CREATE, grpc_code="PERMISSION_DENIED") == 2
    assert value(samples, "grpc_server_handled_total", **CREATE, grpc_code="UNKNOWN") == 0
    assert value(samples, "grpc_server_msg_sent_total", **CREATE) == 0


async def test_health_and_reflection_services_are_measured(server: BrokerServer) -> None:
    health = {"grpc_service": "grpc.health.v1.Health"}
    async with aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        with pytest.raises(aio.AioRpcError) as info:  # the health servicer aborts NOT_FOUND
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Watch: a server stream the servicer writes to with context.write().
        watch = stub.Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        # Reflection: a bidirectional stream.
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await reflection.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await reflection.read()
        assert SERVICE_NAME in {s.name for s in answer.list_services_response.service}
        await reflection.done_writing()
        assert await reflection.read() == aio.EOF

    check = {**health, "grpc_type": "unary", "grpc_method": "Check"}
    watch_labels = {**health, "grpc_type": "server_stream", "grpc_method": "Watch"}
    refl = {
        "grpc_type": "bidi_stream",
        "grpc_service": "grpc.reflection.v1alpha.ServerReflection",
        "grpc_method": "ServerReflectionInfo",
    }
    samples: Samples = {}
    for _ in range(200):  # the server ends a cancelled stream asynchronously
        samples, _ = parse((await scrape(server))[1])
        if value(samples, "grpc_server_handled_total", **watch_labels, grpc_code="CANCELLED"):
            break
        await asyncio.sleep(0.02)
    assert value(samples, "grpc_server_started_total", **check) == 2
    assert value(samples, "grpc_server_handled_total", **check, grpc_code="OK") == 1
    assert value(samples, "grpc_server_handled_total", **check, grpc_code="NOT_FOUND") == 1
    assert value(samples, "grpc_server_msg_sent_total", **check) == 1
    assert value(samples, "grpc_server_started_total", **watch_labels) == 1
    assert value(samples, "grpc_server_msg_received_total", **watch_labels) == 1
    assert value(samples, "grpc_server_msg_sent_total", **watch_labels) == 1
    assert value(samples, "grpc_server_handled_total", **watch_labels, grpc_code="CANCELLED") == 1
    assert value(samples, "grpc_server_started_total", **refl) == 1
    assert value(samples, "grpc_server_msg_received_total", **refl) == 1
    assert value(samples, "grpc_server_msg_sent_total", **refl) == 1
    assert value(samples, "grpc_server_handled_total", **refl, grpc_code="OK") == 1


async def test_openmetrics_when_asked(server: BrokerServer) -> None:
    content_type, text = await scrape(server, accept="application/openmetrics-text")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "grpc_server_started_total" in text


async def test_each_broker_has_its_own_registry(
    server: BrokerServer, kubernetes_settings: KubernetesSettings, emulator: Emulator
) -> None:
    other = BrokerServer(broker_settings(kubernetes_settings))
    await other.start()
    try:
        async with aio.insecure_channel(
            server.address, interceptors=[BearerCredential(CALLER_KEY)]
        ) as channel:
            await pb_grpc.TokenBrokerServiceStub(channel).CreateToken(create_request(), timeout=10)
        mine, _ = parse((await scrape(server))[1])
        theirs, _ = parse((await scrape(other))[1])
        assert value(mine, "grpc_server_started_total", **CREATE) == 1
        assert value(theirs, "grpc_server_started_total", **CREATE) == 0
    finally:
        await other.stop(None)


async def test_rate_limit_metrics_are_fed_through_the_api(server: BrokerServer) -> None:
    server.metrics.rate_limit_refused("caller")
    server.metrics.rate_limit_waited("global", 0.2)
    samples, _ = parse((await scrape(server))[1])
    assert value(samples, "token_broker_rate_limit_refusals_total", scope="caller") == 1
    assert value(samples, "token_broker_rate_limit_wait_seconds_count", scope="global") == 1


async def test_rate_limiter_state_is_exported(
    kubernetes_settings: KubernetesSettings, emulator: Emulator
) -> None:
    limits = {"perCaller": {"rate": 1, "burst": 5}, "perServiceAccount": None, "global": None}
    settings = broker_settings(kubernetes_settings, rate_limit=limits)
    async with (
        BrokerServer(settings) as server,
        aio.insecure_channel(server.address, interceptors=[BearerCredential(CALLER_KEY)]) as ch,
    ):
        await pb_grpc.TokenBrokerServiceStub(ch).CreateToken(create_request(), timeout=10)
        samples, _ = parse((await scrape(server))[1])
    assert value(samples, "token_broker_rate_limit_buckets") == 1  # the caller's bucket
    assert value(samples, "token_broker_rate_limit_redis_failures_total") == 0
    assert ("token_broker_rate_limit_redis_up", frozenset()) not in samples  # memory backend


async def test_cache_metrics_follow_real_calls(
    kubernetes_settings: KubernetesSettings, emulator: Emulator
) -> None:
    settings = broker_settings(kubernetes_settings, cache={"enabled": True})
    async with (
        BrokerServer(settings) as server,
        aio.insecure_channel(server.address, interceptors=[BearerCredential(CALLER_KEY)]) as ch,
    ):
        stub = pb_grpc.TokenBrokerServiceStub(ch)
        for _ in range(3):
            await stub.CreateToken(create_request(), timeout=10)
        await stub.CreateToken(create_request(dry_run=["All"]), timeout=10)  # never cached
        samples, _ = parse((await scrape(server))[1])
    assert emulator.token_request_count == 2
    assert value(samples, "token_broker_cache_hits_total") == 2
    assert value(samples, "token_broker_cache_misses_total") == 1
    assert value(samples, "token_broker_cache_entries") == 1
    assert value(samples, "token_broker_cache_evictions_total") == 0
    assert value(samples, "token_broker_cache_upstream_calls_saved_total") == 2


async def test_policy_reloads_are_read_from_the_store(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(CORE_POLICY.read_text())
    server = BrokerServer(broker_settings(kubernetes_settings, policy=policy))
    await server.start()
    try:
        store: Any = server.policy
        policy.write_text("rules: [")  # does not parse: refused
        await store.check()
        labels = {"source": "policy", "file": str(policy)}
        samples, _ = parse((await scrape(server))[1])
        # Refused: the last good policy is in force, and the gauge says so until it is fixed.
        assert value(samples, "token_broker_file_reloads_total", **labels) == 0
        assert value(samples, "token_broker_file_reload_failures_total", **labels) == 1
        assert value(samples, "token_broker_file_last_reload_successful", **labels) == 0
        policy.write_text("rules: []\n")
        await store.check()
        samples, _ = parse((await scrape(server))[1])
        # The policy's counts are among the followed files' (no TLS here: no certificate
        # expiry), and nowhere else.
        assert series(samples, "token_broker_file_reloads_total") == {frozenset(labels.items()): 1}
        assert value(samples, "token_broker_file_reload_failures_total", **labels) == 1
        assert value(samples, "token_broker_file_last_reload_successful", **labels) == 1
        assert not any(name.startswith("token_broker_policy_reload") for name, _ in samples)
        assert not series(samples, "token_broker_tls_certificate_expiry_timestamp_seconds")
    finally:
        await server.stop(None)


async def test_caller_labels_only_when_opted_in_and_bounded(
    kubernetes_settings: KubernetesSettings, tmp_path: Path, emulator: Emulator
) -> None:
    settings = broker_settings(kubernetes_settings, unix_socket=tmp_path / "b.sock")
    settings = settings.model_copy(
        update={"metrics": MetricsSettings(caller_labels=True, caller_label_limit=1)}
    )
    server = BrokerServer(settings)
    await server.start()
    try:
        async with aio.insecure_channel(
            server.address, interceptors=[BearerCredential(CALLER_KEY)]
        ) as channel:
            await pb_grpc.TokenBrokerServiceStub(channel).CreateToken(create_request(), timeout=10)
        async with aio.insecure_channel(f"unix:{tmp_path / 'b.sock'}") as channel:
            await pb_grpc.TokenBrokerServiceStub(channel).CreateToken(create_request(), timeout=10)
        samples, _ = parse((await scrape(server))[1])
        assert series(samples, "token_broker_tokens_issued_total") == {
            frozenset({("namespace", NAMESPACE), ("caller", CALLER)}): 1,
            # Past callerLabelLimit: one shared value.
            frozenset({("namespace", NAMESPACE), ("caller", "other")}): 1,
        }
        assert LOCAL_CALLER not in (await scrape(server))[1]
    finally:
        await server.stop(None)


async def test_no_caller_label_by_default(
    server: BrokerServer, stub: pb_grpc.TokenBrokerServiceStub
) -> None:
    await stub.CreateToken(create_request(), timeout=10)
    text = (await scrape(server))[1]
    assert CALLER not in text
