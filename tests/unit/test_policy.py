"""The policy engine (broker.policy), its schema and its hot reload (broker.policy_reload)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import pytest
import yaml

from broker.config import load_settings
from broker.file_reload import reload_on_sighup
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import Identity
from broker.policy import DEV_POLICY_FILE, Decision, Policy, PolicyError
from broker.policy_reload import PolicyStore
from broker.reasons import ALLOWED, Reason
from tests.support.stack import create_request

CI = Identity(method="mtls", name="spiffe://example.org/ci/runner")
GITHUB = "https://token.actions.githubusercontent.com"


def jwt_identity(name: str = "repo:example/app:ref:refs/heads/main", **claims: Any) -> Identity:
    base = {"repository_owner": "example", "ref": "refs/heads/main"}
    return Identity(
        method="jwt", name=name, issuer=GITHUB, claims=MappingProxyType({**base, **claims})
    )


def rule(**overrides: Any) -> dict[str, Any]:
    """A rule allowing CI's mtls identity to get `vault` tokens for ci/deployer."""
    base: dict[str, Any] = {
        "name": "ci-deploys",
        "subjects": [{"method": "mtls", "name": "spiffe://example.org/ci/*"}],
        "namespaces": ["ci", "team-*"],
        "serviceAccounts": ["deployer"],
        "audiences": ["vault", "https://sts.example.com"],
        "defaultAudiences": ["vault"],
    }
    base.update(overrides)
    return base


def policy(*rules: dict[str, Any]) -> Policy:
    return Policy.from_dict({"rules": list(rules) or [rule()]})


def req(
    namespace: str = "ci", service_account: str = "deployer", **kwargs: Any
) -> pb.CreateTokenRequest:
    return create_request(namespace, service_account, **kwargs)


def pod(name: str = "web-0", kind: str = "Pod") -> pb.BoundObjectReference:
    return pb.BoundObjectReference(kind=kind, api_version="v1", name=name)


def denied(decision: Decision, reason: str) -> Decision:
    assert not decision.allowed, decision
    assert decision.reason == reason, decision
    return decision


# --- matching and first-match semantics ------------------------------------------------------


def test_allowed_with_the_rule_and_the_grant() -> None:
    d = policy().decide(CI, req(audiences=["https://sts.example.com"], expiration_seconds=900))
    assert d.allowed and d.reason == ALLOWED and d.rule == "ci-deploys"
    assert d.audiences == ("https://sts.example.com",)
    assert d.expiration_seconds == 900
    assert d.warnings == ()


@pytest.mark.parametrize(
    ("identity", "namespace", "service_account"),
    [
        (Identity(method="apiKey", name="spiffe://example.org/ci/runner"), "ci", "deployer"),
        (Identity(method="mtls", name="spiffe://example.org/prod/runner"), "ci", "deployer"),
        (Identity(method="mtls", name="SPIFFE://example.org/ci/runner"), "ci", "deployer"),
        (CI, "prod", "deployer"),
        (CI, "ci", "deployer-2"),
        (CI, "Team-a", "deployer"),
    ],
)
def test_no_matching_rule(identity: Identity, namespace: str, service_account: str) -> None:
    d = denied(policy().decide(identity, req(namespace, service_account)), Reason.NO_MATCHING_RULE)
    assert d.rule is None
    err = d.error()
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.reason == Reason.NO_MATCHING_RULE
    assert dict(err.metadata) == {}  # nothing about the rules
    assert "ci-deploys" not in err.message and "vault" not in err.message
    assert f'"{namespace}"' in err.message and f'"{service_account}"' in err.message


def test_an_empty_policy_denies_everything() -> None:
    d = Policy.from_dict({"rules": []}).decide(CI, req())
    denied(d, Reason.NO_MATCHING_RULE)


def test_globs() -> None:
    p = policy(rule(serviceAccounts=["deploy-*", "runner?"]))
    assert p.decide(CI, req("team-blue", "deploy-web")).allowed
    assert p.decide(CI, req("team-blue", "runner1")).allowed
    assert not p.decide(CI, req("team-blue", "runner12")).allowed
    # In a SPIFFE ID pattern `*` stays within one path segment (test_hardening_mtls_names.py).
    nested = Identity(method="mtls", name="spiffe://example.org/ci/a/b")
    assert not p.decide(nested, req("ci", "deploy-x")).allowed


def test_first_matching_rule_decides_even_when_it_denies() -> None:
    strict = rule(name="strict", boundObject={"required": True})
    lenient = rule(name="lenient")
    d = policy(strict, lenient).decide(CI, req())
    denied(d, Reason.BOUND_OBJECT_REQUIRED)
    assert d.rule == "strict"
    # Reordered, the lenient rule decides.
    assert policy(lenient, strict).decide(CI, req()).rule == "lenient"


def test_a_rule_that_does_not_match_is_skipped() -> None:
    other_ns = rule(name="other-ns", namespaces=["prod"], allowDryRun=True)
    other_subject = rule(name="other-subject", subjects=[{"method": "apiKey", "name": "*"}])
    d = policy(other_ns, other_subject, rule(name="third")).decide(CI, req())
    assert d.allowed and d.rule == "third"


def test_any_subject_of_a_rule_may_match() -> None:
    p = policy(
        rule(
            subjects=[
                {"method": "apiKey", "name": "deploy-bot"},
                {"method": "unixSocket", "name": "*"},
            ]
        )
    )
    assert p.decide(Identity(method="apiKey", name="deploy-bot"), req()).allowed
    assert p.decide(Identity(method="unixSocket", name="local"), req()).allowed
    assert not p.decide(Identity(method="apiKey", name="other"), req()).allowed
    assert not p.decide(CI, req()).allowed


JWT_SUBJECT = {
    "method": "jwt",
    "issuer": GITHUB,
    "name": "repo:example/app:*",
    "claims": {"repository_owner": "example", "ref": ["refs/heads/main", "refs/tags/*"]},
}


@pytest.mark.parametrize(
    ("identity", "allowed"),
    [
        (jwt_identity(), True),
        (jwt_identity(ref="refs/tags/v1.2.3"), True),
        (jwt_identity(ref="refs/heads/feature"), False),
        (jwt_identity(repository_owner="Example"), False),  # case-sensitive
        (jwt_identity(name="repo:other/app:ref:refs/heads/main"), False),
        (jwt_identity(ref=["refs/heads/x", "refs/tags/v1"]), True),  # a list claim: any element
        (jwt_identity(ref=["refs/heads/x"]), False),
        (jwt_identity(ref=1), False),  # not a string: never matches
        (
            Identity(
                method="jwt",
                name="repo:example/app:x",
                issuer=GITHUB,
                claims=MappingProxyType({"ref": "refs/heads/main"}),  # repository_owner missing
            ),
            False,
        ),
        (
            Identity(
                method="jwt",
                name="repo:example/app:x",
                issuer="https://token.actions.githubusercontent.com/",  # exact issuer only
                claims=jwt_identity().claims,
            ),
            False,
        ),
    ],
)
def test_jwt_subjects(identity: Identity, allowed: bool) -> None:
    assert policy(rule(subjects=[JWT_SUBJECT])).decide(identity, req()).allowed is allowed


# --- the deciding rule's checks ----------------------------------------------------------------


def test_dry_run() -> None:
    denied(policy().decide(CI, req(dry_run=["All"])), Reason.DRY_RUN_NOT_ALLOWED)
    assert policy(rule(allowDryRun=True)).decide(CI, req(dry_run=["All"])).allowed


def test_bound_object_required_and_kinds() -> None:
    required = policy(rule(boundObject={"required": True, "kinds": ["Pod"]}))
    d = denied(required.decide(CI, req()), Reason.BOUND_OBJECT_REQUIRED)
    assert "bound_object_ref" in d.message and "Pod" in d.message
    assert required.decide(CI, req(bound=pod())).allowed
    d = denied(required.decide(CI, req(bound=pod("s1", "Secret"))), Reason.BOUND_KIND_NOT_ALLOWED)
    assert '"Secret"' in d.message
    # Not required, but a bound token must still be of an allowed kind.
    optional = policy(rule(boundObject={"kinds": ["Secret", "Node"]}))
    assert optional.decide(CI, req()).allowed
    denied(optional.decide(CI, req(bound=pod())), Reason.BOUND_KIND_NOT_ALLOWED)
    # Default: not required, every kind.
    for kind in ("Pod", "Secret", "Node"):
        assert policy().decide(CI, req(bound=pod("x", kind))).allowed


def test_audience_required_unless_the_rule_allows_the_api_servers_own() -> None:
    p = policy(rule(defaultAudiences=[]))
    d = denied(p.decide(CI, req()), Reason.AUDIENCE_REQUIRED)
    assert "token_request.spec.audiences" in d.message
    d = policy(rule(defaultAudiences=[], allowApiServerAudience=True)).decide(CI, req())
    assert d.allowed and d.audiences == ()
    # The effective request then names no audience (the API server's own).
    assert list(d.effective_request(req()).token_request.spec.audiences) == []


def test_default_audiences_and_requested_ones() -> None:
    p = policy(rule(allowApiServerAudience=True))
    assert p.decide(CI, req()).audiences == ("vault",)  # defaults win over the API server's
    assert p.decide(CI, req(audiences=["https://sts.example.com", "vault"])).audiences == (
        "https://sts.example.com",
        "vault",
    )


def test_audience_not_allowed_does_not_reveal_the_allowlist() -> None:
    d = denied(
        policy().decide(CI, req(audiences=["vault", "evil", "worse"])), Reason.AUDIENCE_NOT_ALLOWED
    )
    assert d.message == 'audience "evil" is not allowed for this service account (and 1 more)'
    assert "sts.example.com" not in d.error().message
    # Exact strings, not globs.
    denied(policy().decide(CI, req(audiences=["vaul*"])), Reason.AUDIENCE_NOT_ALLOWED)


def test_expiration_capped_with_the_api_servers_warning() -> None:
    p = policy(rule(maxExpiration="1h"))
    d = p.decide(CI, req(expiration_seconds=7200))
    assert d.allowed and d.expiration_seconds == 3600
    assert d.warnings == ("requested expiration of 7200 seconds shortened to 3600 seconds",)
    assert (
        d.effective_request(req(expiration_seconds=7200)).token_request.spec.expiration_seconds
        == 3600
    )
    # At the maximum: untouched.
    d = p.decide(CI, req(expiration_seconds=3600))
    assert d.expiration_seconds == 3600 and d.warnings == ()


def test_expiration_rejected() -> None:
    p = policy(rule(maxExpiration="30m", onLongerExpiration="reject"))
    d = denied(p.decide(CI, req(expiration_seconds=1801)), Reason.EXPIRATION_TOO_LONG)
    assert d.message == (
        "requested expiration of 1801 seconds is longer than the maximum of 1800 seconds "
        "for this service account"
    )
    assert p.decide(CI, req(expiration_seconds=1800)).allowed


def test_default_expiration_fills_an_absent_one() -> None:
    p = policy(rule(defaultExpiration="10m", maxExpiration="2h"))
    d = p.decide(CI, req())
    assert d.expiration_seconds == 600
    spec = d.effective_request(req()).token_request.spec
    assert spec.HasField("expiration_seconds") and spec.expiration_seconds == 600
    assert p.decide(CI, req(expiration_seconds=5400)).expiration_seconds == 5400


def test_absent_expiration_stays_absent_and_counts_as_3600() -> None:
    d = policy().decide(CI, req())  # maxExpiration defaults to 1h
    assert d.allowed and d.expiration_seconds is None and d.warnings == ()
    assert not d.effective_request(req()).token_request.spec.HasField("expiration_seconds")
    # A maximum below the API server's default: capped, as if 3600 had been requested ...
    d = policy(rule(maxExpiration="20m")).decide(CI, req())
    assert d.expiration_seconds == 1200
    assert d.warnings == ("requested expiration of 3600 seconds shortened to 1200 seconds",)
    # ... or refused.
    d = policy(rule(maxExpiration="20m", onLongerExpiration="reject")).decide(CI, req())
    assert denied(d, Reason.EXPIRATION_TOO_LONG).message.startswith(
        "default expiration of 3600 seconds"
    )


@pytest.mark.parametrize(
    ("overrides", "request_kwargs", "reason"),
    [
        # Every check fails: the first in the documented order wins, and so on down.
        (
            {"boundObject": {"required": True}, "defaultAudiences": []},
            {"dry_run": ["All"], "expiration_seconds": 99999},
            Reason.DRY_RUN_NOT_ALLOWED,
        ),
        (
            {"boundObject": {"required": True}, "allowDryRun": True, "defaultAudiences": []},
            {"dry_run": ["All"], "expiration_seconds": 99999},
            Reason.BOUND_OBJECT_REQUIRED,
        ),
        (
            {"boundObject": {"kinds": ["Node"]}, "defaultAudiences": []},
            {"bound": pod(), "expiration_seconds": 99999},
            Reason.BOUND_KIND_NOT_ALLOWED,
        ),
        ({"defaultAudiences": []}, {"expiration_seconds": 99999}, Reason.AUDIENCE_REQUIRED),
        ({}, {"audiences": ["x"], "expiration_seconds": 99999}, Reason.AUDIENCE_NOT_ALLOWED),
        ({}, {"expiration_seconds": 99999}, Reason.EXPIRATION_TOO_LONG),
    ],
)
def test_check_order(
    overrides: dict[str, Any], request_kwargs: dict[str, Any], reason: str
) -> None:
    p = policy(rule(onLongerExpiration="reject", **overrides))
    d = denied(p.decide(CI, req(**request_kwargs)), reason)
    err = d.error()
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.reason == reason
    assert dict(err.metadata) == {"rule": "ci-deploys"}
    assert err.message == d.message


def test_decision_helpers_refuse_the_wrong_outcome() -> None:
    allowed = policy().decide(CI, req())
    with pytest.raises(ValueError):
        allowed.error()
    refused = policy().decide(CI, req("prod"))
    with pytest.raises(ValueError):
        refused.effective_request(req("prod"))


def test_effective_request_is_a_copy() -> None:
    original = req(expiration_seconds=7200, field_manager="me", bound=pod())
    effective = policy(rule(allowApiServerAudience=False)).decide(CI, original)
    out = effective.effective_request(original)
    assert list(original.token_request.spec.audiences) == []
    assert original.token_request.spec.expiration_seconds == 7200
    assert list(out.token_request.spec.audiences) == ["vault"]
    assert out.token_request.spec.expiration_seconds == 3600
    assert out.field_manager == "me" and out.token_request.spec.bound_object_ref.name == "web-0"


# --- explain -----------------------------------------------------------------------------------


def test_explain_says_why_each_rule_did_not_match() -> None:
    p = policy(
        rule(name="prod", namespaces=["prod"]),
        rule(name="bots", subjects=[{"method": "apiKey", "name": "bot"}], serviceAccounts=["x"]),
        rule(name="ci", boundObject={"required": True}),
        rule(name="later"),
    )
    e = p.explain(CI, req())
    assert e.decision == p.decide(CI, req())
    assert e.decision.rule == "ci"
    by_name = {r.name: r for r in e.rules}
    assert [r.name for r in e.rules] == ["prod", "bots", "ci", "later"]
    assert by_name["prod"].mismatches == ("namespace 'ci' does not match ['prod']",)
    assert by_name["bots"].mismatches == (
        "no subject matches mtls:uri:spiffe://example.org/ci/runner "
        "(subjects[0]: method is mtls, not apiKey)",
        "service account 'deployer' does not match ['x']",
    )
    assert by_name["ci"].matched and by_name["ci"].deciding
    assert by_name["later"].matched and not by_name["later"].deciding


def test_explain_claims() -> None:
    p = policy(rule(subjects=[JWT_SUBJECT]))
    (r,) = p.explain(jwt_identity(ref="refs/heads/dev"), req()).rules
    assert "claim 'ref' ('refs/heads/dev') does not match" in r.mismatches[0]


# --- the file and its validation ---------------------------------------------------------------


def bad(data: Any) -> str:
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(data, "p.yaml")
    return str(info.value)


def with_rule(**overrides: Any) -> dict[str, Any]:
    return {"rules": [rule(**overrides)]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "rules: required"),
        ({"rules": {"a": 1}}, "rules: must be a list"),
        ({"rules": [], "version": 1}, "version: Extra inputs are not permitted"),
        (with_rule(maxExpiration="1x"), 'rules[0].maxExpiration: invalid duration "1x"'),
        (with_rule(maxExpiration="5m"), "rules[0].maxExpiration: 300s is less than"),
        (with_rule(maxExpiration="1.5s"), 'rules[0].maxExpiration: duration "1.5s" is not a'),
        (with_rule(maxExpiration=True), "rules[0].maxExpiration: a duration must be"),
        (with_rule(maxExpiration=-600), "rules[0].maxExpiration: Input should be greater than 0"),
        (
            with_rule(defaultExpiration="2h"),
            "rules[0].defaultExpiration: 7200s is longer than maxExpiration (3600s)",
        ),
        (with_rule(defaultExpiration=60), "rules[0].defaultExpiration: 60s is less than"),
        (
            with_rule(defaultAudiences=["vault", "other"]),
            "rules[0].defaultAudiences[1]: 'other' is not in audiences",
        ),
        (with_rule(onLongerExpiration="drop"), "rules[0].onLongerExpiration: Input should be"),
        (with_rule(allowDryRun="yes"), "rules[0].allowDryRun: Input should be a valid boolean"),
        (with_rule(serviceAccount=["x"]), "rules[0].serviceAccount: Extra inputs"),
        (with_rule(namespaces="ci"), "rules[0].namespaces: must be a list"),
        (with_rule(namespaces=[]), "rules[0].namespaces: must list at least one"),
        (with_rule(subjects=[]), "rules[0].subjects: must list at least one"),
        (with_rule(name="a b"), "rules[0].name: 'a b' is not a rule name"),
        ({"rules": [{"name": "x"}]}, "rules[0].subjects: required"),
        (
            with_rule(subjects=[{"method": "jwt", "name": "x"}]),
            "rules[0].subjects[0].issuer: required for jwt subjects",
        ),
        (
            with_rule(subjects=[{"method": "mtls", "name": "x", "issuer": "i"}]),
            "rules[0].subjects[0].issuer: only jwt subjects have an issuer",
        ),
        (
            with_rule(subjects=[{"method": "apiKey", "name": "x", "claims": {"a": "b"}}]),
            "rules[0].subjects[0].claims: only jwt subjects have claims",
        ),
        (
            with_rule(subjects=[{"method": "jwt", "issuer": "i", "name": "x", "claims": {"a": 1}}]),
            "rules[0].subjects[0].claims.a: must be a glob (a string) or a list of globs",
        ),
        (
            with_rule(subjects=[{"method": "oidc", "name": "x"}]),
            "rules[0].subjects[0].method: Input should be 'mtls', 'apiKey', 'jwt' or 'unixSocket'",
        ),
        (
            with_rule(subjects=[{"method": "mtls", "name": "x", "nmae": "y"}]),
            "rules[0].subjects[0].nmae: Extra inputs are not permitted",
        ),
        (with_rule(boundObject={"kinds": ["Job"]}), "rules[0].boundObject.kinds[0]: Input should"),
        (with_rule(boundObject={"required": 1}), "rules[0].boundObject.required: Input should"),
        (
            {"rules": [rule(), rule(name="b"), rule()]},
            "rules[2].name: duplicate rule name 'ci-deploys' (also rules[0])",
        ),
    ],
)
def test_validation_errors_name_the_key(data: Any, expected: str) -> None:
    message = bad(data)
    assert message.startswith("invalid policy p.yaml")
    assert expected in message


def test_every_problem_is_reported() -> None:
    message = bad({"rules": [rule(), rule(maxExpiration="1x", namespaces="ci", extra=1)]})
    assert "rules[1].maxExpiration" in message
    assert "rules[1].namespaces" in message
    assert "rules[1].extra" in message


def test_durations_accept_go_strings_and_integer_seconds() -> None:
    p = policy(rule(maxExpiration="1h30m", defaultExpiration=900))
    (r,) = p.rules
    assert (r.max_expiration, r.default_expiration) == (5400, 900)


def test_load_a_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"rules": [rule()]}))
    assert Policy.load(path).decide(CI, req()).allowed
    path.write_text("rules: [")
    with pytest.raises(PolicyError, match="is not valid YAML"):
        Policy.load(path)
    path.write_text("- a\n")
    with pytest.raises(PolicyError, match="top level must be a mapping"):
        Policy.load(path)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.load(tmp_path / "missing.yaml")


def test_the_dev_policy() -> None:
    text = DEV_POLICY_FILE.read_text()
    assert text.startswith("# DEV ONLY")
    p = Policy.load(DEV_POLICY_FILE)
    # The dev banner's example: `token build-robot -n demo`, no audience: the API server's own
    # (what kubectl, through the credential plugin, needs); the demo audience when asked.
    d = p.decide(Identity(method="apiKey", name="dev"), req("demo", "build-robot"))
    assert d.allowed and d.audiences == ()
    d = p.decide(CI, req("demo", "build-robot", audiences=["token-broker-demo"]))
    assert d.allowed and d.audiences == ("token-broker-demo",)
    d = p.decide(Identity(method="unixSocket", name="me"), req("ci", "runner", dry_run=["All"]))
    assert d.allowed
    d = p.decide(CI, req("demo", "deployer", expiration_seconds=2 * 86400))
    assert d.expiration_seconds == 86400 and d.warnings
    assert not p.decide(Identity(method="apiKey", name="other"), req("demo", "x")).allowed
    assert not p.decide(CI, req("kube-system", "x")).allowed
    denied(p.decide(CI, req("demo", "x", audiences=["other"])), Reason.AUDIENCE_NOT_ALLOWED)


def test_policy_settings() -> None:
    settings = load_settings(None, {"policy": {"file": "/etc/broker/policy.yaml"}})
    assert settings.policy.file == Path("/etc/broker/policy.yaml")
    assert settings.policy.reload_interval_seconds == 5.0
    assert load_settings().policy.file is None


# --- reload ------------------------------------------------------------------------------------


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def write_policy(path: Path, *rules: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump({"rules": list(rules)}))


async def test_reload_installs_a_good_file_and_refuses_a_broken_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    write_policy(path, rule(name="first"))
    store = await PolicyStore.open_file(path)
    first = store.current
    assert await store.reload() is False  # unchanged
    assert (store.reload_count, store.reload_failures) == (0, 0)

    write_policy(path, rule(name="second"))
    assert await store.reload() is True
    assert store.current.decide(CI, req()).rule == "second"
    assert store.current is not first
    assert (store.reload_count, store.reload_failures) == (1, 0)
    good = store.current

    caplog.set_level(logging.INFO, logger="broker.policy")
    write_policy(path, rule(name="third", maxExpiration="1x"))
    assert await store.reload() is False
    assert store.current is good
    assert (store.reload_count, store.reload_failures) == (1, 1)
    assert store.last_error is not None and "rules[0].maxExpiration" in store.last_error
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == "broker.policy"
    assert "rules[0].maxExpiration" in record.getMessage()

    path.unlink()
    assert await store.reload() is False
    assert store.current is good and store.reload_failures == 2
    assert "cannot read policy file" in (store.last_error or "")

    write_policy(path, rule(name="fourth"))
    assert await store.reload() is True
    assert store.current.decide(CI, req()).rule == "fourth"
    assert store.last_error is None


async def test_polling_reports_a_refused_version_once(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write_policy(path, rule())
    store = PolicyStore.load_file(path, reload_interval_seconds=0.01)
    path.write_text("rules: [")
    assert await store.check() is False
    assert await store.check() is False
    assert store.reload_failures == 1
    assert await store.reload() is False  # an explicit reload always reports
    assert store.reload_failures == 2


def test_the_first_load_must_succeed(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules: [{name: x}]")
    with pytest.raises(PolicyError, match=r"rules\[0\]\.subjects: required"):
        PolicyStore.load_file(path)


def configmap_update(root: Path, version: str, content: str) -> None:
    """What the kubelet does: write a new timestamped dir, swap `..data` atomically, clean up."""
    new_dir = root / f"..{version}"
    new_dir.mkdir()
    (new_dir / "policy.yaml").write_text(content)
    data = root / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    tmp = root / "..data_tmp"
    tmp.symlink_to(new_dir.name)
    os.replace(tmp, data)
    if old is not None:
        for child in (root / old).iterdir():
            child.unlink()
        (root / old).rmdir()
    if not (root / "policy.yaml").is_symlink():
        (root / "policy.yaml").symlink_to("..data/policy.yaml")


async def test_polling_follows_a_configmap_symlink_swap(tmp_path: Path) -> None:
    configmap_update(tmp_path, "2024_01_01", yaml.safe_dump({"rules": [rule(name="v1")]}))
    path = tmp_path / "policy.yaml"
    store = await PolicyStore.open_file(path, reload_interval_seconds=0.01)
    task = asyncio.create_task(store.run())
    try:
        configmap_update(tmp_path, "2024_01_02", yaml.safe_dump({"rules": [rule(name="v2")]}))
        await eventually(lambda: store.reload_count == 1)
        assert store.current.decide(CI, req()).rule == "v2"

        configmap_update(tmp_path, "2024_01_03", "rules: [{name: broken}]")
        await eventually(lambda: store.reload_failures == 1)
        assert store.current.decide(CI, req()).rule == "v2"

        configmap_update(tmp_path, "2024_01_04", yaml.safe_dump({"rules": [rule(name="v4")]}))
        await eventually(lambda: store.reload_count == 2)
        assert store.current.decide(CI, req()).rule == "v4"
        assert store.reload_failures == 1
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_sighup_reloads(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write_policy(path, rule(name="before"))
    store = await PolicyStore.open_file(path, reload_interval_seconds=3600)
    remove = reload_on_sighup(asyncio.get_running_loop(), [store])
    try:
        write_policy(path, rule(name="after"))
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: store.reload_count == 1)
        assert store.current.decide(CI, req()).rule == "after"
    finally:
        remove()


def test_a_bad_interval_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write_policy(path, rule())
    with pytest.raises(ValueError):
        PolicyStore.load_file(path, reload_interval_seconds=0)


def test_rules_are_immutable() -> None:
    p = policy()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        p.rules[0].name = "x"  # type: ignore[misc]
