"""The redesigned request path (broker.request_path): what a repeated call skips, and what it
never skips.

A cache hit is authenticate -> decision memo -> rate limits -> token cache -> answer, its
answer serialized once per token and its audit line from a template. Every guarantee of the
full path holds for such a call: the policy in force decides it (a reload that now denies
denies the very next call), a key removed from the key file or a JWT that expired or whose
keys rotated is refused, the rate limits count it, the metrics and the audit and access lines
are exact; and the memo is bounded and holds no token or credential. The broker runs for real
(gRPC client -> broker -> kubernetes.aio -> emulator), with its token cache on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc import aio

from broker.authn import hash_api_key
from broker.config import KubernetesSettings, Settings, load_settings
from broker.decision_memo import DecisionMemo
from broker.errors import RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import Reason
from broker.server import BrokerServer
from tests.support.hardening import JWT_SUBJECT, new_signer
from tests.support.jwt_issuer import ISSUER, Signer, issuer_settings, write_jwks
from tests.support.stack import CALLER, CALLER_KEY, CORE_POLICY, NAMESPACE, create_request
from tests.support.suite_secrets import SUITE

OTHER_KEY = "tbk_hot-path-other-key-7b2e91"
OTHER_CALLER = "hot-path-other"


def policy_file(directory: Path, *, allow: bool = True) -> Path:
    """The core-tests policy (and the JWT issuer's `ci/runner`); `allow=False`: the same rule,
    now refusing requests that name no audience (AUDIENCE_REQUIRED)."""
    policy = yaml.safe_load(CORE_POLICY.read_text(encoding="utf-8"))
    rule = policy["rules"][0]
    rule["subjects"] += [
        {"method": "jwt", "issuer": ISSUER, "name": JWT_SUBJECT},
        {"method": "apiKey", "name": OTHER_CALLER},
    ]
    if not allow:
        rule["allowApiServerAudience"] = False
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(policy), encoding="utf-8")
    return path


def key_file(directory: Path, *names_and_keys: tuple[str, str]) -> Path:
    path = directory / "keys.yaml"
    keys = [{"name": name, "sha256": hash_api_key(key)} for name, key in names_and_keys]
    path.write_text(yaml.safe_dump({"keys": keys}), encoding="utf-8")
    return path


def hot_settings(
    kube: KubernetesSettings,
    directory: Path,
    *,
    signer: Signer | None = None,
    rate_limit: dict[str, Any] | None = None,
    **issuer: Any,
) -> Settings:
    """A broker with its token cache on, its audit log in `directory`/audit.jsonl, the API
    keys of CALLER and OTHER_CALLER in a key file, and with `signer` its JWT issuer (a JWKS
    file); every followed file in `directory`, rewritten by the tests."""
    authentication: dict[str, Any] = {
        "apiKeys": {
            "file": str(key_file(directory, (CALLER, CALLER_KEY), (OTHER_CALLER, OTHER_KEY)))
        }
    }
    if signer is not None:
        jwks = write_jwks(directory / "jwks.json", signer.jwk())
        authentication.update(issuer_settings(jwksFile=str(jwks), **issuer))
    return load_settings(
        None,
        {
            "server": {"listen": "127.0.0.1:0", "allowPlaintext": True},
            "kubernetes": kube,
            "cache": {"enabled": True},
            "rateLimit": rate_limit if rate_limit is not None else {"enabled": False},
            "audit": {"sink": "file", "file": str(directory / "audit.jsonl")},
            "authentication": authentication,
            "policy": {"file": str(policy_file(directory))},
        },
    )


class Hot:
    """A running broker, its audit lines and metrics, and a channel to it."""

    def __init__(self, server: BrokerServer, directory: Path, channel: aio.Channel) -> None:
        self.server = server
        self.directory = directory
        self.stub = pb_grpc.TokenBrokerServiceStub(channel)

    async def call(
        self,
        request: pb.CreateTokenRequest | None = None,
        *,
        bearer: str = CALLER_KEY,
        request_id: str | None = None,
    ) -> tuple[pb.CreateTokenResponse | None, RichStatus | None]:
        metadata = [("authorization", f"Bearer {bearer}")]
        if request_id is not None:
            metadata.append(("x-request-id", request_id))
        try:
            return await self.stub.CreateToken(
                request or create_request(), metadata=metadata, timeout=15
            ), None
        except aio.AioRpcError as err:
            return None, rich_status_from_call(err)

    async def reload(self) -> None:
        """What SIGHUP does: every followed file re-read now."""
        for files in self.server.reloading_files:
            await files.reload()

    def audit(self) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        SUITE.add("hot path audit", text)
        return [json.loads(line) for line in text.splitlines()]

    def sample(self, name: str, **labels: str) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def hot_broker(settings: Settings, directory: Path) -> AsyncIterator[Hot]:
    server = BrokerServer(settings)
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield Hot(server, directory, channel)
    finally:
        await server.stop(None)


def memo_of(hot: Hot) -> DecisionMemo:
    return hot.server.request_path.memo


# --- what a repeated call never skips ----------------------------------------------------------


async def test_a_policy_reload_that_denies_denies_the_very_next_hit(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    async with hot_broker(hot_settings(kubernetes_settings, tmp_path), tmp_path) as hot:
        for _ in range(3):
            answer, error = await hot.call()
            assert error is None and answer is not None
        assert memo_of(hot).stats.hits == 2
        assert hot.sample("token_broker_cache_hits_total") == 2

        policy_file(tmp_path, allow=False)
        await hot.reload()
        answer, error = await hot.call()
        assert answer is None and error is not None
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert error.error_info is not None
        assert error.error_info.reason == Reason.AUDIENCE_REQUIRED
        last = hot.audit()[-1]
        assert (last["decision"], last["rule"], last["jti"]) == ("denied", "core-tests", None)
        labels = {"result": "denied", "reason": Reason.AUDIENCE_REQUIRED}
        assert hot.sample("token_broker_policy_decisions_total", **labels) == 1

        policy_file(tmp_path)
        await hot.reload()
        answer, error = await hot.call()
        assert error is None and answer is not None


async def test_a_key_removed_from_the_key_file_is_refused_on_the_next_call(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    async with hot_broker(hot_settings(kubernetes_settings, tmp_path), tmp_path) as hot:
        for _ in range(2):
            assert (await hot.call(bearer=OTHER_KEY))[1] is None
        key_file(tmp_path, (CALLER, CALLER_KEY))
        await hot.reload()
        _, error = await hot.call(bearer=OTHER_KEY)
        assert error is not None and error.code == grpc.StatusCode.UNAUTHENTICATED
        assert error.error_info is not None
        assert error.error_info.reason == Reason.CREDENTIALS_INVALID
        assert (await hot.call())[1] is None  # the key still in the file still works


async def test_a_jwt_is_refused_once_its_keys_rotate(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    signer = new_signer()
    settings = hot_settings(kubernetes_settings, tmp_path, signer=signer)
    async with hot_broker(settings, tmp_path) as hot:
        token = signer.mint()
        for _ in range(3):
            assert (await hot.call(bearer=token))[1] is None
        # Rotated: the issuer's key set no longer holds the key that signed the token.
        rotated = new_signer()
        rotated.kid = "hardening-rsa-2"
        write_jwks(tmp_path / "jwks.json", rotated.jwk())
        await hot.reload()
        _, error = await hot.call(bearer=token)
        assert error is not None and error.code == grpc.StatusCode.UNAUTHENTICATED
        assert (await hot.call(bearer=rotated.mint()))[1] is None


async def test_a_remembered_jwt_is_refused_once_it_expires(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    signer = new_signer()
    settings = hot_settings(kubernetes_settings, tmp_path, signer=signer, clockSkewSeconds=0)
    async with hot_broker(settings, tmp_path) as hot:
        token = signer.mint(exp=2)
        for _ in range(2):
            assert (await hot.call(bearer=token))[1] is None
        # Let the token expire (no clock to move: PyJWT reads the wall clock).
        while time.time() < json.loads(_payload(token))["exp"] + 0.5:
            await asyncio.sleep(0.1)
        _, error = await hot.call(bearer=token)
        assert error is not None and error.code == grpc.StatusCode.UNAUTHENTICATED
        refusals = [line for line in hot.audit() if line["reason"] == Reason.CREDENTIALS_INVALID]
        assert len(refusals) == 1


def _payload(token: str) -> str:
    import base64

    segment = token.split(".")[1]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)).decode()


async def test_rate_limits_count_every_remembered_call(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    limits = {"enabled": True, "perCaller": {"rate": 0.001, "burst": 3}}
    settings = hot_settings(kubernetes_settings, tmp_path, rate_limit=limits)
    async with hot_broker(settings, tmp_path) as hot:
        for _ in range(3):
            assert (await hot.call())[1] is None
        _, error = await hot.call()
        assert error is not None and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.error_info is not None and error.error_info.reason == Reason.RATE_LIMITED
        assert memo_of(hot).stats.hits == 3
        assert hot.sample("token_broker_rate_limit_refusals_total", scope="caller") == 1


async def test_metrics_and_audit_lines_are_exact_for_remembered_hits(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    calls = 5
    async with hot_broker(hot_settings(kubernetes_settings, tmp_path), tmp_path) as hot:
        answers = []
        for i in range(calls):
            answer, error = await hot.call(request_id=f"hot-{i}")
            assert error is None and answer is not None
            answers.append(answer)
        # One token, minted once, handed out five times, each time the same bytes.
        assert len({a.SerializeToString() for a in answers}) == 1
        assert hot.sample("token_broker_cache_hits_total") == calls - 1
        assert memo_of(hot).stats.hits == calls - 1
        grpc_labels = {
            "grpc_type": "unary",
            "grpc_service": "tokenbroker.v1.TokenBrokerService",
            "grpc_method": "CreateToken",
        }
        assert hot.sample("grpc_server_started_total", **grpc_labels) == calls
        assert hot.sample("grpc_server_msg_received_total", **grpc_labels) == calls
        assert hot.sample("grpc_server_msg_sent_total", **grpc_labels) == calls
        assert hot.sample("grpc_server_handled_total", grpc_code="OK", **grpc_labels) == calls
        assert hot.sample("grpc_server_handling_seconds_count", **grpc_labels) == calls
        assert hot.sample("token_broker_tokens_issued_total", namespace=NAMESPACE) == calls
        allowed = {"result": "allowed", "reason": "ALLOWED"}
        assert hot.sample("token_broker_policy_decisions_total", **allowed) == calls
        assert hot.sample("token_broker_token_requested_lifetime_seconds_count") == calls
        assert hot.sample("token_broker_token_granted_lifetime_seconds_count") == calls
        assert hot.sample("token_broker_in_flight_requests") == 0
        assert hot.sample("token_broker_decision_memo_hits_total") == calls - 1

        lines = hot.audit()
        assert [line["requestID"] for line in lines] == [f"hot-{i}" for i in range(calls)]
        jti = lines[0]["jti"]
        assert jti and all(line["jti"] == jti for line in lines)
        assert all(line["rule"] == "core-tests" for line in lines)
        assert [line["upstreamStatus"] for line in lines] == [201] + [None] * (calls - 1)
        # A hit's line is the record's own line: the same keys, in the same order.
        assert list(lines[1]) == list(lines[0])


async def test_the_request_id_comes_back_in_the_response_headers_of_a_hit(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    async with hot_broker(hot_settings(kubernetes_settings, tmp_path), tmp_path) as hot:
        for i in range(3):
            call = hot.stub.CreateToken(
                create_request(),
                metadata=(("authorization", f"Bearer {CALLER_KEY}"), ("x-request-id", f"h-{i}")),
                timeout=15,
            )
            await call
            headers = dict(await call.initial_metadata())
            assert headers["x-request-id"] == f"h-{i}"


async def test_invalid_requests_remembered_never_reach_the_api_server(
    kubernetes_settings: KubernetesSettings, tmp_path: Path, emulator: Any
) -> None:
    async with hot_broker(hot_settings(kubernetes_settings, tmp_path), tmp_path) as hot:
        before = emulator.token_request_count
        for _ in range(3):
            _, error = await hot.call(create_request(namespace="Not_A_Name"))
            assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.error_info is not None
            assert error.error_info.reason == Reason.REQUEST_INVALID
        assert emulator.token_request_count == before
        assert [line["reason"] for line in hot.audit()] == [Reason.REQUEST_INVALID] * 3


async def test_the_memo_holds_no_token_and_no_credential(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    signer = new_signer()
    settings = hot_settings(kubernetes_settings, tmp_path, signer=signer)
    async with hot_broker(settings, tmp_path) as hot:
        jwt = signer.mint()
        tokens = []
        for bearer in (CALLER_KEY, CALLER_KEY, jwt, jwt):
            answer, error = await hot.call(bearer=bearer)
            assert error is None and answer is not None
            tokens.append(answer.token_request.status.token)
        memo = memo_of(hot)
        assert len(memo) == 2 and memo.stats.hits == 2
        remembered = repr(list(memo._entries.items()))
        verified = hot.server.request_path._authenticator._jwt._verified  # type: ignore[union-attr]
        remembered += repr(list(verified.items()))
        SUITE.add("hot path memo", remembered)
        for secret in (CALLER_KEY, OTHER_KEY, jwt, jwt.split(".")[2], *tokens):
            assert secret not in remembered
