"""Support for the hardening tests (test_hardening_*.py): a real broker on the emulator with its
audit log in a file, optionally a JWT issuer (tests/support/jwt_issuer.py) whose `ci/runner`
the policy allows, hostile bearers built by hand, and the marker of a value cut to its bound."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from grpc import aio

from broker.config import KubernetesSettings, Settings, load_settings
from broker.errors import RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.server import BrokerServer
from tests.support.jwt_issuer import ISSUER, Signer, b64, issuer_settings, rsa_key, write_jwks
from tests.support.stack import CORE_POLICY, access_config

JWT_SUBJECT = "ci/runner"
MB = 1_000_000


def sha12(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def marker(value: str) -> str:
    """What broker.bounded writes after the kept part of a value it cut."""
    return f"...(truncated: {len(value)} chars, sha256:{sha12(value)})"


def deep_json(levels: int, *, alg: bool = True) -> str:
    """A JSON object (with `alg` when asked) holding arrays nested `levels` deep."""
    nested = "[" * levels + "]" * levels
    return '{"alg":"RS256","x":' + nested + "}" if alg else '{"x":' + nested + "}"


def hostile_jwt(header: str, payload: str, signature: str = "c2lnbmF0dXJl") -> str:
    """A compact JWS of the given header and payload texts (unsigned: any signature)."""
    return f"{b64(header.encode())}.{b64(payload.encode())}.{signature}"


def policy_with_jwt_caller(directory: Path) -> Path:
    """The core-tests policy, with the JWT issuer's `ci/runner` among its subjects."""
    policy = yaml.safe_load(CORE_POLICY.read_text(encoding="utf-8"))
    policy["rules"][0]["subjects"].append({"method": "jwt", "issuer": ISSUER, "name": JWT_SUBJECT})
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(policy), encoding="utf-8")
    return path


def hardening_settings(
    kube: KubernetesSettings,
    directory: Path,
    *,
    signer: Signer | None = None,
    rate_limit: dict[str, Any] | None = None,
    unix_socket: Path | None = None,
) -> Settings:
    """stack's callers and policy, the audit log in `directory`/audit.jsonl, and with a
    `signer` its issuer (JWKS file) and a policy allowing its tokens; a unix socket listener
    too when asked (its callers are stack's LOCAL_CALLER). No cache, and only the limits
    given (the per-peer failure limit keeps its default unless `rate_limit` sets it)."""
    access = access_config()
    if signer is not None:
        jwks = write_jwks(directory / "jwks.json", signer.jwk())
        access["authentication"].update(issuer_settings(jwksFile=str(jwks)))
        access["policy"] = {"file": str(policy_with_jwt_caller(directory))}
    return load_settings(
        None,
        {
            "server": {
                "listen": "127.0.0.1:0",
                "allowPlaintext": True,
                "unixSocket": str(unix_socket) if unix_socket is not None else None,
            },
            "kubernetes": kube,
            "cache": {"enabled": False},
            "rateLimit": rate_limit if rate_limit is not None else {"enabled": False},
            "audit": {"sink": "file", "file": str(directory / "audit.jsonl")},
            **access,
        },
    )


@dataclass
class Running:
    server: BrokerServer
    audit_file: Path

    def audit_lines(self) -> list[str]:
        if not self.audit_file.exists():
            return []
        return self.audit_file.read_text(encoding="utf-8").splitlines()

    def audit_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_lines()]

    def sample(self, name: str, **labels: str) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Running]:
    assert settings.audit.file is not None
    server = BrokerServer(settings)
    await server.start()
    try:
        yield Running(server, settings.audit.file)
    finally:
        await server.stop(None)


async def create(
    address: str,  # host:port, or unix:<path>
    request: pb.CreateTokenRequest,
    *,
    bearer: str | None = None,
    request_id: str | None = None,
) -> tuple[pb.CreateTokenResponse | None, RichStatus | None]:
    """One CreateToken call on a channel of its own: (response, None) or (None, status)."""
    metadata = []
    if bearer is not None:
        metadata.append(("authorization", f"Bearer {bearer}"))
    if request_id is not None:
        metadata.append(("x-request-id", request_id))
    async with aio.insecure_channel(address) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        try:
            return await stub.CreateToken(request, metadata=metadata, timeout=15), None
        except aio.AioRpcError as err:
            return None, rich_status_from_call(err)


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Bounded wait (e.g. for an access line: the interceptor logs just after the answer)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def new_signer() -> Signer:
    return Signer(rsa_key(), "hardening-rsa-1", "RS256")
