"""Injected failures for the token endpoint (and only for it).

Faults act after authentication and before authorization, where API Priority and Fairness
and a failing apiserver would answer: a request with bad credentials still gets its 401, and a
faulted request never reaches the token handler. Each faulted request is still recorded.

- `latency`: seconds to wait before answering (every token request, faulted or not). A wait
  follows the current value: setting it lower (e.g. back to 0) releases waiting requests.
- `fail_next(count, status, retry_after=None, message=None)`: the next `count` token requests
  fail with `status`: 429 is APF's plain-text answer with `Retry-After` (default 1 s); 500 an
  `InternalError` Status, 503 `ServiceUnavailable`, anything else the generic Status of its code.
  With `retry_after`, Status bodies carry `details.retryAfterSeconds` and a `Retry-After` header.
- `drop_next(count)`: the next `count` token requests get no response: the TCP connection is
  aborted, so the client sees a connection error.
- `fail_signing_next(count, message)`: rule 10, the token handler's signing step fails (500).
- `error_rates` ({status: probability}) and `drop_rate`: random failures from a seedable RNG.
- `reset()`: all of the above back to none.

Queued failures (fail_next, drop_next) are served in the order they were queued, before any
random one is drawn.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

APF_RETRY_AFTER_SECONDS = 1.0
DEFAULT_SIGNING_FAILURE = "emulated signing failure"


@dataclass(frozen=True)
class FaultAction:
    kind: Literal["fail", "drop"]
    status: int = 0
    retry_after: float | None = None
    message: str | None = None


def _check_status(status: int) -> None:
    if not 400 <= status <= 599:
        raise ValueError(f"an injected failure needs a 4xx or 5xx status, not {status}")


def _check_retry_after(retry_after: float | None) -> None:
    if retry_after is not None and retry_after < 0:
        raise ValueError("retry_after must not be negative")


class Faults:
    def __init__(self, seed: int | None = None) -> None:
        self.latency: float = 0.0
        self.error_rates: dict[int, float] = {}
        self.drop_rate: float = 0.0
        self._queue: deque[FaultAction] = deque()
        self._signing: deque[str] = deque()
        self._seed = seed
        self._rng = random.Random(seed)  # noqa: S311 - test fault injection, not security

    def __repr__(self) -> str:
        return f"Faults({self.snapshot()!r})"

    # --- configuring ----------------------------------------------------------------------

    def seed(self, seed: int | None) -> None:
        """Restart the random draws from `seed` (None: from the OS)."""
        self._seed = seed
        self._rng = random.Random(seed)  # noqa: S311 - test fault injection, not security

    def fail_next(
        self,
        count: int,
        status: int,
        retry_after: float | None = None,
        message: str | None = None,
    ) -> None:
        if count < 0:
            raise ValueError("count must not be negative")
        _check_status(status)
        _check_retry_after(retry_after)
        if status == 429 and retry_after is None:
            retry_after = APF_RETRY_AFTER_SECONDS
        self._queue.extend(FaultAction("fail", status, retry_after, message) for _ in range(count))

    def drop_next(self, count: int = 1) -> None:
        if count < 0:
            raise ValueError("count must not be negative")
        self._queue.extend(FaultAction("drop") for _ in range(count))

    def fail_signing_next(self, count: int = 1, message: str = DEFAULT_SIGNING_FAILURE) -> None:
        if count < 0:
            raise ValueError("count must not be negative")
        self._signing.extend(message for _ in range(count))

    def set_error_rate(self, status: int, rate: float) -> None:
        _check_status(status)
        if not 0.0 <= rate <= 1.0:
            raise ValueError("a rate is a probability in [0, 1]")
        rates = {**self.error_rates, status: rate}
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError("error rates add up to more than 1")
        self.error_rates = {k: v for k, v in rates.items() if v > 0}

    def reset(self) -> None:
        """No latency, no queued, random or signing failures (the RNG seed is kept)."""
        self.latency = 0.0
        self.error_rates = {}
        self.drop_rate = 0.0
        self._queue.clear()
        self._signing.clear()

    @property
    def pending(self) -> int:
        """Queued failures not yet served."""
        return len(self._queue)

    # --- serving --------------------------------------------------------------------------

    def next_action(self) -> FaultAction | None:
        """The failure for the current token request, if any (consumes it)."""
        if self._queue:
            return self._queue.popleft()
        if self.drop_rate and self._rng.random() < self.drop_rate:
            return FaultAction("drop")
        if self.error_rates:
            draw = self._rng.random()
            total = 0.0
            for status, rate in sorted(self.error_rates.items()):
                total += rate
                if draw < total:
                    retry = APF_RETRY_AFTER_SECONDS if status == 429 else None
                    return FaultAction("fail", status, retry)
        return None

    def take_signing_failure(self) -> str | None:
        return self._signing.popleft() if self._signing else None

    # --- the admin endpoint's JSON --------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "latency": self.latency,
            "errorRates": {str(k): v for k, v in sorted(self.error_rates.items())},
            "dropRate": self.drop_rate,
            "seed": self._seed,
            "pending": [
                {"kind": a.kind, "status": a.status, "retryAfter": a.retry_after}
                if a.kind == "fail"
                else {"kind": a.kind}
                for a in self._queue
            ],
            "pendingSigningFailures": len(self._signing),
        }

    def configure(self, data: Mapping[str, Any]) -> None:
        """Apply an admin request (see FaultsUpdate); all-or-nothing."""
        try:
            update = FaultsUpdate.model_validate(data)
        except ValidationError as err:
            raise ValueError(str(err)) from err
        # Validate everything on a scratch copy first, so a bad field changes nothing.
        scratch = Faults()
        if update.error_rates is not None:
            for status, rate in update.error_rates.items():
                scratch.set_error_rate(status, rate)
        for item in update.fail_next:
            scratch.fail_next(item.count, item.status, item.retry_after, item.message)

        if update.reset:
            self.reset()
        if update.seed is not None:
            self.seed(update.seed)
        if update.latency is not None:
            self.latency = update.latency
        if update.drop_rate is not None:
            self.drop_rate = update.drop_rate
        if update.error_rates is not None:
            self.error_rates = dict(scratch.error_rates)
        for item in update.fail_next:
            self.fail_next(item.count, item.status, item.retry_after, item.message)
        if update.drop_next:
            self.drop_next(update.drop_next)
        if update.fail_signing_next is not None:
            self.fail_signing_next(
                update.fail_signing_next.count,
                update.fail_signing_next.message or DEFAULT_SIGNING_FAILURE,
            )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FailNext(_Strict):
    count: int = Field(1, ge=0)
    status: int
    retry_after: float | None = Field(None, ge=0, alias="retryAfter")
    message: str | None = None


class FailSigningNext(_Strict):
    count: int = Field(1, ge=0)
    message: str | None = None


class FaultsUpdate(_Strict):
    """POST /emulator/faults body. `reset` applies first; lists append to the queue."""

    reset: bool = False
    seed: int | None = None
    latency: float | None = Field(None, ge=0)
    drop_rate: float | None = Field(None, ge=0, le=1, alias="dropRate")
    error_rates: dict[int, float] | None = Field(None, alias="errorRates")
    fail_next: list[FailNext] = Field(default_factory=list, alias="failNext")
    drop_next: int = Field(0, ge=0, alias="dropNext")
    fail_signing_next: FailSigningNext | None = Field(None, alias="failSigningNext")
