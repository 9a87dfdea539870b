"""The `token-broker` command: `serve` the broker, or get a `token` from one.

`token` takes the flags of `kubectl create token` (--audience, --duration, --bound-object-*,
-o) plus the connection flags of a gRPC client (--server, --plaintext, --cacert, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from grpc import aio

from broker import __version__
from broker.config import ConfigError, Settings, load_settings
from broker.convert import TOKEN_REQUEST_API_VERSION, TOKEN_REQUEST_KIND
from broker.errors import rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc

DEFAULT_SERVER = "127.0.0.1:50051"
# kubectl's boundObjectKinds: kind -> apiVersion.
BOUND_OBJECT_KINDS = {"Node": "v1", "Pod": "v1", "Secret": "v1"}
EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A flag value is invalid (printed as `error: ...`, exit 2)."""


# --- Go durations (time.ParseDuration), as kubectl's --duration takes them --------------------

_GO_UNITS = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    # Go accepts both micro signs: U+00B5 and U+03BC.
    "\u00b5s": Decimal("1e-6"),
    "\u03bcs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_GO_PART = re.compile("([0-9]+(?:[.][0-9]*)?|[.][0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> Decimal:
    """Seconds in a Go duration: "10m", "1h30m", "1.5h", "3600s", "0"; signed."""
    value = text.strip()
    sign = -1 if value.startswith("-") else 1
    if value[:1] in ("+", "-"):
        value = value[1:]
    if value == "0":
        return Decimal(0)
    pos, total = 0, Decimal(0)
    while pos < len(value):
        match = _GO_PART.match(value, pos)
        if match is None:
            break
        total += Decimal(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if not value or pos != len(value):
        raise ValueError(f'invalid duration "{text}" (examples: 10m, 1h, 1h30m, 3600s)')
    return sign * total


def _duration_arg(text: str) -> Decimal:
    try:
        return parse_go_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description="Short-lived Kubernetes service-account tokens over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"token-broker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_token(commands)
    emulator = commands.add_parser(
        "emulator",
        help="run the Kubernetes API-server emulator alone (python -m broker.emulator)",
        add_help=False,
    )
    emulator.add_argument("emulator_args", nargs=argparse.REMAINDER)
    return parser


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker. Settings come from --config, then TOKEN_BROKER_* "
        "environment variables, then these flags (later wins).",
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML settings file")
    serve.add_argument("--listen", metavar="HOST:PORT", help="TCP listen address")
    serve.add_argument("--unix-socket", type=Path, metavar="PATH", help="also listen here")
    serve.add_argument(
        "--health-listen", metavar="HOST:PORT", help="plaintext health-only listener (probes)"
    )
    serve.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="server private key (PEM)")
    serve.add_argument(
        "--tls-client-ca", type=Path, metavar="FILE", help="CA of client certificates (mTLS)"
    )
    serve.add_argument(
        "--allow-plaintext", action="store_true", help="allow plaintext TCP on a loopback address"
    )
    serve.add_argument("--kubeconfig", type=Path, metavar="FILE", help="kubeconfig to use")
    serve.add_argument("--context", metavar="NAME", help="kubeconfig context")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["json", "text"])
    serve.add_argument(
        "--dev",
        action="store_true",
        help="INSECURE dev mode: in-process API-server emulator, plaintext on loopback",
    )


def _add_token(commands: Any) -> None:
    token = commands.add_parser(
        "token",
        help="request a service-account token from a broker (like kubectl create token)",
        description="Request a service account token through a token broker.",
    )
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
        type=_duration_arg,
        default=Decimal(0),
        help="requested lifetime, a Go duration (10m, 1h, 1h30m); 0 means the server default",
    )
    token.add_argument("--bound-object-kind", default="", help="Node, Pod or Secret")
    token.add_argument("--bound-object-name", default="")
    token.add_argument("--bound-object-uid", default="")
    token.add_argument("-o", "--output", choices=["token", "json", "yaml"], default="token")
    token.add_argument(
        "--dry-run",
        nargs="?",
        const="server",
        default="none",
        choices=["none", "server"],
        help="server: validate and mint nothing (dryRun=All)",
    )
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
        "--timeout", type=_duration_arg, default=Decimal(10), help="call deadline (10s)"
    )


# --- serve ------------------------------------------------------------------------------------


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as a nested settings dict (flags not given stay unset)."""
    server: dict[str, Any] = {}
    tls: dict[str, Any] = {}
    kubernetes: dict[str, Any] = {}
    log: dict[str, Any] = {}
    if args.listen is not None:
        server["listen"] = args.listen
    if args.unix_socket is not None:
        server["unixSocket"] = args.unix_socket
    if args.health_listen is not None:
        server["healthListen"] = args.health_listen
    if args.allow_plaintext:
        server["allowPlaintext"] = True
    for flag, key in (
        ("tls_cert", "certFile"),
        ("tls_key", "keyFile"),
        ("tls_client_ca", "clientCaFile"),
    ):
        if getattr(args, flag) is not None:
            tls[key] = getattr(args, flag)
    if tls:
        server["tls"] = tls
    if args.kubeconfig is not None:
        # An explicit kubeconfig wins over in-cluster detection.
        kubernetes.update(mode="kubeconfig", kubeconfig=args.kubeconfig)
    if args.context is not None:
        kubernetes["context"] = args.context
    if args.log_level is not None:
        log["level"] = args.log_level
    if args.log_format is not None:
        log["format"] = args.log_format
    elif args.dev:
        log["format"] = "text"  # dev mode is read by people, not collectors
    out: dict[str, Any] = {}
    for key, value in (("server", server), ("kubernetes", kubernetes), ("log", log)):
        if value:
            out[key] = value
    if args.dev:
        out["dev"] = True
    return out


def _serve(args: argparse.Namespace) -> int:
    from broker.logs import setup_logging

    try:
        settings = load_settings(args.config, serve_overrides(args))
    except ConfigError as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log)
    try:
        return asyncio.run(_serve_async(settings))
    except ConfigError as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


async def _serve_async(settings: Settings) -> int:
    # Imported here: `token` does not need the server, the emulator or kubernetes.
    if settings.dev:
        from broker.devmode import run_dev

        return await run_dev(settings)
    from broker.server import run_server

    return await run_server(settings)


# --- token ------------------------------------------------------------------------------------


def token_request_from_args(args: argparse.Namespace) -> pb.CreateTokenRequest:
    """The CreateToken request for the flags; raises UsageError as kubectl validates them."""
    if not args.namespace:
        raise UsageError("--namespace is required")
    duration: Decimal = args.duration
    if duration < 0:
        raise UsageError("--duration must be greater than or equal to 0")
    if duration != duration.to_integral_value():
        raise UsageError("--duration cannot be expressed in units less than seconds")
    if any(not aud for aud in args.audience):
        raise UsageError("--audience must not be an empty string")
    spec = pb.TokenRequestSpec(audiences=args.audience)
    if duration > 0:
        spec.expiration_seconds = int(duration)
    kind = args.bound_object_kind
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
        spec.bound_object_ref.CopyFrom(
            pb.BoundObjectReference(
                kind=kind,
                api_version=BOUND_OBJECT_KINDS[kind],
                name=args.bound_object_name,
                uid=args.bound_object_uid,
            )
        )
    return pb.CreateTokenRequest(
        namespace=args.namespace,
        service_account=args.service_account,
        token_request=pb.TokenRequest(spec=spec),
        dry_run=["All"] if args.dry_run == "server" else [],
    )


def kubernetes_object(token_request: pb.TokenRequest) -> dict[str, Any]:
    """The TokenRequest as Kubernetes writes it (kind/apiVersion first, int64 as numbers)."""
    body = json_format.MessageToDict(token_request)
    spec = body.get("spec", {})
    if "expirationSeconds" in spec:
        # proto3 JSON writes int64 as a string; Kubernetes writes a number.
        spec["expirationSeconds"] = int(spec["expirationSeconds"])
    return {
        "kind": TOKEN_REQUEST_KIND,
        "apiVersion": TOKEN_REQUEST_API_VERSION,
        "metadata": body.get("metadata", {}),
        "spec": spec,
        "status": body.get("status", {}),
    }


def _read_file(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def open_channel(args: argparse.Namespace) -> aio.Channel:
    """A channel to --server: plaintext for unix sockets and --plaintext, else TLS."""
    target: str = args.server
    if (args.cert is None) != (args.key is None):
        raise UsageError("--cert and --key must be given together")
    if target.startswith("unix:"):
        # The broker's unix listener is plaintext; its file mode decides who may connect.
        return aio.insecure_channel(target)
    if args.plaintext:
        if args.cacert or args.cert:
            raise UsageError("--plaintext cannot be combined with --cacert, --cert or --key")
        return aio.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read_file(args.cacert, "--cacert"),
        private_key=_read_file(args.key, "--key"),
        certificate_chain=_read_file(args.cert, "--cert"),
    )
    options: list[tuple[str, Any]] = []
    if args.server_name:
        options += [
            ("grpc.ssl_target_name_override", args.server_name),
            ("grpc.default_authority", args.server_name),
        ]
    return aio.secure_channel(target, creds, options=options)


async def _create_token(
    args: argparse.Namespace, request: pb.CreateTokenRequest
) -> pb.CreateTokenResponse:
    timeout = float(args.timeout) if args.timeout > 0 else None
    async with open_channel(args) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        response: pb.CreateTokenResponse = await stub.CreateToken(request, timeout=timeout)
        return response


def print_rpc_error(err: aio.AioRpcError) -> None:
    """The code, message and rich details of a failed call, on stderr."""
    status = rich_status_from_call(err)
    print(f"error: failed to create token: {status.code.name}: {status.message}", file=sys.stderr)
    if status.error_info is not None:
        info = status.error_info
        print(f"  reason: {info.reason} (domain {info.domain})", file=sys.stderr)
        for key, value in sorted(info.metadata.items()):
            print(f"  {key}: {value}", file=sys.stderr)
    if status.bad_request is not None:
        for violation in status.bad_request.field_violations:
            print(f"  field {violation.field}: {violation.description}", file=sys.stderr)
    if status.retry_info is not None:
        delay = status.retry_info.retry_delay.ToTimedelta().total_seconds()
        print(f"  retry after: {delay:g}s", file=sys.stderr)


def _token(args: argparse.Namespace) -> int:
    try:
        request = token_request_from_args(args)
        response = asyncio.run(_create_token(args, request))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except aio.AioRpcError as err:
        print_rpc_error(err)
        return EXIT_ERROR
    for warning in response.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    token_request = response.token_request
    if not token_request.status.token and args.dry_run == "none":
        print("error: failed to create token: no token in server response", file=sys.stderr)
        return EXIT_ERROR
    if args.output == "json":
        print(json.dumps(kubernetes_object(token_request), indent=4))
    elif args.output == "yaml":
        print(yaml.safe_dump(kubernetes_object(token_request), sort_keys=False), end="")
    else:
        # As kubectl: a newline only for a terminal, so `> file` holds just the token.
        end = "\n" if sys.stdout.isatty() else ""
        print(token_request.status.token, end=end)
    return 0


# --- emulator ---------------------------------------------------------------------------------


def _emulator(argv: list[str]) -> int:
    from broker.emulator.__main__ import main as emulator_main

    return emulator_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulator"]:
        # Everything after `emulator` is the emulator's own (including --help).
        return _emulator(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token(args)
    return _emulator(args.emulator_args)


if __name__ == "__main__":
    raise SystemExit(main())
