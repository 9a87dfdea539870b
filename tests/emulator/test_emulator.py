"""The API-server emulator's TokenRequest endpoint, called directly over HTTPS.

Every row of the reference's two error tables, with the exact Status body, plus the success
shape, defaults, bound tokens and the JWT itself (verified against the served JWKS).
The seed and helpers shared with the other test_emulator_*.py modules are in
tests/support/emulator.py, their fixtures in tests/emulator/conftest.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from datetime import datetime
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from broker.emulator import Emulator
from broker.emulator.client import EmulatorClient
from tests.support.emulator import (
    ALICE_TOKEN,
    BROKER,
    BROKER_TOKEN,
    ISSUER,
    MISSING_NS,
    NODE,
    NODELESS_POD,
    NS,
    OTHER_NS,
    OTHER_POD,
    OTHER_SA,
    POD,
    SA,
    SECRET,
    MakeEmulator,
    assert_not_found,
    assert_status,
    invalid_details,
    status_body,
    token_path,
    verify,
)

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# --- success -------------------------------------------------------------------------------


async def test_success_shape_and_defaults(emu: Emulator, client: EmulatorClient) -> None:
    reply = await client.create_token(
        NS, SA, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest"}
    )
    assert reply.status == 201
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.warnings == []
    body = reply.json()
    assert list(body) == ["kind", "apiVersion", "metadata", "spec", "status"]
    assert (body["kind"], body["apiVersion"]) == ("TokenRequest", "authentication.k8s.io/v1")
    assert list(body["metadata"]) == ["name", "namespace", "creationTimestamp"]
    assert body["metadata"]["name"] == SA
    assert body["metadata"]["namespace"] == NS
    assert body["spec"] == {
        "audiences": [ISSUER],
        "expirationSeconds": 3600,
        "boundObjectRef": None,
    }
    assert list(body["spec"]) == ["audiences", "expirationSeconds", "boundObjectRef"]
    assert '"boundObjectRef":null' in reply.text
    assert list(body["status"]) == ["token", "expirationTimestamp"]
    created = body["metadata"]["creationTimestamp"]
    expires = body["status"]["expirationTimestamp"]
    assert TIMESTAMP.match(created) and TIMESTAMP.match(expires)
    lifetime = datetime.fromisoformat(expires) - datetime.fromisoformat(created)
    assert lifetime.total_seconds() == 3600
    assert reply.text.endswith("}\n")  # Go's encoder ends the document with a newline

    claims = await verify(client, body["status"]["token"])
    assert claims["exp"] == int(datetime.fromisoformat(expires).timestamp())
    assert claims["iat"] == int(datetime.fromisoformat(created).timestamp())
    assert emu.token_request_count == 1
    record = emu.token_requests[0]
    assert (record.namespace, record.name, record.user, record.status) == (NS, SA, BROKER, 201)
    assert record.body == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest"}


async def test_jwt_header_and_claims(emu: Emulator, client: EmulatorClient) -> None:
    reply = await client.create_token(NS, SA)
    token = reply.json()["status"]["token"]
    header_segment, payload_segment, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_segment + "=="))
    jwks = (await client.request("GET", "/openid/v1/jwks", token=None)).json()
    (jwk,) = jwks["keys"]
    assert header == {"alg": "RS256", "kid": jwk["kid"]}  # no typ
    assert list(jwk) == ["use", "kty", "kid", "alg", "n", "e"]
    assert (jwk["use"], jwk["kty"], jwk["alg"], jwk["e"]) == ("sig", "RSA", "RS256", "AQAB")
    # kid = base64url, unpadded, of SHA-256 over the DER SubjectPublicKeyInfo.
    public = jwt.PyJWK.from_dict(jwk).key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert (
        jwk["kid"] == base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    )
    assert emu.jwks() == jwks

    raw_claims = json.loads(base64.urlsafe_b64decode(payload_segment + "=="))
    assert list(raw_claims) == sorted(raw_claims)  # go-jose marshals a map: sorted keys
    claims = await verify(client, token)
    assert set(claims) == {"aud", "exp", "iat", "iss", "jti", "kubernetes.io", "nbf", "sub"}
    assert claims["aud"] == [ISSUER]
    assert claims["iss"] == ISSUER
    assert claims["sub"] == f"system:serviceaccount:{NS}:{SA}"
    assert claims["iat"] == claims["nbf"]
    assert claims["exp"] - claims["iat"] == 3600
    assert str(uuid.UUID(claims["jti"])) == claims["jti"]
    sa_uid = emu.store.get_service_account(NS, SA).uid
    assert claims["kubernetes.io"] == {
        "namespace": NS,
        "serviceaccount": {"name": SA, "uid": sa_uid},
    }
    annotation = emu.token_requests[-1].audit_annotations
    assert annotation == {
        "authentication.kubernetes.io/issued-credential-id": f"JTI={claims['jti']}"
    }


async def test_explicit_audiences_and_expiration(client: EmulatorClient) -> None:
    audiences = ["https://vault.example.com", "sts.example.com"]
    reply = await client.create_token(
        NS,
        SA,
        {"metadata": {"name": SA}, "spec": {"audiences": audiences, "expirationSeconds": 7200}},
    )
    assert reply.status == 201
    assert reply.json()["spec"] == {
        "audiences": audiences,
        "expirationSeconds": 7200,
        "boundObjectRef": None,
    }
    claims = await verify(client, reply.json()["status"]["token"], audience=audiences[1])
    assert claims["aud"] == audiences
    assert claims["exp"] - claims["iat"] == 7200


async def test_null_and_empty_fields_take_defaults(client: EmulatorClient) -> None:
    reply = await client.create_token(
        NS, SA, {"spec": {"audiences": None, "expirationSeconds": None, "boundObjectRef": None}}
    )
    assert reply.json()["spec"] == {
        "audiences": [ISSUER],
        "expirationSeconds": 3600,
        "boundObjectRef": None,
    }


async def test_client_status_and_system_metadata_are_discarded(client: EmulatorClient) -> None:
    reply = await client.create_token(
        NS,
        SA,
        {
            "metadata": {
                "uid": "x",
                "creationTimestamp": "2001-01-01T00:00:00Z",
                "labels": {"a": "b"},
            },
            "status": {"token": "client-sent", "expirationTimestamp": "2001-01-01T00:00:00Z"},
        },
    )
    body = reply.json()
    assert body["metadata"]["labels"] == {"a": "b"}
    assert "uid" not in body["metadata"]
    assert body["metadata"]["creationTimestamp"] != "2001-01-01T00:00:00Z"
    assert body["status"]["token"] != "client-sent"


async def test_other_api_audiences(make_emu: MakeEmulator) -> None:
    emu = await make_emu(api_audiences=["api", "other"])
    async with EmulatorClient(emu.url, emu.ca_file, BROKER_TOKEN) as client:
        reply = await client.create_token(NS, SA)
        assert reply.json()["spec"]["audiences"] == ["api", "other"]
        assert (await verify(client, reply.json()["status"]["token"], "other"))["aud"] == [
            "api",
            "other",
        ]


async def test_dry_run_all_returns_a_real_token(emu: Emulator, client: EmulatorClient) -> None:
    reply = await client.create_token(NS, SA, params=[("dryRun", "All"), ("fieldManager", "ci")])
    assert reply.status == 201
    await verify(client, reply.json()["status"]["token"])
    assert emu.token_requests[-1].query.getall("dryRun") == ["All"]
    assert emu.token_requests[-1].query.get("fieldManager") == "ci"


async def test_expiration_bounds_are_inclusive(client: EmulatorClient) -> None:
    for seconds in (600, 1 << 32):
        reply = await client.create_token(NS, SA, {"spec": {"expirationSeconds": seconds}})
        assert reply.status == 201, reply.text
        assert reply.json()["spec"]["expirationSeconds"] == seconds


# --- bound tokens --------------------------------------------------------------------------


async def test_pod_bound_token(emu: Emulator, client: EmulatorClient) -> None:
    pod_uid = emu.store.get_pod(NS, POD).uid
    ref = {"kind": "Pod", "apiVersion": "v1", "name": POD, "uid": pod_uid}
    reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
    assert reply.status == 201
    assert reply.json()["spec"]["boundObjectRef"] == ref
    assert list(reply.json()["spec"]["boundObjectRef"]) == ["kind", "apiVersion", "name", "uid"]
    claims = await verify(client, reply.json()["status"]["token"])
    assert claims["kubernetes.io"] == {
        "namespace": NS,
        "node": {"name": NODE, "uid": emu.store.get_node(NODE).uid},
        "pod": {"name": POD, "uid": pod_uid},
        "serviceaccount": {"name": SA, "uid": emu.store.get_service_account(NS, SA).uid},
    }


async def test_pod_bound_without_uid_or_api_version(emu: Emulator, client: EmulatorClient) -> None:
    reply = await client.create_token(
        NS, SA, {"spec": {"boundObjectRef": {"kind": "Pod", "name": POD}}}
    )
    assert reply.status == 201
    assert reply.json()["spec"]["boundObjectRef"] == {"kind": "Pod", "name": POD}
    claims = await verify(client, reply.json()["status"]["token"])
    assert claims["kubernetes.io"]["pod"] == {"name": POD, "uid": emu.store.get_pod(NS, POD).uid}


async def test_pod_on_a_missing_node_has_no_node_claim(client: EmulatorClient) -> None:
    ref = {"kind": "Pod", "apiVersion": "v1", "name": NODELESS_POD}
    reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
    claims = await verify(client, reply.json()["status"]["token"])
    assert set(claims["kubernetes.io"]) == {"namespace", "pod", "serviceaccount"}


async def test_pod_without_node_has_no_node_claim(client: EmulatorClient) -> None:
    ref = {"kind": "Pod", "apiVersion": "v1", "name": OTHER_POD}
    reply = await client.create_token(NS, OTHER_SA, {"spec": {"boundObjectRef": ref}})
    claims = await verify(client, reply.json()["status"]["token"])
    assert set(claims["kubernetes.io"]) == {"namespace", "pod", "serviceaccount"}


async def test_pod_node_info_can_be_switched_off(make_emu: MakeEmulator) -> None:
    emu = await make_emu(pod_node_info=False)
    async with EmulatorClient(emu.url, emu.ca_file, BROKER_TOKEN) as client:
        reply = await client.create_token(
            NS, SA, {"spec": {"boundObjectRef": {"kind": "Pod", "name": POD}}}
        )
        claims = await verify(client, reply.json()["status"]["token"])
        assert "node" not in claims["kubernetes.io"]


async def test_secret_bound_token(emu: Emulator, client: EmulatorClient) -> None:
    uid = emu.store.get_secret(NS, SECRET).uid
    ref = {"kind": "Secret", "apiVersion": "v1", "name": SECRET, "uid": uid}
    reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
    assert reply.status == 201
    claims = await verify(client, reply.json()["status"]["token"])
    assert claims["kubernetes.io"]["secret"] == {"name": SECRET, "uid": uid}
    assert set(claims["kubernetes.io"]) == {"namespace", "secret", "serviceaccount"}


async def test_node_bound_token_when_enabled(make_emu: MakeEmulator) -> None:
    emu = await make_emu(node_binding=True)
    uid = emu.store.get_node(NODE).uid
    async with EmulatorClient(emu.url, emu.ca_file, BROKER_TOKEN) as client:
        ref = {"kind": "Node", "apiVersion": "v1", "name": NODE, "uid": uid}
        reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
        assert reply.status == 201
        claims = await verify(client, reply.json()["status"]["token"])
        assert claims["kubernetes.io"]["node"] == {"name": NODE, "uid": uid}
        assert set(claims["kubernetes.io"]) == {"namespace", "node", "serviceaccount"}

        # 6e: bound Node missing.
        ref = {"kind": "Node", "apiVersion": "v1", "name": "n"}
        reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
        assert_not_found(reply, "nodes", "n")

        # 7 for nodes.
        ref = {"kind": "Node", "apiVersion": "v1", "name": NODE, "uid": "stale"}
        reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
        assert_status(
            reply,
            409,
            "Conflict",
            f'Operation cannot be fulfilled on Node "{NODE}": the UID in the bound object '
            "reference (stale) does not match the UID in record. The object might have been "
            "deleted and then recreated",
            {"name": NODE, "kind": "Node"},
        )


async def test_kubelet_style_extension(make_emu: MakeEmulator) -> None:
    emu = await make_emu(extend_expiration=True)
    async with EmulatorClient(emu.url, emu.ca_file, BROKER_TOKEN) as client:
        spec = {"expirationSeconds": 3607, "boundObjectRef": {"kind": "Pod", "name": POD}}
        reply = await client.create_token(NS, SA, {"spec": spec})
        body = reply.json()
        assert body["spec"]["expirationSeconds"] == 3607
        created = datetime.fromisoformat(body["metadata"]["creationTimestamp"])
        expires = datetime.fromisoformat(body["status"]["expirationTimestamp"])
        assert (expires - created).total_seconds() == 3607
        claims = await verify(client, body["status"]["token"])
        assert claims["exp"] - claims["iat"] == 365 * 24 * 3600
        assert claims["kubernetes.io"]["warnafter"] == claims["iat"] + 3607

        # Not extended: unbound, another duration, or a foreign audience.
        pod = {"kind": "Pod", "name": POD}
        cases: list[tuple[dict[str, Any], str, int]] = [
            ({"expirationSeconds": 3607}, ISSUER, 3607),
            ({"expirationSeconds": 3608, "boundObjectRef": pod}, ISSUER, 3608),
            ({"expirationSeconds": 3607, "boundObjectRef": pod, "audiences": ["x"]}, "x", 3607),
        ]
        for spec, audience, seconds in cases:
            token = (await client.create_token(NS, SA, {"spec": spec})).json()["status"]["token"]
            claims = await verify(client, token, audience)
            assert claims["exp"] - claims["iat"] == seconds
            assert "warnafter" not in claims["kubernetes.io"]


async def test_es256_signing(make_emu: MakeEmulator) -> None:
    emu = await make_emu(signing_algorithm="ES256")
    async with EmulatorClient(emu.url, emu.ca_file, BROKER_TOKEN) as client:
        token = (await client.create_token(NS, SA)).json()["status"]["token"]
        assert jwt.get_unverified_header(token)["alg"] == "ES256"
        (jwk,) = (await client.request("GET", "/openid/v1/jwks", token=None)).json()["keys"]
        assert list(jwk) == ["use", "kty", "kid", "crv", "alg", "x", "y"]
        assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-256", "ES256")
        assert (await verify(client, token))["sub"] == f"system:serviceaccount:{NS}:{SA}"
        discovery = (await client.request("GET", "/.well-known/openid-configuration")).json()
        assert discovery["id_token_signing_alg_values_supported"] == ["ES256"]


# --- generic apiserver checks (first table) -------------------------------------------------


UNAUTHORIZED = status_body(401, "Unauthorized", "Unauthorized")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {BROKER_TOKEN}"},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "unknown", "not-bearer", "empty"],
)
async def test_401(emu: Emulator, client: EmulatorClient, headers: dict[str, str]) -> None:
    reply = await client.request("POST", token_path(), token=None, json_body={}, headers=headers)
    assert_status(reply, 401, "Unauthorized", "Unauthorized")
    assert emu.token_request_count == 0  # never reached the endpoint


async def test_401_after_the_user_is_removed(emu: Emulator, client: EmulatorClient) -> None:
    assert (await client.create_token(NS, SA)).status == 201
    emu.remove_user(BROKER_TOKEN)
    assert (await client.create_token(NS, SA)).json() == UNAUTHORIZED


async def test_403(emu: Emulator, client: EmulatorClient) -> None:
    reply = await client.create_token(NS, SA, token=ALICE_TOKEN)
    assert_status(
        reply,
        403,
        "Forbidden",
        'serviceaccounts "build-robot" is forbidden: User "alice" cannot create resource '
        '"serviceaccounts/token" in API group "" in the namespace "default"',
        {"name": "build-robot", "kind": "serviceaccounts"},
    )
    assert emu.token_requests[-1].status == 403


async def test_403_for_a_namespace_without_grant_and_resource_names(
    emu: Emulator, client: EmulatorClient
) -> None:
    emu.add_user("carol-token", "carol")
    emu.allow("carol", NS, [OTHER_SA])
    assert (await client.create_token(NS, OTHER_SA, token="carol-token")).status == 201
    reply = await client.create_token(NS, SA, token="carol-token")
    assert reply.status == 403
    assert reply.json()["message"].startswith(
        'serviceaccounts "build-robot" is forbidden: User "carol"'
    )
    reply = await client.create_token(OTHER_NS, OTHER_SA, token="carol-token")
    assert reply.json()["message"].endswith('in the namespace "other"')
    emu.allow("carol", "*")
    assert (await client.create_token(OTHER_NS, SA, token="carol-token")).status == 201
    emu.revoke("carol")
    assert (await client.create_token(NS, OTHER_SA, token="carol-token")).status == 403


async def test_400_api_version(client: EmulatorClient) -> None:
    for api_version, shown in (
        ("authentication.k8s.io/v1beta1", "authentication.k8s.io/v1beta1"),
        ("v1", "v1"),
        ("authentication.k8s.io/__internal", "authentication.k8s.io/__internal"),
    ):
        reply = await client.create_token(
            NS, SA, {"apiVersion": api_version, "kind": "TokenRequest"}
        )
        assert_status(
            reply,
            400,
            "BadRequest",
            f"the API version in the data ({shown}) does not match the expected API version "
            "(authentication.k8s.io/v1)",
        )


async def test_400_wrong_kind(client: EmulatorClient) -> None:
    reply = await client.create_token(
        NS, SA, {"apiVersion": "authentication.k8s.io/v1", "kind": "Pod"}
    )
    assert_status(
        reply,
        400,
        "BadRequest",
        'Pod in version "v1" cannot be handled as a TokenRequest: no kind "Pod" is registered for '
        'version "authentication.k8s.io/v1" in scheme "pkg/api/legacyscheme/scheme.go:30"',
    )


@pytest.mark.parametrize(
    ("params", "message", "causes"),
    [
        (
            [("dryRun", "foo")],
            'CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: []string{"foo"}: '
            'supported values: "All"',
            [
                (
                    "FieldValueNotSupported",
                    'Unsupported value: []string{"foo"}: supported values: "All"',
                    "dryRun",
                )
            ],
        ),
        (
            [("dryRun", "All"), ("dryRun", "x")],
            'CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: '
            '[]string{"All", "x"}: supported values: "All"',
            [
                (
                    "FieldValueNotSupported",
                    'Unsupported value: []string{"All", "x"}: supported values: "All"',
                    "dryRun",
                )
            ],
        ),
        (
            [("fieldValidation", "Loose")],
            'CreateOptions.meta.k8s.io "" is invalid: fieldValidation: Unsupported value: "Loose": '
            'supported values: "", "Ignore", "Strict", "Warn"',
            [
                (
                    "FieldValueNotSupported",
                    'Unsupported value: "Loose": supported values: "", "Ignore", "Strict", "Warn"',
                    "fieldValidation",
                )
            ],
        ),
        (
            [("fieldManager", "m" * 129), ("dryRun", "")],
            'CreateOptions.meta.k8s.io "" is invalid: [fieldManager: Too long: must have at most '
            '128 bytes, dryRun: Unsupported value: []string{""}: supported values: "All"]',
            [
                ("FieldValueTooLong", "Too long: must have at most 128 bytes", "fieldManager"),
                (
                    "FieldValueNotSupported",
                    'Unsupported value: []string{""}: supported values: "All"',
                    "dryRun",
                ),
            ],
        ),
        (
            [("fieldManager", "a\tb")],
            'CreateOptions.meta.k8s.io "" is invalid: fieldManager: Invalid value: "a\\tb": '
            "invalid character U+0009 (at position 1)",
            [
                (
                    "FieldValueInvalid",
                    'Invalid value: "a\\tb": invalid character U+0009 (at position 1)',
                    "fieldManager",
                )
            ],
        ),
    ],
    ids=["dry-run", "dry-run-two", "field-validation", "two-errors", "unprintable-manager"],
)
async def test_422_create_options(
    client: EmulatorClient,
    params: list[tuple[str, str]],
    message: str,
    causes: list[tuple[str, str, str]],
) -> None:
    reply = await client.create_token(NS, SA, params=params)
    assert_status(
        reply,
        422,
        "Invalid",
        message,
        {
            "group": "meta.k8s.io",
            "kind": "CreateOptions",
            "causes": [{"reason": r, "message": m, "field": f} for r, m, f in causes],
        },
    )


async def test_create_options_are_checked_before_the_body(client: EmulatorClient) -> None:
    # create.go validates the query before decoding: a bad body does not hide it.
    reply = await client.create_token(NS, SA, {"apiVersion": "v9"}, params={"dryRun": "x"})
    assert reply.status == 422


async def test_400_namespace_mismatch(client: EmulatorClient) -> None:
    reply = await client.create_token(NS, SA, {"metadata": {"namespace": OTHER_NS}})
    assert_status(
        reply,
        400,
        "BadRequest",
        "the namespace of the provided object does not match the namespace sent on the request",
    )
    # The URL's namespace itself, or none, is fine.
    assert (await client.create_token(NS, SA, {"metadata": {"namespace": NS}})).status == 201


async def test_404_namespace_missing(client: EmulatorClient) -> None:
    reply = await client.create_token(MISSING_NS, SA)
    assert_not_found(reply, "namespaces", "ghost")


async def test_400_undecodable_bodies(client: EmulatorClient) -> None:
    cannot = 'TokenRequest in version "v1" cannot be handled as a TokenRequest: json: '
    cases = [
        (
            {"spec": {"expirationSeconds": "3600"}},
            cannot + "cannot unmarshal string into Go struct field "
            "TokenRequestSpec.spec.expirationSeconds of type int64",
        ),
        (
            {"spec": {"expirationSeconds": 600.5}},
            cannot + "cannot unmarshal number 600.5 into Go struct field "
            "TokenRequestSpec.spec.expirationSeconds of type int64",
        ),
        (
            {"spec": {"audiences": "aud"}},
            cannot + "cannot unmarshal string into Go struct field "
            "TokenRequestSpec.spec.audiences of type []string",
        ),
        (
            {"spec": {"boundObjectRef": {"name": 7}}},
            cannot + "cannot unmarshal number into Go struct field "
            "BoundObjectReference.spec.boundObjectRef.name of type string",
        ),
    ]
    for body, message in cases:
        assert_status(await client.create_token(NS, SA, body), 400, "BadRequest", message)

    reply = await client.request("POST", token_path(), body=b"{", content_type="application/json")
    assert_status(
        reply,
        400,
        "BadRequest",
        "the object provided is unrecognized (must be of type TokenRequest): couldn't get "
        "version/kind; json parse error: unexpected end of JSON input ({)",
    )
    reply = await client.request("POST", token_path(), body=b"", content_type="application/json")
    assert reply.json()["message"] == (
        "the object provided is unrecognized (must be of type TokenRequest): couldn't get "
        "version/kind; json parse error: unexpected end of JSON input (<empty>)"
    )


async def test_unknown_fields_warn_by_default_and_fail_when_strict(
    emu: Emulator, client: EmulatorClient
) -> None:
    body = {"spec": {"expirationSeconds": 3600, "foo": 1}, "extra": True}
    reply = await client.create_token(NS, SA, body)
    assert reply.status == 201
    assert reply.warnings == [
        '299 - "unknown field \\"spec.foo\\""',
        '299 - "unknown field \\"extra\\""',
    ]
    assert emu.token_requests[-1].warnings == ['unknown field "spec.foo"', 'unknown field "extra"']

    reply = await client.create_token(NS, SA, body, params={"fieldValidation": "Ignore"})
    assert (reply.status, reply.warnings) == (201, [])

    reply = await client.create_token(NS, SA, body, params={"fieldValidation": "Strict"})
    assert_status(
        reply,
        400,
        "BadRequest",
        'TokenRequest in version "v1" cannot be handled as a TokenRequest: strict decoding error: '
        'unknown field "spec.foo", unknown field "extra"',
    )

    duplicate = b'{"spec":{"expirationSeconds":700,"expirationSeconds":800}}'
    reply = await client.request(
        "POST", token_path(), body=duplicate, content_type="application/json"
    )
    assert reply.json()["spec"]["expirationSeconds"] == 800  # the last one wins
    assert reply.warnings == ['299 - "duplicate field \\"spec.expirationSeconds\\""']


async def test_415_and_413(client: EmulatorClient) -> None:
    reply = await client.request("POST", token_path(), body=b"x", content_type="text/plain")
    assert_status(
        reply,
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: "
        "application/json, application/yaml, application/vnd.kubernetes.protobuf",
    )
    big = b'{"metadata":{"annotations":{"a":"' + b"x" * (3 * 1024 * 1024) + b'"}}}'
    reply = await client.request("POST", token_path(), body=big, content_type="application/json")
    assert_status(reply, 413, "RequestEntityTooLarge", "Request entity too large: limit is 3145728")


async def test_yaml_body(client: EmulatorClient) -> None:
    body = (
        b"apiVersion: authentication.k8s.io/v1\nkind: TokenRequest\n"
        b"spec:\n  expirationSeconds: 1200\n"
    )
    reply = await client.request("POST", token_path(), body=body, content_type="application/yaml")
    assert reply.status == 201
    assert reply.json()["spec"]["expirationSeconds"] == 1200


# --- the token handler (second table) ------------------------------------------------------


async def test_rule_1_metadata_name(client: EmulatorClient) -> None:
    reply = await client.create_token(NS, SA, {"metadata": {"name": "someone-else"}})
    assert_status(
        reply,
        422,
        "Invalid",
        'TokenRequest.authentication.k8s.io "build-robot" is invalid: metadata.name: '
        'Invalid value: "someone-else": must match the service account name if specified',
        invalid_details(
            "metadata.name",
            'Invalid value: "someone-else": must match the service account name if specified',
            name=SA,
        ),
    )


async def test_rule_2_service_account_missing(client: EmulatorClient) -> None:
    reply = await client.create_token(NS, "x")
    assert_not_found(reply, "serviceaccounts", "x")


async def test_rule_1_precedes_rule_2(client: EmulatorClient) -> None:
    reply = await client.create_token(NS, "x", {"metadata": {"name": "y"}})
    assert reply.status == 422


@pytest.mark.parametrize("seconds", [60, 0, -1, 599])
async def test_rule_4_too_short(client: EmulatorClient, seconds: int) -> None:
    reply = await client.create_token(NS, SA, {"spec": {"expirationSeconds": seconds}})
    detail = f"Invalid value: {seconds}: may not specify a duration less than 10 minutes"
    assert_status(
        reply,
        422,
        "Invalid",
        f'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: {detail}',
        invalid_details("spec.expirationSeconds", detail),
    )


async def test_rule_4b_too_long(client: EmulatorClient) -> None:
    seconds = (1 << 32) + 1
    reply = await client.create_token(NS, SA, {"spec": {"expirationSeconds": seconds}})
    detail = f"Invalid value: {seconds}: may not specify a duration larger than 2^32 seconds"
    assert_status(
        reply,
        422,
        "Invalid",
        f'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: {detail}',
        invalid_details("spec.expirationSeconds", detail),
    )


async def test_rule_2_precedes_rule_4(client: EmulatorClient) -> None:
    reply = await client.create_token(NS, "x", {"spec": {"expirationSeconds": 1}})
    assert reply.status == 404


async def test_rule_6a_pod_missing(client: EmulatorClient) -> None:
    reply = await client.create_token(
        NS, SA, {"spec": {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p"}}}
    )
    assert_not_found(reply, "pods", "p")


async def test_rule_6b_pod_of_another_service_account(client: EmulatorClient) -> None:
    reply = await client.create_token(
        NS, SA, {"spec": {"boundObjectRef": {"kind": "Pod", "name": OTHER_POD}}}
    )
    assert_status(
        reply,
        400,
        "BadRequest",
        'cannot bind token for serviceaccount "build-robot" to pod running with different '
        "serviceaccount name.",
    )


async def test_rule_6d_node_binding_disabled(client: EmulatorClient) -> None:
    reply = await client.create_token(
        NS, SA, {"spec": {"boundObjectRef": {"kind": "Node", "apiVersion": "v1", "name": NODE}}}
    )
    assert_status(
        reply,
        400,
        "BadRequest",
        'cannot bind token to a Node object as the "ServiceAccountTokenNodeBinding" feature-gate '
        "is disabled",
    )


async def test_rule_6f_secret_missing(client: EmulatorClient) -> None:
    reply = await client.create_token(
        NS, SA, {"spec": {"boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": "s"}}}
    )
    assert_not_found(reply, "secrets", "s")


@pytest.mark.parametrize(
    ("ref", "shown"),
    [
        ({"kind": "Deployment", "apiVersion": "apps/v1", "name": "d"}, "apps/v1, Kind=Deployment"),
        ({"kind": "ConfigMap", "apiVersion": "v1", "name": "c"}, "/v1, Kind=ConfigMap"),
        ({"kind": "Pod", "apiVersion": "apps/v1", "name": POD}, "apps/v1, Kind=Pod"),
        ({"kind": "ConfigMap", "name": "c"}, "/, Kind=ConfigMap"),
        ({}, "/, Kind="),
    ],
    ids=["deployment", "configmap", "pod-in-apps", "no-api-version", "empty"],
)
async def test_rule_6g_other_kinds(client: EmulatorClient, ref: dict[str, str], shown: str) -> None:
    reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
    assert_status(reply, 400, "BadRequest", f"cannot bind token to object of type {shown}")


async def test_rule_7_pod_deleted_then_recreated(emu: Emulator, client: EmulatorClient) -> None:
    old_uid = emu.store.get_pod(NS, POD).uid
    ref = {"kind": "Pod", "apiVersion": "v1", "name": POD, "uid": old_uid}
    assert (await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})).status == 201

    emu.store.delete_pod(NS, POD)
    reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
    assert_not_found(reply, "pods", POD)

    new_uid = emu.store.create_pod(NS, POD, service_account_name=SA, node_name=NODE)
    assert new_uid != old_uid
    reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
    assert_status(
        reply,
        409,
        "Conflict",
        f'Operation cannot be fulfilled on Pod "{POD}": the UID in the bound object reference '
        f"({old_uid}) does not match the UID in record. The object might have been deleted and "
        "then recreated",
        {"name": POD, "kind": "Pod"},
    )


async def test_rule_7_secret_uid(client: EmulatorClient) -> None:
    ref = {"kind": "Secret", "apiVersion": "v1", "name": SECRET, "uid": "0b7c"}
    reply = await client.create_token(NS, SA, {"spec": {"boundObjectRef": ref}})
    assert reply.status == 409
    assert reply.json()["details"] == {"name": SECRET, "kind": "Secret"}
    assert reply.json()["message"].startswith(
        f'Operation cannot be fulfilled on Secret "{SECRET}": '
    )


async def test_rule_8_max_expiration(make_emu: MakeEmulator) -> None:
    emu = await make_emu(max_expiration_seconds=3600)
    async with EmulatorClient(emu.url, emu.ca_file, BROKER_TOKEN) as client:
        reply = await client.create_token(NS, SA, {"spec": {"expirationSeconds": 7200}})
        assert reply.status == 201
        assert reply.warnings == [
            '299 - "requested expiration of 7200 seconds shortened to 3600 seconds"'
        ]
        body = reply.json()
        assert body["spec"]["expirationSeconds"] == 3600
        created = datetime.fromisoformat(body["metadata"]["creationTimestamp"])
        expires = datetime.fromisoformat(body["status"]["expirationTimestamp"])
        assert (expires - created).total_seconds() == 3600
        claims = await verify(client, body["status"]["token"])
        assert claims["exp"] - claims["iat"] == 3600
        assert emu.token_requests[-1].warnings == [
            "requested expiration of 7200 seconds shortened to 3600 seconds"
        ]

        # At or under the maximum: untouched, no warning.
        reply = await client.create_token(NS, SA, {"spec": {"expirationSeconds": 3600}})
        assert (reply.warnings, reply.json()["spec"]["expirationSeconds"]) == ([], 3600)
        # Validation still sees the requested value first.
        reply = await client.create_token(NS, SA, {"spec": {"expirationSeconds": (1 << 32) + 1}})
        assert reply.status == 422


async def test_rule_10_signing_failure(emu: Emulator, client: EmulatorClient) -> None:
    emu.faults.fail_signing_next(1, "crypto/rsa: verification error")
    reply = await client.create_token(NS, SA)
    assert_status(reply, 500, None, "failed to generate token: crypto/rsa: verification error")
    assert (await client.create_token(NS, SA)).status == 201


# --- other endpoints ----------------------------------------------------------------------


async def test_unknown_paths_and_methods(client: EmulatorClient) -> None:
    not_found = ("the server could not find the requested resource", {})
    for path in ("/nope", "/api/v1/namespaces/default/configmaps", "/apis/apps/v1"):
        reply = await client.request("GET", path)
        assert_status(reply, 404, "NotFound", not_found[0], not_found[1])
    reply = await client.request("GET", token_path())
    assert_status(
        reply,
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        {},
    )


async def test_public_endpoints(emu: Emulator, client: EmulatorClient) -> None:
    reply = await client.request("GET", "/healthz", token=None)
    assert (reply.status, reply.text) == (200, "ok")
    version = (await client.request("GET", "/version", token=None)).json()
    assert (version["major"], version["minor"], version["gitVersion"]) == ("1", "30", "v1.30.0")
    discovery = await client.request("GET", "/.well-known/openid-configuration", token=None)
    assert discovery.json() == {
        "issuer": ISSUER,
        "jwks_uri": f"{emu.url}/openid/v1/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    jwks = await client.request("GET", "/openid/v1/jwks", token=None)
    assert jwks.headers["Content-Type"] == "application/jwk-set+json"
    # Credentials that do not authenticate are refused even here.
    assert (await client.request("GET", "/version", token="wrong")).json() == UNAUTHORIZED
    # Everything else needs credentials.
    assert (await client.request("GET", "/api", token=None)).json() == UNAUTHORIZED


async def test_discovery(emu: Emulator, client: EmulatorClient) -> None:
    api = (await client.request("GET", "/api")).json()
    assert api["kind"] == "APIVersions" and api["versions"] == ["v1"]
    resources = (await client.request("GET", "/api/v1")).json()
    names = {r["name"] for r in resources["resources"]}
    assert {
        "pods",
        "serviceaccounts",
        "serviceaccounts/token",
        "secrets",
        "nodes",
        "namespaces",
    } <= names
    assert (await client.request("GET", "/apis")).json()["kind"] == "APIGroupList"


async def test_pretty_output(client: EmulatorClient) -> None:
    reply = await client.create_token(NS, "x", params={"pretty": "true"})
    assert reply.text.startswith('{\n  "kind": "Status",\n')


async def test_restart_keeps_url_ca_and_keys(emu: Emulator, client: EmulatorClient) -> None:
    url, ca, jwks = emu.url, emu.ca_cert_pem, emu.jwks()
    await emu.stop()
    await emu.stop()  # idempotent
    with pytest.raises(OSError):
        await client.create_token(NS, SA)
    await emu.start()
    assert (emu.url, emu.ca_cert_pem, emu.jwks()) == (url, ca, jwks)
    assert (await client.create_token(NS, SA)).status == 201
