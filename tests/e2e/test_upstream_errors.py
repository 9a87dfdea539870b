"""Upstream failures: retries within the deadline, and the mapping to gRPC statuses.

Faults are injected with the emulator's own knobs; the emulator's request counts show what
reached the API server. No timing assertions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from broker.config import ConfigError, KubernetesSettings
from broker.emulator import Emulator
from broker.errors import ERROR_DOMAIN, KUBERNETES_DOMAIN, BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import Reason, kubernetes_reason
from broker.server import BrokerServer
from broker.upstream import UpstreamClient, parse_warnings
from tests.support.stack import (
    BROKER_TOKEN,
    CALLER_KEY,
    NAMESPACE,
    SERVICE_ACCOUNT,
    BearerCredential,
    RunningBroker,
    broker_settings,
    call_error,
    create_request,
)


def retry_seconds(status: object) -> float:
    info = status.retry_info  # type: ignore[attr-defined]
    assert info is not None, "expected RetryInfo"
    return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)


async def upstream_error(broker: RunningBroker, tr: pb.TokenRequest) -> BrokerError:
    """The BrokerError UpstreamClient.create_token raises for `tr` in NAMESPACE/SERVICE_ACCOUNT."""
    with pytest.raises(BrokerError) as info:
        await broker.upstream.create_token(NAMESPACE, SERVICE_ACCOUNT, tr, timeout=10)
    return info.value


# --- retries ------------------------------------------------------------------------------


@pytest.mark.parametrize("http_status", [500, 503])
async def test_5xx_then_success(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator, http_status: int
) -> None:
    emulator.faults.fail_next(2, http_status)
    resp = await stub.CreateToken(create_request(), timeout=10)
    assert resp.token_request.status.token
    assert emulator.token_request_count == 3


async def test_429_retry_after_honoured(
    stub: pb_grpc.TokenBrokerServiceStub,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="broker.upstream")
    emulator.faults.fail_next(1, 429, retry_after=1)
    resp = await stub.CreateToken(create_request(), timeout=10)
    assert resp.token_request.status.token
    assert emulator.token_request_count == 2
    # The wait was the server's Retry-After, not our (10-50 ms) backoff.
    assert any("retrying in 1.000s" in r.getMessage() for r in caplog.records)


@pytest.mark.retry(max_retry_after_seconds=2)
async def test_429_retry_after_longer_than_we_wait(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    emulator.faults.fail_next(1, 429, retry_after=30)
    status = await call_error(stub, create_request())
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert status.message == "Too many requests, please try again later."
    assert status.error_info is not None
    assert status.error_info.reason == Reason.KUBERNETES_TOO_MANY_REQUESTS
    assert status.error_info.domain == KUBERNETES_DOMAIN
    assert status.error_info.metadata["kubernetesCode"] == "429"
    assert retry_seconds(status) == 30
    assert status.trailers["grpc-retry-pushback-ms"] == "30000"
    assert emulator.token_request_count == 1


async def test_429_retry_after_beyond_the_deadline(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    # Retry-After 3 s is within max_retry_after (5 s) but not within the 1 s deadline:
    # answer at once with the server's delay rather than sleeping past the deadline.
    emulator.faults.fail_next(1, 429, retry_after=3)
    status = await call_error(stub, create_request(), timeout=1.0)
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert retry_seconds(status) == 3
    assert emulator.token_request_count == 1


@pytest.mark.retry(max_attempts=3)
async def test_retries_exhausted(stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator) -> None:
    emulator.faults.fail_next(10, 503)
    status = await call_error(stub, create_request())
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert status.error_info is not None
    assert status.error_info.reason == Reason.KUBERNETES_SERVICE_UNAVAILABLE
    assert status.error_info.domain == KUBERNETES_DOMAIN
    assert status.error_info.metadata["kubernetesCode"] == "503"
    assert retry_seconds(status) > 0
    assert emulator.token_request_count == 3


async def test_500_relayed_after_retries(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    emulator.faults.fail_next(10, 500)
    status = await call_error(stub, create_request())
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert status.error_info is not None
    assert status.error_info.reason == Reason.KUBERNETES_INTERNAL_ERROR
    assert emulator.token_request_count == 4  # TEST_RETRY max_attempts


async def test_not_retried_4xx(stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator) -> None:
    status = await call_error(stub, create_request(service_account="nobody"))
    assert status.code == grpc.StatusCode.NOT_FOUND
    assert emulator.token_request_count == 1


async def test_dropped_connection_is_retried(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    emulator.faults.drop_next(1)
    resp = await stub.CreateToken(create_request(), timeout=10)
    assert resp.token_request.status.token
    assert emulator.token_request_count == 2


async def test_deadline_propagation(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    emulator.faults.latency = 3.0
    status = await call_error(stub, create_request(), timeout=0.5)
    assert status.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The request reached the API server once; no retry was started past the deadline.
    emulator.faults.latency = 0.0
    assert emulator.token_request_count == 1


async def test_no_deadline_uses_configured_timeout(
    emulator: Emulator, kubernetes_settings: KubernetesSettings
) -> None:
    settings = kubernetes_settings.model_copy(update={"request_timeout_seconds": 0.3})
    client = await UpstreamClient.from_settings(settings)
    try:
        emulator.faults.latency = 3.0
        with pytest.raises(BrokerError) as info:
            await client.create_token(NAMESPACE, SERVICE_ACCOUNT, pb.TokenRequest())
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (info.value.reason, info.value.domain) == (Reason.UPSTREAM_TIMEOUT, ERROR_DOMAIN)
        assert emulator.token_request_count == 1
    finally:
        emulator.faults.latency = 0.0
        await client.close()


async def test_emulator_down(stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator) -> None:
    await emulator.stop()
    status = await call_error(stub, create_request())
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert status.message == "the Kubernetes API server is unreachable"
    assert status.error_info is not None
    assert (status.error_info.reason, status.error_info.domain) == (
        Reason.KUBERNETES_UNREACHABLE,
        ERROR_DOMAIN,
    )
    assert retry_seconds(status) > 0


# --- the broker's own credentials ---------------------------------------------------------


UNAUTHORIZED_MESSAGE = (
    "the Kubernetes API server rejected the broker's own credentials (HTTP 401: Unauthorized); "
    "the caller's request was not the problem — the broker's Kubernetes credentials need fixing"
)


async def test_wrong_broker_token(
    emulator: Emulator, tmp_path: Path, kubernetes_settings: KubernetesSettings
) -> None:
    path = tmp_path / "kubeconfig-other"
    emulator.write_kubeconfig(path, user_token="not-a-known-token")
    kube = kubernetes_settings.model_copy(update={"kubeconfig": path})
    async with (
        BrokerServer(broker_settings(kube)) as server,
        grpc.aio.insecure_channel(
            server.address, interceptors=[BearerCredential(CALLER_KEY)]
        ) as channel,
    ):
        status = await call_error(pb_grpc.TokenBrokerServiceStub(channel), create_request())
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert status.message == UNAUTHORIZED_MESSAGE
    assert status.error_info is not None
    assert (status.error_info.reason, status.error_info.domain) == (
        Reason.KUBERNETES_UNAUTHORIZED,
        KUBERNETES_DOMAIN,
    )
    assert status.error_info.metadata["kubernetesCode"] == "401"


async def test_broker_user_removed(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    await stub.CreateToken(create_request(), timeout=10)
    emulator.remove_user(BROKER_TOKEN)
    status = await call_error(stub, create_request())
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert status.message == UNAUTHORIZED_MESSAGE
    assert status.error_info is not None
    assert status.error_info.reason == Reason.KUBERNETES_UNAUTHORIZED


# --- API-server validation relayed (upstream client used directly, bypassing ours) --------


async def test_422_causes_become_field_violations(broker: RunningBroker) -> None:
    tr = pb.TokenRequest(spec=pb.TokenRequestSpec(expiration_seconds=60))
    err = await upstream_error(broker, tr)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == (
        'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: '
        "Invalid value: 60: may not specify a duration less than 10 minutes"
    )
    assert (err.reason, err.domain) == (Reason.KUBERNETES_INVALID, KUBERNETES_DOMAIN)
    assert err.metadata["kubernetesReason"] == "Invalid"
    assert err.metadata["kubernetesCode"] == "422"
    assert err.metadata["kubernetesKind"] == "TokenRequest"
    assert [(v.field, v.description, v.reason) for v in err.field_violations] == [
        (
            "token_request.spec.expiration_seconds",
            "Invalid value: 60: may not specify a duration less than 10 minutes",
            "FieldValueInvalid",
        )
    ]


async def test_422_rule1_metadata_name(broker: RunningBroker) -> None:
    tr = pb.TokenRequest(metadata=pb.ObjectMeta(name="someone-else"))
    err = await upstream_error(broker, tr)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == (
        f'TokenRequest.authentication.k8s.io "{SERVICE_ACCOUNT}" is invalid: metadata.name: '
        'Invalid value: "someone-else": must match the service account name if specified'
    )
    assert [v.field for v in err.field_violations] == ["token_request.metadata.name"]


async def test_400_namespace_mismatch(broker: RunningBroker) -> None:
    tr = pb.TokenRequest(metadata=pb.ObjectMeta(namespace="elsewhere"))
    err = await upstream_error(broker, tr)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == (
        "the namespace of the provided object does not match the namespace sent on the request"
    )
    assert err.reason == Reason.KUBERNETES_BAD_REQUEST
    assert not err.field_violations


# --- small pure pieces --------------------------------------------------------------------


def test_kubernetes_reason_names() -> None:
    assert kubernetes_reason("NotFound") == Reason.KUBERNETES_NOT_FOUND
    assert kubernetes_reason("TooManyRequests") == Reason.KUBERNETES_TOO_MANY_REQUESTS
    assert kubernetes_reason("InternalError") == Reason.KUBERNETES_INTERNAL_ERROR
    assert kubernetes_reason("ServiceUnavailable") == Reason.KUBERNETES_SERVICE_UNAVAILABLE
    assert kubernetes_reason("") == Reason.KUBERNETES_UNKNOWN
    assert len(kubernetes_reason("X" * 200)) <= 63


def test_parse_warnings_single_header_with_two_values() -> None:
    headers = {"Warning": '299 - "a, b", 299 - "c \\"q\\"", 199 - "misc"'}
    assert parse_warnings(headers) == ("a, b", 'c "q"')


async def test_missing_kubeconfig_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope" / "kubeconfig"
    with pytest.raises(ConfigError, match=r"kubernetes\.kubeconfig: no such file: .*nope"):
        await UpstreamClient.from_settings(
            KubernetesSettings(mode="kubeconfig", kubeconfig=missing)
        )
    # Nothing configured and no default file either.
    monkeypatch.setenv("KUBECONFIG", str(missing))
    with pytest.raises(ConfigError, match="no kubeconfig found"):
        await UpstreamClient.from_settings(KubernetesSettings(mode="kubeconfig"))
