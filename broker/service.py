"""The TokenBrokerService servicer: wires the request-path concerns together.

CreateToken = validate -> (authentication -> policy -> rate limits -> cache: later) ->
upstream. Each concern lives in its own module; this one only orders them and turns failures
into gRPC statuses.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import grpc
from grpc import aio

from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.upstream import UpstreamClient
from broker.validation import validate_create_token

logger = logging.getLogger(__name__)

REASON_INTERNAL = "INTERNAL"


class TokenBrokerServicer(pb_grpc.TokenBrokerServiceServicer):
    def __init__(self, upstream: UpstreamClient) -> None:
        self._upstream = upstream

    async def CreateToken(
        self,
        request: pb.CreateTokenRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> pb.CreateTokenResponse:
        try:
            return await self._create_token(request, context)
        except BrokerError as err:
            await err.abort(context)
        except Exception as exc:
            # Never UNKNOWN, never a stack trace to the caller. The log has the frames but
            # not the exception text, which could quote a token from a response.
            logger.error(
                "CreateToken failed unexpectedly: %s\n%s",
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            await BrokerError(
                code=grpc.StatusCode.INTERNAL,
                message="internal error in the token broker",
                reason=REASON_INTERNAL,
            ).abort(context)

    async def _create_token(
        self,
        request: pb.CreateTokenRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> pb.CreateTokenResponse:
        validate_create_token(request)
        # Seam: authentication, policy, rate limits and the cache go here, in that order.
        result = await self._upstream.create_token(
            request.namespace,
            request.service_account,
            request.token_request,
            dry_run=bool(request.dry_run),
            field_manager=request.field_manager,
            field_validation=request.field_validation,
            # None (no gRPC deadline): the configured request timeout applies.
            timeout=context.time_remaining(),
        )
        return pb.CreateTokenResponse(
            token_request=result.token_request, warnings=list(result.warnings)
        )
