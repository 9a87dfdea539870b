"""The suite-wide secrets scan (issue 9): after the whole suite, no issued token and no
credential in anything the broker wrote or answered.

While the suite runs (`watch`, the body of a session fixture in tests/conftest.py) this collects:

- every log record of the broker and its libraries (all loggers except the tests' own), at
  DEBUG, as the broker's stderr handler writes it (its redaction filter, then JSON);
- the output of every `python -m broker` child (`Process`: `serve`, dev mode; its stdout is
  the audit log) and the stderr of every CLI run (the stdout of `token-broker token` is the
  token, by design);
- every error the broker answered (`BrokerError.abort`: code, message, trailing metadata);
- the /metrics text of every `BrokerMetrics` the suite made, at the end;
- every audit file the tests wrote under the session's temporary directory;

and records every token the emulator signed. The last test of the session
(`tests/test_secrets_suite.py`, ordered last by tests/conftest.py) looks for each token, each
token's signature and each test credential in all of it. Only the emulator (the fake API
server) and the broker's error and metrics objects are observed; nothing on the request path
is replaced.
"""

from __future__ import annotations

import copy
import logging
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from broker.emulator import tokens as emulator_tokens
from broker.errors import BrokerError
from broker.logs import JsonFormatter, RedactFilter, extra_fields
from broker.metrics import BrokerMetrics

# Loggers of the tests themselves (they log fake tokens on purpose, e.g. tests/unit/test_logs.py).
TEST_LOGGERS = ("broker.test", "test", "tests")


class SuiteCapture:
    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []  # (source, text)
        self.tokens: set[str] = set()  # every token the emulator signed
        self.metrics: list[BrokerMetrics] = []
        self.audit_dirs: list[Path] = []
        self.children: list[Any] = []  # support.cli.Process: .stdout and .stderr lines

    def add(self, source: str, text: str) -> None:
        if text:
            self.texts.append((source, text))

    def everything(self) -> list[tuple[str, str]]:
        """What was collected, with the /metrics of every broker and the audit files."""
        texts = list(self.texts)
        for child in self.children:
            texts.append(("child stdout", "".join(child.stdout)))
            texts.append(("child stderr", "".join(child.stderr)))
        for metrics in self.metrics:
            texts.append(("metrics", generate_latest(metrics.registry).decode()))
        for directory in self.audit_dirs:
            for path in directory.rglob("*audit*"):
                if path.is_file():
                    texts.append((f"audit file {path.name}", path.read_text(errors="replace")))
        return texts


SUITE = SuiteCapture()


class _BrokerOutput(logging.Handler):
    """Each record as the broker's stderr handler writes it (on a copy: other handlers, such
    as caplog's, see the record as it was)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._redact = RedactFilter()
        self._json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(TEST_LOGGERS):
            return
        try:
            line = copy.copy(record)
            self._redact.filter(line)
            SUITE.add(f"log:{record.name}", self._json.format(line))
        except Exception:
            self.handleError(record)


def record_text(record: logging.LogRecord) -> str:
    """The full text of a record as the code logged it, before any filter or formatter: its
    logger, message, extra fields, exception and stack (for scans of what was logged)."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError):
        message = f"{record.msg!r} {record.args!r}"
    parts = [record.name, message]
    parts += [f"{k}={v!r}" for k, v in extra_fields(record).items()]
    if record.exc_info:
        parts.append("".join(traceback.format_exception(*record.exc_info)))
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts)


def _recording(original: Callable[..., Any], record: Callable[..., None]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        record(args, kwargs, result)
        return result

    return wrapper


def watch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Collect for the whole session (the body of tests/conftest.py's session fixture)."""
    SUITE.audit_dirs.append(tmp_path_factory.getbasetemp())
    root = logging.getLogger()
    handler = _BrokerOutput()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # gRPC's own debug logging runs in its Cython callbacks, also while channels are torn
    # down at interpreter level; it says nothing of the broker's.
    grpc_logger = logging.getLogger("grpc")
    saved_grpc_level = grpc_logger.level
    grpc_logger.setLevel(logging.WARNING)
    patch = pytest.MonkeyPatch()
    patch.setattr(
        emulator_tokens.TokenSigner,
        "sign",
        _recording(
            emulator_tokens.TokenSigner.sign, lambda args, kwargs, token: SUITE.tokens.add(token)
        ),
    )
    patch.setattr(
        BrokerMetrics,
        "__init__",
        _recording(BrokerMetrics.__init__, lambda args, kwargs, _: SUITE.metrics.append(args[0])),
    )
    original_abort = BrokerError.abort

    async def abort(self: BrokerError, context: Any) -> Any:
        metadata = " ".join(f"{k}={v!r}" for k, v in self.trailing_metadata())
        SUITE.add("grpc error", f"{self.code.name} {self.message} {metadata}")
        return await original_abort(self, context)

    patch.setattr(BrokerError, "abort", abort)
    try:
        yield
    finally:
        patch.undo()
        root.removeHandler(handler)
        root.setLevel(saved_level)
        grpc_logger.setLevel(saved_grpc_level)
