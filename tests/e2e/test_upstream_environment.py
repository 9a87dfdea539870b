"""The upstream client and the process environment: proxies from HTTPS_PROXY/NO_PROXY (read
once, at start), and ~/.netrc never consulted (it would cost a thread hop per API call, and an
entry for the API server would break every call). Real stack: kubernetes.aio -> the emulator
over HTTPS, through a real CONNECT proxy where one is configured."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.upstream import UpstreamClient, environment_proxy
from tests.support.stack import create_request

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy", "NO_PROXY", "no_proxy")  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


class ConnectProxy:
    """A minimal HTTP CONNECT proxy (what HTTPS_PROXY points at): it records each target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            writer.close()
            return
        self.targets.append(target)
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    proxy = ConnectProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    async with server:
        yield proxy
        server.close()


async def issue_token(settings: KubernetesSettings) -> str:
    request = create_request()
    client = await UpstreamClient.from_settings(settings)
    try:
        result = await client.create_token(
            request.namespace, request.service_account, request.token_request
        )
    finally:
        await client.close()
    return result.token_request.status.token


async def test_a_netrc_entry_does_not_break_calls(
    kubernetes_settings: KubernetesSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A `default` entry matches every host: with the environment trusted per request,
    # aiohttp would add its Basic credentials next to the bearer token and refuse the call.
    netrc = tmp_path / "netrc"
    netrc.write_text("default login someone password not-for-the-broker\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert (await issue_token(kubernetes_settings)).count(".") == 2


async def test_https_proxy_from_the_environment_is_used(
    kubernetes_settings: KubernetesSettings,
    emulator: Emulator,
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    assert (await issue_token(kubernetes_settings)).count(".") == 2
    api = urlsplit(emulator.url)
    assert proxy.targets == [f"{api.hostname}:{api.port}"]


async def test_no_proxy_bypasses_the_proxy(
    kubernetes_settings: KubernetesSettings, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert (await issue_token(kubernetes_settings)).count(".") == 2
    assert proxy.targets == []


def test_environment_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert environment_proxy("https://10.0.0.1:6443") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert environment_proxy("https://10.0.0.1:6443") == "http://proxy.corp:3128"
    assert environment_proxy("http://10.0.0.1:8080") is None  # no HTTP_PROXY
    monkeypatch.setenv("NO_PROXY", ".svc,10.0.0.1")
    assert environment_proxy("https://10.0.0.1:6443") is None
    assert environment_proxy("https://kubernetes.default.svc") is None
    assert environment_proxy("https://api.example.com") == "http://proxy.corp:3128"
