"""Admission of CreateToken calls: a bound on the calls that cost the broker without yet
being accountable.

A call is *pending* from its start until it is authenticated and its request message has
arrived: until then nothing charges it to a caller (the rate limits need both), so without a
bound one client could hold thousands of them open. At most `server.maxPendingCalls` are
pending per process; a call beyond it is shed at once — `UNAVAILABLE`, reason
`TOO_MANY_PENDING_CALLS`, with `RetryInfo` — before it costs anything more. Pending calls also
end by themselves: authentication has its own timeouts, and receiving the request message is
bounded by `server.receiveTimeoutSeconds` (broker.receive).
"""

from __future__ import annotations

from broker.errors import BrokerError
from broker.reasons import Reason

# RetryInfo of a shed call: pending calls end within the receive timeout at the latest, most
# of them within milliseconds.
SHED_RETRY_AFTER_SECONDS = 1.0


class PendingCalls:
    """Counts pending calls against a limit. Single event loop: no lock needed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def admit(self) -> bool:
        """Count one more pending call, or False (not counted) when the limit is reached."""
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def done(self) -> None:
        """An admitted call is no longer pending (authenticated and received, or ended)."""
        self.count -= 1

    def shed_error(self) -> BrokerError:
        return BrokerError.of(
            Reason.TOO_MANY_PENDING_CALLS,
            "the token broker is overloaded (too many calls waiting for "
            "authentication or their request); retry later",
            retry_after=SHED_RETRY_AFTER_SECONDS,
        )
