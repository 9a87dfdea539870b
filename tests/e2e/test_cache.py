"""The token cache (broker.cache), against the real upstream client and the emulator.

Fetches are real TokenRequests to the emulator over HTTPS (counted by
`emulator.token_request_count`); time is an injected clock moved by hand, never slept.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from broker.cache import (
    REFRESH_RETRY_SECONDS,
    CacheKey,
    CacheResult,
    CacheStats,
    TokenCache,
    token_lifetime,
)
from broker.config import (
    AuditSettings,
    CacheSettings,
    ConfigError,
    KubernetesSettings,
    load_settings,
)
from broker.emulator import Emulator
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.identity import Identity
from broker.policy import Decision
from broker.reasons import ALLOWED, Reason
from broker.server import BrokerServer
from broker.upstream import UpstreamClient, UpstreamResult
from tests.support.stack import (
    CALLER_KEY,
    CORE_POLICY,
    NAMESPACE,
    POD,
    SECRET,
    SERVICE_ACCOUNT,
    BearerCredential,
    broker_settings,
    call_error,
    create_request,
)

ALICE = Identity(method="apiKey", name="alice")
BOB = Identity(method="apiKey", name="bob")
LIFETIME = 3600  # seconds of the tokens most tests ask for
REFRESH_POINT = 0.8 * LIFETIME


class Clock:
    """The cache's clock: starts anywhere, moves only when told."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Fetch = Callable[[float | None], Any]


def fetcher(upstream: UpstreamClient, request: pb.CreateTokenRequest) -> Fetch:
    """What the servicer passes: the effective request sent upstream with the given timeout."""

    async def fetch(timeout: float | None) -> UpstreamResult:
        return await upstream.create_token(
            request.namespace,
            request.service_account,
            request.token_request,
            dry_run=bool(request.dry_run),
            timeout=timeout,
        )

    return fetch


def gated(fetch: Fetch, gate: asyncio.Event) -> Fetch:
    """`fetch`, held until `gate` is set: keeps a call in flight without sleeping."""

    async def held(timeout: float | None) -> UpstreamResult:
        await gate.wait()
        result: UpstreamResult = await fetch(timeout)
        return result

    return held


class Harness:
    def __init__(self, cache: TokenCache, clock: Clock, upstream: UpstreamClient) -> None:
        self.cache = cache
        self.clock = clock
        self.upstream = upstream

    async def get(
        self,
        request: pb.CreateTokenRequest | None = None,
        identity: Identity = ALICE,
        *,
        timeout: float | None = 10.0,
        fetch: Fetch | None = None,
    ) -> CacheResult:
        request = request or create_request(audiences=["vault"], expiration_seconds=LIFETIME)
        return await self.cache.get_or_fetch(
            CacheKey.for_request(identity, request),
            fetch or fetcher(self.upstream, request),
            timeout=timeout,
        )


@pytest.fixture
async def make_cache(
    upstream: UpstreamClient,
) -> AsyncIterator[Callable[..., Harness]]:
    caches: list[TokenCache] = []

    def make(jitter: float = 0.0, **settings: Any) -> Harness:
        clock = Clock()
        cache = TokenCache(CacheSettings(**settings), clock=clock, jitter=lambda: jitter)
        caches.append(cache)
        return Harness(cache, clock, upstream)

    yield make
    for cache in caches:
        await cache.close()


def token(result: CacheResult) -> str:
    return result.result.token_request.status.token


# --- single flight --------------------------------------------------------------------------


async def test_concurrent_identical_requests_make_one_upstream_call(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache()
    results = await asyncio.gather(*(h.get() for _ in range(20)))
    assert emulator.token_request_count == 1
    assert len({token(r) for r in results}) == 1
    assert not any(r.hit for r in results)
    assert h.cache.stats.misses == 1
    assert h.cache.stats.coalesced == 19
    assert h.cache.stats.upstream_calls == 1
    assert h.cache.stats.upstream_calls_saved == 19
    # Then from the cache.
    again = await h.get()
    assert again.hit and token(again) == token(results[0])
    assert emulator.token_request_count == 1


async def test_an_upstream_error_reaches_every_waiter_and_is_not_cached(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache()
    emulator.faults.fail_next(1, 403)
    outcomes = await asyncio.gather(*(h.get() for _ in range(5)), return_exceptions=True)
    assert emulator.token_request_count == 1
    assert all(isinstance(o, BrokerError) for o in outcomes)
    assert {o.code for o in outcomes if isinstance(o, BrokerError)} == {
        grpc.StatusCode.PERMISSION_DENIED
    }
    assert len(h.cache) == 0
    result = await h.get()
    assert not result.hit
    assert emulator.token_request_count == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_call(
    make_cache: Callable[..., Harness], emulator: Emulator, upstream: UpstreamClient
) -> None:
    h = make_cache()
    request = create_request(audiences=["vault"], expiration_seconds=LIFETIME)
    gate = asyncio.Event()
    fetch = gated(fetcher(upstream, request), gate)
    first = asyncio.create_task(h.get(request, fetch=fetch))
    second = asyncio.create_task(h.get(request, fetch=fetch))
    while h.cache.stats.coalesced < 1:
        await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert h.cache.in_flight == 1
    gate.set()
    result = await second
    assert not result.hit and token(result)
    assert emulator.token_request_count == 1


async def test_a_waiter_out_of_time_gets_deadline_exceeded_and_the_token_is_still_cached(
    make_cache: Callable[..., Harness], emulator: Emulator, upstream: UpstreamClient
) -> None:
    h = make_cache()
    request = create_request(audiences=["vault"], expiration_seconds=LIFETIME)
    gate = asyncio.Event()
    with pytest.raises(BrokerError) as caught:
        await h.get(request, timeout=0.01, fetch=gated(fetcher(upstream, request), gate))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.reason == Reason.UPSTREAM_TIMEOUT
    # Nobody waits any more; the call goes on and its token is kept for the retry.
    gate.set()
    await h.cache.wait_for_refreshes()
    assert emulator.token_request_count == 1
    retry = await h.get(request)
    assert retry.hit
    assert emulator.token_request_count == 1


async def test_the_shared_call_gets_the_configured_timeout_not_the_first_callers(
    upstream: UpstreamClient, emulator: Emulator
) -> None:
    seen: list[float | None] = []
    request = create_request(audiences=["vault"])

    async def fetch(timeout: float | None) -> UpstreamResult:
        seen.append(timeout)
        return await fetcher(upstream, request)(timeout)

    cache = TokenCache(CacheSettings(), fetch_timeout=7.5)
    try:
        await cache.get_or_fetch(CacheKey.for_request(ALICE, request), fetch, timeout=0.5)
    finally:
        await cache.close()
    assert seen == [7.5]


# --- what is served, for how long -----------------------------------------------------------


@pytest.mark.emulator_config(max_expiration_seconds=3600)
async def test_a_hit_is_the_identical_token_expiration_and_warnings(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache()
    request = create_request(audiences=["vault"], expiration_seconds=7200)
    first = await h.get(request)
    assert first.result.warnings == (
        "requested expiration of 7200 seconds shortened to 3600 seconds",
    )
    h.clock.advance(60)
    second = await h.get(request)
    assert second.hit and not first.hit and not second.stale
    assert second.result.token_request == first.result.token_request
    assert token(second) == token(first)
    assert (
        second.result.token_request.status.expiration_timestamp
        == first.result.token_request.status.expiration_timestamp
    )
    assert second.result.warnings == first.result.warnings
    assert emulator.token_request_count == 1
    # Answers are copies: a caller changing one does not change the cache.
    second.result.token_request.status.token = "scribbled"
    assert token(await h.get(request)) == token(first)


@pytest.mark.parametrize("jitter", [0.0, 7.0])
async def test_served_until_80_percent_of_the_lifetime_minus_jitter_then_refreshed(
    make_cache: Callable[..., Harness], emulator: Emulator, jitter: float
) -> None:
    h = make_cache(jitter=jitter)
    first = await h.get()
    h.clock.advance(REFRESH_POINT - jitter - 1)
    before = await h.get()
    assert before.hit and token(before) == token(first)
    assert emulator.token_request_count == 1
    h.clock.advance(2)
    after = await h.get()
    assert not after.hit
    assert token(after) != token(first)
    assert emulator.token_request_count == 2
    assert h.cache.stats.refreshes == 1
    # The new token is now the cached one.
    assert token(await h.get()) == token(after)
    assert emulator.token_request_count == 2


async def test_refreshed_once_max_age_is_reached_whatever_the_lifetime(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache(max_age_seconds=600)
    await h.get()
    h.clock.advance(599)
    assert (await h.get()).hit
    h.clock.advance(2)
    assert not (await h.get()).hit
    assert emulator.token_request_count == 2


async def test_lifetime_is_read_from_the_token(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache()
    request = create_request(audiences=["vault"], expiration_seconds=1200)
    result = await h.get(request)
    tr = result.result.token_request
    assert token_lifetime(tr) == 1200
    payload = tr.status.token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert tr.status.expiration_timestamp.seconds - claims["iat"] == 1200
    entry = h.cache.peek(CacheKey.for_request(ALICE, request))
    assert entry is not None
    assert entry.refresh_at == pytest.approx(h.clock.now + 960)
    assert entry.expires_at == pytest.approx(h.clock.now + 1200)


async def test_an_expired_entry_is_a_miss_and_the_sweep_drops_only_expired_ones(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache()
    await h.get(create_request(audiences=["vault"], expiration_seconds=600))
    await h.get(create_request(audiences=["vault"], expiration_seconds=LIFETIME))
    assert len(h.cache) == 2
    h.clock.advance(601)
    h.cache.run_maintenance()
    assert len(h.cache) == 1
    assert h.cache.stats.expirations == 1
    assert h.cache.stats.size == 1
    h.clock.advance(LIFETIME)
    # Lazily, on lookup.
    assert not (await h.get()).hit
    assert h.cache.stats.expirations == 2
    assert emulator.token_request_count == 3


# --- keys -----------------------------------------------------------------------------------


def _variants() -> dict[str, tuple[Identity, pb.CreateTokenRequest]]:
    base: dict[str, Any] = {"audiences": ["vault"], "expiration_seconds": LIFETIME}
    return {
        "base": (ALICE, create_request(**base)),
        "other caller": (BOB, create_request(**base)),
        "other method": (Identity(method="unixSocket", name="alice"), create_request(**base)),
        "other issuer": (
            Identity(method="jwt", name="alice", issuer="https://idp.example"),
            create_request(**base),
        ),
        "other audiences": (ALICE, create_request(audiences=["sts"], expiration_seconds=LIFETIME)),
        "audience order": (
            ALICE,
            create_request(audiences=["sts", "vault"], expiration_seconds=LIFETIME),
        ),
        "audience order reversed": (
            ALICE,
            create_request(audiences=["vault", "sts"], expiration_seconds=LIFETIME),
        ),
        "other expiration": (ALICE, create_request(audiences=["vault"], expiration_seconds=1800)),
        "server default expiration": (ALICE, create_request(audiences=["vault"])),
        "bound to a pod": (
            ALICE,
            create_request(**base, bound=pb.BoundObjectReference(kind="Pod", name=POD)),
        ),
        "bound to a secret": (
            ALICE,
            create_request(**base, bound=pb.BoundObjectReference(kind="Secret", name=SECRET)),
        ),
        "bound to a pod, apiVersion": (
            ALICE,
            create_request(
                **base, bound=pb.BoundObjectReference(kind="Pod", api_version="v1", name=POD)
            ),
        ),
    }


async def test_different_callers_and_token_shapes_never_share(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache()
    variants = _variants()
    first = {name: await h.get(req, ident) for name, (ident, req) in variants.items()}
    assert emulator.token_request_count == len(variants)
    assert not any(r.hit for r in first.values())
    assert len({token(r) for r in first.values()}) == len(variants)
    # Each is then served its own token.
    for name, (ident, req) in variants.items():
        again = await h.get(req, ident)
        assert again.hit and token(again) == token(first[name]), name
    assert emulator.token_request_count == len(variants)


def test_keys_hold_the_whole_bound_object_reference_and_the_audience_order() -> None:
    def key(**kwargs: Any) -> CacheKey:
        return CacheKey.for_request(ALICE, create_request(**kwargs))

    ref = {"kind": "Pod", "api_version": "v1", "name": POD, "uid": "u1"}
    base = key(bound=pb.BoundObjectReference(**ref))
    assert base == key(bound=pb.BoundObjectReference(**ref))
    for field, value in (("kind", "Secret"), ("api_version", ""), ("name", "x"), ("uid", "u2")):
        assert key(bound=pb.BoundObjectReference(**{**ref, field: value})) != base, field
    assert key() != key(bound=pb.BoundObjectReference())
    assert key(audiences=["a", "b"]) != key(audiences=["b", "a"])
    assert key(expiration_seconds=3600) != key()
    # Identity claims are not part of it (policy, run on every call, reads them).
    with_claims = Identity(method="jwt", name="a", issuer="i", claims={"x": "1"})
    assert CacheKey.for_request(with_claims, create_request()) == CacheKey.for_request(
        Identity(method="jwt", name="a", issuer="i"), create_request()
    )


# --- never cached ---------------------------------------------------------------------------


async def test_dry_run_and_rules_without_caching_bypass_the_cache(
    make_cache: Callable[..., Harness],
) -> None:
    h = make_cache()
    allowed = Decision(allowed=True, reason=ALLOWED, message="", rule="r", cacheable=True)
    request = create_request(audiences=["vault"])
    dry_run = create_request(audiences=["vault"], dry_run=["All"])
    assert h.cache.cacheable(allowed, request)
    assert not h.cache.cacheable(allowed, dry_run)
    with pytest.raises(ValueError, match="dry-run"):
        CacheKey.for_request(ALICE, dry_run)
    no_cache = Decision(allowed=True, reason=ALLOWED, message="", rule="r", cacheable=False)
    assert not h.cache.cacheable(no_cache, request)
    denied = Decision(allowed=False, reason=Reason.NO_MATCHING_RULE, message="", cacheable=True)
    assert not h.cache.cacheable(denied, request)
    disabled = TokenCache(CacheSettings(enabled=False))
    assert not disabled.cacheable(allowed, request)


async def test_a_disabled_cache_passes_every_call_through(
    upstream: UpstreamClient, emulator: Emulator
) -> None:
    cache = TokenCache(CacheSettings(enabled=False))
    request = create_request(audiences=["vault"])
    key = CacheKey.for_request(ALICE, request)
    results = [await cache.get_or_fetch(key, fetcher(upstream, request), timeout=10) for _ in "ab"]
    assert emulator.token_request_count == 2
    assert not any(r.hit for r in results)
    assert cache.stats.bypassed == 2 and len(cache) == 0


# --- bounds ---------------------------------------------------------------------------------


async def test_evicts_the_least_recently_used_entry_at_max_entries(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache(max_entries=2)
    a, b, c = (
        create_request(audiences=[aud], expiration_seconds=LIFETIME) for aud in ("a", "b", "c")
    )
    await h.get(a)
    await h.get(b)
    assert (await h.get(a)).hit  # a is now the most recent: b goes first
    await h.get(c)
    assert h.cache.stats.evictions == 1
    assert len(h.cache) == 2 and h.cache.stats.size == 2
    assert h.cache.peek(CacheKey.for_request(ALICE, b)) is None
    assert (await h.get(a)).hit
    assert (await h.get(c)).hit
    assert emulator.token_request_count == 3
    assert not (await h.get(b)).hit  # and that evicts a (c was used more recently)
    assert h.cache.peek(CacheKey.for_request(ALICE, a)) is None
    assert emulator.token_request_count == 4


# --- failed refreshes -----------------------------------------------------------------------


@pytest.mark.retry(max_attempts=1)
async def test_a_failed_refresh_serves_the_still_valid_token(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache()
    first = await h.get()
    h.clock.advance(REFRESH_POINT + 1)
    emulator.faults.fail_next(1, 503)
    stale = await h.get()
    assert stale.hit and stale.stale
    assert token(stale) == token(first)
    assert emulator.token_request_count == 2
    # No new attempt for a while: served at once.
    h.clock.advance(REFRESH_RETRY_SECONDS - 1)
    assert (await h.get()).stale
    assert emulator.token_request_count == 2
    assert h.cache.stats.stale_served == 2
    assert h.cache.stats.refresh_failures == 1
    # Then the next request refreshes.
    h.clock.advance(2)
    fresh = await h.get()
    assert not fresh.hit and not fresh.stale and token(fresh) != token(first)
    assert emulator.token_request_count == 3


@pytest.mark.retry(max_attempts=1)
async def test_a_failed_refresh_is_surfaced_without_serve_stale_on_error(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache(serve_stale_on_error=False)
    await h.get()
    h.clock.advance(REFRESH_POINT + 1)
    emulator.faults.fail_next(1, 503)
    with pytest.raises(BrokerError) as caught:
        await h.get()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert h.cache.stats.stale_served == 0
    # The next request tries again at once.
    assert not (await h.get()).hit
    assert emulator.token_request_count == 3


async def test_a_definitive_refusal_drops_the_entry_even_with_serve_stale_on_error(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache()
    await h.get()
    h.clock.advance(REFRESH_POINT + 1)
    emulator.faults.fail_next(1, 403)
    with pytest.raises(BrokerError) as caught:
        await h.get()
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert len(h.cache) == 0


@pytest.mark.retry(max_attempts=1)
async def test_an_expired_token_is_never_served_stale(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache()
    await h.get()
    h.clock.advance(LIFETIME)
    emulator.faults.fail_next(1, 503)
    with pytest.raises(BrokerError):
        await h.get()


# --- refresh-ahead --------------------------------------------------------------------------


async def test_refresh_ahead_refreshes_hot_keys_in_the_background(
    make_cache: Callable[..., Harness], emulator: Emulator
) -> None:
    h = make_cache(refresh_ahead=True)
    hot = create_request(audiences=["vault"], expiration_seconds=LIFETIME)
    cold = create_request(audiences=["sts"], expiration_seconds=LIFETIME)
    first = await h.get(hot)
    await h.get(cold)
    h.clock.advance(REFRESH_POINT - 100)  # within the refresh window: hot asked again
    assert (await h.get(hot)).hit
    h.clock.advance(101)
    h.cache.run_maintenance()
    await h.cache.wait_for_refreshes()
    assert emulator.token_request_count == 3  # the hot key only
    assert h.cache.stats.refreshes == 1
    refreshed = await h.get(hot)
    assert refreshed.hit and token(refreshed) != token(first)
    assert emulator.token_request_count == 3
    # The cold key is refreshed by its next request, which waits for it.
    assert not (await h.get(cold)).hit
    assert emulator.token_request_count == 4


async def test_refresh_ahead_answers_from_the_cache_while_a_refresh_runs(
    make_cache: Callable[..., Harness], emulator: Emulator, upstream: UpstreamClient
) -> None:
    h = make_cache(refresh_ahead=True)
    request = create_request(audiences=["vault"], expiration_seconds=LIFETIME)
    first = await h.get(request)
    h.clock.advance(REFRESH_POINT - 100)
    await h.get(request)
    h.clock.advance(101)
    gate = asyncio.Event()
    fetch = gated(fetcher(upstream, request), gate)
    # Due, hot, nothing running: answered from the cache, a background refresh started.
    during = [await h.get(request, fetch=fetch) for _ in range(3)]
    assert all(r.hit and token(r) == token(first) for r in during)
    assert h.cache.in_flight == 1
    gate.set()
    await h.cache.wait_for_refreshes()
    assert emulator.token_request_count == 2
    assert token(await h.get(request)) != token(first)


async def test_maintenance_task_starts_and_close_cancels_it(
    make_cache: Callable[..., Harness], upstream: UpstreamClient
) -> None:
    h = make_cache(refresh_ahead=True)
    request = create_request(audiences=["vault"], expiration_seconds=LIFETIME)
    await h.get(request)
    h.cache.start()
    gate = asyncio.Event()
    pending = asyncio.create_task(
        h.get(create_request(audiences=["sts"]), fetch=gated(fetcher(upstream, request), gate))
    )
    while h.cache.in_flight < 1:
        await asyncio.sleep(0)
    await h.cache.close()
    with pytest.raises(BrokerError) as caught:
        await pending
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(h.cache) == 0 and h.cache.in_flight == 0
    # Closed: straight through.
    assert not (await h.get(request)).hit
    assert h.cache.stats.bypassed == 1


# --- secrets, stats, settings ---------------------------------------------------------------


async def test_reprs_never_show_the_token(make_cache: Callable[..., Harness]) -> None:
    h = make_cache()
    request = create_request(audiences=["vault"], expiration_seconds=LIFETIME)
    result = await h.get(request)
    secret = token(result)
    key = CacheKey.for_request(ALICE, request)
    entry = h.cache.peek(key)
    for text in (repr(entry), str(entry), repr(result), repr(key), repr(h.cache)):
        assert secret not in text
        assert secret.split(".")[2] not in text
    assert "<redacted>" in repr(entry)


def test_stats_saved_calls() -> None:
    stats = CacheStats(hits=5, coalesced=3, misses=2)
    assert stats.upstream_calls_saved == 8


def test_cache_settings_camel_case_defaults_and_validation() -> None:
    defaults = load_settings(None, {}).cache
    assert defaults == CacheSettings(
        enabled=True,
        max_entries=10000,
        refresh_ahead=False,
        serve_stale_on_error=True,
        max_age_seconds=86400,
    )
    settings = load_settings(
        None,
        {"cache": {"maxEntries": 5, "refreshAhead": True, "serveStaleOnError": False}},
    ).cache
    assert (settings.max_entries, settings.refresh_ahead, settings.serve_stale_on_error) == (
        5,
        True,
        False,
    )
    for bad in ({"maxEntries": 0}, {"maxAgeSeconds": 0}, {"maxAgeSeconds": 90000}, {"ttl": 1}):
        with pytest.raises(ConfigError, match="cache"):
            load_settings(None, {"cache": bad})


def test_cache_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_BROKER_CACHE__MAX_ENTRIES", "42")
    monkeypatch.setenv("TOKEN_BROKER_CACHE__REFRESH_AHEAD", "true")
    cache = load_settings(None, {}).cache
    assert cache.max_entries == 42 and cache.refresh_ahead


def test_key_is_built_from_the_effective_request() -> None:
    request = create_request(
        NAMESPACE, SERVICE_ACCOUNT, bound=pb.BoundObjectReference(kind="Pod", name=POD, uid="u")
    )
    decision = Decision(
        allowed=True,
        reason=ALLOWED,
        message="",
        rule="r",
        audiences=("vault",),
        expiration_seconds=600,
        cacheable=True,
    )
    key = CacheKey.for_request(ALICE, decision.effective_request(request))
    assert key == CacheKey(
        auth_method="apiKey",
        caller="alice",
        issuer=None,
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        audiences=("vault",),
        expiration_seconds=600,
        bound_object=("Pod", "", POD, "u"),
    )


# --- through the broker ---------------------------------------------------------------------


async def test_broker_single_flight_and_policy_on_every_hit(
    kubernetes_settings: KubernetesSettings, emulator: Emulator, tmp_path: Path
) -> None:
    """The real path with the cache on: concurrent identical calls make one API call; other
    callers never share it; the policy still decides every request, hit or miss."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(CORE_POLICY.read_text())
    audit = tmp_path / "audit.jsonl"
    settings = broker_settings(kubernetes_settings, policy=policy, cache={"enabled": True})
    settings = settings.model_copy(update={"audit": AuditSettings(sink="file", file=audit)})
    emulator.faults.latency = 0.2  # the calls overlap on the one upstream call
    async with BrokerServer(settings) as server:
        async with aio.insecure_channel(
            server.address, interceptors=[BearerCredential(CALLER_KEY)]
        ) as channel:
            stub = pb_grpc.TokenBrokerServiceStub(channel)
            responses = await asyncio.gather(
                *(stub.CreateToken(create_request(), timeout=20) for _ in range(50))
            )
            assert emulator.token_request_count == 1
            tokens = {r.token_request.status.token for r in responses}
            assert len(tokens) == 1
            expirations = {r.token_request.status.expiration_timestamp.seconds for r in responses}
            assert len(expirations) == 1
            emulator.faults.latency = 0.0
            hit = await stub.CreateToken(create_request(), timeout=10)
            assert hit.token_request.status.token in tokens
            # Another audience is another token.
            await stub.CreateToken(create_request(audiences=["sts.example.com"]), timeout=10)
            assert emulator.token_request_count == 2
            # The policy changes: the cached grant is not served any more.
            policy.write_text("rules: []\n")
            assert await server.policy.reload()  # type: ignore[union-attr]
            status = await call_error(stub, create_request())
            assert status.code == grpc.StatusCode.PERMISSION_DENIED
        assert emulator.token_request_count == 2
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(lines) == 53
    # The 50 shared the one API call (its status, one jti); the later hit made none. On a
    # busy machine a call of the 50 can start after the API call ended: a hit too.
    statuses = [line["upstreamStatus"] for line in lines[:51]]
    assert set(statuses[:50]) <= {201, None} and 201 in statuses[:50]
    assert statuses[50] is None
    assert {line["jti"] for line in lines[:51]} == {lines[0]["jti"]}
    assert [line["reason"] for line in lines[51:]] == [ALLOWED, Reason.NO_MATCHING_RULE]


async def test_broker_callers_never_share_a_cached_token(
    kubernetes_settings: KubernetesSettings, emulator: Emulator, tmp_path: Path
) -> None:
    sock = tmp_path / "b.sock"
    settings = broker_settings(kubernetes_settings, cache={"enabled": True}, unix_socket=sock)
    async with (
        BrokerServer(settings) as server,
        aio.insecure_channel(server.address, interceptors=[BearerCredential(CALLER_KEY)]) as tcp,
        aio.insecure_channel(f"unix:{sock}") as local,
    ):
        by_key = pb_grpc.TokenBrokerServiceStub(tcp)
        by_socket = pb_grpc.TokenBrokerServiceStub(local)
        first = await by_key.CreateToken(create_request(), timeout=10)
        second = await by_socket.CreateToken(create_request(), timeout=10)
        again = await by_key.CreateToken(create_request(), timeout=10)
    assert emulator.token_request_count == 2
    assert first.token_request.status.token != second.token_request.status.token
    assert again.token_request.status.token == first.token_request.status.token
