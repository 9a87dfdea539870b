"""What a new user reads before running anything: the README's own examples do what the README
says (its example policy, `policy validate`, `policy explain`), its configuration table lists
every flag of `serve`, the repository's Markdown links lead to files in the repository, and
`--help` reads right (no "80%%", no internal jargon, the emulator's real command name).

The README's examples are found by their content (the later documentation site runs them
too); a test here fails when an example and what the code does part ways.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import trustme

from broker.cli import build_parser, main
from broker.emulator.__main__ import _parser as emulator_parser
from tests.support.certs import client_cert
from tests.support.cli import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def fenced(language: str, containing: str) -> str:
    """The README's first fenced block of `language` that contains `containing`."""
    for lang, body in FENCE.findall(README):
        if lang == language and containing in body:
            return str(body)
    raise AssertionError(f"no ```{language} block with {containing!r} in the README")


def commands(block: str) -> list[list[str]]:
    """The commands of a ```sh block: comments dropped, continued lines joined, split like a
    shell (no variables or quoting beyond plain words in these examples)."""
    text = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [line.split() for line in lines if line]


@pytest.fixture
def readme_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(fenced("yaml", "- name: ci-deploys"))
    return path


@pytest.fixture
def policy_commands() -> list[list[str]]:
    found = commands(fenced("sh", "token-broker policy validate policy.yaml"))
    assert [c[:3] for c in found] == [["token-broker", "policy", "validate"]] + 3 * [
        ["token-broker", "policy", "explain"]
    ]
    return found


def run(
    capsys: pytest.CaptureFixture[str], argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    assert argv[0] == "token-broker"
    code = main(argv[1:])
    out, err = capsys.readouterr()
    return code, out + err


def test_policy_validate_prints_what_the_readme_says(
    readme_policy: Path,
    policy_commands: list[list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block = fenced("sh", "token-broker policy validate policy.yaml")
    [promised] = re.findall(r'exit 0: "([^"]+)"', block)
    code, out = run(capsys, policy_commands[0], readme_policy.parent, monkeypatch)
    assert (code, out) == (0, promised + "\n")


def test_policy_explain_examples_decide_as_the_readme_says(
    readme_policy: Path,
    policy_commands: list[list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The certificate the second example stands for: a SPIFFE ID under ci/.
    cert, _ = client_cert(trustme.CA(), uris=("spiffe://example.org/ci/runner",))
    (readme_policy.parent / "client.crt").write_bytes(cert)
    jwt_caller, certificate, dns_name = policy_commands[1:]

    code, out = run(capsys, jwt_caller, readme_policy.parent, monkeypatch)
    assert code == 0 and out.startswith("allowed\n"), out
    assert "expiration: 3600s" in out  # the 2h asked for, capped by maxExpiration
    code, out = run(capsys, certificate, readme_policy.parent, monkeypatch)
    assert code == 0 and out.startswith("allowed\n"), out
    # Denied on purpose, as the README says, and why.
    code, out = run(capsys, dns_name, readme_policy.parent, monkeypatch)
    assert code == 1 and "reason:     NO_MATCHING_RULE" in out, out
    assert "the certificate has no URI SAN" in out


def serve_flags() -> set[str]:
    parser = build_parser()
    commands_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands_action.choices["serve"]
    return {s for a in serve._actions for s in a.option_strings if s.startswith("--")}


def test_the_configuration_table_lists_every_flag_of_serve() -> None:
    table = README.split("### Configuration reference", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    flags_column = " ".join(row.rstrip(" |").rsplit("|", 1)[1] for row in rows)
    # Not settings: --help, the file itself, the number of processes (`serve --workers`).
    missing = serve_flags() - {"--help", "--config", "--workers"}
    missing = {flag for flag in missing if f"`{flag}`" not in flags_column}
    assert not missing, missing
    [admin] = [row for row in rows if row.startswith("| `admin.listen` |")]
    assert "`--admin-listen`" in admin


MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "document",
    [
        "README.md",
        "CHANGELOG.md",
        "broker/emulator/README.md",
        *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
    ],
)
def test_relative_links_lead_to_files_in_the_repository(document: str) -> None:
    path = REPO / document
    broken = []
    for target in MARKDOWN_LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same document
        file = (path.parent / target.split("#", 1)[0]).resolve()
        if not file.exists() or REPO.resolve() not in file.parents:
            broken.append(target)
    assert not broken, broken


def test_the_emulator_readme_names_no_file_outside_the_repository() -> None:
    text = (REPO / "broker/emulator/README.md").read_text(encoding="utf-8")
    assert "shared/reference" not in text  # the project's reference notes are not shipped
    assert "https://github.com/kubernetes/kubernetes/blob/v1.30.0/" in text


# --- --help ------------------------------------------------------------------------------------


def every_parser() -> list[argparse.ArgumentParser]:
    parser = build_parser()
    found = [parser, emulator_parser()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.append(sub)
                found += [
                    nested
                    for nested_action in sub._actions
                    if isinstance(nested_action, argparse._SubParsersAction)
                    for nested in nested_action.choices.values()
                ]
    return found


def test_help_texts_read_right() -> None:
    for parser in every_parser():
        text = parser.format_help()
        assert "%%" not in text, parser.prog  # argparse does not %-format descriptions
        assert "rule 8" not in text, parser.prog
    texts = {p.prog: p.format_help() for p in every_parser()}
    assert "refresh them at 80% of" in texts["token-broker agent"]
    assert "until 80% of their lifetime" in " ".join(texts["token-broker exec-credential"].split())


def test_the_emulator_is_named_as_it_is_run() -> None:
    text = emulator_parser().format_help()
    assert text.startswith("usage: token-broker emulator ")
    assert "maximum token expiration" in " ".join(text.split())
