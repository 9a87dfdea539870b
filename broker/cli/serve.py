"""`token-broker serve`: settings from --config, TOKEN_BROKER_* and these flags, then the
broker (broker.server), its worker processes (broker.workers) or dev mode (broker.devmode).

Everything heavy (settings, kubernetes, the server, the emulator) is imported when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.cli.flags import EXIT_USAGE

if TYPE_CHECKING:
    from broker.config import Settings


def add_parser(commands: Any) -> None:
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
        help="admin HTTP listener: /metrics, /healthz, /readyz (127.0.0.1:8082; '' turns it off)",
    )
    serve.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        help="the HTTP door: Kubernetes TokenRequest, OAuth token exchange (off; '' turns it off)",
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


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as a nested settings dict (flags not given stay unset)."""
    server: dict[str, Any] = {}
    tls: dict[str, Any] = {}
    kubernetes: dict[str, Any] = {}
    log: dict[str, Any] = {}
    if args.listen is not None:
        server["listen"] = args.listen
    if args.http_listen is not None:
        server["httpListen"] = args.http_listen or None
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


def run(args: argparse.Namespace) -> int:
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
        return asyncio.run(_serve(settings))
    except ConfigError as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


async def _serve(settings: Settings) -> int:
    # Imported here: `token` does not need the server, the emulator or kubernetes.
    if settings.dev:
        from broker.devmode import run_dev

        return await run_dev(settings)
    from broker.server import run_server

    return await run_server(settings)
