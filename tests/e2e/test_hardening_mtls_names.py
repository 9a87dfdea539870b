"""Hardening: certificate-name confusion. An mtls subject matches one certificate field (the URI
SAN unless it says `field: dns` or `field: cn`), and a SPIFFE-shaped subject only a URI SAN
that is a valid SPIFFE ID, per path segment.

Through the real stack: a BrokerServer with mutual TLS (a trustme CA signs the client
certificates, tests/support/certs.py), the API-server emulator, a policy file and the audit
log in a file. The SPIFFE ID rules of broker.spiffe table by table, and `token-broker policy
validate` / `explain` in-process: tests/unit/test_hardening_mtls_names.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc import aio

from broker.config import KubernetesSettings, load_settings
from broker.errors import RichStatus, rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import Reason
from broker.server import BrokerServer
from tests.support.certs import CI_RULE, client_cert, rule
from tests.support.cli import Pki, issue
from tests.support.stack import create_request

# --- a broker with mutual TLS -------------------------------------------------------------------


@dataclass
class Broker:
    server: BrokerServer
    pki: Pki
    audit_file: Path

    async def create(self, *, cn: str | None = None, **names: tuple[str, ...]) -> RichStatus | None:
        """CreateToken with a client certificate of these names: None when a token came back,
        else the refusal."""
        cert, key = client_cert(self.pki.ca, cn=cn, **names)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca_file.read_bytes(), private_key=key, certificate_chain=cert
        )
        async with aio.secure_channel(self.server.address, creds) as channel:
            try:
                response = await pb_grpc.TokenBrokerServiceStub(channel).CreateToken(
                    create_request(), timeout=20
                )
            except aio.AioRpcError as err:
                return rich_status_from_call(err)
        assert response.token_request.status.token
        return None

    def last_audit(self) -> dict[str, Any]:
        return dict(json.loads(self.audit_file.read_text().splitlines()[-1]))


MakeBroker = Callable[[list[dict[str, Any]]], Awaitable[Broker]]


@pytest.fixture
async def make_broker(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> AsyncIterator[MakeBroker]:
    pki = issue(tmp_path, "pki", "localhost", "127.0.0.1")
    started: list[BrokerServer] = []

    async def make(rules: list[dict[str, Any]]) -> Broker:
        n = len(started)
        policy = tmp_path / f"policy-{n}.yaml"
        policy.write_text(yaml.safe_dump({"rules": rules}))
        audit = tmp_path / f"audit-{n}.jsonl"
        settings = load_settings(
            None,
            {
                "server": {
                    "listen": "127.0.0.1:0",
                    "tls": {
                        "certFile": str(pki.cert),
                        "keyFile": str(pki.key),
                        "clientCaFile": str(pki.ca_file),
                        "requireClientCert": True,
                    },
                },
                "kubernetes": kubernetes_settings,
                "authentication": {"mtls": {"enabled": True}},
                "policy": {"file": str(policy)},
                "audit": {"sink": "file", "file": str(audit)},
                "cache": {"enabled": False},
                "rateLimit": {"enabled": False},
            },
        )
        server = BrokerServer(settings)
        await server.start()
        started.append(server)
        return Broker(server, pki, audit)

    try:
        yield make
    finally:
        for server in started:
            await server.stop(None)


def denied(status: RichStatus | None) -> bool:
    assert status is not None, "a token was issued"
    assert status.code == grpc.StatusCode.PERMISSION_DENIED, status
    assert status.error_info is not None and status.error_info.reason == Reason.NO_MATCHING_RULE
    return True


# --- the bypasses of the issue, against the issue's rule (no `field`: the default) -------------


BYPASSES = {
    "CN only, SPIFFE-looking": {"cn": "spiffe://example.org/ci/evil"},
    "DNS SAN, SPIFFE-looking": {"dns": ("spiffe://example.org/ci/dns",)},
    "URI SAN with a '..' segment": {"uris": ("spiffe://example.org/ci/../admin",)},
    "URI SAN with a '.' segment": {"uris": ("spiffe://example.org/ci/./x",)},
    "'*' crossing '/'": {"uris": ("spiffe://example.org/ci/team/runner",)},
    "percent-encoding": {"uris": ("spiffe://example.org/ci/%2e%2e",)},
    "empty segment": {"uris": ("spiffe://example.org/ci//runner",)},
    "trailing '/'": {"uris": ("spiffe://example.org/ci/runner/",)},
    "uppercase scheme": {"uris": ("SPIFFE://example.org/ci/runner",)},
    "port in the trust domain": {"uris": ("spiffe://example.org:443/ci/runner",)},
    "query": {"uris": ("spiffe://example.org/ci/runner?admin=1",)},
    "two URI SANs": {"uris": ("spiffe://example.org/ci/runner", "spiffe://example.org/ci/other")},
}


@pytest.mark.parametrize("names", BYPASSES.values(), ids=BYPASSES.keys())
async def test_spiffe_rule_refuses_every_name_that_is_not_its_spiffe_id(
    make_broker: MakeBroker, names: dict[str, Any]
) -> None:
    broker = await make_broker([CI_RULE])
    assert denied(await broker.create(**names))
    line = broker.last_audit()
    assert (line["decision"], line["reason"], line["rule"]) == (
        "denied",
        Reason.NO_MATCHING_RULE,
        None,
    )


async def test_spiffe_rule_allows_its_spiffe_id_and_says_which_field(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker([CI_RULE])
    # A CN and a DNS SAN next to it change nothing: the URI SAN is the identity.
    assert await broker.create(uris=("spiffe://example.org/ci/runner",), cn="x", dns=("y",)) is None
    line = broker.last_audit()
    assert (line["user"], line["authMethod"], line["certificateField"]) == (
        "spiffe://example.org/ci/runner",
        "mtls",
        "uri",
    )
    assert (line["decision"], line["rule"]) == ("allowed", "ci-spiffe")


async def test_any_depth_pattern_and_explicit_dns_and_cn_subjects(
    make_broker: MakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.access")
    broker = await make_broker(
        [
            rule("deep", {"method": "mtls", "name": "spiffe://example.org/deep/**"}),
            rule("by-dns", {"method": "mtls", "field": "dns", "name": "*.runners.example"}),
            rule("by-cn", {"method": "mtls", "field": "cn", "name": "legacy-client"}),
            rule("legacy-no-field", {"method": "mtls", "name": "old-*"}),
        ]
    )
    assert await broker.create(uris=("spiffe://example.org/deep/a/b/c",)) is None
    assert broker.last_audit()["rule"] == "deep"
    assert denied(await broker.create(uris=("spiffe://example.org/deep",)))  # one or more

    assert await broker.create(dns=("a.example", "build.runners.example")) is None
    line = broker.last_audit()
    assert (line["user"], line["certificateField"], line["rule"]) == ("a.example", "dns", "by-dns")
    # A dns subject never looks at the CN, a cn subject never at a SAN.
    assert denied(await broker.create(cn="build.runners.example"))
    assert denied(await broker.create(dns=("legacy-client",)))

    assert await broker.create(cn="legacy-client") is None
    line = broker.last_audit()
    assert (line["user"], line["certificateField"], line["rule"]) == (
        "legacy-client",
        "cn",
        "by-cn",
    )
    # The certificate's URI SAN is its identity; its DNS SAN still satisfies a dns subject.
    assert await broker.create(uris=("urn:example:x",), dns=("ci.runners.example",)) is None
    line = broker.last_audit()
    assert (line["user"], line["certificateField"], line["rule"]) == (
        "urn:example:x",
        "uri",
        "by-dns",
    )
    # No `field`: the URI SAN only (this CN matched before; `policy validate` warns).
    assert denied(await broker.create(cn="old-client"))
    assert await broker.create(uris=("old-uri",)) is None
    assert broker.last_audit()["rule"] == "legacy-no-field"

    # The access log line names the field as well.
    for _ in range(1000):  # the line is written just after the answer (bounded wait)
        fields = [getattr(r, "certificate_field", None) for r in caplog.records]
        if fields.count("cn") == 1:
            break
        await asyncio.sleep(0.01)
    assert "cn" in fields and "dns" in fields and "uri" in fields
