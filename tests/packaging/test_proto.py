"""The .proto is the product for non-Python users: generated code fresh, wire/JSON compatible
with Kubernetes' TokenRequest, and buf-lint clean."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format

from broker.convert import token_request_from_json
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto"
GEN = REPO / "broker" / "gen"


def _load_generate():  # proto/generate.py is a script, not a package module
    spec = importlib.util.spec_from_file_location("proto_generate", PROTO / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    _load_generate().generate(out)
    fresh, checked_in = _tree(out), _tree(GEN)
    assert sorted(fresh) == sorted(checked_in), "run `make proto`: file set differs"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"run `make proto`: stale generated files {stale}"


# The reference's JSON shapes (docs: kubernetes-tokenrequest.md section 1).
K8S_RESPONSE = {
    "kind": "TokenRequest",
    "apiVersion": "authentication.k8s.io/v1",
    "metadata": {
        "name": "build-robot",
        "namespace": "default",
        "creationTimestamp": "2024-05-01T12:00:00Z",
    },
    "spec": {
        "audiences": ["https://kubernetes.default.svc.cluster.local"],
        "expirationSeconds": 3600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web-0", "uid": "0b7c"},
    },
    "status": {
        "token": "eyJhbGciOiJSUzI1NiIsImtpZCI6Ii4uLiJ9.cGF5bG9hZA.c2ln",
        "expirationTimestamp": "2024-05-01T13:00:00Z",
    },
}


def test_json_shapes_equal_kubernetes() -> None:
    import json

    msg = token_request_from_json(json.dumps(K8S_RESPONSE).encode())
    # proto3 JSON (camelCase) of spec and status is the Kubernetes JSON of them. int64 is a
    # JSON string in proto3 JSON; Kubernetes writes a number: ParseDict accepts both.
    spec = json_format.MessageToDict(msg.spec)
    assert spec == {**K8S_RESPONSE["spec"], "expirationSeconds": "3600"}
    assert json_format.MessageToDict(msg.status) == K8S_RESPONSE["status"]
    assert json_format.MessageToDict(msg.metadata) == K8S_RESPONSE["metadata"]
    back = pb.TokenRequestSpec()
    json_format.ParseDict(K8S_RESPONSE["spec"], back)
    assert back == msg.spec


def test_unbound_response_with_null_bound_object_ref() -> None:
    import json

    body = {**K8S_RESPONSE, "spec": {**K8S_RESPONSE["spec"], "boundObjectRef": None}}
    body["metadata"] = {**K8S_RESPONSE["metadata"], "managedFields": [], "uid": "u-1"}
    msg = token_request_from_json(json.dumps(body).encode())
    assert not msg.spec.HasField("bound_object_ref")
    assert msg.metadata.uid == "u-1"


def test_wire_round_trip_and_upstream_field_numbers() -> None:
    msg = pb.TokenRequest(
        metadata=pb.ObjectMeta(name="build-robot", namespace="demo", uid="u"),
        spec=pb.TokenRequestSpec(
            audiences=["a", "b"],
            expiration_seconds=3600,
            bound_object_ref=pb.BoundObjectReference(
                kind="Pod", api_version="v1", name="web-0", uid="x"
            ),
        ),
        status=pb.TokenRequestStatus(token="t"),
    )
    assert pb.TokenRequest.FromString(msg.SerializeToString()) == msg
    # kubernetes/api authentication/v1 generated.proto numbers.
    spec = pb.TokenRequestSpec.DESCRIPTOR.fields_by_name
    assert (spec["audiences"].number, spec["bound_object_ref"].number) == (1, 3)
    assert spec["expiration_seconds"].number == 4
    ref = pb.BoundObjectReference.DESCRIPTOR.fields_by_name
    assert [ref[n].number for n in ("kind", "api_version", "name", "uid")] == [1, 2, 3, 4]
    assert ref["uid"].json_name == "uid"
    status = pb.TokenRequestStatus.DESCRIPTOR.fields_by_name
    assert (status["token"].number, status["expiration_timestamp"].number) == (1, 2)
    meta = pb.ObjectMeta.DESCRIPTOR.fields_by_name
    assert [meta[n].number for n in ("name", "namespace", "uid", "creation_timestamp")] == [
        1,
        3,
        5,
        8,
    ]
    # Upstream field 2 of TokenRequestSpec is unused: a message using it decodes as unknown.
    assert 2 not in [f.number for f in pb.TokenRequestSpec.DESCRIPTOR.fields]


def _buf() -> str | None:
    found = shutil.which("buf")
    if found:
        return found
    candidate = Path(sys.executable).parent / "buf"
    return str(candidate) if candidate.exists() else None


def test_buf_lint() -> None:
    buf = _buf()
    if buf is None:
        pytest.fail("buf not found (install the buf-bin dev dependency)")
    result = subprocess.run([buf, "lint"], cwd=PROTO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
