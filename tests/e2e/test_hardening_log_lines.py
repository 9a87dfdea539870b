"""Forged log lines (issue 14, item 3d): an unverified JWT whose `iss` or `kid` carries a
newline (or CR, U+2028, ESC) must not produce a line that looks like a genuine
`broker.access ... OK` entry. Each record is one line in the text format (non-printables
escaped, traceback lines prefixed) and in JSON."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import grpc
import pytest

from broker.config import KubernetesSettings, LogSettings
from broker.emulator import Emulator
from broker.logs import CONTINUATION, setup_logging
from tests.support.hardening import (
    create,
    eventually,
    hardening_settings,
    hostile_jwt,
    new_signer,
    running,
)
from tests.support.jwt_issuer import ISSUER
from tests.support.stack import create_request

FAKE_ACCESS = (
    "12:00:00.000 INFO    broker.access: tokenbroker.v1.TokenBrokerService/CreateToken OK "
    "1.0ms request_id=forged namespace=demo"
)
BREAKS = ("\n", "\r\n", "\r", "\u2028", "\u2029", "\x85", "\x1b[2K\r")
TEXT_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} [A-Z]+ +(?P<logger>[\w.]+): ")


def logger_of(line: str) -> str:
    match = TEXT_LINE.match(line)
    assert match is not None, line
    return match["logger"]


def forged_bearers() -> list[str]:
    """Unsigned JWTs (refused anyway) whose iss or kid would forge an access line."""
    bearers = []
    for brk in BREAKS:
        bearers.append(
            hostile_jwt(
                json.dumps({"alg": "RS256", "kid": "hardening-rsa-1"}),
                json.dumps({"iss": f"https://evil.example{brk}{FAKE_ACCESS}"}),
            )
        )
        bearers.append(
            hostile_jwt(
                json.dumps({"alg": "RS256", "kid": f"rotated{brk}{FAKE_ACCESS}"}),
                json.dumps({"iss": ISSUER}),
            )
        )
    return bearers


async def logged_forgeries(
    log_format: str, kube: KubernetesSettings, directory: Path
) -> tuple[str, int]:
    """Every forged bearer once through a broker with a JWT issuer, its logs in `log_format`:
    (what was logged, the number of calls)."""
    stream = io.StringIO()
    setup_logging(LogSettings(level="info", format=log_format), stream)  # type: ignore[arg-type]
    bearers = forged_bearers()
    async with running(hardening_settings(kube, directory, signer=new_signer())) as broker:
        for n, bearer in enumerate(bearers):
            _, status = await create(
                broker.server.address, create_request(), bearer=bearer, request_id=f"forgery-{n}"
            )
            assert status is not None and status.code == grpc.StatusCode.UNAUTHENTICATED
        last = f"forgery-{len(bearers) - 1}"
        await eventually(lambda: last in stream.getvalue(), "the last access line")
    return stream.getvalue(), len(bearers)


async def test_text_format_lines_cannot_be_forged(
    emulator: Emulator,
    kubernetes_settings: KubernetesSettings,
    tmp_path: Path,
    restore_logging: None,
) -> None:
    text, calls = await logged_forgeries("text", kubernetes_settings, tmp_path)
    lines = text.split("\n")[:-1]  # only "\n" ends a line; nothing else may break one
    assert text.endswith("\n")
    for line in lines:
        assert TEXT_LINE.match(line), line
        assert line.isprintable(), line  # no CR, U+2028, ESC, ... left to a terminal
    assert len(text.splitlines()) == len(lines)  # even for str.splitlines()
    access = [line for line in lines if logger_of(line) == "broker.access"]
    assert len(access) == calls
    assert all(" UNAUTHENTICATED " in line for line in access)
    assert not [line for line in lines if line.startswith(FAKE_ACCESS[:12])]
    failures = [line for line in lines if logger_of(line) == "broker.authn"]
    assert len(failures) == calls
    # The operator still sees what the token said: escaped, quoted (it has spaces), bounded.
    shown = "\n".join(failures)
    assert 'issuer="https://evil.example\\n12:00:00.000 INFO ' in shown
    assert 'issuer="https://evil.example\\r\\n12:00:00.000 INFO ' in shown
    assert 'kid="rotated\\u202812:00:00.000 INFO ' in shown
    assert 'kid="rotated\\x1b[2K\\r12:00:00.000 INFO ' in shown


async def test_json_format_lines_cannot_be_forged(
    emulator: Emulator,
    kubernetes_settings: KubernetesSettings,
    tmp_path: Path,
    restore_logging: None,
) -> None:
    text, calls = await logged_forgeries("json", kubernetes_settings, tmp_path)
    lines = text.splitlines()  # splits on U+2028, U+0085 ... too: none may be raw
    entries = [json.loads(line) for line in lines]
    assert len(text.split("\n")) == len(lines) + 1
    access = [e for e in entries if e["logger"] == "broker.access"]
    assert len(access) == calls and {e["grpc_code"] for e in access} == {"UNAUTHENTICATED"}
    issuers = {e.get("issuer") for e in entries if e["logger"] == "broker.authn"}
    assert f"https://evil.example\u2028{FAKE_ACCESS}"[:120] in {str(i)[:120] for i in issuers}


def test_a_traceback_cannot_forge_a_line(restore_logging: None) -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(level="info", format="text"), stream)
    log = logging.getLogger("broker.service")
    try:
        raise ValueError(f"bad input\n{FAKE_ACCESS}\r{FAKE_ACCESS}")
    except ValueError:
        log.exception("failed\n%s", FAKE_ACCESS)
    first, *rest = stream.getvalue().split("\n")[:-1]
    assert TEXT_LINE.match(first) and "failed\\n12:00:00.000" in first
    assert rest and all(line.startswith(CONTINUATION) for line in rest), rest
    assert any("ValueError: bad input" in line for line in rest)
    assert all(line.isprintable() for line in rest)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("a\nb", "issuer=a\\nb"),
        ("tab\there", "issuer=tab\\there"),
        ("\x1b[31mred", "issuer=\\x1b[31mred"),
        ("rtl\u202eoverride", "issuer=rtl\\u202eoverride"),
        ("\U000e0041tag", "issuer=\\U000e0041tag"),
        ("é ok", 'issuer="é ok"'),  # printable: as it is, quoted for its space
        ('x" grpc_code=OK', 'issuer="x\\" grpc_code=OK"'),  # cannot pose as another field
    ],
)
def test_text_fields_are_escaped_and_quoted(restore_logging: None, value: str, shown: str) -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(level="info", format="text"), stream)
    logging.getLogger("broker.authn").warning("refused %s", value, extra={"issuer": value})
    [line] = stream.getvalue().split("\n")[:-1]
    assert line.isprintable()
    assert line.endswith(f" {shown}"), line
