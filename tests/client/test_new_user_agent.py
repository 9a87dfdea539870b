"""`token-broker agent` with the README's agent YAML, as a new user runs it: a file a connection
names that cannot be read is a configuration error naming its key (exit 2, like every other
bad setting: was a Python traceback), and `--once` says that it does not retry (it logged
"retrying in 0.9s" and then exited 1)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.client import run_broker_cli
from tests.support.suite_secrets import SUITE

# The docs' example (docs/clients.md, "Sidecar agent"), its paths moved into the test's directory.
README_AGENT = """
broker:
  address: broker.example:8443
  caFile: {dir}/ca.crt
  serverName: broker.example
  credentialFile: {dir}/credential
  timeoutSeconds: 10
sinks:
  - name: vault
    namespace: demo
    serviceAccount: build-robot
    audiences: [vault]
    duration: 1h
    path: {dir}/tokens/vault-token
    mode: 0600
retry: {{initialBackoffSeconds: 1, maxBackoffSeconds: 60}}
"""


def write_config(tmp_path: Path, **changes: Any) -> Path:
    config = yaml.safe_load(README_AGENT.format(dir=tmp_path))
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if value is None:
            config[section].pop(name)
        else:
            config[section][name] = value
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def agent(*args: str) -> tuple[int, str]:
    # Bounded below pytest's own timeout, so a long-running agent that does not exit (as it
    # did not before the files were checked) is killed, not left behind.
    run = await run_broker_cli("agent", *args, credential=None, timeout=60)
    SUITE.add("cli stderr", run.stderr)
    return run.returncode, run.stderr


@pytest.mark.parametrize(
    ("missing", "key"),
    [("ca.crt", "broker.caFile"), ("credential", "broker.credentialFile")],
)
@pytest.mark.parametrize("once", [True, False])
async def test_a_file_that_cannot_be_read_is_a_configuration_error(
    tmp_path: Path, missing: str, key: str, once: bool
) -> None:
    for name in ("ca.crt", "credential"):
        if name != missing:
            (tmp_path / name).write_text("x\n")
    config = write_config(tmp_path)
    code, err = await agent("--config", str(config), *(["--once"] if once else []))
    assert code == 2
    assert err == (
        f"token-broker agent: invalid agent configuration ({config}):\n"
        f"  {key}: cannot read {tmp_path / missing}: No such file or directory\n"
    )
    assert not (tmp_path / "tokens").exists()


async def test_a_sinks_own_connection_is_named_too(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x\n")
    (tmp_path / "credential").write_text("tbk_not-a-real-key\n")
    (tmp_path / "sink-credential").write_text("\n")  # empty
    config = yaml.safe_load(README_AGENT.format(dir=tmp_path))
    config["sinks"][0]["broker"] = {
        "address": "127.0.0.1:50051",
        "plaintext": True,
        "credentialFile": str(tmp_path / "sink-credential"),
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = await agent("--config", str(path), "--once")
    assert code == 2
    assert f"  sinks.0.broker.credentialFile: {tmp_path / 'sink-credential'} is empty" in err
    assert "Traceback" not in err


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_once_does_not_say_it_retries(tmp_path: Path) -> None:
    (tmp_path / "credential").write_text("tbk_not-a-real-key\n")
    address = f"127.0.0.1:{closed_port()}"
    config = write_config(
        tmp_path, **{"broker.address": address, "broker.caFile": None, "broker.plaintext": True}
    )
    code, err = await agent("--config", str(config), "--once", "--log-format", "text")
    assert code == 1
    assert "retrying in" not in err
    assert "not retried (--once: the agent exits 1)" in err
    # (The log line and this summary may come in either order: logs have a writer thread.)
    assert (
        f"token-broker agent: sink vault (demo/build-robot -> {tmp_path / 'tokens/vault-token'}):"
        " UNAVAILABLE" in err
    )
