"""The `token-broker` command: `serve` the broker, get a `token` from one, check a `policy`.

`token` takes the flags of `kubectl create token` (--audience, --duration, --bound-object-*,
-o) plus the connection flags of a gRPC client (--server, --plaintext, --cacert, ...).
`policy validate FILE` checks a policy file; `policy explain` answers, like
`kubectl auth can-i`, whether a caller would get a token, and why, with the same request flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import grpc
import yaml
from google.protobuf import json_format
from grpc import aio

from broker import __version__
from broker.durations import parse_go_duration
from broker.errors import rich_status_from_call
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.identity import AUTH_METHODS, CERTIFICATE_FIELDS, Identity

# broker.config, broker.convert and broker.authn_apikeys (pydantic-settings, kubernetes) are
# imported where used: `exec-credential` runs on every kubectl command and must start fast.
if TYPE_CHECKING:
    from broker.client import ClientConfig
    from broker.config import Settings
    from broker.policy import Explanation

DEFAULT_SERVER = "127.0.0.1:50051"
# kubectl's boundObjectKinds: kind -> apiVersion.
BOUND_OBJECT_KINDS = {"Node": "v1", "Pod": "v1", "Secret": "v1"}
# The bearer credential of `token`, when --credential-file is not given.
CREDENTIAL_ENV = "TOKEN_BROKER_CREDENTIAL"
EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A flag value is invalid (printed as `error: ...`, exit 2)."""


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
    _add_exec_credential(commands)
    _add_agent(commands)
    _add_policy(commands)
    _add_apikey(commands)
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
    serve.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="admin HTTP listener: /metrics, /healthz, /readyz (127.0.0.1:9090; '' turns it off)",
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
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N processes sharing server.listen (SO_REUSEPORT; a fixed port; no unix socket); "
        "worker i's admin listener on admin.listen's port + i",
    )


def _add_token(commands: Any) -> None:
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
        type=_duration_arg,
        default=Decimal(0),
        help="requested lifetime, a Go duration (10m, 1h, 1h30m); 0 means the server default",
    )
    token.add_argument("--bound-object-kind", default="", help="Node, Pod or Secret")
    token.add_argument("--bound-object-name", default="")
    token.add_argument("--bound-object-uid", default="")


def add_connection_flags(token: argparse.ArgumentParser) -> None:
    """How to reach the broker: --server, TLS/mTLS files, the bearer credential, --timeout."""
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
    if args.admin_listen is not None:
        out["admin"] = {"listen": args.admin_listen or None}
    for key, value in (("server", server), ("kubernetes", kubernetes), ("log", log)):
        if value:
            out[key] = value
    if args.dev:
        out["dev"] = True
    return out


def _serve(args: argparse.Namespace) -> int:
    from broker.config import ConfigError, load_settings
    from broker.logs import setup_logging

    try:
        settings = load_settings(args.config, serve_overrides(args))
    except ConfigError as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log)
    try:
        if args.workers != 1:
            from broker.workers import run_workers

            return asyncio.run(run_workers(settings, args.workers))
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
    from broker.convert import TOKEN_REQUEST_API_VERSION, TOKEN_REQUEST_KIND

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


def call_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer ...` from --credential-file or the environment, if any."""
    raw = _read_file(args.credential_file, "--credential-file")
    credential = raw.decode("utf-8", "replace").strip() if raw is not None else None
    if credential is None:
        credential = os.environ.get(CREDENTIAL_ENV, "").strip() or None
    if credential is None:
        return ()
    if raw is not None and not credential:
        raise UsageError(f"--credential-file: {args.credential_file} is empty")
    return (("authorization", f"Bearer {credential}"),)


async def _create_token(
    args: argparse.Namespace, request: pb.CreateTokenRequest
) -> pb.CreateTokenResponse:
    timeout = float(args.timeout) if args.timeout > 0 else None
    metadata = call_metadata(args)
    async with open_channel(args) as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        response: pb.CreateTokenResponse = await stub.CreateToken(
            request, timeout=timeout, metadata=metadata
        )
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


# --- exec-credential and agent ----------------------------------------------------------------


def _add_exec_credential(commands: Any) -> None:
    plugin = commands.add_parser(
        "exec-credential",
        help="kubectl/client-go credential plugin: print an ExecCredential with a broker token",
        description="A kubectl credential plugin (kubeconfig users[].user.exec): prints a "
        "client.authentication.k8s.io/v1 ExecCredential holding a token from the broker. "
        "Takes the flags of `token-broker token`. Tokens are cached in --cache-dir until 80%% "
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


def _add_agent(commands: Any) -> None:
    agent = commands.add_parser(
        "agent",
        help="sidecar agent: keep service-account token files fresh",
        description="Write tokens from a broker to files (sinks) and refresh them at 80%% of "
        "their lifetime. --once writes every sink once and exits (init containers).",
    )
    agent.add_argument("--config", type=Path, required=True, metavar="FILE", help="agent YAML")
    agent.add_argument(
        "--once", action="store_true", help="write every sink once; exit 0, or 1 with why"
    )
    agent.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    agent.add_argument("--log-format", choices=["json", "text"])


def client_config_from_args(args: argparse.Namespace) -> ClientConfig:
    """The Python client's settings for the connection flags; raises UsageError."""
    from broker.client import ClientConfig

    if (args.cert is None) != (args.key is None):
        raise UsageError("--cert and --key must be given together")
    unix = str(args.server).startswith("unix:")
    if args.plaintext and not unix and (args.cacert or args.cert):
        raise UsageError("--plaintext cannot be combined with --cacert, --cert or --key")
    credential = None
    if args.credential_file is None:
        credential = os.environ.get(CREDENTIAL_ENV, "").strip() or None
    else:
        _read_file(args.credential_file, "--credential-file")  # fail early, as `token` does
    return ClientConfig(
        address=args.server,
        plaintext=bool(args.plaintext),
        # The broker's unix listener is plaintext: TLS files do not apply, as for `token`.
        ca_file=None if unix else args.cacert,
        cert_file=None if unix else args.cert,
        key_file=None if unix else args.key,
        server_name=args.server_name,
        credential=credential,
        credential_file=args.credential_file,
        timeout=float(args.timeout) if args.timeout > 0 else None,
    )


def _exec_credential(args: argparse.Namespace) -> int:
    from broker.client import TokenBrokerError
    from broker.exec_credential import (
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


def _agent(args: argparse.Namespace) -> int:
    from broker.agent import run_agent
    from broker.agent_config import AgentConfigError, load_agent_config
    from broker.config import LogSettings
    from broker.logs import setup_logging

    try:
        config = load_agent_config(args.config)
    except AgentConfigError as exc:
        print(f"token-broker agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(LogSettings(level=args.log_level or "info", format=args.log_format or "json"))
    try:
        return asyncio.run(run_agent(config, once=args.once))
    except KeyboardInterrupt:
        return 130


# --- policy ---------------------------------------------------------------------------------

EXPLAIN_DESCRIPTION = """\
Would this caller get a token? Evaluates the policy as the broker would (like kubectl auth
can-i) and prints the decision, the deciding rule and the reason, the effective audiences and
expiration, and for every rule why it does or does not match. Exit status: 0 allowed,
1 denied, 2 invalid flags or policy.

The caller is --subject (Identity.name: the key's identity for apiKey, the `sub` for jwt,
the socket's identity for unixSocket; for mtls a certificate with just that name, in --field:
uri (default), dns or cn) with --method (default mtls); or --certificate, a client
certificate (PEM) whose names count as the broker reads them. The report then says which
certificate field each matching subject matched. jwt callers also need --issuer, and
--claim KEY=VALUE per claim (repeat a key for a list claim). The request flags are those of
`token-broker token`.
"""


def _add_policy(commands: Any) -> None:
    policy = commands.add_parser(
        "policy",
        help="validate a policy file, or explain its decision for a caller and request",
        description="Check a policy file offline (no broker, no cluster).",
    )
    sub = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    validate = sub.add_parser(
        "validate",
        help="check a policy file (exit 1 with the bad key if invalid)",
        description="Check a policy file: exit 0 with a summary, or 1 naming each bad key. "
        "Warnings (stderr, exit 0) point out rules whose meaning changed, and what to write.",
    )
    validate.add_argument("file", type=Path, metavar="FILE")

    explain = sub.add_parser(
        "explain",
        help="would this caller get this token, and why (like kubectl auth can-i)",
        description=EXPLAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("--policy", type=Path, required=True, metavar="FILE")
    who = explain.add_argument_group("caller")
    who.add_argument("--subject", metavar="NAME", help="the identity's name")
    who.add_argument("--method", choices=AUTH_METHODS, default="mtls", help="(default: mtls)")
    who.add_argument(
        "--field",
        choices=CERTIFICATE_FIELDS,
        help="mtls: the certificate field --subject is (default: uri)",
    )
    who.add_argument(
        "--certificate",
        type=Path,
        metavar="PEM",
        help="mtls: a client certificate (instead of --subject)",
    )
    who.add_argument("--issuer", help="the jwt issuer (iss), exactly")
    who.add_argument(
        "--claim", action="append", default=[], metavar="KEY=VALUE", help="a jwt claim"
    )
    req = explain.add_argument_group("request (as `token-broker token` takes it)")
    req.add_argument("service_account", metavar="SERVICE_ACCOUNT")
    req.add_argument("-n", "--namespace", required=True)
    req.add_argument("--audience", action="append", default=[], help="repeatable")
    req.add_argument(
        "--duration", type=_duration_arg, default=Decimal(0), help="10m, 1h; 0: none requested"
    )
    req.add_argument("--bound-object-kind", default="", help="Node, Pod or Secret")
    req.add_argument("--bound-object-name", default="", help="(the policy ignores it)")
    req.add_argument("--bound-object-uid", default="", help=argparse.SUPPRESS)
    req.add_argument(
        "--dry-run", nargs="?", const="server", default="none", choices=["none", "server"]
    )


def identity_from_args(args: argparse.Namespace) -> Identity:
    """The caller of `policy explain`; raises UsageError."""
    if args.certificate is not None:
        return _certificate_caller(args)
    if args.subject is None:
        raise UsageError("--subject or --certificate is required")
    if args.field is not None and args.method != "mtls":
        raise UsageError("--field is only for --method mtls")
    if args.method == "jwt" and not args.issuer:
        raise UsageError("--issuer is required with --method jwt")
    if args.method != "jwt" and (args.issuer or args.claim):
        raise UsageError("--issuer and --claim are only for --method jwt")
    claims: dict[str, Any] = {}
    for item in args.claim:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--claim {item}: expected KEY=VALUE")
        if key not in claims:
            claims[key] = value
        elif isinstance(claims[key], list):
            claims[key].append(value)
        else:
            claims[key] = [claims[key], value]
    return Identity(
        method=args.method,
        name=args.subject,
        issuer=args.issuer,
        claims=MappingProxyType(claims),
        certificate_field=args.field,
    )


def _certificate_caller(args: argparse.Namespace) -> Identity:
    from cryptography import x509

    from broker.authn import certificate_names

    if args.subject is not None or args.field is not None or args.method != "mtls":
        raise UsageError("--certificate is the whole mtls caller: no --subject, --field, --method")
    try:
        certificate = x509.load_pem_x509_certificates(args.certificate.read_bytes())[0]
    except OSError as exc:
        raise UsageError(f"--certificate {args.certificate}: {exc.strerror}") from None
    except ValueError:
        raise UsageError(f"--certificate {args.certificate}: not a PEM certificate") from None
    identity = Identity.from_certificate(certificate_names(certificate))
    if identity is None:
        raise UsageError(
            f"--certificate {args.certificate}: no URI SAN, DNS SAN or CN (the broker refuses it)"
        )
    return identity


def explain_request_from_args(args: argparse.Namespace) -> pb.CreateTokenRequest:
    """The request of `policy explain`, validated as the broker would; raises UsageError."""
    from broker.validation import create_token_violations

    if args.bound_object_kind and not args.bound_object_name:
        args.bound_object_name = "any"  # the policy looks at the kind only
    request = token_request_from_args(args)
    violations = list(create_token_violations(request))
    if violations:
        texts = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise UsageError(f"the broker would refuse this request before its policy: {texts}")
    return request


def _policy(args: argparse.Namespace) -> int:
    from broker.policy import Policy, PolicyError

    if args.policy_command == "validate":
        try:
            policy = Policy.load(args.file)
        except PolicyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        count = len(policy.rules)
        for warning in policy.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{args.file}: valid, {count} rule{'' if count == 1 else 's'}")
        return 0
    try:
        identity = identity_from_args(args)
        request = explain_request_from_args(args)
        policy = Policy.load(args.policy)
    except (UsageError, PolicyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    explanation = policy.explain(identity, request)
    print(format_explanation(explanation, identity, request), end="")
    return 0 if explanation.decision.allowed else EXIT_ERROR


def describe_request(request: pb.CreateTokenRequest) -> str:
    spec = request.token_request.spec
    parts = [
        f"{request.namespace}/{request.service_account}",
        f"audiences {', '.join(spec.audiences) or '(none)'}",
        f"expiration {spec.expiration_seconds}s"
        if spec.HasField("expiration_seconds")
        else "expiration (none)",
    ]
    if spec.HasField("bound_object_ref"):
        parts.append(f"bound to a {spec.bound_object_ref.kind}")
    if request.dry_run:
        parts.append("dry run")
    return ", ".join(parts)


def format_explanation(
    explanation: Explanation, identity: Identity, request: pb.CreateTokenRequest
) -> str:
    """The report of `policy explain`."""
    d = explanation.decision
    lines = [
        "allowed" if d.allowed else "denied",
        f"reason:     {d.reason}",
        f"rule:       {d.rule or '(none matched)'}",
        f"caller:     {identity}",
    ]
    if identity.certificate is not None:
        lines.append(f"certificate: {identity.certificate.describe()}")
    lines += [
        f"request:    {describe_request(request)}",
    ]
    if d.allowed:
        own = "(none: the API server's own)"
        default = "(none: the API server's default, 3600s)"
        lines.append(f"audiences:  {', '.join(d.audiences) or own}")
        lines.append(
            f"expiration: {default if d.expiration_seconds is None else d.expiration_seconds}"
            + ("" if d.expiration_seconds is None else "s")
        )
        lines += [f"warning:    {w}" for w in d.warnings]
    else:
        lines.append(f"message:    {d.message}")
    lines.append("rules:")
    decided = False
    for rule in explanation.rules:
        if rule.deciding:
            state, decided = "matches, decides", True
        elif rule.matched:
            state = "matches, but an earlier rule decides" if decided else "matches"
        else:
            state = "does not match"
        lines.append(f"  [{rule.index}] {rule.name}: {state}")
        lines += [f"        + {how}" for how in rule.subject_matches]
        lines += [f"        - {why}" for why in rule.mismatches]
    if not explanation.rules:
        lines.append("  (none: the policy denies everything)")
    return "\n".join(lines) + "\n"


# --- apikey -----------------------------------------------------------------------------------


def _add_apikey(commands: Any) -> None:
    apikey = commands.add_parser(
        "apikey",
        help="make API keys and the SHA-256 hashes the broker's configuration holds",
        description="The broker stores only SHA-256 hashes of API keys "
        "(authentication.apiKeys). `generate` prints a new random key and its hash; `hash` "
        "reads a key from stdin and prints its hash.",
    )
    verbs = apikey.add_subparsers(dest="apikey_command", metavar="COMMAND", required=True)
    generate = verbs.add_parser("generate", help="a new random key, and its hash")
    generate.add_argument("--name", default="NAME", help="identity name for the printed entry")
    verbs.add_parser("hash", help="the SHA-256 hash of a key read from stdin")


def _apikey(args: argparse.Namespace) -> int:
    from broker.authn_apikeys import generate_api_key, hash_api_key

    if args.apikey_command == "generate":
        key = generate_api_key()
        print(f"key: {key}")
        print("# the broker's configuration (authentication.apiKeys.keys or its file):")
        print(f"- {{name: {args.name}, sha256: {hash_api_key(key)}}}")
        return 0
    key = sys.stdin.readline().strip()
    if not key:
        print("error: no key on stdin", file=sys.stderr)
        return EXIT_USAGE
    print(hash_api_key(key))
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
    if args.command == "exec-credential":
        return _exec_credential(args)
    if args.command == "agent":
        return _agent(args)
    if args.command == "policy":
        return _policy(args)
    if args.command == "apikey":
        return _apikey(args)
    return _emulator(args.emulator_args)


if __name__ == "__main__":
    raise SystemExit(main())
