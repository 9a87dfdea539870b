"""broker.client: the sync and async Python clients, over the real broker and emulator
(plaintext + API key, unix socket, TLS, mutual TLS), their typed results and errors, and the
retry rules (against a scripted broker: RetryInfo, pushback, deadlines, codes)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import grpc
import jwt
import pytest

from broker.client import (
    NO_RETRIES,
    SERVICE_CONFIG,
    AsyncTokenBrokerClient,
    BoundObject,
    ClientConfig,
    RetryPolicy,
    TokenBrokerClient,
    TokenBrokerError,
)
from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.reasons import Reason
from tests.support.cli import issue
from tests.support.client import Fail, ScriptedBroker, start_broker
from tests.support.stack import (
    CALLER_KEY,
    NAMESPACE,
    POD,
    SERVICE_ACCOUNT,
    RunningBroker,
)

ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CONFIG_FILE = Path(__file__).resolve().parents[2] / "clients" / "service-config.json"


def claims(token: str) -> dict[str, object]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


# --- the real broker ----------------------------------------------------------------------------


async def test_async_client_gets_a_typed_result(broker: RunningBroker, emulator: Emulator) -> None:
    async with AsyncTokenBrokerClient(
        broker.address, plaintext=True, credential=CALLER_KEY
    ) as client:
        result = await client.create_token(
            NAMESPACE,
            SERVICE_ACCOUNT,
            audiences=["https://vault.example.com"],
            expiration_seconds=1200,
            bound_object=BoundObject("Pod", POD),
        )
    token_claims = claims(result.token)
    assert token_claims["sub"] == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    assert token_claims["aud"] == ["https://vault.example.com"]
    assert result.audiences == ("https://vault.example.com",)
    assert result.warnings == ()
    assert result.expiration_timestamp.tzinfo is not None
    assert result.expiration_timestamp == datetime.fromtimestamp(token_claims["exp"], UTC)  # type: ignore[arg-type]
    assert result.issued_at == datetime.fromtimestamp(token_claims["iat"], UTC)  # type: ignore[arg-type]
    assert result.lifetime_seconds() == 1200
    # The whole TokenRequest, as the broker returned it.
    assert result.token_request.status.token == result.token
    assert result.token_request.spec.expiration_seconds == 1200
    assert result.token_request.spec.bound_object_ref.name == POD
    assert result.token not in repr(result)
    assert emulator.token_request_count == 1


async def test_sync_client_gets_a_token(broker: RunningBroker, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(CALLER_KEY + "\n")

    def call() -> str:
        with TokenBrokerClient(broker.address, plaintext=True, credential_file=key_file) as c:
            return c.create_token(NAMESPACE, SERVICE_ACCOUNT).token

    # The broker serves on this event loop: the blocking client runs in a thread.
    token = await asyncio.to_thread(call)
    assert claims(token)["aud"] == [ISSUER]


async def test_unix_socket(kubernetes_settings: KubernetesSettings, tmp_path: Path) -> None:
    socket = tmp_path / "broker.sock"
    server = await start_broker(kubernetes_settings, listen=None, unix_socket=socket)
    try:
        async with AsyncTokenBrokerClient(f"unix:{socket}") as client:
            result = await client.create_token(NAMESPACE, SERVICE_ACCOUNT)
        assert claims(result.token)["sub"] == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    finally:
        await server.stop(None)


async def test_tls_and_mutual_tls_with_a_server_name(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    # A certificate only for broker.example, reached at 127.0.0.1: --server-name verifies it.
    server_pki = issue(tmp_path, "server", "broker.example")
    client_pki = issue(tmp_path, "client", "client.example")
    tls = server_pki.server_tls(client_ca=client_pki)
    server = await start_broker(kubernetes_settings, tls=tls)
    try:
        async with AsyncTokenBrokerClient(
            server.address,
            ca_file=server_pki.ca_file,
            cert_file=client_pki.cert,
            key_file=client_pki.key,
            server_name="broker.example",
            credential=CALLER_KEY,
        ) as client:
            assert (await client.create_token(NAMESPACE, SERVICE_ACCOUNT)).token.count(".") == 2
        # Without the client certificate the handshake fails: UNAVAILABLE, retried, then raised.
        async with AsyncTokenBrokerClient(
            server.address,
            ca_file=server_pki.ca_file,
            server_name="broker.example",
            credential=CALLER_KEY,
            retry=RetryPolicy(max_attempts=2, initial_backoff=0.01),
            timeout=5.0,
        ) as client:
            with pytest.raises(TokenBrokerError) as info:
                await client.create_token(NAMESPACE, SERVICE_ACCOUNT)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert info.value.attempts == 2
    finally:
        await server.stop(None)


async def test_errors_carry_code_reason_metadata_and_violations(
    broker: RunningBroker, tmp_path: Path
) -> None:
    async with AsyncTokenBrokerClient(
        broker.address, plaintext=True, credential=CALLER_KEY
    ) as client:
        with pytest.raises(TokenBrokerError) as denied:
            await client.create_token(NAMESPACE, SERVICE_ACCOUNT, audiences=["not-allowed"])
        with pytest.raises(TokenBrokerError) as invalid:
            await client.create_token(NAMESPACE, "Not_A_Name", expiration_seconds=60)
    err = denied.value
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert (err.reason, err.domain) == (Reason.AUDIENCE_NOT_ALLOWED, "tokenbroker.dev")
    assert err.metadata["rule"] == "core-tests"
    assert err.retry_delay is None and not err.retryable and err.attempts == 1
    assert "PERMISSION_DENIED" in str(err) and Reason.AUDIENCE_NOT_ALLOWED in err.describe()

    err = invalid.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == Reason.REQUEST_INVALID
    fields = {v.field for v in err.field_violations}
    assert {"service_account", "token_request.spec.expiration_seconds"} <= fields


async def test_the_credential_file_is_read_for_every_call(
    broker: RunningBroker, tmp_path: Path
) -> None:
    key_file = tmp_path / "credential"
    key_file.write_text("tbk_not-a-known-key")
    async with AsyncTokenBrokerClient(
        broker.address, plaintext=True, credential_file=key_file
    ) as client:
        with pytest.raises(TokenBrokerError) as info:
            await client.create_token(NAMESPACE, SERVICE_ACCOUNT)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.attempts == 1  # never retried
        key_file.write_text(CALLER_KEY)  # rotated
        assert (await client.create_token(NAMESPACE, SERVICE_ACCOUNT)).token


async def test_upstream_unavailable_is_retried_through_the_real_broker(
    broker: RunningBroker, emulator: Emulator
) -> None:
    # More failures than the broker's own upstream attempts (4): the broker answers
    # UNAVAILABLE with RetryInfo, the client waits that long and tries again.
    emulator.faults.fail_next(5, 503)
    async with AsyncTokenBrokerClient(
        broker.address, plaintext=True, credential=CALLER_KEY
    ) as client:
        result = await client.create_token(NAMESPACE, SERVICE_ACCOUNT)
    assert result.token.count(".") == 2
    assert emulator.token_request_count == 6


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="together"):
        ClientConfig("127.0.0.1:1", cert_file=Path("c"))
    with pytest.raises(ValueError, match="plaintext"):
        ClientConfig("127.0.0.1:1", plaintext=True, ca_file=Path("ca"))
    with pytest.raises(ValueError, match="unix socket"):
        ClientConfig("unix:/tmp/x.sock", ca_file=Path("ca"))
    assert "secret" not in repr(ClientConfig("127.0.0.1:1", credential="secret"))
    with pytest.raises(ValueError, match="kind"):
        BoundObject("Deployment", "x").to_proto()


# --- retries (a scripted broker) ----------------------------------------------------------------


@pytest.fixture
async def scripted() -> ScriptedBroker:
    broker = ScriptedBroker()
    await broker.start()
    yield broker  # type: ignore[misc]
    await broker.stop()


def fast(max_attempts: int = 4) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, initial_backoff=0.01, max_backoff=0.02)


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_unavailable_is_retried_and_metadata_is_sent_each_time(
    scripted: ScriptedBroker,
) -> None:
    scripted.script = [Fail(UNAVAILABLE), Fail(UNAVAILABLE)]
    async with AsyncTokenBrokerClient(
        scripted.address, plaintext=True, credential="k", retry=fast()
    ) as client:
        result = await client.create_token("demo", "sa")
    assert result.token == scripted.token
    assert len(scripted.calls) == 3
    assert all(md.get("authorization") == "Bearer k" for _, md in scripted.calls)


async def test_retry_info_sets_the_delay(scripted: ScriptedBroker) -> None:
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)

    scripted.script = [Fail(UNAVAILABLE, retry_after=0.3), Fail(EXHAUSTED, retry_after=0.2)]

    def call() -> str:
        with TokenBrokerClient(
            scripted.address, plaintext=True, retry=fast(), sleep=sleep
        ) as client:
            return client.create_token("demo", "sa").token

    assert await asyncio.to_thread(call) == scripted.token
    assert slept == [0.3, 0.2]  # the server's delays, not the (0.02 s) backoff


async def test_a_bare_pushback_trailer_counts_as_a_retry_delay(scripted: ScriptedBroker) -> None:
    scripted.script = [Fail(EXHAUSTED, bare_trailers=(("grpc-retry-pushback-ms", "40"),))]
    async with AsyncTokenBrokerClient(scripted.address, plaintext=True, retry=fast()) as client:
        assert (await client.create_token("demo", "sa")).token == scripted.token
    assert len(scripted.calls) == 2


async def test_resource_exhausted_without_a_delay_and_other_codes_are_final(
    scripted: ScriptedBroker,
) -> None:
    async with AsyncTokenBrokerClient(scripted.address, plaintext=True, retry=fast()) as client:
        for code in (
            EXHAUSTED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            scripted.calls.clear()
            scripted.script = [Fail(code)]
            with pytest.raises(TokenBrokerError) as info:
                await client.create_token("demo", "sa")
            assert info.value.code == code
            assert info.value.attempts == 1 and len(scripted.calls) == 1
            assert info.value.reason == "SCRIPTED"


async def test_attempts_are_bounded(scripted: ScriptedBroker) -> None:
    scripted.script = [Fail(UNAVAILABLE)] * 5
    async with AsyncTokenBrokerClient(
        scripted.address, plaintext=True, retry=fast(max_attempts=3)
    ) as client:
        with pytest.raises(TokenBrokerError) as info:
            await client.create_token("demo", "sa")
    assert info.value.attempts == 3 and len(scripted.calls) == 3


async def test_no_retry_that_cannot_fit_in_the_deadline(scripted: ScriptedBroker) -> None:
    # The server asks for 30 s; the caller has 2 s: the error is raised at once, with the delay.
    scripted.script = [Fail(UNAVAILABLE, retry_after=30.0)]
    async with AsyncTokenBrokerClient(scripted.address, plaintext=True, retry=fast()) as client:
        with pytest.raises(TokenBrokerError) as info:
            await client.create_token("demo", "sa", timeout=2.0)
    assert info.value.retry_delay == 30.0
    assert len(scripted.calls) == 1


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff=0.2, max_backoff=1.0, multiplier=2.0)
    assert [policy.backoff(n, lambda: 1.0) for n in (1, 2, 3, 4, 10)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.backoff(3, lambda: 0.5) == 0.4
    assert NO_RETRIES.max_attempts == 1


# --- the service config -------------------------------------------------------------------------


def test_the_service_config_file_is_the_documented_one() -> None:
    assert json.loads(SERVICE_CONFIG_FILE.read_text()) == SERVICE_CONFIG


async def test_grpc_accepts_and_applies_the_service_config(scripted: ScriptedBroker) -> None:
    """gRPC refuses an invalid service config at channel creation (INVALID_ARGUMENT); ours is
    accepted, and its retry policy retries UNAVAILABLE inside gRPC (our own retries off)."""
    text = SERVICE_CONFIG_FILE.read_text()
    scripted.script = [Fail(UNAVAILABLE), Fail(UNAVAILABLE)]
    async with AsyncTokenBrokerClient(
        scripted.address,
        plaintext=True,
        retry=NO_RETRIES,
        channel_options=(("grpc.service_config", text), ("grpc.enable_retries", 1)),
    ) as client:
        assert (await client.create_token("demo", "sa")).token == scripted.token
    assert len(scripted.calls) == 3

    broken = json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 4}}]})
    async with AsyncTokenBrokerClient(
        scripted.address,
        plaintext=True,
        retry=NO_RETRIES,
        channel_options=(("grpc.service_config", broken),),
    ) as client:
        with pytest.raises(TokenBrokerError) as info:
            await client.create_token("demo", "sa")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "service config" in info.value.message


def test_errors_are_read_with_the_reason_catalogue() -> None:
    """The client knows each broker reason from the catalogue (broker.reasons): what it
    means, what to do, and whether retrying can help; an unknown reason or another domain
    falls back to the status code's rule."""
    from broker.client.errors import TokenBrokerError
    from broker.reasons import ERROR_DOMAIN

    throttled = TokenBrokerError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "rate limit exceeded",
        reason=Reason.RATE_LIMITED,
        domain=ERROR_DOMAIN,
        retry_delay=0.5,
    )
    assert throttled.catalogued is Reason.RATE_LIMITED
    assert throttled.retryable
    denied = TokenBrokerError(
        grpc.StatusCode.PERMISSION_DENIED,
        "no rule",
        reason=Reason.NO_MATCHING_RULE,
        domain=ERROR_DOMAIN,
        retry_delay=1.0,  # even with a delay: the catalogue says a retry cannot help
    )
    assert denied.catalogued is Reason.NO_MATCHING_RULE
    assert not denied.retryable
    foreign = TokenBrokerError(
        grpc.StatusCode.UNAVAILABLE, "x", reason=Reason.RATE_LIMITED, domain="example.com"
    )
    assert foreign.catalogued is None
    assert foreign.retryable  # UNAVAILABLE: the code's rule
    unknown = TokenBrokerError(
        grpc.StatusCode.UNAVAILABLE, "x", reason="SOMETHING_NEW", domain=ERROR_DOMAIN
    )
    assert unknown.catalogued is None
    assert unknown.retryable
