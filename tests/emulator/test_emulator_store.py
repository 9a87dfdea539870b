"""The emulator's seed, object store, core REST paths, TLS and configuration."""

from __future__ import annotations

import asyncio
import json
import ssl
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509

from broker.emulator import (
    Emulator,
    EmulatorConfig,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    SeedError,
    load_seed,
    run_emulator_forever,
)
from broker.emulator.client import EmulatorClient
from tests.support.emulator import (
    ALICE_TOKEN,
    BROKER,
    BROKER_TOKEN,
    NODE,
    NS,
    POD,
    SA,
    SECRET,
    SEED,
    assert_not_found,
    assert_status,
)

DEV_SEED = Path(__file__).resolve().parents[2] / "broker" / "emulator" / "dev-seed.yaml"


# --- seed ---------------------------------------------------------------------------------


def test_dev_seed() -> None:
    seed = load_seed(DEV_SEED)
    namespaces = {ns.name: ns for ns in seed.namespaces}
    assert set(namespaces) == {"demo", "ci"}
    demo = namespaces["demo"]
    assert [sa.name for sa in demo.service_accounts] == ["build-robot", "deployer"]
    assert [(p.name, p.service_account_name, p.node_name) for p in demo.pods] == [
        ("web-0", "build-robot", "node-1")
    ]
    assert [s.name for s in demo.secrets] == ["build-robot-secret"]
    assert [sa.name for sa in namespaces["ci"].service_accounts] == ["runner"]
    assert [n.name for n in seed.nodes] == ["node-1"]
    broker_users = [u for u in seed.users if u.name == BROKER]
    assert len(broker_users) == 1 and broker_users[0].token
    grants = [g for g in seed.rbac if g.user == BROKER]
    assert [sorted(g.namespaces) for g in grants] == [["ci", "demo"]]


async def test_dev_seed_serves(tmp_path: Path) -> None:
    seed = load_seed(DEV_SEED)
    token = next(u.token for u in seed.users if u.name == BROKER)
    async with Emulator(seed=DEV_SEED) as emu, EmulatorClient(emu.url, emu.ca_file, token) as c:
        for namespace, name in (("demo", "build-robot"), ("demo", "deployer"), ("ci", "runner")):
            assert (await c.create_token(namespace, name)).status == 201
        ref = {"kind": "Pod", "name": "web-0"}
        assert (
            await c.create_token("demo", "build-robot", {"spec": {"boundObjectRef": ref}})
        ).status == 201


@pytest.mark.parametrize(
    ("seed", "fragment"),
    [
        ({"namespaces": [{"name": "a", "configMaps": []}]}, "configMaps"),
        ({"bogus": 1}, "bogus"),
        ({"namespaces": [{"name": "Bad_Name"}]}, "DNS-1123"),
        ({"namespaces": [{"name": "a"}, {"name": "a"}]}, "duplicate"),
        ({"namespaces": [{"name": "a", "pods": [{"name": "p"}, {"name": "p"}]}]}, "duplicate"),
        ({"users": [{"token": "", "name": "x"}]}, "token"),
        ({"rbac": [{"namespaces": ["a"]}]}, "exactly one of user or group"),
        ({"rbac": [{"user": "u", "group": "g", "namespaces": ["a"]}]}, "exactly one"),
        ({"rbac": [{"user": "u", "namespaces": []}]}, "namespaces"),
        ([], "mapping"),
    ],
)
def test_seed_is_validated(seed: Any, fragment: str) -> None:
    with pytest.raises(SeedError, match=fragment):
        load_seed(seed)


def test_seed_files(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps(SEED))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SEED))
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bad.yaml").write_text("namespaces: [")
    assert load_seed(tmp_path / "s.json") == load_seed(tmp_path / "s.yaml") == load_seed(SEED)
    assert load_seed(tmp_path / "empty.yaml").namespaces == []
    with pytest.raises(SeedError, match="not valid YAML"):
        load_seed(tmp_path / "bad.yaml")
    with pytest.raises(SeedError, match="cannot read"):
        load_seed(tmp_path / "missing.yaml")


def test_seed_uids_and_defaults() -> None:
    emu = Emulator(
        seed={
            "namespaces": [
                {
                    "name": "a",
                    "serviceAccounts": [{"name": "sa", "uid": "fixed-uid"}],
                    "pods": [{"name": "p"}],
                }
            ]
        }
    )
    assert emu.store.get_service_account("a", "sa").uid == "fixed-uid"
    pod = emu.store.get_pod("a", "p")
    assert (pod.service_account_name, pod.node_name) == ("default", "")


# --- the store ----------------------------------------------------------------------------


def test_store_lifecycle() -> None:
    store = ObjectStore()
    with pytest.raises(ObjectNotFound):
        store.create_pod("nowhere", "p")  # the namespace must exist
    store.create_namespace("a")
    first = store.create_pod("a", "p", "sa", "n1")
    with pytest.raises(ObjectExists):
        store.create_pod("a", "p", "sa")
    assert store.get_pod("a", "p").uid == first
    assert store.delete_pod("a", "p").uid == first
    with pytest.raises(ObjectNotFound) as info:
        store.get_pod("a", "p")
    assert (info.value.resource, info.value.name) == ("pods", "p")
    assert store.create_pod("a", "p", "sa") != first  # recreated: a new UID

    store.create_service_account("a", "sa")
    store.create_secret("a", "s", type="kubernetes.io/service-account-token")
    store.create_node("n1")
    assert [s.type for s in store.list_secrets("a")] == ["kubernetes.io/service-account-token"]
    store.delete_node("n1")
    with pytest.raises(ObjectNotFound):
        store.get_node("n1")
    store.delete_namespace("a")  # takes everything in it along
    assert store.list_pods() == store.list_service_accounts() == store.list_secrets() == []
    with pytest.raises(ObjectNotFound):
        store.get_service_account("a", "sa")


async def test_objects_changed_while_serving(emu: Emulator) -> None:
    async with EmulatorClient(emu.url, emu.ca_file, BROKER_TOKEN) as client:
        emu.store.delete_service_account(NS, SA)
        assert (await client.create_token(NS, SA)).status == 404
        emu.store.create_service_account(NS, SA)
        assert (await client.create_token(NS, SA)).status == 201
        emu.store.delete_secret(NS, SECRET)
        ref = {"kind": "Secret", "name": SECRET}
        assert (await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})).status == 404
        emu.store.delete_namespace(NS)
        assert (await client.create_token(NS, SA)).status == 404


# --- core REST paths ----------------------------------------------------------------------


async def test_rest_get_and_list(emu: Emulator, admin: EmulatorClient) -> None:
    pod = (await admin.request("GET", f"/api/v1/namespaces/{NS}/pods/{POD}")).json()
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["uid"] == emu.store.get_pod(NS, POD).uid
    assert (pod["metadata"]["name"], pod["metadata"]["namespace"]) == (POD, NS)
    assert (pod["spec"]["serviceAccountName"], pod["spec"]["nodeName"]) == (SA, NODE)

    pods = (await admin.request("GET", f"/api/v1/namespaces/{NS}/pods")).json()
    assert pods["kind"] == "PodList"
    assert {p["metadata"]["name"] for p in pods["items"]} == {POD, "db-0", "lonely-0"}
    everywhere = (await admin.request("GET", "/api/v1/serviceaccounts")).json()
    assert len(everywhere["items"]) == 3
    namespaces = (await admin.request("GET", "/api/v1/namespaces")).json()
    assert {n["metadata"]["name"] for n in namespaces["items"]} == {NS, "other"}
    node = (await admin.request("GET", f"/api/v1/nodes/{NODE}")).json()
    assert node["metadata"]["uid"] == emu.store.get_node(NODE).uid
    secret = (await admin.request("GET", f"/api/v1/namespaces/{NS}/secrets/{SECRET}")).json()
    assert (secret["kind"], secret["type"]) == ("Secret", "Opaque")
    sa = (await admin.request("GET", f"/api/v1/namespaces/{NS}/serviceaccounts/{SA}")).json()
    assert sa["metadata"]["uid"] == emu.store.get_service_account(NS, SA).uid

    reply = await admin.request("GET", f"/api/v1/namespaces/{NS}/pods/none")
    assert_not_found(reply, "pods", "none")


async def test_rest_create_and_delete(emu: Emulator, admin: EmulatorClient) -> None:
    base = f"/api/v1/namespaces/{NS}"
    reply = await admin.request(
        "POST",
        f"{base}/pods",
        json_body={"metadata": {"name": "new-0"}, "spec": {"serviceAccountName": SA}},
    )
    assert reply.status == 201
    assert reply.json()["metadata"]["uid"] == emu.store.get_pod(NS, "new-0").uid

    reply = await admin.request("POST", f"{base}/pods", json_body={"metadata": {"name": "new-0"}})
    assert_status(
        reply,
        409,
        "AlreadyExists",
        'pods "new-0" already exists',
        {"name": "new-0", "kind": "pods"},
    )

    reply = await admin.request("POST", f"{base}/pods", json_body={"metadata": {}})
    assert_status(
        reply,
        422,
        "Invalid",
        'Pod "" is invalid: metadata.name: Required value: name or generateName is required',
        {
            "kind": "Pod",
            "causes": [
                {
                    "reason": "FieldValueRequired",
                    "message": "Required value: name or generateName is required",
                    "field": "metadata.name",
                }
            ],
        },
    )
    reply = await admin.request("POST", f"{base}/secrets", json_body={"metadata": {"name": "Bad"}})
    assert reply.status == 422
    assert reply.json()["message"].startswith(
        'Secret "Bad" is invalid: metadata.name: Invalid value: "Bad": '
        "a lowercase RFC 1123 subdomain must consist of"
    )
    reply = await admin.request(
        "POST", f"{base}/secrets", json_body={"metadata": {"name": "s", "namespace": "other"}}
    )
    assert reply.json()["message"] == (
        "the namespace of the provided object does not match the namespace sent on the request"
    )

    for path, body in (
        ("/api/v1/namespaces", {"metadata": {"name": "fresh"}}),
        ("/api/v1/namespaces/fresh/serviceaccounts", {"metadata": {"name": "bot"}}),
        ("/api/v1/namespaces/fresh/secrets", {"metadata": {"name": "s"}, "type": "Opaque"}),
        ("/api/v1/nodes", {"metadata": {"name": "node-2"}}),
    ):
        assert (await admin.request("POST", path, json_body=body)).status == 201, path
    assert emu.store.get_service_account("fresh", "bot").namespace == "fresh"

    reply = await admin.request("DELETE", f"{base}/pods/new-0")
    assert reply.status == 200
    assert reply.json()["status"] == "Success"
    assert reply.json()["details"]["name"] == "new-0"
    with pytest.raises(ObjectNotFound):
        emu.store.get_pod(NS, "new-0")
    assert (await admin.request("DELETE", "/api/v1/namespaces/fresh")).status == 200
    assert not emu.store.has_namespace("fresh")
    reply = await admin.request(
        "POST", "/api/v1/namespaces/fresh/pods", json_body={"metadata": {"name": "p"}}
    )
    assert_not_found(reply, "namespaces", "fresh")


async def test_rest_authorization(emu: Emulator) -> None:
    async with EmulatorClient(emu.url, emu.ca_file, ALICE_TOKEN) as alice:
        reply = await alice.request("GET", f"/api/v1/namespaces/{NS}/pods/{POD}")
        assert_status(
            reply,
            403,
            "Forbidden",
            f'pods "{POD}" is forbidden: User "alice" cannot get resource "pods" in API group "" '
            f'in the namespace "{NS}"',
            {"name": POD, "kind": "pods"},
        )
        reply = await alice.request("GET", "/api/v1/nodes")
        assert reply.json()["message"] == (
            'nodes is forbidden: User "alice" cannot list resource "nodes" in API group "" at the '
            "cluster scope"
        )
        emu.allow("alice", NS, resources=("pods",), verbs=("get", "list"))
        assert (await alice.request("GET", f"/api/v1/namespaces/{NS}/pods")).status == 200
        assert (await alice.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{POD}")).status == 403
        reply = await alice.request("PUT", f"/api/v1/namespaces/{NS}/pods/{POD}")
        assert reply.status == 405


# --- TLS, configuration, runner -------------------------------------------------------------


async def test_tls(emu: Emulator) -> None:
    cert = x509.load_pem_x509_certificate(emu.ca_cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert emu.ca_file.read_bytes() == emu.ca_cert_pem
    # Verified by name and by IP; TLS 1.1 refused.
    for host in ("localhost", "127.0.0.1"):
        ctx = ssl.create_default_context(cafile=str(emu.ca_file))
        async with aiohttp.ClientSession() as session:
            url = f"https://{host}:{emu.port}/healthz"
            async with session.get(url, ssl=ctx) as response:
                assert response.status == 200
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=str(emu.ca_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        async with aiohttp.ClientSession() as session, session.get(f"{emu.url}/healthz", ssl=old):
            pass
    # An unrelated CA does not trust it.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.get(f"{emu.url}/healthz", ssl=ssl.create_default_context()):
                pass


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="signing_algorithm"):
        EmulatorConfig(signing_algorithm="HS256")
    with pytest.raises(ValueError):
        EmulatorConfig(max_expiration_seconds=0)
    with pytest.raises(ValueError, match="loopback"):
        EmulatorConfig(host="0.0.0.0")
    EmulatorConfig(host="::1")
    EmulatorConfig(host="localhost")
    assert EmulatorConfig().api_audiences == ["https://kubernetes.default.svc.cluster.local"]
    assert EmulatorConfig(issuer="https://issuer.example").api_audiences == [
        "https://issuer.example"
    ]
    emu = Emulator(seed=SEED, node_binding=True, max_expiration_seconds=900)
    assert (emu.config.node_binding, emu.config.max_expiration_seconds) == (True, 900)
    assert repr(emu) == "Emulator(stopped)"
    with pytest.raises(RuntimeError):
        _ = emu.url


async def test_fresh_and_pinned_signing_keys() -> None:
    a = Emulator(seed=SEED, reuse_signing_key=False, signing_algorithm="ES256")
    b = Emulator(seed=SEED, reuse_signing_key=False, signing_algorithm="ES256")
    assert a.jwks() != b.jwks()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    c = Emulator(seed=SEED, signing_key_pem=pem, signing_algorithm="ES256")
    d = Emulator(seed=SEED, signing_key_pem=pem, signing_algorithm="ES256")
    assert c.jwks() == d.jwks()
    with pytest.raises(ValueError, match="does not fit RS256"):
        Emulator(seed=SEED, signing_key_pem=pem).jwks()


async def test_run_emulator_forever_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stop = asyncio.Event()
    ready = tmp_path / "ready.json"
    kubeconfig = tmp_path / "kc"
    task = asyncio.create_task(
        run_emulator_forever(
            EmulatorConfig(seed=SEED), kubeconfig, ready, stop=stop, handle_signals=False
        )
    )
    for _ in range(500):
        if ready.exists() or task.done():
            break
        await asyncio.sleep(0.01)
    info = json.loads(ready.read_text())
    token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    assert token == BROKER_TOKEN  # the seed's first user
    async with EmulatorClient(info["url"], Path(info["caFile"]), token) as client:
        assert (await client.create_token(NS, SA)).status == 201
    stop.set()
    await asyncio.wait_for(task, 10)
    assert capsys.readouterr().out == f"{info['url']}\n"
