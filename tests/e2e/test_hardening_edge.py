"""The edge of a call, end to end: request bodies that do not parse, calls that never send
their request message, and the bounds on calls in flight.

A real BrokerServer on loopback, real gRPC clients sending raw bytes (no serializer), the
API-server emulator behind it (which must never see any of these calls), the audit log in a
file, the access log captured as JSON and the broker's own metrics registry.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from broker.config import (
    AuditSettings,
    ConfigError,
    KubernetesSettings,
    LogSettings,
    ServerSettings,
    load_settings,
)
from broker.emulator import Emulator
from broker.errors import ERROR_DOMAIN, RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.logs import setup_logging
from broker.reasons import Reason
from broker.server import (
    MAX_RECEIVE_MESSAGE_BYTES,
    SERVICE_NAME,
    BrokerServer,
    channel_options,
)
from broker.upstream import UpstreamClient
from tests.support.stack import CALLER, CALLER_METADATA, NAMESPACE, SERVICE_ACCOUNT, broker_settings
from tests.support.stack import create_request as valid_request

CREATE_TOKEN = f"/{SERVICE_NAME}/CreateToken"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
CREATE_LABELS = {"grpc_type": "unary", "grpc_service": SERVICE_NAME, "grpc_method": "CreateToken"}
CHECK_LABELS = {"grpc_type": "unary", "grpc_service": HEALTH, "grpc_method": "Check"}
WATCH_LABELS = {"grpc_type": "server_stream", "grpc_service": HEALTH, "grpc_method": "Watch"}
REFLECTION_LABELS = {
    "grpc_type": "bidi_stream",
    "grpc_service": REFLECTION,
    "grpc_method": "ServerReflectionInfo",
}

# Bytes that are not a protobuf message of any of the broker's request types.
MALFORMED: dict[str, bytes] = {
    "invalid-utf8-in-a-string-field": b"\x0a\x02\xff\xfe",
    "truncated-varint": b"\x0a\x04demo\x78\xff",
    "stray-end-group-tag": b"\x0a\x04demo\x0c",
    "length-past-the-end": b"\x0a\x10ab",
    "garbage": b"\x00\x01\x02\x03" + b"\xff" * 12,
}
# What gRPC's own answer to such bytes said: internal names, sent to the caller.
INTERNAL_WORDS = ("<class", "DecodeError", "google.protobuf", "Unexpected", "Traceback")
BOUND = 30.0  # seconds: only to stop a hung test, never a measurement

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, BOUND)


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until `check()` holds. A call refused with context.abort() has its
    status sent from inside the handler, its access line and count written just after."""
    for _ in range(3000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


@dataclass
class Edge:
    """A running broker and what it wrote."""

    server: BrokerServer
    audit_file: Path
    logs: io.StringIO

    @property
    def address(self) -> str:
        return self.server.address

    def sample(self, name: str, **labels: str) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def handled(self, labels: dict[str, str], code: str) -> float:
        return self.sample("grpc_server_handled_total", **labels, grpc_code=code)

    def shed(self, reason: str) -> float:
        return self.sample("token_broker_calls_shed_total", reason=reason)

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]

    def access_lines(self, **fields: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.logs.getvalue().splitlines()]
        return [
            line
            for line in lines
            if line.get("logger") == "broker.access"
            and all(line.get(k) == v for k, v in fields.items())
        ]


@dataclass
class EdgeFactory:
    kube: KubernetesSettings
    upstream: UpstreamClient
    tmp_path: Path
    logs: io.StringIO
    started: list[BrokerServer] = field(default_factory=list)

    async def __call__(self, cache: dict[str, Any] | None = None, **server: Any) -> Edge:
        audit_file = self.tmp_path / f"audit-{len(self.started)}.jsonl"
        settings = broker_settings(self.kube, cache=cache, **server).model_copy(
            update={"audit": AuditSettings(sink="file", file=audit_file)}
        )
        broker = BrokerServer(settings, upstream=self.upstream)
        await broker.start()
        self.started.append(broker)
        return Edge(broker, audit_file, self.logs)


@pytest.fixture
async def make_edge(
    kubernetes_settings: KubernetesSettings,
    upstream: UpstreamClient,
    tmp_path: Path,
    restore_logging: None,
) -> AsyncIterator[EdgeFactory]:
    logs = io.StringIO()
    setup_logging(LogSettings(level="debug", format="json"), logs)
    factory = EdgeFactory(kubernetes_settings, upstream, tmp_path, logs)
    try:
        yield factory
    finally:
        for broker in factory.started:
            await broker.stop(None)


@pytest.fixture
async def edge(make_edge: EdgeFactory) -> Edge:
    return await make_edge()


async def failure(call: Awaitable[Any]) -> RichStatus:
    """The rich status of a call that must fail."""
    try:
        await bounded(call)
    except aio.AioRpcError as err:
        return rich_status_from_call(err)
    raise AssertionError("the call succeeded")


def assert_refused(status: RichStatus, code: grpc.StatusCode, reason: str) -> None:
    assert status.code == code, status
    assert status.error_info is not None, status
    assert (status.error_info.reason, status.error_info.domain) == (reason, ERROR_DOMAIN)
    for word in INTERNAL_WORDS:
        assert word not in status.message, status.message


class NeverSends:
    """Request iterators that send nothing until released (then end without a message)."""

    def __init__(self) -> None:
        self.released = asyncio.Event()

    async def messages(self) -> AsyncIterator[bytes]:
        await self.released.wait()
        return
        yield b""  # an async generator


# --- item 1: bodies that do not parse -----------------------------------------------------


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_a_create_token_body_that_does_not_parse_is_invalid_argument(
    edge: Edge, emulator: Emulator, body: bytes
) -> None:
    async with aio.insecure_channel(edge.address) as channel:
        create = channel.unary_unary(CREATE_TOKEN)  # raw bytes in and out
        status = await failure(
            create(body, metadata=(*CALLER_METADATA, ("x-request-id", "req-malformed")))
        )
    assert_refused(status, grpc.StatusCode.INVALID_ARGUMENT, Reason.REQUEST_MALFORMED)
    assert "tokenbroker.v1.CreateTokenRequest" in status.message
    await eventually(
        lambda: edge.handled(CREATE_LABELS, "INVALID_ARGUMENT") == 1, "counted INVALID_ARGUMENT"
    )
    assert edge.handled(CREATE_LABELS, "UNKNOWN") == 0
    assert edge.sample("grpc_server_msg_received_total", **CREATE_LABELS) == 1
    [access] = edge.access_lines(request_id="req-malformed")
    assert (access["grpc_code"], access["reason"], access["user"]) == (
        "INVALID_ARGUMENT",
        Reason.REQUEST_MALFORMED,
        CALLER,
    )
    [audit] = edge.audit_lines()
    assert audit["requestID"] == "req-malformed"
    assert (audit["decision"], audit["code"], audit["reason"]) == (
        "denied",
        "INVALID_ARGUMENT",
        Reason.REQUEST_MALFORMED,
    )
    assert (audit["user"], audit["namespace"], audit["serviceAccount"]) == (CALLER, "", "")
    assert emulator.token_request_count == 0


@pytest.mark.parametrize(
    "messages",
    [[MALFORMED["garbage"]], [MALFORMED["invalid-utf8-in-a-string-field"]], [], [b"", b""]],
    ids=["garbage", "invalid-utf8", "no-message", "two-messages"],
)
async def test_an_unauthenticated_caller_learns_nothing_about_its_bytes(
    edge: Edge, emulator: Emulator, messages: list[bytes]
) -> None:
    async with aio.insecure_channel(edge.address) as channel:
        status = await failure(channel.stream_unary(CREATE_TOKEN)(iter(messages)))
    assert_refused(status, grpc.StatusCode.UNAUTHENTICATED, Reason.CREDENTIALS_MISSING)
    await eventually(lambda: edge.handled(CREATE_LABELS, "UNAUTHENTICATED") == 1, "counted")
    [audit] = edge.audit_lines()
    assert (audit["code"], audit["reason"], audit["user"]) == (
        "UNAUTHENTICATED",
        Reason.CREDENTIALS_MISSING,
        None,
    )
    assert emulator.token_request_count == 0


async def test_empty_bytes_are_a_valid_but_invalid_request(edge: Edge, emulator: Emulator) -> None:
    # b"" is the encoding of an empty CreateTokenRequest: it parses, then fails validation.
    async with aio.insecure_channel(edge.address) as channel:
        status = await failure(channel.unary_unary(CREATE_TOKEN)(b"", metadata=CALLER_METADATA))
    assert_refused(status, grpc.StatusCode.INVALID_ARGUMENT, Reason.REQUEST_INVALID)
    assert status.bad_request is not None and status.bad_request.field_violations
    assert emulator.token_request_count == 0


async def test_a_stream_without_a_request_message_is_malformed(
    edge: Edge, emulator: Emulator
) -> None:
    async with aio.insecure_channel(edge.address) as channel:
        create = channel.stream_unary(CREATE_TOKEN)
        status = await failure(create(iter([]), metadata=CALLER_METADATA))
    assert_refused(status, grpc.StatusCode.INVALID_ARGUMENT, Reason.REQUEST_MALFORMED)
    assert "no request message" in status.message
    await eventually(lambda: edge.handled(CREATE_LABELS, "INVALID_ARGUMENT") == 1, "counted")
    assert edge.sample("grpc_server_msg_received_total", **CREATE_LABELS) == 0
    [audit] = edge.audit_lines()
    assert (audit["reason"], audit["user"]) == (Reason.REQUEST_MALFORMED, CALLER)
    assert emulator.token_request_count == 0


async def test_only_the_first_message_of_a_unary_call_is_read(
    edge: Edge, emulator: Emulator
) -> None:
    # As gRPC's own unary handling: the call is answered from the first message.
    first = valid_request().SerializeToString()
    async with aio.insecure_channel(edge.address) as channel:
        create = channel.stream_unary(CREATE_TOKEN)
        answer = await bounded(
            create(iter([first, MALFORMED["garbage"]]), metadata=CALLER_METADATA)
        )
    assert pb.CreateTokenResponse.FromString(answer).token_request.status.token
    await eventually(lambda: edge.handled(CREATE_LABELS, "OK") == 1, "counted")
    assert edge.sample("grpc_server_msg_received_total", **CREATE_LABELS) == 1
    assert emulator.token_request_count == 1


async def test_a_message_over_the_size_limit_is_refused_by_grpc(
    edge: Edge, emulator: Emulator
) -> None:
    async with aio.insecure_channel(edge.address) as channel:
        create = channel.unary_unary(CREATE_TOKEN)
        body = valid_request(audiences=["x" * MAX_RECEIVE_MESSAGE_BYTES]).SerializeToString()
        status = await failure(create(body, metadata=CALLER_METADATA))
        assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        await eventually(
            lambda: sum(edge.handled(CREATE_LABELS, c.name) for c in grpc.StatusCode) == 1,
            "counted",
        )
        assert edge.handled(CREATE_LABELS, "UNKNOWN") == 0
        assert emulator.token_request_count == 0
        # The broker serves on.
        answer = await bounded(
            create(valid_request().SerializeToString(), metadata=CALLER_METADATA)
        )
        assert pb.CreateTokenResponse.FromString(answer).token_request.status.token


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_health_and_reflection_answer_bytes_that_do_not_parse_too(
    edge: Edge, body: bytes
) -> None:
    async with aio.insecure_channel(edge.address) as channel:
        check = channel.unary_unary(f"/{HEALTH}/Check")
        status = await failure(check(body))
        assert_refused(status, grpc.StatusCode.INVALID_ARGUMENT, Reason.REQUEST_MALFORMED)
        assert "grpc.health.v1.HealthCheckRequest" in status.message

        watch = channel.unary_stream(f"/{HEALTH}/Watch")(body)
        status = await failure(watch.read())
        assert_refused(status, grpc.StatusCode.INVALID_ARGUMENT, Reason.REQUEST_MALFORMED)

        # The first message is good, the second is not.
        reflect = channel.stream_stream(f"/{REFLECTION}/ServerReflectionInfo")(
            iter(
                [reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(), body]
            )
        )
        first = reflection_pb2.ServerReflectionResponse.FromString(await bounded(reflect.read()))
        assert SERVICE_NAME in [s.name for s in first.list_services_response.service]
        status = await failure(reflect.read())
        assert_refused(status, grpc.StatusCode.INVALID_ARGUMENT, Reason.REQUEST_MALFORMED)

        # Good bytes are still served.
        ok = health_pb2.HealthCheckResponse.FromString(
            await bounded(check(health_pb2.HealthCheckRequest(service="").SerializeToString()))
        )
        assert ok.status == health_pb2.HealthCheckResponse.SERVING

    for labels in (CHECK_LABELS, WATCH_LABELS, REFLECTION_LABELS):
        await eventually(
            lambda labels=labels: edge.handled(labels, "INVALID_ARGUMENT") == 1,  # type: ignore[misc]
            f"{labels['grpc_method']} counted INVALID_ARGUMENT",
        )
        assert edge.handled(labels, "UNKNOWN") == 0
        [access] = edge.access_lines(
            grpc_method=labels["grpc_method"], grpc_code="INVALID_ARGUMENT"
        )
        assert access["reason"] == Reason.REQUEST_MALFORMED
    assert edge.handled(CHECK_LABELS, "OK") == 1
    assert edge.sample("grpc_server_msg_received_total", **REFLECTION_LABELS) == 2


# --- item 3b: calls held open --------------------------------------------------------------


@pytest.mark.parametrize("credentials", [True, False], ids=["authenticated", "anonymous"])
async def test_calls_that_never_send_their_request_are_ended_by_the_server(
    make_edge: EdgeFactory, emulator: Emulator, credentials: bool
) -> None:
    edge = await make_edge(receive_timeout_seconds=0.5)
    held = NeverSends()
    metadata = CALLER_METADATA if credentials else ()
    count = 20
    async with aio.insecure_channel(edge.address) as channel:
        create = channel.stream_unary(CREATE_TOKEN)
        check = channel.stream_unary(f"/{HEALTH}/Check")
        try:
            # No deadline: only the server can end them.
            calls = [create(held.messages(), metadata=metadata) for _ in range(count)]
            probe = check(held.messages())
            statuses = [await failure(call) for call in calls]
            probe_status = await failure(probe)
        finally:
            held.released.set()
        for status in statuses:
            assert_refused(
                status, grpc.StatusCode.DEADLINE_EXCEEDED, Reason.REQUEST_RECEIVE_TIMEOUT
            )
        assert_refused(
            probe_status, grpc.StatusCode.DEADLINE_EXCEEDED, Reason.REQUEST_RECEIVE_TIMEOUT
        )

        await eventually(
            lambda: edge.handled(CREATE_LABELS, "DEADLINE_EXCEEDED") == count, "counted"
        )
        await eventually(lambda: edge.handled(CHECK_LABELS, "DEADLINE_EXCEEDED") == 1, "counted")
        assert edge.shed(Reason.REQUEST_RECEIVE_TIMEOUT) == count + 1
        lines = edge.audit_lines()
        assert len(lines) == count
        assert {(a["code"], a["reason"], a["decision"]) for a in lines} == {
            ("DEADLINE_EXCEEDED", Reason.REQUEST_RECEIVE_TIMEOUT, "error")
        }
        assert {a["user"] for a in lines} == {None}  # not authenticated yet
        assert len(edge.access_lines(reason=Reason.REQUEST_RECEIVE_TIMEOUT)) == count + 1
        assert emulator.token_request_count == 0

        # A normal call is served afterwards.
        answer = await bounded(
            channel.unary_unary(CREATE_TOKEN)(
                valid_request().SerializeToString(), metadata=CALLER_METADATA
            )
        )
        assert pb.CreateTokenResponse.FromString(answer).token_request.status.token


async def test_calls_beyond_the_pending_limit_are_shed_at_once(
    make_edge: EdgeFactory, emulator: Emulator
) -> None:
    # A receive bound far longer than the test: the held calls stay pending until cancelled.
    edge = await make_edge(max_pending_calls=5, receive_timeout_seconds=300)
    held = NeverSends()
    async with aio.insecure_channel(edge.address) as channel:
        create = channel.stream_unary(CREATE_TOKEN)
        calls = [create(held.messages(), metadata=CALLER_METADATA) for _ in range(5)]
        try:
            # The server answers headers once a call is admitted (counted pending).
            for call in calls:
                await bounded(call.initial_metadata())
            unary = channel.unary_unary(CREATE_TOKEN)
            shed = [
                await failure(unary(valid_request().SerializeToString(), metadata=CALLER_METADATA))
                for _ in range(3)
            ]
            shed.append(await failure(create(held.messages(), metadata=())))
            for status in shed:
                assert_refused(status, grpc.StatusCode.UNAVAILABLE, Reason.TOO_MANY_PENDING_CALLS)
                assert status.retry_info is not None
                assert status.retry_info.retry_delay.ToMilliseconds() == 1000
                assert status.trailers["grpc-retry-pushback-ms"] == "1000"
            await eventually(lambda: edge.handled(CREATE_LABELS, "UNAVAILABLE") == 4, "counted")
            assert edge.shed(Reason.TOO_MANY_PENDING_CALLS) == 4
            lines = edge.audit_lines()
            assert [(a["code"], a["reason"]) for a in lines] == [
                ("UNAVAILABLE", Reason.TOO_MANY_PENDING_CALLS)
            ] * 4
            assert len(edge.access_lines(reason=Reason.TOO_MANY_PENDING_CALLS)) == 4
        finally:
            for call in calls:
                call.cancel()
            held.released.set()
        await eventually(lambda: edge.handled(CREATE_LABELS, "CANCELLED") == 5, "cancelled")
        # Their slots are free again: a normal call is served.
        answer = await bounded(
            channel.unary_unary(CREATE_TOKEN)(
                valid_request().SerializeToString(), metadata=CALLER_METADATA
            )
        )
        assert pb.CreateTokenResponse.FromString(answer).token_request.status.token
    assert emulator.token_request_count == 1


async def test_one_connection_has_at_most_max_concurrent_streams_calls(
    make_edge: EdgeFactory,
) -> None:
    edge = await make_edge(max_concurrent_streams=3, receive_timeout_seconds=300)
    held = NeverSends()
    async with (
        aio.insecure_channel(edge.address) as channel,
        aio.insecure_channel(
            edge.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as other,
    ):
        create = channel.stream_unary(CREATE_TOKEN)
        calls = [create(held.messages(), metadata=CALLER_METADATA) for _ in range(3)]
        try:
            for call in calls:
                await bounded(call.initial_metadata())
            body = valid_request().SerializeToString()
            # A fourth call on that connection waits for a stream: the server never sees it.
            waiting = await failure(
                channel.unary_unary(CREATE_TOKEN)(body, metadata=CALLER_METADATA, timeout=1)
            )
            assert waiting.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert edge.sample("grpc_server_started_total", **CREATE_LABELS) == 3
            # Another connection has streams of its own.
            answer = await bounded(
                other.unary_unary(CREATE_TOKEN)(body, metadata=CALLER_METADATA, timeout=BOUND)
            )
            assert pb.CreateTokenResponse.FromString(answer).token_request.status.token
        finally:
            for call in calls:
                call.cancel()
            held.released.set()


async def test_a_call_without_a_deadline_gets_the_default_one(
    make_edge: EdgeFactory, emulator: Emulator
) -> None:
    # With the token cache: the two calls wait on one upstream call (single flight).
    edge = await make_edge(default_deadline_seconds=0.5, cache={"enabled": True})
    body = valid_request().SerializeToString()
    emulator.faults.latency = 600.0  # the API server answers only when released
    try:
        async with aio.insecure_channel(edge.address) as channel:
            create = channel.unary_unary(CREATE_TOKEN)
            statuses = await asyncio.gather(
                *(failure(create(body, metadata=CALLER_METADATA)) for _ in range(2))
            )
            emulator.faults.latency = 0.0
            # The broker serves on; this call may join the released upstream call.
            answer = await bounded(create(body, metadata=CALLER_METADATA))
            assert pb.CreateTokenResponse.FromString(answer).token_request.status.token
    finally:
        emulator.faults.latency = 0.0
    for status in statuses:
        assert_refused(status, grpc.StatusCode.DEADLINE_EXCEEDED, Reason.DEFAULT_DEADLINE_EXCEEDED)
        assert status.error_info is not None
        assert status.error_info.metadata["deadlineSeconds"] == "0.5"
    await eventually(lambda: edge.handled(CREATE_LABELS, "DEADLINE_EXCEEDED") == 2, "counted")
    lines = edge.audit_lines()
    assert [(a["code"], a["reason"], a["user"]) for a in lines[:2]] == [
        ("DEADLINE_EXCEEDED", Reason.DEFAULT_DEADLINE_EXCEEDED, CALLER)
    ] * 2
    assert {(a["namespace"], a["serviceAccount"]) for a in lines} == {(NAMESPACE, SERVICE_ACCOUNT)}
    assert lines[2]["code"] == "OK"
    assert len(edge.access_lines(reason=Reason.DEFAULT_DEADLINE_EXCEEDED)) == 2
    assert emulator.token_request_count == 1


async def test_the_caller_s_own_deadline_wins_over_the_default(
    make_edge: EdgeFactory, emulator: Emulator
) -> None:
    edge = await make_edge(default_deadline_seconds=0.2)
    emulator.faults.latency = 0.5  # longer than the default deadline
    try:
        async with aio.insecure_channel(edge.address) as channel:
            create = channel.unary_unary(CREATE_TOKEN)
            answer = await create(
                valid_request().SerializeToString(), metadata=CALLER_METADATA, timeout=BOUND
            )
    finally:
        emulator.faults.latency = 0.0
    assert pb.CreateTokenResponse.FromString(answer).token_request.status.token
    [audit] = edge.audit_lines()
    assert audit["code"] == "OK"


# --- settings ----------------------------------------------------------------------------------


def bounds(server: ServerSettings) -> tuple[int, float, float, int]:
    return (
        server.max_concurrent_streams,
        server.receive_timeout_seconds,
        server.default_deadline_seconds,
        server.max_pending_calls,
    )


def test_the_bounds_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bounds(load_settings(None, {}).server) == (100, 10.0, 60.0, 2000)
    assert ("grpc.max_concurrent_streams", 100) in channel_options(load_settings(None, {}))
    for name, value in (
        ("MAX_CONCURRENT_STREAMS", "7"),
        ("RECEIVE_TIMEOUT_SECONDS", "2.5"),
        ("DEFAULT_DEADLINE_SECONDS", "45"),
        ("MAX_PENDING_CALLS", "300"),
    ):
        monkeypatch.setenv(f"TOKEN_BROKER_SERVER__{name}", value)
    assert bounds(load_settings(None, {}).server) == (7, 2.5, 45.0, 300)
    monkeypatch.setenv("TOKEN_BROKER_SERVER__MAX_PENDING_CALLS", "0")
    with pytest.raises(ConfigError, match=r"server\.maxPendingCalls"):
        load_settings(None, {})
