"""Capped exponential backoff with jitter: the one formula of every retry loop.

The broker's calls to the API server (broker.upstream), the Python client's retries
(broker.client) and the sidecar agent's failed refreshes (broker.client.agent) wait, before
retry number n (1-based), a delay drawn from [min_fraction * ceiling, ceiling), where
ceiling = min(maximum, initial * multiplier ** (n - 1)). `min_fraction` 0 is "full jitter"
(upstream and client: spreads retries best), 0.5 "equal jitter" (the agent: never much sooner
than the schedule says). The ceiling is exact for any n: past the float range it is `maximum`.

Standard library only: the client side imports it without the server side.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_ceiling(
    retry: int, *, initial: float, maximum: float, multiplier: float = 2.0
) -> float:
    """The longest delay before retry number `retry` (1-based)."""
    try:
        grown = initial * float(multiplier) ** max(0, retry - 1)
    except OverflowError:  # a retry counter in the thousands (an agent failing for a day)
        return maximum
    return min(maximum, grown)


def backoff_delay(
    retry: int,
    *,
    initial: float,
    maximum: float,
    multiplier: float = 2.0,
    min_fraction: float = 0.0,
    rng: Callable[[], float] = random.random,
) -> float:
    """The delay before retry number `retry`: the ceiling, jittered by `rng()` in [0, 1)."""
    ceiling = backoff_ceiling(retry, initial=initial, maximum=maximum, multiplier=multiplier)
    return ceiling * (min_fraction + (1.0 - min_fraction) * rng())
