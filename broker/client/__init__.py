"""The client side: the Python client of the broker, and what is built on it.

    async with AsyncTokenBrokerClient("broker.example:8443", ca_file="ca.crt",
                                      credential_file="/var/run/secrets/tb/key") as client:
        result = await client.create_token("demo", "build-robot", audiences=["vault"])
        result.token, result.expiration_timestamp

Transport: TLS (the default for TCP; `ca_file` for a private CA), mutual TLS (`cert_file` +
`key_file`), plaintext TCP only when asked (`plaintext=True`: loopback/dev), or a unix socket
(`unix:/path`, always plaintext: the socket's file mode decides who connects). A bearer
credential (an API key or an OIDC JWT) is sent as `authorization: Bearer ...`; a
`credential_file` is re-read for every call, so a rotated (projected) token is picked up.

Retries (`RetryPolicy`): bounded attempts, all within the caller's deadline (`timeout`: the
whole call, retries included), only for `UNAVAILABLE`, and `RESOURCE_EXHAUSTED` when the
server says when to come back (RetryInfo or `grpc-retry-pushback-ms`); see
broker.client.retries. Results are `TokenResult`s; failures raise `TokenBrokerError` with the
gRPC code, message, ErrorInfo reason/domain/metadata, field violations and retry delay. No
repr, str or exception message here contains a token or a credential.

Modules: `config` (ClientConfig, the channel), `retries`, `errors` (TokenBrokerError and its
rendering), `messages` (requests and results), `clients` (the asyncio and blocking clients);
built on them, loaded only when used: `agent` + `agent_config` (`token-broker agent`),
`exec_credential` (the kubectl credential plugin), `files` (atomic writes).

Layering (an import contract in pyproject.toml, checked by `make lint`): the client side
imports nothing of the server side, nor kubernetes, redis or pydantic-settings; of broker it
uses only the generated messages (broker.gen), the error wire format (broker.errors), the
token-lifetime rule (broker.lifetime), the backoff formula (broker.backoff), Go durations
and file modes.
"""

from broker.client.clients import AsyncTokenBrokerClient, TokenBrokerClient
from broker.client.config import (
    DEFAULT_TIMEOUT_SECONDS,
    SERVICE_CONFIG,
    ClientConfig,
    ClientConfigError,
)
from broker.client.errors import FieldViolation, TokenBrokerError
from broker.client.messages import (
    BOUND_OBJECT_KINDS,
    METHOD,
    BoundObject,
    TokenResult,
    build_request,
    jwt_claims,
)
from broker.client.retries import NO_RETRIES, RetryPolicy

__all__ = [
    "BOUND_OBJECT_KINDS",
    "DEFAULT_TIMEOUT_SECONDS",
    "METHOD",
    "NO_RETRIES",
    "SERVICE_CONFIG",
    "AsyncTokenBrokerClient",
    "BoundObject",
    "ClientConfig",
    "ClientConfigError",
    "FieldViolation",
    "RetryPolicy",
    "TokenBrokerClient",
    "TokenBrokerError",
    "TokenResult",
    "build_request",
    "jwt_claims",
]
