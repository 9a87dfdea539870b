"""The broker's own validation: INVALID_ARGUMENT + BadRequest, before any upstream call.

Each refusal goes through the real path (gRPC stub -> server -> servicer) and the emulator
must have seen zero token requests. Texts are the Kubernetes API server's where it validates
the same thing (apimachinery), so callers get one vocabulary.
"""

from __future__ import annotations

import grpc
import pytest
from conftest import NAMESPACE, SERVICE_ACCOUNT, call_error, create_request

from broker.emulator import Emulator
from broker.errors import ERROR_DOMAIN, BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import Reason
from broker.validation import validate_create_token

LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


def _violations(req: pb.CreateTokenRequest) -> list[tuple[str, str]]:
    with pytest.raises(BrokerError) as info:
        validate_create_token(req)
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.reason, err.domain) == (Reason.REQUEST_INVALID, ERROR_DOMAIN)
    return [(v.field, v.description) for v in err.field_violations]


def _bound(
    kind: str = "Pod", name: str = "web-0", api_version: str = ""
) -> pb.BoundObjectReference:
    return pb.BoundObjectReference(kind=kind, name=name, api_version=api_version)


CASES: list[tuple[str, pb.CreateTokenRequest, list[tuple[str, str]]]] = [
    (
        "namespace-uppercase",
        create_request(namespace="Demo"),
        [("namespace", f'Invalid value: "Demo": {LABEL_MSG}')],
    ),
    (
        "namespace-dots",
        create_request(namespace="a.b"),
        [("namespace", 'Invalid value: "a.b": must not contain dots')],
    ),
    (
        "namespace-too-long",
        create_request(namespace="a" * 64),
        [("namespace", f'Invalid value: "{"a" * 64}": must be no more than 63 characters')],
    ),
    ("namespace-empty", create_request(namespace=""), [("namespace", "Required value")]),
    (
        "service-account-invalid",
        create_request(service_account="Build_Robot"),
        [("service_account", f'Invalid value: "Build_Robot": {SUBDOMAIN_MSG}')],
    ),
    (
        "service-account-too-long",
        create_request(service_account="a" * 254),
        [
            (
                "service_account",
                'Invalid value: "' + "a" * 64 + '"... (truncated, 254 characters): '
                "must be no more than 253 characters",
            )
        ],
    ),
    (
        # TokenRequest handler rule 1 (the API server answers 422 with this text).
        "metadata-name-mismatch",
        create_request(metadata_name="other"),
        [
            (
                "token_request.metadata.name",
                'Invalid value: "other": must match the service account name if specified',
            )
        ],
    ),
    (
        # Rule 4: an explicit 0 is invalid (absent means the server default).
        "expiration-zero",
        create_request(expiration_seconds=0),
        [
            (
                "token_request.spec.expiration_seconds",
                "Invalid value: 0: may not specify a duration less than 10 minutes",
            )
        ],
    ),
    (
        "expiration-60",
        create_request(expiration_seconds=60),
        [
            (
                "token_request.spec.expiration_seconds",
                "Invalid value: 60: may not specify a duration less than 10 minutes",
            )
        ],
    ),
    (
        "expiration-599",
        create_request(expiration_seconds=599),
        [
            (
                "token_request.spec.expiration_seconds",
                "Invalid value: 599: may not specify a duration less than 10 minutes",
            )
        ],
    ),
    (
        # Rule 4b.
        "expiration-above-2^32",
        create_request(expiration_seconds=(1 << 32) + 1),
        [
            (
                "token_request.spec.expiration_seconds",
                "Invalid value: 4294967297: may not specify a duration larger than 2^32 seconds",
            )
        ],
    ),
    (
        "audience-empty",
        create_request(audiences=["a", "", "c"]),
        [("token_request.spec.audiences[1]", "Required value: an audience must be non-empty")],
    ),
    (
        "audience-too-long",
        create_request(audiences=["x" * 1025]),
        [
            (
                "token_request.spec.audiences[0]",
                "Too long: may not be longer than 1024 characters (a token-broker limit)",
            )
        ],
    ),
    (
        "too-many-audiences",
        create_request(audiences=[f"aud-{i}" for i in range(33)]),
        [
            (
                "token_request.spec.audiences",
                "Too many: 33: must have at most 32 items (a token-broker limit)",
            )
        ],
    ),
    (
        # Rule 6g: the API server's own 400 text.
        "bound-kind-configmap",
        create_request(bound=_bound(kind="ConfigMap", name="cm", api_version="v1")),
        [
            (
                "token_request.spec.bound_object_ref.kind",
                "cannot bind token to object of type /v1, Kind=ConfigMap",
            )
        ],
    ),
    (
        "bound-kind-deployment",
        create_request(bound=_bound(kind="Deployment", name="d", api_version="apps/v1")),
        [
            (
                "token_request.spec.bound_object_ref.kind",
                "cannot bind token to object of type apps/v1, Kind=Deployment",
            ),
        ],
    ),
    (
        "bound-pod-in-apps-group",
        create_request(bound=_bound(api_version="apps/v1")),
        [
            (
                "token_request.spec.bound_object_ref.api_version",
                "cannot bind token to object of type apps/v1, Kind=Pod",
            )
        ],
    ),
    (
        "bound-kind-missing",
        create_request(bound=_bound(kind="")),
        [("token_request.spec.bound_object_ref.kind", "Required value")],
    ),
    (
        "bound-name-missing",
        create_request(bound=_bound(name="")),
        [("token_request.spec.bound_object_ref.name", "Required value")],
    ),
    (
        # apimachinery ValidateDryRun (the API server answers 422 on CreateOptions).
        "dry-run-invalid",
        create_request(dry_run=["All", "Bogus"]),
        [("dry_run[1]", 'Unsupported value: "Bogus": supported values: "All"')],
    ),
    (
        "field-validation-invalid",
        create_request(field_validation="strict"),
        [
            (
                "field_validation",
                'Unsupported value: "strict": supported values: "", "Ignore", "Strict", "Warn"',
            )
        ],
    ),
    (
        "field-manager-too-long",
        create_request(field_manager="m" * 129),
        [("field_manager", "Too long: must have at most 128 bytes")],
    ),
    (
        "field-manager-unprintable",
        create_request(field_manager="a\tb"),
        [("field_manager", 'Invalid value: "a\\tb": invalid character U+0009 (at position 1)')],
    ),
]


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
        bound=_bound(kind="Job", name=""),
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
        create_request(bound=_bound(kind="Secret", name="s1", api_version="v1")),
        create_request(bound=_bound(kind="Node", name="node-1")),
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


# --- through the broker: refused before any upstream call ---------------------------------


@pytest.mark.parametrize(("req", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_refused_before_upstream(
    stub: pb_grpc.TokenBrokerServiceStub,
    emulator: Emulator,
    req: pb.CreateTokenRequest,
    expected: list[tuple[str, str]],
) -> None:
    status = await call_error(stub, req)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.error_info is not None
    assert (status.error_info.reason, status.error_info.domain) == (
        Reason.REQUEST_INVALID,
        ERROR_DOMAIN,
    )
    assert status.bad_request is not None
    got = [(v.field, v.description) for v in status.bad_request.field_violations]
    assert got == expected
    field, description = expected[0]
    assert status.message.startswith(f"CreateTokenRequest is invalid: {field}: {description}"[:60])
    assert emulator.token_request_count == 0


async def test_huge_request_through_broker(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    # Under the server's 1 MiB message limit: refused by validation, with bounded details.
    req = create_request(
        namespace="N" * 300_000, service_account="S" * 300_000, audiences=["y" * 10_000] * 40
    )
    status = await call_error(stub, req)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.bad_request is not None and status.bad_request.field_violations
    # Over it: gRPC itself refuses the message (RESOURCE_EXHAUSTED) before the handler runs.
    req = create_request(namespace="N" * 2_000_000)
    status = await call_error(stub, req)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in status.message
    assert emulator.token_request_count == 0


async def test_boundaries_reach_the_api_server(
    stub: pb_grpc.TokenBrokerServiceStub, emulator: Emulator
) -> None:
    for seconds in (600, 1 << 32):
        resp = await stub.CreateToken(create_request(expiration_seconds=seconds), timeout=10)
        assert resp.token_request.spec.expiration_seconds == seconds
        assert resp.token_request.metadata.namespace == NAMESPACE
    assert emulator.token_request_count == 2
