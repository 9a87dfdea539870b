"""The HTTP doors' mapping of the reason catalogue (broker.http_errors): complete, deliberate
(no 2xx, 500 only for what is internal, 401 only for the caller's own credentials), and its
table in docs/http-door.md is a generated block of broker.reference (checked there)."""

from __future__ import annotations

import grpc
import pytest

from broker.errors import BrokerError
from broker.http_errors import ANSWERS, answer_for, retry_after_header
from broker.http_kubernetes import kubernetes_field
from broker.reasons import KUBERNETES_DOMAIN, Reason

OAUTH_ERRORS = {
    "invalid_request",
    "invalid_target",
    "invalid_scope",
    "unsupported_grant_type",
    "temporarily_unavailable",
    "server_error",
}


def test_every_reason_is_mapped() -> None:
    assert set(ANSWERS) == set(Reason)


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_each_answer_is_deliberate(reason: Reason) -> None:
    answer = ANSWERS[reason]
    assert 400 <= answer.status <= 599
    assert answer.oauth_error in OAUTH_ERRORS
    if answer.status == 401:
        assert reason in (Reason.CREDENTIALS_MISSING, Reason.CREDENTIALS_INVALID)
    if reason.retryable and len(reason.codes) == 1:
        assert answer.status in (408, 429, 503, 504), reason
        assert answer.oauth_status in (400, 429, 503)
    if answer.status >= 500 or answer.oauth_status >= 500:
        assert reason.codes[0] not in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), reason
    if reason.codes == (grpc.StatusCode.PERMISSION_DENIED,):
        assert answer.status == 403
    if answer.oauth_status != 400:
        assert answer.oauth_error in ("temporarily_unavailable", "server_error")


def test_relayed_reasons_outside_the_catalogue_follow_the_status() -> None:
    def relayed(status: int, reason: str) -> BrokerError:
        return BrokerError(
            code=grpc.StatusCode.FAILED_PRECONDITION,
            message="m",
            reason=f"KUBERNETES_{reason.upper()}",
            domain=KUBERNETES_DOMAIN,
            metadata={"kubernetesCode": str(status), "kubernetesReason": reason},
        )

    assert answer_for(relayed(418, "Teapot"))[:2] == (418, "Teapot")
    assert answer_for(relayed(401, "Unauthorized")).status == 503  # the broker's credentials
    assert answer_for(relayed(429, "Slow")).status == 429
    assert answer_for(relayed(502, "Gateway")).status == 503


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    error = BrokerError.of(Reason.RATE_LIMITED, "slow down", retry_after=0.2)
    assert retry_after_header(error) == "1"
    assert retry_after_header(BrokerError.of(Reason.RATE_LIMITED, "x", retry_after=2.5)) == "3"
    assert retry_after_header(BrokerError.of(Reason.INTERNAL, "x")) is None


def test_field_paths_as_the_api_server_names_them() -> None:
    assert kubernetes_field("token_request.spec.expiration_seconds") == "spec.expirationSeconds"
    assert kubernetes_field("token_request.spec.audiences[2]") == "spec.audiences[2]"
    assert kubernetes_field("token_request.spec.bound_object_ref.api_version") == (
        "spec.boundObjectRef.apiVersion"
    )
    assert kubernetes_field("token_request.metadata.name") == "metadata.name"
    assert kubernetes_field("dry_run[0]") == "dryRun[0]"
    assert kubernetes_field("service_account") == "metadata.name"
