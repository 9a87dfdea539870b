"""Logging: JSON lines for production, readable text for dev, and a redaction safety net.

The code never logs a token on purpose; `RedactFilter` masks anything that still looks like
one (a JWT, a `Bearer` value, a quoted `"token": "..."` field) in the message, its arguments,
extra fields and exception text, on every handler this module installs.

Every record logged while a gRPC call is handled carries that call's `request_id`: the call's
observer (broker.service, broker.observe) binds it with `bind_request_id`, a context variable, and
`RequestIdFilter` adds it to each record (unless the record names one itself).

A record is one line, whatever its values hold (an unverified JWT's `iss` with a newline must
not forge a `broker.access ... OK` line): the text format escapes every non-printable
character of the message and the field values (`\n`, `\x1b`, `\u2028`), quotes values with
spaces, and prefixes each line of a traceback with CONTINUATION; JSON escapes control
characters, and U+0085, U+2028 and U+2029 (line breaks to some readers) too.

The access line of every call (broker.observe) may skip the logging machinery (a LogRecord,
the logger hierarchy, the handler's filters and formatter: some 20 µs a line) when that
machinery provably could not change it: `direct_json_handler` finds the handler
`setup_logging` installed, in JSON format, as the only handler the record would reach, with
only its own filters, and nothing else configured in between (no logger filters, no other
handler, no custom record factory, the level enabled). The line is then rendered by the same
function JsonFormatter uses (`json_line`), redacted by the same function RedactFilter uses
(`redact_fields`), and written to the handler's stream under the handler's lock, as the handler
would. Otherwise (pytest's caplog, a text format, a handler someone added) it goes through
logging like any record.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import io
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from broker.config import LogSettings
from broker.pipes import close_quietly, nonblocking_pipe, write_lines
from broker.utc_text import utc_second_and_micros

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


class _BoundRequestId:
    """The context manager of `bind_request_id` (a class: cheaper than a generator's)."""

    __slots__ = ("_request_id", "_token")

    def __init__(self, request_id: str) -> None:
        self._request_id = request_id

    def __enter__(self) -> None:
        self._token = _request_id.set(self._request_id)

    def __exit__(self, *exc_info: object) -> None:
        _request_id.reset(self._token)


def bind_request_id(request_id: str) -> _BoundRequestId:
    """Bind `request_id` for the records logged in this context (the call's task), in a
    `with` block."""
    return _BoundRequestId(request_id)


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


def redact_fields(fields: dict[str, Any]) -> None:
    """Redact the string values of `fields` in place (RedactFilter's work on extra fields)."""
    strings = [(k, v) for k, v in fields.items() if isinstance(v, str)]
    # One check over all of them (an access line has ten), then each only if needed: a
    # pattern matching one string matches inside the joined text too.
    if strings and _may_hold_secret("\n".join(v for _, v in strings)):
        for key, value in strings:
            fields[key] = redact(value)


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
        fields = extra_fields(record)
        redact_fields(fields)
        for key, value in fields.items():
            if isinstance(value, str) and value is not getattr(record, key):
                setattr(record, key, value)
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


def iso_millis_at(timestamp: float) -> str:
    """`datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")`, the
    seconds' text made once per second."""
    text, micros = utc_second_and_micros(timestamp)
    return f"{text}.{micros // 1000:03d}+00:00"


def json_line(
    created: float,
    levelname: str,
    name: str,
    message: str,
    fields: dict[str, Any],
    exception: str | None = None,
) -> str:
    """A record as one JSON line: time, level, logger, message, then the extra fields."""
    entry: dict[str, Any] = {
        "time": iso_millis_at(created),
        "level": levelname.lower(),
        "logger": name,
        "message": message,
    }
    for key, value in fields.items():
        entry.setdefault(key, value)
    if exception:
        entry["exception"] = exception
    # Outside strings JSON has none of these characters: escaping them keeps it JSON.
    return json.dumps(entry, default=str, ensure_ascii=False).translate(_JSON_LINE_BREAKS)


# What json.dumps(ensure_ascii=False) makes of a str.
_json_str: Callable[[str], str] = json.encoder.encode_basestring


def json_text(value: str) -> str:
    """`value` as `json_line` writes a string (quoted, escaped)."""
    return _json_str(value).translate(_JSON_LINE_BREAKS)


def json_line_parts(
    levelname: str, name: str, fields: dict[str, Any], open_fields: Sequence[str]
) -> tuple[str, ...] | None:
    """`json_line(created, levelname, name, message, fields)` cut where the time, the message
    and the values of `open_fields` (in the order of `fields`) go: joining the parts with
    those values, as `json_line` writes them (strings through `json_text`), gives the line.
    None when another value holds one of the marks used to find them."""
    marks = {key: f"\x00{key}\x00" for key in ("time", "message", *open_fields)}
    entry: dict[str, Any] = {
        "time": marks["time"],
        "level": levelname.lower(),
        "logger": name,
        "message": marks["message"],
    }
    for key, value in fields.items():
        entry.setdefault(key, marks.get(key, value))
    text = json.dumps(entry, default=str, ensure_ascii=False).translate(_JSON_LINE_BREAKS)
    parts: list[str] = []
    for mark in marks.values():
        encoded = json_text(mark)
        if text.count(encoded) != 1:
            return None
        head, _, text = text.partition(encoded)
        parts.append(head)
    parts.append(text)
    return tuple(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return json_line(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            extra_fields(record),
            record.exc_text,
        )


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

        writer = BackgroundLineWriter(
            sys.stderr, dropped_notice=dropped_notice, direct=_stderr_pipe()
        )
        _writers.append(writer)
        handler: logging.Handler = logging.StreamHandler(writer)
    else:
        handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactFilter())
    handler.setFormatter(formatter)
    global _installed
    _installed = (handler, tuple(handler.filters))
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
# The log lines of this long go to stderr together (one write for several calls' lines).
LOG_WRITE_DELAY_SECONDS = 0.002


def _stderr_pipe() -> int | None:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a stream without one
        return None
    return nonblocking_pipe(fd)


# The handler setup_logging installed last, with its own filters.
_installed: tuple[logging.Handler, tuple[Any, ...]] | None = None


def direct_json_handler(logger: logging.Logger, level: int) -> logging.StreamHandler[Any] | None:
    """The handler a record of `logger` at `level` would reach, when logging could do
    nothing to it but what `json_line` and `redact_fields` do (see the module docstring):
    setup_logging's own JSON handler, the only one on the way, with only its own filters.
    None otherwise: log the record through logging."""
    installed = _installed
    if installed is None:
        return None
    handler, filters = installed
    if (
        type(logger) is not logging.Logger
        or logger.disabled
        or logger.filters
        or not logger.isEnabledFor(level)
        or logging.getLogRecordFactory() is not logging.LogRecord
    ):
        return None
    node: logging.Logger | None = logger
    while node is not None:
        if node.parent is None:
            if node.handlers != [handler]:
                return None
        elif node.handlers or not node.propagate:
            return None
        node = node.parent
    if (
        type(handler) is not logging.StreamHandler
        or handler.level > level
        or tuple(handler.filters) != filters
        or type(handler.formatter) is not JsonFormatter
    ):
        return None
    return handler


def write_direct(
    handler: logging.StreamHandler[Any], logger: logging.Logger, level: int, line: str
) -> None:
    """Write `line` as `handler` writes a formatted record: under its lock, then flush."""
    handler.acquire()
    try:
        handler.stream.write(line + handler.terminator)
        handler.flush()
    except Exception:
        handler.handleError(logger.makeRecord(logger.name, level, "", 0, line, (), None))
    finally:
        handler.release()


class BackgroundLineWriter(io.TextIOBase):
    """The stream of a log handler: write() queues the line; the lines are written in
    order, never by a blocking write on the event loop.

    StreamHandler calls flush() after every line. On an event loop's thread that schedules,
    LOG_WRITE_DELAY_SECONDS later, the writing of all the lines logged by then: when stderr
    is a pipe, straight to it (in writes of at most PIPE_BUF bytes, on a non-blocking description
    of the pipe of our own: broker.pipes), as far as the pipe takes them at once; whatever
    is left (a full pipe, a file, a long line), and the lines of other threads, a writer
    thread writes, in one call for all the lines queued by then. At most `max_pending_chars`
    wait; beyond that lines are dropped (a stderr nobody reads must not grow the broker's
    memory) and a notice says how many.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        dropped_notice: Callable[[int], str],
        max_pending_chars: int = 8 * 1024 * 1024,
        direct: int | None = None,
    ) -> None:
        """`direct`: a non-blocking description of the pipe `stream` writes to
        (broker.pipes); closed by `stop()`."""
        super().__init__()
        self._stream = stream
        self._direct = direct
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._errors = getattr(stream, "errors", None) or "strict"
        self._dropped_notice = dropped_notice
        self._max_pending_chars = max_pending_chars
        self._lock = threading.Lock()
        self._pending: list[str] = []
        # The thread is writing lines it took from `_pending`.
        self._writing = False
        self._pending_chars = 0
        self._dropped = 0
        self._stopping = False
        self._wake = threading.Event()
        # The event loop whose pass ends with writing the lines (set by flush() on it).
        self._pass_scheduled: asyncio.AbstractEventLoop | None = None
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
        if not (self._pending or self._dropped):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop's thread
            if not self._wake.is_set():
                self._wake.set()
            return
        if self._pass_scheduled is not loop:
            # Once for all the lines of the next LOG_WRITE_DELAY_SECONDS: a write to a pipe
            # wakes its reader, a wake-up of the thread is a system call and a thread switch.
            self._pass_scheduled = loop
            loop.call_later(LOG_WRITE_DELAY_SECONDS, self._write_pass)

    def _write_pass(self) -> None:
        """The lines logged on the event loop since the last pass: to the pipe, the rest to
        the thread."""
        self._pass_scheduled = None
        with self._lock:
            if self._direct is not None and not self._writing and not self._dropped:
                self._write_to_pipe()
            if not (self._pending or self._dropped):
                return
        if not self._wake.is_set():
            self._wake.set()

    def _write_to_pipe(self) -> None:
        """Write the pending lines the pipe takes at once (broker.pipes.write_lines); the
        rest stay pending. Under the lock."""
        assert self._direct is not None
        pending = self._pending
        done = write_lines(
            self._direct, [text.encode(self._encoding, self._errors) for text in pending]
        )
        if done:
            self._pending_chars -= sum(len(text) for text in pending[:done])
            del pending[:done]

    def stop(self) -> None:
        """Write what is queued and end the thread (at exit; idempotent)."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join()
        with self._lock:
            close_quietly(self._direct)
            self._direct = None

    def _run(self) -> None:
        while True:
            self._wake.wait()
            # Cleared before taking the lines: a line queued after this is woken for again.
            self._wake.clear()
            with self._lock:
                lines, self._pending, self._pending_chars = self._pending, [], 0
                dropped, self._dropped = self._dropped, 0
                stopping = self._stopping
                # No line goes straight to the pipe before these are written.
                self._writing = bool(lines or dropped)
            if dropped:
                lines.append(self._dropped_notice(dropped))
            if lines:
                try:
                    self._stream.write("".join(lines))
                    self._stream.flush()
                except (OSError, ValueError):
                    pass  # stderr is gone: there is nowhere to say so
                finally:
                    with self._lock:
                        self._writing = False
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
