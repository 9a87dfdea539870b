"""`token-broker token`: a token from a broker, like `kubectl create token`.

It goes through the blocking Python client (broker.client): the channel, TLS and credentials,
user agent and reconnect options, and the retries of every client — UNAVAILABLE, and
RESOURCE_EXHAUSTED with the server's RetryInfo, at most --max-attempts calls, all within
--timeout — and the client's error rendering (`TokenBrokerError.describe`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from broker.cli.flags import (
    EXIT_ERROR,
    EXIT_USAGE,
    UsageError,
    add_connection_flags,
    add_request_flags,
    client_config_from_args,
    client_flag_errors,
    quiet_grpc_core,
    token_request_from_args,
)

if TYPE_CHECKING:
    from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb


def add_parser(commands: Any) -> None:
    token = commands.add_parser(
        "token",
        help="request a service-account token from a broker (like kubectl create token)",
        description="Request a service account token through a token broker.",
    )
    add_request_flags(token)
    token.add_argument("-o", "--output", choices=["token", "json", "yaml"], default="token")
    token.add_argument(
        "--dry-run",
        nargs="?",
        const="server",
        default="none",
        choices=["none", "server"],
        help="server: validate and mint nothing (dryRun=All)",
    )
    add_connection_flags(token)


def kubernetes_object(token_request: pb.TokenRequest) -> dict[str, Any]:
    """The TokenRequest as Kubernetes writes it: kind/apiVersion first, int64 as numbers, and
    the spec's three fields always present, in the API's order (TokenRequestSpec has no
    omitempty: an unbound token has `"boundObjectRef": null`, as `kubectl create token -o
    json` prints it; proto3 JSON would leave out what is unset)."""
    from google.protobuf import json_format

    from broker.convert import TOKEN_REQUEST_API_VERSION, TOKEN_REQUEST_KIND

    body = json_format.MessageToDict(token_request)
    written = body.get("spec", {})
    expiration = written.get("expirationSeconds")
    spec = {
        "audiences": written.get("audiences", []),
        # proto3 JSON writes int64 as a string; Kubernetes writes a number.
        "expirationSeconds": int(expiration) if expiration is not None else None,
        "boundObjectRef": written.get("boundObjectRef"),
    }
    return {
        "kind": TOKEN_REQUEST_KIND,
        "apiVersion": TOKEN_REQUEST_API_VERSION,
        "metadata": body.get("metadata", {}),
        "spec": spec,
        "status": body.get("status", {}),
    }


def run(args: argparse.Namespace) -> int:
    quiet_grpc_core()  # before grpc is imported
    from broker.client import TokenBrokerClient, TokenBrokerError

    try:
        request = token_request_from_args(args)
        config = client_config_from_args(args)
        with client_flag_errors(), TokenBrokerClient(config) as client:
            result = client.create_token_request(request)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TokenBrokerError as err:
        print(f"error: failed to create token: {err.describe()}", file=sys.stderr)
        return EXIT_ERROR
    for warning in result.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    token_request = result.token_request
    if not result.token and args.dry_run == "none":
        print("error: failed to create token: no token in server response", file=sys.stderr)
        return EXIT_ERROR
    if args.output == "json":
        print(json.dumps(kubernetes_object(token_request), indent=4))
    elif args.output == "yaml":
        import yaml

        print(yaml.safe_dump(kubernetes_object(token_request), sort_keys=False), end="")
    else:
        # As kubectl: a newline only for a terminal, so `> file` holds just the token.
        end = "\n" if sys.stdout.isatty() else ""
        print(result.token, end=end)
    return 0
