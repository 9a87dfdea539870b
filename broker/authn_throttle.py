"""A limit on failed authentication per peer address, checked before authentication.

Nothing else limits a caller who has not proven who it is: the rate limits (broker.ratelimit)
count identities. Without this, one address could make the broker verify bad credentials,
log a warning and write an audit line as fast as it can send calls — with `audit.failClosed`,
until the disk is full and no token can be issued to anyone.

Each failed authentication (UNAUTHENTICATED) is charged to its peer address's GCRA bucket
(`rateLimit.authFailuresPerPeer`: rate and burst); calls that authenticate are not charged.
While the bucket has no room, the address's calls are refused before any authentication
work: RESOURCE_EXHAUSTED, ErrorInfo reason PEER_THROTTLED (metadata `scope: peer`), RetryInfo
when the bucket has room again. So a valid caller behind the same address is refused too
until then: the limit gates calls before authentication succeeds, which is what makes a
refusal cheap. Callers behind one NAT or proxy share an address; the default (1 failure a
second, bursts of 100) is far above what real callers fail.

The address is the gRPC peer without its port (`ipv4:10.0.0.7`), IPv6 addresses by their
/64 (one host commonly holds a whole /64), and every unix-socket caller is `unix:`. Buckets
live in this process's memory (idle ones are dropped), whatever `rateLimit.backend` says.

Refusals are not audited one by one. An episode of a peer starts with its first refusal, which
is audited; further refusals are counted, and audited at most once per AUDIT_INTERVAL_SECONDS
(that line says how many were suppressed before it); when the episode ends (the peer's bucket
is full again) or the broker stops, one summary line reports the rest (`ended`, `pending`).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from broker.config import RateSettings
from broker.errors import BrokerError
from broker.ratelimit import SWEEP_STEPS, Limit, MemoryBuckets
from broker.ratelimit import _seconds as seconds_text
from broker.reasons import Reason

# token_broker_rate_limit_refusals_total{scope} of these refusals.
SCOPE_PEER: Final = "peer"
# At most one audit line per throttled peer this often (plus the first and the summary).
AUDIT_INTERVAL_SECONDS: Final = 60.0
# Episodes tracked at once; beyond, the oldest one ends early (its summary is written).
MAX_EPISODES: Final = 10_000
_EPSILON = 1e-9


def peer_address(peer: str) -> str:
    """The bucket of a gRPC peer string: its address without the port (IPv6: the /64)."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return "unix:"
    if kind not in ("ipv4", "ipv6"):
        return peer[:256]
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        host = rest
    host = host.replace("%5B", "[").replace("%5D", "]").strip("[]").split("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{kind}:{host[:256]}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ipv4:{ip.ipv4_mapped}"
        return f"ipv6:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"ipv4:{ip}"


@dataclass(frozen=True)
class PeerRefusal:
    """A call refused before authentication."""

    peer: str  # peer_address() of the caller
    retry_after: float
    # Write this refusal's audit line (else it is counted for a later line).
    audited: bool
    # On an audited line: the refusals of this peer not audited since its previous line.
    suppressed: int

    def error(self) -> BrokerError:
        return peer_throttled(self.retry_after)


def peer_throttled(retry_after: float) -> BrokerError:
    """The answer to a throttled peer: RESOURCE_EXHAUSTED, PEER_THROTTLED, RetryInfo."""
    return BrokerError.of(
        Reason.PEER_THROTTLED,
        "too many failed authentication attempts from this address; retry in "
        + seconds_text(retry_after),
        metadata={"scope": SCOPE_PEER},
        retry_after=retry_after,
    )


@dataclass(frozen=True)
class ThrottleSummary:
    """Refusals of `peer` that no audit line has reported yet."""

    peer: str
    suppressed: int


@dataclass
class _Episode:
    audited_at: float
    suppressed: int = 0


class AuthFailureThrottle:
    """Failed authentications per peer address (None settings: no limit)."""

    def __init__(
        self,
        settings: RateSettings | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        audit_interval_seconds: float = AUDIT_INTERVAL_SECONDS,
    ) -> None:
        self._limit = Limit.of(settings)
        self._clock = clock
        self._audit_interval = audit_interval_seconds
        self._buckets = MemoryBuckets(clock)
        # Throttled peers, oldest first.
        self._episodes: OrderedDict[str, _Episode] = OrderedDict()
        self._finished: list[ThrottleSummary] = []

    def __repr__(self) -> str:
        return f"AuthFailureThrottle(limit={self._limit})"

    @property
    def enabled(self) -> bool:
        return self._limit is not None

    def admit(self, peer: str) -> PeerRefusal | None:
        """Before authentication: None if the peer may try, else its refusal."""
        if self._limit is None or not len(self._buckets):
            return None  # no address has failed lately: every bucket is full
        address = peer_address(peer)
        wait = self._buckets.wait(address, self._limit)
        if wait <= _EPSILON:
            return None
        now = self._clock()
        episode = self._episodes.get(address)
        if episode is None:
            if len(self._episodes) >= MAX_EPISODES:
                self._end(*self._episodes.popitem(last=False))
            self._episodes[address] = _Episode(audited_at=now)
            return PeerRefusal(address, wait, audited=True, suppressed=0)
        if now - episode.audited_at >= self._audit_interval:
            suppressed, episode.suppressed, episode.audited_at = episode.suppressed, 0, now
            return PeerRefusal(address, wait, audited=True, suppressed=suppressed)
        episode.suppressed += 1
        return PeerRefusal(address, wait, audited=False, suppressed=0)

    def failed(self, peer: str) -> None:
        """A call of `peer` failed authentication."""
        if self._limit is not None:
            self._buckets.charge(peer_address(peer), self._limit)

    def ended(self) -> list[ThrottleSummary]:
        """Summaries of episodes that ended (usually none): looks at the oldest few each
        time, as the buckets' own sweep does."""
        for _ in range(min(SWEEP_STEPS, len(self._episodes))):
            address, episode = self._episodes.popitem(last=False)
            if self._buckets.backlog(address) > _EPSILON:
                self._episodes[address] = episode  # still throttled: to the back
            else:
                self._end(address, episode)
        finished, self._finished = self._finished, []
        return finished

    def pending(self) -> list[ThrottleSummary]:
        """At shutdown: every refusal not yet reported, by peer (the episodes end)."""
        while self._episodes:
            self._end(*self._episodes.popitem(last=False))
        finished, self._finished = self._finished, []
        return finished

    def _end(self, address: str, episode: _Episode) -> None:
        if episode.suppressed:
            self._finished.append(ThrottleSummary(address, episode.suppressed))
