"""Upstream protection (broker.upstream_guard): the concurrency cap and the 429 windows.

Slots are held by tasks waiting on asyncio Events; no assertion depends on timing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from broker.config import UpstreamLimitSettings
from broker.errors import KUBERNETES_DOMAIN, BrokerError
from broker.reasons import Reason
from broker.upstream_guard import (
    UpstreamGuard,
)

NS = "demo"
SA = "build-robot"


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    def __init__(self) -> None:
        self.waits: list[tuple[str, float]] = []
        self.refusals: list[str] = []

    def rate_limit_waited(self, scope: str, seconds: float) -> None:
        self.waits.append((scope, seconds))

    def rate_limit_refused(self, scope: str) -> None:
        self.refusals.append(scope)


class Holder:
    """A task holding a slot until released."""

    def __init__(self, guard: UpstreamGuard, sa: str = SA, **kwargs: Any) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._run(guard, sa, kwargs))

    async def _run(self, guard: UpstreamGuard, sa: str, kwargs: dict[str, Any]) -> None:
        async with guard.slot(NS, sa, **kwargs):
            self.entered.set()
            await self.release.wait()

    async def done(self) -> None:
        self.release.set()
        await self.task


async def until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0)


async def test_calls_within_the_cap_do_not_wait() -> None:
    guard = UpstreamGuard(max_concurrent=2)
    recorder = Recorder()
    guard.add_observer(recorder)
    holders = [Holder(guard), Holder(guard)]
    for h in holders:
        await h.entered.wait()
    assert guard.stats.in_flight == 2
    for h in holders:
        await h.done()
    assert guard.stats.in_flight == 0
    assert recorder.waits == [("upstream", 0.0), ("upstream", 0.0)]


async def test_a_call_beyond_the_cap_waits_for_a_slot() -> None:
    guard = UpstreamGuard(max_concurrent=2, max_wait_seconds=60)
    recorder = Recorder()
    guard.add_observer(recorder)
    first, second = Holder(guard), Holder(guard)
    await first.entered.wait()
    await second.entered.wait()
    third = Holder(guard, timeout=30.0)
    await until(lambda: guard.stats.waiting == 1)
    assert not third.entered.is_set()
    await first.done()
    await third.entered.wait()
    assert guard.stats.waiting == 0 and guard.stats.in_flight == 2
    await second.done()
    await third.done()
    assert guard.stats.acquired == 3
    (_, _, (scope, waited)) = recorder.waits
    assert scope == "upstream" and waited > 0
    assert guard.stats.waited_seconds_total == pytest.approx(waited)


async def test_the_wait_is_bounded_by_max_wait() -> None:
    guard = UpstreamGuard(max_concurrent=1, max_wait_seconds=0.05)
    recorder = Recorder()
    guard.add_observer(recorder)
    holder = Holder(guard)
    await holder.entered.wait()
    with pytest.raises(BrokerError) as info:
        async with guard.slot(NS, SA):
            raise AssertionError("got a slot")
    err = info.value
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.reason == Reason.UPSTREAM_BUSY
    assert err.metadata == {"maxConcurrent": "1"}
    assert err.retry_after == 1.0
    assert dict(err.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
    assert guard.stats.busy_refusals == 1 and guard.stats.waiting == 0
    assert recorder.refusals == ["upstream"]
    await holder.done()
    # The timed-out waiter left no slot behind, nor took one.
    holders = [Holder(guard)]
    await holders[0].entered.wait()
    await holders[0].done()
    assert guard.stats.in_flight == 0


async def test_the_wait_ends_before_the_callers_deadline() -> None:
    # maxWait is long, but the caller has 0.05 s left: less than the margin, so no wait.
    guard = UpstreamGuard(max_concurrent=1, max_wait_seconds=3600, deadline_margin_seconds=0.1)
    holder = Holder(guard)
    await holder.entered.wait()
    with pytest.raises(BrokerError) as info:
        async with guard.slot(NS, SA, timeout=0.05):
            raise AssertionError("got a slot")
    assert info.value.reason == Reason.UPSTREAM_BUSY
    # The remaining deadline minus the margin bounds the wait (here 0.15 - 0.1).
    with pytest.raises(BrokerError):
        async with guard.slot(NS, SA, timeout=0.15):
            raise AssertionError("got a slot")
    assert guard.stats.busy_refusals == 2
    await holder.done()
    # A free slot is taken whatever the deadline: the upstream call handles its deadline.
    async with guard.slot(NS, SA, timeout=0.001):
        assert guard.stats.in_flight == 1


async def test_waiters_are_served_in_order() -> None:
    guard = UpstreamGuard(max_concurrent=1, max_wait_seconds=60)
    holder = Holder(guard)
    await holder.entered.wait()
    waiters = []
    for n in range(1, 4):
        waiters.append(Holder(guard))
        await until(lambda n=n: guard.stats.waiting == n)
    await holder.done()
    for i, waiter in enumerate(waiters):
        await waiter.entered.wait()
        assert [w.entered.is_set() for w in waiters] == [j <= i for j in range(3)]
        await waiter.done()


async def test_a_cancelled_waiter_gives_nothing_away() -> None:
    guard = UpstreamGuard(max_concurrent=1, max_wait_seconds=60)
    holder = Holder(guard)
    await holder.entered.wait()
    waiter = Holder(guard)
    await until(lambda: guard.stats.waiting == 1)
    waiter.task.cancel()  # the caller went away
    with pytest.raises(asyncio.CancelledError):
        await waiter.task
    assert guard.stats.waiting == 0
    await holder.done()
    again = Holder(guard)
    await again.entered.wait()
    await again.done()
    assert guard.stats.in_flight == 0


async def test_the_body_failing_releases_the_slot() -> None:
    guard = UpstreamGuard(max_concurrent=1, max_wait_seconds=0)
    with pytest.raises(RuntimeError):
        async with guard.slot(NS, SA):
            raise RuntimeError("upstream failed")
    async with guard.slot(NS, SA):
        pass
    assert guard.stats.in_flight == 0


# --- 429 feedback -------------------------------------------------------------------------


async def test_retry_after_refuses_the_target_early() -> None:
    clock = FakeClock()
    guard = UpstreamGuard(clock=clock)
    recorder = Recorder()
    guard.add_observer(recorder)
    guard.record_retry_after(NS, SA, 2.0)
    with pytest.raises(BrokerError) as info:
        async with guard.slot(NS, SA):
            raise AssertionError("called the API server")
    err = info.value
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.reason == Reason.UPSTREAM_THROTTLED
    assert err.metadata == {"namespace": NS, "serviceAccount": SA}
    assert err.retry_after == pytest.approx(2.0)
    assert err.message == (
        "the Kubernetes API server asked to slow down requests for service account "
        f"{NS}/{SA}; retry in 2.00s"
    )
    # Other service accounts are not affected.
    async with guard.slot(NS, "deployer"):
        pass
    clock.advance(1.5)
    assert guard.throttled_for(NS, SA) == pytest.approx(0.5)
    with pytest.raises(BrokerError) as info:
        guard.check_throttled(NS, SA)
    assert info.value.retry_after == pytest.approx(0.5)
    assert dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"] == "500"
    clock.advance(0.5)
    async with guard.slot(NS, SA):
        pass
    assert guard.throttled_for(NS, SA) is None
    assert guard.stats.throttled_refusals == 2
    assert recorder.refusals == ["upstream_retry_after", "upstream_retry_after"]


async def test_a_429_during_the_wait_refuses_the_waiting_call() -> None:
    guard = UpstreamGuard(max_concurrent=1, max_wait_seconds=60)
    holder = Holder(guard)
    await holder.entered.wait()
    waiter = Holder(guard)  # same service account, waiting for the slot
    other = Holder(guard, "deployer")
    await until(lambda: guard.stats.waiting == 2)
    guard.record_retry_after(NS, SA, 30)  # the holder's call got a 429
    await holder.done()
    with pytest.raises(BrokerError) as info:
        await waiter.task
    assert info.value.reason == Reason.UPSTREAM_THROTTLED
    assert not waiter.entered.is_set()
    # It gave its slot back: the next waiter (another service account) gets it.
    await other.entered.wait()
    await other.done()
    assert guard.stats.in_flight == 0 and guard.stats.throttled_refusals == 1


async def test_retry_after_windows_extend_but_never_shrink_and_are_capped() -> None:
    clock = FakeClock()
    guard = UpstreamGuard(clock=clock, max_retry_after_seconds=30)
    guard.record_retry_after(NS, SA, 5)
    guard.record_retry_after(NS, SA, 1)
    assert guard.throttled_for(NS, SA) == pytest.approx(5)
    guard.record_retry_after(NS, SA, 8)
    assert guard.throttled_for(NS, SA) == pytest.approx(8)
    guard.record_retry_after(NS, "deployer", 3600)
    assert guard.throttled_for(NS, "deployer") == pytest.approx(30)
    guard.record_retry_after(NS, "other", 0)
    assert guard.throttled_for(NS, "other") is None


async def test_retry_after_windows_are_bounded_in_number() -> None:
    clock = FakeClock()
    guard = UpstreamGuard(clock=clock, max_throttled_targets=100, max_retry_after_seconds=1000)
    for i in range(100):
        guard.record_retry_after(NS, f"sa-{i}", 10 + i)
    clock.advance(10.5)  # sa-0's window has ended
    guard.record_retry_after(NS, "new", 5)  # takes sa-0's place
    assert guard.throttled_for(NS, "new") == pytest.approx(5)
    assert guard.throttled_for(NS, "sa-1") == pytest.approx(0.5)
    guard.record_retry_after(NS, "newer", 50)  # all live: the one closest to its end goes
    assert guard.throttled_for(NS, "sa-1") is None
    assert guard.throttled_for(NS, "newer") == pytest.approx(50)
    assert guard.throttled_for(NS, "sa-99") == pytest.approx(98.5)


async def test_record_error_takes_relayed_429s_only() -> None:
    clock = FakeClock()
    guard = UpstreamGuard(clock=clock)

    def relayed(code: int, retry_after: float | None) -> BrokerError:
        return BrokerError(
            code=grpc.StatusCode.UNAVAILABLE,
            message="...",
            reason=Reason.KUBERNETES_TOO_MANY_REQUESTS,
            domain=KUBERNETES_DOMAIN,
            metadata={"kubernetesReason": "TooManyRequests", "kubernetesCode": str(code)},
            retry_after=retry_after,
        )

    assert not guard.record_error(NS, SA, relayed(503, 3))
    assert not guard.record_error(NS, SA, relayed(429, None))
    assert guard.throttled_for(NS, SA) is None
    assert guard.record_error(NS, SA, relayed(429, 3))
    assert guard.throttled_for(NS, SA) == pytest.approx(3)


def test_from_settings() -> None:
    guard = UpstreamGuard.from_settings(
        UpstreamLimitSettings(max_concurrent=4, max_wait_seconds=0.5, max_retry_after_seconds=9)
    )
    assert guard.max_concurrent == 4
    assert repr(guard) == "UpstreamGuard(max_concurrent=4, in_flight=0, waiting=0)"
    guard.record_retry_after(NS, SA, 60)
    assert guard.throttled_for(NS, SA) == pytest.approx(9, abs=0.1)
