"""Receiving the request message of a unary call: in bounded time, parsed where the call is
observed.

gRPC's own unary path waits for the request message and parses it before any handler code
runs: a message that never comes holds the call for as long as the client likes, and one that
does not parse is answered `UNKNOWN` with the parser's internal exception text, uncounted and
unlogged. So the broker's unary methods are registered *request-streaming* (the wire format of
a unary call and of a client-streaming call with one message is the same) with raw bytes in:
the handler starts when the call's headers arrive, reads the message itself within
`server.receiveTimeoutSeconds`, and parses it. Every outcome is then an answer like any other:
`INVALID_ARGUMENT` (reason `REQUEST_MALFORMED`) for bytes that do not parse or a stream that
ends without a message, `DEADLINE_EXCEEDED` (reason `REQUEST_RECEIVE_TIMEOUT`) for a message
that did not arrive in time — counted, access-logged and (CreateToken) audited.

A message larger than the server's receive limit (1 MiB) is refused by gRPC itself with
`RESOURCE_EXHAUSTED` before the handler sees it: the handler reads no message, and the call
is cancelled under it.

CreateToken's bound is `ReceiveBound`: one timer for all the calls waiting for their message
(the oldest deadline first), rather than a timer set and cancelled by every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from broker.errors import BrokerError
from broker.reasons import Reason

T = TypeVar("T")


def malformed(message: str) -> BrokerError:
    return BrokerError.of(Reason.REQUEST_MALFORMED, message)


def receive_timeout_error(seconds: float) -> BrokerError:
    return BrokerError.of(
        Reason.REQUEST_RECEIVE_TIMEOUT,
        f"no request message received within {seconds:g}s",
        metadata={"timeoutSeconds": f"{seconds:g}"},
    )


async def receive_one(requests: AsyncIterator[T], timeout: float) -> T:  # noqa: ASYNC109
    """The request message of a unary call, within `timeout` seconds. Raises BrokerError:
    REQUEST_MALFORMED when the stream ends without a message, REQUEST_RECEIVE_TIMEOUT when
    none arrived in time.

    Only the first message is read, as gRPC's own unary handling does: messages after it
    are never looked at, and the call is answered from the first. Reading on to the end of
    the stream to refuse them would cost every call a second receive operation (about
    50 µs of CPU in grpc.aio, some 5% of a cache hit) for no protection: an unread message
    costs the broker nothing beyond the HTTP/2 flow-control window.
    """
    try:
        async with asyncio.timeout(timeout):
            return await anext(requests)
    except StopAsyncIteration:
        raise malformed("no request message: a unary call takes exactly one") from None
    except TimeoutError:
        raise receive_timeout_error(timeout) from None


def parse(deserializer: Callable[[bytes], T], raw: bytes, what: str) -> T:
    """`raw` parsed by `deserializer`, or BrokerError REQUEST_MALFORMED naming `what` (the
    message type), never the parser's own words."""
    try:
        return deserializer(raw)
    except Exception:  # DecodeError, or anything a parser raises on hostile bytes
        raise malformed(f"the request message is not a valid {what}") from None


class ReceiveBound:
    """Receives each call's request message within `timeout` seconds (REQUEST_RECEIVE_TIMEOUT
    after that), with one timer for all the calls that wait: the deadlines are in the order
    the calls started (one timeout for all), so the timer only ever looks at the oldest.
    Use from one event loop."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        # The tasks waiting for their message, oldest first, with their deadlines.
        self._waiting: dict[asyncio.Task[object], float] = {}
        # Cancelled by the timer (their wait ran out), until their receive ends.
        self._expired: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def receive(self, receive: Callable[[], Awaitable[T]]) -> T:
        """`await receive()` (the transport's) within the bound; the caller's task is
        cancelled when it runs out, as asyncio.timeout() would."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self._waiting[task] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        cancelling = task.cancelling()
        try:
            return await receive()
        except asyncio.CancelledError:
            if task in self._expired and task.uncancel() <= cancelling:
                raise receive_timeout_error(self.timeout) from None
            raise
        finally:
            del self._waiting[task]
            self._expired.discard(task)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, deadline in self._waiting.items():
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire)
                return
            if task not in self._expired:
                self._expired.add(task)
                task.cancel()
