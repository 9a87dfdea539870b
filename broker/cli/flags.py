"""What several commands share: exit codes, usage errors, and the request and connection
flags of `token`, `exec-credential` (and the request flags of `policy explain`).

The connection flags become a ClientConfig (`client_config_from_args`): the commands reach the
broker through the Python client (broker.client) — one channel, credentials, user agent,
reconnect options, retries and error rendering for everything. Its checks name ClientConfig's
fields; `client_flag_errors()` turns them into usage errors naming the flags.

Imports stay light (argparse, broker.durations): the client is imported when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from broker.durations import parse_go_duration

if TYPE_CHECKING:
    from broker.client import ClientConfig
    from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb

EXIT_ERROR = 1
EXIT_USAGE = 2
DEFAULT_SERVER = "127.0.0.1:50051"
# The bearer credential of `token`, when --credential-file is not given.
CREDENTIAL_ENV = "TOKEN_BROKER_CREDENTIAL"
# Attempts of one call, retries included (broker.client.RetryPolicy's default).
DEFAULT_MAX_ATTEMPTS = 4
# ClientConfig's fields as these commands spell them.
CONNECTION_FLAGS = {
    "address": "--server",
    "plaintext": "--plaintext",
    "ca_file": "--cacert",
    "cert_file": "--cert",
    "key_file": "--key",
    "server_name": "--server-name",
    "credential": f"${CREDENTIAL_ENV}",
    "credential_file": "--credential-file",
}


def quiet_grpc_core() -> None:
    """Keep gRPC's C core from writing log lines of its own to stderr (`I1204 ...
    ssl_transport_security.cc:2563] Handshake failed ...` when TLS meets a plaintext
    server): the client commands print every failure themselves. Called before grpc is
    imported; a GRPC_VERBOSITY the user set wins (GRPC_VERBOSITY=debug to see them). Once
    grpc is imported (the command run in-process, e.g. by a test) it is too late: nothing is
    changed then."""
    if "grpc" not in sys.modules and not os.environ.get("GRPC_VERBOSITY"):
        os.environ["GRPC_VERBOSITY"] = "NONE"


class UsageError(Exception):
    """A flag value is invalid (printed as `error: ...`, exit 2)."""


def duration_arg(text: str) -> Decimal:
    try:
        return parse_go_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_request_flags(token: argparse.ArgumentParser) -> None:
    """SERVICE_ACCOUNT -n NAMESPACE and kubectl create token's request flags."""
    token.add_argument("service_account", metavar="SERVICE_ACCOUNT")
    token.add_argument("-n", "--namespace", required=True, help="namespace of the account")
    token.add_argument(
        "--audience",
        action="append",
        default=[],
        help="audience of the token (repeatable); unset means the API server's own",
    )
    token.add_argument(
        "--duration",
        type=duration_arg,
        default=Decimal(0),
        help="requested lifetime, a Go duration (10m, 1h, 1h30m); 0 means the server default",
    )
    token.add_argument("--bound-object-kind", default="", help="Node, Pod or Secret")
    token.add_argument("--bound-object-name", default="")
    token.add_argument("--bound-object-uid", default="")


def add_connection_flags(token: argparse.ArgumentParser) -> None:
    """How to reach the broker: --server, TLS/mTLS files, the bearer credential, --timeout,
    --max-attempts."""
    conn = token.add_argument_group("connection")
    conn.add_argument(
        "--server", default=DEFAULT_SERVER, help=f"host:port or unix:/path ({DEFAULT_SERVER})"
    )
    conn.add_argument("--plaintext", action="store_true", help="no TLS (loopback/dev only)")
    conn.add_argument("--cacert", type=Path, metavar="FILE", help="CA to verify the server")
    conn.add_argument("--cert", type=Path, metavar="FILE", help="client certificate (mTLS)")
    conn.add_argument("--key", type=Path, metavar="FILE", help="client private key (mTLS)")
    conn.add_argument("--server-name", help="name to verify in the server certificate")
    conn.add_argument(
        "--credential-file",
        type=Path,
        metavar="FILE",
        help=f"bearer credential (an API key or an OIDC JWT) sent as `authorization: Bearer`; "
        f"also ${CREDENTIAL_ENV} (the file wins)",
    )
    conn.add_argument(
        "--timeout",
        type=duration_arg,
        default=Decimal(10),
        help="deadline of the whole call, retries included (10s; 0: none)",
    )
    conn.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        metavar="N",
        help=f"calls at most, within --timeout ({DEFAULT_MAX_ATTEMPTS}); UNAVAILABLE and "
        "rate limits with RetryInfo are retried; 1: no retries",
    )


def token_request_from_args(args: argparse.Namespace) -> pb.CreateTokenRequest:
    """The CreateToken request for the flags; raises UsageError as kubectl validates them."""
    from broker.client import BOUND_OBJECT_KINDS, BoundObject, build_request

    if not args.namespace:
        raise UsageError("--namespace is required")
    duration: Decimal = args.duration
    if duration < 0:
        raise UsageError("--duration must be greater than or equal to 0")
    if duration != duration.to_integral_value():
        raise UsageError("--duration cannot be expressed in units less than seconds")
    if any(not aud for aud in args.audience):
        raise UsageError("--audience must not be an empty string")
    kind = args.bound_object_kind
    bound_object = None
    if not kind:
        if args.bound_object_name:
            raise UsageError(
                "--bound-object-name can only be set if --bound-object-kind is provided"
            )
        if args.bound_object_uid:
            raise UsageError(
                "--bound-object-uid can only be set if --bound-object-kind is provided"
            )
    else:
        if kind not in BOUND_OBJECT_KINDS:
            raise UsageError(
                f"supported --bound-object-kind values are {', '.join(BOUND_OBJECT_KINDS)}"
            )
        if not args.bound_object_name:
            raise UsageError("--bound-object-name is required if --bound-object-kind is provided")
        bound_object = BoundObject(kind, args.bound_object_name, args.bound_object_uid)
    return build_request(
        args.namespace,
        args.service_account,
        audiences=args.audience,
        expiration_seconds=int(duration) if duration > 0 else None,
        bound_object=bound_object,
        dry_run=args.dry_run == "server",
    )


@contextlib.contextmanager
def client_flag_errors() -> Iterator[None]:
    """ClientConfig's errors (files that do not go together or cannot be read) as usage
    errors naming the flags."""
    from broker.client import ClientConfigError

    try:
        yield
    except ClientConfigError as exc:
        raise UsageError(exc.spelled(CONNECTION_FLAGS)) from None


def client_config_from_args(args: argparse.Namespace) -> ClientConfig:
    """The Python client's settings for the connection flags; raises UsageError."""
    from broker.client import ClientConfig, RetryPolicy

    if args.max_attempts < 1:
        raise UsageError("--max-attempts must be at least 1")
    credential = None
    if args.credential_file is None:
        credential = os.environ.get(CREDENTIAL_ENV, "").strip() or None
    with client_flag_errors():
        return ClientConfig(
            address=args.server,
            plaintext=bool(args.plaintext),
            ca_file=args.cacert,
            cert_file=args.cert,
            key_file=args.key,
            server_name=args.server_name,
            credential=credential,
            credential_file=args.credential_file,
            timeout=float(args.timeout) if args.timeout > 0 else None,
            retry=RetryPolicy(max_attempts=args.max_attempts),
        )
