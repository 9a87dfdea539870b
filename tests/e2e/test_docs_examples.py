"""Examples that are run, not just written: every shell block (and code snippet: Python, Go,
JavaScript) of the README and of the docs' pages is marked, and the marked ones are run against
a real dev-mode broker.

Such a block (```sh, bash, shell, console, python, go, js) is preceded by one of

    <!-- test: dev -->                          run it against dev mode: exit 0
    <!-- test: dev; exit 1; expect "TEXT" -->   its exit status, and text its output must hold
    <!-- test: none (why) -->                   not run here (a real cluster, a container
                                                engine, the suite itself), and why

and a block without a marker fails `test_every_shell_block_is_marked`, so nobody adds an
untested one. The dev-mode blocks run in bash (`set -e -o pipefail`; Python blocks in the
virtualenv's python) from the repository's root with the virtualenv's tools first on PATH, one
after the other against one `token-broker serve --dev` started here on free ports. What the
docs write for dev mode's own values is rewritten to this broker's: the directory
`/tmp/token-broker-dev-XXXX`, the gRPC address `127.0.0.1:50051`, the admin address
`127.0.0.1:8082`, and `/path/to/checkout`.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.cli import REPO, Process, Spawn
from tests.support.client import run_command
from tests.support.suite_secrets import SUITE

BIN = Path(sys.executable).absolute().parent
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
SHELL = {"sh", "bash", "shell", "console"}
# Code blocks that must be marked too: shell blocks run in bash, Python blocks in the
# virtualenv's python (a Go sketch can only be marked `none`: there is no Go toolchain here).
MARKED = SHELL | {"python", "go", "javascript", "js"}
MARKER = re.compile(r"^<!-- test: (dev|none)\b(.*?)-->$")
FENCE = re.compile(r"^```(\S*)")
# What the docs write for dev mode's own values.
DEV_DIR = "/tmp/token-broker-dev-XXXX"
GRPC_ADDRESS = "127.0.0.1:50051"
ADMIN_ADDRESS = "127.0.0.1:8082"
HTTP_ADDRESS = "127.0.0.1:8444"
CHECKOUT = "/path/to/checkout"


@dataclass
class Example:
    where: str  # document:line of the block's opening fence
    kind: str  # "dev", "none" or "" (no marker)
    code: str
    exit_status: int = 0
    expect: list[str] = field(default_factory=list)
    reason: str = ""
    language: str = "sh"


def examples() -> list[Example]:
    """Every shell block of the README and the docs, with its marker's instructions."""
    found = []
    for document in DOCUMENTS:
        lines = (REPO / document).read_text(encoding="utf-8").splitlines()
        in_fence, previous = False, ""
        for number, line in enumerate(lines, 1):
            fence = FENCE.match(line)
            if fence and not in_fence:
                in_fence = True
                if fence.group(1) in MARKED:
                    end = next(i for i in range(number, len(lines)) if lines[i].startswith("```"))
                    example = parse(f"{document}:{number}", previous, lines[number:end])
                    example.language = fence.group(1)
                    found.append(example)
                continue
            if fence and in_fence:
                in_fence = False
                continue
            if not in_fence and line.strip():
                previous = line.strip()
    return found


def parse(where: str, marker_line: str, body: list[str]) -> Example:
    example = Example(where, "", "\n".join(body) + "\n")
    marker = MARKER.match(marker_line)
    if marker is None:
        return example
    example.kind, rest = marker.group(1), marker.group(2).strip()
    if example.kind == "none":
        example.reason = rest.strip("()")
        return example
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        word, _, value = part.partition(" ")
        if word == "exit":
            example.exit_status = int(value)
        elif word == "expect":
            example.expect.append(str(shlex.split(value)[0]))
        else:
            raise AssertionError(f"{where}: unknown marker instruction {part!r}")
    return example


def test_every_shell_block_is_marked() -> None:
    everything = examples()
    unmarked = [e.where for e in everything if not e.kind]
    assert not unmarked, (
        "shell blocks without a <!-- test: dev --> or <!-- test: none (why) --> marker: "
        + ", ".join(unmarked)
    )
    assert all(e.reason for e in everything if e.kind == "none"), "a `none` marker says why"
    # The list of both, for whoever reads the test's output (pytest -s).
    for example in everything:
        print(f"{example.kind:4} {example.where} {example.reason}")
    run = [e for e in everything if e.kind == "dev"]
    # The README's tour, and the commands the issue names: token, grpcurl, policy
    # validate/explain, the kubectl credential plugin, the agent, /metrics.
    assert sum(e.where.startswith("README.md") for e in run) >= 4
    for command in ("token-broker token", "grpcurl", "policy validate", "policy explain"):
        assert any(command in e.code for e in run), command
    for command in ("kubectl get", "agent --config", "/metrics", "exec-credential"):
        assert any(command in e.code for e in run), command


def rewrite(code: str, dev_dir: str, addresses: DevAddresses) -> str:
    for placeholder, value in (
        (DEV_DIR, dev_dir),
        (GRPC_ADDRESS, addresses.grpc),
        (ADMIN_ADDRESS, addresses.admin),
        (HTTP_ADDRESS, addresses.http),
        ("localhost:8082", addresses.admin),
        (CHECKOUT, str(REPO)),
    ):
        code = code.replace(placeholder, value)
    return code


@dataclass
class DevAddresses:
    grpc: str
    admin: str
    http: str


async def start_dev(spawn: Spawn) -> tuple[Process, str, DevAddresses]:
    """dev mode on free ports: (the process, its directory, its addresses)."""
    process = await spawn("serve", "--dev", "--listen", "127.0.0.1:0")
    await process.wait_for("stops the broker and the emulator")
    banner = "".join(process.stdout)
    grpc_address = re.search(r"^broker:\s+(\S+) and unix:", banner, re.MULTILINE)
    api_key = re.search(r"the API key in (\S+)/api-key$", banner, re.MULTILINE)
    admin = re.search(r"^admin:\s+http://(\S+) ", banner, re.MULTILINE)
    http = re.search(r"^http door:\s+https://(\S+) ", banner, re.MULTILINE)
    assert grpc_address and api_key and admin and http, banner
    addresses = DevAddresses(grpc_address.group(1), admin.group(1), http.group(1))
    return process, api_key.group(1), addresses


async def test_the_docs_examples_run_against_dev_mode(spawn: Spawn, tmp_path: Path) -> None:
    """Each `test: dev` block, as a user pastes it, against one dev-mode broker: its exit status
    and the text it must print. All blocks run; the failures are reported together."""
    process, dev_dir, addresses = await start_dev(spawn)
    env = {
        "HOME": str(tmp_path),  # the credential plugin's cache, kubectl's files
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
    }
    failures = []
    ran = 0
    for example in examples():
        if example.kind != "dev":
            continue
        code = rewrite(example.code, dev_dir, addresses)
        if example.language == "python":
            argv = [sys.executable, "-c", code]
        else:
            assert example.language in SHELL, f"{example.where}: {example.language} cannot run"
            argv = ["bash", "-e", "-o", "pipefail", "-c", code]
        done = await run_command(argv, env=env, timeout=60, cwd=REPO)
        ran += 1
        SUITE.add("cli stderr", done.stderr)
        # stdout may hold a token: only its expected parts are named, never printed here.
        if done.returncode != example.exit_status:
            failures.append(
                f"{example.where}: exit {done.returncode}, not {example.exit_status}\n"
                f"{done.stderr[-2000:]}"
            )
        missing = [text for text in example.expect if text not in done.stdout + done.stderr]
        if missing:
            failures.append(f"{example.where}: the output lacks {missing}\n{done.stderr[-2000:]}")
    assert ran >= 10
    assert not failures, "\n\n".join(failures)
    assert await process.terminate() == 0
