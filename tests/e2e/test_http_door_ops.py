"""Operating the HTTP door: its metrics and access lines, request ids, TLS renewal in place,
graceful shutdown, the settings it refuses, and `serve --workers N` sharing its port."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.config import ConfigError, KubernetesSettings
from broker.emulator import Emulator
from broker.server import BrokerServer
from tests.e2e.test_workers import free_port, log_entries, until
from tests.support.cli import Pki, Spawn, issue, serve_config
from tests.support.http_door import (
    TOKEN_PATH,
    HttpPki,
    http_settings,
    kube_post,
    request,
    serving,
    token_request_body,
)
from tests.support.stack import CALLER_KEY

AUDIENCE = "https://vault.example.com"


@pytest.fixture
async def door(
    kubernetes_settings: KubernetesSettings, pki: HttpPki
) -> AsyncIterator[BrokerServer]:
    async with serving(http_settings(kubernetes_settings, pki)) as server:
        yield server


def sample(server: BrokerServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_metrics_by_route_method_and_code(door: BrokerServer, pki: HttpPki) -> None:
    assert (await kube_post(door, pki, token_request_body([AUDIENCE]))).status == 201
    assert (await kube_post(door, pki, token_request_body([AUDIENCE]), bearer=None)).status == 401
    assert (await request(door, pki, "GET", "/no/such/path/" + "x" * 50)).status == 404
    assert (await request(door, pki, "PUT", "/oauth2/token")).status == 405
    total = "http_server_requests_total"
    assert sample(door, total, handler="kubernetes-token", method="POST", code="201") == 1
    assert sample(door, total, handler="kubernetes-token", method="POST", code="401") == 1
    assert sample(door, total, handler="other", method="GET", code="404") == 1
    assert sample(door, total, handler="oauth-token", method="PUT", code="405") == 1
    count = "http_server_request_duration_seconds_count"
    assert sample(door, count, handler="kubernetes-token", method="POST") == 2
    # The request path's own metrics count the door's calls exactly as gRPC's.
    decisions = "token_broker_policy_decisions_total"
    assert sample(door, decisions, result="allowed", reason="ALLOWED") == 1
    assert sample(door, "token_broker_tokens_issued_total", namespace="demo") == 1
    # Never a raw path as a label value.
    labels = {
        s.labels.get("handler")
        for metric in door.metrics.registry.collect()
        for s in metric.samples
        if s.name.startswith("http_server_")
    }
    assert labels <= {"kubernetes-token", "oauth-token", "other"}


async def test_access_line_and_request_ids(
    door: BrokerServer, pki: HttpPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.access")
    answer = await kube_post(
        door, pki, token_request_body([AUDIENCE]), headers={"X-Request-Id": "abc-123"}
    )
    assert answer.headers["X-Request-Id"] == "abc-123"
    insane = await kube_post(
        door, pki, token_request_body([AUDIENCE]), headers={"X-Request-Id": "a b" + "x" * 300}
    )
    generated = insane.headers["X-Request-Id"]
    assert len(generated) == 36 and generated != "abc-123"
    lines = [r for r in caplog.records if r.name == "broker.access"]
    first = lines[0].__dict__
    assert (first["http_method"], first["http_route"], first["http_status"]) == (
        "POST",
        "kubernetes-token",
        201,
    )
    assert first["request_id"] == "abc-123"
    assert (first["namespace"], first["user"], first["auth_method"]) == (
        "demo",
        "test-caller",
        "apiKey",
    )
    assert lines[1].__dict__["request_id"] == generated
    assert CALLER_KEY not in caplog.text


async def test_graceful_shutdown_finishes_in_flight_requests(
    door: BrokerServer, pki: HttpPki, emulator: Emulator
) -> None:
    emulator.faults.latency = 1.0
    await door.leave_rotation()
    # Not ready, still serving (the shutdown delay): a new request is answered.
    in_flight = asyncio.ensure_future(kube_post(door, pki, token_request_body([AUDIENCE])))
    while emulator.in_flight == 0:
        assert not in_flight.done(), "the request ended before reaching the emulator"
        await asyncio.sleep(0.01)
    url = door.http_url
    await door.stop(grace=30)
    answer = await in_flight
    assert answer.status == 201, answer.body
    assert answer.json()["status"]["token"].count(".") == 2
    # No new connections after the stop.
    assert url is not None
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(url + "/", ssl=False):
            pass


async def test_renewed_certificate_is_served_to_new_connections(
    kubernetes_settings: KubernetesSettings, pki: HttpPki, tmp_path: Path
) -> None:
    old, new = (issue(tmp_path, name, "localhost", "127.0.0.1") for name in ("old", "new"))
    live = tmp_path / "live"
    live.mkdir()
    shutil.copyfile(old.cert, live / "tls.crt")
    shutil.copyfile(old.key, live / "tls.key")
    following = Pki(old.ca, live / "tls.crt", live / "tls.key", old.ca_file)
    settings = http_settings(kubernetes_settings, HttpPki(following, pki.signer, pki.jwks_file))
    async with BrokerServer(settings) as server:
        url = server.http_url
        assert url is not None

        async def served_by(ca: Path) -> bool:
            context = ssl.create_default_context(cafile=str(ca))
            try:
                async with (
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as s,
                    s.get(url + "/api") as response,
                ):
                    return response.status == 404
            except aiohttp.ClientConnectorCertificateError:
                return False

        assert await served_by(old.ca_file)
        shutil.copyfile(new.cert, live / "tls.crt")
        shutil.copyfile(new.key, live / "tls.key")
        [files] = [f for f in server.reloading_files if f.what == "TLS certificate"]
        assert await files.check() is True
        assert await served_by(new.ca_file)
        assert not await served_by(old.ca_file)


async def test_settings_refused(kubernetes_settings: KubernetesSettings, pki: HttpPki) -> None:
    with pytest.raises(ConfigError, match=r"server\.httpListen: plaintext is only allowed"):
        await BrokerServer(
            http_settings(kubernetes_settings, pki, tls=False, httpListen="0.0.0.0:0")
        ).start()
    async with BrokerServer(http_settings(kubernetes_settings, pki)) as running:
        busy = running.http_address
        assert busy is not None
        with pytest.raises(ConfigError, match=r"server\.httpListen"):
            await BrokerServer(http_settings(kubernetes_settings, pki, httpListen=busy)).start()


async def test_workers_share_the_http_port(spawn: Spawn, kubeconfig: Path, tmp_path: Path) -> None:
    port, http_port = free_port(), free_port()
    config = serve_config(
        tmp_path / "config.yaml",
        kubeconfig,
        server={"listen": f"127.0.0.1:{port}", "httpListen": f"127.0.0.1:{http_port}"},
        rateLimit={"enabled": False},
        log={"format": "json", "level": "info"},
    )
    process = await spawn("serve", "--config", str(config), "--workers", "2")

    def serving() -> list[dict[str, Any]]:
        return [e for e in log_entries(process) if e["message"] == "token broker serving"]

    await until(lambda: len(serving()) == 2, process)
    assert all(e["http_listen"] == f"127.0.0.1:{http_port}" for e in serving())

    def answered_by() -> set[int]:
        return {
            e["pid"]
            for e in log_entries(process)
            if e["logger"] == "broker.access" and e.get("http_status") == 201
        }

    body = json.dumps(token_request_body()).encode()
    headers = {"Authorization": f"Bearer {CALLER_KEY}", "Content-Type": "application/json"}
    for _ in range(64):
        # A fresh connection each time: the kernel spreads connections over the workers.
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.post(
                f"http://127.0.0.1:{http_port}{TOKEN_PATH}", data=body, headers=headers
            ) as response,
        ):
            assert response.status == 201
        await asyncio.sleep(0)
        if len(answered_by()) == 2:
            break
    await until(lambda: len(answered_by()) == 2, process)
    assert await process.terminate() == 0
