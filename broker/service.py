"""CreateToken over gRPC: the thin adapter between grpc.aio and the request path.

The request path itself (what a call goes through, in which order, and why) is
broker.request_path, independent of the transport. This adapter, for each call:

- reads the call's metadata once: the request id (the caller's sane `x-request-id`, else a new
  one: broker.request_id) and the `Credentials` (the authorization header, the peer, and the
  verified client certificate from the auth context, read only if authentication needs it);
- sends the request id back as `x-request-id` in the response headers, first thing: callers and
  proxies read request ids from headers, errors included. (grpc.aio has no way to add it to the
  headers it sends with the response, so this is a batch of its own: measured in bench/.)
- hands the request path a function that receives the request message (raw bytes: the method
  is registered request-streaming, so the message is received inside the call, within
  `server.receiveTimeoutSeconds`, and a malformed one is the broker's answer, not gRPC's) and the
  call's remaining deadline;
- answers the bytes the request path returns (the method has no serializers: a cache hit's
  answer was serialized once, when its token was cached), or aborts with the BrokerError's
  status and rich details;
- observes the call, once: the `grpc_server_*` metrics (the names and labels of the gRPC
  ecosystem's middleware, as broker.observe counts the other services) and the access line
  (broker.observe.log_access), from the same `TokenCall` record the audit line came from.

Clients see the unary method of the .proto.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import grpc
from grpc import aio

from broker.authn import authorization_values
from broker.credentials import Credentials
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.logs import bind_request_id
from broker.metrics import BrokerMetrics
from broker.observe import code_after_exception, log_access
from broker.request_id import REQUEST_ID_METADATA_KEY, request_id_from
from broker.request_path import RequestPath, TokenCall

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name
METHOD_NAME = "CreateToken"


def grpc_credentials(context: aio.ServicerContext[Any, Any], metadata: Any = None) -> Credentials:
    """The caller's credentials as a gRPC call presents them (`metadata`: the call's
    invocation metadata, if already read)."""
    if metadata is None:
        metadata = context.invocation_metadata() or ()
    return Credentials(
        authorization=authorization_values(metadata),
        peer=_peer(context),
        load_client_certificate=functools.partial(_client_certificate, context),
    )


def _peer(context: aio.ServicerContext[Any, Any]) -> str:
    try:
        return context.peer() or ""
    except Exception:  # a context without a transport (never in a real server)
        return ""


def _client_certificate(context: aio.ServicerContext[Any, Any]) -> bytes | None:
    """The client certificate gRPC verified in the TLS handshake (PEM), if any."""
    auth = context.auth_context()
    if list(auth.get("transport_security_type", ())) != [b"ssl"]:
        return None
    pems = list(auth.get("x509_pem_cert", ()))
    return pems[0] if pems else None


class TokenBrokerServicer:
    """The CreateToken handler (register it with `add_token_broker_service`)."""

    def __init__(self, path: RequestPath) -> None:
        self.path = path
        metrics: BrokerMetrics = path.metrics
        # As .proto declares it: the handler is registered request-streaming, yet unary.
        self._grpc = metrics.grpc_method("unary", SERVICE_NAME, METHOD_NAME)

    async def close(self) -> None:
        """Audit what no line has reported yet (before the audit log closes)."""
        await self.path.close()

    async def CreateToken(self, requests: Any, context: aio.ServicerContext[Any, Any]) -> bytes:
        started = time.monotonic()
        series = self._grpc
        series.started.inc()
        metadata = context.invocation_metadata() or ()
        request_id = request_id_from(metadata)
        call = TokenCall(
            request_id,
            grpc_credentials(context, metadata),
            time_remaining=context.time_remaining,
            started=started,
        )

        async def receive() -> bytes | None:
            message = await context.read()
            if message is aio.EOF:
                return None
            series.msg_received.inc()
            return message  # type: ignore[no-any-return]

        code = grpc.StatusCode.OK
        with bind_request_id(request_id):
            try:
                await context.send_initial_metadata(((REQUEST_ID_METADATA_KEY, request_id),))
                try:
                    response = await self.path.create_token(call, receive)
                except BrokerError as err:
                    await err.abort(context)
                series.msg_sent.inc()
                return response
            except BaseException as exc:
                code = code_after_exception(exc, context)
                raise
            finally:
                elapsed = time.monotonic() - started
                series.handled[code].inc()
                series.handling_seconds.observe(elapsed)
                log_access(
                    logging.DEBUG if call.quiet else logging.INFO,
                    SERVICE_NAME,
                    METHOD_NAME,
                    code,
                    elapsed,
                    request_id,
                    call.access_fields(),
                )


def add_token_broker_service(servicer: TokenBrokerServicer, server: aio.Server) -> None:
    """Register TokenBrokerService on `server`: CreateToken request-streaming, bytes in and
    out (the request path receives and parses its one message itself, and answers serialized
    bytes). Clients see the unary method of the .proto."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        METHOD_NAME: grpc.stream_unary_rpc_method_handler(
            servicer.CreateToken, request_deserializer=None, response_serializer=None
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
