"""The decision memo: what the request path decides for a call, decided once per distinct call.

For one caller (the same `Identity`, by its `memo_key`: method, name, issuer, certificate
names, claims) and the same request bytes, under the same policy, everything between
authentication and the rate limits comes out the same every time: the request parsed, its
validation, the policy's decision (the deciding rule, the grant, its warnings), the effective
request, the token cache's key, the rate-limit buckets it is charged to, the metric series it
counts in, and the constant part of its audit and access lines. `DecisionMemo` keeps that
(`Decided`) so that a repeated call skips it: a cache hit becomes authenticate → memo lookup →
rate limits → cache lookup → answer. What counts per call still happens per call:
authentication, the failed-authentication throttle, the rate limits, the metrics, the audit
line and the access line (broker.request_path).

Exact by construction: an entry is used only while the policy it was decided under is the very
object in force (`PolicySource.current`), so the first call after a policy reload decides anew
(and the memo is emptied). Authentication runs before every lookup, so a key removed from the
key file, a JWT that expired or whose issuer's keys rotated, is refused before the memo is
consulted; the identity it returns is part of the key.

Bounded: at most `max_entries` (least recently used dropped first). Holds no token and no
credential: the keys are an identity's names and claims and the request's bytes, the values
what was decided about them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import Identity
from broker.policy import Decision, Policy

if TYPE_CHECKING:
    from broker.audit import AuditTemplate
    from broker.cache import CacheKey
    from broker.ratelimit import Bucket

# Distinct (caller, request bytes) decisions kept.
DEFAULT_MAX_ENTRIES = 4096


class PolicySource(Protocol):
    """Where the policy in force comes from (a reloading PolicyStore, or a fixed Policy)."""

    @property
    def current(self) -> Policy: ...


@dataclass(eq=False)
class Decided:
    """What the request path decided for one caller and one request, under `policy`."""

    policy: Policy
    identity: Identity
    request: pb.CreateTokenRequest
    # The request does not validate (REQUEST_INVALID): nothing else was decided.
    invalid: bool = False
    decision: Decision | None = None
    effective: pb.CreateTokenRequest | None = None
    # The token cache's key (None: the grant is never cached: dry run, or the rule says so).
    cache_key: CacheKey | None = None
    # The rate-limit buckets the call is charged to (None: not computed yet).
    buckets: list[Bucket] | None = None
    # `token_broker_token_requested_lifetime_seconds`' observation.
    requested_lifetime: float = 0.0
    # The metric series this call counts in (broker.metrics: resolved once).
    decision_series: Any = None
    issued_series: Any = None
    # The access line's fields known from the caller and the request (bounded).
    access_fields: dict[str, str] = field(default_factory=dict)
    # The audit line of a cache hit, by the cache entry's sequence number: (seq, template).
    hit_line: tuple[int, AuditTemplate | None] | None = None


@dataclass
class MemoStats:
    hits: int = 0
    misses: int = 0
    # Entries dropped to stay within the bound.
    evictions: int = 0
    # Times the memo was emptied because another policy came into force.
    invalidations: int = 0


class DecisionMemo:
    """(identity, request bytes) -> Decided, valid under the policy in force. Event loop only."""

    def __init__(self, source: PolicySource, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._source = source
        self._max_entries = max_entries
        self._policy: Policy | None = None
        self._entries: OrderedDict[tuple[str, bytes], Decided] = OrderedDict()
        self.stats = MemoStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"DecisionMemo(entries={len(self._entries)}, max_entries={self._max_entries})"

    def policy(self) -> Policy:
        """The policy in force; entries decided under another one are dropped."""
        policy = self._source.current
        if policy is not self._policy:
            if self._entries:
                self._entries.clear()
                self.stats.invalidations += 1
            self._policy = policy
        return policy

    def get(self, identity: Identity, raw: bytes) -> Decided | None:
        """What was decided for this caller and these bytes under the policy in force."""
        key = (identity.memo_key, raw)
        if self._source.current is self._policy:
            decided = self._entries.get(key)
            if decided is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return decided
        self.stats.misses += 1
        return None

    def put(self, raw: bytes, decided: Decided) -> None:
        """Remember a decision (made under `policy()`, with no await since)."""
        if decided.policy is not self.policy():
            return
        self._entries[(decided.identity.memo_key, raw)] = decided
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1
