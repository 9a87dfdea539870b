"""Shared support for the tests that run the broker as a real process or over TLS.

`python -m broker` as a child process (e2e/test_cli.py, e2e/test_devmode.py; the `spawn`
fixture of tests/e2e/conftest.py), and throwaway PKI for the broker's TLS and mutual-TLS
listeners (e2e/test_server.py, e2e/test_cli.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import trustme
import yaml

from tests.support.stack import CALLER_KEY, access_config
from tests.support.suite_secrets import SUITE

REPO = Path(__file__).resolve().parents[2]


# --- the CLI as a child process ---------------------------------------------------------------


def cli_env(credential: str | None = CALLER_KEY, **extra: str) -> dict[str, str]:
    """The environment of a CLI child: no TOKEN_BROKER_* of ours, except that `token` calls
    carry `credential` (default: the test caller's API key) as TOKEN_BROKER_CREDENTIAL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
    if credential is not None:
        env["TOKEN_BROKER_CREDENTIAL"] = credential
    # Brokers started as children must not take the default admin port (8082) from another
    # test or a running `make run`.
    env["TOKEN_BROKER_ADMIN__LISTEN"] = "127.0.0.1:0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


async def run_cli(*args: str, credential: str | None = CALLER_KEY) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(credential),
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    # The suite-wide secrets scan reads stderr (stdout is what was asked for: the token).
    SUITE.add("cli stderr", err.decode())
    return proc.returncode, out.decode(), err.decode()


def claims(token: str) -> dict[str, object]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


class Process:
    """A `python -m broker` child with its stdout and stderr read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._pump(proc.stdout, self.stdout)),
            asyncio.ensure_future(self._pump(proc.stderr, self.stderr)),
        ]
        self._new_line = asyncio.Event()
        SUITE.children.append(self)  # for the suite-wide secrets scan

    async def _pump(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        async for raw in stream:
            lines.append(raw.decode())
            self._new_line.set()

    async def wait_for(self, predicate: str, *, stream: str = "stdout") -> int:
        """Index of the first line containing `predicate` (safety timeout: 60 s)."""
        lines = self.stdout if stream == "stdout" else self.stderr

        async def scan() -> int:
            while True:
                for i, line in enumerate(lines):
                    if predicate in line:
                        return i
                assert self.proc.returncode is None, "".join(self.stderr)
                self._new_line.clear()
                await self._new_line.wait()

        return await asyncio.wait_for(scan(), 60)

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(self.proc.wait(), 60)
        await asyncio.gather(*self._readers)
        return rc


def serve_config(
    path: Path,
    kubeconfig: Path,
    *,
    server: dict[str, Any] | None = None,
    authentication: dict[str, Any] | None = None,
    **sections: Any,
) -> Path:
    """Write the config.yaml of a `serve` child: plaintext on a free loopback port, the
    emulator behind `kubeconfig`, the test callers and policy (stack.access_config), JSON
    logs. `server` and `authentication` keys are added to those sections; other sections
    (camelCase, as in the file) are set as given."""
    access = access_config()
    settings = {
        "server": {"listen": "127.0.0.1:0", "allowPlaintext": True, **(server or {})},
        "kubernetes": {"mode": "kubeconfig", "kubeconfig": str(kubeconfig)},
        **access,
        "authentication": {**access["authentication"], **(authentication or {})},
        "log": {"format": "json"},
        **sections,
    }
    path.write_text(yaml.safe_dump(settings))
    return path


async def start_broker(*args: str) -> Process:
    """`python -m broker <args>` as a child, its output read line by line; the caller kills it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env(), cwd=REPO,
    )  # fmt: skip
    return Process(proc)


# --- PKI for the broker's TLS listeners -------------------------------------------------------


@dataclass
class Pki:
    ca: trustme.CA
    cert: Path
    key: Path
    ca_file: Path

    def server_tls(self, client_ca: Pki | None = None) -> dict[str, Path]:
        """`server.tls` settings serving this cert; mutual TLS with client_ca's CA if given."""
        tls = {"cert_file": self.cert, "key_file": self.key}
        if client_ca is not None:
            tls["client_ca_file"] = client_ca.ca_file
        return tls


def issue(tmp_path: Path, name: str, *identities: str) -> Pki:
    ca = trustme.CA()
    leaf = ca.issue_cert(*identities)
    directory = tmp_path / name
    directory.mkdir()
    cert, key, ca_file = directory / "tls.crt", directory / "tls.key", directory / "ca.crt"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, cert, key, ca_file)


Spawn = Callable[..., Awaitable[Process]]
