"""Real clients against the emulator: kubernetes.aio, kubectl (protobuf bodies), a
hand-built protobuf envelope, and the emulator as its own process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig
from kubernetes.aio.client.exceptions import ApiException

import broker
from broker.emulator import Emulator, encode_envelope
from broker.emulator.client import EmulatorClient
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from tests.support.emulator import (
    ADMIN_TOKEN,
    BROKER_TOKEN,
    ISSUER,
    NODE,
    NS,
    POD,
    SA,
    SEED,
    assert_status,
    status_body,
    verify,
)

REPO = Path(broker.__file__).resolve().parents[1]


def configuration(emu: Emulator, token: str = BROKER_TOKEN) -> Any:
    return kclient.Configuration(
        host=emu.url,
        api_key={"BearerToken": token},
        api_key_prefix={"BearerToken": "Bearer"},
        ssl_ca_cert=str(emu.ca_file),
    )


def token_request(**spec: Any) -> Any:
    return kclient.AuthenticationV1TokenRequest(
        api_version="authentication.k8s.io/v1",
        kind="TokenRequest",
        spec=kclient.V1TokenRequestSpec(**{"audiences": [], **spec}),
    )


# --- kubernetes.aio -----------------------------------------------------------------------


async def test_kubernetes_aio_success(emu: Emulator, client: EmulatorClient) -> None:
    async with kclient.ApiClient(configuration(emu)) as api:
        core = kclient.CoreV1Api(api)
        response = await core.create_namespaced_service_account_token_with_http_info(
            SA, NS, body=token_request()
        )
    assert response.status_code == 201
    tr = response.data
    assert (tr.metadata.name, tr.metadata.namespace) == (SA, NS)
    assert tr.spec.audiences == [ISSUER]
    assert tr.spec.expiration_seconds == 3600
    assert tr.spec.bound_object_ref is None
    lifetime = tr.status.expiration_timestamp - tr.metadata.creation_timestamp
    assert lifetime.total_seconds() == 3600
    claims = await verify(client, tr.status.token)
    assert claims["sub"] == f"system:serviceaccount:{NS}:{SA}"
    assert emu.token_requests[-1].body["spec"] == {"audiences": []}


async def test_kubernetes_aio_pod_bound_and_dry_run(emu: Emulator, client: EmulatorClient) -> None:
    uid = emu.store.get_pod(NS, POD).uid
    ref = kclient.V1BoundObjectReference(kind="Pod", api_version="v1", name=POD, uid=uid)
    async with kclient.ApiClient(configuration(emu)) as api:
        core = kclient.CoreV1Api(api)
        tr = await core.create_namespaced_service_account_token(
            SA,
            NS,
            body=token_request(bound_object_ref=ref, expiration_seconds=1800),
            dry_run="All",
        )
    assert tr.spec.bound_object_ref.uid == uid
    assert tr.spec.expiration_seconds == 1800
    claims = await verify(client, tr.status.token)
    assert claims["kubernetes.io"]["pod"] == {"name": POD, "uid": uid}
    assert claims["kubernetes.io"]["node"]["name"] == NODE
    assert emu.token_requests[-1].query.get("dryRun") == "All"


@pytest.mark.parametrize(
    ("kwargs", "code", "expected"),
    [
        (
            {"name": "nobody"},
            404,
            status_body(
                404,
                "NotFound",
                'serviceaccounts "nobody" not found',
                {"name": "nobody", "kind": "serviceaccounts"},
            ),
        ),
        (
            {"body": token_request(expiration_seconds=60)},
            422,
            status_body(
                422,
                "Invalid",
                'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: '
                "Invalid value: 60: may not specify a duration less than 10 minutes",
                {
                    "group": "authentication.k8s.io",
                    "kind": "TokenRequest",
                    "causes": [
                        {
                            "reason": "FieldValueInvalid",
                            "message": "Invalid value: 60: may not specify a duration less than "
                            "10 minutes",
                            "field": "spec.expirationSeconds",
                        }
                    ],
                },
            ),
        ),
        (
            {"dry_run": "Some"},
            422,
            status_body(
                422,
                "Invalid",
                'CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: '
                '[]string{"Some"}: supported values: "All"',
                {
                    "group": "meta.k8s.io",
                    "kind": "CreateOptions",
                    "causes": [
                        {
                            "reason": "FieldValueNotSupported",
                            "message": 'Unsupported value: []string{"Some"}: '
                            'supported values: "All"',
                            "field": "dryRun",
                        }
                    ],
                },
            ),
        ),
        (
            {"token": "wrong"},
            401,
            status_body(401, "Unauthorized", "Unauthorized"),
        ),
    ],
    ids=["404", "422", "dry-run", "401"],
)
async def test_kubernetes_aio_errors(
    emu: Emulator, kwargs: dict[str, Any], code: int, expected: dict[str, Any]
) -> None:
    token = kwargs.pop("token", BROKER_TOKEN)
    name = kwargs.pop("name", SA)
    body = kwargs.pop("body", token_request())
    async with kclient.ApiClient(configuration(emu, token)) as api:
        with pytest.raises(ApiException) as info:
            await kclient.CoreV1Api(api).create_namespaced_service_account_token(
                name, NS, body=body, **kwargs
            )
    assert info.value.status == code
    assert json.loads(info.value.body) == expected


async def test_kubernetes_aio_429_and_warning(emu: Emulator) -> None:
    emu.faults.fail_next(1, 429, retry_after=4)
    async with kclient.ApiClient(configuration(emu)) as api:
        core = kclient.CoreV1Api(api)
        with pytest.raises(ApiException) as info:
            await core.create_namespaced_service_account_token(SA, NS, body=token_request())
        assert info.value.status == 429
        assert info.value.body == "Too many requests, please try again later.\n"
        assert info.value.headers["Retry-After"] == "4"

        emu.config.max_expiration_seconds = 3600
        response = await core.create_namespaced_service_account_token_with_http_info(
            SA, NS, body=token_request(expiration_seconds=7200)
        )
    assert response.data.spec.expiration_seconds == 3600
    assert response.headers["Warning"] == (
        '299 - "requested expiration of 7200 seconds shortened to 3600 seconds"'
    )


async def test_written_kubeconfig_loads(emu: Emulator, tmp_path: Path) -> None:
    path = emu.write_kubeconfig(tmp_path / "kubeconfig", user_token=BROKER_TOKEN)
    assert path.stat().st_mode & 0o777 == 0o600
    cfg = kclient.Configuration()
    await kconfig.load_kube_config(config_file=str(path), client_configuration=cfg)
    async with kclient.ApiClient(cfg) as api:
        tr = await kclient.CoreV1Api(api).create_namespaced_service_account_token(
            SA, NS, body=token_request()
        )
    assert tr.status.token


# --- protobuf -----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def envelope(raw: bytes, api_version: str = "authentication.k8s.io/v1") -> bytes:
    """`k8s\\0` + runtime.Unknown{typeMeta{apiVersion, kind}, raw, contentEncoding, contentType}."""
    type_meta = _field(1, api_version.encode()) + _field(2, b"TokenRequest")
    return b"k8s\x00" + _field(1, type_meta) + _field(2, raw) + _field(3, b"") + _field(4, b"")


async def test_protobuf_body(emu: Emulator, client: EmulatorClient) -> None:
    uid = emu.store.get_pod(NS, POD).uid
    message = pb.TokenRequest(
        metadata=pb.ObjectMeta(name=SA),
        spec=pb.TokenRequestSpec(
            audiences=["https://vault.example.com"],
            expiration_seconds=1800,
            bound_object_ref=pb.BoundObjectReference(
                kind="Pod", api_version="v1", name=POD, uid=uid
            ),
        ),
    )
    raw = message.SerializeToString()
    body = envelope(raw)
    assert body == encode_envelope(raw, "authentication.k8s.io/v1", "TokenRequest")
    reply = await client.create_token(NS, SA, protobuf=body)
    assert reply.status == 201, reply.text
    assert reply.headers["Content-Type"] == "application/json"  # JSON replies, always
    spec = reply.json()["spec"]
    assert spec == {
        "audiences": ["https://vault.example.com"],
        "expirationSeconds": 1800,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": POD, "uid": uid},
    }
    claims = await verify(client, reply.json()["status"]["token"], "https://vault.example.com")
    assert claims["kubernetes.io"]["pod"]["uid"] == uid
    record = emu.token_requests[-1]
    assert record.content_type == "application/vnd.kubernetes.protobuf"
    assert record.body["spec"]["expirationSeconds"] == 1800


async def test_protobuf_upstream_field_numbers(client: EmulatorClient) -> None:
    # TokenRequest.spec = 2; TokenRequestSpec.audiences = 1, expirationSeconds = 4 (varint).
    spec = _field(1, b"aud-1") + _varint(4 << 3 | 0) + _varint(1200)
    reply = await client.create_token(NS, SA, protobuf=envelope(_field(2, spec)))
    assert reply.status == 201
    assert reply.json()["spec"]["audiences"] == ["aud-1"]
    assert reply.json()["spec"]["expirationSeconds"] == 1200


async def test_protobuf_errors(client: EmulatorClient) -> None:
    short = pb.TokenRequest(spec=pb.TokenRequestSpec(expiration_seconds=60)).SerializeToString()
    reply = await client.create_token(NS, SA, protobuf=envelope(short))
    assert reply.status == 422
    assert reply.json()["details"]["causes"][0]["field"] == "spec.expirationSeconds"

    named = pb.TokenRequest(metadata=pb.ObjectMeta(name="x")).SerializeToString()
    assert (await client.create_token(NS, SA, protobuf=envelope(named))).status == 422

    reply = await client.create_token(NS, SA, protobuf=envelope(b"", "authentication.k8s.io/v2"))
    assert reply.json()["message"] == (
        "the API version in the data (authentication.k8s.io/v2) does not match the expected API "
        "version (authentication.k8s.io/v1)"
    )
    reply = await client.create_token(NS, SA, protobuf=b"nope")
    assert_status(
        reply,
        400,
        "BadRequest",
        "the object provided is unrecognized (must be of type TokenRequest): provided data does "
        "not appear to be a protobuf message, expected prefix [107 56 115 0] (6e6f7065)",
    )


# --- kubectl ------------------------------------------------------------------------------


def _kubectl() -> str | None:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("kubectl", path=path)


KUBECTL = _kubectl()
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


async def kubectl(kubeconfig: Path, *args: str) -> tuple[int, str, str]:
    assert KUBECTL is not None
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        "--kubeconfig",
        str(kubeconfig),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@needs_kubectl
async def test_kubectl_create_token(emu: Emulator, client: EmulatorClient, tmp_path: Path) -> None:
    kubeconfig = emu.write_kubeconfig(tmp_path / "kc", user_token=BROKER_TOKEN, namespace=NS)
    code, out, err = await kubectl(kubeconfig, "create", "token", SA)
    assert code == 0, err
    claims = await verify(client, out.strip())
    assert claims["sub"] == f"system:serviceaccount:{NS}:{SA}"
    # Stock kubectl sends the protobuf encoding.
    assert emu.token_requests[-1].content_type == "application/vnd.kubernetes.protobuf"

    uid = emu.store.get_pod(NS, POD).uid
    code, out, err = await kubectl(
        kubeconfig,
        "create",
        "token",
        SA,
        "--bound-object-kind=Pod",
        f"--bound-object-name={POD}",
        f"--bound-object-uid={uid}",
        "--duration=2h",
        "--audience=sts.example.com",
        "-o",
        "json",
    )
    assert code == 0, err
    tr = json.loads(out)
    assert tr["spec"]["expirationSeconds"] == 7200
    assert tr["spec"]["boundObjectRef"] == {
        "kind": "Pod",
        "apiVersion": "v1",
        "name": POD,
        "uid": uid,
    }
    claims = await verify(client, tr["status"]["token"], "sts.example.com")
    assert claims["kubernetes.io"]["pod"] == {"name": POD, "uid": uid}

    code, _, err = await kubectl(kubeconfig, "create", "token", "nobody")
    assert code == 1
    assert 'error: failed to create token: serviceaccounts "nobody" not found' in err


@needs_kubectl
async def test_kubectl_admin_recreates_a_pod(emu: Emulator, tmp_path: Path) -> None:
    admin = emu.write_kubeconfig(tmp_path / "admin", user_token=ADMIN_TOKEN, namespace=NS)
    broker_kc = emu.write_kubeconfig(tmp_path / "broker", user_token=BROKER_TOKEN, namespace=NS)
    code, out, err = await kubectl(admin, "get", "pods", "-o", "name")
    assert code == 0, err
    assert f"pod/{POD}" in out.split()
    old_uid = emu.store.get_pod(NS, POD).uid
    code, _, err = await kubectl(admin, "delete", "pod", POD, "--wait=false")
    assert code == 0, err
    code, _, err = await kubectl(broker_kc, "get", "pods")
    assert code == 1
    assert "cannot list resource" in err
    manifest = tmp_path / "pod.json"
    manifest.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": POD},
                "spec": {"serviceAccountName": SA, "nodeName": NODE},
            }
        )
    )
    code, _, err = await kubectl(admin, "create", "-f", str(manifest), "--validate=false")
    assert code == 0, err
    assert emu.store.get_pod(NS, POD).uid != old_uid
    code, _, err = await kubectl(
        broker_kc,
        "create",
        "token",
        SA,
        "--bound-object-kind=Pod",
        f"--bound-object-name={POD}",
        f"--bound-object-uid={old_uid}",
    )
    assert code == 1
    assert "the UID in the bound object reference" in err


# --- the emulator as a process ------------------------------------------------------------


async def test_subprocess_emulator(tmp_path: Path) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(yaml.safe_dump(SEED))
    kubeconfig, ready = tmp_path / "kubeconfig", tmp_path / "ready.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.emulator",
        "--seed",
        str(seed),
        "--port",
        "0",
        "--kubeconfig-out",
        str(kubeconfig),
        "--ready-file",
        str(ready),
        "--max-expiration",
        "3600",
        "--user-token",
        BROKER_TOKEN,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line.startswith("https://127.0.0.1:")
        info = json.loads(ready.read_text())
        assert info["url"] == line
        assert info["kubeconfig"] == str(kubeconfig)
        config = yaml.safe_load(kubeconfig.read_text())
        assert config["clusters"][0]["cluster"]["server"] == line
        assert config["users"][0]["user"]["token"] == BROKER_TOKEN

        ca = Path(info["caFile"])
        async with (
            EmulatorClient(line, ca, BROKER_TOKEN) as client,
            EmulatorClient(line, ca, ADMIN_TOKEN) as admin,
        ):
            reply = await client.create_token(NS, SA, {"spec": {"expirationSeconds": 7200}})
            assert reply.status == 201
            assert reply.warnings == [
                '299 - "requested expiration of 7200 seconds shortened to 3600 seconds"'
            ]
            await admin.set_faults({"failNext": [{"status": 503}]})
            assert (await client.create_token(NS, SA)).status == 503
            assert (await admin.recorded_requests())["count"] == 2

            # Objects over the REST paths: delete and recreate a pod, then see the conflict.
            path = f"/api/v1/namespaces/{NS}/pods"
            old_uid = (await admin.request("GET", f"{path}/{POD}")).json()["metadata"]["uid"]
            assert (await admin.request("DELETE", f"{path}/{POD}")).status == 200
            created = await admin.request(
                "POST",
                path,
                json_body={"metadata": {"name": POD}, "spec": {"serviceAccountName": SA}},
            )
            assert created.status == 201
            ref = {"kind": "Pod", "apiVersion": "v1", "name": POD, "uid": old_uid}
            reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
            assert reply.status == 409
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0
