"""`token-broker exec-credential`: the kubectl credential plugin (broker.client.exec_credential).

kubectl runs it for every command: this module imports nothing heavy, and the plugin's run
imports only the client side (no server, no kubernetes, no pydantic-settings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

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


def add_parser(commands: Any) -> None:
    plugin = commands.add_parser(
        "exec-credential",
        help="kubectl/client-go credential plugin: print an ExecCredential with a broker token",
        description="A kubectl credential plugin (kubeconfig users[].user.exec): prints a "
        "client.authentication.k8s.io/v1 ExecCredential holding a token from the broker. "
        "Takes the flags of `token-broker token`. Tokens are cached in --cache-dir until 80% "
        "of their lifetime.",
    )
    add_request_flags(plugin)
    add_connection_flags(plugin)
    cache = plugin.add_argument_group("cache")
    cache.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="token cache ($XDG_CACHE_HOME/token-broker, else ~/.cache/token-broker)",
    )
    cache.add_argument("--no-cache", action="store_true", help="always ask the broker")
    plugin.set_defaults(dry_run="none")


def run(args: argparse.Namespace) -> int:
    quiet_grpc_core()  # before grpc is imported
    from broker.client import TokenBrokerError
    from broker.client.exec_credential import (
        ExecCredentialError,
        TokenFileCache,
        default_cache_dir,
        exec_api_version,
        exec_credential,
        obtain_token,
    )

    try:
        api_version = exec_api_version(os.environ)
        request = token_request_from_args(args)
        config = client_config_from_args(args)
        cache = None
        if not args.no_cache:
            cache = TokenFileCache(args.cache_dir or default_cache_dir(os.environ))
        with client_flag_errors():
            cached, warnings = obtain_token(config, request, cache)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TokenBrokerError as err:
        print(f"error: failed to get a token from the broker: {err.describe()}", file=sys.stderr)
        return EXIT_ERROR
    except (ExecCredentialError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for warning in warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    print(json.dumps(exec_credential(api_version, cached.token, cached.expiration)))
    return 0
