"""Rate limits shared through a real redis-server (broker.ratelimit, backend: redis).

Two RateLimiter instances on one Redis stand for two broker replicas. The server is killed,
paused and restarted on its port to check the fallback and the recovery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.config import ConfigError, RateLimitSettings
from broker.errors import BrokerError
from broker.identity import Identity
from broker.ratelimit import (
    RateLimiter,
)
from broker.reasons import Reason
from tests.support.cli import issue
from tests.support.redis_server import RedisServer, TlsFront

ALICE = Identity(method="apiKey", name="alice")
BOB = Identity(method="apiKey", name="bob")
NS = "demo"
SA = "build-robot"
PREFIX = "tb-test:"


class FakeClock:
    """For the retry interval and the local fallback; Redis itself uses its own clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings(server: RedisServer, **overrides: Any) -> RateLimitSettings:
    redis: dict[str, Any] = {
        "address": server.address,
        "keyPrefix": PREFIX,
        "timeoutSeconds": 0.5,
        "retryIntervalSeconds": 5,
        **overrides.pop("redis", {}),
    }
    return RateLimitSettings.model_validate(
        {
            "perCaller": None,
            "perServiceAccount": None,
            "global": None,
            "backend": "redis",
            "redis": redis,
            **overrides,
        }
    )


async def admitted(limiter: RateLimiter, n: int, identity: Identity = ALICE, sa: str = SA) -> int:
    count = 0
    for _ in range(n):
        try:
            await limiter.check(identity, NS, sa)
        except BrokerError as err:
            assert err.reason == Reason.RATE_LIMITED, err
            continue
        count += 1
    return count


@pytest.fixture
async def make_limiter():
    made: list[RateLimiter] = []

    def make(config: RateLimitSettings, clock: Any = time.monotonic) -> RateLimiter:
        limiter = RateLimiter.from_settings(config, clock=clock)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


async def test_two_replicas_share_one_bucket(redis_server: RedisServer, make_limiter) -> None:
    config = settings(redis_server, perServiceAccount={"rate": 0.1, "burst": 10})
    first, second = make_limiter(config), make_limiter(config)
    assert await admitted(first, 6) == 6
    assert await admitted(second, 6, BOB) == 4  # the burst is shared, whoever spent it
    with pytest.raises(BrokerError) as info:
        await first.check(ALICE, NS, SA)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.metadata == {"scope": "serviceaccount"}
    assert 9.0 < info.value.retry_after <= 10.0  # the Redis server's clock
    assert first.redis_available and second.redis_available
    assert first.size() == second.size() == 0  # nothing held locally


async def test_concurrent_replicas_admit_no_more_than_burst_plus_rate(
    redis_server: RedisServer, make_limiter
) -> None:
    rate, burst = 50.0, 10
    config = settings(redis_server, **{"global": {"rate": rate, "burst": burst}})
    replicas = [make_limiter(config) for _ in range(2)]
    admitted_at: list[float] = []
    started = time.monotonic()
    stop = started + 1.0

    async def hammer(limiter: RateLimiter, identity: Identity) -> None:
        while time.monotonic() < stop:
            try:
                await limiter.check(identity, NS, SA)
            except BrokerError as err:
                assert err.reason == Reason.RATE_LIMITED
            else:
                admitted_at.append(time.monotonic())

    await asyncio.gather(
        *(
            hammer(limiter, Identity(method="apiKey", name=f"c{i}"))
            for limiter in replicas
            for i in range(8)
        )
    )
    elapsed = time.monotonic() - started
    assert len(admitted_at) <= burst + rate * elapsed + 1
    assert len(admitted_at) >= burst + rate * 0.5  # and the limit is reached, not starved
    # Both replicas' checks were answered by Redis: nothing was decided locally.
    assert all(limiter.stats.local_checks == 0 for limiter in replicas)


async def test_scopes_are_checked_and_charged_in_one_script(
    redis_server: RedisServer, make_limiter
) -> None:
    config = settings(
        redis_server,
        perCaller={"rate": 0.01, "burst": 2},
        perServiceAccount={"rate": 0.01, "burst": 1},
    )
    limiter = make_limiter(config)
    assert await admitted(limiter, 1, ALICE, SA) == 1
    for _ in range(3):
        with pytest.raises(BrokerError) as info:
            await limiter.check(ALICE, NS, SA)
        assert info.value.metadata == {"scope": "serviceaccount"}
    assert await admitted(limiter, 1, ALICE, "other") == 1  # the refusals charged nothing
    with pytest.raises(BrokerError) as info:
        await limiter.check(ALICE, NS, "third")
    assert info.value.metadata == {"scope": "caller"}


async def test_keys_are_prefixed_expire_and_do_not_name_callers(
    redis_server: RedisServer, make_limiter
) -> None:
    config = settings(
        redis_server,
        perCaller={"rate": 1, "burst": 5},
        perServiceAccount={"rate": 10, "burst": 5},
        **{"global": {"rate": 0.5, "burst": 5}},
    )
    limiter = make_limiter(config)
    await limiter.check(ALICE, NS, SA)
    with redis_server.client() as client:
        keys = sorted(k.decode() for k in client.keys("*"))
        assert len(keys) == 3 and all(k.startswith(PREFIX + "rl:") for k in keys)
        assert f"{PREFIX}rl:sa:{NS}/{SA}" in keys and f"{PREFIX}rl:global" in keys
        assert not any("alice" in k for k in keys)
        # Each key expires when its bucket is full again: one interval after one request.
        ttls = {k: client.pttl(k) for k in keys}
    assert 0 < ttls[f"{PREFIX}rl:sa:{NS}/{SA}"] <= 100
    assert 1500 <= ttls[f"{PREFIX}rl:global"] <= 2000
    assert 500 <= next(v for k, v in ttls.items() if ":caller:" in k) <= 1000


async def test_redis_killed_degrades_to_local_limits_and_recovers(
    redis_server: RedisServer, make_limiter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.ratelimit")
    clock = FakeClock()
    limiter = make_limiter(settings(redis_server, perCaller={"rate": 0.01, "burst": 3}), clock)
    assert await admitted(limiter, 1) == 1
    assert limiter.redis_available

    redis_server.kill()
    # Local limits from here (a fresh local bucket: this process's burst of 3).
    assert await admitted(limiter, 5) == 3
    assert limiter.redis_available is False
    assert limiter.stats.redis_failures == 1  # tried once, then not again for 5 s
    assert limiter.stats.local_checks == 5
    assert limiter.size() == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Redis at 127.0.0.1" in warnings[0].getMessage()
    assert "limiting calls per process (onRedisUnavailable: local)" in warnings[0].getMessage()

    redis_server.start()  # same port, empty
    assert await admitted(limiter, 1, BOB) == 1
    assert limiter.stats.local_checks == 6  # still within the retry interval: not tried
    clock.advance(5.0)
    assert await admitted(limiter, 3) == 3  # Redis again: its own (empty) bucket for ALICE
    assert limiter.redis_available
    assert limiter.stats.redis_failures == 1 and limiter.stats.local_checks == 6
    recovered = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(recovered) == 1 and "available again" in recovered[0].getMessage()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    with redis_server.client() as client:
        assert any(b":caller:" in k for k in client.keys(f"{PREFIX}*"))


async def test_redis_down_with_refuse(redis_server: RedisServer, make_limiter) -> None:
    clock = FakeClock()
    config = settings(redis_server, perCaller={"rate": 1, "burst": 3}, onRedisUnavailable="refuse")
    limiter = make_limiter(config, clock)
    assert await admitted(limiter, 1) == 1
    redis_server.kill()
    for expected in (5.0, 3.0):
        with pytest.raises(BrokerError) as info:
            await limiter.check(ALICE, NS, SA)
        err = info.value
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert err.reason == Reason.RATE_LIMIT_UNAVAILABLE
        assert err.retry_after == pytest.approx(expected)  # until Redis is tried again
        assert dict(err.trailing_metadata())["grpc-retry-pushback-ms"] == str(int(expected * 1000))
        clock.advance(2.0)
    assert limiter.stats.unavailable_refusals == 2 and limiter.stats.redis_failures == 1
    redis_server.start()
    clock.advance(1.0)
    assert await admitted(limiter, 1) == 1
    assert limiter.redis_available


async def test_a_hung_redis_is_bounded_by_the_timeout(
    redis_server: RedisServer, make_limiter
) -> None:
    clock = FakeClock()
    config = settings(
        redis_server, perCaller={"rate": 1, "burst": 3}, redis={"timeoutSeconds": 0.2}
    )
    limiter = make_limiter(config, clock)
    assert await admitted(limiter, 1) == 1
    redis_server.pause()
    try:
        started = time.monotonic()
        assert await admitted(limiter, 1) == 1  # decided locally after the timeout
        assert time.monotonic() - started < 2.0
        assert limiter.redis_available is False
    finally:
        redis_server.resume()
    clock.advance(5.0)
    assert await admitted(limiter, 1) == 1
    assert limiter.redis_available


async def test_password_from_a_file(tmp_path: Path, make_limiter, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    password = "s3cret-redis-pw-7f1e"
    server = RedisServer(tmp_path, password=password)
    server.start()
    try:
        password_file = tmp_path / "redis-password"
        password_file.write_text(password + "\n")
        config = settings(
            server, perCaller={"rate": 1, "burst": 1}, redis={"passwordFile": str(password_file)}
        )
        limiter = make_limiter(config)
        assert await admitted(limiter, 2) == 1
        assert limiter.redis_available
        assert password not in repr(limiter)
        assert password not in repr(limiter._redis)

        wrong = tmp_path / "wrong-password"
        wrong.write_text("not-it")
        config = settings(
            server, perCaller={"rate": 1, "burst": 1}, redis={"passwordFile": str(wrong)}
        )
        refused = make_limiter(config)
        assert await admitted(refused, 1) == 1  # local limits
        assert refused.redis_available is False
        assert refused.stats.redis_failures == 1
        assert password not in caplog.text and "not-it" not in caplog.text
    finally:
        server.stop()


def test_missing_files_are_configuration_errors(tmp_path: Path) -> None:
    base = {"backend": "redis", "perCaller": {"rate": 1, "burst": 1}}
    with pytest.raises(ConfigError, match=r"rateLimit\.redis\.passwordFile: no such file"):
        RateLimiter.from_settings(
            RateLimitSettings.model_validate(
                {**base, "redis": {"passwordFile": str(tmp_path / "nope")}}
            )
        )
    with pytest.raises(ConfigError, match=r"rateLimit\.redis\.tls\.caFile: no such file"):
        RateLimiter.from_settings(
            RateLimitSettings.model_validate(
                {**base, "redis": {"tls": {"enabled": True, "caFile": str(tmp_path / "ca")}}}
            )
        )


async def test_tls_to_redis_checks_the_server_and_presents_a_client_cert(
    redis_server: RedisServer, make_limiter, tmp_path: Path
) -> None:
    # Real handshakes with the broker's Redis client, through a TLS front on the real server.
    server = issue(tmp_path, "redis", "127.0.0.1")
    client = issue(tmp_path, "client", "token-broker.example")
    stranger = issue(tmp_path, "stranger", "127.0.0.1")  # a CA the broker does not trust
    other_host = tmp_path / "other-host"
    other_host.mkdir()
    leaf = server.ca.issue_cert("redis.example")  # the right CA, another name
    leaf.private_key_and_cert_chain_pem.write_to_path(str(other_host / "tls.pem"))
    tls = {
        "enabled": True,
        "caFile": str(server.ca_file),
        "certFile": str(client.cert),
        "keyFile": str(client.key),
    }

    def limiter(front: TlsFront, **tls_overrides: Any) -> RateLimiter:
        redis = {"address": front.address, "tls": {**tls, **tls_overrides}}
        config = settings(
            redis_server,
            perServiceAccount={"rate": 0.1, "burst": 10},
            onRedisUnavailable="refuse",
            redis=redis,
        )
        return make_limiter(config)

    async def refused(made: RateLimiter) -> None:
        with pytest.raises(BrokerError) as info:
            await made.check(ALICE, NS, SA)
        assert info.value.reason == Reason.RATE_LIMIT_UNAVAILABLE
        assert made.redis_available is False

    front = TlsFront(redis_server.port, server.cert, server.key, client_ca=client.ca_file)
    async with front:
        first, second = limiter(front), limiter(front)
        assert await admitted(first, 6) == 6
        assert await admitted(second, 6, BOB) == 4  # one bucket, through TLS
        assert front.handshakes >= 2
        await refused(limiter(front, caFile=str(stranger.ca_file)))  # unknown CA
        # No client certificate: the front refuses the handshake.
        await refused(limiter(front, certFile=None, keyFile=None))
        # A client certificate from a CA the front does not trust.
        await refused(limiter(front, certFile=str(stranger.cert), keyFile=str(stranger.key)))
    # A certificate of the trusted CA for another host name.
    pem = other_host / "tls.pem"
    async with TlsFront(redis_server.port, pem, pem, client_ca=client.ca_file) as front:
        await refused(limiter(front))
