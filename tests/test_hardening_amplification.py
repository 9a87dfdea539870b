"""Audit and log amplification (issue 14, item 3): what a caller sends is bounded in every
audit and log line, a call that failed authentication is audited minimally, sizes the API
server could never accept are refused at validation, and a peer address that keeps failing
authentication is refused before authentication, its refusals audited once per episode."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import CALLER_KEY, LOCAL_CALLER, POD, create_request
from hardening_support import create, eventually, hardening_settings, running

from broker.audit import MAX_AUDIT_LINE_BYTES, AuditRecord, BoundObjectRef
from broker.authn_throttle import AuthFailureThrottle, peer_address
from broker.bounded import bounded, bounded_list
from broker.config import KubernetesSettings, RateSettings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import Identity
from broker.reasons import Reason

BAD_KEY = "tbk_not-a-configured-key-000000"
MB = 1_000_000
# An audit line of a call that failed authentication, whatever the request held.
UNAUTHENTICATED_LINE_BYTES = 2048


def sha12(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def marker(value: str) -> str:
    return f"...(truncated: {len(value)} chars, sha256:{sha12(value)})"


# --- the bounding helper ---------------------------------------------------------------------


def test_bounded_cuts_marks_and_hashes() -> None:
    assert bounded("demo") == "demo"
    assert bounded("x" * 253) == "x" * 253
    huge = "u" * MB
    assert bounded(huge) == "u" * 253 + marker(huge)
    # The same huge value gives the same marker on every line: investigators can join them.
    assert bounded(huge) == bounded("u" * MB)
    assert bounded(huge, 8).endswith(f"sha256:{sha12(huge)})")
    assert bounded_list(["a", "b"], 32) == ["a", "b"]
    many = [f"aud-{i}" for i in range(1000)]
    shown = bounded_list(many, 32)
    assert shown[:32] == many[:32]
    assert shown[32] == f"...(truncated: 1000 items, sha256:{sha12(chr(0).join(many))})"
    assert len(shown) == 33


# --- the audit line --------------------------------------------------------------------------

# Every character JSON's ASCII escaping makes longest: control and astral characters.
NASTY = "\x01\U0001f600\u2028"


def test_audit_line_stays_under_its_bound_whatever_the_values() -> None:
    huge = NASTY * 10_000
    # Many items, the first ones huge (the same string: cheap to hold).
    many = (huge,) * 40 + tuple(str(i) for i in range(10_000))
    record = AuditRecord(
        request_id="r" * 128,
        user=huge,
        auth_method="jwt",
        issuer=huge,
        peer=huge,
        namespace=huge,
        service_account=huge,
        audiences=many,
        granted_audiences=many,
        requested_expiration_seconds=3600,
        granted_expiration_seconds=3600,
        bound_object_ref=BoundObjectRef(kind=huge, name=huge, uid=huge),
        dry_run=False,
        decision="error",
        rule=huge,
        reason=huge,
        code="INTERNAL",
        upstream_status=None,
        latency_ms=1.0,
        jti=huge,
    )
    line = record.to_json()
    assert len(line.encode()) <= MAX_AUDIT_LINE_BYTES
    assert line.isascii() and len(line.splitlines()) == 1
    entry = json.loads(line)
    # Still says what it can: every field there, each cut value marked with length and hash.
    assert entry["user"].endswith(f"chars, sha256:{sha12(huge)})")
    assert entry["audiences"][-1].startswith("...(truncated: 10040 items")
    # ASCII values, the longest valid audience lists: within the normal bounds (no tighter
    # pass), whatever the length of each string.
    ascii_fields = {k: "v" * MB if v is huge else v for k, v in vars(record).items()}
    ascii_record = AuditRecord(
        **{
            **ascii_fields,
            "user": "u" * MB,
            "bound_object_ref": BoundObjectRef(kind="k" * MB, name="n" * MB, uid="u" * MB),
            "audiences": tuple("a" * 1024 for _ in range(32)),
            "granted_audiences": tuple("g" * 1024 for _ in range(32)),
        }
    )
    ascii_entry = json.loads(ascii_record.to_json())
    assert ascii_entry["user"] == "u" * 253 + marker("u" * MB)
    assert len(ascii_entry["audiences"]) == 32
    assert len(ascii_record.to_json()) <= MAX_AUDIT_LINE_BYTES


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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_episodes_audit_first_periodically_and_a_summary() -> None:
    clock = FakeClock()
    throttle = AuthFailureThrottle(
        RateSettings(rate=1, burst=2), clock=clock, audit_interval_seconds=60
    )
    peer = "ipv4:10.0.0.7:5555"
    assert throttle.admit(peer) is None
    throttle.failed(peer)
    throttle.failed("ipv4:10.0.0.7:6666")  # the same address, another port
    first = throttle.admit("ipv4:10.0.0.7:7777")
    assert first is not None and (first.audited, first.suppressed) == (True, 0)
    assert 0 < first.retry_after <= 1
    assert throttle.admit("ipv4:10.0.0.8:5555") is None  # another address
    for _ in range(5):
        refusal = throttle.admit(peer)
        assert refusal is not None and not refusal.audited
    # A failure admitted every second keeps the episode going; a line every 60 s at most.
    for _ in range(59):
        clock.now += 1
        assert throttle.admit(peer) is None
        throttle.failed(peer)
        refusal = throttle.admit(peer)
        assert refusal is not None and not refusal.audited
        assert throttle.ended() == []
    clock.now += 1
    assert throttle.admit(peer) is None
    throttle.failed(peer)
    periodic = throttle.admit(peer)
    assert periodic is not None and (periodic.audited, periodic.suppressed) == (True, 5 + 59)
    assert throttle.admit(peer) is not None  # suppressed again
    # Quiet long enough for the bucket to be full: the episode ends with its summary.
    clock.now += 3
    [summary] = throttle.ended()
    assert (summary.peer, summary.suppressed) == ("ipv4:10.0.0.7", 1)
    assert throttle.ended() == [] and throttle.pending() == []


def test_throttle_pending_at_shutdown_and_disabled() -> None:
    clock = FakeClock()
    throttle = AuthFailureThrottle(RateSettings(rate=1, burst=1), clock=clock)
    throttle.failed("unix:")
    assert throttle.admit("unix:") is not None
    assert throttle.admit("unix:") is not None
    [summary] = throttle.pending()
    assert (summary.peer, summary.suppressed) == ("unix:", 1)
    off = AuthFailureThrottle(None)
    for _ in range(100):
        off.failed("ipv4:10.0.0.7:1")
    assert off.admit("ipv4:10.0.0.7:1") is None


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:5555", "ipv4:10.0.0.7"),
        ("ipv6:[::1]:5555", "ipv6:::/64"),
        ("ipv6:%5B2001:db8:1:2:3:4:5:6%5D:443", "ipv6:2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:ffff::9]:1", "ipv6:2001:db8:1:2::/64"),
        ("ipv6:[::ffff:10.0.0.7]:5555", "ipv4:10.0.0.7"),
        ("ipv6:[fe80::1%eth0]:5555", "ipv6:fe80::/64"),
        ("unix:/run/token-broker.sock", "unix:"),
        ("unix:", "unix:"),
        ("ipv4:not-an-address:1", "ipv4:not-an-address"),
    ],
)
def test_peer_address_drops_the_port(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_unauthenticated_record_is_minimal_even_built_directly() -> None:
    request = create_request(audiences=["x" * MB], dry_run=["All"], expiration_seconds=3600)
    record = AuditRecord.for_call(
        request, request_id="r", identity=None, peer="ipv4:10.0.0.7:1", latency_ms=1.0
    )
    entry = json.loads(record.to_json())
    assert (entry["audiences"], entry["dryRun"], entry["requestedExpirationSeconds"]) == (
        None,
        None,
        None,
    )
    authenticated = AuditRecord.for_call(
        request,
        request_id="r",
        identity=Identity(method="apiKey", name="ci"),
        peer=None,
        latency_ms=1.0,
    )
    assert json.loads(authenticated.to_json())["audiences"] == ["x" * 253 + marker("x" * MB)]


def test_the_chart_sets_the_per_peer_limit() -> None:
    from test_helm import load_settings_from, render  # the chart tests' rendering (real helm)

    default = load_settings_from(render({})).rate_limit.auth_failures_per_peer
    assert default == RateSettings(rate=1, burst=100)
    off = load_settings_from(render({"rateLimit": {"authFailuresPerPeer": False}}))
    assert off.rate_limit.auth_failures_per_peer is None
    tuned = {"rateLimit": {"authFailuresPerPeer": {"rate": 20, "burst": 2000}}}
    settings = load_settings_from(render(tuned))
    assert settings.rate_limit.auth_failures_per_peer == RateSettings(rate=20, burst=2000)
