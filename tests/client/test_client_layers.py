"""The client side as a layer of its own (broker.client, broker.cli):

- what it imports: `import broker.cli` and the kubectl plugin's whole run (a cache miss against
  the real broker) load no server side, kubernetes, redis or pydantic-settings; the import
  contracts of pyproject.toml fail when a module breaks them;
- `token-broker token` through the Python client: its retries (UNAVAILABLE, RetryInfo, within
  --timeout, --max-attempts), its user agent, the error rendering;
- the transport checks written once (ClientConfig), spelled as each front end's user wrote them;
- the rules both sides share: the token lifetime (broker.lifetime) and the backoff
  (broker.backoff), including the agent's backoff after more than a thousand failures.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.backoff import backoff_ceiling, backoff_delay
from broker.cache import token_lifetime
from broker.cli import main
from broker.client import ClientConfig, ClientConfigError, TokenResult
from broker.client.agent import Agent
from broker.client.agent_config import AgentConfigError, parse_agent_config
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.lifetime import lifetime_seconds, refresh_due_at
from tests.support.cli import REPO
from tests.support.client import (
    Fail,
    FakeClock,
    Running,
    ScriptedBroker,
    run_broker_cli,
    run_command,
    sink,
)
from tests.support.stack import CALLER_KEY, NAMESPACE, SERVICE_ACCOUNT, RunningBroker

# What the client side never loads: the server side and its dependencies.
SERVER_SIDE = (
    "kubernetes",
    "pydantic_settings",
    "redis",
    "broker.server",
    "broker.service",
    "broker.config",
    "broker.cache",
    "broker.upstream",
    "broker.policy",
    "broker.emulator",
)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after `statement`."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


def server_side(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in SERVER_SIDE or m in SERVER_SIDE)


def imported_modules(importtime_stderr: str) -> set[str]:
    """The modules `python -X importtime` reported importing."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


# --- what the client side imports ---------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "import broker.cli",
        "import broker.client",
        "import broker.client.exec_credential, broker.client.agent, broker.client.agent_config",
    ],
)
def test_the_client_side_loads_no_server_side(statement: str) -> None:
    assert server_side(loaded_by(statement)) == []


async def test_the_kubectl_plugin_runs_on_the_client_side_only(
    broker: RunningBroker, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(CALLER_KEY)
    plugin = [
        sys.executable, "-X", "importtime", "-m", "broker", "exec-credential", SERVICE_ACCOUNT,
        "-n", NAMESPACE, "--server", broker.address, "--plaintext",
        "--credential-file", str(key_file), "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    # A cache miss (the broker is called, the token cached), then a hit.
    for run in (await run_command(plugin), await run_command(plugin)):
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout)["kind"] == "ExecCredential"
        modules = imported_modules(run.stderr)
        assert "broker.client.exec_credential" in modules
        assert server_side(modules) == []
    # --no-cache: every run a miss.
    run = await run_command([*plugin, "--no-cache"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert server_side(imported_modules(run.stderr)) == []


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "line", "contract", "broken"),
    [
        # The old client's lazy import of the cache's rule.
        (
            "client/messages.py",
            "from broker.cache import token_lifetime",
            "The client side imports nothing of the server side",
            "broker.client is not allowed to import broker.cache",
        ),
        (
            "lifetime.py",
            "import kubernetes",
            "The client side imports nothing of the server side",
            "broker.lifetime is not allowed to import kubernetes",
        ),
        (
            "client/agent_config.py",
            "import pydantic_settings",
            "The client side imports nothing of the server side",
            "broker.client is not allowed to import pydantic_settings",
        ),
        (
            "readiness.py",
            "import broker.emulator",
            "Only dev mode and the CLI import the API-server emulator",
            "broker.readiness is not allowed to import broker.emulator",
        ),
        (
            "server.py",
            "import broker.devmode",
            "Only dev mode and the CLI import the API-server emulator",
            "broker.server is not allowed to import broker.devmode",
        ),
    ],
)
def test_the_import_contracts_fail_when_broken(
    tmp_path: Path, module: str, line: str, contract: str, broken: str
) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "broker", tree / "broker", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tree)
    kept = lint_imports(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    with (tree / "broker" / module).open("a") as file:
        file.write(f"\n{line}  # noqa\n")
    run = lint_imports(tree)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{contract}" in " ".join(run.stdout.split())
    assert broken in run.stdout


# --- token-broker token through the client ------------------------------------------------------


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedBroker]:
    broker = ScriptedBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def token_args(scripted: ScriptedBroker, *extra: str) -> list[str]:
    return ["token", "build-robot", "-n", "demo", "--server", scripted.address, "--plaintext",
            *extra]  # fmt: skip


async def test_token_retries_unavailable_and_sends_the_client_user_agent(
    scripted: ScriptedBroker,
) -> None:
    scripted.script = [Fail(UNAVAILABLE), Fail(UNAVAILABLE, retry_after=0.05)]
    run = await run_broker_cli(*token_args(scripted), credential="tbk_test-credential")
    assert run.returncode == 0, run.stderr
    assert run.stdout == scripted.token
    assert run.stderr == ""
    assert len(scripted.calls) == 3
    for _, metadata in scripted.calls:
        assert metadata["authorization"] == "Bearer tbk_test-credential"
        assert metadata["user-agent"].startswith("token-broker-client/")


async def test_token_retries_a_rate_limit_only_when_it_says_when(
    scripted: ScriptedBroker,
) -> None:
    scripted.script = [Fail(EXHAUSTED, retry_after=0.05)]
    run = await run_broker_cli(*token_args(scripted))
    assert run.returncode == 0, run.stderr
    assert len(scripted.calls) == 2

    scripted.calls.clear()
    scripted.script = [Fail(EXHAUSTED, message="too large")]
    run = await run_broker_cli(*token_args(scripted))
    assert run.returncode == 1
    assert len(scripted.calls) == 1
    assert run.stderr.startswith("error: failed to create token: RESOURCE_EXHAUSTED: too large\n")


async def test_token_max_attempts_1_does_not_retry_and_prints_the_error(
    scripted: ScriptedBroker,
) -> None:
    scripted.script = [Fail(UNAVAILABLE, retry_after=0.5)]
    run = await run_broker_cli(*token_args(scripted, "--max-attempts", "1"))
    assert run.returncode == 1
    assert run.stdout == ""
    assert len(scripted.calls) == 1
    assert run.stderr == (
        "error: failed to create token: UNAVAILABLE: scripted failure\n"
        "  reason: SCRIPTED (domain tokenbroker.dev)\n"
        "  retry after: 0.5s\n"
    )


async def test_token_does_not_wait_past_its_timeout(scripted: ScriptedBroker) -> None:
    # The broker asks for 20 s; --timeout is 2 s: no second call, the delay is shown.
    scripted.script = [Fail(UNAVAILABLE, retry_after=20.0)]
    run = await run_broker_cli(*token_args(scripted, "--timeout", "2s"))
    assert run.returncode == 1
    assert len(scripted.calls) == 1
    assert "  retry after: 20s\n" in run.stderr


async def test_exec_credential_takes_max_attempts_too(
    scripted: ScriptedBroker, tmp_path: Path
) -> None:
    scripted.script = [Fail(UNAVAILABLE)]
    args = ["exec-credential", "build-robot", "-n", "demo", "--server", scripted.address,
            "--plaintext", "--no-cache"]  # fmt: skip
    run = await run_broker_cli(*args, "--max-attempts", "1")
    assert run.returncode == 1 and len(scripted.calls) == 1
    assert "error: failed to get a token from the broker: UNAVAILABLE" in run.stderr
    scripted.script = [Fail(UNAVAILABLE)]
    run = await run_broker_cli(*args)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"]["token"] == scripted.token


# --- the transport checks, written once ---------------------------------------------------------


@pytest.mark.parametrize("command", ["token", "exec-credential"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cert", "/c"], "error: --cert and --key must be given together\n"),
        (
            ["--plaintext", "--cacert", "/ca"],
            "error: --plaintext cannot be combined with --cacert, --cert or --key\n",
        ),
        (
            ["--server", "unix:/run/tb.sock", "--cert", "/c", "--key", "/k"],
            "error: a unix socket is plaintext: no --cacert, --cert or --key\n",
        ),
        (["--max-attempts", "0"], "error: --max-attempts must be at least 1\n"),
    ],
)
def test_connection_flags_are_checked_by_the_client_and_named_as_flags(
    command: str, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "sa", "-n", "demo", *flags]) == 2
    assert capsys.readouterr().err == message


@pytest.mark.parametrize("command", ["token", "exec-credential"])
def test_unreadable_and_empty_files_are_usage_errors_naming_the_flag(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [command, "sa", "-n", "demo", "--server", "127.0.0.1:1", "--no-cache"]
    if command == "token":
        common.remove("--no-cache")
    missing = tmp_path / "missing.crt"
    assert main([*common, "--cacert", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"error: --cacert: cannot read {missing}: No such file or directory\n"
    )
    empty = tmp_path / "credential"
    empty.write_text("\n")
    assert main([*common, "--plaintext", "--credential-file", str(empty)]) == 2
    assert capsys.readouterr().err == f"error: --credential-file: {empty} is empty\n"


def test_the_python_client_and_the_agent_name_their_own_fields() -> None:
    with pytest.raises(ClientConfigError) as info:
        ClientConfig("unix:/run/tb.sock", cert_file=Path("c"), key_file=Path("k"))
    assert str(info.value) == "a unix socket is plaintext: no ca_file, cert_file or key_file"
    assert isinstance(info.value, ValueError)
    with pytest.raises(AgentConfigError) as agent_info:
        parse_agent_config(
            {
                "broker": {"address": "b:1", "plaintext": True, "caFile": "/ca"},
                "sinks": [{"namespace": "a", "serviceAccount": "b", "path": "/tmp/t"}],
            }
        )
    assert "broker: plaintext cannot be combined with caFile, certFile or keyFile" in str(
        agent_info.value
    )


# --- the shared rules: lifetime and backoff -----------------------------------------------------


def jwt_with(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part(claims)}.c2ln"


def token_request(
    *, iat: object = None, created: int | None = None, granted: int | None = None
) -> pb.TokenRequest:
    tr = pb.TokenRequest()
    tr.status.token = jwt_with({} if iat is None else {"iat": iat})
    tr.status.expiration_timestamp.FromSeconds(1_800_003_600)
    if created is not None:
        tr.metadata.creation_timestamp.FromSeconds(created)
    if granted is not None:
        tr.spec.expiration_seconds = granted
    return tr


@pytest.mark.parametrize(
    ("tr", "expected"),
    [
        (token_request(iat=1_800_000_000), 3600.0),
        (token_request(iat=1_800_000_000, created=1_800_000_600, granted=60), 3600.0),
        (token_request(created=1_800_000_600), 3000.0),
        (token_request(granted=1200), 1200.0),
        # Not a NumericDate: the creation timestamp is the issue time.
        (token_request(iat=math.inf, created=1_800_001_200), 2400.0),
        (token_request(iat=1e20, created=1_800_001_200), None),  # iat after exp
        (token_request(iat="1800000000", granted=900), 900.0),
        (token_request(), None),
        (token_request(iat=1_800_003_600), None),  # not positive
    ],
)
def test_the_client_measures_a_lifetime_as_the_cache_does(
    tr: pb.TokenRequest, expected: float | None
) -> None:
    result = TokenResult.from_response(pb.CreateTokenResponse(token_request=tr))
    assert token_lifetime(tr) == expected
    assert result.lifetime_seconds() == expected


def test_lifetime_and_refresh_rule() -> None:
    assert lifetime_seconds(100.0, 40.0, None) == 60.0
    assert lifetime_seconds(100.0, None, 30) == 30.0
    assert lifetime_seconds(100.0, None, None) is None
    assert refresh_due_at(0.0, 1000.0, 0.0) == 800.0
    assert refresh_due_at(0.0, 1000.0, 5.0) == 795.0
    assert refresh_due_at(0.0, 1.0, 10.0) == 0.0  # never before the issue time


def test_backoff_ceiling_and_jitter() -> None:
    ceilings = [backoff_ceiling(n, initial=0.5, maximum=3.0) for n in (1, 2, 3, 4, 5)]
    assert ceilings == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(3, initial=0.5, maximum=3.0, rng=lambda: 0.5) == 1.0
    assert backoff_delay(3, initial=0.5, maximum=3.0, min_fraction=0.5, rng=lambda: 0.0) == 1.0
    # Far past the float range: the cap, not an OverflowError.
    for n in (1025, 10_000, 10**9):
        assert backoff_ceiling(n, initial=1.0, maximum=60.0) == 60.0
        assert backoff_delay(n, initial=1.0, maximum=60.0, multiplier=3, rng=lambda: 1.0) == 60.0


async def test_the_agent_backs_off_after_thousands_of_failures(
    scripted: ScriptedBroker, tmp_path: Path
) -> None:
    """A broker down for a day: the agent keeps retrying at maxBackoffSeconds."""
    scripted.script = [Fail(grpc.StatusCode.PERMISSION_DENIED)] * 2
    config = parse_agent_config(
        {
            "broker": {"address": scripted.address, "plaintext": True},
            "sinks": [sink(tmp_path / "t")],
            "retry": {"initialBackoffSeconds": 1, "maxBackoffSeconds": 60},
        }
    )
    clock = FakeClock()
    running = Running(Agent(config, clock=clock, rng=lambda: 1.0))
    [state] = running.agent.sinks
    try:
        await running.until(lambda: state.attempts == 1)
        state.failures = 5000
        clock.now = state.next_attempt_at
        running.agent.poke()
        await running.agent.wait_until(lambda: state.attempts == 2, timeout=20)
        assert state.failures == 5001
        assert state.next_attempt_at - clock.now == 60.0
        clock.now = state.next_attempt_at
        running.agent.poke()
        await running.until(lambda: state.writes == 1)
        assert (tmp_path / "t").read_text() == scripted.token
    finally:
        await running.stop()
