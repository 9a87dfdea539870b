"""After the whole suite: no issued token and no credential in anything the broker wrote or
answered (tests/support/suite_secrets.py collects it; tests/conftest.py runs this test last, by
its `last_in_session` marker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.emulator import BROKER_TOKEN as EMULATOR_TESTS_BROKER_TOKEN
from tests.support.stack import BROKER_TOKEN, CALLER_KEY
from tests.support.suite_secrets import SUITE


@pytest.mark.last_in_session
def test_no_token_or_credential_in_anything_the_broker_wrote(
    request: pytest.FixtureRequest,
) -> None:
    # Every test module of every folder, or the scan would miss what the others wrote.
    ran = {item.path for item in request.session.items}
    if ran != set(Path(__file__).parent.rglob("test_*.py")):
        pytest.skip("a selection of the suite ran: the scan is for the whole suite")
    assert SUITE.tokens, "the suite issued no token?"
    texts = SUITE.everything()
    sources = {source.split(":")[0].split(" ")[0] for source, _ in texts}
    # The scan is only as good as what it covers.
    assert {"log", "child", "cli", "grpc", "metrics", "audit"} <= sources, sources
    secrets = {
        CALLER_KEY: "the callers' API key",
        BROKER_TOKEN: "the broker's Kubernetes credential",
        EMULATOR_TESTS_BROKER_TOKEN: "the broker's Kubernetes credential",
    }
    for token in SUITE.tokens:
        secrets[token] = "an issued token"
        secrets[token.rsplit(".", 1)[-1]] = "an issued token's signature"
    haystack = "\n".join(text for _, text in texts)
    found = [secret for secret in secrets if secret in haystack]
    leaks = sorted(
        {(secrets[secret], source) for secret in found for source, text in texts if secret in text}
    )
    assert not leaks, leaks
