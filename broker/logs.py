"""Logging: JSON lines for production, readable text for dev, and a redaction safety net.

The code never logs a token on purpose; `RedactFilter` masks anything that still looks like
one (a JWT, a `Bearer` value, a quoted `"token": "..."` field) in the message, its arguments,
extra fields and exception text, on every handler this module installs.

Every record logged while a gRPC call is handled carries that call's `request_id`: the
interceptor (broker.observe) binds it with `bind_request_id`, a context variable, and
`RequestIdFilter` adds it to each record (unless the record names one itself).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import logging
import logging.handlers
import queue
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from broker.config import LogSettings

REDACTED = "<redacted>"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A JWS/JWT: three base64url parts, the header starting with '{"' (eyJ).
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\g<1>{REDACTED}"),
    (
        re.compile(
            r"""(?i)(["']?\b(?:token|access_token|id_token|password|client_secret)["']?"""
            r"""\s*:\s*["'])[^"']+"""
        ),
        rf"\g<1>{REDACTED}",
    ),
)

# What the patterns above need to match: "eyJ", "bearer", or a ":" and one of these words.
_KEY_WORDS = ("token", "password", "client_secret")

# Attributes every LogRecord has; anything else was passed as `extra=`.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


# The request id of the call being handled in this context (None outside a call).
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "token_broker_request_id", default=None
)


def current_request_id() -> str | None:
    """The request id bound in this context, if a call is being handled."""
    return _request_id.get()


@contextlib.contextmanager
def bind_request_id(request_id: str) -> Iterator[None]:
    """Bind `request_id` for the records logged in this context (the call's task)."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds the bound request id to every record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def redact(text: str) -> str:
    if not _may_hold_secret(text):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _may_hold_secret(text: str) -> bool:
    """False when no redaction pattern can match `text`, found without the regexes.

    Most log text holds none of the literals the patterns need. ASCII only, where lower()
    is exact for the patterns' IGNORECASE; replacements add none of these literals.
    """
    if not text.isascii():
        return True
    lowered = text.lower()
    return (
        "eyJ" in text
        or "bearer" in lowered
        or (":" in text and any(word in lowered for word in _KEY_WORDS))
    )


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class RedactFilter(logging.Filter):
    """Masks token-like strings in a record before any formatter sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = f"{record.msg!r} {record.args!r}"
        # Formatted once here, so a redacted argument cannot be re-expanded later.
        record.msg = redact(message)
        record.args = None
        strings = {k: v for k, v in extra_fields(record).items() if isinstance(v, str)}
        # One check over all of them (an access line has ten), then each only if needed: a
        # pattern matching one string matches inside the joined text too.
        if strings and _may_hold_secret("\n".join(strings.values())):
            for key, value in strings.items():
                setattr(record, key, redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`12:00:00.123 INFO  broker.server: message key=value` for a terminal."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = extra_fields(record)
        if not fields:
            return text
        first, sep, rest = text.partition("\n")
        pairs = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return f"{first} {pairs}{sep}{rest}"


class _PreparedLine(logging.Formatter):
    """The line QueueHandler.prepare() formatted, as it is (exception text included)."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def setup_logging(settings: LogSettings, stream: TextIO | None = None) -> logging.Handler:
    """Route all logging to one redacting handler; returns the handler.

    Without `stream`, lines go to stderr from a writer thread (the logging cookbook's
    QueueHandler and QueueListener): a log call formats its line where it is made (the
    request id is the caller's context) and queues it, and the event loop never waits on a
    stderr pipe the container runtime is slow to drain. The thread writes what is queued at
    exit (`stop_log_writer`). An explicit `stream` is written synchronously (tests).
    """
    stop_log_writer()
    handler: logging.Handler
    if stream is None:
        lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        handler = logging.handlers.QueueHandler(lines)
        output = logging.StreamHandler(sys.stderr)
        output.setFormatter(_PreparedLine())
        writer = logging.handlers.QueueListener(lines, output)
        writer.start()
        _writers.append(writer)
    else:
        handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # No formatter here shows a record's source line, thread or process: logging need not
    # look them up for every record (the logging HOWTO's "Optimization" settings).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # The Kubernetes client logs request and response bodies (tokens) at debug level.
    logging.getLogger("kubernetes").setLevel(max(root.level, logging.INFO))
    return handler


# The writer thread of the stderr handler installed by setup_logging, if any.
_writers: list[logging.handlers.QueueListener] = []


def stop_log_writer() -> None:
    """Write out the queued lines and end the writer thread (at exit; idempotent)."""
    while _writers:
        _writers.pop().stop()


# Before logging's own atexit hook (registered earlier, so run later).
atexit.register(stop_log_writer)
