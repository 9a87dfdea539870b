"""The clients: `AsyncTokenBrokerClient` (grpc.aio) and `TokenBrokerClient` (blocking).

Both open one channel from a ClientConfig (broker.client.config), send the bearer credential
with every attempt, retry as the config's RetryPolicy says (broker.client.retries) and raise
`TokenBrokerError` (broker.client.errors) or return a `TokenResult` (broker.client.messages).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
from grpc import aio

from broker.client.config import ClientConfig, client_config
from broker.client.errors import TokenBrokerError
from broker.client.messages import BoundObject, TokenResult, build_request
from broker.client.retries import Retrier
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc


class AsyncTokenBrokerClient:
    """grpc.aio client. Use as `async with`, or call `close()`. One channel, reused."""

    def __init__(
        self,
        address: str | ClientConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        **kwargs: Any,
    ) -> None:
        """`address` and ClientConfig's fields as keywords, or a ClientConfig."""
        self.config = client_config(address, kwargs)
        self._clock = clock
        self._rng = rng
        self._channel: aio.Channel = self.config.open_channel(aio)
        self._stub = pb_grpc.TokenBrokerServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"AsyncTokenBrokerClient({self.config.address!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def create_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: Sequence[str] = (),
        expiration_seconds: int | None = None,
        bound_object: BoundObject | None = None,
        dry_run: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, not a wait
    ) -> TokenResult:
        """A token for the service account. `timeout`: the whole call, retries included
        (default: the config's)."""
        request = build_request(
            namespace,
            service_account,
            audiences=audiences,
            expiration_seconds=expiration_seconds,
            bound_object=bound_object,
            dry_run=dry_run,
        )
        return await self.create_token_request(request, timeout=timeout)

    async def create_token_request(
        self,
        request: pb.CreateTokenRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, not a wait
    ) -> TokenResult:
        """CreateToken with a request built by the caller."""
        cfg = self.config
        retrier = Retrier(
            cfg.retry, cfg.timeout if timeout is None else timeout, self._clock, self._rng
        )
        while True:
            metadata = cfg.call_metadata()
            try:
                response: pb.CreateTokenResponse = await self._stub.CreateToken(
                    request, timeout=retrier.attempt_timeout(), metadata=metadata
                )
            except aio.AioRpcError as rpc_error:
                err = TokenBrokerError.from_rpc_error(rpc_error)
                wait = retrier.delay(err)
                if wait is None:
                    raise err from None
                await asyncio.sleep(wait)
                continue
            return TokenResult.from_response(response)


class TokenBrokerClient:
    """Blocking client (grpc sync channel). Use as `with`, or call `close()`."""

    def __init__(
        self,
        address: str | ClientConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], None] = time.sleep,
        **kwargs: Any,
    ) -> None:
        self.config = client_config(address, kwargs)
        self._clock = clock
        self._rng = rng
        self._sleep = sleep
        self._channel: grpc.Channel = self.config.open_channel(grpc)
        self._stub = pb_grpc.TokenBrokerServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"TokenBrokerClient({self.config.address!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def create_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: Sequence[str] = (),
        expiration_seconds: int | None = None,
        bound_object: BoundObject | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> TokenResult:
        request = build_request(
            namespace,
            service_account,
            audiences=audiences,
            expiration_seconds=expiration_seconds,
            bound_object=bound_object,
            dry_run=dry_run,
        )
        return self.create_token_request(request, timeout=timeout)

    def create_token_request(
        self, request: pb.CreateTokenRequest, *, timeout: float | None = None
    ) -> TokenResult:
        cfg = self.config
        retrier = Retrier(
            cfg.retry, cfg.timeout if timeout is None else timeout, self._clock, self._rng
        )
        while True:
            metadata = cfg.call_metadata()
            try:
                response: pb.CreateTokenResponse = self._stub.CreateToken(
                    request, timeout=retrier.attempt_timeout(), metadata=metadata
                )
            except grpc.RpcError as rpc_error:
                if not isinstance(rpc_error, grpc.Call):
                    raise
                err = TokenBrokerError.from_rpc_error(rpc_error)
                wait = retrier.delay(err)
                if wait is None:
                    raise err from None
                self._sleep(wait)
                continue
            return TokenResult.from_response(response)
