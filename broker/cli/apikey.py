"""`token-broker apikey`: new API keys, and the SHA-256 hashes the broker's configuration holds."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from broker.cli.flags import EXIT_USAGE


def add_parser(commands: Any) -> None:
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


def run(args: argparse.Namespace) -> int:
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
