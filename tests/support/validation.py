"""The validation table: invalid CreateToken requests, each with the field violations the broker
reports, in the Kubernetes API server's words where it validates the same thing (apimachinery).

Checked against the validation itself (tests/unit/test_validation.py) and through the broker,
where none may reach the API server (tests/e2e/test_validation.py).
"""

from __future__ import annotations

from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from tests.support.stack import create_request

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


def bound_ref(
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
        create_request(bound=bound_ref(kind="ConfigMap", name="cm", api_version="v1")),
        [
            (
                "token_request.spec.bound_object_ref.kind",
                "cannot bind token to object of type /v1, Kind=ConfigMap",
            )
        ],
    ),
    (
        "bound-kind-deployment",
        create_request(bound=bound_ref(kind="Deployment", name="d", api_version="apps/v1")),
        [
            (
                "token_request.spec.bound_object_ref.kind",
                "cannot bind token to object of type apps/v1, Kind=Deployment",
            ),
        ],
    ),
    (
        "bound-pod-in-apps-group",
        create_request(bound=bound_ref(api_version="apps/v1")),
        [
            (
                "token_request.spec.bound_object_ref.api_version",
                "cannot bind token to object of type apps/v1, Kind=Pod",
            )
        ],
    ),
    (
        "bound-kind-missing",
        create_request(bound=bound_ref(kind="")),
        [("token_request.spec.bound_object_ref.kind", "Required value")],
    ),
    (
        "bound-name-missing",
        create_request(bound=bound_ref(name="")),
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
