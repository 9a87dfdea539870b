"""Readiness: may this broker take traffic? The policy is loaded, the audit log takes lines,
and the Kubernetes API is reachable, recently.

The audit log (`watch_audit`) is not ready while its sink is blocked (a write outstanding for
longer than `audit.writeTimeoutSeconds`) or its last write failed, fail-open or not: a broker
that cannot account for its tokens should not be where load balancers send callers. It tells
when that changes, and checks a failed sink now and then by itself (broker.audit).

"Reachable" means the API server answered with a non-5xx status: a 401, 403 or 429 is an
API server that is up (and a problem readiness cannot fix); a connection error, a timeout or
a 5xx is not. Two sources feed it: every upstream attempt of a CreateToken call
(`Readiness` is an `UpstreamObserver`), and `KubernetesProber`, which asks the API server's
`/readyz` every `readiness.probeIntervalSeconds`, so an idle broker knows too.

The broker is not ready until the API server has answered once, and stops being ready when
it has been unreachable for longer than `readiness.unreachableAfterSeconds` since the first
failure after the last success; the first success makes it ready again. It is never ready
while shutting down. Listeners (the gRPC health statuses) hear of every change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from broker.upstream import AttemptOutcome, UpstreamClient

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class ReadyState:
    ready: bool
    # Why not ready (empty when ready): short, for /readyz and logs.
    reason: str = ""


Listener = Callable[[ReadyState], Awaitable[None]]


class AuditHealth(Protocol):
    """What broker.audit.AuditLog tells about its sink."""

    def problem(self) -> str | None: ...

    def add_listener(self, listener: Callable[[], None]) -> None: ...


class Readiness:
    """The broker's readiness; `state()` evaluates it, `publish()` tells the listeners."""

    def __init__(self, *, unreachable_after_seconds: float, clock: Clock = time.monotonic) -> None:
        self.unreachable_after_seconds = unreachable_after_seconds
        self._clock = clock
        self._policy_loaded = False
        self._shutting_down = False
        self._last_success: float | None = None
        self._last_success_time: float | None = None  # the same, in seconds since the epoch
        # The first failure since the last success; None while the last outcome succeeded.
        self._failing_since: float | None = None
        self._listeners: list[Listener] = []
        self._audit: AuditHealth | None = None
        self._published: ReadyState | None = None
        self._tasks: set[asyncio.Task[ReadyState]] = set()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def policy_loaded(self) -> None:
        self._policy_loaded = True

    def shutting_down(self) -> None:
        self._shutting_down = True

    def watch_audit(self, audit: AuditHealth) -> None:
        """Not ready while the audit log's sink has a problem; flips as soon as it says so."""
        self._audit = audit
        audit.add_listener(self._publish_if_flipped)

    @property
    def last_success(self) -> float | None:
        """Clock time of the API server's last non-5xx answer."""
        return self._last_success

    def last_success_timestamp(self) -> float | None:
        """The API server's last non-5xx answer in seconds since the epoch (for metrics)."""
        return self._last_success_time

    def record(self, reachable: bool) -> None:
        """One outcome: the API server answered (non-5xx), or it did not."""
        now = self._clock()
        if reachable:
            self._last_success = now
            self._last_success_time = time.time()
            self._failing_since = None
        elif self._failing_since is None:
            self._failing_since = now

    def state(self) -> ReadyState:
        if self._shutting_down:
            return ReadyState(False, "shutting down")
        if not self._policy_loaded:
            return ReadyState(False, "the policy is not loaded")
        problem = self._audit.problem() if self._audit is not None else None
        if problem is not None:
            return ReadyState(False, problem)
        if self._last_success is None:
            return ReadyState(False, "the Kubernetes API server has not answered yet")
        if self._failing_since is not None:
            down = self._clock() - self._failing_since
            if down > self.unreachable_after_seconds:
                return ReadyState(
                    False, f"the Kubernetes API server has been unreachable for {down:.0f}s"
                )
        return ReadyState(True)

    async def publish(self) -> ReadyState:
        """Evaluate, and tell the listeners if readiness changed since the last publish."""
        state = self.state()
        previous, self._published = self._published, state
        if previous is None or previous.ready != state.ready:
            if previous is not None:
                if state.ready:
                    logger.info("ready again")
                else:
                    logger.warning("not ready: %s", state.reason)
            for listener in self._listeners:
                await listener(state)
        return state

    # --- UpstreamObserver -------------------------------------------------------------------

    def upstream_attempt(self, outcome: AttemptOutcome) -> None:
        reachable = outcome.reachable
        if reachable is None:
            return
        self.record(reachable)
        self._publish_if_flipped()

    def _publish_if_flipped(self) -> None:
        published = self._published
        if published is not None and published.ready != self.state().ready:
            # Flip the health statuses now, not at the next probe.
            task = asyncio.get_running_loop().create_task(self.publish())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def upstream_retry(self) -> None:
        pass


class KubernetesProber:
    """Asks the API server's /readyz every `interval` seconds; `check()` is one probe."""

    def __init__(
        self,
        upstream: UpstreamClient,
        readiness: Readiness,
        *,
        interval_seconds: float,
        timeout_seconds: float,
    ) -> None:
        self._upstream = upstream
        self._readiness = readiness
        self.interval_seconds = interval_seconds
        self.timeout_seconds = timeout_seconds
        self._was_reachable: bool | None = None

    async def check(self) -> ReadyState:
        """Probe once, record the outcome, publish readiness; the new state."""
        outcome = await self._upstream.probe(self.timeout_seconds)
        reachable = bool(outcome.reachable)
        if reachable != self._was_reachable:
            if not reachable:
                logger.warning(
                    "the Kubernetes API server is unreachable (readiness probe: %s)",
                    outcome.status if outcome.status is not None else outcome.error,
                )
            elif self._was_reachable is not None:
                logger.info("the Kubernetes API server is reachable again")
        self._was_reachable = reachable
        self._readiness.record(reachable)
        return await self._readiness.publish()

    async def run(self) -> None:
        """Probe every `interval_seconds`, until cancelled."""
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.check()
            except Exception:
                logger.exception("readiness probe failed unexpectedly")
