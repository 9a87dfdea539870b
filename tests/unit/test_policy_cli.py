"""`token-broker policy validate` and `token-broker policy explain`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.cli import main
from broker.policy import DEV_POLICY_FILE
from tests.support.cli import REPO, cli_env

GITHUB = "https://token.actions.githubusercontent.com"

POLICY: dict[str, Any] = {
    "rules": [
        {
            "name": "prod",
            "subjects": [{"method": "mtls", "field": "uri", "name": "spiffe://example.org/prod/*"}],
            "namespaces": ["prod"],
            "serviceAccounts": ["*"],
            "audiences": ["vault"],
        },
        {
            "name": "ci-deploys",
            "subjects": [
                {"method": "mtls", "field": "uri", "name": "spiffe://example.org/ci/*"},
                {
                    "method": "jwt",
                    "issuer": GITHUB,
                    "name": "repo:example/app:*",
                    "claims": {"ref": ["refs/heads/main", "refs/tags/*"]},
                },
            ],
            "namespaces": ["ci"],
            "serviceAccounts": ["deployer"],
            "audiences": ["vault", "sts"],
            "defaultAudiences": ["vault"],
            "defaultExpiration": "10m",
            "maxExpiration": "1h",
        },
    ]
}
CI = ["--subject", "spiffe://example.org/ci/runner"]


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def explain(capsys: pytest.CaptureFixture[str], policy: Path, *argv: str) -> tuple[int, str, str]:
    return run(capsys, "policy", "explain", "--policy", str(policy), *argv)


# --- validate ----------------------------------------------------------------------------------


def test_validate_a_good_file(capsys: pytest.CaptureFixture[str], policy_file: Path) -> None:
    code, out, err = run(capsys, "policy", "validate", str(policy_file))
    assert (code, out, err) == (0, f"{policy_file}: valid, 2 rules\n", "")


def test_validate_names_the_bad_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    data = yaml.safe_load(yaml.safe_dump(POLICY))
    data["rules"][1]["maxExpiration"] = "5m"
    data["rules"][0]["serviceAcounts"] = ["x"]
    path.write_text(yaml.safe_dump(data))
    code, out, err = run(capsys, "policy", "validate", str(path))
    assert code == 1 and out == ""
    assert err.startswith(f"error: invalid policy {path}:")
    assert "rules[0].serviceAcounts: Extra inputs are not permitted" in err
    assert "rules[1].maxExpiration: 300s is less than" in err


def test_validate_unreadable_and_invalid_yaml(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "policy", "validate", str(tmp_path / "missing.yaml"))
    assert code == 1 and "cannot read policy file" in err
    (tmp_path / "x.yaml").write_text("rules: [")
    code, _, err = run(capsys, "policy", "validate", str(tmp_path / "x.yaml"))
    assert code == 1 and "is not valid YAML" in err


def test_validate_the_dev_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "validate", str(DEV_POLICY_FILE))
    assert code == 0 and out.endswith("valid, 1 rule\n")


# --- explain -----------------------------------------------------------------------------------


def test_explain_allowed(capsys: pytest.CaptureFixture[str], policy_file: Path) -> None:
    code, out, err = explain(capsys, policy_file, *CI, "-n", "ci", "deployer")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "allowed"
    assert "reason:     ALLOWED" in lines
    assert "rule:       ci-deploys" in lines
    assert "caller:     mtls:uri:spiffe://example.org/ci/runner" in lines
    assert "audiences:  vault" in lines
    assert "expiration: 600s" in lines
    assert "  [0] prod: does not match" in lines
    assert "  [1] ci-deploys: matches, decides" in lines
    assert "        - namespace 'ci' does not match ['prod']" in lines


def test_explain_denied_without_a_matching_rule(
    capsys: pytest.CaptureFixture[str], policy_file: Path
) -> None:
    code, out, _ = explain(
        capsys, policy_file, "--subject", "bot", "--method", "apiKey", "-n", "ci", "deployer"
    )
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "denied"
    assert "reason:     NO_MATCHING_RULE" in lines
    assert "rule:       (none matched)" in lines
    assert "  [1] ci-deploys: does not match" in lines
    assert any("subjects[1]: method is apiKey, not jwt" in line for line in lines)


def test_explain_denied_by_the_deciding_rule(
    capsys: pytest.CaptureFixture[str], policy_file: Path
) -> None:
    code, out, _ = explain(
        capsys, policy_file, *CI, "-n", "ci", "deployer", "--audience", "other", "--dry-run"
    )
    assert code == 1
    # Dry run is checked before audiences.
    assert "reason:     DRY_RUN_NOT_ALLOWED" in out.splitlines()
    code, out, _ = explain(capsys, policy_file, *CI, "-n", "ci", "deployer", "--audience", "x")
    assert code == 1
    assert "reason:     AUDIENCE_NOT_ALLOWED" in out.splitlines()
    assert 'message:    audience "x" is not allowed for this service account' in out.splitlines()


def test_explain_cap_warning(capsys: pytest.CaptureFixture[str], policy_file: Path) -> None:
    code, out, _ = explain(
        capsys, policy_file, *CI, "-n", "ci", "deployer", "--duration", "2h", "--audience", "sts"
    )
    assert code == 0
    lines = out.splitlines()
    assert "audiences:  sts" in lines
    assert "expiration: 3600s" in lines
    assert "warning:    requested expiration of 7200 seconds shortened to 3600 seconds" in lines
    assert "request:    ci/deployer, audiences sts, expiration 7200s" in lines


def test_explain_jwt_with_claims(capsys: pytest.CaptureFixture[str], policy_file: Path) -> None:
    jwt = ["--subject", "repo:example/app:ref:refs/tags/v1", "--method", "jwt"]
    ok = [*jwt, "--issuer", GITHUB, "--claim", "ref=refs/tags/v1", "-n", "ci", "deployer"]
    code, out, _ = explain(capsys, policy_file, *ok)
    assert code == 0, out
    bad_ref = [*jwt, "--issuer", GITHUB, "--claim", "ref=refs/heads/dev", "-n", "ci", "deployer"]
    code, out, _ = explain(capsys, policy_file, *bad_ref)
    assert code == 1
    assert "claim 'ref' ('refs/heads/dev') does not match" in out
    # A repeated claim is a list claim: one matching element is enough.
    listed = [*bad_ref, "--claim", "ref=refs/heads/main"]
    assert explain(capsys, policy_file, *listed)[0] == 0


def test_explain_bound_object(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    data = yaml.safe_load(yaml.safe_dump(POLICY))
    data["rules"][1]["boundObject"] = {"required": True, "kinds": ["Pod"]}
    path.write_text(yaml.safe_dump(data))
    code, out, _ = explain(capsys, path, *CI, "-n", "ci", "deployer")
    assert code == 1 and "reason:     BOUND_OBJECT_REQUIRED" in out.splitlines()
    code, out, _ = explain(capsys, path, *CI, "-n", "ci", "deployer", "--bound-object-kind", "Pod")
    assert code == 0, out
    code, out, _ = explain(
        capsys, path, *CI, "-n", "ci", "deployer", "--bound-object-kind", "Secret"
    )
    assert code == 1 and "reason:     BOUND_KIND_NOT_ALLOWED" in out.splitlines()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "jwt", "--subject", "x"], "--issuer is required with --method jwt"),
        (["--subject", "x", "--issuer", "i"], "--issuer and --claim are only for --method jwt"),
        (
            ["--method", "jwt", "--subject", "x", "--issuer", "i", "--claim", "novalue"],
            "--claim novalue: expected KEY=VALUE",
        ),
        ([*CI, "--duration", "1.5s"], "--duration cannot be expressed in units less than"),
        ([*CI, "--bound-object-kind", "Job"], "supported --bound-object-kind values are"),
        ([*CI, "--duration", "5m"], "may not specify a duration less than 10 minutes"),
    ],
)
def test_explain_usage_errors(
    capsys: pytest.CaptureFixture[str], policy_file: Path, argv: list[str], message: str
) -> None:
    code, out, err = explain(capsys, policy_file, *argv, "-n", "ci", "deployer")
    assert code == 2 and out == ""
    assert message in err


def test_explain_an_invalid_request_or_policy(
    capsys: pytest.CaptureFixture[str], policy_file: Path, tmp_path: Path
) -> None:
    code, _, err = explain(capsys, policy_file, *CI, "-n", "Not_A_Label", "deployer")
    assert code == 2 and "the broker would refuse this request before its policy" in err
    assert "namespace: Invalid value" in err
    (tmp_path / "bad.yaml").write_text("rules: [{name: x}]")
    code, _, err = explain(capsys, tmp_path / "bad.yaml", *CI, "-n", "ci", "deployer")
    assert code == 2 and "rules[0].subjects: required" in err


def test_explain_with_an_empty_policy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("rules: []\n")
    code, out, _ = explain(capsys, tmp_path / "empty.yaml", *CI, "-n", "ci", "deployer")
    assert code == 1
    assert "  (none: the policy denies everything)" in out.splitlines()


def test_explain_help_documents_the_subject(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["policy", "explain", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--method (default mtls)" in out
    assert "0 allowed" in out


def test_the_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "policy", "validate", str(DEV_POLICY_FILE)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("valid, 1 rule\n")
