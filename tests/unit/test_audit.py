"""The audit log (one JSON line per decision) and the request-id helper. The records of calls
that reached the real API server: tests/e2e/test_audit.py."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import io
import json
import logging
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc import aio

from broker import audit
from broker.audit import (
    AuditLog,
    AuditRecord,
    AuditWriteError,
    BoundObjectRef,
    token_fields,
)
from broker.config import AuditSettings, ConfigError, load_settings
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import Identity
from broker.reasons import ALLOWED, Reason
from broker.request_id import MAX_REQUEST_ID_LENGTH, request_id_from
from broker.upstream import UpstreamResult
from tests.support.stack import NAMESPACE, POD, SERVICE_ACCOUNT, create_request

FIXED_TIME = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def record(**overrides: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "user": "spiffe://example.org/ci",
        "auth_method": "jwt",
        "issuer": "https://issuer.example",
        "peer": "ipv4:10.0.0.7:51234",
        "namespace": NAMESPACE,
        "service_account": SERVICE_ACCOUNT,
        "audiences": ("vault",),
        "granted_audiences": ("vault",),
        "requested_expiration_seconds": None,
        "granted_expiration_seconds": 3600,
        "bound_object_ref": BoundObjectRef(kind="Pod", name=POD, uid="u-1"),
        "dry_run": False,
        "decision": "allowed",
        "rule": "ci-builds",
        "reason": ALLOWED,
        "code": "OK",
        "upstream_status": 201,
        "latency_ms": 12.34567,
        "jti": "5d0c1f8e-2b7a-4c1e-9a53-0e4d7c1b2a90",
        "token_sha256": "0123456789abcdef",
        "token_lifetime_seconds": 3600,
        "time": FIXED_TIME,
    }
    fields.update(overrides)
    return AuditRecord(**fields)


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# --- the record ------------------------------------------------------------------------------


def test_record_json_field_by_field() -> None:
    line = record().to_json()
    assert "\n" not in line
    entry = json.loads(line)
    expected = {
        "kind": "TokenBrokerAudit",
        "apiVersion": "audit.tokenbroker.dev/v1",
        "stage": "ResponseComplete",
        "time": "2024-05-01T12:00:00.123456Z",
        "requestID": "req-1",
        "user": "spiffe://example.org/ci",
        "authMethod": "jwt",
        "issuer": "https://issuer.example",
        "certificateField": None,
        "peer": "ipv4:10.0.0.7:51234",
        "door": "grpc",
        "namespace": NAMESPACE,
        "serviceAccount": SERVICE_ACCOUNT,
        "audiences": ["vault"],
        "grantedAudiences": ["vault"],
        "requestedExpirationSeconds": None,
        "grantedExpirationSeconds": 3600,
        "tokenLifetimeSeconds": 3600,
        "boundObjectRef": {"kind": "Pod", "name": POD, "uid": "u-1"},
        "dryRun": False,
        "decision": "allowed",
        "rule": "ci-builds",
        "reason": ALLOWED,
        "code": "OK",
        "upstreamStatus": 201,
        "latencyMs": 12.346,
        "jti": "5d0c1f8e-2b7a-4c1e-9a53-0e4d7c1b2a90",
        "tokenSHA256": "0123456789abcdef",
    }
    assert entry == expected
    assert list(entry) == list(expected)  # stable key order


def test_record_time_is_utc_and_required_aware() -> None:
    from datetime import timedelta, timezone

    plus_two = datetime(2024, 5, 1, 14, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert json.loads(record(time=plus_two).to_json())["time"] == "2024-05-01T12:00:00.000000Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        record(time=datetime(2024, 5, 1))


def test_record_line_is_ascii_single_line() -> None:
    # U+2028 is a line break to str.splitlines(); a JSON-lines reader must see one line.
    line = record(user="ü\u2028\nx", rule='"quoted"').to_json()
    assert line.isascii()
    assert len(line.splitlines()) == 1
    assert json.loads(line)["user"] == "ü\u2028\nx"


def test_token_fields() -> None:
    token = jwt.encode({"jti": "id-1", "sub": "x"}, "k" * 32, algorithm="HS256")
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:16]
    assert token_fields(token) == ("id-1", fingerprint)
    # Expired and unverifiable: only the id is read, nothing is validated.
    expired = jwt.encode({"jti": "id-2", "exp": 1}, "k" * 32, algorithm="HS256")
    assert token_fields(expired)[0] == "id-2"
    assert token_fields(jwt.encode({"sub": "x"}, "k" * 32))[0] is None  # no jti
    assert token_fields(jwt.encode({"jti": 7}, "k" * 32))[0] is None  # not a string
    opaque = "not-a-jwt"
    assert token_fields(opaque) == (None, hashlib.sha256(b"not-a-jwt").hexdigest()[:16])
    assert token_fields("a.b.c")[0] is None
    assert token_fields("") == (None, None)
    # Not three segments, a payload that is not UTF-8 or a JSON object: no jti.
    assert token_fields(token + ".extra")[0] is None
    assert token_fields(token.replace(".", "", 1))[0] is None
    header = token.split(".")[0]
    for bad_payload in (b"[1]", b"\xff", b"{"):
        encoded = base64.urlsafe_b64encode(bad_payload).decode()
        assert token_fields(f"{header}.{encoded}.s")[0] is None
    # Unpadded base64url, as JWTs write it, with a jti that needs the full alphabet.
    claims = base64.urlsafe_b64encode(b'{"jti":"\xc3\xa9~?>"}').decode().rstrip("=")
    assert token_fields(f"{header}.{claims}.s")[0] == "é~?>"


def test_for_call_broker_refusals() -> None:
    request = create_request(audiences=["a"])
    denied = AuditRecord.for_call(
        request,
        request_id="r",
        identity=None,
        peer="unix:/run/broker.sock",
        latency_ms=0.2,
        error=BrokerError(
            grpc.StatusCode.UNAUTHENTICATED, "no credentials", Reason.CREDENTIALS_INVALID
        ),
    )
    assert (denied.decision, denied.reason, denied.code) == (
        "denied",
        Reason.CREDENTIALS_INVALID,
        "UNAUTHENTICATED",
    )
    assert (denied.user, denied.auth_method, denied.issuer) == (None, None, None)
    assert denied.upstream_status is None

    no_rule = AuditRecord.for_call(
        request,
        request_id="r",
        identity=Identity(method="jwt", name="ci", issuer="https://issuer.example"),
        peer=None,
        latency_ms=0.2,
        error=BrokerError(grpc.StatusCode.PERMISSION_DENIED, "no rule", Reason.NO_MATCHING_RULE),
    )
    assert (no_rule.decision, no_rule.reason, no_rule.rule) == (
        "denied",
        Reason.NO_MATCHING_RULE,
        None,
    )

    unbound_uid = AuditRecord.for_call(
        create_request(bound=pb.BoundObjectReference(kind="Secret", name="s1")),
        request_id="r",
        identity=Identity(method="apiKey", name="ci"),
        peer=None,
        latency_ms=0.2,
        error=BrokerError(grpc.StatusCode.PERMISSION_DENIED, "no rule", Reason.NO_MATCHING_RULE),
    )
    assert unbound_uid.bound_object_ref == BoundObjectRef(kind="Secret", name="s1", uid=None)
    assert no_rule.issuer == "https://issuer.example"

    unreachable = AuditRecord.for_call(
        request,
        request_id="r",
        identity=None,
        peer=None,
        latency_ms=0.2,
        error=BrokerError(grpc.StatusCode.UNAVAILABLE, "down", Reason.KUBERNETES_UNREACHABLE),
    )
    assert (unreachable.decision, unreachable.code) == ("error", "UNAVAILABLE")

    crashed = AuditRecord.for_call(
        request, request_id="r", identity=None, peer=None, latency_ms=0.2, error=KeyError("x")
    )
    assert (crashed.decision, crashed.reason, crashed.code) == (
        "error",
        Reason.INTERNAL,
        "INTERNAL",
    )


def test_for_call_token_minted_but_not_handed_out() -> None:
    token = jwt.encode({"jti": "minted-1"}, "k" * 32, algorithm="HS256")
    result = UpstreamResult(
        token_request=pb.TokenRequest(
            spec=pb.TokenRequestSpec(audiences=["a"], expiration_seconds=3600),
            status=pb.TokenRequestStatus(token=token),
        )
    )
    rec = AuditRecord.for_call(
        create_request(audiences=["a"]),
        request_id="r",
        identity=None,
        peer=None,
        latency_ms=1.0,
        result=result,
        error=AuditWriteError("disk full"),
    )
    assert (rec.decision, rec.reason, rec.code) == (
        "error",
        Reason.AUDIT_UNAVAILABLE,
        "UNAVAILABLE",
    )
    assert rec.jti == "minted-1"
    assert rec.upstream_status == 201
    assert token not in rec.to_json()


def test_audit_write_error_answer() -> None:
    err = AuditWriteError("x").as_broker_error()
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.reason == Reason.AUDIT_UNAVAILABLE
    assert err.retry_after is not None and err.retry_after > 0


# --- the sinks -------------------------------------------------------------------------------


async def test_stdout_sink_ignores_logging_configuration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logging.disable(logging.CRITICAL)
    try:
        async with AuditLog() as log:
            await log.write(record())
    finally:
        logging.disable(logging.NOTSET)
    out = capsys.readouterr().out
    assert out == record().to_json() + "\n"


async def test_stream_sink_is_flushed_not_closed() -> None:
    stream = io.StringIO()
    log = AuditLog(stream)
    await log.write(record(request_id="a"))
    await log.write(record(request_id="b"))
    await log.close()
    assert not stream.closed
    assert [json.loads(x)["requestID"] for x in stream.getvalue().splitlines()] == ["a", "b"]


async def test_file_sink_appends_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path) as log:
        await log.write(record(request_id="first"))
    async with AuditLog(path) as log:
        await log.write(record(request_id="second"))
    assert [json.loads(x)["requestID"] for x in lines_of(path)] == ["first", "second"]
    assert path.stat().st_mode & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_concurrent_writes_are_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    # Long lines, so an interleaving would show.
    audiences = tuple(f"https://audience-{i}.example" for i in range(30))
    async with AuditLog(path) as log:
        await asyncio.gather(
            *(log.write(record(request_id=f"req-{i}", audiences=audiences)) for i in range(200))
        )
    lines = lines_of(path)
    assert len(lines) == 200
    entries = [json.loads(line) for line in lines]
    assert {e["requestID"] for e in entries} == {f"req-{i}" for i in range(200)}
    assert all(e["audiences"] == list(audiences) for e in entries)


async def test_fail_closed_raises_when_the_line_cannot_be_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="broker.audit")
    async with AuditLog(Path("/dev/full"), fail_closed=True) as log:  # every write: ENOSPC
        with pytest.raises(AuditWriteError) as caught:
            await log.write(record())
        assert isinstance(caught.value.__cause__, OSError)
        assert caught.value.__cause__.errno == errno.ENOSPC
        with pytest.raises(AuditWriteError):
            await log.write(record())
    # One error for the run of failures, not one per call.
    errors = [r for r in caplog.records if r.name == "broker.audit"]
    assert len(errors) == 1
    assert "refusing to issue tokens" in errors[0].getMessage()


async def test_fail_open_logs_and_continues(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="broker.audit")
    async with AuditLog(Path("/dev/full")) as log:
        await log.write(record(request_id="lost-1"))  # does not raise
        await log.write(record(request_id="lost-2"))
        assert log.lost_lines == 2
    errors = [r for r in caplog.records if r.name == "broker.audit"]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert "failClosed is off" in errors[0].getMessage()
    assert "lost-1" not in caplog.text  # the log names the sink, not the record


class FullStream(io.StringIO):
    """A stream whose writes fail with ENOSPC while `full` is set."""

    full = True

    def write(self, s: str) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(s)


async def test_fail_open_recovery_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="broker.audit")
    stream = FullStream()
    async with AuditLog(stream) as log:
        await log.write(record(request_id="a"))
        await log.write(record(request_id="b"))
        stream.full = False
        await log.write(record(request_id="c"))
        assert log.lost_lines == 2
    assert [json.loads(x)["requestID"] for x in stream.getvalue().splitlines()] == ["c"]
    messages = [r.getMessage() for r in caplog.records if r.name == "broker.audit"]
    assert len(messages) == 2
    assert "writable again (2 line(s) lost so far)" in messages[1]


async def test_torn_line_does_not_swallow_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    real_write = os.write
    calls = 0

    def half_then_full(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async with AuditLog(path) as log:
        monkeypatch.setattr(audit.os, "write", half_then_full)
        await log.write(record(request_id="torn"))
        monkeypatch.setattr(audit.os, "write", real_write)
        await log.write(record(request_id="whole"))
    torn, whole = lines_of(path)
    assert torn == record().to_json()[:10]
    assert json.loads(whole)["requestID"] == "whole"


class FailingLines(io.StringIO):
    """A stream that refuses the lines of some requests (ENOSPC) and takes the others."""

    def __init__(self, refused: set[str]) -> None:
        super().__init__()
        self.refused = refused

    def write(self, s: str) -> int:
        if json.loads(s)["requestID"] in self.refused:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(s)


async def test_concurrent_lines_each_have_their_own_outcome() -> None:
    # Written together (one trip to the writer thread), but a caller is only refused when
    # its own line was not written.
    refused = {f"req-{i}" for i in range(0, 60, 7)}
    stream = FailingLines(refused)
    async with AuditLog(stream, fail_closed=True) as log:
        outcomes = await asyncio.gather(
            *(log.write(record(request_id=f"req-{i}")) for i in range(60)),
            return_exceptions=True,
        )
    failed = {f"req-{i}" for i, outcome in enumerate(outcomes) if outcome is not None}
    assert failed == refused
    assert all(isinstance(outcomes[int(r[4:])], AuditWriteError) for r in refused)
    written = [json.loads(x)["requestID"] for x in stream.getvalue().splitlines()]
    assert written == [f"req-{i}" for i in range(60) if f"req-{i}" not in refused]  # in order


async def test_a_cancelled_caller_s_line_is_still_written() -> None:
    stream = io.StringIO()
    async with AuditLog(stream, fail_closed=True) as log:
        waiting = asyncio.create_task(log.write(record(request_id="gone")))
        await asyncio.sleep(0)  # queued
        waiting.cancel()
        await log.write(record(request_id="next"))
        with pytest.raises(asyncio.CancelledError):
            await waiting
    written = [json.loads(x)["requestID"] for x in stream.getvalue().splitlines()]
    assert written == ["gone", "next"]


async def test_write_after_close() -> None:
    log = AuditLog(io.StringIO(), fail_closed=True)
    await log.close()
    await log.close()  # idempotent
    with pytest.raises(AuditWriteError):
        await log.write(record())


# --- settings --------------------------------------------------------------------------------


def test_settings_shape(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert load_settings().audit == AuditSettings(sink="stdout", file=None, fail_closed=False)
    path = tmp_path / "audit.jsonl"
    settings = load_settings(None, {"audit": {"sink": "file", "file": str(path)}})
    assert settings.audit.file == path
    monkeypatch.setenv("TOKEN_BROKER_AUDIT__FAIL_CLOSED", "true")
    assert load_settings().audit.fail_closed is True
    with pytest.raises(ConfigError, match=r"audit: .*set audit.file"):
        load_settings(None, {"audit": {"sink": "file"}})
    with pytest.raises(ConfigError, match=r"only written with audit.sink: file"):
        load_settings(None, {"audit": {"file": str(path)}})
    with pytest.raises(ConfigError, match=r"audit.failClosed"):
        load_settings(None, {"audit": {"failClosed": "maybe"}})


async def test_from_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    async with await AuditLog.from_settings(
        AuditSettings(sink="file", file=path, fail_closed=True)
    ) as log:
        assert log.fail_closed
        await log.write(record())
    assert lines_of(path) == [record().to_json()]
    async with await AuditLog.from_settings(AuditSettings()) as log:
        await log.write(record())
    assert capsys.readouterr().out == record().to_json() + "\n"
    missing = tmp_path / "no-such-dir" / "audit.jsonl"
    with pytest.raises(ConfigError, match=r"audit.file: cannot open .*no-such-dir"):
        await AuditLog.from_settings(AuditSettings(sink="file", file=missing))


# --- request ids -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["abc-123", "0af7651916cd43dd8448eb211c80319c", "x" * MAX_REQUEST_ID_LENGTH, "a:b/c=d"],
)
def test_request_id_accepts_sane_values(value: str) -> None:
    assert request_id_from((("user-agent", "grpc"), ("x-request-id", value))) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "has space",
        "tab\there",
        "line\nbreak",
        "nul\x00",
        "del\x7f",
        "ünïcode",
        "x" * (MAX_REQUEST_ID_LENGTH + 1),
        b"bytes-value",
    ],
)
def test_request_id_rejects_and_generates(value: str | bytes) -> None:
    generated = request_id_from([("x-request-id", value)])
    assert generated != value
    assert UUID_RE.fullmatch(generated)


def test_request_id_generates_without_header() -> None:
    first, second = request_id_from(None), request_id_from([("user-agent", "grpc")])
    assert UUID_RE.fullmatch(first) and UUID_RE.fullmatch(second)
    assert first != second
    assert uuid.UUID(first).version == 4


def test_request_id_first_value_only() -> None:
    assert request_id_from([("x-request-id", "one"), ("x-request-id", "two")]) == "one"
    # A rejected first value is not replaced by a later one.
    assert request_id_from([("x-request-id", "bad one"), ("x-request-id", "two")]) != "two"


def test_request_id_from_aio_metadata() -> None:
    metadata = aio.Metadata(("x-request-id", "from-aio"), ("other", "v"))
    assert request_id_from(metadata) == "from-aio"
