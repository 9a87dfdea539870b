"""Rate limits on CreateToken: per caller identity, per target service account, and global.

Each scope has a rate (requests per second, sustained) and a burst (requests at once),
enforced with GCRA, the generic cell rate algorithm: a token bucket kept as one number per
bucket, its "theoretical arrival time" (TAT). A request is admitted when
`max(TAT, now) + 1/rate - now <= burst/rate`, which then becomes the new TAT; otherwise it
may retry after the excess. A TAT in the past is a full bucket, exactly like a bucket never
seen, so idle buckets are simply dropped.

All scopes that apply to a request are checked first and charged only if every one admits
it: a refusal in one scope never consumes another's allowance. The refusal is
RESOURCE_EXHAUSTED, ErrorInfo reason RATE_LIMITED (metadata `scope`), RetryInfo and the
`grpc-retry-pushback-ms` trailer (when the refusing bucket has room again) and a
QuotaFailure violation per refusing scope (subject `caller`, `serviceaccount:<ns>/<name>` or
`global`: never the caller's name or a credential).

A policy rule's `rateLimit` (Decision.rate_limit) replaces perCaller / perServiceAccount for
the requests it decides, in buckets of that rule's own; the global limit always applies.

Backends (`rateLimit.backend`):

- memory: per process. An OrderedDict of TATs with a second-chance sweep: every check looks
  at the oldest few buckets, drops the idle ones and moves live ones to the back, so memory
  follows the buckets active in the last window, not every caller ever seen, with no
  background task and no O(n) pause.
- redis: shared by all replicas. One Lua script checks and charges every scope of a request
  atomically, timed by the Redis server's own clock (`TIME`: replicas' clocks do not matter),
  and sets each key to expire when its bucket is full again (`PX`). When Redis cannot be
  reached (`timeoutSeconds`), calls are limited per process (`onRedisUnavailable: local`,
  the default: each replica then allows the whole limit on its own) or refused with
  UNAVAILABLE + RetryInfo, reason RATE_LIMIT_UNAVAILABLE (`refuse`); the transition is logged
  once (warning) and so is the recovery (info). While it is down Redis is tried again every
  `retryIntervalSeconds` by one call, not by every call. The password is read from
  `passwordFile` for each new connection and never logged or repr'd. The client library
  (redis-py) is the `redis` extra, imported only for this backend.

Why not the `limits` library (5.8.0, async memory + Redis storage), which the issue
preferred if it fits: measured against our requirements (bench/ratelimit_eval.py; 100k keys,
10/s with a burst of 20, which `limits` can only express as a window: "20 per 2 seconds"):

- Semantics: no GCRA or token bucket; fixed, moving and sliding windows only, in whole
  seconds (10/s burst 25 would be "25 per 2.5 s": not expressible). After a burst the moving
  window admits nothing until the window has passed (retry after 2 s where GCRA says 0.1 s).
- Memory per key: moving window 464 B after one hit, 3,208 B with a full burst (an entry per
  admitted request); sliding-window counter 312 B. GCRA here: 263 B (key, float, OrderedDict
  links). In Redis (MEMORY USAGE): 554 B for a 20-entry moving window, 104 B for GCRA.
- Idle eviction: a background task sweeps every key, with an asyncio.to_thread hop per key
  (9 s per pass at 100k keys); the idle keys of a 1 s window were gone 17-31 s later.
- Clock: `time.time()` hard-coded in storages and strategies: no injectable clock (tests
  would sleep), wall-clock steps move the limits, and in Redis each replica's own clock
  timestamps the window.
- Several scopes: no atomic check-and-charge across keys (test-then-hit races between
  replicas; a hit in one scope stays charged when the next scope refuses).
- Speed is not a reason: 6-10 us per check either way.

So the limiter is hand-written (this module), and `limits` is not a dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from google.rpc import error_details_pb2

from broker.config import ConfigError, RateLimitSettings, RateSettings, RedisSettings
from broker.config import split_host_port as _split_host_port
from broker.errors import BrokerError
from broker.identity import Identity
from broker.policy_schema import RuleRateLimit
from broker.reasons import Reason

logger = logging.getLogger(__name__)

Scope = Literal["caller", "serviceaccount", "global"]
SCOPES: tuple[Scope, ...] = ("caller", "serviceaccount", "global")

# Buckets the memory backend's sweep looks at per check (each check adds at most 3).
SWEEP_STEPS = 4
# Float slack when comparing times (seconds).
_EPSILON = 1e-9
# Key namespace of the rate limits under rateLimit.redis.keyPrefix.
REDIS_KEY_SPACE = "rl:"


@dataclass(frozen=True)
class Limit:
    """`rate` requests per second sustained, `burst` at once."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)) or self.burst < 1:
            raise ValueError(f"invalid limit: rate {self.rate}, burst {self.burst}")

    @classmethod
    def of(cls, settings: RateSettings | None) -> Limit | None:
        return None if settings is None else cls(rate=settings.rate, burst=settings.burst)

    @property
    def interval(self) -> float:
        """Seconds one request adds to the bucket's TAT (the emission interval)."""
        return 1.0 / self.rate

    @property
    def tolerance(self) -> float:
        """How far ahead of now the TAT may be: a full burst."""
        return self.burst / self.rate

    def __str__(self) -> str:
        return f"{self.rate:g}/s, burst {self.burst}"


@dataclass(frozen=True)
class Bucket:
    """One scope's bucket for one request."""

    scope: Scope
    # Storage key (the Redis backend prefixes it). Caller keys are hashes.
    key: str
    # QuotaFailure.Violation.subject: the scope and a non-secret description.
    subject: str
    # Names the bucket in the refusal message.
    description: str
    limit: Limit


@dataclass(frozen=True)
class Refusal:
    bucket: Bucket
    # Seconds until the bucket has room for this request.
    retry_after: float


class RateLimitObserver(Protocol):
    """Told about every refusal (broker.metrics.BrokerMetrics is one)."""

    def rate_limit_refused(self, scope: str) -> None: ...


@dataclass
class RateLimitStats:
    """Counters for metrics and tests."""

    # Calls refused, by the scope named in the refusal (the one with the longest wait).
    refusals: Counter[str] = field(default_factory=Counter)
    # Calls limited locally because Redis was unavailable (onRedisUnavailable: local).
    local_checks: int = 0
    # Calls refused because Redis was unavailable (onRedisUnavailable: refuse).
    unavailable_refusals: int = 0
    # Redis calls that failed (connection, timeout, error reply).
    redis_failures: int = 0


# --- memory backend ---------------------------------------------------------------------


class MemoryBuckets:
    """GCRA state in this process: one TAT (a float) per bucket, idle buckets dropped.

    Not thread-safe; atomic on the event loop (no await between checking and charging).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Least recently charged (or swept) first.
        self._tat: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tat)

    def acquire(self, buckets: Sequence[Bucket]) -> list[Refusal]:
        """Charge every bucket one request, or none: the refusals (empty: admitted)."""
        now = self._clock()
        self._sweep(now)
        charges: list[tuple[str, float]] = []
        refusals: list[Refusal] = []
        for bucket in buckets:
            tat = max(self._tat.get(bucket.key, now), now)
            new_tat = tat + bucket.limit.interval
            wait = new_tat - bucket.limit.tolerance - now
            if wait > _EPSILON:
                refusals.append(Refusal(bucket, wait))
            else:
                charges.append((bucket.key, new_tat))
        if refusals:
            return refusals
        for key, new_tat in charges:
            self._tat[key] = new_tat
            self._tat.move_to_end(key)
        return []

    def backlog(self, key: str) -> float:
        """Seconds until the bucket `key` is full again (0: full, or never charged)."""
        now = self._clock()
        self._sweep(now)
        return max(self._tat.get(key, now) - now, 0.0)

    def wait(self, key: str, limit: Limit) -> float:
        """Seconds until `key` has room for one more request (<= 0: room now); charges
        nothing."""
        return self.backlog(key) + limit.interval - limit.tolerance

    def charge(self, key: str, limit: Limit) -> None:
        """Charge one request to `key`, room or not (one that was not refused beforehand,
        such as a failure counted after it happened)."""
        now = self._clock()
        self._sweep(now)
        self._tat[key] = max(self._tat.get(key, now), now) + limit.interval
        self._tat.move_to_end(key)

    def _sweep(self, now: float) -> None:
        """Second chance: drop the oldest buckets if idle (TAT past), else move them back."""
        for _ in range(min(SWEEP_STEPS, len(self._tat))):
            key, tat = self._tat.popitem(last=False)
            if tat > now:
                self._tat[key] = tat


# --- redis backend ----------------------------------------------------------------------

# GCRA over all of a request's buckets at once: all admit and are charged, or none is.
# KEYS: the buckets. ARGV: per bucket its interval and tolerance, in microseconds.
# Returns {1} when admitted, else {0, wait_1, ..., wait_n} (microseconds; 0: had room).
# The clock is the server's (TIME); each key expires when its bucket is full again.
GCRA_LUA = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
local waits = {0}
local refused = false
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval
  local wait = new_tat - tolerance - now
  if wait > 0.5 then
    refused = true
    waits[i + 1] = math.ceil(wait)
  else
    waits[i + 1] = 0
  end
  tats[i] = new_tat
end
if refused then return waits end
for i, key in ipairs(KEYS) do
  local ttl = math.max(1, math.ceil((tats[i] - now) / 1000))
  redis.call('SET', key, string.format('%.17g', tats[i]), 'PX', ttl)
end
return {1}
"""


def import_redis() -> Any:
    """redis-py's asyncio client: the `redis` extra, needed only by the Redis backend, so a
    broker without it installed starts unless `rateLimit.backend` is `redis`."""
    try:
        return importlib.import_module("redis.asyncio")
    except ImportError:
        raise ConfigError(
            "rateLimit.backend: redis needs the Redis client library (redis-py), which is not "
            "installed: install the broker with its redis extra, "
            "pip install 'token-broker[redis]'"
        ) from None


class PasswordFile:
    """The Redis password, read from its file for each new connection (so a rotated
    Secret is picked up). Never logged; the repr names only the file. A redis-py
    CredentialProvider by its methods (redis is imported only for the Redis backend)."""

    def __init__(self, path: Path, username: str | None = None) -> None:
        self._path = path
        self._username = username

    def __repr__(self) -> str:
        return f"PasswordFile({str(self._path)!r})"

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._path.read_text(encoding="utf-8").rstrip("\r\n")
        if self._username is not None:
            return (self._username, password)
        return (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return await asyncio.to_thread(self.get_credentials)


class RedisBuckets:
    """GCRA state in Redis, shared by every broker using the same Redis and key prefix."""

    def __init__(self, client: Any, *, key_prefix: str, timeout: float, address: str) -> None:
        from redis.exceptions import RedisError

        # What a Redis call raises when Redis cannot answer (TimeoutError is an OSError).
        self.failures: tuple[type[BaseException], ...] = (RedisError, OSError)
        self._client = client
        self._script = client.register_script(GCRA_LUA)
        self._prefix = key_prefix + REDIS_KEY_SPACE
        self._timeout = timeout
        self.address = address

    def __repr__(self) -> str:
        return f"RedisBuckets(address={self.address!r}, prefix={self._prefix!r})"

    @classmethod
    def from_settings(cls, settings: RedisSettings) -> RedisBuckets:
        """A client for `rateLimit.redis` (no connection is made until the first check).
        Raises ConfigError when the `redis` extra is not installed."""
        aioredis = import_redis()
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        host, port = _split_host_port(settings.address, "rateLimit.redis.address")
        for key, path in (
            ("passwordFile", settings.password_file),
            ("tls.caFile", settings.tls.ca_file),
            ("tls.certFile", settings.tls.cert_file),
            ("tls.keyFile", settings.tls.key_file),
        ):
            if path is not None and not path.is_file():
                raise ConfigError(f"rateLimit.redis.{key}: no such file: {path}")
        kwargs: dict[str, Any] = {}
        if settings.password_file is not None:
            kwargs["credential_provider"] = PasswordFile(settings.password_file, settings.username)
        if settings.tls.enabled:
            kwargs.update(
                ssl=True,
                ssl_cert_reqs="required",
                # The library's default today; explicit so that it cannot change under us.
                ssl_check_hostname=True,
                ssl_ca_certs=_str_or_none(settings.tls.ca_file),
                ssl_certfile=_str_or_none(settings.tls.cert_file),
                ssl_keyfile=_str_or_none(settings.tls.key_file),
            )
        client = aioredis.Redis(
            host=host.strip("[]"),
            port=port,
            socket_timeout=settings.timeout_seconds,
            socket_connect_timeout=settings.timeout_seconds,
            # Our own fallback and retry interval; the library's retries would multiply the
            # timeout of every call while Redis is down.
            retry=Retry(NoBackoff(), 0),
            **kwargs,
        )
        return cls(
            client,
            key_prefix=settings.key_prefix,
            timeout=settings.timeout_seconds,
            address=settings.address,
        )

    def redis_key(self, bucket: Bucket) -> str:
        return self._prefix + bucket.key

    async def acquire(self, buckets: Sequence[Bucket]) -> list[Refusal]:
        """Like MemoryBuckets.acquire, in one script call. Raises RedisError or OSError
        (TimeoutError included) when Redis cannot answer in time."""
        args: list[str] = []
        for bucket in buckets:
            args += [repr(bucket.limit.interval * 1e6), repr(bucket.limit.tolerance * 1e6)]
        # The socket timeouts bound each step; this bounds connect + AUTH + script together.
        async with asyncio.timeout(self._timeout * 2):
            reply = await self._script(keys=[self.redis_key(b) for b in buckets], args=args)
        if int(reply[0]) == 1:
            return []
        return [
            Refusal(bucket, int(wait) / 1e6)
            for bucket, wait in zip(buckets, reply[1:], strict=True)
            if int(wait) > 0
        ]

    async def drop_idle_connections(self) -> None:
        """After a failure: pooled connections may be to a Redis that is gone (restarted);
        drop them so that the next try connects afresh."""
        with contextlib.suppress(*self.failures):
            async with asyncio.timeout(self._timeout):
                await self._client.connection_pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        await self._client.aclose()


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


# --- the limiter --------------------------------------------------------------------------


class RateLimiter:
    """The rate limits of `rateLimit` settings; `check` admits a call or raises BrokerError."""

    def __init__(
        self,
        settings: RateLimitSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        redis: RedisBuckets | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._per_caller = Limit.of(settings.per_caller)
        self._per_service_account = Limit.of(settings.per_service_account)
        self._global = Limit.of(settings.global_limit)
        # The memory backend, and the fallback while Redis is unavailable.
        self._local = MemoryBuckets(clock)
        self._redis = redis
        self._retry_interval = settings.redis.retry_interval_seconds
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._probing = False
        self._observers: list[RateLimitObserver] = []
        self.stats = RateLimitStats()

    @classmethod
    def from_settings(
        cls, settings: RateLimitSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> RateLimiter:
        redis = None
        if settings.enabled and settings.backend == "redis":
            redis = RedisBuckets.from_settings(settings.redis)
        return cls(settings, clock=clock, redis=redis)

    def __repr__(self) -> str:
        backend = "disabled" if not self._settings.enabled else self._settings.backend
        where = f", redis={self._redis.address!r}" if self._redis is not None else ""
        return f"RateLimiter(backend={backend!r}{where})"

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()

    def add_observer(self, observer: RateLimitObserver) -> None:
        self._observers.append(observer)

    def size(self) -> int:
        """Buckets held in this process's memory (the memory backend, or the fallback)."""
        return len(self._local)

    @property
    def redis_available(self) -> bool | None:
        """None without Redis; False from a failed Redis call until one succeeds."""
        return None if self._redis is None else self._down_since is None

    def buckets(
        self,
        identity: Identity,
        namespace: str,
        service_account: str,
        *,
        rule: str | None = None,
        override: RuleRateLimit | None = None,
    ) -> list[Bucket]:
        """The buckets a request is charged to. A rule's override has buckets of its own."""
        out: list[Bucket] = []
        caller = self._per_caller
        caller_tag = ""
        if override is not None and override.overrides("per_caller"):
            caller = Limit.of(override.per_caller)
            caller_tag = rule or "rule"
        if caller is not None:
            digest = hashlib.blake2b(
                f"{caller_tag}\0{identity}".encode(), digest_size=16
            ).hexdigest()
            out.append(Bucket("caller", f"caller:{digest}", "caller", "this caller", caller))
        target = f"{namespace}/{service_account}"
        per_sa = self._per_service_account
        sa_key = f"sa:{target}"
        if override is not None and override.overrides("per_service_account"):
            per_sa = Limit.of(override.per_service_account)
            sa_key = f"sa:{rule or 'rule'}:{target}"
        if per_sa is not None:
            out.append(
                Bucket(
                    "serviceaccount",
                    sa_key,
                    f"serviceaccount:{target}",
                    f"service account {target}",
                    per_sa,
                )
            )
        if self._global is not None:
            out.append(
                Bucket(
                    "global", "global", "global", "this token broker (all callers)", self._global
                )
            )
        return out

    async def check(
        self,
        identity: Identity,
        namespace: str,
        service_account: str,
        *,
        rule: str | None = None,
        override: RuleRateLimit | None = None,
    ) -> None:
        """Admit the call (charging every scope) or raise BrokerError: RESOURCE_EXHAUSTED
        (RATE_LIMITED), or UNAVAILABLE when Redis is down and `onRedisUnavailable: refuse`.

        `rule` and `override`: the deciding rule and its `rateLimit` (Decision.rule,
        Decision.rate_limit).
        """
        if not self._settings.enabled:
            return
        await self.check_buckets(
            self.buckets(identity, namespace, service_account, rule=rule, override=override)
        )

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    async def check_buckets(self, buckets: Sequence[Bucket]) -> None:
        """`check` with the buckets `buckets()` gave for the call (the request path keeps
        them per distinct call: broker.decision_memo)."""
        if not buckets:
            return
        refusals = await self._acquire(buckets)
        if refusals:
            raise self._refused(refusals)

    async def _acquire(self, buckets: Sequence[Bucket]) -> list[Refusal]:
        if self._redis is None:
            return self._local.acquire(buckets)
        probe = False
        if self._down_since is not None:
            if self._probing or self._clock() < self._next_probe:
                return self._while_down(buckets)
            self._probing = probe = True
        try:
            refusals = await self._redis.acquire(buckets)
        except self._redis.failures as exc:
            self._redis_failed(exc)
            await self._redis.drop_idle_connections()
            return self._while_down(buckets)
        finally:
            if probe:
                self._probing = False
        if self._down_since is not None:
            logger.info(
                "rate limits: Redis at %s is available again after %.1fs; limits are shared "
                "across replicas again",
                self._redis.address,
                self._clock() - self._down_since,
            )
            self._down_since = None
        return refusals

    def _redis_failed(self, exc: BaseException) -> None:
        assert self._redis is not None
        self.stats.redis_failures += 1
        now = self._clock()
        self._next_probe = now + self._retry_interval
        if self._down_since is not None:
            return
        self._down_since = now
        what = str(exc)[:200]
        fallback = (
            "refusing calls (onRedisUnavailable: refuse)"
            if self._settings.on_redis_unavailable == "refuse"
            else "limiting calls per process (onRedisUnavailable: local)"
        )
        logger.warning(
            "rate limits: Redis at %s is unavailable (%s%s); %s until it recovers, trying it "
            "again every %gs",
            self._redis.address,
            type(exc).__name__,
            f": {what}" if what else "",
            fallback,
            self._retry_interval,
        )

    def _while_down(self, buckets: Sequence[Bucket]) -> list[Refusal]:
        if self._settings.on_redis_unavailable == "refuse":
            self.stats.unavailable_refusals += 1
            retry_after = max(self._next_probe - self._clock(), 0.1)
            raise BrokerError.of(
                Reason.RATE_LIMIT_UNAVAILABLE,
                "the token broker cannot check its rate limits right now; "
                f"retry in {_seconds(retry_after)}",
                retry_after=retry_after,
            )
        self.stats.local_checks += 1
        return self._local.acquire(buckets)

    def _refused(self, refusals: Sequence[Refusal]) -> BrokerError:
        # The caller must wait for every refusing bucket: name the longest wait.
        worst = max(refusals, key=lambda r: r.retry_after)
        scope = worst.bucket.scope
        self.stats.refusals[scope] += 1
        for observer in self._observers:
            try:
                observer.rate_limit_refused(scope)
            except Exception:
                logger.exception("rate-limit observer %r failed", observer)
        return BrokerError.of(
            Reason.RATE_LIMITED,
            f"rate limit exceeded for {worst.bucket.description} ({worst.bucket.limit}); "
            f"retry in {_seconds(worst.retry_after)}",
            metadata={"scope": scope},
            retry_after=worst.retry_after,
            extra_details=(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=r.bucket.subject,
                            description=(
                                f"at most {r.bucket.limit.rate:g} requests per second, burst "
                                f"{r.bucket.limit.burst}, for {r.bucket.description}"
                            ),
                        )
                        for r in refusals
                    ]
                ),
            ),
        )


def _seconds(seconds: float) -> str:
    """0.347 -> "0.35s": rounded up to the hundredth, so never "0.00s"."""
    return f"{max(1, math.ceil(seconds * 100 - 1e-6)) / 100:.2f}s"
