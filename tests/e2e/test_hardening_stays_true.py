"""What stays true when things are deleted under a running broker (issue 14, item 4b).

1. A cached token whose service account was deleted (or deleted and recreated: a new UID). The
   API server itself refuses such a token (it checks that the service account in the token's
   `kubernetes.io.serviceaccount` claim still exists with that UID), so serving it is a
   question of usefulness, not of privilege. The broker serves a cached token until its refresh
   point unless it has learnt otherwise; it learns from the API server's own answers about that
   service account: a refresh or another request answered NOT_FOUND for the service account,
   or a token minted for it with another service-account UID. Then it drops every cached token
   of the old service account.
2. The API key file: deleted (a mounted Secret briefly missing while the kubelet updates it),
   emptied or without a `keys:` list, the last good keys stay in force, with SIGHUP as with the
   poll; only a `keys:` list that is empty revokes every key of the file.

Through the real stack: a gRPC client, a BrokerServer (or `python -m broker serve` for
SIGHUP), kubernetes.aio, the API-server emulator (whose store the tests change as an
administrator would). The token cache's clock is moved by hand, never slept.
"""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc import aio

from broker.authn import hash_api_key
from broker.config import KubernetesSettings, load_settings
from broker.emulator import Emulator
from broker.emulator.client import EmulatorClient
from broker.errors import RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.server import BrokerServer
from tests.support.cli import Spawn, serve_config
from tests.support.hardening import eventually
from tests.support.stack import (
    CALLER,
    CALLER_KEY,
    CORE_POLICY,
    NAMESPACE,
    POD,
    SERVICE_ACCOUNT,
    BearerCredential,
    broker_settings,
    create_request,
)

SA_PATH = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{SERVICE_ACCOUNT}"
LIFETIME = 3600  # the API server's default, which these requests get
PAST_THE_REFRESH_POINT = 0.8 * LIFETIME + 1  # kubelet's rule, whatever the jitter
VAULT = "https://vault.example.com"
STS = "sts.example.com"
BOUND_TO_POD = pb.BoundObjectReference(kind="Pod", name=POD)


class Clock:
    """The token cache's clock: moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Cached:
    """A broker with its token cache on, its cache's clock, and the emulator behind it."""

    server: BrokerServer
    stub: pb_grpc.TokenBrokerServiceStub
    clock: Clock
    emulator: Emulator

    async def token(self, *audiences: str, bound: pb.BoundObjectReference | None = None) -> str:
        response = await self.stub.CreateToken(
            create_request(audiences=list(audiences), bound=bound), timeout=10
        )
        return str(response.token_request.status.token)

    async def refusal(
        self, *audiences: str, bound: pb.BoundObjectReference | None = None
    ) -> RichStatus:
        try:
            await self.stub.CreateToken(
                create_request(audiences=list(audiences), bound=bound), timeout=10
            )
        except aio.AioRpcError as err:
            return rich_status_from_call(err)
        raise AssertionError("a token was issued")

    @property
    def upstream_calls(self) -> int:
        return self.emulator.token_request_count

    @property
    def cached(self) -> int:
        return len(self.server.cache)

    async def api_server_accepts(self, token: str) -> bool:
        """Whether the API server authenticates `token` (a 403 is authenticated, not allowed)."""
        async with EmulatorClient(self.emulator.url, self.emulator.ca_file) as client:
            reply = await client.request("GET", SA_PATH, token=token)
        assert reply.status in (200, 401, 403), reply.text
        return reply.status != 401

    def recreate_service_account(self) -> None:
        self.emulator.store.delete_service_account(NAMESPACE, SERVICE_ACCOUNT)
        self.emulator.store.create_service_account(NAMESPACE, SERVICE_ACCOUNT)  # a new UID


def service_account_uid(token: str) -> str:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["kubernetes.io"]["serviceaccount"]["uid"])


def not_found(status: RichStatus, kind: str) -> bool:
    assert status.code == grpc.StatusCode.NOT_FOUND, status
    assert status.error_info is not None
    return bool(status.error_info.metadata["kubernetesKind"] == kind)


@pytest.fixture
async def cached(
    request: pytest.FixtureRequest, kubernetes_settings: KubernetesSettings, emulator: Emulator
) -> AsyncIterator[Cached]:
    clock = Clock()
    cache = {"enabled": True, **getattr(request, "param", {})}
    settings = broker_settings(kubernetes_settings, cache=cache)
    async with (
        BrokerServer(settings, clock=clock) as server,
        aio.insecure_channel(server.address, interceptors=[BearerCredential(CALLER_KEY)]) as ch,
    ):
        yield Cached(server, pb_grpc.TokenBrokerServiceStub(ch), clock, emulator)


# --- 1. a cached token of a deleted service account ---------------------------------------------


async def test_a_deleted_service_accounts_token_is_served_until_its_refresh_point(
    cached: Cached,
) -> None:
    token = await cached.token()  # for the API server's own audience
    assert await cached.api_server_accepts(token)
    cached.emulator.store.delete_service_account(NAMESPACE, SERVICE_ACCOUNT)
    # The API server refuses the token now; the broker cannot know without asking.
    assert not await cached.api_server_accepts(token)
    assert await cached.token() == token
    assert cached.upstream_calls == 1
    # At the refresh point the API server's answer is passed on, and the entry dropped.
    cached.clock.now += PAST_THE_REFRESH_POINT
    assert not_found(await cached.refusal(), "serviceaccounts")
    assert cached.upstream_calls == 2 and cached.cached == 0
    # Never the dead token again: each request asks the API server.
    assert not_found(await cached.refusal(), "serviceaccounts")
    assert cached.upstream_calls == 3


async def test_a_recreated_service_account_gets_a_fresh_token_at_the_refresh_point(
    cached: Cached,
) -> None:
    token = await cached.token()
    cached.recreate_service_account()
    assert not await cached.api_server_accepts(token)  # another UID: not this account's token
    assert await cached.token() == token
    cached.clock.now += PAST_THE_REFRESH_POINT
    fresh = await cached.token()
    assert fresh != token and await cached.api_server_accepts(fresh)
    uid = cached.emulator.store.get_service_account(NAMESPACE, SERVICE_ACCOUNT).uid
    assert service_account_uid(fresh) == uid != service_account_uid(token)


async def test_a_token_minted_for_the_recreated_account_drops_the_old_accounts_tokens(
    cached: Cached,
) -> None:
    old = {audience: await cached.token(audience) for audience in (VAULT, STS)}
    api = await cached.token()
    cached.recreate_service_account()
    # Another token shape for the same service account: a miss, minted with the new UID...
    bound = await cached.token(bound=BOUND_TO_POD)
    assert await cached.api_server_accepts(bound)
    assert cached.cached == 1  # ...and the broker drops the three tokens of the old account
    calls = cached.upstream_calls
    fresh = {audience: await cached.token(audience) for audience in (VAULT, STS)}
    assert cached.upstream_calls == calls + 2
    assert all(fresh[audience] != old[audience] for audience in old)
    assert await cached.token() != api


async def test_a_not_found_service_account_drops_its_other_cached_tokens(
    cached: Cached,
) -> None:
    await cached.token(VAULT)
    await cached.token(STS)
    cached.emulator.store.delete_service_account(NAMESPACE, SERVICE_ACCOUNT)
    # A new shape for the deleted account: the API server says it is gone...
    assert not_found(await cached.refusal(bound=BOUND_TO_POD), "serviceaccounts")
    assert cached.cached == 0
    # ...so the cached tokens of other shapes are not handed out any more.
    calls = cached.upstream_calls
    assert not_found(await cached.refusal(VAULT), "serviceaccounts")
    assert cached.upstream_calls == calls + 1


async def test_another_objects_not_found_keeps_the_accounts_cached_tokens(
    cached: Cached,
) -> None:
    token = await cached.token(VAULT)
    cached.emulator.store.delete_pod(NAMESPACE, POD)
    assert not_found(await cached.refusal(bound=BOUND_TO_POD), "pods")
    # The service account is still there: its cached token stays.
    assert await cached.token(VAULT) == token
    assert cached.cached == 1


@pytest.mark.parametrize("cached", [{"maxEntries": 2}], indirect=True)
async def test_evicted_entries_leave_no_trace_behind(cached: Cached) -> None:
    await cached.token(VAULT)
    await cached.token(STS)
    await cached.token()  # evicts VAULT's (least recently used)
    cached.recreate_service_account()
    await cached.token(bound=BOUND_TO_POD)  # the new UID: the two left are dropped
    assert cached.cached == 1
    calls = cached.upstream_calls
    await cached.token(VAULT)
    await cached.token(STS)
    assert cached.upstream_calls == calls + 2


# --- 2. the API key file --------------------------------------------------------------------------


def write_keys(path: Path, entries: list[dict[str, str]] | None) -> None:
    """The key file: these entries under `keys:`, or (None) a mapping without `keys`."""
    path.write_text(yaml.safe_dump({"keys": entries} if entries is not None else {}))


CALLER_ENTRY = [{"name": CALLER, "sha256": hash_api_key(CALLER_KEY)}]


async def test_serve_keeps_the_last_good_keys_when_the_file_is_deleted_until_keys_is_emptied(
    spawn: Spawn, kubeconfig: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "api-keys.yaml"
    write_keys(keys, CALLER_ENTRY)
    config = serve_config(
        tmp_path / "config.yaml",
        kubeconfig,
        # Far longer than the test: only SIGHUP re-reads the file.
        authentication={"apiKeys": {"file": str(keys)}, "reloadIntervalSeconds": 3600},
    )
    process = await spawn("serve", "--config", str(config))
    ready = json.loads(process.stderr[await process.wait_for("serving", stream="stderr")])

    async def token() -> grpc.StatusCode:
        """CreateToken with the caller's API key, on a connection of its own."""
        async with aio.insecure_channel(
            ready["listen"], interceptors=[BearerCredential(CALLER_KEY)]
        ) as channel:
            try:
                await pb_grpc.TokenBrokerServiceStub(channel).CreateToken(
                    create_request(), timeout=10
                )
            except aio.AioRpcError as err:
                return err.code()
        return grpc.StatusCode.OK

    def refusals() -> list[str]:
        return [line for line in process.stderr if "API key file reload refused" in line]

    async def sighup_refused() -> None:
        before = len(refusals())
        process.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: len(refusals()) > before, "the refusal logged")

    assert await token() == grpc.StatusCode.OK
    # The mounted Secret is briefly missing (or holds no `keys:` list): the keys stay.
    keys.unlink()
    await sighup_refused()
    assert await token() == grpc.StatusCode.OK
    write_keys(keys, None)
    await sighup_refused()
    keys.write_text("")
    await sighup_refused()
    assert await token() == grpc.StatusCode.OK
    # An emptied `keys:` list is what revokes.
    write_keys(keys, [])
    process.proc.send_signal(signal.SIGHUP)
    await process.wait_for("API key file reloaded", stream="stderr")
    assert await token() == grpc.StatusCode.UNAUTHENTICATED
    assert await process.terminate() == 0
    deleted, without_keys, empty = refusals()
    assert "cannot read" in deleted
    assert "keys: Field required" in without_keys
    assert "must hold a mapping with a `keys` list" in empty


async def test_the_poll_keeps_the_last_good_keys_while_the_file_is_missing(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    keys = tmp_path / "api-keys.yaml"
    write_keys(keys, CALLER_ENTRY)
    settings = load_settings(
        None,
        {
            "server": {"listen": "127.0.0.1:0", "allowPlaintext": True},
            "kubernetes": kubernetes_settings,
            "authentication": {"apiKeys": {"file": str(keys)}, "reloadIntervalSeconds": 0.05},
            "policy": {"file": str(CORE_POLICY)},
            "cache": {"enabled": False},
            "rateLimit": {"enabled": False},
        },
    )
    async with (
        BrokerServer(settings) as server,
        aio.insecure_channel(server.address, interceptors=[BearerCredential(CALLER_KEY)]) as ch,
    ):
        stub = pb_grpc.TokenBrokerServiceStub(ch)
        [files] = [f for f in server.reloading_files if f.paths == (keys,)]

        assert (await stub.CreateToken(create_request(), timeout=10)).token_request.status.token
        keys.unlink()
        await eventually(lambda: files.last_error is not None, "the deletion polled")
        assert "cannot read" in str(files.last_error)
        assert (await stub.CreateToken(create_request(), timeout=10)).token_request.status.token
        write_keys(keys, [])
        await eventually(lambda: files.reload_count == 1, "the emptied list polled")
        with pytest.raises(aio.AioRpcError) as refused:
            await stub.CreateToken(create_request(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
