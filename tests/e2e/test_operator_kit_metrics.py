"""What operators graph and alert on, scraped from a real broker's /metrics.

- The process and interpreter collectors (process_*, python_info, python_gc_*) are in each
  broker's registry, and the Kubernetes API's last answer is a timestamp.
- Every metric the alert rules and the Grafana dashboard query (helm/token-broker/files/)
  exists in the exposition of a broker with everything on that they look at (TLS, the Redis
  rate-limit backend, the cache, a policy file), after calls that create the labelled series:
  a token issued, a policy denial, an authentication failure, a rate-limit refusal.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.server import BrokerServer
from tests.e2e.test_metrics import parse, scrape, series, value
from tests.support.cli import issue
from tests.support.operator_kit import (
    alert_rules,
    dashboard_queries,
    grafana_to_promql,
    metric_names,
)
from tests.support.redis_server import RedisServer
from tests.support.stack import (
    CALLER_KEY,
    BearerCredential,
    broker_settings,
    call_error,
    create_request,
)

# Counters of events the calls below do not cause (a token withheld, a call shed): their
# families are exposed (HELP and TYPE) without series until the first event.
EVENT_ONLY = {"token_broker_tokens_withheld_total", "token_broker_calls_shed_total"}

SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


def exposed_names(text: str) -> tuple[set[str], set[str]]:
    """(names a query may select: every family's samples' names, with or without series;
    names that have at least one sample)."""
    samples, types = parse(text)
    with_samples = {name for name, _ in samples}
    selectable = set(with_samples)
    for family, kind in types.items():
        selectable.update(family + suffix for suffix in SUFFIXES[kind])
    return selectable, with_samples


def queried_metrics() -> dict[str, set[str]]:
    """Metric name -> where the alert rules and the dashboard query it."""
    where: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            where.setdefault(name, set()).add(f"alert {rule['alert']}")
    for place, expr in dashboard_queries().items():
        for name in metric_names(grafana_to_promql(expr)):
            where.setdefault(name, set()).add(f"dashboard {place}")
    return where


@pytest.fixture
def tls_channel_credentials(tmp_path: Path) -> Iterator[tuple[dict[str, Path], bytes]]:
    pki = issue(tmp_path, "server", "localhost", "127.0.0.1")
    yield pki.server_tls(), pki.ca_file.read_bytes()


async def test_every_metric_the_alerts_and_the_dashboard_query_is_exposed(
    kubernetes_settings: KubernetesSettings,
    redis_server: RedisServer,
    tls_channel_credentials: tuple[dict[str, Path], bytes],
) -> None:
    tls, ca = tls_channel_credentials
    settings = broker_settings(
        kubernetes_settings,
        tls=tls,
        cache={"enabled": True},
        rate_limit={
            "backend": "redis",
            "redis": {"address": redis_server.address},
            "perCaller": {"rate": 0.001, "burst": 2},
            "perServiceAccount": None,
            "global": None,
        },
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    async with BrokerServer(settings) as server:
        async with aio.secure_channel(
            server.address, credentials, interceptors=[BearerCredential(CALLER_KEY)]
        ) as channel:
            stub = pb_grpc.TokenBrokerServiceStub(channel)
            await stub.CreateToken(create_request(), timeout=10)  # issued (a miss)
            await stub.CreateToken(create_request(), timeout=10)  # a cache hit
            denied = await call_error(stub, create_request(audiences=["https://nope.example"]))
            assert denied.code == grpc.StatusCode.PERMISSION_DENIED
            refused = await call_error(stub, create_request())  # past the burst of 2
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with aio.secure_channel(
            server.address, credentials, interceptors=[BearerCredential("tbk_unknown-key")]
        ) as channel:
            unknown = await call_error(pb_grpc.TokenBrokerServiceStub(channel), create_request())
            assert unknown.code == grpc.StatusCode.UNAUTHENTICATED
        _, text = await scrape(server)

    selectable, with_samples = exposed_names(text)
    queried = queried_metrics()
    missing = {name: sorted(where) for name, where in queried.items() if name not in selectable}
    assert not missing, f"queried but not exposed: {missing}"
    no_series = set(queried) - with_samples - EVENT_ONLY
    assert not no_series, f"queried, exposed without any series after the calls: {no_series}"
    # The calls did create the labelled series the panels group by.
    samples, _ = parse(text)
    assert series(samples, "token_broker_rate_limit_refusals_total") == {
        frozenset({("scope", "caller")}): 1
    }
    assert value(samples, "token_broker_rate_limit_redis_up") == 1
    assert value(samples, "token_broker_cache_hits_total") == 1


async def test_process_and_interpreter_metrics_are_in_each_brokers_registry(
    kubernetes_settings: KubernetesSettings,
) -> None:
    before = time.time()
    async with (
        BrokerServer(broker_settings(kubernetes_settings)) as first,
        BrokerServer(broker_settings(kubernetes_settings)) as second,
    ):
        for server in (first, second):
            samples, types = parse((await scrape(server))[1])
            assert types["process_resident_memory_bytes"] == "gauge"
            assert value(samples, "process_resident_memory_bytes") > 0
            assert value(samples, "process_virtual_memory_bytes") > 0
            assert value(samples, "process_cpu_seconds_total") > 0
            assert value(samples, "process_open_fds") > 0
            assert value(samples, "process_max_fds") > 0
            # This process (pytest's) started before the test.
            assert 0 < value(samples, "process_start_time_seconds") <= before
            [info] = series(samples, "python_info")
            assert dict(info)["version"] == platform.python_version()
            assert types["python_gc_objects_collected"] == "counter"
            assert series(samples, "python_gc_collections_total")


async def test_the_kubernetes_apis_last_answer_is_a_timestamp(
    kubernetes_settings: KubernetesSettings, emulator: Emulator
) -> None:
    before = time.time()
    async with BrokerServer(broker_settings(kubernetes_settings)) as server:
        samples, _ = parse((await scrape(server))[1])
        after = time.time()
        last = value(samples, "token_broker_kubernetes_api_last_success_timestamp_seconds")
        # The start-up probe's answer: between the start and the scrape (clock rounding: 1 s).
        assert before - 1 <= last <= after + 1
        # Down: no answer since; the timestamp stays that of the last answer.
        await emulator.stop()
        await server.prober.check()
        samples, _ = parse((await scrape(server))[1])
        assert value(samples, "token_broker_kubernetes_api_last_success_timestamp_seconds") == last


async def test_the_kubernetes_apis_last_answer_is_0_before_the_first(
    kubernetes_settings: KubernetesSettings, emulator: Emulator
) -> None:
    await emulator.stop()  # the broker starts without an API server, and is not ready
    async with BrokerServer(broker_settings(kubernetes_settings)) as server:
        samples, _ = parse((await scrape(server))[1])
    # Exposed (not merely absent) as 0: an alert on `time() - it` fires.
    never = samples[("token_broker_kubernetes_api_last_success_timestamp_seconds", frozenset())]
    assert never == 0
    assert samples[("token_broker_ready", frozenset())] == 0
