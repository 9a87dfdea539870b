"""Audit and log amplification (issue 14, item 3), in-process: what a caller sends is bounded in
every audit and log line (broker.bounded, the audit record), a call that failed authentication
is audited minimally, and a peer address that keeps failing authentication is refused, its
refusals audited once per episode (broker.authn_throttle). Through the real stack:
tests/e2e/test_hardening_amplification.py."""

from __future__ import annotations

import json

import pytest

from broker.audit import MAX_AUDIT_LINE_BYTES, AuditRecord, BoundObjectRef
from broker.authn_throttle import AuthFailureThrottle, peer_address
from broker.bounded import bounded, bounded_list
from broker.config import RateSettings
from broker.identity import Identity
from tests.support.hardening import MB, marker, sha12
from tests.support.stack import create_request

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


# --- the per-peer limit on failed authentication ---------------------------------------------


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
