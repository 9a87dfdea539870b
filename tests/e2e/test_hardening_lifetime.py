"""maxExpiration holds for the token actually issued, not for what the TokenRequest says.

kube-apiserver extends a Pod-bound request of exactly 3607 s for its own audiences to a JWT
valid for a year (`--service-account-extend-token-expiration`, on by default; the emulator's
`extend_expiration`), while spec.expirationSeconds and status.expirationTimestamp still say
3607 s. The broker asks for 3606 s instead when the deciding rule's maximum is shorter than a
year, and checks every minted token's own `exp - iat` against the rule before it is cached or
handed out, whatever the API server did.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc import aio

from broker.config import KubernetesSettings, load_settings
from broker.emulator import Emulator
from broker.emulator.config import DEFAULT_ISSUER
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.identity import Identity
from broker.policy import DEV_POLICY_FILE, Policy
from broker.reasons import Reason
from broker.server import BrokerServer
from broker.upstream import UpstreamClient
from tests.support.stack import (
    CALLER,
    CALLER_KEY,
    LOCAL_CALLER,
    NAMESPACE,
    POD,
    SERVICE_ACCOUNT,
    BearerCredential,
    access_config,
    call_error,
    claims_of,
    create_request,
)

API_AUDIENCE = DEFAULT_ISSUER  # the emulator's (and a default cluster's) own audience
ONE_YEAR = 365 * 24 * 3600
RULE = "pods-2h"


def rule(**overrides: Any) -> dict[str, Any]:
    """The issue's rule: 2 h, reject, the API server's audience and Pod binding allowed."""
    base: dict[str, Any] = {
        "name": RULE,
        "subjects": [
            {"method": "apiKey", "name": CALLER},
            {"method": "unixSocket", "name": LOCAL_CALLER},
        ],
        "namespaces": [NAMESPACE],
        "serviceAccounts": [SERVICE_ACCOUNT],
        "audiences": [API_AUDIENCE, "https://vault.example.com"],
        "allowApiServerAudience": True,
        "maxExpiration": "2h",
        "onLongerExpiration": "reject",
        "boundObject": {"kinds": ["Pod"]},
    }
    base.update(overrides)
    return base


def write_policy(path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump({"rules": [rule(**overrides)]}), encoding="utf-8")
    return path


class Broker:
    def __init__(self, server: BrokerServer, audit_file: Path) -> None:
        self.server = server
        self.audit_file = audit_file

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.audit_file.read_text(encoding="utf-8").splitlines()]

    def metric(self, name: str, **labels: str) -> float:
        found = self.server.metrics.registry.get_sample_value(name, labels)
        return found if found is not None else 0.0


@pytest.fixture
async def start_broker(
    kubernetes_settings: KubernetesSettings, upstream: UpstreamClient, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Brokers with the token cache on, their audit log in a file, and `policy`."""
    started: list[BrokerServer] = []

    async def start(policy: Path, **server: Any) -> Broker:
        audit_file = tmp_path / f"audit-{len(started)}.jsonl"
        settings = load_settings(
            None,
            {
                "server": {"listen": "127.0.0.1:0", "allowPlaintext": True, **server},
                "kubernetes": kubernetes_settings,
                "cache": {"enabled": True},
                "rateLimit": {"enabled": False},
                **access_config(policy),
                "audit": {"sink": "file", "file": str(audit_file)},
            },
        )
        broker = BrokerServer(settings, upstream=upstream)
        await broker.start()
        started.append(broker)
        return Broker(broker, audit_file)

    yield start
    for broker in started:
        await broker.stop(None)


async def stub_for(broker: Broker) -> tuple[aio.Channel, pb_grpc.TokenBrokerServiceStub]:
    channel = aio.insecure_channel(
        broker.server.address, interceptors=[BearerCredential(CALLER_KEY)]
    )
    return channel, pb_grpc.TokenBrokerServiceStub(channel)


def pod_ref(emulator: Emulator) -> pb.BoundObjectReference:
    uid = str(emulator.store.get_pod(NAMESPACE, POD).uid)
    return pb.BoundObjectReference(kind="Pod", api_version="v1", name=POD, uid=uid)


async def eventually(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def issued_jtis(emulator: Emulator) -> list[str]:
    """The jti of every token the emulator minted (its issued-credential-id audit annotation)."""
    key = "authentication.kubernetes.io/issued-credential-id"
    return [
        r.audit_annotations[key].removeprefix("JTI=")
        for r in emulator.token_requests
        if key in r.audit_annotations
    ]


# --- avoidance: 3607 s is asked for as 3606 s ---------------------------------------------------


@pytest.mark.emulator_config(extend_expiration=True)
@pytest.mark.parametrize("audiences", [[], [API_AUDIENCE]], ids=["server-default", "explicit"])
async def test_a_3607_second_pod_bound_request_gets_a_token_of_at_most_the_rule_s_maximum(
    start_broker: Callable[..., Any], emulator: Emulator, tmp_path: Path, audiences: list[str]
) -> None:
    broker = await start_broker(write_policy(tmp_path / "policy.yaml"))
    channel, stub = await stub_for(broker)
    async with channel:
        response = await stub.CreateToken(
            create_request(audiences=audiences, expiration_seconds=3607, bound=pod_ref(emulator)),
            timeout=30,
        )
    claims = claims_of(emulator, response.token_request.status.token)
    # Not extended: the JWT is valid for what was asked of the API server, and says so.
    assert claims["exp"] - claims["iat"] == 3606
    assert "warnafter" not in claims["kubernetes.io"]
    assert response.token_request.spec.expiration_seconds == 3606
    assert list(response.warnings) == [
        "requested expiration of 3607 seconds shortened to 3606 seconds"
    ]
    [sent] = emulator.token_requests
    assert sent.body["spec"]["expirationSeconds"] == 3606
    [line] = broker.audit_lines()
    assert line["requestedExpirationSeconds"] == 3607
    assert line["grantedExpirationSeconds"] == 3606
    assert line["tokenLifetimeSeconds"] == 3606
    assert line["decision"] == "allowed"
    assert broker.metric("token_broker_token_granted_lifetime_seconds_sum") == 3606


@pytest.mark.emulator_config(extend_expiration=True)
async def test_the_shipped_dev_policy_no_longer_hands_out_year_long_tokens(
    start_broker: Callable[..., Any], emulator: Emulator, tmp_path: Path
) -> None:
    # dev-policy.yaml: 24 h, the API server's audience allowed, any bound kind; its unix
    # socket subject matches every local caller.
    socket = tmp_path / "broker.sock"
    broker = await start_broker(DEV_POLICY_FILE, listen=None, unix_socket=str(socket))
    async with aio.insecure_channel(f"unix:{socket}") as channel:
        response = await pb_grpc.TokenBrokerServiceStub(channel).CreateToken(
            create_request(
                audiences=[API_AUDIENCE], expiration_seconds=3607, bound=pod_ref(emulator)
            ),
            timeout=30,
        )
    claims = claims_of(emulator, response.token_request.status.token)
    assert claims["exp"] - claims["iat"] == 3606 <= 24 * 3600
    assert broker.audit_lines()[0]["tokenLifetimeSeconds"] == 3606


def test_when_3607_seconds_are_asked_for_as_3606() -> None:
    caller = Identity(method="apiKey", name=CALLER)
    pod = pb.BoundObjectReference(kind="Pod", name=POD)

    def decide(request: pb.CreateTokenRequest, **overrides: Any) -> tuple[int | None, list[str]]:
        decision = Policy.from_dict({"rules": [rule(**overrides)]}).decide(caller, request)
        assert decision.allowed, decision.message
        assert decision.max_expiration_seconds is not None
        return decision.expiration_seconds, list(decision.warnings)

    shortened = ["requested expiration of 3607 seconds shortened to 3606 seconds"]
    assert decide(create_request(expiration_seconds=3607, bound=pod)) == (3606, shortened)
    # A rule's default of 3607 s, too.
    assert decide(create_request(bound=pod), defaultExpiration=3607) == (3606, shortened)
    # Capped to a maximum of 3607 s: one warning, from what was asked to what is granted.
    assert decide(
        create_request(expiration_seconds=7200, bound=pod),
        maxExpiration=3607,
        onLongerExpiration="cap",
    ) == (3606, ["requested expiration of 7200 seconds shortened to 3606 seconds"])
    # Not Pod-bound: the API server does not extend it.
    secret = pb.BoundObjectReference(kind="Secret", name="s1")
    assert decide(
        create_request(expiration_seconds=3607, bound=secret), boundObject={"kinds": ["Secret"]}
    ) == (3607, [])
    assert decide(create_request(expiration_seconds=3607)) == (3607, [])
    # A maximum of a year or more allows the extended token: nothing to avoid.
    assert decide(create_request(expiration_seconds=3607, bound=pod), maxExpiration=ONE_YEAR) == (
        3607,
        [],
    )
    assert decide(create_request(expiration_seconds=3606, bound=pod)) == (3606, [])


# --- the check of the minted token --------------------------------------------------------------


# The API server shortens 7200 s to its own maximum of 3607 s, then extends that to a year: the
# broker could not have avoided it by what it asked for.
@pytest.mark.emulator_config(extend_expiration=True, max_expiration_seconds=3607)
async def test_a_minted_token_longer_than_the_rule_allows_is_refused_and_never_cached(
    start_broker: Callable[..., Any], emulator: Emulator, tmp_path: Path
) -> None:
    broker = await start_broker(write_policy(tmp_path / "policy.yaml"))
    request = create_request(expiration_seconds=7200, bound=pod_ref(emulator))
    channel, stub = await stub_for(broker)
    async with channel:
        # Concurrent identical calls share one API call (single flight), and each is refused:
        # the API server holds its answer until all four wait for it.
        emulator.faults.latency = 60.0
        calls = [asyncio.ensure_future(call_error(stub, request, timeout=60)) for _ in range(4)]
        cache = broker.server.cache
        await eventually(lambda: cache.stats.coalesced == 3 and emulator.in_flight == 1)
        emulator.faults.latency = 0.0
        refusals = list(await asyncio.gather(*calls))
        assert emulator.token_request_count == 1
        # Not cached: the next call asks the API server again, and is refused again.
        refusals.append(await call_error(stub, request, timeout=30))
    assert emulator.token_request_count == 2
    assert emulator.token_requests[0].warnings == [
        "requested expiration of 7200 seconds shortened to 3607 seconds"
    ]

    for status in refusals:
        assert status.code == grpc.StatusCode.FAILED_PRECONDITION
        assert status.message == (
            f"the Kubernetes API server minted a token valid for {ONE_YEAR} seconds, longer "
            "than the maximum of 7200 seconds for this service account (the API server extends "
            "some tokens, e.g. with --service-account-extend-token-expiration); the token "
            "broker withheld it: it was not handed out and not cached"
        )
        assert status.error_info is not None
        assert status.error_info.reason == Reason.TOKEN_LIFETIME_EXCEEDS_POLICY
        assert status.error_info.domain == "tokenbroker.dev"
        assert dict(status.error_info.metadata) == {
            "rule": RULE,
            "maxExpirationSeconds": "7200",
            "tokenLifetimeSeconds": str(ONE_YEAR),
        }

    # Each call has its own line, which says a token was minted (its jti, its real lifetime)
    # and refused.
    lines = broker.audit_lines()
    assert len(lines) == 5
    assert len({line["requestID"] for line in lines}) == 5
    first, second = issued_jtis(emulator)
    assert [line["jti"] for line in lines] == [first] * 4 + [second]
    for line in lines:
        assert line["decision"] == "error"
        assert line["reason"] == Reason.TOKEN_LIFETIME_EXCEEDS_POLICY
        assert line["code"] == "FAILED_PRECONDITION"
        assert line["upstreamStatus"] == 201
        assert line["rule"] == RULE
        assert line["grantedExpirationSeconds"] == 3607  # what the TokenRequest says
        assert line["tokenLifetimeSeconds"] == ONE_YEAR  # what the token is valid for
    assert (
        broker.metric(
            "token_broker_tokens_withheld_total", reason=Reason.TOKEN_LIFETIME_EXCEEDS_POLICY
        )
        == 5
    )
    assert broker.metric("token_broker_tokens_issued_total", namespace=NAMESPACE) == 0
    assert broker.metric("token_broker_token_granted_lifetime_seconds_count") == 0
    assert len(broker.server.cache) == 0


@pytest.mark.emulator_config(extend_expiration=True, max_expiration_seconds=3607)
async def test_a_cached_token_is_checked_against_the_rule_in_force(
    start_broker: Callable[..., Any], emulator: Emulator, tmp_path: Path
) -> None:
    # A rule that allows year-long tokens: the extended token is handed out, and recorded
    # with the lifetime it really has.
    policy = write_policy(tmp_path / "policy.yaml", maxExpiration=ONE_YEAR)
    broker = await start_broker(policy)
    request = create_request(expiration_seconds=7200, bound=pod_ref(emulator))
    channel, stub = await stub_for(broker)
    async with channel:
        response = await stub.CreateToken(request, timeout=30)
        claims = claims_of(emulator, response.token_request.status.token)
        assert claims["exp"] - claims["iat"] == ONE_YEAR
        assert broker.audit_lines()[0]["tokenLifetimeSeconds"] == ONE_YEAR
        assert broker.metric("token_broker_token_granted_lifetime_seconds_sum") == ONE_YEAR
        assert len(broker.server.cache) == 1

        # The maximum is lowered to 2 h: the same request (same cache key) now finds a
        # cached token that is too long. It is refused and dropped from the cache.
        write_policy(policy)
        assert await broker.server.policy.reload()
        status = await call_error(stub, request, timeout=30)
        assert status.error_info is not None
        assert status.error_info.reason == Reason.TOKEN_LIFETIME_EXCEEDS_POLICY
        assert emulator.token_request_count == 1
        assert len(broker.server.cache) == 0
        hit = broker.audit_lines()[1]
        assert (hit["upstreamStatus"], hit["jti"]) == (None, claims["jti"])
        assert hit["tokenLifetimeSeconds"] == ONE_YEAR

        # The next call mints again (and that token is refused too).
        status = await call_error(stub, request, timeout=30)
        assert status.error_info is not None
        assert status.error_info.reason == Reason.TOKEN_LIFETIME_EXCEEDS_POLICY
        assert emulator.token_request_count == 2
