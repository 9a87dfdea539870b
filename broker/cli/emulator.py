"""`token-broker emulator ...`: the API-server emulator alone (`python -m broker.emulator`).
Everything after `emulator` is the emulator's own (including --help)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    emulator = commands.add_parser(
        "emulator",
        help="run the Kubernetes API-server emulator alone (python -m broker.emulator)",
        add_help=False,
    )
    emulator.add_argument("emulator_args", nargs=argparse.REMAINDER)


def run(argv: list[str]) -> int:
    from broker.emulator.__main__ import main as emulator_main

    return emulator_main(argv)
