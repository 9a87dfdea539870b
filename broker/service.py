"""The TokenBrokerService servicer: wires the request-path concerns together.

CreateToken = admission (admission.py) -> receive the request message (receive.py)
-> authenticate (authn.py) -> validate (validation.py) -> policy (policy.py)
-> rate limits (ratelimit.py) -> cache (cache.py) -> upstream slot (upstream_guard.py)
-> Kubernetes API (upstream.py), then one audit line (audit.py) whatever happened. Each concern
lives in its own module; this one only orders them and turns failures into gRPC statuses.

CreateToken is registered request-streaming with raw bytes in (`add_token_broker_service`):
the handler starts when the call's headers arrive and receives its one message itself, within
`server.receiveTimeoutSeconds`, so a message that never comes or does not parse is an answer
of the broker's (counted, logged, audited), not gRPC's. Until it is received and the caller
authenticated, a call is *pending*, and pending calls are bounded (`server.maxPendingCalls`).
The whole call is bounded by the caller's deadline, else by `server.defaultDeadlineSeconds`.

Authentication decides before anything else is answered, so that an unauthenticated caller
learns nothing but UNAUTHENTICATED (not even that its bytes do not parse); validation comes
before policy because policy reads the request's fields. Before it, only the limit on failed
authentication per peer address (authn_throttle.py): a throttled address is refused without
any authentication work, and its refusals are audited once per episode and in summaries, not
line by line.

Two checks come after a token exists, and withhold it (the caller gets a refusal that says a
token was minted and not handed out, the audit line its jti, `token_broker_tokens_withheld`
counts it):
- its own lifetime against the deciding rule's maximum (issued_token.py), inside the fetch that
  feeds the cache: a token longer than the rule allows is never cached nor shared with the
  single-flight waiters;
- its audit line, fail-closed: a token whose line could not be written is not handed out, and
  is removed from the cache; a line of its own records the refusal (not awaited).

Along the way it feeds the domain metrics (broker.metrics) and notes, for the call's access
log line (broker.observe), the namespace, service account, caller and refusal reason. The
request id is the one the interceptor bound (else computed here, as it would be).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
from grpc import aio

from broker.admission import PendingCalls
from broker.audit import AuditLog, AuditRecord, AuditWriteError
from broker.authn import AuthenticationFailed, Authenticator
from broker.authn_throttle import (
    SCOPE_PEER,
    AuthFailureThrottle,
    PeerRefusal,
    ThrottleSummary,
    peer_throttled,
)
from broker.cache import CacheKey, TokenCache
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import Identity
from broker.issued_token import IssuedTokenRefused, check_lifetime
from broker.logs import bind_request_id, current_request_id
from broker.metrics import BrokerMetrics
from broker.observe import annotate_call, quiet_call
from broker.policy import Decision, Policy
from broker.ratelimit import RateLimiter
from broker.reasons import Reason
from broker.receive import parse, receive_one
from broker.request_id import REQUEST_ID_METADATA_KEY, new_request_id, request_id_from
from broker.upstream import UpstreamClient, UpstreamResult
from broker.upstream_guard import UpstreamGuard
from broker.validation import validate_create_token

logger = logging.getLogger(__name__)

CREATE_TOKEN_REQUEST: str = pb.CreateTokenRequest.DESCRIPTOR.full_name
# The request of a call whose request message never arrived or did not parse (its audit line).
_NO_REQUEST = pb.CreateTokenRequest()


class PolicySource(Protocol):
    """Where the policy in force comes from (a reloading PolicyStore, or a fixed Policy)."""

    @property
    def current(self) -> Policy: ...


@dataclasses.dataclass
class _Call:
    """What one CreateToken call learned on its way, for the audit line."""

    # Counted in the pending calls (broker.admission) until authenticated and received.
    pending: bool = False
    # None until the request message arrived and parsed.
    request: pb.CreateTokenRequest | None = None
    identity: Identity | None = None
    decision: Decision | None = None
    result: UpstreamResult | None = None
    # Answered from the token cache: no API-server call for this request.
    cache_hit: bool = False
    # Refused before authentication: the peer address failed authentication too often.
    throttled: PeerRefusal | None = None
    # The cache entry the result came from or went to (None: not cacheable).
    cache_key: CacheKey | None = None


class TokenBrokerServicer:
    """The CreateToken handler (register it with `add_token_broker_service`)."""

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
    ) -> None:
        self._authenticator = authenticator
        self._policy = policy
        self._upstream = upstream
        self._audit = audit
        self._cache = cache
        self._limiter = limiter
        self._guard = guard
        self._metrics = metrics if metrics is not None else BrokerMetrics()
        self._receive_timeout = receive_timeout_seconds
        self._default_deadline = default_deadline_seconds
        self._pending = PendingCalls(max_pending_calls)
        self._throttle = throttle if throttle is not None else AuthFailureThrottle(None)

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
            )
            # A failure is the audit log's to report; no call waits for this line.
            with contextlib.suppress(AuditWriteError):
                await self._audit.write(record)

    async def CreateToken(
        self,
        requests: AsyncIterator[bytes],
        context: aio.ServicerContext[Any, Any],
    ) -> pb.CreateTokenResponse:
        request_id = current_request_id() or request_id_from(context.invocation_metadata())
        with bind_request_id(request_id), self._metrics.in_flight.track_inprogress():
            return await self._handle(requests, context, request_id)

    async def _handle(
        self,
        requests: AsyncIterator[bytes],
        context: aio.ServicerContext[Any, Any],
        request_id: str,
    ) -> pb.CreateTokenResponse:
        started = time.monotonic()
        call = _Call(pending=self._pending.admit())
        response: pb.CreateTokenResponse | None = None
        error: BrokerError | None = None
        await self._audit_summaries(self._throttle.ended())
        if not call.pending:
            error = self._pending.shed_error()
            self._metrics.call_shed(error.reason)
            await context.send_initial_metadata(((REQUEST_ID_METADATA_KEY, request_id),))
        else:
            try:
                await context.send_initial_metadata(((REQUEST_ID_METADATA_KEY, request_id),))
                response = await self._answer(requests, context, call)
            except BrokerError as err:
                error = err
                if err.reason == Reason.REQUEST_RECEIVE_TIMEOUT:
                    self._metrics.call_shed(err.reason)
            except Exception as exc:
                # Never UNKNOWN, never a stack trace to the caller. The log has the frames but
                # not the exception text, which could quote a token from a response.
                logger.error(
                    "CreateToken failed unexpectedly: %s\n%s",
                    type(exc).__name__,
                    "".join(traceback.format_tb(exc.__traceback__)),
                    extra={"request_id": request_id},
                )
                error = BrokerError.of(Reason.INTERNAL, "internal error in the token broker")
            finally:
                self._no_longer_pending(call)
        request = call.request if call.request is not None else _NO_REQUEST
        record = self._audit_record(request, request_id, context, call, started, error)
        try:
            if call.throttled is not None and not call.throttled.audited:
                quiet_call()  # counted in its peer's episode, reported by a later line
            else:
                await self._audit.write(record)
        except AuditWriteError as exc:
            # Fail closed: a token nobody can account for is not handed out, nor left in the
            # cache for the next caller. A call that was refused anyway keeps its own status.
            if error is None:
                error = exc.as_broker_error(cache_hit=call.cache_hit)
                if call.cache_key is not None and call.result is not None:
                    self._cache.discard(call.cache_key, call.result.token_request)
                # Its line (queued or stuck) may never be written, or be written late saying
                # the token was handed out: this one says what happened, if the sink recovers.
                self._audit.write_nowait(
                    self._audit_record(request, request_id, context, call, started, error)
                )
        if error is not None:
            if call.result is not None:
                self._metrics.token_withheld(error.reason)
            annotate_call(reason=error.reason)
            await error.abort(context)
        assert response is not None
        self._metrics.token_issued(
            request.namespace,
            record.token_lifetime_seconds,
            call.identity.name if call.identity is not None else None,
        )
        return response

    @staticmethod
    def _audit_record(
        request: pb.CreateTokenRequest,
        request_id: str,
        context: aio.ServicerContext[Any, Any],
        call: _Call,
        started: float,
        error: BaseException | None,
    ) -> AuditRecord:
        return AuditRecord.for_call(
            request,
            request_id=request_id,
            identity=call.identity,
            peer=context.peer(),
            latency_ms=(time.monotonic() - started) * 1000,
            result=call.result,
            error=error,
            rule=call.decision.rule if call.decision is not None else None,
            cache_hit=call.cache_hit,
            suppressed_refusals=call.throttled.suppressed if call.throttled else None,
        )

    async def _answer(
        self,
        requests: AsyncIterator[bytes],
        context: aio.ServicerContext[Any, Any],
        call: _Call,
    ) -> pb.CreateTokenResponse:
        """The answer of an admitted call, within its deadline: the caller's (which gRPC
        enforces), else the default one."""
        deadline = None
        if context.time_remaining() is None:
            deadline = asyncio.get_running_loop().time() + self._default_deadline
        try:
            async with asyncio.timeout_at(deadline) as bound:
                malformed = await self._receive(requests, call)
                call.identity = identity = await self._authenticate(context, call)
                self._no_longer_pending(call)
                if malformed is not None:
                    raise malformed
                assert call.request is not None
                return await self._create_token(call.request, context, call, identity)
        except TimeoutError:
            if not bound.expired():
                raise
            raise BrokerError.of(
                Reason.DEFAULT_DEADLINE_EXCEEDED,
                f"the call did not finish within the broker's default deadline of "
                f"{self._default_deadline:g}s (the caller set none)",
                metadata={"deadlineSeconds": f"{self._default_deadline:g}"},
            ) from None

    async def _receive(self, requests: AsyncIterator[bytes], call: _Call) -> BrokerError | None:
        """Receive and parse the request message into `call.request`, before authentication,
        for the audit and access lines (what was asked). Returns the REQUEST_MALFORMED
        refusal of a message that does not parse (or of a stream without one): it is
        answered only to an authenticated caller, since an unauthenticated one learns
        nothing but UNAUTHENTICATED. A message that does not arrive in time ends the call
        at once (REQUEST_RECEIVE_TIMEOUT), authenticated or not."""
        try:
            raw = await receive_one(requests, self._receive_timeout)
            call.request = request = parse(
                pb.CreateTokenRequest.FromString, raw, CREATE_TOKEN_REQUEST
            )
        except BrokerError as err:
            if err.reason == Reason.REQUEST_MALFORMED:
                return err
            raise
        annotate_call(namespace=request.namespace, service_account=request.service_account)
        return None

    def _no_longer_pending(self, call: _Call) -> None:
        if call.pending:
            call.pending = False
            self._pending.done()

    async def _authenticate(self, context: aio.ServicerContext[Any, Any], call: _Call) -> Identity:
        peer = context.peer() or ""
        call.throttled = self._throttle.admit(peer)
        if call.throttled is not None:
            self._metrics.rate_limit_refused(SCOPE_PEER)
            raise call.throttled.error()
        try:
            identity = await self._authenticator.authenticate(context)
        except AuthenticationFailed as err:
            self._metrics.authentication_failure(err.method, err.reason)
            self._throttle.failed(peer)
            raise
        annotate_call(
            user=identity.name,
            auth_method=identity.method,
            certificate_field=identity.certificate_field,
        )
        return identity

    async def _create_token(
        self,
        request: pb.CreateTokenRequest,
        context: aio.ServicerContext[Any, Any],
        call: _Call,
        identity: Identity,
    ) -> pb.CreateTokenResponse:
        validate_create_token(request)
        spec = request.token_request.spec
        self._metrics.token_requested(
            spec.expiration_seconds if spec.HasField("expiration_seconds") else None
        )
        call.decision = decision = self._policy.current.decide(identity, request)
        self._metrics.policy_decision(decision.allowed, decision.reason, identity.name)
        if not decision.allowed:
            raise decision.error()
        effective = decision.effective_request(request)
        namespace, service_account = effective.namespace, effective.service_account
        # Rate limits count every request, hits included: they protect the broker too.
        await self._limiter.check(
            identity,
            namespace,
            service_account,
            rule=decision.rule,
            override=decision.rate_limit,
        )

        maximum = decision.max_expiration_seconds
        assert maximum is not None  # allowed

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
                        # None (no gRPC deadline): the configured request timeout applies.
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

        try:
            if self._cache.cacheable(decision, effective):
                call.cache_key = key = CacheKey.for_request(identity, effective)
                cached = await self._cache.get_or_fetch(
                    key, fetch, timeout=context.time_remaining()
                )
                call.result = result = cached.result
                call.cache_hit = cached.hit
                annotate_call(cache="hit" if cached.hit else "miss")
                if cached.hit:
                    # Checked when minted, and again under the rule in force now: a policy
                    # reload may have lowered its maximum.
                    try:
                        check_lifetime(result, maximum=maximum, rule=decision.rule)
                    except IssuedTokenRefused:
                        self._cache.discard(key, result.token_request)
                        raise
            else:
                call.result = result = await fetch(context.time_remaining())
        except IssuedTokenRefused as err:
            call.result = err.result  # minted: the audit line records it
            raise
        return pb.CreateTokenResponse(
            token_request=result.token_request,
            warnings=[*decision.warnings, *result.warnings],
        )


def add_token_broker_service(servicer: TokenBrokerServicer, server: aio.Server) -> None:
    """Register TokenBrokerService on `server`: CreateToken request-streaming, raw bytes in
    (the servicer receives and parses its one message itself: broker.receive), the
    response serialized by gRPC. Clients see the unary method of the .proto."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "CreateToken": grpc.stream_unary_rpc_method_handler(
            servicer.CreateToken,
            request_deserializer=None,
            response_serializer=pb.CreateTokenResponse.SerializeToString,
        )
    }
    service = pb.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
