"""The broker's own validation, through the broker: INVALID_ARGUMENT + BadRequest, before any
upstream call.

Each refusal goes through the real path (gRPC stub -> server -> servicer) and the emulator
must have seen zero token requests. The table (tests/support/validation.py) is checked against
the validation itself in tests/unit/test_validation.py.
"""

from __future__ import annotations

import grpc
import pytest

from broker.emulator import Emulator
from broker.errors import ERROR_DOMAIN
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import Reason
from tests.support.stack import NAMESPACE, call_error, create_request
from tests.support.validation import CASES


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
