"""`token-broker emulator` (also `python -m broker.emulator`): serve the API-server emulator
until SIGTERM/SIGINT.

Once it serves, the first line on stdout is its URL (scripts read that line); then, for people,
its CA certificate, a kubeconfig (--kubeconfig-out, else one in its temporary directory), one
for the seed's administrator, and where the kubeconfig's user may create tokens. Without
--seed the bundled dev seed is used.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from broker.emulator.config import DEFAULT_ISSUER, SIGNING_ALGORITHMS, EmulatorConfig
from broker.emulator.emulator import Emulator
from broker.emulator.runner import run_emulator_forever
from broker.emulator.seed import SeedError

DEV_SEED = Path(__file__).with_name("dev-seed.yaml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="token-broker emulator",
        description="An HTTPS emulator of the Kubernetes API server's TokenRequest API, for dev "
        "mode and tests (also: python -m broker.emulator). Prints its URL, CA certificate and "
        "kubeconfigs once it serves.",
    )
    p.add_argument(
        "--seed",
        type=Path,
        default=DEV_SEED,
        help="seed file (YAML or JSON): objects, users and their bearer tokens, grants "
        "(default: the dev seed)",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    p.add_argument("--port", type=int, default=0, help="port (0: a free one)")
    p.add_argument(
        "--kubeconfig-out",
        type=Path,
        metavar="PATH",
        help="write the kubeconfig here (default: in the emulator's temporary directory)",
    )
    p.add_argument(
        "--user-token", help="bearer token of the kubeconfig's user (default: the seed's first)"
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="write JSON {url, caFile, kubeconfig, pid} once serving",
    )
    p.add_argument(
        "--max-expiration",
        type=int,
        metavar="SECONDS",
        help="the server's maximum token expiration (kube-apiserver "
        "--service-account-max-token-expiration): longer requests are shortened to it, with "
        "a warning (default: none)",
    )
    p.add_argument(
        "--node-binding",
        action="store_true",
        help="allow Node-bound tokens (feature gate ServiceAccountTokenNodeBinding)",
    )
    p.add_argument(
        "--extend-expiration",
        action="store_true",
        help="kube-apiserver --service-account-extend-token-expiration: a Pod-bound token of "
        "exactly 3607 s (the kubelet's) for the server's own audiences is valid for a year",
    )
    p.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="added latency for every token request",
    )
    p.add_argument("--issuer", default=DEFAULT_ISSUER)
    p.add_argument(
        "--api-audience",
        action="append",
        dest="api_audiences",
        metavar="AUDIENCE",
        help="API server audience (repeatable; default: the issuer)",
    )
    p.add_argument("--signing-algorithm", choices=SIGNING_ALGORITHMS, default="RS256")
    p.add_argument("--fault-seed", type=int, help="seed for random fault draws")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    try:
        config = EmulatorConfig(
            host=args.host,
            port=args.port,
            issuer=args.issuer,
            api_audiences=args.api_audiences or [args.issuer],
            max_expiration_seconds=args.max_expiration,
            node_binding=args.node_binding,
            extend_expiration=args.extend_expiration,
            signing_algorithm=args.signing_algorithm,
            seed=args.seed,
        )
        asyncio.run(_run(config, args))
    except (SeedError, ValueError, OSError) as err:
        print(f"emulator: {err}", file=sys.stderr)
        return 2
    return 0


async def _run(config: EmulatorConfig, args: argparse.Namespace) -> None:
    def setup(emulator: Emulator) -> None:
        emulator.faults.latency = args.latency
        if args.fault_seed is not None:
            emulator.faults.seed(args.fault_seed)

    await run_emulator_forever(
        config,
        args.kubeconfig_out,
        args.ready_file,
        user_token=args.user_token,
        setup=setup,
        summary=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
