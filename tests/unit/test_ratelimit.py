"""Rate limits (broker.ratelimit), memory backend: GCRA per caller, service account, global.

Time is an injectable clock: nothing here sleeps.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from broker.config import ConfigError, RateLimitSettings, load_settings
from broker.errors import ERROR_DOMAIN, RETRY_PUSHBACK_TRAILER, BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import Identity
from broker.policy import Policy, PolicyError
from broker.policy_schema import RuleRateLimit
from broker.ratelimit import RateLimiter
from broker.reasons import Reason

ALICE = Identity(method="apiKey", name="alice")
BOB = Identity(method="apiKey", name="bob")
NS = "demo"
SA = "build-robot"
OTHER_SA = "deployer"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limits(
    caller: Any = None, service_account: Any = None, global_: Any = None, **more: Any
) -> RateLimitSettings:
    """Settings with only the given scopes limited ({"rate": r, "burst": b} each)."""
    return RateLimitSettings.model_validate(
        {
            "perCaller": caller,
            "perServiceAccount": service_account,
            "global": global_,
            **more,
        }
    )


def rate(r: float, b: int) -> dict[str, Any]:
    return {"rate": r, "burst": b}


async def admitted(
    limiter: RateLimiter,
    n: int,
    identity: Identity = ALICE,
    sa: str = SA,
    **kwargs: Any,
) -> int:
    """How many of n calls (at the clock's current time) are admitted."""
    count = 0
    for _ in range(n):
        try:
            await limiter.check(identity, NS, sa, **kwargs)
        except BrokerError as err:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            continue
        count += 1
    return count


async def refusal(limiter: RateLimiter, identity: Identity = ALICE, sa: str = SA, **kw: Any):
    with pytest.raises(BrokerError) as info:
        await limiter.check(identity, NS, sa, **kw)
    return info.value


def details(err: BrokerError) -> dict[str, Any]:
    """The decoded google.rpc details of the status the caller receives."""
    out: dict[str, Any] = {}
    for any_detail in err.status_proto().details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
        ):
            if any_detail.Is(cls.DESCRIPTOR):
                msg = cls()
                any_detail.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
    return out


# --- GCRA ---------------------------------------------------------------------------------


async def test_burst_then_refusal() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(10, 20)), clock=clock)
    assert await admitted(limiter, 20) == 20
    err = await refusal(limiter)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.retry_after == pytest.approx(0.1)


async def test_refill_over_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(10, 20)), clock=clock)
    assert await admitted(limiter, 25) == 20
    clock.advance(0.05)
    assert (await refusal(limiter)).retry_after == pytest.approx(0.05)
    clock.advance(0.05)
    assert await admitted(limiter, 3) == 1  # one interval (1/rate) refills one request
    clock.advance(60)
    assert await admitted(limiter, 30) == 20  # an idle bucket holds at most the burst


async def test_sustained_rate_is_the_rate_plus_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(10, 20)), clock=clock)
    total = 0
    for _ in range(1000):  # 10 s of a client trying every 10 ms
        total += await admitted(limiter, 1)
        clock.advance(0.01)
    assert total == 20 + 99  # the burst, then one per 0.1 s over [0, 9.99]


async def test_fractional_rates() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(0.5, 1)), clock=clock)
    assert await admitted(limiter, 2) == 1
    err = await refusal(limiter)
    assert err.retry_after == pytest.approx(2.0)
    assert "(0.5/s, burst 1)" in err.message
    clock.advance(1.999)
    assert await admitted(limiter, 1) == 0
    clock.advance(0.001)
    assert await admitted(limiter, 1) == 1


async def test_callers_are_isolated() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(1, 3)), clock=clock)
    assert await admitted(limiter, 5, ALICE) == 3
    assert await admitted(limiter, 5, BOB) == 3
    # The identity is method + issuer + name: another method is another caller.
    assert await admitted(limiter, 5, Identity(method="mtls", name="alice")) == 3
    jwt = Identity(method="jwt", name="alice", issuer="https://a.example")
    other_issuer = Identity(method="jwt", name="alice", issuer="https://b.example")
    assert await admitted(limiter, 5, jwt) == 3
    assert await admitted(limiter, 5, other_issuer) == 3


async def test_service_account_scope_is_shared_by_callers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(service_account=rate(1, 3)), clock=clock)
    assert await admitted(limiter, 2, ALICE) == 2
    assert await admitted(limiter, 1, BOB) == 1
    err = await refusal(limiter, BOB)
    assert err.metadata == {"scope": "serviceaccount"}
    assert await admitted(limiter, 3, BOB, OTHER_SA) == 3
    assert (
        await admitted(
            limiter,
            1,
            ALICE,
            SA,
        )
        == 0
    )


async def test_global_scope() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(global_=rate(100, 4)), clock=clock)
    assert await admitted(limiter, 2, ALICE) == 2
    assert await admitted(limiter, 1, BOB, OTHER_SA) == 1
    assert await admitted(limiter, 1, Identity(method="apiKey", name="carol"), "x") == 1
    err = await refusal(limiter, BOB)
    assert err.metadata == {"scope": "global"}
    assert err.retry_after == pytest.approx(0.01)


async def test_a_refusal_in_one_scope_does_not_consume_the_others() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        limits(caller=rate(1, 2), service_account=rate(1, 1), global_=rate(1, 3)), clock=clock
    )
    assert await admitted(limiter, 1, ALICE, SA) == 1  # caller 1/2, SA full, global 1/3
    for _ in range(5):
        err = await refusal(limiter, ALICE, SA)  # the SA refuses: nothing else is charged
        assert err.metadata == {"scope": "serviceaccount"}
    assert await admitted(limiter, 1, ALICE, OTHER_SA) == 1  # caller 2/2, global 2/3
    err = await refusal(limiter, ALICE, "third")
    assert err.metadata == {"scope": "caller"}
    assert await admitted(limiter, 1, BOB, "fourth") == 1  # global 3/3: the refusals took none


async def test_several_refusing_scopes_are_all_reported() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(1, 1), service_account=rate(0.25, 1)), clock=clock)
    assert await admitted(limiter, 1) == 1
    err = await refusal(limiter)
    # The caller must wait for both: the message names the longer wait (the SA's 4 s).
    assert err.metadata == {"scope": "serviceaccount"}
    assert err.retry_after == pytest.approx(4.0)
    violations = details(err)["QuotaFailure"].violations
    assert [v.subject for v in violations] == ["caller", f"serviceaccount:{NS}/{SA}"]
    assert limiter.stats.refusals == {"serviceaccount": 1}


# --- the refusal the caller sees ------------------------------------------------------------


async def test_caller_refusal_details() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(10, 20)), clock=clock)
    await admitted(limiter, 20)
    clock.advance(0.0653)
    err = await refusal(limiter)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.message == "rate limit exceeded for this caller (10/s, burst 20); retry in 0.04s"
    found = details(err)
    info = found["ErrorInfo"]
    assert (info.reason, info.domain, dict(info.metadata)) == (
        Reason.RATE_LIMITED,
        ERROR_DOMAIN,
        {"scope": "caller"},
    )
    assert found["RetryInfo"].retry_delay.ToMilliseconds() == 35  # 34.7 ms, rounded up
    (violation,) = found["QuotaFailure"].violations
    assert violation.subject == "caller"
    assert violation.description == "at most 10 requests per second, burst 20, for this caller"
    trailers = dict(err.trailing_metadata())
    assert trailers[RETRY_PUSHBACK_TRAILER] == "35"
    # Neither the caller's name nor anything of its credential is in the status.
    assert b"alice" not in err.status_proto().SerializeToString()
    assert "alice" not in err.message


async def test_service_account_and_global_refusal_details() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(service_account=rate(50, 1), global_=rate(200, 1)), clock=clock)
    await admitted(limiter, 1)
    err = await refusal(limiter, BOB, SA)
    assert err.message == (
        f"rate limit exceeded for service account {NS}/{SA} (50/s, burst 1); retry in 0.02s"
    )
    (sa_violation, global_violation) = details(err)["QuotaFailure"].violations
    assert sa_violation.subject == f"serviceaccount:{NS}/{SA}"
    assert global_violation.subject == "global"
    clock.advance(0.02)
    await admitted(limiter, 1, BOB, OTHER_SA)
    err = await refusal(limiter, ALICE, "third")
    assert err.message == (
        "rate limit exceeded for this token broker (all callers) (200/s, burst 1); retry in 0.01s"
    )
    assert err.metadata == {"scope": "global"}
    assert [v.subject for v in details(err)["QuotaFailure"].violations] == ["global"]


async def test_stats_and_observers() -> None:
    seen: list[str] = []

    class Observer:
        def rate_limit_refused(self, scope: str) -> None:
            seen.append(scope)

    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(1, 1), service_account=rate(1, 2)), clock=clock)
    limiter.add_observer(Observer())
    assert await admitted(limiter, 3, ALICE) == 1  # then 2 refusals by the caller's bucket
    assert await admitted(limiter, 1, BOB) == 1  # fills the SA's burst
    assert await admitted(limiter, 1, Identity(method="apiKey", name="carol")) == 0
    assert limiter.stats.refusals == {"caller": 2, "serviceaccount": 1}
    assert sorted(seen) == ["caller", "caller", "serviceaccount"]


async def test_disabled_never_refuses() -> None:
    limiter = RateLimiter(limits(caller=rate(1, 1), enabled=False), clock=FakeClock())
    assert await admitted(limiter, 100) == 100
    assert limiter.size() == 0
    assert repr(limiter) == "RateLimiter(backend='disabled')"


async def test_no_limits_at_all() -> None:
    limiter = RateLimiter(limits(), clock=FakeClock())
    assert await admitted(limiter, 100) == 100
    assert limiter.size() == 0


# --- per-rule overrides ---------------------------------------------------------------------


def policy(rate_limit: Any = None, **more: Any) -> Policy:
    rules: list[dict[str, Any]] = [
        {
            "name": "slow",
            "subjects": [{"method": "apiKey", "name": "*"}],
            "namespaces": [NS],
            "serviceAccounts": [SA],
            "audiences": ["vault"],
            **({"rateLimit": rate_limit} if rate_limit is not None else {}),
            **more,
        },
        {
            "name": "default",
            "subjects": [{"method": "apiKey", "name": "*"}],
            "namespaces": [NS],
            "serviceAccounts": ["*"],
            "audiences": ["vault"],
        },
    ]
    return Policy.from_dict({"rules": rules})


def request(sa: str = SA) -> pb.CreateTokenRequest:
    return pb.CreateTokenRequest(
        namespace=NS,
        service_account=sa,
        token_request=pb.TokenRequest(spec=pb.TokenRequestSpec(audiences=["vault"])),
    )


async def checked(limiter: RateLimiter, pol: Policy, identity: Identity, sa: str = SA) -> bool:
    decision = pol.decide(identity, request(sa))
    assert decision.allowed, decision
    try:
        await limiter.check(identity, NS, sa, rule=decision.rule, override=decision.rate_limit)
    except BrokerError:
        return False
    return True


async def test_rule_override_replaces_the_default_limit() -> None:
    pol = policy({"perCaller": rate(1, 2)})
    decision = pol.decide(ALICE, request())
    assert decision.rate_limit == RuleRateLimit(per_caller={"rate": 1, "burst": 2})
    assert pol.decide(ALICE, request(OTHER_SA)).rate_limit is None
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(10, 5)), clock=clock)
    assert [await checked(limiter, pol, ALICE) for _ in range(4)] == [True, True, False, False]
    err = await refusal(limiter, ALICE, SA, rule=decision.rule, override=decision.rate_limit)
    assert "(1/s, burst 2)" in err.message
    # The rule's bucket is its own: requests other rules decide keep the default limit.
    assert [await checked(limiter, pol, ALICE, OTHER_SA) for _ in range(6)] == [True] * 5 + [False]
    assert [await checked(limiter, pol, BOB) for _ in range(3)] == [True, True, False]


async def test_rule_override_null_lifts_a_scope_and_absent_keeps_the_default() -> None:
    clock = FakeClock()
    settings = limits(caller=rate(1, 2), service_account=rate(1, 1))
    lifted = policy({"perServiceAccount": None})
    limiter = RateLimiter(settings, clock=clock)
    # No SA limit for this rule; the default per-caller limit still applies.
    assert [await checked(limiter, lifted, ALICE) for _ in range(3)] == [True, True, False]
    assert await checked(limiter, lifted, BOB)
    stricter = policy({"perCaller": rate(1, 1)})
    limiter = RateLimiter(settings, clock=clock)
    # The default SA limit (burst 1) applies: the rule set only perCaller.
    assert [await checked(limiter, stricter, ALICE) for _ in range(2)] == [True, False]
    err = await refusal(
        limiter, BOB, SA, rule="slow", override=stricter.decide(BOB, request()).rate_limit
    )
    assert err.metadata == {"scope": "serviceaccount"}


def test_rule_rate_limit_schema_errors_name_the_key() -> None:
    with pytest.raises(PolicyError) as info:
        policy({"perCaller": {"rate": 0, "burst": 2}})
    assert "rules[0].rateLimit.perCaller.rate: Input should be greater than 0" in str(info.value)
    with pytest.raises(PolicyError) as info:
        policy({"global": rate(1, 1)})
    assert "rules[0].rateLimit.global: Extra inputs are not permitted" in str(info.value)
    with pytest.raises(PolicyError) as info:
        policy({"perServiceAccount": {"rate": 1}})
    assert "rules[0].rateLimit.perServiceAccount.burst: required" in str(info.value)


# --- settings -------------------------------------------------------------------------------


def test_settings_defaults_and_yaml_shape() -> None:
    default = load_settings(None).rate_limit
    assert default.enabled
    assert (default.per_caller.rate, default.per_caller.burst) == (10, 20)
    assert default.global_limit is not None and default.global_limit.burst == 400
    assert (default.backend, default.on_redis_unavailable) == ("memory", "local")
    assert default.redis.key_prefix == "token-broker:"
    assert default.upstream.max_concurrent == 32
    settings = load_settings(
        None,
        {
            "rateLimit": {
                "perCaller": {"rate": 2.5, "burst": 5},
                "perServiceAccount": None,
                "global": None,
                "backend": "redis",
                "redis": {"address": "[::1]:6380", "keyPrefix": "tb:", "timeoutSeconds": 0.2},
                "onRedisUnavailable": "refuse",
                "upstream": {"maxConcurrent": 4, "maxWaitSeconds": 0.5},
            }
        },
    ).rate_limit
    assert settings.per_service_account is None and settings.global_limit is None
    assert settings.redis.address == "[::1]:6380"
    assert settings.upstream.max_wait_seconds == 0.5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"global": {"rate": 0, "burst": 1}}, "rateLimit.global.rate: Input should be greater"),
        ({"perCaller": {"rate": 1, "burst": 0}}, "rateLimit.perCaller.burst: Input should be"),
        ({"backend": "memcached"}, "rateLimit.backend: Input should be 'memory' or 'redis'"),
        ({"redis": {"address": "redis"}}, "rateLimit.redis.address: Value error, 'redis' is"),
        ({"redis": {"tls": {"certFile": "/x"}}}, "set both certFile and keyFile"),
        ({"onRedisUnavailable": "open"}, "rateLimit.onRedisUnavailable: Input should be"),
        ({"upstream": {"maxConcurrent": 0}}, "rateLimit.upstream.maxConcurrent: Input should"),
    ],
)
def test_settings_errors_name_the_key(value: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"rateLimit": value})
    assert message in str(info.value)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_BROKER_RATE_LIMIT__GLOBAL__RATE", "5")
    monkeypatch.setenv("TOKEN_BROKER_RATE_LIMIT__GLOBAL__BURST", "6")
    monkeypatch.setenv("TOKEN_BROKER_RATE_LIMIT__REDIS__KEY_PREFIX", "x:")
    settings = load_settings(None).rate_limit
    assert (settings.global_limit.rate, settings.global_limit.burst) == (5, 6)
    assert settings.redis.key_prefix == "x:"


# --- memory is bounded ----------------------------------------------------------------------


async def test_idle_buckets_are_dropped_100k_identities() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(10, 20)), clock=clock)
    n = 100_000
    for i in range(n):
        await limiter.check(Identity(method="jwt", name=f"repo:{i}", issuer="https://i"), NS, SA)
        clock.advance(1e-7)  # 10 ms for all of them: every bucket is still live
    assert limiter.size() == n
    # Their buckets go idle (full again after burst/rate = 2 s) ...
    clock.advance(2.0)
    # ... and steady traffic from one caller sweeps them out, a few per check.
    for _ in range(n // 4 + 10):
        await limiter.check(ALICE, NS, SA)
        clock.advance(0.1)  # exactly the rate: never refused
    assert limiter.size() == 1


async def test_live_buckets_are_kept_by_the_sweep() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(1, 2)), clock=clock)
    assert await admitted(limiter, 2, ALICE) == 2  # ALICE's bucket: full until +2 s
    for i in range(100):  # sweeps ALICE's bucket many times over
        await limiter.check(Identity(method="apiKey", name=f"c{i}"), NS, SA)
    assert await admitted(limiter, 1, ALICE) == 0
    clock.advance(1.0)
    assert await admitted(limiter, 2, ALICE) == 1


async def test_memory_follows_the_live_buckets_under_churn() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limits(caller=rate(10, 20)), clock=clock)
    largest = 0
    for i in range(100_000):  # 10,000 new callers a second, each bucket live for 0.1 s
        await limiter.check(Identity(method="apiKey", name=f"c{i}"), NS, SA)
        clock.advance(0.0001)
        largest = max(largest, limiter.size())
    assert largest <= 2_000  # ~1,000 live buckets, plus the ones the sweep has not reached
