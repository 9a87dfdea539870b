"""The request path of CreateToken, independent of the transport: credentials and a request in,
the answer's bytes (or a BrokerError) out, and one record of the call.

    admission (admission.py) -> receive the request (bounded: receive.py)
    -> failed-authentication throttle (authn_throttle.py) -> authenticate (authn.py)
    -> decision memo (decision_memo.py), or: parse, validate (validation.py), decide (policy.py)
    -> rate limits (ratelimit.py) -> token cache (cache.py)
    -> upstream slot (upstream_guard.py) -> Kubernetes API (upstream.py)
    -> one audit line (audit.py), whatever happened.

A transport is a thin adapter around `RequestPath.create_token` (a *door*, named in the audit
line's `door`): gRPC (broker.service) turns its call's metadata into `Credentials`, hands over
a function that receives the request bytes and the call's remaining deadline, answers the
bytes or the error's status, and writes the access line and the gRPC metrics from the same
`TokenCall` record. The HTTP doors (broker.http_kubernetes, broker.http_oauth, served by
broker.http_door) do the same from an HTTP request: their receive function turns the HTTP
request into the request message's bytes, and a request that cannot be turned into one is
`TokenCall.refusal`, answered only after authentication like a message that does not parse.

Authentication decides before anything else is answered, so that an unauthenticated caller
learns nothing but UNAUTHENTICATED (not even that its bytes do not parse); before it, only the
limit on failed authentication per peer address: a throttled address is refused without any
authentication work, and its refusals are audited once per episode and in summaries, not line
by line. Until the request is received and the caller authenticated, a call is *pending*, and
pending calls are bounded (`server.maxPendingCalls`). The whole call is bounded by the caller's
deadline, else by `server.defaultDeadlineSeconds`.

The shape of a cache hit (what makes it cheap, with every guarantee kept):

- Decide once per distinct call. Validation, the policy's decision, the effective request, the
  cache key, the rate-limit buckets and the metric series are the same for the same caller,
  request bytes and policy: the decision memo keeps them (exactly invalidated: see
  broker.decision_memo). Authentication still runs for every call, the policy's decision is
  counted for every call, and the rate limits charge every call.
- Serialize once. The token cache keeps each token's answer serialized (`CacheEntry.response`),
  and the gRPC method takes and returns bytes: a hit parses nothing and serializes nothing.
- Observe once. The call's audit line is rendered from a template made once per decision and
  cached token (`AuditTemplate`: only the time, request id, peer and latency are filled in),
  and the transport renders the access line from the same record.

Two checks come after a token exists, and withhold it (the caller gets a refusal that says a
token was minted and not handed out, the audit line its jti, `token_broker_tokens_withheld`
counts it):
- its own lifetime against the deciding rule's maximum (issued_token.py), inside the fetch that
  feeds the cache, and again on every hit under the rule in force then;
- its audit line, fail-closed: a token whose line could not be written is not handed out, and
  is removed from the cache; a line of its own records the refusal (not awaited).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable

from broker.admission import PendingCalls
from broker.audit import AuditLog, AuditRecord, AuditTemplate, AuditWriteError
from broker.authn import AuthenticationFailed, Authenticator
from broker.authn_throttle import (
    SCOPE_PEER,
    AuthFailureThrottle,
    PeerRefusal,
    ThrottleSummary,
    peer_throttled,
)
from broker.bounded import bounded
from broker.cache import CacheEntry, CacheKey, TokenCache
from broker.credentials import Credentials
from broker.decision_memo import DEFAULT_MAX_ENTRIES, Decided, DecisionMemo, PolicySource
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import Identity
from broker.issued_token import IssuedTokenRefused, check_lifetime, read_token
from broker.metrics import BrokerMetrics
from broker.policy import Decision
from broker.ratelimit import RateLimiter
from broker.reasons import Reason
from broker.receive import ReceiveBound, malformed, parse
from broker.request_id import new_request_id
from broker.upstream import UpstreamClient, UpstreamResult
from broker.upstream_guard import UpstreamGuard
from broker.validation import validate_create_token

logger = logging.getLogger(__name__)

CREATE_TOKEN_REQUEST: str = pb.CreateTokenRequest.DESCRIPTOR.full_name
# The doors (the audit line's `door`).
DOOR_GRPC = "grpc"
DOOR_HTTP_KUBERNETES = "http-kubernetes"
DOOR_HTTP_OAUTH = "http-oauth"
DOORS = (DOOR_GRPC, DOOR_HTTP_KUBERNETES, DOOR_HTTP_OAUTH)
# The request of a call whose request message never arrived or did not parse (its audit line).
_NO_REQUEST = pb.CreateTokenRequest()

# Receives the request's bytes (None: the caller sent none); the transport's.
Receive = Callable[[], Awaitable[bytes | None]]
TimeRemaining = Callable[[], float | None]


class TokenCall:
    """One CreateToken call: what it learned on its way, for its audit and access lines."""

    __slots__ = (
        "_request",
        "cache",
        "cache_key",
        "credentials",
        "decided",
        "door",
        "error",
        "hit_line",
        "identity",
        "pending",
        "quiet",
        "raw",
        "refusal",
        "request_id",
        "result",
        "started",
        "throttled",
        "time_remaining",
        "token_lifetime",
    )

    def __init__(
        self,
        request_id: str,
        credentials: Credentials,
        *,
        time_remaining: TimeRemaining,
        started: float | None = None,
        door: str = DOOR_GRPC,
    ) -> None:
        self.request_id = request_id
        self.door = door
        # The transport could not turn what it received into a request message: answered
        # after authentication (an unauthenticated caller learns nothing but that).
        self.refusal: BrokerError | None = None
        self.credentials = credentials
        self.time_remaining = time_remaining
        self.started = time.monotonic() if started is None else started
        # Counted in the pending calls (broker.admission) until authenticated and received.
        self.pending = False
        # The request's bytes, once received.
        self.raw: bytes | None = None
        self._request: pb.CreateTokenRequest | None = None
        self.identity: Identity | None = None
        self.decided: Decided | None = None
        self.result: UpstreamResult | None = None
        # "hit" or "miss" once the token cache answered; None: not through the cache.
        self.cache: str | None = None
        # The cache entry the result came from or went to (None: not cacheable).
        self.cache_key: CacheKey | None = None
        # Refused before authentication: the peer address failed authentication too often.
        self.throttled: PeerRefusal | None = None
        # A cache hit's audit line, from its template (None: built from an AuditRecord).
        self.hit_line: AuditTemplate | None = None
        # The handed-out token's own lifetime (exp - iat), for the metrics.
        self.token_lifetime: int | None = None
        # What the caller is answered, if not the token.
        self.error: BrokerError | None = None
        # Its access line at debug (one of a flood of refusals counted, not written one by one).
        self.quiet = False

    @property
    def peer(self) -> str:
        return self.credentials.peer

    @property
    def cache_hit(self) -> bool:
        return self.cache == "hit"

    @property
    def request(self) -> pb.CreateTokenRequest | None:
        """The request, parsed (None: it never arrived, or does not parse)."""
        if self._request is None and self.raw is not None:
            with contextlib.suppress(BrokerError):
                self._request = parse(pb.CreateTokenRequest.FromString, self.raw, "")
        return self._request

    @request.setter
    def request(self, value: pb.CreateTokenRequest) -> None:
        self._request = value

    def access_fields(self) -> dict[str, str]:
        """The access line's fields besides method, code, latency and request id (bounded):
        what was asked, who asked, the cache's answer, the refusal's reason."""
        decided = self.decided
        if decided is not None:
            fields = dict(decided.access_fields)
        else:
            fields = {}
            request = self.request
            if request is not None:
                fields["namespace"] = bounded(request.namespace)
                fields["service_account"] = bounded(request.service_account)
            if self.identity is not None:
                fields.update(identity_fields(self.identity))
        if self.cache is not None:
            fields["cache"] = self.cache
        if self.error is not None:
            fields["reason"] = bounded(self.error.reason)
        return fields


def identity_fields(identity: Identity) -> dict[str, str]:
    fields = {"user": bounded(identity.name), "auth_method": identity.method}
    if identity.certificate_field is not None:
        fields["certificate_field"] = identity.certificate_field
    return fields


class RequestPath:
    """CreateToken's request path (see the module docstring); one per server, shared by the
    transports."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        policy: PolicySource,
        upstream: UpstreamClient,
        audit: AuditLog,
        cache: TokenCache,
        limiter: RateLimiter,
        guard: UpstreamGuard,
        metrics: BrokerMetrics | None = None,
        throttle: AuthFailureThrottle | None = None,
        receive_timeout_seconds: float = 10.0,
        default_deadline_seconds: float = 60.0,
        max_pending_calls: int = 2000,
        memo_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._authenticator = authenticator
        self._policy = policy
        self._upstream = upstream
        self._audit = audit
        self._cache = cache
        self._limiter = limiter
        self._guard = guard
        self.metrics = metrics if metrics is not None else BrokerMetrics()
        self._receive = ReceiveBound(receive_timeout_seconds)
        self._default_deadline = default_deadline_seconds
        self._pending = PendingCalls(max_pending_calls)
        self._throttle = throttle if throttle is not None else AuthFailureThrottle(None)
        self.memo = DecisionMemo(policy, max_entries=memo_entries)
        self.metrics.watch_memo(self.memo)

    async def close(self) -> None:
        """Audit the throttled refusals no line has reported yet (before the audit log
        closes, after the last call)."""
        await self._audit_summaries(self._throttle.pending())

    async def _audit_summaries(self, summaries: list[ThrottleSummary]) -> None:
        for summary in summaries:
            record = AuditRecord.for_call(
                pb.CreateTokenRequest(),
                request_id=new_request_id(),
                identity=None,
                peer=summary.peer,
                latency_ms=0.0,
                error=peer_throttled(0.0),  # what those calls were answered
                suppressed_refusals=summary.suppressed,
                door=None,  # the peer's refusals, through any door
            )
            # A failure is the audit log's to report; no call waits for this line.
            with contextlib.suppress(AuditWriteError):
                await self._audit.write(record)

    async def create_token(self, call: TokenCall, receive: Receive) -> bytes:
        """The answer (a serialized CreateTokenResponse), its audit line written; or the
        BrokerError to answer instead (also in `call.error`), its audit line written."""
        metrics = self.metrics
        metrics.in_flight_calls += 1
        try:
            return await self._create_token(call, receive)
        finally:
            metrics.in_flight_calls -= 1

    async def _create_token(self, call: TokenCall, receive: Receive) -> bytes:
        call.pending = self._pending.admit()
        response: bytes | None = None
        error: BrokerError | None = None
        summaries = self._throttle.ended()
        if summaries:
            await self._audit_summaries(summaries)
        if not call.pending:
            error = self._pending.shed_error()
            self.metrics.call_shed(error.reason)
        else:
            try:
                response = await self._answer(call, receive)
            except BrokerError as err:
                error = err
                if err.reason == Reason.REQUEST_RECEIVE_TIMEOUT:
                    self.metrics.call_shed(err.reason)
            except Exception as exc:
                # Never UNKNOWN, never a stack trace to the caller. The log has the frames but
                # not the exception text, which could quote a token from a response.
                logger.error(
                    "CreateToken failed unexpectedly: %s\n%s",
                    type(exc).__name__,
                    "".join(traceback.format_tb(exc.__traceback__)),
                    extra={"request_id": call.request_id},
                )
                error = BrokerError.of(Reason.INTERNAL, "internal error in the token broker")
            finally:
                self._no_longer_pending(call)
        try:
            if call.throttled is not None and not call.throttled.audited:
                call.quiet = True  # counted in its peer's episode, reported by a later line
            elif error is None and call.hit_line is not None:
                line = call.hit_line.line(
                    request_id=call.request_id,
                    peer=call.peer,
                    latency_ms=(time.monotonic() - call.started) * 1000,
                    now=time.time(),
                    door=call.door,
                )
                if line is None:  # longer than a line may be: the record's own bounds
                    await self._audit.write(self._audit_record(call, None))
                else:
                    await self._audit.write_line(line)
            else:
                await self._audit.write(self._audit_record(call, error))
        except AuditWriteError as exc:
            # Fail closed: a token nobody can account for is not handed out, nor left in the
            # cache for the next caller. A call that was refused anyway keeps its own status.
            if error is None:
                error = exc.as_broker_error(cache_hit=call.cache_hit)
                if call.cache_key is not None and call.result is not None:
                    self._cache.discard(call.cache_key, call.result.token_request)
                # Its line (queued or stuck) may never be written, or be written late saying
                # the token was handed out: this one says what happened, if the sink recovers.
                self._audit.write_nowait(self._audit_record(call, error))
        if error is not None:
            if call.result is not None:
                self.metrics.token_withheld(error.reason)
            call.error = error
            raise error
        assert response is not None
        decided = call.decided
        assert decided is not None  # answered
        if decided.issued_series is None:
            # Resolved when the first token is handed out, as the series first appears then.
            decided.issued_series = self.metrics.issued_series(
                decided.request.namespace, decided.identity.name
            )
        self.metrics.token_handed_out(decided.issued_series, call.token_lifetime)
        return response

    def _audit_record(self, call: TokenCall, error: BaseException | None) -> AuditRecord:
        decided = call.decided
        decision = decided.decision if decided is not None else None
        return AuditRecord.for_call(
            call.request or _NO_REQUEST,
            request_id=call.request_id,
            identity=call.identity,
            peer=call.peer,
            latency_ms=(time.monotonic() - call.started) * 1000,
            result=call.result,
            error=error,
            rule=decision.rule if decision is not None else None,
            cache_hit=call.cache_hit,
            suppressed_refusals=call.throttled.suppressed if call.throttled else None,
            door=call.door,
        )

    async def _answer(self, call: TokenCall, receive: Receive) -> bytes:
        """The answer of an admitted call, within its deadline: the caller's (which the
        transport enforces), else the default one."""
        if call.time_remaining() is not None:
            return await self._steps(call, receive)
        deadline = asyncio.get_running_loop().time() + self._default_deadline
        try:
            async with asyncio.timeout_at(deadline) as bound:
                return await self._steps(call, receive)
        except TimeoutError:
            if not bound.expired():
                raise
            raise BrokerError.of(
                Reason.DEFAULT_DEADLINE_EXCEEDED,
                f"the call did not finish within the broker's default deadline of "
                f"{self._default_deadline:g}s (the caller set none)",
                metadata={"deadlineSeconds": f"{self._default_deadline:g}"},
            ) from None

    async def _steps(self, call: TokenCall, receive: Receive) -> bytes:
        raw = await self._receive.receive(receive)
        if raw is not None:
            call.raw = raw
        identity = await self._authenticate(call)
        self._no_longer_pending(call)
        if call.refusal is not None:
            raise call.refusal
        if raw is None:
            # Answered only to an authenticated caller (an unauthenticated one learns nothing
            # but UNAUTHENTICATED).
            raise malformed("no request message: a unary call takes exactly one")
        decided = self.memo.get(identity, raw)
        if decided is None:
            decided = self._decide(call, identity, raw)
        call.decided = decided
        call.request = decided.request
        return await self._grant(call, decided)

    def _no_longer_pending(self, call: TokenCall) -> None:
        if call.pending:
            call.pending = False
            self._pending.done()

    async def _authenticate(self, call: TokenCall) -> Identity:
        throttle = self._throttle
        if throttle.enabled:
            call.throttled = throttle.admit(call.peer)
            if call.throttled is not None:
                self.metrics.rate_limit_refused(SCOPE_PEER)
                raise call.throttled.error()
        try:
            identity = await self._authenticator.authenticate(call.credentials)
        except AuthenticationFailed as err:
            self.metrics.authentication_failure(err.method, err.reason)
            throttle.failed(call.peer)
            raise
        call.identity = identity
        return identity

    def _decide(self, call: TokenCall, identity: Identity, raw: bytes) -> Decided:
        """Everything the memo keeps, decided for this caller and request (no await: the
        policy in force is the one it was decided under)."""
        request = parse(pb.CreateTokenRequest.FromString, raw, CREATE_TOKEN_REQUEST)
        policy = self.memo.policy()
        decided = Decided(policy=policy, identity=identity, request=request)
        decided.access_fields = {
            "namespace": bounded(request.namespace),
            "service_account": bounded(request.service_account),
            **identity_fields(identity),
        }
        try:
            validate_create_token(request)
        except BrokerError:
            decided.invalid = True
            self.memo.put(raw, decided)
            return decided
        spec = request.token_request.spec
        decided.requested_lifetime = self.metrics.requested_lifetime_value(
            spec.expiration_seconds if spec.HasField("expiration_seconds") else None
        )
        decided.decision = decision = policy.decide(identity, request)
        decided.decision_series = self.metrics.decision_series(
            decision.allowed, decision.reason, identity.name
        )
        if decision.allowed:
            decided.effective = effective = decision.effective_request(request)
            if self._cache.settings.enabled and decision.cacheable and not effective.dry_run:
                decided.cache_key = CacheKey.for_request(identity, effective)
        self.memo.put(raw, decided)
        return decided

    async def _grant(self, call: TokenCall, decided: Decided) -> bytes:
        if decided.invalid:
            # Its refusal, made again (each call raises an exception of its own).
            validate_create_token(decided.request)
        metrics = self.metrics
        metrics.requested_lifetime.observe(decided.requested_lifetime)
        decided.decision_series.inc()
        decision = decided.decision
        assert decision is not None
        if not decision.allowed:
            raise decision.error()
        effective = decided.effective
        assert effective is not None
        identity = decided.identity
        # Rate limits count every request, hits included: they protect the broker too.
        limiter = self._limiter
        if limiter.enabled:
            if decided.buckets is None:
                decided.buckets = limiter.buckets(
                    identity,
                    effective.namespace,
                    effective.service_account,
                    rule=decision.rule,
                    override=decision.rate_limit,
                )
            await limiter.check_buckets(decided.buckets)

        maximum = decision.max_expiration_seconds
        assert maximum is not None  # allowed
        key = decided.cache_key
        cache = self._cache
        if key is not None and not cache.closed:
            call.cache_key = key
            entry = cache.fresh(key)
            if entry is not None:
                return self._hit(call, decided, decision, entry, maximum)
        return await self._through_cache(call, decided, decision, effective, maximum)

    def _hit(
        self,
        call: TokenCall,
        decided: Decided,
        decision: Decision,
        entry: CacheEntry,
        maximum: int,
    ) -> bytes:
        """A fresh cached token: checked against the rule in force, its answer and audit
        line from what was rendered before."""
        call.result = result = entry.result
        call.cache = "hit"
        longest = entry.facts.longest_validity_seconds
        if longest is None or longest > maximum:
            # Checked when minted, and again under the rule in force now: a policy reload
            # may have lowered its maximum.
            try:
                check_lifetime(result, maximum=maximum, rule=decision.rule)
            except IssuedTokenRefused:
                assert call.cache_key is not None
                self._cache.discard(call.cache_key, result.token_request)
                raise
        call.token_lifetime = entry.facts.lifetime_seconds
        hit_line = decided.hit_line
        if hit_line is None or hit_line[0] != entry.seq:
            template = AuditTemplate.of(self._audit_record(call, None))
            decided.hit_line = hit_line = (entry.seq, template)
        call.hit_line = hit_line[1]
        return entry.response(decision.warnings)

    async def _through_cache(
        self,
        call: TokenCall,
        decided: Decided,
        decision: Decision,
        effective: pb.CreateTokenRequest,
        maximum: int,
    ) -> bytes:
        """Every other case: a miss, a refresh, a joined call in flight, a stale token served,
        or a request the cache does not take."""
        namespace, service_account = effective.namespace, effective.service_account

        async def fetch(timeout: float | None) -> UpstreamResult:  # noqa: ASYNC109
            # Only calls that reach the API server take a slot (cache misses).
            started = time.monotonic()
            async with self._guard.slot(namespace, service_account, timeout=timeout):
                left = None if timeout is None else timeout - (time.monotonic() - started)
                try:
                    result = await self._upstream.create_token(
                        namespace,
                        service_account,
                        effective.token_request,
                        dry_run=bool(effective.dry_run),
                        field_manager=effective.field_manager,
                        field_validation=effective.field_validation,
                        # None (no deadline): the configured request timeout applies.
                        timeout=left,
                    )
                except BrokerError as err:
                    # A 429 that outlasted the retries: hold this target back for its
                    # Retry-After instead of sending more.
                    self._guard.record_error(namespace, service_account, err)
                    raise
            # Before the cache stores it or any waiter gets it.
            check_lifetime(result, maximum=maximum, rule=decision.rule)
            return result

        key = call.cache_key
        try:
            if key is not None and self._cache.cacheable(decision, effective):
                cached = await self._cache.get_or_fetch(key, fetch, timeout=call.time_remaining())
                call.result = result = cached.result
                call.cache = "hit" if cached.hit else "miss"
                if cached.hit:
                    # Checked when minted, and again under the rule in force now: a policy
                    # reload may have lowered its maximum.
                    try:
                        check_lifetime(result, maximum=maximum, rule=decision.rule)
                    except IssuedTokenRefused:
                        self._cache.discard(key, result.token_request)
                        raise
            else:
                call.cache_key = None
                call.result = result = await fetch(call.time_remaining())
        except IssuedTokenRefused as err:
            call.result = err.result  # minted: the audit line records it
            raise
        call.token_lifetime = read_token(result.token_request.status.token).lifetime_seconds
        return pb.CreateTokenResponse(
            token_request=result.token_request,
            warnings=[*decision.warnings, *result.warnings],
        ).SerializeToString()
