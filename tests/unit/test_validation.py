"""The broker's own validation (broker.validation): INVALID_ARGUMENT + BadRequest, table by table.

Texts are the Kubernetes API server's where it validates the same thing (apimachinery), so
callers get one vocabulary. The same table goes through the broker in
tests/e2e/test_validation.py.
"""

from __future__ import annotations

import grpc
import pytest

from broker.errors import ERROR_DOMAIN, BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.reasons import Reason
from broker.validation import validate_create_token
from tests.support.stack import SERVICE_ACCOUNT, create_request
from tests.support.validation import CASES, bound_ref


def _violations(req: pb.CreateTokenRequest) -> list[tuple[str, str]]:
    with pytest.raises(BrokerError) as info:
        validate_create_token(req)
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.reason, err.domain) == (Reason.REQUEST_INVALID, ERROR_DOMAIN)
    return [(v.field, v.description) for v in err.field_violations]


@pytest.mark.parametrize(("req", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_violation_texts(req: pb.CreateTokenRequest, expected: list[tuple[str, str]]) -> None:
    assert _violations(req) == expected


def test_all_violations_are_reported_not_just_the_first() -> None:
    req = create_request(
        namespace="Bad_NS",
        service_account="",
        metadata_name="x",
        audiences=[""],
        expiration_seconds=1,
        bound=bound_ref(kind="Job", name=""),
        dry_run=["Nope"],
        field_validation="Loud",
    )
    fields = [f for f, _ in _violations(req)]
    assert fields == [
        "namespace",
        "service_account",
        "token_request.metadata.name",
        "token_request.spec.audiences[0]",
        "token_request.spec.expiration_seconds",
        "token_request.spec.bound_object_ref.kind",
        "token_request.spec.bound_object_ref.name",
        "dry_run[0]",
        "field_validation",
    ]


@pytest.mark.parametrize(
    "req",
    [
        create_request(expiration_seconds=600),  # inclusive bounds
        create_request(expiration_seconds=1 << 32),
        create_request(audiences=[f"a{i}" for i in range(32)]),
        create_request(audiences=["x" * 1024]),
        create_request(metadata_name=SERVICE_ACCOUNT),
        create_request(bound=bound_ref(kind="Secret", name="s1", api_version="v1")),
        create_request(bound=bound_ref(kind="Node", name="node-1")),
        create_request(dry_run=["All"], field_validation="Strict", field_manager="ci-bot"),
        create_request(namespace="a" * 63, service_account="a." * 126 + "a"),
    ],
)
def test_valid_requests_pass(req: pb.CreateTokenRequest) -> None:
    validate_create_token(req)


def test_huge_inputs_give_bounded_errors() -> None:
    # Megabytes of input: the status must still fit gRPC's 8 KiB trailer limit.
    req = create_request(
        namespace="N" * 1_000_000,
        service_account="S" * 1_000_000,
        metadata_name="m" * 1_000_000,
        audiences=["y" * 100_000] * 40,
    )
    with pytest.raises(BrokerError) as info:
        validate_create_token(req)
    err = info.value
    size = sum(len(v) for _, v in err.trailing_metadata()) + len(err.message.encode()) * 3
    assert size < 8192
    assert err.message.startswith("CreateTokenRequest is invalid: [namespace: ")
    assert err.message.endswith("more)")
    # namespace and service account: too long and bad characters; name: too long;
    # audiences: too many, then each too long.
    assert err.metadata["violations"] == str(2 + 2 + 1 + 1 + 40)
    assert len(err.field_violations) < 45
