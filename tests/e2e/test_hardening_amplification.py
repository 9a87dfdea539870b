"""Audit and log amplification (issue 14, item 3), through the real stack: a call that failed
authentication is audited minimally whatever it held, sizes the API server could never accept
are refused at validation, and a peer address that keeps failing authentication is refused
before authentication, its refusals audited once per episode. The bounds and the throttle
in-process: tests/unit/test_hardening_amplification.py."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.reasons import Reason
from tests.support.hardening import MB, create, eventually, hardening_settings, marker, running
from tests.support.stack import CALLER_KEY, LOCAL_CALLER, POD, create_request

BAD_KEY = "tbk_not-a-configured-key-000000"
# An audit line of a call that failed authentication, whatever the request held.
UNAUTHENTICATED_LINE_BYTES = 2048


async def test_unauthenticated_call_with_huge_fields_gets_a_small_audit_line(
    emulator: Emulator, kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    uid = "u" * MB  # the 1 MB bound_object_ref.uid
    huge_uid = create_request(bound=pb.BoundObjectReference(kind="Pod", name=POD, uid=uid))
    namespace, service_account = "n" * 100_000, "s" * 100_000
    big_audiences = create_request(
        namespace, service_account, audiences=[f"{i:04d}" + "a" * 1020 for i in range(32)]
    )
    async with running(hardening_settings(kubernetes_settings, tmp_path)) as broker:
        for request in (huge_uid, big_audiences):
            _, status = await create(broker.server.address, request, bearer=BAD_KEY)
            assert status is not None and status.code == grpc.StatusCode.UNAUTHENTICATED
        lines = broker.audit_lines()
    assert emulator.token_request_count == 0
    assert len(lines) == 2
    assert all(len(line.encode()) < UNAUTHENTICATED_LINE_BYTES for line in lines), [
        len(line) for line in lines
    ]
    first, second = (json.loads(line) for line in lines)
    # Minimal: who was refused and what for, none of the request's other fields.
    for entry in (first, second):
        assert (entry["user"], entry["reason"]) == (None, Reason.CREDENTIALS_INVALID)
        assert (entry["audiences"], entry["boundObjectRef"]) == (None, None)
        assert (entry["requestedExpirationSeconds"], entry["dryRun"]) == (None, None)
    assert uid[:300] not in lines[0]
    assert second["namespace"] == "n" * 253 + marker(namespace)
    assert second["serviceAccount"] == "s" * 253 + marker(service_account)


async def test_authenticated_oversize_fields_are_refused_at_validation(
    emulator: Emulator, kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    def bound(**fields: str) -> pb.CreateTokenRequest:
        ref = {"kind": "Pod", "api_version": "v1", "name": POD, **fields}
        return create_request(bound=pb.BoundObjectReference(**ref))

    cases = {
        "uid": (bound(uid="u" * MB), "Too long: may not be longer than 128 bytes"),
        "uid-129": (bound(uid="u" * 129), "Too long: may not be longer than 128 bytes"),
        "api_version": (
            bound(api_version="v" * 318),
            "Too long: may not be longer than 317 bytes",
        ),
        "name": (bound(name="p" * 254), "must be no more than 253 characters"),
    }
    async with running(hardening_settings(kubernetes_settings, tmp_path)) as broker:
        for label, (request, description) in cases.items():
            _, status = await create(broker.server.address, request, bearer=CALLER_KEY)
            assert status is not None, label
            assert status.code == grpc.StatusCode.INVALID_ARGUMENT, (label, status)
            assert status.error_info is not None
            assert status.error_info.reason == Reason.REQUEST_INVALID, label
            assert status.bad_request is not None
            field = label.split("-")[0]
            [violation] = [
                v
                for v in status.bad_request.field_violations
                if v.field == f"token_request.spec.bound_object_ref.{field}"
            ]
            assert description in violation.description, (label, violation)
        assert emulator.token_request_count == 0  # never reached the API server
        # At the bounds: valid, on to the API server (which knows no such UID: 409).
        _, status = await create(
            broker.server.address, bound(uid="u" * 128, api_version="v1"), bearer=CALLER_KEY
        )
        assert status is not None and status.code == grpc.StatusCode.FAILED_PRECONDITION
        assert emulator.token_request_count == 1
        lines = broker.audit_lines()
    assert len(lines) == len(cases) + 1
    entry = json.loads(lines[0])
    assert entry["boundObjectRef"]["uid"] == "u" * 253 + marker("u" * MB)
    assert all(len(line.encode()) < 4096 for line in lines)


# --- the per-peer limit on failed authentication ---------------------------------------------

FAILURES_BURST = 3


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tb-h-") as name:
        yield Path(name)


async def test_failing_peer_is_throttled_before_authentication(
    emulator: Emulator,
    kubernetes_settings: KubernetesSettings,
    tmp_path: Path,
    short_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Room again only after 1000 s: nothing recovers while the test runs.
    rate_limit = {
        "enabled": False,
        "authFailuresPerPeer": {"rate": 0.001, "burst": FAILURES_BURST},
    }
    socket = short_dir / "broker.sock"
    settings = hardening_settings(
        kubernetes_settings, tmp_path, rate_limit=rate_limit, unix_socket=socket
    )
    caplog.set_level(logging.DEBUG)
    async with running(settings) as broker:
        address = broker.server.address

        def refusals() -> float:
            return broker.sample("token_broker_rate_limit_refusals_total", scope="peer")

        # Calls that authenticate are not counted, however many.
        for _ in range(FAILURES_BURST + 2):
            response, _ = await create(address, create_request(), bearer=CALLER_KEY)
            assert response is not None
        for _ in range(FAILURES_BURST):
            _, status = await create(address, create_request(), bearer=BAD_KEY)
            assert status is not None and status.code == grpc.StatusCode.UNAUTHENTICATED
        authn_warnings = len([r for r in caplog.records if r.name == "broker.authn"])

        # Over the limit: refused before authentication, with a reason and a retry delay.
        _, status = await create(address, create_request(), bearer=BAD_KEY, request_id="first")
        assert status is not None
        assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status.error_info is not None
        assert status.error_info.reason == Reason.PEER_THROTTLED
        assert dict(status.error_info.metadata) == {"scope": "peer"}
        assert status.retry_info is not None and status.retry_info.retry_delay.seconds > 0
        assert int(status.trailers["grpc-retry-pushback-ms"]) > 0
        assert "too many failed authentication attempts" in status.message
        assert refusals() == 1
        audited = len(broker.audit_lines())
        entry = broker.audit_entries()[-1]
        assert (entry["requestID"], entry["reason"], entry["code"]) == (
            "first",
            Reason.PEER_THROTTLED,
            "RESOURCE_EXHAUSTED",
        )
        assert entry["suppressedRefusals"] == 0 and entry["user"] is None

        # The rest of the episode is counted, not written: no audit line, no authentication
        # work (no authn log line), the access line at debug only.
        flood = 20
        for i in range(flood):
            _, status = await create(
                address, create_request(), bearer=BAD_KEY, request_id=f"flood-{i}"
            )
            assert status is not None and status.error_info is not None
            assert status.error_info.reason == Reason.PEER_THROTTLED
        # A valid caller at the same address is refused too (before authentication).
        response, status = await create(address, create_request(), bearer=CALLER_KEY)
        assert response is None and status is not None and status.error_info is not None
        assert status.error_info.reason == Reason.PEER_THROTTLED
        assert refusals() == 1 + flood + 1
        assert len(broker.audit_lines()) == audited
        assert len([r for r in caplog.records if r.name == "broker.authn"]) == authn_warnings
        await eventually(
            lambda: any(
                getattr(r, "request_id", None) == f"flood-{flood - 1}"
                for r in caplog.records
                if r.name == "broker.access"
            ),
            "the last flooded call's access line",
        )
        flood_access = [
            r
            for r in caplog.records
            if r.name == "broker.access" and str(getattr(r, "request_id", "")).startswith("flood-")
        ]
        assert len(flood_access) == flood
        assert {r.levelno for r in flood_access} == {logging.DEBUG}
        assert (
            broker.sample(
                "token_broker_authentication_failures_total",
                method="apiKey",
                reason=Reason.CREDENTIALS_INVALID,
            )
            == FAILURES_BURST
        )

        # Another peer address (the unix socket) is not held back.
        response, _ = await create(f"unix:{socket}", create_request())
        assert response is not None
    # At shutdown, one summary line counts the refusals no line reported.
    summary = broker.audit_entries()[-1]
    assert (summary["reason"], summary["code"], summary["decision"]) == (
        Reason.PEER_THROTTLED,
        "RESOURCE_EXHAUSTED",
        "denied",
    )
    assert summary["suppressedRefusals"] == flood + 1
    assert summary["peer"] == "ipv4:127.0.0.1"
    assert summary["audiences"] is None and summary["user"] is None
    assert len(broker.audit_lines()) == audited + 2  # the unix caller's line, the summary
    assert broker.audit_entries()[-2]["user"] == LOCAL_CALLER
