"""After the whole suite: no issued token and no credential in anything the broker wrote or
answered (tests/suite_secrets.py collects it; conftest.py runs this test last)."""

from __future__ import annotations

import pytest
from conftest import BROKER_TOKEN, CALLER_KEY
from emulator_support import BROKER_TOKEN as EMULATOR_TESTS_BROKER_TOKEN
from suite_secrets import SUITE

# Below this the session was a selection of tests, not the suite: nothing to conclude from.
MIN_TOKENS_FOR_A_SUITE_RUN = 100


def test_no_token_or_credential_in_anything_the_broker_wrote() -> None:
    if len(SUITE.tokens) < MIN_TOKENS_FOR_A_SUITE_RUN:
        pytest.skip(f"a selection of tests ran ({len(SUITE.tokens)} tokens issued): run the suite")
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
