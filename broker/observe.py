"""Per-call observation: the server interceptor behind the gRPC metrics, the request id and
the access log.

`CallObserver` wraps every method handler of the server (the broker's service, health and
reflection alike) and, for each call:

- binds the call's request id (the caller's sane `x-request-id`, else a new one:
  `broker.request_id`) so every log line of the call carries it (`broker.logs`);
- counts it in the gRPC server metrics with the gRPC ecosystem's names and labels: started,
  messages received and sent, handled by `grpc_code`, and the handling time. A handler's
  `context.abort()` raises, and is counted under the code it aborted with (read from the
  context), never UNKNOWN; an exception that escapes without one is UNKNOWN, as gRPC answers;
  a cancelled call is CANCELLED (DEADLINE_EXCEEDED when its deadline has passed);
- writes one access log line (logger `broker.access`): the method, code, latency, request id
  and what the servicer noted with `annotate_call` (namespace, service account, caller,
  reason) — never a token, and every caller-supplied value bounded (broker.bounded).
  TokenBrokerService calls log at info; health checks and reflection (probes every few
  seconds), and calls the servicer marks `quiet_call()` (refusals of a throttled peer that are
  not audited one by one), at debug.

Calls to methods the server does not have get no handler, so nothing to wrap: gRPC answers
UNIMPLEMENTED and they are not counted (bounded `grpc_method` values).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from broker.bounded import bounded
from broker.logs import bind_request_id
from broker.metrics import BrokerMetrics, GrpcMethodMetrics
from broker.request_id import request_id_from

access_logger = logging.getLogger("broker.access")

# The services whose calls are logged at info.
ACCESS_LOG_SERVICES = frozenset({"tokenbroker.v1.TokenBrokerService"})


@dataclass
class CallInfo:
    """What the access log line of a call says besides method, code and latency."""

    request_id: str
    fields: dict[str, str] = field(default_factory=dict)
    # Logged at debug, whatever the service (see quiet_call).
    quiet: bool = False


_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "token_broker_call", default=None
)


def current_call() -> CallInfo | None:
    return _call.get()


def loggable(value: str) -> str:
    """A caller-supplied string bounded for a log line (the formatters escape it)."""
    return bounded(value)


def annotate_call(**fields: str | None) -> None:
    """Add fields to the access log line of the call being handled (None values skipped)."""
    call = _call.get()
    if call is None:
        return
    for key, value in fields.items():
        if value is not None:
            call.fields[key] = loggable(value)


def quiet_call() -> None:
    """Log the access line of the call being handled at debug (one of a flood of refusals
    that are counted, not written one by one)."""
    call = _call.get()
    if call is not None:
        call.quiet = True


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def _grpc_type(handler: Handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class _Call:
    """One call's bookkeeping."""

    def __init__(self, metrics: GrpcMethodMetrics, service: str, method: str) -> None:
        self.metrics = metrics
        self.service = service
        self.method = method
        self.started = time.monotonic()
        metrics.started.inc()

    def received(self) -> None:
        self.metrics.msg_received.inc()

    def sent(self) -> None:
        self.metrics.msg_sent.inc()

    def finish(self, code: grpc.StatusCode, info: CallInfo) -> None:
        elapsed = time.monotonic() - self.started
        self.metrics.handled[code].inc()
        self.metrics.handling_seconds.observe(elapsed)
        level = (
            logging.INFO
            if self.service in ACCESS_LOG_SERVICES and not info.quiet
            else logging.DEBUG
        )
        if access_logger.isEnabledFor(level):
            access_logger.log(
                level,
                "%s/%s %s %.1fms",
                self.service,
                self.method,
                code.name,
                elapsed * 1000,
                extra={
                    "grpc_service": self.service,
                    "grpc_method": self.method,
                    "grpc_code": code.name,
                    "latency_ms": round(elapsed * 1000, 3),
                    "request_id": info.request_id,
                    **info.fields,
                },
            )


async def _answer_once(
    call: _Call, info: CallInfo, context: Any, respond: Callable[[], Awaitable[Any]]
) -> Any:
    """Run a handler that answers with one message, and count its outcome."""
    with _bound(info):
        code = grpc.StatusCode.OK
        try:
            response = await respond()
        except BaseException as exc:
            code = _code_after_exception(exc, context)
            raise
        else:
            code = _context_code(context) or grpc.StatusCode.OK
            if code == grpc.StatusCode.OK:
                call.sent()
            return response
        finally:
            call.finish(code, info)


def _code_after_exception(exc: BaseException, context: Any) -> grpc.StatusCode:
    code = _context_code(context)
    if code is not None:
        return code  # context.abort() (AbortError), or set_code() then an exception
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _context_code(context: Any) -> grpc.StatusCode | None:
    code = context.code()
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:  # an int passed to set_code
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


class _CountingContext:
    """A servicer context whose write() counts sent messages (streaming handlers that
    write instead of yielding, like the health service's Watch)."""

    def __init__(self, context: Any, call: _Call) -> None:
        self._context = context
        self._observed_call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._observed_call.sent()


async def _counting_iterator(iterator: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    async for message in iterator:
        call.received()
        yield message


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


class CallObserver(aio.ServerInterceptor):
    """The server interceptor: metrics, request id and access log of every call."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self._metrics = metrics
        # Wrapped handlers by method: one per method the server has (bounded).
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        full_method = handler_call_details.method
        wrapped = self._wrapped.get(full_method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(full_method)
        wrapped = self._wrapped[full_method] = self.wrap(handler, service, method)
        return wrapped

    def wrap(self, handler: Handler, service: str, method: str) -> Handler:
        grpc_type = _grpc_type(handler)
        metrics = self._metrics.grpc_method(grpc_type, service, method)
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        def start(context: Any) -> tuple[_Call, CallInfo]:
            call = _Call(metrics, service, method)
            info = CallInfo(request_id_from(context.invocation_metadata()))
            return call, info

        if grpc_type == "unary":
            inner: Any = handler.unary_unary
            if not inspect.iscoroutinefunction(inner):
                return handler  # synchronous handlers: none in this server

            async def unary_unary(request: Any, context: Any) -> Any:
                call, info = start(context)
                call.received()
                return await _answer_once(call, info, context, lambda: inner(request, context))

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)

        if grpc_type == "client_stream":
            inner_su: Any = handler.stream_unary
            if not inspect.iscoroutinefunction(inner_su):
                return handler

            async def stream_unary(requests: Any, context: Any) -> Any:
                call, info = start(context)
                return await _answer_once(
                    call,
                    info,
                    context,
                    lambda: inner_su(_counting_iterator(requests, call), context),
                )

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

        streaming_inner: Any = (
            handler.unary_stream if grpc_type == "server_stream" else handler.stream_stream
        )

        def arguments(request: Any, call: _Call) -> Any:
            if grpc_type == "server_stream":
                call.received()
                return request
            return _counting_iterator(request, call)

        if inspect.isasyncgenfunction(streaming_inner):

            async def stream_gen(request: Any, context: Any) -> AsyncIterator[Any]:
                call, info = start(context)
                with _bound(info):
                    code = grpc.StatusCode.OK
                    try:
                        async for response in streaming_inner(arguments(request, call), context):
                            call.sent()
                            yield response
                    except BaseException as exc:
                        code = _code_after_exception(exc, context)
                        raise
                    else:
                        code = _context_code(context) or grpc.StatusCode.OK
                    finally:
                        call.finish(code, info)

            behavior: Any = stream_gen
        elif inspect.iscoroutinefunction(streaming_inner):

            async def stream_coro(request: Any, context: Any) -> None:
                call, info = start(context)
                with _bound(info):
                    code = grpc.StatusCode.OK
                    try:
                        await streaming_inner(
                            arguments(request, call), _CountingContext(context, call)
                        )
                    except BaseException as exc:
                        code = _code_after_exception(exc, context)
                        raise
                    else:
                        code = _context_code(context) or grpc.StatusCode.OK
                    finally:
                        call.finish(code, info)

            behavior = stream_coro
        else:
            return handler
        if grpc_type == "server_stream":
            return grpc.unary_stream_rpc_method_handler(behavior, **kwargs)
        return grpc.stream_stream_rpc_method_handler(behavior, **kwargs)


@contextlib.contextmanager
def _bound(info: CallInfo) -> Iterator[None]:
    """Bind the call's request id and CallInfo while the handler runs."""
    # A streaming handler's generator may be finalised in another context (after a
    # cancellation): then there is nothing to reset.
    with contextlib.suppress(ValueError), bind_request_id(info.request_id):
        token = _call.set(info)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                _call.reset(token)
