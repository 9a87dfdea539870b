"""An in-memory cache of minted tokens: kubelet's refresh rule, single flight, refresh-ahead.

Where it sits: in CreateToken after policy and before upstream. The key is built from the
*effective* request (the granted audiences and expiration), so a policy change that alters the
grant changes the key, and policy still runs on every call: a cached token is only ever
handed to a caller the policy allows right now.

Key (`CacheKey`): the caller (auth method, name, issuer; for mtls the certificate field) and
everything that shapes the token: namespace, service account, audiences in request order (the
API server keeps it), the requested expiration (None = the server default) and the whole bound
object reference (kind, apiVersion, name, uid). One caller never receives a token minted for
another.

Freshness, as kubelet (`pkg/kubelet/token/token_manager.go`; the rule is broker.lifetime, which
the client side shares): a token's lifetime is
`status.expirationTimestamp - iat` (the JWT's `iat`; else `metadata.creationTimestamp`; else
`spec.expirationSeconds`): both are the API server's clock, so broker/server clock skew does not
matter. The lifetime is anchored at the local moment the upstream answered. A token is served
while `age < 80% of lifetime - jitter` (jitter uniform in [0, 10 s), drawn once per token) and
`age < cache.maxAgeSeconds` (24 h); after that the next request refreshes it.

Single flight: concurrent requests for one key share one upstream call, run as its own task;
each waiter awaits it through `asyncio.shield`, so a waiter that is cancelled or runs out of
time never cancels the call for the others, and its result is cached even if every waiter left.

Deadline of the shared call (the choice): NOT the first requester's remaining deadline. A
caller with 50 ms left would otherwise doom every later joiner with a longer deadline. The call
gets `fetch_timeout` (wire `kubernetes.requestTimeoutSeconds`, the upstream's own bound when a
caller sets no deadline) and is also hard-capped here at `fetch_timeout + 1 s`. Each waiter
waits at most its own `timeout` and then gets DEADLINE_EXCEEDED (UPSTREAM_TIMEOUT), exactly as
an uncached call would; the call goes on and its token is cached for the caller's retry.

Failed refreshes: when the API server could not answer (UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED) and `serveStaleOnError` is on, the cached token is served while it is still
valid, and for `REFRESH_RETRY_SECONDS` after a failure further requests get it without another
attempt. A definitive answer (NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION, ...: the
service account or bound object is gone, the broker lost its RBAC grant) drops the entry and is
surfaced: the old token is known to be stale or no longer the broker's to hand out.

Deleted service accounts: a cached token stays what it was when minted, and is served until its
refresh point even if its service account has been deleted since (the API server then refuses
it: it checks that the service account named in the token still exists with the token's UID),
because knowing sooner would cost an API call per hit or a watch on service accounts (RBAC the
broker does not otherwise need). But what the API server's own answers show is acted on: a
NOT_FOUND for the service account itself (a refresh, or any request for it) drops every cached
token of that service account, and a token minted for it with another
`kubernetes.io.serviceaccount.uid` (deleted and recreated) drops the ones of the old UID. The
most recent answer wins: a token minted before a recreation but answered after it may drop
the new ones once, which only costs a mint.

Refresh-ahead (`refreshAhead`): a key is *hot* when it was requested within the refresh window
(the last 20% of its lifetime) before its refresh point. Hot keys are refreshed in the
background at their refresh point (the task started by `start()`, or `run_maintenance()`), and
while a refresh runs requests are answered from the cache (if at least 10% of the lifetime is
left), so hot callers do not wait on the API server. A cold key is refreshed by its next request.

Never cached: dry-run requests, rules with `cache: {enabled: false}` (`Decision.cacheable`), all
when `cache.enabled` is false (see `TokenCache.cacheable`). Bounded: at most `maxEntries` (LRU
eviction); expired entries are dropped on lookup and by a sweep every minute that only touches
expired ones (a heap ordered by expiry). Tokens live in this process's memory only, and no
repr, log line or exception message here contains one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from broker.config import CacheSettings
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import AuthMethod, Identity
from broker.issued_token import TokenFacts, read_token
from broker.lifetime import REFRESH_FRACTION, default_jitter, lifetime_seconds, refresh_due_at
from broker.policy import Decision
from broker.reasons import Reason
from broker.upstream import METADATA_KUBERNETES_KIND, UpstreamResult

logger = logging.getLogger(__name__)

# Refresh-ahead serves the old token during a refresh only while this much lifetime is left.
MIN_REMAINING_FRACTION_WHILE_REFRESHING = 0.1
# After a failed refresh (serveStaleOnError), no new attempt for this long.
REFRESH_RETRY_SECONDS = 10.0
# Expired entries are swept this often (kubelet: every minute).
SWEEP_INTERVAL_SECONDS = 60.0
# The shared upstream call's own bound when none is configured.
DEFAULT_FETCH_TIMEOUT_SECONDS = 30.0
# The hard cap on a shared call is its timeout plus this (the upstream's own timeout first).
FETCH_GRACE_SECONDS = 1.0
# Serialized answers kept per token (one per distinct set of policy warnings).
MAX_RESPONSES_PER_ENTRY = 8


# The API server could not answer: a still-valid cached token may stand in.
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

# Given the timeout the shared call must finish within (seconds; None: the upstream's default).
Fetch = Callable[[float | None], Awaitable[UpstreamResult]]


@dataclass(frozen=True)
class CacheKey:
    """Who asked, and everything that shapes the token. Holds no secret."""

    auth_method: AuthMethod
    caller: str
    issuer: str | None
    namespace: str
    service_account: str
    # In request order: the API server returns them in that order.
    audiences: tuple[str, ...]
    # None: the API server's default.
    expiration_seconds: int | None
    # (kind, apiVersion, name, uid); None when the token is not bound.
    bound_object: tuple[str, str, str, str] | None
    # mtls: the certificate field `caller` is (the same text in another field is another name).
    certificate_field: str | None = None

    @classmethod
    def for_request(cls, identity: Identity, request: pb.CreateTokenRequest) -> CacheKey:
        """The key of a validated, *effective* request (`Decision.effective_request`).

        metadata.name/namespace are not part of it: validation makes them empty or equal to
        the service account and namespace, which shape the token the same way.
        """
        if request.dry_run:
            raise ValueError("dry-run requests are never cached")
        spec = request.token_request.spec
        bound = None
        if spec.HasField("bound_object_ref"):
            ref = spec.bound_object_ref
            bound = (ref.kind, ref.api_version, ref.name, ref.uid)
        return cls(
            auth_method=identity.method,
            caller=identity.name,
            issuer=identity.issuer,
            namespace=request.namespace,
            service_account=request.service_account,
            audiences=tuple(spec.audiences),
            expiration_seconds=(
                spec.expiration_seconds if spec.HasField("expiration_seconds") else None
            ),
            bound_object=bound,
            certificate_field=identity.certificate_field,
        )

    def __str__(self) -> str:
        caller = self.caller if self.issuer is None else f"{self.issuer}#{self.caller}"
        if self.certificate_field is not None:
            caller = f"{self.certificate_field}:{caller}"
        return f"{self.namespace}/{self.service_account} for {self.auth_method}:{caller}"


@dataclass(eq=False, repr=False)
class CacheEntry:
    """One cached token. Times are on the cache's clock; `result` holds the token."""

    key: CacheKey
    result: UpstreamResult
    # When the upstream answered.
    issued_at: float
    # Seconds from issue to expiry (API server clock).
    lifetime: float
    # Served without a refresh before this.
    refresh_at: float
    # The last request for the key (refresh-ahead's "hot" test).
    last_access: float
    # How a background refresh calls upstream for this key.
    fetch: Fetch
    seq: int
    # The last refresh failed then (None: none failed since the token was minted).
    failed_at: float | None = None
    # The token's `kubernetes.io.serviceaccount.uid` (None if it has none).
    service_account_uid: str | None = None
    # What the broker reads from the token (jti, lifetime, ...; broker.issued_token).
    facts: TokenFacts = field(default_factory=TokenFacts)
    # The answer to a call, serialized once, by the decision's warnings (bounded).
    _responses: dict[tuple[str, ...], bytes] = field(default_factory=dict)

    def response(self, warnings: tuple[str, ...]) -> bytes:
        """The serialized CreateTokenResponse of this token with the decision's `warnings`
        (then the API server's): made once, then handed out as bytes."""
        response = self._responses.get(warnings)
        if response is None:
            if len(self._responses) >= MAX_RESPONSES_PER_ENTRY:
                self._responses.clear()
            response = self._responses[warnings] = pb.CreateTokenResponse(
                token_request=self.result.token_request,
                warnings=[*warnings, *self.result.warnings],
            ).SerializeToString()
        return response

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.lifetime

    @property
    def refresh_window(self) -> float:
        """The last 20% of the lifetime: refresh-ahead's look-back for recent requests."""
        return (1.0 - REFRESH_FRACTION) * self.lifetime

    def valid(self, now: float) -> bool:
        return now < self.expires_at

    def hot(self) -> bool:
        """Requested within the refresh window before the refresh point (or since)."""
        return self.last_access >= self.refresh_at - self.refresh_window

    def __repr__(self) -> str:
        return (
            f"CacheEntry({self.key}, issued_at={self.issued_at:.3f}, "
            f"refresh_at={self.refresh_at:.3f}, expires_at={self.expires_at:.3f}, "
            f"token=<redacted>, warnings={self.result.warnings!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class CacheResult:
    """The answer, and where it came from (for the audit line and metrics)."""

    result: UpstreamResult
    # From the cache: no upstream answer for this request (stale answers included).
    hit: bool
    # A cached token served because its refresh failed (serveStaleOnError).
    stale: bool = False


@dataclass
class CacheStats:
    """Counters since start; every request through `get_or_fetch` counts in exactly one of
    hits, misses, coalesced, stale_served or bypassed."""

    # Answered from the cache without waiting on the API server (fresh tokens, and tokens
    # served while refresh-ahead refreshes them).
    hits: int = 0
    # Started an upstream call and waited for it (no entry, an expired one, or a refresh).
    misses: int = 0
    # Joined another request's in-flight upstream call instead of starting one.
    coalesced: int = 0
    # Answered with a still-valid cached token after its refresh failed (CacheResult.stale).
    stale_served: int = 0
    # Passed straight to upstream: the cache is disabled or closed.
    bypassed: int = 0
    # Upstream calls started: by misses and by refresh-ahead.
    upstream_calls: int = 0
    # Of those, calls replacing a still-valid entry (synchronous or background).
    refreshes: int = 0
    # Refreshes that failed.
    refresh_failures: int = 0
    # Entries dropped to stay within maxEntries (least recently used first).
    evictions: int = 0
    # Entries dropped because their token expired (on lookup or by the sweep).
    expirations: int = 0
    # Entries now.
    size: int = 0

    @property
    def upstream_calls_saved(self) -> int:
        """Requests answered without an upstream call of their own: hits + coalesced."""
        return self.hits + self.coalesced


@dataclass(eq=False)
class _Flight:
    task: asyncio.Task[UpstreamResult]
    background: bool


class TokenCache:
    """See the module docstring. One instance per server; use from one event loop."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = default_jitter,
    ) -> None:
        """`fetch_timeout`: the bound of a shared upstream call (kubernetes.requestTimeout-
        Seconds). `clock`: seconds, only differences are used. `jitter`: seconds >= 0."""
        if fetch_timeout <= 0:
            raise ValueError("fetch_timeout must be positive")
        self._settings = settings
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._jitter = jitter
        self._entries: OrderedDict[CacheKey, CacheEntry] = OrderedDict()
        # The keys of each service account's entries, (namespace, name) -> keys.
        self._by_account: dict[tuple[str, str], set[CacheKey]] = {}
        # (when, seq, key) min-heaps; stale items (replaced or evicted entries) are skipped.
        self._expiry_heap: list[tuple[float, int, CacheKey]] = []
        self._refresh_heap: list[tuple[float, int, CacheKey]] = []
        self._flights: dict[CacheKey, _Flight] = {}
        self._seq = itertools.count()
        self._maintenance: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._closed = False
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return (
            f"TokenCache(size={len(self._entries)}, max_entries={self._settings.max_entries}, "
            f"refresh_ahead={self._settings.refresh_ahead}, in_flight={len(self._flights)})"
        )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def settings(self) -> CacheSettings:
        return self._settings

    @property
    def in_flight(self) -> int:
        """Upstream calls running now (shared and background)."""
        return len(self._flights)

    @property
    def closed(self) -> bool:
        return self._closed

    def cacheable(self, decision: Decision, request: pb.CreateTokenRequest) -> bool:
        """Whether this allowed request may be answered through the cache."""
        return (
            self._settings.enabled
            and not self._closed
            and decision.allowed
            and decision.cacheable
            and not request.dry_run
        )

    def peek(self, key: CacheKey) -> CacheEntry | None:
        """The entry of `key`, expired or not, without touching LRU order or counters."""
        return self._entries.get(key)

    def discard(self, key: CacheKey, token_request: pb.TokenRequest) -> bool:
        """Forget the entry of `key` if it holds this very token (a refresh may have replaced
        it since): a token the broker withheld is not served to the next caller. True if an
        entry was removed."""
        entry = self._entries.get(key)
        if entry is None or entry.result.token_request.status.token != token_request.status.token:
            return False
        self._remove(key)
        return True

    # --- the request path -----------------------------------------------------------------

    def fresh(self, key: CacheKey) -> CacheEntry | None:
        """The entry of `key` when `get_or_fetch` would answer it from the cache at once
        (a fresh token: no refresh due), counted as that hit; else None (then call
        `get_or_fetch`). The entry's token is the cache's own: read it, never change it."""
        if not self._settings.enabled or self._closed:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.refresh_at or not entry.valid(now):
            return None
        entry.last_access = now
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    async def get_or_fetch(
        self,
        key: CacheKey,
        fetch: Fetch,
        *,
        # The caller's remaining deadline (None: none); bounds this caller's wait only.
        timeout: float | None,  # noqa: ASYNC109
    ) -> CacheResult:
        """The cached token of `key`, or one from `fetch` (shared by concurrent requests).

        Raises what the upstream call raised (BrokerError), or DEADLINE_EXCEEDED when
        `timeout` runs out first. Joiners of an in-flight call use that call's `fetch`.
        """
        if not self._settings.enabled or self._closed:
            self.stats.bypassed += 1
            return CacheResult(await fetch(timeout), hit=False)
        now = self._clock()
        entry = self._lookup(key, now)
        flight = self._live_flight(key)
        if entry is not None:
            hot = entry.hot()
            entry.last_access = now
            self._entries.move_to_end(key)
            if now < entry.refresh_at:
                self.stats.hits += 1
                return CacheResult(_copy(entry.result), hit=True)
            if self._in_retry_backoff(entry, now):
                self.stats.stale_served += 1
                return CacheResult(_copy(entry.result), hit=True, stale=True)
            if self._may_serve_while_refreshing(entry, now) and (
                flight is not None or (hot and entry.failed_at is None)
            ):
                if flight is None:
                    self._start_flight(key, fetch, refresh=True, background=True)
                self.stats.hits += 1
                return CacheResult(_copy(entry.result), hit=True)
        if flight is None:
            self.stats.misses += 1
            flight = self._start_flight(key, fetch, refresh=entry is not None, background=False)
        else:
            self.stats.coalesced += 1
        try:
            result = await self._wait(flight, timeout)
        except BrokerError as err:
            stale = self._stale_for(key, err, flight)
            if stale is None:
                raise
            self.stats.stale_served += 1
            return CacheResult(_copy(stale.result), hit=True, stale=True)
        return CacheResult(_copy(result), hit=False)

    async def _wait(self, flight: _Flight, timeout: float | None) -> UpstreamResult:  # noqa: ASYNC109
        try:
            if timeout is None:
                return await asyncio.shield(flight.task)
            async with asyncio.timeout(timeout):
                return await asyncio.shield(flight.task)
        except TimeoutError:
            # Ours: the shared task turns every TimeoutError of its own into a BrokerError.
            raise _deadline_error(max(0.0, timeout or 0.0)) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if flight.task.cancelled() and (current is None or current.cancelling() == 0):
                # The shared call was cancelled by close(), not this waiter.
                raise _closed_error() from None
            raise

    def _lookup(self, key: CacheKey, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None and not entry.valid(now):
            self._remove(key)
            self.stats.expirations += 1
            return None
        return entry

    def _live_flight(self, key: CacheKey) -> _Flight | None:
        flight = self._flights.get(key)
        return flight if flight is not None and not flight.task.done() else None

    def _in_retry_backoff(self, entry: CacheEntry, now: float) -> bool:
        return (
            self._settings.serve_stale_on_error
            and entry.failed_at is not None
            and now < entry.failed_at + REFRESH_RETRY_SECONDS
        )

    def _may_serve_while_refreshing(self, entry: CacheEntry, now: float) -> bool:
        left = entry.expires_at - now
        return (
            self._settings.refresh_ahead
            and left >= MIN_REMAINING_FRACTION_WHILE_REFRESHING * entry.lifetime
        )

    def _stale_for(self, key: CacheKey, err: BrokerError, flight: _Flight) -> CacheEntry | None:
        """A still-valid cached token to answer with instead of the refresh's error."""
        if not self._settings.serve_stale_on_error or err.code not in _TRANSIENT_CODES:
            return None
        if not flight.task.done() or flight.task.cancelled() or flight.task.exception() is not err:
            return None  # this waiter's own deadline, not a failed refresh
        entry = self._entries.get(key)
        if entry is None or not entry.valid(self._clock()):
            return None
        return entry

    # --- upstream calls -------------------------------------------------------------------

    def _start_flight(
        self, key: CacheKey, fetch: Fetch, *, refresh: bool, background: bool
    ) -> _Flight:
        self.stats.upstream_calls += 1
        if refresh:
            self.stats.refreshes += 1
        task = asyncio.get_running_loop().create_task(
            self._run_fetch(key, fetch, refresh=refresh, background=background),
            name=f"token-cache-fetch {key.namespace}/{key.service_account}",
        )
        task.add_done_callback(functools.partial(self._flight_done, key))
        flight = _Flight(task=task, background=background)
        self._flights[key] = flight
        return flight

    def _flight_done(self, key: CacheKey, task: asyncio.Task[UpstreamResult]) -> None:
        # Normally _run_fetch has forgotten the flight already; not if cancelled unstarted.
        flight = self._flights.get(key)
        if flight is not None and flight.task is task:
            del self._flights[key]
        # Every waiter may have left: do not let asyncio log "exception was never retrieved".
        if not task.cancelled():
            task.exception()

    async def _run_fetch(
        self, key: CacheKey, fetch: Fetch, *, refresh: bool, background: bool
    ) -> UpstreamResult:
        try:
            try:
                async with asyncio.timeout(self._fetch_timeout + FETCH_GRACE_SECONDS):
                    result = await fetch(self._fetch_timeout)
            except TimeoutError:
                raise _deadline_error(self._fetch_timeout) from None
        except Exception as exc:
            self._fetch_failed(key, exc, refresh=refresh, background=background)
            raise
        else:
            self._store(key, result, fetch, background=background)
            return result
        finally:
            # Before the waiters wake: a request arriving now sees the entry, not the call.
            flight = self._flights.get(key)
            if flight is not None and flight.task is asyncio.current_task():
                del self._flights[key]

    def _fetch_failed(
        self, key: CacheKey, exc: Exception, *, refresh: bool, background: bool
    ) -> None:
        if refresh:
            self.stats.refresh_failures += 1
        if _service_account_not_found(exc):
            self._forget_service_account(key, current_uid=None)
        entry = self._entries.get(key)
        what = "background refresh" if background else ("refresh" if refresh else "fetch")
        code = exc.code.name if isinstance(exc, BrokerError) else type(exc).__name__
        logger.info("token cache: %s of %s failed: %s", what, key, code)
        if entry is None:
            return
        if isinstance(exc, BrokerError) and exc.code in _TRANSIENT_CODES:
            entry.failed_at = self._clock()
        else:
            # A definitive answer: the cached token is no longer the broker's to hand out.
            self._remove(key)

    def _store(
        self, key: CacheKey, result: UpstreamResult, fetch: Fetch, *, background: bool
    ) -> None:
        if self._closed:
            return
        old = self._entries.get(key)
        if background and old is None:
            return  # evicted or expired meanwhile, and nobody is waiting: do not resurrect
        lifetime = token_lifetime(result.token_request)
        if lifetime is None:
            logger.info("token cache: %s: the token's lifetime is unknown; not cached", key)
            if old is not None:
                self._remove(key)
            return
        now = self._clock()
        refresh_at = min(
            refresh_due_at(now, now + lifetime, self._jitter()),
            now + self._settings.max_age_seconds,
        )
        facts = read_token(result.token_request.status.token)
        entry = CacheEntry(
            key=key,
            result=_copy(result),
            issued_at=now,
            lifetime=lifetime,
            refresh_at=max(now, refresh_at),
            last_access=old.last_access if old is not None else now,
            fetch=fetch,
            seq=next(self._seq),
            service_account_uid=facts.service_account_uid,
            facts=facts,
        )
        # A background refresh keeps the key's LRU place; a request makes it the most recent.
        self._entries[key] = entry
        self._by_account.setdefault(_account(key), set()).add(key)
        if not background:
            self._entries.move_to_end(key)
        if entry.service_account_uid is not None:
            self._forget_service_account(key, current_uid=entry.service_account_uid)
        heapq.heappush(self._expiry_heap, (entry.expires_at, entry.seq, key))
        if self._settings.refresh_ahead:
            heapq.heappush(self._refresh_heap, (entry.refresh_at, entry.seq, key))
            self._wakeup.set()
        while len(self._entries) > self._settings.max_entries:
            evicted, _ = self._entries.popitem(last=False)
            self._unindex(evicted)
            self.stats.evictions += 1
        self._compact()
        self.stats.size = len(self._entries)

    def _remove(self, key: CacheKey) -> None:
        self._entries.pop(key, None)
        self._unindex(key)
        self.stats.size = len(self._entries)

    def _unindex(self, key: CacheKey) -> None:
        keys = self._by_account.get(_account(key))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_account[_account(key)]

    def _forget_service_account(self, key: CacheKey, *, current_uid: str | None) -> None:
        """Drop the cached tokens of `key`'s service account that the API server's answer
        shows dead: minted for another UID than `current_uid`, or all of them (None: the
        service account is gone)."""
        stale = [
            other
            for other in self._by_account.get(_account(key), ())
            if current_uid is None
            or self._entries[other].service_account_uid not in (None, current_uid)
        ]
        for other in stale:
            self._remove(other)
        if stale:
            why = "is gone" if current_uid is None else "was recreated (another UID)"
            logger.info(
                "token cache: dropped %d token(s) of %s/%s: the service account %s",
                len(stale),
                key.namespace,
                key.service_account,
                why,
            )

    # --- maintenance ----------------------------------------------------------------------

    def run_maintenance(self) -> None:
        """Sweep expired entries (O(expired)) and, with refreshAhead, start the background
        refreshes of hot keys that reached their refresh point. The task of `start()` runs
        this; tests call it after moving their clock (then `await wait_for_refreshes()`)."""
        if self._closed:
            return
        now = self._clock()
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.seq == seq:
                self._remove(key)
                self.stats.expirations += 1
        if not self._settings.refresh_ahead:
            return
        heap = self._refresh_heap
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if (
                entry is None
                or entry.seq != seq
                or entry.failed_at is not None
                or not entry.hot()
                or not self._may_serve_while_refreshing(entry, now)
                or self._live_flight(key) is not None
            ):
                continue  # a cold (or failing) key is refreshed by its next request
            self._start_flight(key, entry.fetch, refresh=True, background=True)

    def _compact(self) -> None:
        """Rebuild a heap that holds mostly items of replaced or evicted entries."""
        limit = 2 * len(self._entries) + 64
        if len(self._expiry_heap) > limit:
            self._expiry_heap = [(e.expires_at, e.seq, k) for k, e in self._entries.items()]
            heapq.heapify(self._expiry_heap)
        if len(self._refresh_heap) > limit:
            self._refresh_heap = [(e.refresh_at, e.seq, k) for k, e in self._entries.items()]
            heapq.heapify(self._refresh_heap)

    def start(self) -> None:
        """Start the maintenance task (the sweep every minute; refresh-ahead on time)."""
        if self._maintenance is None and not self._closed:
            self._maintenance = asyncio.get_running_loop().create_task(
                self._maintain_forever(), name="token-cache-maintenance"
            )

    async def _maintain_forever(self) -> None:
        while True:
            try:
                self.run_maintenance()
            except Exception:
                logger.exception("token cache maintenance failed")
            delay = SWEEP_INTERVAL_SECONDS
            if self._settings.refresh_ahead and self._refresh_heap:
                delay = min(delay, max(0.0, self._refresh_heap[0][0] - self._clock()))
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wakeup.wait()

    async def wait_for_refreshes(self) -> None:
        """Return once no upstream call of the cache is running (their errors are not
        raised here). Waiting does not cancel them if this coroutine is cancelled."""
        while pending := [f.task for f in self._flights.values() if not f.task.done()]:
            await asyncio.wait(pending)

    async def close(self) -> None:
        """Cancel the maintenance task and running calls, forget every token. Later calls
        to get_or_fetch go straight to upstream."""
        self._closed = True
        tasks: list[asyncio.Task[object]] = [f.task for f in self._flights.values()]
        if self._maintenance is not None:
            tasks.append(self._maintenance)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._flights.clear()
        self._entries.clear()
        self._by_account.clear()
        self._expiry_heap.clear()
        self._refresh_heap.clear()
        self.stats.size = 0


def token_lifetime(token_request: pb.TokenRequest) -> float | None:
    """Seconds from issue to expiry by the API server's clock; None when unknown.

    `status.expirationTimestamp` minus the JWT's `iat`, else `metadata.creationTimestamp`
    (both set by the server at issue); else `spec.expirationSeconds` as the server granted it.
    """
    status = token_request.status
    if not status.HasField("expiration_timestamp"):
        return None
    ts = status.expiration_timestamp
    issued = read_token(status.token).issued_at
    if issued is None and token_request.metadata.HasField("creation_timestamp"):
        created = token_request.metadata.creation_timestamp
        issued = created.seconds + created.nanos / 1e9
    spec = token_request.spec
    granted = spec.expiration_seconds if spec.HasField("expiration_seconds") else None
    return lifetime_seconds(ts.seconds + ts.nanos / 1e9, issued, granted)


def _account(key: CacheKey) -> tuple[str, str]:
    return (key.namespace, key.service_account)


def _service_account_not_found(exc: Exception) -> bool:
    """The API server answered that the service account itself does not exist (not, say, a
    bound Pod: that NOT_FOUND names another kind)."""
    return (
        isinstance(exc, BrokerError)
        and exc.code == grpc.StatusCode.NOT_FOUND
        and exc.metadata.get(METADATA_KUBERNETES_KIND) == "serviceaccounts"
    )


def _copy(result: UpstreamResult) -> UpstreamResult:
    """A private copy: callers may not mutate the cached TokenRequest."""
    token_request = pb.TokenRequest()
    token_request.CopyFrom(result.token_request)
    return UpstreamResult(token_request=token_request, warnings=result.warnings)


def _deadline_error(seconds: float) -> BrokerError:
    # As broker.upstream's: a cached call times out like an uncached one.
    return BrokerError.of(
        Reason.UPSTREAM_TIMEOUT,
        "the deadline expired before the Kubernetes API server answered",
        metadata={"timeoutSeconds": f"{seconds:.3f}"},
    )


def _closed_error() -> BrokerError:
    return BrokerError.of(
        Reason.TOKEN_CACHE_CLOSED,
        "the token broker is shutting down",
        retry_after=1.0,
    )
