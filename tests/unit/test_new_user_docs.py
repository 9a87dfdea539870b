"""What a new user reads before running anything: the docs' own policy examples do what the
docs say (the example policy, `policy validate`, `policy explain`), the configuration reference
lists every flag of `serve`, the repository's Markdown links lead to files in the repository,
and `--help` reads right (no "80%%", no internal jargon, the emulator's real command name).

The policy examples are found by their markers in docs/policy.md (the docs' example tests run
them against dev mode too); a test here fails when an example and what the code does part ways.
"""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from broker.cli import build_parser, main
from broker.emulator.__main__ import _parser as emulator_parser
from tests.support.cli import REPO

POLICY_PAGE = (REPO / "docs" / "policy.md").read_text(encoding="utf-8")
# A generated example of docs/policy.md: its test marker, its command, and what it printed.
EXAMPLE = re.compile(
    r"<!-- test: dev; exit (\d+) -->\n```sh\n(.*?)```\n\n```text\n(.*?)```", re.DOTALL
)


def test_the_policy_page_uses_the_example_file() -> None:
    """The page shows docs/examples/policy.yaml itself (the text and the file are one)."""
    example = (REPO / "docs" / "examples" / "policy.yaml").read_text(encoding="utf-8")
    assert f"```yaml\n{example.rstrip()}\n```" in POLICY_PAGE
    assert "- name: ci-deploys" in example


def test_policy_examples_print_what_the_docs_show(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`policy validate` and each `policy explain` of docs/policy.md, run as written from the
    repository's root, exit and print as the page says (was: "valid, 3 rules" for a policy of
    one rule, and an example its own policy denied)."""
    found = EXAMPLE.findall(POLICY_PAGE)
    assert len(found) >= 4, found
    monkeypatch.chdir(REPO)
    for exit_code, command, output in found:
        argv = shlex.split(command.replace("\\\n", " "))
        assert argv[0] == "token-broker"
        code = main(argv[1:])
        out, err = capsys.readouterr()
        assert (code, out + err) == (int(exit_code), output), command
    outputs = [output for _, _, output in found]
    assert outputs[0].endswith(": valid, 1 rule\n")
    assert any("reason:     NO_MATCHING_RULE" in out for out in outputs)
    assert any("expiration: 3600s" in out for out in outputs)  # the 2h asked for, capped


def serve_flags() -> set[str]:
    parser = build_parser()
    commands_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands_action.choices["serve"]
    return {s for a in serve._actions for s in a.option_strings if s.startswith("--")}


def test_the_configuration_reference_lists_every_flag_of_serve() -> None:
    """docs/configuration.md's generated table names every flag of `serve` (it lacked
    --admin-listen when it was written by hand)."""
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = text.split("<!-- BEGIN GENERATED: settings -->")[1].split("<!-- END GENERATED")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    flags_column = " ".join(row.split(" | ")[3] for row in rows)
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
