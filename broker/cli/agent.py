"""`token-broker agent`: the sidecar agent (broker.client.agent) with its YAML configuration."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from broker.cli.flags import EXIT_USAGE, quiet_grpc_core


def add_parser(commands: Any) -> None:
    agent = commands.add_parser(
        "agent",
        help="sidecar agent: keep service-account token files fresh",
        description="Write tokens from a broker to files (sinks) and refresh them at 80% of "
        "their lifetime. --once writes every sink once and exits (init containers).",
    )
    agent.add_argument("--config", type=Path, required=True, metavar="FILE", help="agent YAML")
    agent.add_argument(
        "--once", action="store_true", help="write every sink once; exit 0, or 1 with why"
    )
    agent.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    agent.add_argument("--log-format", choices=["json", "text"])


def run(args: argparse.Namespace) -> int:
    quiet_grpc_core()  # before grpc is imported
    from broker.client.agent import run_agent
    from broker.client.agent_config import AgentConfigError, load_agent_config
    from broker.config import LogSettings
    from broker.logs import setup_logging

    try:
        config = load_agent_config(args.config)
        config.check_files(str(args.config))
    except AgentConfigError as exc:
        print(f"token-broker agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(LogSettings(level=args.log_level or "info", format=args.log_format or "json"))
    try:
        return asyncio.run(run_agent(config, once=args.once))
    except KeyboardInterrupt:
        return 130
