"""Dev mode's throwaway JWT issuer (broker.dev_issuer): the settings it adds, only when the
user configured no JWT issuer, and the dev policy's rule for its subject."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from broker.authn_jwt import JwtVerifier
from broker.config import load_settings
from broker.dev_issuer import ISSUER, SUBJECT, write_dev_issuer
from broker.devmode import dev_settings, wants_dev_issuer
from broker.identity import Identity
from broker.policy import DEV_POLICY_FILE, Policy
from tests.support.suite_secrets import SUITE
from tests.unit.test_policy import req


def test_dev_settings_add_the_dev_issuer(tmp_path: Path) -> None:
    base = load_settings(None, {"dev": True})
    assert wants_dev_issuer(base)
    issuer = write_dev_issuer(tmp_path)
    [configured] = dev_settings(base, tmp_path, "k", issuer).authentication.jwt.issuers
    assert configured.issuer == ISSUER and configured.jwks_file == issuer.jwks_file
    assert configured.audiences == ("token-broker",) and configured.algorithms == ("ES256",)
    assert not dev_settings(base, tmp_path, "k").authentication.jwt.issuers
    for private in (issuer.key_file, issuer.subject_token_file):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # A second start in the same directory would not reuse a key: it refuses to.
    with pytest.raises(FileExistsError):
        write_dev_issuer(tmp_path)


def test_the_users_jwt_issuers_mean_no_dev_issuer(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    mine = {"issuer": "https://mine.example", "audiences": ["b"], "jwksFile": str(jwks)}
    base = load_settings(None, {"dev": True, "authentication": {"jwt": {"issuers": [mine]}}})
    assert not wants_dev_issuer(base)
    [kept] = dev_settings(base, tmp_path, "k").authentication.jwt.issuers
    assert kept.issuer == "https://mine.example"


async def test_the_dev_subject_token_verifies_with_the_dev_settings(tmp_path: Path) -> None:
    issuer = write_dev_issuer(tmp_path)
    settings = dev_settings(load_settings(None, {"dev": True}), tmp_path, "k", issuer)
    verifier = JwtVerifier(settings.authentication.jwt)
    await verifier.start()
    try:
        token = issuer.subject_token_file.read_text(encoding="ascii")
        SUITE.tokens.add(token)
        identity = await verifier.verify(token)
    finally:
        await verifier.close()
    assert (identity.method, identity.name, identity.issuer) == ("jwt", SUBJECT, ISSUER)


def test_the_dev_policy_lets_the_dev_subject_have_tokens() -> None:
    policy = Policy.load(DEV_POLICY_FILE)
    dev_ci = Identity(method="jwt", name=SUBJECT, issuer=ISSUER)
    decision = policy.decide(dev_ci, req("demo", "build-robot", audiences=["vault"]))
    assert decision.allowed and decision.audiences == ("vault",)
    assert policy.decide(dev_ci, req("ci", "runner")).allowed
    assert not policy.decide(dev_ci, req("kube-system", "default")).allowed
    # The same name from another issuer, or another subject of the dev issuer: no rule.
    other = Identity(method="jwt", name=SUBJECT, issuer="https://issuer.example")
    assert not policy.decide(other, req("demo", "build-robot")).allowed
    stranger = Identity(method="jwt", name="someone", issuer=ISSUER)
    assert not policy.decide(stranger, req("demo", "build-robot")).allowed
