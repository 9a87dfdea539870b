"""Hardening: certificate-name confusion, in-process. The SPIFFE ID rules of broker.spiffe table
by table, mtls subjects checked when a policy is loaded, and `token-broker policy validate` /
`explain` on certificate names. Through the real stack (a BrokerServer with mutual TLS):
tests/e2e/test_hardening_mtls_names.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.cli import main
from broker.identity import Identity
from broker.policy import Policy, PolicyError
from broker.policy_reload import PolicyStore
from broker.spiffe import SpiffePattern, spiffe_id_problem
from tests.support.certs import client_cert, rule
from tests.support.cli import issue
from tests.support.stack import NAMESPACE, SERVICE_ACCOUNT, create_request

# --- SPIFFE IDs and patterns ----------------------------------------------------------------------


VALID_IDS = [
    "spiffe://example.org",
    "spiffe://example.org/ci/runner",
    "spiffe://a-b_c.1/x.y/Z-9_/...",  # '...' is a name, not a relative segment
    "spiffe://" + "t" * 255 + "/p",
]
INVALID_IDS = {
    "spiffe://example.org/": "an empty path segment",
    "spiffe://example.org//x": "an empty path segment",
    "spiffe://example.org/ci/../admin": "a '..' path segment",
    "spiffe://example.org/./x": "a '.' path segment",
    "spiffe://example.org/%2e": "percent-encoding is not allowed",
    "spiffe://example.org/a?b": "only letters, digits",
    "spiffe://example.org/a#b": "only letters, digits",
    "spiffe://example.org:8443/a": "trust domain 'example.org:8443'",
    "spiffe://user@example.org/a": "trust domain 'user@example.org'",
    "spiffe://Example.org/a": "trust domain 'Example.org'",
    "spiffe:///a": "no trust domain",
    "SPIFFE://example.org/a": "starts with spiffe://",
    "spiffe:example.org": "starts with spiffe://",
    "https://example.org/a": "starts with spiffe://",
    "spiffe://" + "t" * 256: "longer than 255 characters",
    "spiffe://example.org/" + "p" * 2048: "longer than 2048 bytes",
}


@pytest.mark.parametrize("spiffe_id", VALID_IDS)
def test_valid_spiffe_ids(spiffe_id: str) -> None:
    assert spiffe_id_problem(spiffe_id) is None


@pytest.mark.parametrize(("spiffe_id", "problem"), INVALID_IDS.items(), ids=list(INVALID_IDS))
def test_invalid_spiffe_ids_say_why(spiffe_id: str, problem: str) -> None:
    found = spiffe_id_problem(spiffe_id)
    assert found is not None and problem in found, found


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        (
            "spiffe://example.org/ci/*",
            ["spiffe://example.org/ci/runner", "spiffe://example.org/ci/a.b"],
            ["spiffe://example.org/ci/a/b", "spiffe://example.org/ci", "spiffe://other.org/ci/x"],
        ),
        (
            "spiffe://example.org/ci/run*/x",
            ["spiffe://example.org/ci/run/x", "spiffe://example.org/ci/runner-1/x"],
            ["spiffe://example.org/ci/runner/y/x", "spiffe://example.org/ci/other/x"],
        ),
        (
            "spiffe://example.org/ns/**/sa/deployer",
            ["spiffe://example.org/ns/a/sa/deployer", "spiffe://example.org/ns/a/b/sa/deployer"],
            ["spiffe://example.org/ns/sa/deployer", "spiffe://example.org/ns/a/sa/other"],
        ),
        (
            "spiffe://example.org",
            ["spiffe://example.org"],
            ["spiffe://example.org/x", "spiffe://example.org.evil"],
        ),
    ],
)
def test_patterns_match_per_segment(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    compiled = SpiffePattern.parse(pattern)
    for spiffe_id in matching + not_matching:
        assert spiffe_id_problem(spiffe_id) is None, spiffe_id
    assert [compiled.matches(i) for i in matching] == [True] * len(matching)
    assert [compiled.matches(i) for i in not_matching] == [False] * len(not_matching)


@pytest.mark.parametrize(
    ("subject", "error"),
    [
        (
            {"method": "mtls", "name": "spiffe://example.org/ci/../*"},
            "rules[0].subjects[0].name: 'spiffe://example.org/ci/../*' is not a SPIFFE ID "
            "pattern: a '..' path segment",
        ),
        (
            {"method": "mtls", "name": "spiffe://*.example.org/ci"},
            "is not a SPIFFE ID pattern: trust domain '*.example.org'",
        ),
        ({"method": "mtls", "name": "spiffe://example.org/a**"}, "'**' is a whole segment"),
        ({"method": "mtls", "name": "spiffe://example.org/**/x/**"}, "'**' may appear once"),
        ({"method": "mtls", "name": "spiffe://example.org/ci/"}, "an empty path segment"),
        ({"method": "mtls", "name": "SPIFFE://example.org/ci"}, "starts with spiffe://"),
        ({"method": "mtls", "name": "spiffe://example.org/%2e"}, "percent-encoding"),
        (
            {"method": "mtls", "field": "dns", "name": "spiffe://example.org/ci/*"},
            "only a URI SAN holds a SPIFFE ID, so it cannot match field dns",
        ),
        (
            {"method": "apiKey", "field": "cn", "name": "x"},
            "rules[0].subjects[0].field: only mtls subjects have a certificate field",
        ),
        ({"method": "mtls", "field": "email", "name": "x"}, "rules[0].subjects[0].field: Input"),
    ],
)
def test_bad_subjects_are_refused_at_load(subject: dict[str, Any], error: str) -> None:
    with pytest.raises(PolicyError) as err:
        Policy.from_dict({"rules": [rule("r", subject)]})
    assert error in str(err.value)


def test_other_methods_keep_plain_globs() -> None:
    # A jwt `sub` or an API key name that looks like a SPIFFE ID is an ordinary glob.
    p = Policy.from_dict({"rules": [rule("r", {"method": "apiKey", "name": "spiffe://x/*"})]})
    assert p.decide(Identity(method="apiKey", name="spiffe://x/a/b"), create_request()).allowed


# --- policy validate / explain --------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_warns_about_rules_whose_meaning_changed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    rules = [
        rule(
            "old-style",
            {"method": "mtls", "name": "spiffe://example.org/ci/*"},
            {"method": "mtls", "name": "legacy-*"},
            {"method": "mtls", "name": "urn:example:*"},  # a URI: meant for the URI SAN
            {"method": "mtls", "name": "spiffe://example.org/exact"},
        ),
        rule(
            "new-style",
            {"method": "mtls", "field": "uri", "name": "spiffe://example.org/ci/*"},
            {"method": "mtls", "field": "cn", "name": "legacy-*"},
            {"method": "apiKey", "name": "legacy-*"},
        ),
    ]
    path.write_text(yaml.safe_dump({"rules": rules}))
    code, out, err = run(capsys, "policy", "validate", str(path))
    assert (code, out) == (0, f"{path}: valid, 2 rules\n")
    warnings = err.splitlines()
    assert warnings == [
        "warning: rules[0].subjects[0] (rule old-style): '*' in 'spiffe://example.org/ci/*' now "
        "matches within one path segment (it matched across '/' before, e.g. nested IDs): "
        "write '**' as a segment for any depth; add `field: uri` to confirm",
        "warning: rules[0].subjects[1] (rule old-style): name 'legacy-*' matched the "
        "certificate's URI SAN, else its first DNS SAN, else its CN; it now matches the URI "
        "SAN only: for a DNS SAN or the CN write this subject with `field: dns` or `field: cn` "
        "(one subject per field); add `field: uri` to keep the URI SAN only",
    ]


def test_the_broker_logs_the_warnings_when_it_loads_a_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"rules": [rule("r", {"method": "mtls", "name": "ci-*"})]}))
    caplog.set_level(logging.WARNING, logger="broker.policy")
    PolicyStore.load_file(path)
    [record] = [r for r in caplog.records if r.name == "broker.policy"]
    assert record.getMessage().startswith(
        f"policy {path}: rules[0].subjects[0] (rule r): name 'ci-*' matched the certificate's "
        "URI SAN, else its first DNS SAN, else its CN; it now matches the URI SAN only"
    )


def test_the_shipped_policies_have_no_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    for path in (root / "broker" / "dev-policy.yaml", root / "tests/data/core-policy.yaml"):
        code, _, err = run(capsys, "policy", "validate", str(path))
        assert (code, err) == (0, ""), path
    chart = yaml.safe_load((root / "helm/examples/values-production.yaml").read_text())
    assert Policy.from_dict({"rules": chart["policy"]["rules"]}).warnings == ()


def write_cert(tmp_path: Path, name: str, **names: Any) -> Path:
    pem, _ = client_cert(issue(tmp_path, f"ca-{name}", "ca.example").ca, **names)
    path = tmp_path / f"{name}.pem"
    path.write_bytes(pem)
    return path


@pytest.fixture
def explain_policy(tmp_path: Path) -> Path:
    path = tmp_path / "explain.yaml"
    rules = [
        rule("spiffe", {"method": "mtls", "field": "uri", "name": "spiffe://example.org/ci/*"}),
        rule("by-dns", {"method": "mtls", "field": "dns", "name": "*.runners.example"}),
    ]
    path.write_text(yaml.safe_dump({"rules": rules}))
    return path


def explain(capsys: pytest.CaptureFixture[str], policy: Path, *caller: str) -> tuple[int, str]:
    code, out, err = run(
        capsys, "policy", "explain", "--policy", str(policy), *caller, "-n", NAMESPACE,
        SERVICE_ACCOUNT,
    )  # fmt: skip
    assert err == ""
    return code, out


def test_explain_a_certificate_shows_the_field_that_matched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, explain_policy: Path
) -> None:
    cert = write_cert(
        tmp_path, "svid", uris=("spiffe://example.org/ci/runner",), cn="spiffe://example.org/x"
    )
    code, out = explain(capsys, explain_policy, "--certificate", str(cert))
    lines = out.splitlines()
    assert code == 0 and lines[0] == "allowed"
    assert "caller:     mtls:uri:spiffe://example.org/ci/runner" in lines
    assert (
        "certificate: URI SAN 'spiffe://example.org/ci/runner' (a SPIFFE ID); "
        "subject CN 'spiffe://example.org/x'" in lines
    )
    assert "  [0] spiffe: matches, decides" in lines
    assert (
        "        + subjects[0]: SPIFFE ID 'spiffe://example.org/ci/runner' matches "
        "'spiffe://example.org/ci/*' (certificate field: uri)" in lines
    )

    code, out = explain(
        capsys, explain_policy, "--subject", "build.runners.example", "--field", "dns"
    )
    lines = out.splitlines()
    assert code == 0 and "  [1] by-dns: matches, decides" in lines
    assert (
        "        + subjects[0]: DNS SAN 'build.runners.example' matches '*.runners.example' "
        "(certificate field: dns)" in lines
    )


def test_explain_says_why_a_confusable_certificate_does_not_match(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, explain_policy: Path
) -> None:
    cn_only = write_cert(tmp_path, "cn", cn="spiffe://example.org/ci/evil")
    code, out = explain(capsys, explain_policy, "--certificate", str(cn_only))
    assert code == 1 and out.splitlines()[0] == "denied"
    assert "caller:     mtls:cn:spiffe://example.org/ci/evil" in out
    assert (
        "subjects[0]: the certificate has no URI SAN (its subject CN "
        "'spiffe://example.org/ci/evil' is not a URI SAN: a SPIFFE ID pattern matches only a "
        "URI SAN)" in out
    )
    dotdot = write_cert(tmp_path, "dotdot", uris=("spiffe://example.org/ci/../admin",))
    code, out = explain(capsys, explain_policy, "--certificate", str(dotdot))
    assert code == 1
    assert (
        "URI SAN 'spiffe://example.org/ci/../admin' is not a SPIFFE ID: a '..' path segment" in out
    )
    nested = write_cert(tmp_path, "nested", uris=("spiffe://example.org/ci/a/b",))
    code, out = explain(capsys, explain_policy, "--certificate", str(nested))
    assert code == 1
    assert (
        "SPIFFE ID 'spiffe://example.org/ci/a/b' does not match 'spiffe://example.org/ci/*'" in out
    )
    # A CN that a dns subject's glob would match: the hint says what to write.
    code, out = explain(capsys, explain_policy, "--subject", "x.runners.example", "--field", "cn")
    assert code == 1
    assert (
        "the certificate has no DNS SAN (its subject CN 'x.runners.example' would need "
        "`field: cn`)" in out
    )


def test_explain_flag_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, explain_policy: Path
) -> None:
    cert = write_cert(tmp_path, "c", cn="x")
    nameless = write_cert(tmp_path, "nameless")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for argv, message in [
        (["--certificate", str(cert), "--subject", "x"], "--certificate is the whole mtls caller"),
        (["--certificate", str(cert), "--method", "jwt"], "--certificate is the whole mtls caller"),
        (["--certificate", str(not_pem)], "not a PEM certificate"),
        (["--certificate", str(tmp_path / "missing.pem")], "No such file"),
        (["--certificate", str(nameless)], "no URI SAN, DNS SAN or CN"),
        (["--subject", "x", "--method", "apiKey", "--field", "dns"], "--field is only for"),
        ([], "--subject or --certificate is required"),
    ]:
        code, out, err = run(
            capsys, "policy", "explain", "--policy", str(explain_policy), *argv,
            "-n", NAMESPACE, SERVICE_ACCOUNT,
        )  # fmt: skip
        assert (code, out) == (2, ""), argv
        assert message in err, (argv, err)
