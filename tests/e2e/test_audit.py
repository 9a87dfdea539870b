"""Audit records of calls that reached the API server (the emulator, through the real upstream
client): a minted token's fields, never the token; a refusal relayed from the API server."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from broker.audit import AuditRecord
from broker.emulator import Emulator
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import Identity
from broker.reasons import ALLOWED, Reason
from broker.upstream import UpstreamClient
from tests.support.stack import (
    NAMESPACE,
    OTHER_NAMESPACE,
    POD,
    SERVICE_ACCOUNT,
    claims_of,
    create_request,
)

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


async def test_for_call_with_a_real_token(emulator: Emulator, upstream: UpstreamClient) -> None:
    pod_uid = str(emulator.store.get_pod(NAMESPACE, POD).uid)
    request = create_request(
        audiences=["vault"],
        expiration_seconds=7200,
        bound=pb.BoundObjectReference(kind="Pod", api_version="v1", name=POD, uid=pod_uid),
    )
    result = await upstream.create_token(
        request.namespace, request.service_account, request.token_request
    )
    token = result.token_request.status.token
    claims = claims_of(emulator, token)

    rec = AuditRecord.for_call(
        request,
        request_id="req-2",
        identity=Identity(method="mtls", name="spiffe://example.org/ci"),
        peer="ipv4:127.0.0.1:40000",
        latency_ms=3.5,
        result=result,
        rule="ci-builds",
    )
    line = rec.to_json()
    # Never the token, nor any of its three parts.
    assert token not in line
    for part in token.split("."):
        assert part not in line
    assert token not in repr(rec)

    entry = json.loads(line)
    assert entry["jti"] == claims["jti"]
    assert UUID_RE.fullmatch(entry["jti"])
    assert entry["tokenSHA256"] == hashlib.sha256(token.encode()).hexdigest()[:16]
    assert entry["requestID"] == "req-2"
    assert entry["user"] == "spiffe://example.org/ci"
    assert entry["authMethod"] == "mtls"
    assert entry["issuer"] is None
    assert entry["peer"] == "ipv4:127.0.0.1:40000"
    assert entry["namespace"] == NAMESPACE
    assert entry["serviceAccount"] == SERVICE_ACCOUNT
    assert entry["audiences"] == ["vault"]
    assert entry["grantedAudiences"] == ["vault"]
    assert entry["requestedExpirationSeconds"] == 7200
    assert entry["grantedExpirationSeconds"] == result.token_request.spec.expiration_seconds
    assert entry["tokenLifetimeSeconds"] == claims["exp"] - claims["iat"] == 7200
    assert entry["boundObjectRef"] == {"kind": "Pod", "name": POD, "uid": pod_uid}
    assert entry["dryRun"] is False
    assert entry["decision"] == "allowed"
    assert entry["rule"] == "ci-builds"
    assert entry["reason"] == ALLOWED
    assert entry["code"] == "OK"
    assert entry["upstreamStatus"] == 201
    assert entry["latencyMs"] == 3.5


async def test_for_call_relayed_upstream_refusal(upstream: UpstreamClient) -> None:
    # The broker's own Kubernetes user has no grant in OTHER_NAMESPACE: HTTP 403.
    request = create_request(namespace=OTHER_NAMESPACE, dry_run=["All"])
    with pytest.raises(BrokerError) as caught:
        await upstream.create_token(
            request.namespace, request.service_account, request.token_request, dry_run=True
        )
    entry = json.loads(
        AuditRecord.for_call(
            request,
            request_id="req-3",
            identity=Identity(method="apiKey", name="ci"),
            peer=None,
            latency_ms=1.0,
            error=caught.value,
            rule="ci-builds",
        ).to_json()
    )
    # Policy allowed it; the API server refused: an error, not a broker denial.
    assert entry["decision"] == "error"
    assert entry["code"] == "PERMISSION_DENIED"
    assert entry["reason"] == Reason.KUBERNETES_FORBIDDEN
    assert entry["upstreamStatus"] == 403
    assert entry["dryRun"] is True
    assert entry["requestedExpirationSeconds"] is None
    assert entry["grantedExpirationSeconds"] is None
    assert entry["grantedAudiences"] == []
    assert entry["boundObjectRef"] is None
    assert entry["jti"] is None
    assert entry["tokenSHA256"] is None
