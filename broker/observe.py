"""Per-call observation: the gRPC metrics, the request id and the access log of every call.

CreateToken observes itself, in one step per call (broker.service: the gRPC adapter of the
request path, with `log_access` below). `CallObserver` wraps the method handlers of the other
services (health, reflection), once, when they are registered (`ObservedServer`): no server
interceptor, whose chain grpc.aio would run for every call of every method before finding its
handler. For each call:

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

What gRPC would do before any handler code runs happens inside the observed call instead
(`CallObserver.wrap`), so that every outcome is counted and logged: request bytes are parsed
there (REQUEST_MALFORMED, not gRPC's UNKNOWN), and the request message of a unary-request
method is received there, within a bound (REQUEST_RECEIVE_TIMEOUT): broker.receive.

Calls to methods the server does not have get no handler, so nothing to wrap: gRPC answers
UNIMPLEMENTED and they are not counted (bounded `grpc_method` values).

The access line goes straight to the broker's own JSON log handler when logging could not
change it (broker.logs.direct_json_handler: the same rendering and redaction, none of the
LogRecord machinery), else through logging like any record.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from grpc import aio

from broker.bounded import bounded
from broker.errors import BrokerError
from broker.logs import (
    bind_request_id,
    direct_json_handler,
    iso_millis_at,
    json_line,
    json_line_parts,
    json_text,
    redact,
    redact_fields,
    write_direct,
)
from broker.metrics import BrokerMetrics, GrpcMethodMetrics
from broker.reasons import Reason
from broker.receive import parse, receive_one
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


def _grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    if request_streaming and response_streaming:
        return "bidi_stream"
    if request_streaming:
        return "client_stream"
    if response_streaming:
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
        log_access(level, self.service, self.method, code, elapsed, info.request_id, info.fields)


def log_access(
    level: int,
    service: str,
    method: str,
    code: grpc.StatusCode,
    elapsed: float,
    request_id: str,
    fields: dict[str, str],
) -> None:
    """The access line of a call (logger `broker.access`): method, code, latency, request id,
    then `fields` (bounded values); straight to the broker's JSON handler when logging could
    not change it (see the module docstring)."""
    handler = direct_json_handler(access_logger, level)
    if handler is None:
        if access_logger.isEnabledFor(level):
            access_logger.log(
                level,
                "%s/%s %s %.1fms",
                service,
                method,
                code.name,
                elapsed * 1000,
                extra={
                    "grpc_service": service,
                    "grpc_method": method,
                    "grpc_code": code.name,
                    "latency_ms": round(elapsed * 1000, 3),
                    "request_id": request_id,
                    **fields,
                },
            )
        return
    code_name = code.name
    latency_ms = round(elapsed * 1000, 3)
    key = (level, service, method, code_name, *fields.items())
    if key not in _access_templates:
        constant: dict[str, object] = {
            "grpc_service": service,
            "grpc_method": method,
            "grpc_code": code_name,
            "latency_ms": None,
            "request_id": None,
            **fields,
        }
        redact_fields(constant)
        if len(_access_templates) >= MAX_ACCESS_TEMPLATES:
            _access_templates.clear()
        _access_templates[key] = json_line_parts(
            logging.getLevelName(level), access_logger.name, constant, _OPEN_FIELDS
        )
    parts = _access_templates[key]
    message = redact(f"{service}/{method} {code_name} {elapsed * 1000:.1f}ms")
    if parts is None:  # a value holds a mark: no template
        line_fields: dict[str, object] = {
            "grpc_service": service,
            "grpc_method": method,
            "grpc_code": code_name,
            "latency_ms": latency_ms,
            "request_id": request_id,
            **fields,
        }
        redact_fields(line_fields)
        line = json_line(
            time.time(), logging.getLevelName(level), access_logger.name, message, line_fields
        )
    else:
        p = parts
        line = (
            f'{p[0]}"{iso_millis_at(time.time())}"{p[1]}{json_text(message)}{p[2]}'
            f"{latency_ms!r}{p[3]}{json_text(redact(request_id))}{p[4]}"
        )
    write_direct(handler, access_logger, level, line)


# Access lines rendered once per kind (level, method, code, fields), their varying values
# left open (broker.logs.json_line_parts); None: that kind has no template.
_OPEN_FIELDS = ("latency_ms", "request_id")
MAX_ACCESS_TEMPLATES = 1024
_access_templates: dict[tuple[object, ...], tuple[str, ...] | None] = {}


async def _answer_once(
    call: _Call, info: CallInfo, context: Any, respond: Callable[[], Awaitable[Any]]
) -> Any:
    """Run a handler that answers with one message, and count its outcome."""
    with _bound(info):
        code = grpc.StatusCode.OK
        try:
            response = await respond()
        except BaseException as exc:
            code = code_after_exception(exc, context)
            raise
        else:
            code = _context_code(context) or grpc.StatusCode.OK
            if code == grpc.StatusCode.OK:
                call.sent()
            return response
        finally:
            call.finish(code, info)


def code_after_exception(exc: BaseException, context: Any) -> grpc.StatusCode:
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


async def _counting_iterator(
    iterator: AsyncIterator[Any], call: _Call, parse_message: Parser | None = None
) -> AsyncIterator[Any]:
    async for message in iterator:
        call.received()
        yield message if parse_message is None else parse_message(message)


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
Parser = Callable[[bytes], Any]


def _described_method(service: str, method: str) -> MethodDescriptor | None:
    """The method as its .proto declares it (the generated modules of the broker's, the
    health and the reflection services register themselves in the default pool)."""
    try:
        return descriptor_pool.Default().FindMethodByName(f"{service}.{method}")
    except KeyError:
        return None


class ObservedServer:
    """Registers services on a grpc.aio server (as `add_*Servicer_to_server` functions do) with
    each method handler observed: wrapped by `observer` once, here, not per call."""

    def __init__(self, server: aio.Server, observer: CallObserver) -> None:
        self._server = server
        self._observer = observer

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_ObservedGenericHandler(handler, self._observer) for handler in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self._server.add_registered_method_handlers(
            service,
            {
                name: self._observer.wrap(handler, service, name)
                for name, handler in handlers.items()
            },
        )


class _ObservedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are observed (wrapped once per method). gRPC
    asks it only for methods no registered handler has."""

    def __init__(self, inner: grpc.GenericRpcHandler, observer: CallObserver) -> None:
        self._inner = inner
        self._observer = observer
        # Wrapped handlers by method: one per method the inner handler has (bounded).
        self._wrapped: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        full_method = handler_call_details.method
        wrapped = self._wrapped.get(full_method)
        if wrapped is not None:
            return wrapped
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(full_method)
        wrapped = self._wrapped[full_method] = self._observer.wrap(handler, service, method)
        return wrapped


class CallObserver:
    """Metrics, request id and access log of every call of the methods it wraps.

    It also moves what gRPC does before any handler code runs into the observed handler, so
    that every outcome is counted and logged: handlers are re-registered request-streaming
    with raw bytes in, and the wrapper receives the request message of a unary-request
    method itself (within `receive_timeout_seconds`) and parses messages with
    the method's own deserializer (broker.receive). Bytes that do not parse are answered
    INVALID_ARGUMENT, reason REQUEST_MALFORMED (never gRPC's UNKNOWN with the parser's
    exception text); a message that does not come, DEADLINE_EXCEEDED, reason
    REQUEST_RECEIVE_TIMEOUT. Labels keep the method's type as the .proto declares it.
    """

    def __init__(self, metrics: BrokerMetrics, *, receive_timeout_seconds: float = 10.0) -> None:
        self._metrics = metrics
        self._receive_timeout = receive_timeout_seconds

    async def _refuse(self, error: BrokerError, context: Any) -> NoReturn:
        if error.reason == Reason.REQUEST_RECEIVE_TIMEOUT:
            self._metrics.call_shed(error.reason)
        annotate_call(reason=error.reason)
        await error.abort(context)

    def wrap(self, handler: Handler, service: str, method: str) -> Handler:
        """The observed handler, request-streaming with raw bytes in (one builder per kind
        of handler); a synchronous handler (none in this server) is left as it is."""
        observed = self._observed_method(handler, service, method)
        serializer = handler.response_serializer
        if not handler.request_streaming and not handler.response_streaming:
            if not inspect.iscoroutinefunction(handler.unary_unary):
                return handler
            return grpc.stream_unary_rpc_method_handler(
                _unary_unary(observed, handler.unary_unary), response_serializer=serializer
            )
        if handler.request_streaming and not handler.response_streaming:
            if not inspect.iscoroutinefunction(handler.stream_unary):
                return handler
            return grpc.stream_unary_rpc_method_handler(
                _stream_unary(observed, handler.stream_unary), response_serializer=serializer
            )
        streaming: Any = (
            handler.stream_stream if handler.request_streaming else handler.unary_stream
        )
        if inspect.isasyncgenfunction(streaming):
            behavior: Any = _yielding_stream(observed, streaming, handler.request_streaming)
        elif inspect.iscoroutinefunction(streaming):
            behavior = _writing_stream(observed, streaming, handler.request_streaming)
        else:
            return handler
        return grpc.stream_stream_rpc_method_handler(behavior, response_serializer=serializer)

    def _observed_method(self, handler: Handler, service: str, method: str) -> _ObservedMethod:
        described = _described_method(service, method)
        # The type the .proto declares: CreateToken is registered request-streaming, and
        # every handler is re-registered request-streaming, yet they are unary.
        grpc_type = (
            _grpc_type(described.client_streaming, described.server_streaming)
            if described is not None
            else _grpc_type(handler.request_streaming, handler.response_streaming)
        )
        deserializer = handler.request_deserializer
        what = described.input_type.full_name if described is not None else "request message"
        return _ObservedMethod(
            metrics=self._metrics.grpc_method(grpc_type, service, method),
            service=service,
            method=method,
            # Raw bytes in: the wrappers parse (inside the observed call).
            parse_message=(
                None if deserializer is None else functools.partial(parse, deserializer, what=what)
            ),
            receive_timeout=self._receive_timeout,
            refuse=self._refuse,
        )


@dataclass(frozen=True)
class _ObservedMethod:
    """What the wrappers of one method share: its metrics and names, its parser, the bound
    on receiving its request message, and how a refusal is answered."""

    metrics: GrpcMethodMetrics
    service: str
    method: str
    parse_message: Parser | None
    receive_timeout: float
    refuse: Callable[[BrokerError, Any], Awaitable[NoReturn]]

    def start(self, context: Any) -> tuple[_Call, CallInfo]:
        call = _Call(self.metrics, self.service, self.method)
        return call, CallInfo(request_id_from(context.invocation_metadata()))

    async def receive(self, requests: AsyncIterator[bytes], call: _Call, context: Any) -> Any:
        """The one request message of a unary-request method, parsed; else refused."""
        try:
            raw = await receive_one(_counting_iterator(requests, call), self.receive_timeout)
            return raw if self.parse_message is None else self.parse_message(raw)
        except BrokerError as err:
            await self.refuse(err, context)

    async def arguments(
        self, request_streaming: bool, requests: Any, call: _Call, context: Any
    ) -> Any:
        """A streaming handler's first argument: the parsed stream, or the one message."""
        if request_streaming:
            return _counting_iterator(requests, call, self.parse_message)
        return await self.receive(requests, call, context)


def _unary_unary(observed: _ObservedMethod, inner: Any) -> Any:
    async def unary_unary(requests: Any, context: Any) -> Any:
        call, info = observed.start(context)

        async def respond() -> Any:
            return await inner(await observed.receive(requests, call, context), context)

        return await _answer_once(call, info, context, respond)

    return unary_unary


def _stream_unary(observed: _ObservedMethod, inner: Any) -> Any:
    async def stream_unary(requests: Any, context: Any) -> Any:
        call, info = observed.start(context)

        async def respond() -> Any:
            try:
                return await inner(
                    _counting_iterator(requests, call, observed.parse_message), context
                )
            except BrokerError as err:
                await observed.refuse(err, context)

        return await _answer_once(call, info, context, respond)

    return stream_unary


def _yielding_stream(observed: _ObservedMethod, inner: Any, request_streaming: bool) -> Any:
    """A response-streaming handler that yields its messages."""

    async def stream_gen(requests: Any, context: Any) -> AsyncIterator[Any]:
        call, info = observed.start(context)
        with _counted(call, info, context):
            try:
                arguments = await observed.arguments(request_streaming, requests, call, context)
                async for response in inner(arguments, context):
                    call.sent()
                    yield response
            except BrokerError as err:
                await observed.refuse(err, context)

    return stream_gen


def _writing_stream(observed: _ObservedMethod, inner: Any, request_streaming: bool) -> Any:
    """A response-streaming handler that writes its messages (context.write)."""

    async def stream_coro(requests: Any, context: Any) -> None:
        call, info = observed.start(context)
        with _counted(call, info, context):
            try:
                await inner(
                    await observed.arguments(request_streaming, requests, call, context),
                    _CountingContext(context, call),
                )
            except BrokerError as err:
                await observed.refuse(err, context)

    return stream_coro


@contextlib.contextmanager
def _counted(call: _Call, info: CallInfo, context: Any) -> Iterator[None]:
    """A streaming call while its handler runs (bound, see _bound), then its outcome
    counted and logged (the messages it sent are counted as they go)."""
    with _bound(info):
        code = grpc.StatusCode.OK
        try:
            yield
        except BaseException as exc:
            code = code_after_exception(exc, context)
            raise
        else:
            code = _context_code(context) or grpc.StatusCode.OK
        finally:
            call.finish(code, info)


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
