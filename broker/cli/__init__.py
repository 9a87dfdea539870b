"""The `token-broker` command: `serve` the broker, get a `token` from one, check a `policy`.

One module per subcommand, each with `add_parser(commands)` and `run(args)`: serve, token,
exec_credential (the kubectl plugin), agent, policy (validate, explain), apikey, emulator;
flags.py holds what they share (exit codes, the request and connection flags).

`token` takes the flags of `kubectl create token` (--audience, --duration, --bound-object-*,
-o) plus the connection flags of the Python client (--server, --plaintext, --cacert, ...).
`policy validate FILE` checks a policy file; `policy explain` answers, like
`kubectl auth can-i`, whether a caller would get a token, and why, with the same request flags.

Imports are lazy: `import broker.cli` loads neither the server, kubernetes nor
pydantic-settings (a test checks it), since `exec-credential` runs on every kubectl command
and must start fast; each subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from broker import __version__
from broker.cli import agent, apikey, emulator, exec_credential, policy, serve, token

# In the order `--help` lists them.
_SUBCOMMANDS = (serve, token, exec_credential, agent, policy, apikey, emulator)
_RUN: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": serve.run,
    "token": token.run,
    "exec-credential": exec_credential.run,
    "agent": agent.run,
    "policy": policy.run,
    "apikey": apikey.run,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description="Short-lived Kubernetes service-account tokens over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"token-broker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subcommand in _SUBCOMMANDS:
        subcommand.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulator"]:
        # Everything after `emulator` is the emulator's own (including --help).
        return emulator.run(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "emulator":
        return emulator.run(args.emulator_args)
    return _RUN[args.command](args)
