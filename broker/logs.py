"""Logging: JSON lines for production, readable text for dev, and a redaction safety net.

The code never logs a token on purpose; `RedactFilter` masks anything that still looks like
one (a JWT, a `Bearer` value, a quoted `"token": "..."` field) in the message, its arguments,
extra fields and exception text, on every handler this module installs.

Every record logged while a gRPC call is handled carries that call's `request_id`: the
interceptor (broker.observe) binds it with `bind_request_id`, a context variable, and
`RequestIdFilter` adds it to each record (unless the record names one itself).

A record is one line, whatever its values hold (an unverified JWT's `iss` with a newline must
not forge a `broker.access ... OK` line): the text format escapes every non-printable
character of the message and the field values (`\n`, `\x1b`, `\u2028`), quotes values with
spaces, and prefixes each line of a traceback with CONTINUATION; JSON escapes control
characters, and U+0085, U+2028 and U+2029 (line breaks to some readers) too.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import io
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from broker.config import LogSettings

REDACTED = "<redacted>"
# Starts every line of a text record after its first (a traceback): never a timestamp.
CONTINUATION = "  | "

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


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_text(text: str) -> str:
    """`text` with every non-printable character (control characters, line and paragraph
    separators, format characters such as bidi overrides) as a backslash escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _text_value(value: object) -> str:
    text = escape_text(str(value))
    if text and not any(ch in text for ch in ' ="'):
        return text
    return '"' + text.replace('"', '\\"') + '"'


# Line breaks to str.splitlines() and JavaScript that json.dumps(ensure_ascii=False) leaves raw.
_JSON_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


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
        # Outside strings JSON has none of these characters: escaping them keeps it JSON.
        return json.dumps(entry, default=str, ensure_ascii=False).translate(_JSON_LINE_BREAKS)


class TextFormatter(logging.Formatter):
    """`12:00:00.123 INFO  broker.server: message key=value` for a terminal."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_text(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        pairs = " ".join(
            f"{escape_text(k)}={_text_value(v)}"
            for k, v in extra_fields(record).items()
            if v is not None
        )
        if pairs:
            line = f"{line} {pairs}"
        more: list[str] = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            more += record.exc_text.splitlines()
        if record.stack_info:
            more += self.formatStack(record.stack_info).splitlines()
        return "\n".join([line, *(CONTINUATION + escape_text(part) for part in more)])


def setup_logging(settings: LogSettings, stream: TextIO | None = None) -> logging.Handler:
    """Route all logging to one redacting handler; returns the handler.

    Without `stream`, lines go to stderr through a `BackgroundLineWriter`: the event loop
    never waits on a stderr pipe the container runtime is slow to drain. An explicit
    `stream` is written synchronously (tests).
    """
    stop_log_writer()
    formatter = JsonFormatter() if settings.format == "json" else TextFormatter()
    if stream is None:

        def dropped_notice(count: int) -> str:
            record = logging.LogRecord(
                __name__, logging.WARNING, __file__, 0, _DROPPED, (count,), None
            )
            return formatter.format(record) + "\n"

        writer = BackgroundLineWriter(sys.stderr, dropped_notice=dropped_notice)
        _writers.append(writer)
        handler: logging.Handler = logging.StreamHandler(writer)
    else:
        handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactFilter())
    handler.setFormatter(formatter)
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
    # Python writes warnings (a library's, e.g. cryptography's about a client certificate's
    # CN) to stderr itself: plain text among the log lines, and a blocking write. Log them
    # (logger `py.warnings`, level WARNING) like any record.
    logging.captureWarnings(True)
    return handler


_DROPPED = "%d log lines dropped: stderr did not take them"


class BackgroundLineWriter(io.TextIOBase):
    """The stream of a log handler: write() queues the line, a writer thread writes them.

    StreamHandler calls flush() after every line; that wakes the thread, which writes all
    the lines queued by then in one call: one system call for many lines, none made by the
    event loop. At most `max_pending_chars` wait; beyond that lines are dropped (a stderr
    nobody reads must not grow the broker's memory) and a notice says how many.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        dropped_notice: Callable[[int], str],
        max_pending_chars: int = 8 * 1024 * 1024,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._dropped_notice = dropped_notice
        self._max_pending_chars = max_pending_chars
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._pending_chars = 0
        self._dropped = 0
        self._stopping = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            if self._pending_chars + len(text) > self._max_pending_chars:
                self._dropped += 1
            else:
                self._pending.append(text)
                self._pending_chars += len(text)
        return len(text)

    def flush(self) -> None:
        if not self._wake.is_set():
            self._wake.set()

    def stop(self) -> None:
        """Write what is queued and end the thread (at exit; idempotent)."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            # Cleared before taking the lines: a line queued after this is woken for again.
            self._wake.clear()
            with self._lock:
                lines, self._pending, self._pending_chars = self._pending, [], 0
                dropped, self._dropped = self._dropped, 0
                stopping = self._stopping
            if dropped:
                lines.append(self._dropped_notice(dropped))
            if lines:
                try:
                    self._stream.write("".join(lines))
                    self._stream.flush()
                except (OSError, ValueError):
                    pass  # stderr is gone: there is nowhere to say so
            if stopping:
                return


# The writer of the stderr handler installed by setup_logging, if any.
_writers: list[BackgroundLineWriter] = []


def stop_log_writer() -> None:
    """Write out the queued lines and end the writer thread (at exit; idempotent)."""
    while _writers:
        _writers.pop().stop()


# Before logging's own atexit hook (registered earlier, so run later).
atexit.register(stop_log_writer)
