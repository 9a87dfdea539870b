"""The Python client's retries: `RetryPolicy` (how many, how long between) and the decisions
of one call (`Retrier`), shared by the asyncio and the blocking client.

Bounded attempts, all within the caller's deadline (the whole call, retries included), and
only when a retry may succeed: `UNAVAILABLE` always; `RESOURCE_EXHAUSTED` only with a retry
delay from the server (`TokenBrokerError.retryable`). The server's delay (RetryInfo, else the
`grpc-retry-pushback-ms` trailer) replaces the backoff (broker.backoff: exponential, full
jitter, capped); a delay that does not fit in the deadline, or is longer than
`max_retry_delay`, ends the retries and the last error is raised, with its delay.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.backoff import backoff_delay

if TYPE_CHECKING:
    from broker.client.errors import TokenBrokerError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    # A server asking for a longer wait than this ends the retries (the error carries it).
    max_retry_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and the multiplier >= 1")

    def backoff(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """The delay before retry number `retry` (1-based): full jitter under the cap."""
        return backoff_delay(
            retry,
            initial=self.initial_backoff,
            maximum=self.max_backoff,
            multiplier=self.multiplier,
            rng=rng,
        )


NO_RETRIES = RetryPolicy(max_attempts=1)


class Retrier:
    """The retry decisions of one call."""

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        clock: Callable[[], float],
        rng: Callable[[], float],
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.rng = rng
        self.deadline = None if timeout is None else clock() + timeout
        self.attempts = 0

    def attempt_timeout(self) -> float | None:
        """The timeout of the next attempt: what is left of the deadline (None: none)."""
        self.attempts += 1
        if self.deadline is None:
            return None
        return max(0.001, self.deadline - self.clock())

    def delay(self, err: TokenBrokerError) -> float | None:
        """Seconds to wait before the next attempt, or None: raise `err`."""
        err.attempts = self.attempts
        if not err.retryable or self.attempts >= self.policy.max_attempts:
            return None
        if err.retry_delay is not None:
            if err.retry_delay > self.policy.max_retry_delay:
                return None
            wait = err.retry_delay
        else:
            wait = self.policy.backoff(self.attempts, self.rng)
        if self.deadline is not None and self.clock() + wait >= self.deadline:
            return None  # the next attempt could not start (let alone finish) in time
        return wait
