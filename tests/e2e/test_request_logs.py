"""Request logs: every line logged while a call is handled carries its request id, and each
call ends with one access line (logger broker.access) — JSON, never a token."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.config import LogSettings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.logs import bind_request_id, current_request_id, setup_logging
from broker.observe import loggable
from broker.reasons import Reason
from broker.server import BrokerServer
from tests.support.stack import (
    CALLER,
    CALLER_KEY,
    NAMESPACE,
    SERVICE_ACCOUNT,
    BearerCredential,
    RunningBroker,
    call_error,
    create_request,
)

ACCESS = "broker.access"


@pytest.fixture
def logs(restore_logging: None) -> io.StringIO:
    stream = io.StringIO()
    setup_logging(LogSettings(level="debug", format="json"), stream)
    return stream


@pytest.fixture
def server(broker: RunningBroker) -> BrokerServer:
    return broker.server


def entries(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line, which must be a JSON object."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def of_request(stream: io.StringIO, request_id: str) -> list[dict[str, Any]]:
    return [e for e in entries(stream) if e.get("request_id") == request_id]


async def access_line(stream: io.StringIO, **fields: str) -> dict[str, Any]:
    """The one access line with these fields. A call refused with context.abort() has its
    status sent from inside the handler and its line written just after, so its caller can
    look first: this waits for it (bounded: a line never written fails here)."""
    for _ in range(1000):
        found = [
            e
            for e in entries(stream)
            if e["logger"] == ACCESS and all(e.get(k) == v for k, v in fields.items())
        ]
        if found:
            [line] = found
            return line
        await asyncio.sleep(0.01)
    raise AssertionError(f"no access line with {fields}")


async def test_access_line_and_request_id_of_a_successful_call(
    logs: io.StringIO, stub: pb_grpc.TokenBrokerServiceStub
) -> None:
    call = stub.CreateToken(create_request(), metadata=(("x-request-id", "req-ok-1"),), timeout=10)
    response = await call
    assert ("x-request-id", "req-ok-1") in tuple(await call.initial_metadata())
    [access] = [e for e in of_request(logs, "req-ok-1") if e["logger"] == ACCESS]
    assert access["level"] == "info"
    assert access["grpc_service"] == "tokenbroker.v1.TokenBrokerService"
    assert access["grpc_method"] == "CreateToken"
    assert access["grpc_code"] == "OK"
    assert isinstance(access["latency_ms"], float) and access["latency_ms"] > 0
    assert access["namespace"] == NAMESPACE
    assert access["service_account"] == SERVICE_ACCOUNT
    assert access["user"] == CALLER
    assert access["auth_method"] == "apiKey"
    assert "reason" not in access
    text = logs.getvalue()
    assert response.token_request.status.token not in text
    assert "eyJ" not in text and CALLER_KEY not in text


async def test_every_line_of_a_call_carries_its_request_id(
    logs: io.StringIO, stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    # One 503 then success: the upstream client logs the retry, inside the call.
    emulator.faults.fail_next(1, 503)
    await stub.CreateToken(create_request(), metadata=(("x-request-id", "req-retry"),), timeout=10)
    lines = of_request(logs, "req-retry")
    loggers = [e["logger"] for e in lines]
    assert "broker.upstream" in loggers
    retry = next(e for e in lines if e["logger"] == "broker.upstream")
    assert "retrying" in retry["message"]
    assert loggers[-1] == ACCESS
    # No line of the call went out without it.
    upstream_lines = [e for e in entries(logs) if e["logger"] == "broker.upstream"]
    assert all(e.get("request_id") == "req-retry" for e in upstream_lines)


async def test_refusals_log_code_reason_and_request_id(
    logs: io.StringIO, server: BrokerServer, stub: pb_grpc.TokenBrokerServiceStub
) -> None:
    async with aio.insecure_channel(
        server.address, interceptors=[BearerCredential("tbk_wrong-key")]
    ) as channel:
        await call_error(pb_grpc.TokenBrokerServiceStub(channel), create_request())
    # (Only this call's line: logging is process-wide, and another test's server may still be
    # finishing its own calls.)
    refused = [
        e
        for e in entries(logs)
        if e["logger"] == "broker.authn" and e.get("auth_failure") == "unknown API key"
    ]
    [authn] = refused
    request_id = authn["request_id"]  # a generated one: the caller sent none
    access = await access_line(logs, request_id=request_id)
    assert access["grpc_code"] == "UNAUTHENTICATED"
    assert access["reason"] == Reason.CREDENTIALS_INVALID
    assert "user" not in access
    assert "tbk_wrong-key" not in logs.getvalue()

    status = await call_error(stub, create_request(audiences=["https://nope.example"]))
    assert status.error_info is not None
    denied = await access_line(logs, grpc_code="PERMISSION_DENIED")
    assert denied["reason"] == Reason.AUDIENCE_NOT_ALLOWED
    assert denied["user"] == CALLER


async def test_generated_request_id_is_the_one_returned(
    logs: io.StringIO, stub: pb_grpc.TokenBrokerServiceStub
) -> None:
    call = stub.CreateToken(create_request(), timeout=10)
    await call
    returned = dict(tuple(await call.initial_metadata()))["x-request-id"]
    [access] = [e for e in entries(logs) if e["logger"] == ACCESS]
    assert access["request_id"] == returned


async def test_an_insane_request_id_is_replaced(
    logs: io.StringIO, stub: pb_grpc.TokenBrokerServiceStub
) -> None:
    call = stub.CreateToken(
        create_request(), metadata=(("x-request-id", "has spaces"),), timeout=10
    )
    await call
    returned = dict(tuple(await call.initial_metadata()))["x-request-id"]
    assert returned != "has spaces"
    [access] = [e for e in entries(logs) if e["logger"] == ACCESS]
    assert access["request_id"] == returned


async def test_health_checks_are_logged_at_debug_only(
    restore_logging: None, server: BrokerServer
) -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(level="info", format="json"), stream)
    async with aio.insecure_channel(server.address) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert not [e for e in entries(stream) if e["logger"] == ACCESS]


async def test_text_format_shows_the_request_id(
    restore_logging: None, stub: pb_grpc.TokenBrokerServiceStub
) -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(level="info", format="text"), stream)
    await stub.CreateToken(create_request(), metadata=(("x-request-id", "req-text"),), timeout=10)
    [line] = [line for line in stream.getvalue().splitlines() if ACCESS in line]
    assert "tokenbroker.v1.TokenBrokerService/CreateToken OK" in line
    assert "request_id=req-text" in line
    assert "namespace=demo" in line


def test_request_id_filter_outside_and_inside_a_binding(logs: io.StringIO) -> None:
    log = logging.getLogger("broker.test")
    log.info("outside")
    with bind_request_id("req-bound"):
        assert current_request_id() == "req-bound"
        log.info("inside")
        log.info("explicit", extra={"request_id": "req-explicit"})  # the record's own wins
    assert current_request_id() is None
    outside, inside, explicit = entries(logs)
    assert "request_id" not in outside
    assert inside["request_id"] == "req-bound"
    assert explicit["request_id"] == "req-explicit"


def test_loggable_bounds_what_a_caller_supplies() -> None:
    # Escaping is the formatters' (test_hardening_log_lines.py); bounding is here.
    assert loggable("demo") == "demo"
    assert loggable("x" * 1000).startswith("x" * 253 + "...(truncated: 1000 chars, sha256:")
