"""The Node.js example client (clients/node/create-token.js: @grpc/grpc-js +
@grpc/proto-loader) against the real broker: over TCP with a bearer credential from the
environment, over a unix socket, over TLS, and a refusal with its ErrorInfo.

`npm ci` installs clients/node/node_modules from the lock file once per session; if npm or
node fails, the tests fail (nothing is skipped)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jwt
import pytest

from broker.config import KubernetesSettings
from tests.support.cli import REPO, issue
from tests.support.client import Completed, run_command, start_broker
from tests.support.stack import CALLER_KEY, NAMESPACE, SERVICE_ACCOUNT, RunningBroker

NODE_DIR = REPO / "clients" / "node"
SCRIPT = NODE_DIR / "create-token.js"
SA_USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    """`npm ci` once per session; the command that runs the example."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node is not None and npm is not None, "node and npm are required (Debian: nodejs npm)"
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir()
    return [node, str(SCRIPT)]


async def run_node(node_client: list[str], *args: str, credential: str | None = None) -> Completed:
    return await run_command([*node_client, *args], credential=credential, timeout=60)


def subject(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["sub"])


async def test_tcp_with_a_bearer_credential_from_the_environment(
    node_client: list[str], broker: RunningBroker
) -> None:
    run = await run_node(
        node_client,
        SERVICE_ACCOUNT,
        "-n",
        NAMESPACE,
        "--server",
        broker.address,
        "--plaintext",
        "--audience",
        "https://vault.example.com",
        "--duration-seconds",
        "1200",
        credential=CALLER_KEY,
    )
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip()
    assert subject(token) == SA_USER
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == ["https://vault.example.com"]
    assert claims["exp"] - claims["iat"] == 1200


async def test_unix_socket(
    node_client: list[str], kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    socket = tmp_path / "broker.sock"
    server = await start_broker(kubernetes_settings, listen=None, unix_socket=socket)
    try:
        run = await run_node(
            node_client, SERVICE_ACCOUNT, "-n", NAMESPACE, "--server", f"unix:{socket}"
        )
    finally:
        await server.stop(None)
    assert run.returncode == 0, run.stderr
    assert subject(run.stdout.strip()) == SA_USER


async def test_tls_and_json_output(
    node_client: list[str], kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    pki = issue(tmp_path, "server", "localhost", "127.0.0.1")
    server = await start_broker(kubernetes_settings, tls=pki.server_tls())
    try:
        run = await run_node(
            node_client,
            SERVICE_ACCOUNT,
            "-n",
            NAMESPACE,
            "--server",
            server.address,
            "--cacert",
            str(pki.ca_file),
            "--json",
            credential=CALLER_KEY,
        )
    finally:
        await server.stop(None)
    assert run.returncode == 0, run.stderr
    response = json.loads(run.stdout)
    token_request = response["token_request"]
    assert subject(token_request["status"]["token"]) == SA_USER
    assert token_request["spec"]["expiration_seconds"] == "3600"


async def test_a_refusal_prints_code_and_error_info(
    node_client: list[str], broker: RunningBroker
) -> None:
    run = await run_node(
        node_client,
        SERVICE_ACCOUNT,
        "-n",
        NAMESPACE,
        "--server",
        broker.address,
        "--plaintext",
        "--audience",
        "not-allowed",
        credential=CALLER_KEY,
    )
    assert run.returncode == 1
    assert run.stdout == ""
    assert "PERMISSION_DENIED" in run.stderr
    assert "reason: AUDIENCE_NOT_ALLOWED (domain tokenbroker.dev)" in run.stderr
    assert "rule: core-tests" in run.stderr
