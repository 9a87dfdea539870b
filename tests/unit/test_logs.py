"""Logging: JSON lines, text for dev, and the redaction safety net."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading

import pytest

from broker.config import LogSettings
from broker.logs import (
    REDACTED,
    BackgroundLineWriter,
    bind_request_id,
    redact,
    setup_logging,
    stop_log_writer,
)

JWT = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImFiYyJ9"
    ".eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVtbzpidWlsZC1yb2JvdCJ9"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmU"
)


def capture(fmt: str, level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(LogSettings(level=level, format=fmt), stream)  # type: ignore[arg-type]
    return stream


def test_redact_patterns() -> None:
    assert JWT not in redact(f"got {JWT} back")
    assert redact(f"got {JWT} back") == f"got {REDACTED} back"
    assert redact("Authorization: Bearer abc.def-123") == f"Authorization: Bearer {REDACTED}"
    assert redact('{"token": "opaque-secret"}') == f'{{"token": "{REDACTED}"}}'
    # Ordinary text survives.
    assert redact("token broker serving on 127.0.0.1:50051") == (
        "token broker serving on 127.0.0.1:50051"
    )


def test_json_lines_with_extra_fields(restore_logging: None) -> None:
    stream = capture("json")
    logging.getLogger("broker.test").info("hello %s", "world", extra={"namespace": "demo"})
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "info"
    assert entry["logger"] == "broker.test"
    assert entry["message"] == "hello world"
    assert entry["namespace"] == "demo"
    assert entry["time"].endswith("+00:00")


def test_tokens_never_reach_the_output(restore_logging: None) -> None:
    for fmt in ("json", "text"):
        stream = capture(fmt, level="debug")
        log = logging.getLogger("broker.test")
        log.info("message %s", JWT)
        log.info("literal " + JWT)
        log.info("header", extra={"authorization": "Bearer sekrit-value"})
        # One secret among many clean fields (an access line's ten), and behind non-ASCII.
        clean = {f"field_{i}": f"value-{i}" for i in range(10)}
        log.info("fields", extra={**clean, "namespace": JWT, "user": f"é {JWT}"})
        try:
            raise ValueError(f"boom {JWT}")
        except ValueError:
            log.exception("failed")
        out = stream.getvalue()
        assert JWT not in out, fmt
        assert "sekrit-value" not in out, fmt
        assert out.count(REDACTED) >= 6, fmt
        assert "value-9" in out, fmt


def test_level_filters(restore_logging: None) -> None:
    stream = capture("text", level="warning")
    logging.getLogger("broker.test").info("quiet")
    logging.getLogger("broker.test").warning("loud")
    out = stream.getvalue()
    assert "quiet" not in out
    assert "WARNING" in out
    assert "loud" in out


def test_kubernetes_client_debug_bodies_are_not_logged(restore_logging: None) -> None:
    stream = capture("json", level="debug")
    logging.getLogger("kubernetes.client.rest").debug("response body: %s", "{...}")
    assert stream.getvalue() == ""


class BlockedStderr(io.StringIO):
    """A stderr whose writes wait until released: a pipe nobody drains."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writers: set[threading.Thread] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread())
        # Bounded, so that a write made by the caller's thread fails the test, not hangs it.
        self.release.wait(60)
        return super().write(text)


def test_stderr_is_written_by_a_writer_thread(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The event loop must never wait on stderr: the line is formatted and redacted where the
    # call is made (with its request id), and written by another thread.
    stderr = BlockedStderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    setup_logging(LogSettings(level="info", format="json"))
    log = logging.getLogger("broker.test")
    with bind_request_id("req-1"):
        log.info("issued %s", JWT)  # returns although stderr does not take the line
    log.info("second")
    assert stderr.getvalue() == ""
    stderr.release.set()
    stop_log_writer()  # as at exit: what is queued is written
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [f"issued {REDACTED}", "second"]
    assert lines[0]["request_id"] == "req-1"
    assert "request_id" not in lines[1]
    assert stderr.writers and threading.current_thread() not in stderr.writers
    assert JWT not in stderr.getvalue()


def test_lines_beyond_the_bound_are_dropped_and_counted() -> None:
    # A stderr that takes nothing must not grow the broker's memory without bound.
    stderr = BlockedStderr()
    writer = BackgroundLineWriter(
        stderr, dropped_notice=lambda n: f"{n} dropped\n", max_pending_chars=100
    )
    for i in range(30):
        writer.write(f"line-{i:04d}\n")  # 10 characters: 10 lines fit
    stderr.release.set()
    writer.stop()
    assert stderr.getvalue() == "".join(f"line-{i:04d}\n" for i in range(10)) + "20 dropped\n"
    writer.stop()  # idempotent
