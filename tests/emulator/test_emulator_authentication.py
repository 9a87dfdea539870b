"""The emulator accepts its own service-account tokens as kube-apiserver's service-account
token authenticator does (what kubectl with the `token-broker exec-credential` plugin needs):
authenticated as the service account, then authorized; refused when another audience, tampered,
expired, from another issuer, or when the bound pod or the service account is gone."""

from __future__ import annotations

import time
from typing import Any

from broker.emulator import Emulator
from broker.emulator.client import EmulatorClient
from broker.emulator.tokens import BoundObject, build_claims
from tests.support.emulator import ISSUER, NS, POD, SA

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
