"""Logging: JSON lines, text for dev, and the redaction safety net."""

from __future__ import annotations

import io
import json
import logging

from broker.config import LogSettings
from broker.logs import REDACTED, redact, setup_logging

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
