"""Hostile bearers through the real stack (issue 14, item 2): JWT-shaped credentials whose
header or payload nest thousands of levels deep, and JWTs whose exp/nbf/iat are not sane
NumericDates. The caller gets UNAUTHENTICATED with the generic message; the operator log has
one warning saying why, never the credential; nothing is logged as an error."""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from broker import authn
from broker.config import KubernetesSettings, LogSettings, load_settings
from broker.devmode import dev_settings
from broker.emulator import Emulator
from broker.errors import RichStatus
from broker.logs import setup_logging
from broker.reasons import Reason
from tests.support.hardening import (
    JWT_SUBJECT,
    deep_json,
    hardening_settings,
    hostile_jwt,
    new_signer,
    running,
)
from tests.support.hardening import create as call
from tests.support.jwt_issuer import AUDIENCE, ISSUER, Signer
from tests.support.stack import BROKER_TOKEN, create_request

MESSAGE_INVALID = "the credentials could not be verified"
LEVELS = 2000  # ~5.5 KB of bearer: RecursionError for json.loads, under gRPC's 8 KiB metadata


def assert_generic_refusal(status: RichStatus | None) -> None:
    assert status is not None
    assert status.code == grpc.StatusCode.UNAUTHENTICATED, status
    assert status.message == MESSAGE_INVALID
    assert status.error_info is not None
    assert status.error_info.reason == Reason.CREDENTIALS_INVALID
    assert not status.error_info.metadata


def record_text(record: logging.LogRecord) -> str:
    return record.getMessage() + repr(vars(record))


def authn_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "broker.authn" and r.levelno == logging.WARNING]


def assert_logged_as_a_refusal(caplog: pytest.LogCaptureFixture, bearer: str) -> str:
    """One warning from broker.authn, nothing at error level, the bearer nowhere; the reason."""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR
    ]
    [failure] = authn_failures(caplog)
    for part in (bearer, *bearer.split(".")):
        assert all(part not in record_text(r) for r in caplog.records)
    return str(getattr(failure, "auth_failure", ""))


HOSTILE = {
    "deep-header": lambda: hostile_jwt(deep_json(LEVELS), json.dumps({"iss": ISSUER})),
    "deep-payload": lambda: hostile_jwt(
        '{"alg":"RS256","kid":"hardening-rsa-1"}',
        '{"iss":"' + ISSUER + '","y":' + "[" * LEVELS + "]" * LEVELS + "}",
    ),
}


# What the operator log says of each: a header beyond the bounds is not a JWT header, so the
# bearer is taken for an API key (an unknown one).
REASONS = {
    ("deep-header", "no-jwt-issuer"): "unknown API key",
    ("deep-header", "jwt-issuer"): "unknown API key",
    ("deep-payload", "no-jwt-issuer"): "JWT presented but no JWT issuer is configured",
    ("deep-payload", "jwt-issuer"): (
        "payload is not a JSON object (within the size and depth bounds)"
    ),
}


@pytest.fixture(scope="module")
def signer() -> Signer:
    return new_signer()


@pytest.mark.parametrize("issuer", ["no-jwt-issuer", "jwt-issuer"])
@pytest.mark.parametrize("shape", list(HOSTILE))
async def test_deeply_nested_bearer_is_unauthenticated(
    emulator: Emulator,
    kubernetes_settings: KubernetesSettings,
    tmp_path: Path,
    signer: Signer,
    caplog: pytest.LogCaptureFixture,
    shape: str,
    issuer: str,
) -> None:
    bearer = HOSTILE[shape]()
    assert 5000 < len(bearer) < authn.MAX_BEARER_CHARS
    settings = hardening_settings(
        kubernetes_settings, tmp_path, signer=signer if issuer == "jwt-issuer" else None
    )
    caplog.set_level(logging.DEBUG)
    async with running(settings) as broker:
        before = emulator.token_request_count
        response, status = await call(broker.server.address, create_request(), bearer=bearer)
        assert response is None
        assert_generic_refusal(status)
        assert emulator.token_request_count == before
        [line] = broker.audit_entries()
    assert (line["decision"], line["reason"], line["code"]) == (
        "denied",
        Reason.CREDENTIALS_INVALID,
        "UNAUTHENTICATED",
    )
    assert assert_logged_as_a_refusal(caplog, bearer) == REASONS[shape, issuer]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: the dev-mode unix socket lives in it (paths of ~107 bytes at most)."""
    with tempfile.TemporaryDirectory(prefix="tb-h-") as name:
        yield Path(name)


async def test_deeply_nested_bearer_in_dev_mode(
    emulator: Emulator, short_dir: Path, restore_logging: None
) -> None:
    # As `serve --dev` runs: dev identities and policy, text logs, no JWT issuer.
    emulator.write_kubeconfig(short_dir / "kubeconfig", user_token=BROKER_TOKEN)
    base = load_settings(
        None,
        {
            "dev": True,
            "server": {"listen": "127.0.0.1:0"},
            "audit": {"sink": "file", "file": str(short_dir / "audit.jsonl")},
        },
    )
    settings = dev_settings(base, short_dir, "a-dev-api-key-for-this-test")
    stream = io.StringIO()
    setup_logging(LogSettings(level="info", format="text"), stream)  # the only handler now
    bearer = HOSTILE["deep-header"]()
    async with running(settings) as broker:
        _, status = await call(broker.server.address, create_request(), bearer=bearer)
    assert_generic_refusal(status)
    text = stream.getvalue()
    [warning] = [line for line in text.splitlines() if "WARNING broker.authn:" in line]
    assert 'auth_failure="unknown API key"' in warning
    assert " ERROR " not in text and "Traceback" not in text and "RecursionError" not in text
    for part in bearer.split("."):
        assert part not in text


async def test_an_unforeseen_exception_is_still_only_unauthenticated(
    kubernetes_settings: KubernetesSettings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Defence in depth: whatever a credential makes the checks raise is a refusal, not INTERNAL.
    def explode(value: str) -> bool:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(authn, "looks_like_jwt", explode)
    caplog.set_level(logging.DEBUG)
    bearer = "tbk_a-bearer-the-checks-choke-on"
    async with running(hardening_settings(kubernetes_settings, tmp_path)) as broker:
        _, status = await call(broker.server.address, create_request(), bearer=bearer)
    assert_generic_refusal(status)
    reason = assert_logged_as_a_refusal(caplog, bearer)
    assert reason == "the credential could not be checked (RecursionError)"
    [failure] = authn_failures(caplog)
    assert getattr(failure, "auth_method", None) == "bearer"


# --- NumericDate: exp, nbf, iat --------------------------------------------------------------


def signed_payload(signer: Signer, payload_text: str) -> str:
    """A token signed by the configured issuer's key over exactly `payload_text`."""
    return jwt.api_jws.PyJWS().encode(
        payload_text.encode(), signer.key, algorithm=signer.alg, headers={"kid": signer.kid}
    )


def claims_text(**dates: str) -> str:
    """The JSON text of valid claims, with `dates` (JSON texts) replacing exp/iat/nbf."""
    now = int(time.time())
    fields: dict[str, str] = {
        "iss": json.dumps(ISSUER),
        "aud": json.dumps(AUDIENCE),
        "sub": json.dumps(JWT_SUBJECT),
        "iat": str(now),
        "exp": str(now + 300),
    }
    fields.update(dates)
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"


NOT_A_NUMBER = "claim {!r} is not a NumericDate (a JSON number)"
OUT_OF_RANGE = "claim {!r} is out of range for a NumericDate"
BAD_DATES: dict[str, tuple[dict[str, str], str]] = {
    "exp-string": ({"exp": '"9999999999"'}, NOT_A_NUMBER.format("exp")),
    "exp-true": ({"exp": "true"}, NOT_A_NUMBER.format("exp")),
    "exp-null": ({"exp": "null"}, NOT_A_NUMBER.format("exp")),
    "exp-1e300": ({"exp": "1e300"}, OUT_OF_RANGE.format("exp")),
    "exp-1e400": ({"exp": "1e400"}, OUT_OF_RANGE.format("exp")),  # parses as inf
    "exp-huge-int": ({"exp": "1" + "0" * 30}, OUT_OF_RANGE.format("exp")),
    "exp-negative": ({"exp": "-1"}, OUT_OF_RANGE.format("exp")),
    "nbf-string": ({"nbf": '"0"'}, NOT_A_NUMBER.format("nbf")),
    "iat-string": ({"iat": '"1700000000"'}, NOT_A_NUMBER.format("iat")),
    "iat-list": ({"iat": "[1700000000]"}, NOT_A_NUMBER.format("iat")),
    "iat-1e300": ({"iat": "-1e300"}, OUT_OF_RANGE.format("iat")),
}


@pytest.fixture
async def jwt_broker(
    kubernetes_settings: KubernetesSettings, tmp_path: Path, signer: Signer
) -> Any:
    async with running(hardening_settings(kubernetes_settings, tmp_path, signer=signer)) as b:
        yield b


async def test_numeric_dates_that_are_numbers_are_accepted(jwt_broker: Any, signer: Signer) -> None:
    # RFC 7519 allows non-integer values; the policy allows this issuer's ci/runner.
    now = time.time()
    token = signed_payload(signer, claims_text(exp=repr(now + 300.5), nbf=repr(now - 1.25)))
    response, status = await call(jwt_broker.server.address, create_request(), bearer=token)
    assert status is None and response is not None
    assert response.token_request.status.token


@pytest.mark.parametrize("case", list(BAD_DATES))
async def test_numeric_dates_that_are_not_sane_numbers_are_refused(
    jwt_broker: Any,
    signer: Signer,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    dates, reason = BAD_DATES[case]
    token = signed_payload(signer, claims_text(**dates))
    caplog.set_level(logging.DEBUG)
    before = emulator.token_request_count
    response, status = await call(jwt_broker.server.address, create_request(), bearer=token)
    assert response is None
    assert_generic_refusal(status)
    assert emulator.token_request_count == before
    assert assert_logged_as_a_refusal(caplog, token) == reason
