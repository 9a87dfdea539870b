"""A small HTTPS client for an emulator, in this process or another one (tests, tooling).

It trusts only the emulator's CA and never logs or reprs the bearer token.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from broker.apiserver.wire import PROTOBUF_MEDIA_TYPE


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def warnings(self) -> list[str]:
        return self.headers.getall("Warning", [])


class EmulatorClient:
    def __init__(self, url: str, ca: Path | bytes, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        if isinstance(ca, bytes):
            self._ssl = ssl.create_default_context(cadata=ca.decode("ascii"))
        else:
            self._ssl = ssl.create_default_context(cafile=str(ca))
        self._token = token
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"EmulatorClient({self.url!r})"

    async def __aenter__(self) -> EmulatorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "",
        body: bytes | None = None,
        json_body: Any = None,
        content_type: str | None = None,
        params: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One request. `token=""` uses the client's token; `token=None` sends none.
        Bound its time with `asyncio.timeout()` around the call."""
        send_headers = dict(headers or {})
        bearer = self._token if token == "" else token
        if bearer is not None:
            send_headers["Authorization"] = f"Bearer {bearer}"
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            content_type = content_type or "application/json"
        if content_type is not None:
            send_headers["Content-Type"] = content_type
        async with self._client().request(
            method,
            self.url + path,
            data=body,
            params=params,
            headers=send_headers,
            ssl=self._ssl,
        ) as response:
            return Reply(response.status, response.headers, await response.read())

    async def create_token(
        self,
        namespace: str,
        name: str,
        body: Any = None,
        *,
        token: str | None = "",
        params: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
        protobuf: bytes | None = None,
    ) -> Reply:
        """POST .../serviceaccounts/{name}/token with a JSON body (default `{}`) or, given
        `protobuf`, those envelope bytes as application/vnd.kubernetes.protobuf."""
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        if protobuf is not None:
            return await self.request(
                "POST",
                path,
                token=token,
                body=protobuf,
                content_type=PROTOBUF_MEDIA_TYPE,
                params=params,
            )
        return await self.request(
            "POST",
            path,
            token=token,
            json_body={} if body is None else body,
            params=params,
        )

    async def set_faults(self, update: Mapping[str, Any]) -> Any:
        """POST /emulator/faults (admin token): see broker.emulator.faults.FaultsUpdate."""
        reply = await self.request("POST", "/emulator/faults", json_body=dict(update))
        if reply.status != 200:
            raise RuntimeError(f"setting faults failed: HTTP {reply.status}: {reply.text}")
        return reply.json()

    async def recorded_requests(self) -> Any:
        """GET /emulator/requests (admin token)."""
        reply = await self.request("GET", "/emulator/requests")
        if reply.status != 200:
            raise RuntimeError(f"reading requests failed: HTTP {reply.status}: {reply.text}")
        return reply.json()
