"""Fault injection at the emulator's token endpoint: APF 429, 5xx, drops, latency, rates.

Behaviour only: no assertion on how long anything took.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from broker.emulator import Emulator, Faults
from broker.emulator.client import EmulatorClient
from tests.support.emulator import (
    ADMIN_TOKEN,
    ALICE_TOKEN,
    BROKER,
    BROKER_TOKEN,
    NS,
    SA,
    assert_status,
    status_body,
)


async def test_429_is_apf_plain_text(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.fail_next(1, 429, retry_after=7)
    reply = await client.create_token(NS, SA)
    assert reply.status == 429
    assert reply.text == "Too many requests, please try again later.\n"  # Go's http.Error
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert reply.headers["Retry-After"] == "7"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert (await client.create_token(NS, SA)).status == 201
    assert [(r.status, r.fault) for r in emu.token_requests] == [(429, "fail 429"), (201, None)]


async def test_429_default_retry_after(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.fail_next(1, 429)
    assert (await client.create_token(NS, SA)).headers["Retry-After"] == "1"


async def test_500_internal_error(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.fail_next(2, 500)
    for _ in range(2):
        assert_status(
            await client.create_token(NS, SA),
            500,
            "InternalError",
            "Internal error occurred: emulated failure",
            {"causes": [{"message": "emulated failure"}]},
        )
    assert (await client.create_token(NS, SA)).status == 201
    assert emu.token_request_count == 3


async def test_503_with_retry_after(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.fail_next(1, 503, retry_after=2, message="etcd is down")
    reply = await client.create_token(NS, SA)
    assert_status(reply, 503, "ServiceUnavailable", "etcd is down", {"retryAfterSeconds": 2})
    assert reply.headers["Retry-After"] == "2"
    emu.faults.fail_next(1, 503)
    assert_status(
        await client.create_token(NS, SA),
        503,
        "ServiceUnavailable",
        "the server is currently unable to handle the request",
    )


async def test_other_codes_get_generic_status(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.fail_next(1, 504)
    assert_status(
        await client.create_token(NS, SA),
        504,
        "Timeout",
        "the server was unable to return a response in the time allotted, but may still be "
        "processing the request",
    )


async def test_faults_act_after_authentication_before_authorization(
    emu: Emulator, client: EmulatorClient
) -> None:
    emu.faults.fail_next(1, 503)
    assert (await client.create_token(NS, SA, token=None)).status == 401
    assert emu.faults.pending == 1  # a 401 does not consume the fault
    assert (await client.create_token(NS, SA, token=ALICE_TOKEN)).status == 503  # not 403
    assert (await client.create_token(NS, SA, token=ALICE_TOKEN)).status == 403


async def test_queued_faults_keep_their_order(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.fail_next(1, 500)
    emu.faults.drop_next(1)
    emu.faults.fail_next(1, 429)
    assert (await client.create_token(NS, SA)).status == 500
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.create_token(NS, SA)
    assert (await client.create_token(NS, SA)).status == 429
    assert (await client.create_token(NS, SA)).status == 201


async def test_dropped_connection(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.drop_next(1)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.create_token(NS, SA)
    record = emu.token_requests[-1]
    assert (record.dropped, record.status, record.fault) == (True, None, "drop")
    assert (await client.create_token(NS, SA)).status == 201
    assert emu.token_request_count == 2


async def test_latency(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.latency = 30.0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.create_token(NS, SA)
    assert emu.token_request_count == 1  # it reached the endpoint
    emu.faults.latency = 0.0
    assert (await client.create_token(NS, SA)).status == 201
    # Stopping does not wait out the first request's 30 s: the fixture's stop() returns.


async def test_concurrency_is_measured(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.latency = 60.0  # hold every request at the endpoint...
    calls = [asyncio.create_task(client.create_token(NS, SA)) for _ in range(5)]
    for _ in range(1000):
        if emu.in_flight == 5:
            break
        await asyncio.sleep(0.01)
    assert (emu.in_flight, emu.in_flight_max) == (5, 5)
    emu.faults.latency = 0.0  # ...then release them all
    replies = await asyncio.gather(*calls)
    assert [r.status for r in replies] == [201] * 5
    assert (emu.in_flight, emu.in_flight_max) == (0, 5)
    emu.reset_counters()
    assert (emu.token_request_count, emu.in_flight_max) == (0, 0)


async def test_error_rates_are_seedable(emu: Emulator, client: EmulatorClient) -> None:
    async def run() -> list[int]:
        return [(await client.create_token(NS, SA)).status for _ in range(24)]

    emu.faults.seed(42)
    emu.faults.set_error_rate(500, 0.3)
    emu.faults.set_error_rate(429, 0.2)
    first = await run()
    emu.faults.seed(42)
    assert await run() == first
    assert {201, 429, 500} == set(first)


async def test_drop_rate(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.seed(7)
    emu.faults.drop_rate = 0.5
    outcomes = []
    for _ in range(12):
        try:
            outcomes.append((await client.create_token(NS, SA)).status)
        except aiohttp.ClientConnectionError:
            outcomes.append(0)
    assert {0, 201} == set(outcomes)
    assert sum(r.dropped for r in emu.token_requests) == outcomes.count(0)


async def test_reset(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.fail_next(5, 503)
    emu.faults.latency = 5.0
    emu.faults.drop_rate = 1.0
    emu.faults.set_error_rate(500, 1.0)
    emu.faults.fail_signing_next(3)
    emu.faults.reset()
    assert (await client.create_token(NS, SA)).status == 201


def test_fault_arguments_are_checked() -> None:
    faults = Faults()
    with pytest.raises(ValueError):
        faults.fail_next(1, 200)
    with pytest.raises(ValueError):
        faults.fail_next(-1, 500)
    with pytest.raises(ValueError):
        faults.fail_next(1, 503, retry_after=-1)
    faults.set_error_rate(500, 0.6)
    with pytest.raises(ValueError):
        faults.set_error_rate(503, 0.5)
    with pytest.raises(ValueError):
        faults.set_error_rate(503, 1.5)


# --- the admin endpoint -------------------------------------------------------------------


async def test_admin_fault_endpoint(emu: Emulator, client: EmulatorClient) -> None:
    async with EmulatorClient(emu.url, emu.ca_file, ADMIN_TOKEN) as admin:
        state = await admin.set_faults(
            {"failNext": [{"count": 1, "status": 503, "retryAfter": 3}], "dropNext": 1}
        )
        assert state["pending"] == [
            {"kind": "fail", "status": 503, "retryAfter": 3.0},
            {"kind": "drop"},
        ]
        reply = await client.create_token(NS, SA)
        assert (reply.status, reply.headers["Retry-After"]) == (503, "3")
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.create_token(NS, SA)

        await admin.set_faults({"failSigningNext": {"count": 1, "message": "no key"}})
        assert (await client.create_token(NS, SA)).json()["message"] == (
            "failed to generate token: no key"
        )

        await admin.set_faults({"errorRates": {"500": 1.0}, "seed": 1})
        assert (await client.create_token(NS, SA)).status == 500
        state = await admin.set_faults({"reset": True, "latency": 0.0})
        assert (state["errorRates"], state["pending"], state["seed"]) == ({}, [], 1)
        token = (await client.create_token(NS, SA)).json()["status"]["token"]

        log = await admin.recorded_requests()
        assert log["count"] == 5
        assert [r["status"] for r in log["requests"]] == [503, None, 500, 500, 201]
        assert log["requests"][0]["user"] == BROKER
        assert log["requests"][0]["body"] == {}
        reply = await admin.request("GET", "/emulator/requests")
        assert BROKER_TOKEN not in reply.text and token not in reply.text  # never a credential

        assert (await admin.request("POST", "/emulator/reset-counters")).status == 200
        assert emu.token_request_count == 0

        bad = await admin.request("POST", "/emulator/faults", json_body={"latency": -1})
        assert bad.status == 400 and bad.json()["reason"] == "BadRequest"
        bad = await admin.request("POST", "/emulator/faults", json_body={"bogus": 1})
        assert bad.status == 400
        bad = await admin.request("POST", "/emulator/faults", json_body={"errorRates": {"500": 2}})
        assert bad.status == 400
        assert emu.faults.error_rates == {}  # a refused update changes nothing


async def test_admin_endpoint_needs_an_admin(client: EmulatorClient) -> None:
    reply = await client.request("POST", "/emulator/faults", json_body={"latency": 1})
    assert_status(
        reply,
        403,
        "Forbidden",
        f'forbidden: User "{BROKER}" cannot post path "/emulator/faults"',
        {},
    )
    reply = await client.request("GET", "/emulator/requests", token=None)
    assert reply.json() == status_body(401, "Unauthorized", "Unauthorized")
