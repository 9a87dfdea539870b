"""Protection of the Kubernetes API server: a cap on concurrent calls, and 429 feedback.

- Concurrency: at most `rateLimit.upstream.maxConcurrent` TokenRequest calls at once per
  broker process. A call beyond the cap waits for a slot (FIFO) for at most
  `maxWaitSeconds`, and never longer than the caller's remaining deadline minus a margin
  (so the refusal arrives before the deadline is spent); when the wait runs out the call
  gets UNAVAILABLE, ErrorInfo reason UPSTREAM_BUSY, with RetryInfo.
- 429 feedback: when the API server answers 429 with Retry-After for a service account
  (`record_retry_after`, or `record_error` with the upstream BrokerError), requests for the
  same service account are refused at once during that window, without calling the API
  server: UNAVAILABLE, reason UPSTREAM_THROTTLED, RetryInfo = the time left (calls that were
  waiting for a slot when the 429 came are refused too). Windows are capped at
  `maxRetryAfterSeconds`, and expired ones are dropped.

Observers (`add_observer`; broker.metrics.BrokerMetrics is one) are told the time each call
waited for its slot (`rate_limit_waited("upstream", seconds)`, 0 when a slot was free) and
every refusal (`rate_limit_refused("upstream")` or `("upstream_retry_after")`).

Usage (around the upstream call):

    async with guard.slot(namespace, service_account, timeout=context.time_remaining()):
        result = await upstream.create_token(...)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from broker.config import UpstreamLimitSettings
from broker.errors import BrokerError
from broker.reasons import Reason

logger = logging.getLogger(__name__)


# Observer scopes.
SCOPE_UPSTREAM = "upstream"
SCOPE_RETRY_AFTER = "upstream_retry_after"

# RetryInfo of UPSTREAM_BUSY: the broker was busy for the whole wait; try again a bit later.
BUSY_RETRY_AFTER_SECONDS = 1.0
# A wait for a slot ends this long before the caller's deadline, so that the refusal (or
# the upstream call) still fits.
DEADLINE_MARGIN_SECONDS = 0.1
# Bound of the 429 windows held at once (one per throttled service account).
MAX_THROTTLED_TARGETS = 10_000


class UpstreamGuardObserver(Protocol):
    def rate_limit_waited(self, scope: str, seconds: float) -> None: ...

    def rate_limit_refused(self, scope: str) -> None: ...


@dataclass
class UpstreamGuardStats:
    """Counters for metrics and tests."""

    in_flight: int = 0
    # Calls waiting for a slot right now.
    waiting: int = 0
    # Calls that got a slot, and their total time waiting for it.
    acquired: int = 0
    waited_seconds_total: float = 0.0
    # Refused: no slot within the wait (UPSTREAM_BUSY) / in a 429 window (UPSTREAM_THROTTLED).
    busy_refusals: int = 0
    throttled_refusals: int = 0


class UpstreamGuard:
    def __init__(
        self,
        *,
        max_concurrent: int = 32,
        max_wait_seconds: float = 2.0,
        max_retry_after_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        deadline_margin_seconds: float = DEADLINE_MARGIN_SECONDS,
        max_throttled_targets: int = MAX_THROTTLED_TARGETS,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.max_concurrent = max_concurrent
        self._max_wait = max_wait_seconds
        self._max_retry_after = max_retry_after_seconds
        # Only for the 429 windows; waits are measured on the event loop's clock.
        self._clock = clock
        self._margin = deadline_margin_seconds
        self._max_targets = max_throttled_targets
        self._slots = asyncio.Semaphore(max_concurrent)
        # (namespace, service account) -> end of its 429 window (clock time).
        self._throttled: dict[tuple[str, str], float] = {}
        self._observers: list[UpstreamGuardObserver] = []
        self.stats = UpstreamGuardStats()

    @classmethod
    def from_settings(
        cls, settings: UpstreamLimitSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> UpstreamGuard:
        return cls(
            max_concurrent=settings.max_concurrent,
            max_wait_seconds=settings.max_wait_seconds,
            max_retry_after_seconds=settings.max_retry_after_seconds,
            clock=clock,
        )

    def __repr__(self) -> str:
        return (
            f"UpstreamGuard(max_concurrent={self.max_concurrent}, "
            f"in_flight={self.stats.in_flight}, waiting={self.stats.waiting})"
        )

    def add_observer(self, observer: UpstreamGuardObserver) -> None:
        self._observers.append(observer)

    # --- 429 feedback ---------------------------------------------------------------------

    def record_retry_after(self, namespace: str, service_account: str, seconds: float) -> None:
        """The API server answered 429 with Retry-After `seconds` for this service account."""
        seconds = min(max(0.0, seconds), self._max_retry_after)
        if seconds <= 0:
            return
        now = self._clock()
        target = (namespace, service_account)
        until = now + seconds
        if until <= self._throttled.get(target, 0.0):
            return  # a shorter Retry-After does not shorten the window
        if target not in self._throttled and len(self._throttled) >= self._max_targets:
            self._prune(now)
            if len(self._throttled) >= self._max_targets:
                # Forget the window closest to its end.
                del self._throttled[min(self._throttled, key=self._throttled.__getitem__)]
        self._throttled[target] = until
        logger.info(
            "the Kubernetes API server asked to slow down for %s/%s: refusing its requests "
            "for %.3fs",
            namespace,
            service_account,
            seconds,
        )

    def record_error(self, namespace: str, service_account: str, error: BrokerError) -> bool:
        """Record a relayed 429 (broker.upstream's error, with its retry delay): True if it
        was one."""
        if error.metadata.get("kubernetesCode") != "429" or error.retry_after is None:
            return False
        self.record_retry_after(namespace, service_account, error.retry_after)
        return True

    def throttled_for(self, namespace: str, service_account: str) -> float | None:
        """Seconds left in the service account's 429 window; None when there is none."""
        target = (namespace, service_account)
        until = self._throttled.get(target)
        if until is None:
            return None
        left = until - self._clock()
        if left <= 0:
            del self._throttled[target]
            return None
        return left

    def check_throttled(self, namespace: str, service_account: str) -> None:
        """Raise UNAVAILABLE (UPSTREAM_THROTTLED) inside the service account's 429 window."""
        left = self.throttled_for(namespace, service_account)
        if left is None:
            return
        self.stats.throttled_refusals += 1
        self._refused(SCOPE_RETRY_AFTER)
        raise BrokerError.of(
            Reason.UPSTREAM_THROTTLED,
            "the Kubernetes API server asked to slow down requests for service account "
            f"{namespace}/{service_account}; retry in {left:.2f}s",
            metadata={"namespace": namespace, "serviceAccount": service_account},
            retry_after=left,
        )

    def _prune(self, now: float) -> None:
        for target in [t for t, until in self._throttled.items() if until <= now]:
            del self._throttled[target]

    # --- concurrency ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(
        self,
        namespace: str,
        service_account: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the caller's deadline, not ours
    ) -> AsyncIterator[None]:
        """Hold one of the upstream slots for the body (after the 429 check).

        `timeout`: the caller's remaining deadline in seconds (None: no deadline). Raises
        BrokerError UNAVAILABLE (UPSTREAM_THROTTLED or UPSTREAM_BUSY) instead of waiting
        past `maxWaitSeconds` or the deadline.
        """
        self.check_throttled(namespace, service_account)
        if await self._acquire(timeout):
            # A 429 for this target may have arrived while the call waited for its slot.
            try:
                self.check_throttled(namespace, service_account)
            except BaseException:
                self._slots.release()
                raise
        self.stats.in_flight += 1
        try:
            yield
        finally:
            self.stats.in_flight -= 1
            self._slots.release()

    async def _acquire(self, deadline_left: float | None) -> bool:
        """Take a slot, or raise UPSTREAM_BUSY: True if the call had to wait for it."""
        if not self._slots.locked():
            await self._slots.acquire()  # free: returns at once
            self._waited(0.0)
            return False
        budget = self._max_wait
        if deadline_left is not None:
            budget = min(budget, deadline_left - self._margin)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if budget > 0:
            self.stats.waiting += 1
            try:
                async with asyncio.timeout(budget):
                    await self._slots.acquire()
            except TimeoutError:
                pass
            else:
                self._waited(loop.time() - started)
                return True
            finally:
                self.stats.waiting -= 1
        waited = loop.time() - started
        self.stats.busy_refusals += 1
        self._refused(SCOPE_UPSTREAM)
        # Debug only: under overload this is every call; the metric counts them.
        logger.debug(
            "upstream busy: %d Kubernetes API calls in flight, a call waited %.3fs and was refused",
            self.max_concurrent,
            waited,
        )
        raise BrokerError.of(
            Reason.UPSTREAM_BUSY,
            "the token broker has too many requests in flight to the Kubernetes API "
            f"server; retry in {BUSY_RETRY_AFTER_SECONDS:.2f}s",
            metadata={"maxConcurrent": str(self.max_concurrent)},
            retry_after=BUSY_RETRY_AFTER_SECONDS,
        )

    def _waited(self, seconds: float) -> None:
        self.stats.acquired += 1
        self.stats.waited_seconds_total += seconds
        for observer in self._observers:
            try:
                observer.rate_limit_waited(SCOPE_UPSTREAM, seconds)
            except Exception:
                logger.exception("upstream-guard observer %r failed", observer)

    def _refused(self, scope: str) -> None:
        for observer in self._observers:
            try:
                observer.rate_limit_refused(scope)
            except Exception:
                logger.exception("upstream-guard observer %r failed", observer)
