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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
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
