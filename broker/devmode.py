"""`token-broker serve --dev`: the broker against an in-process API-server emulator.

INSECURE by design: plaintext gRPC on loopback, a throwaway CA and kubeconfig in a temporary
directory, tokens signed by the emulator's own key (no real cluster accepts them).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import yaml

from broker.config import Settings
from broker.emulator import Emulator
from broker.server import BrokerServer, serve_until_signal

DEV_SEED = Path(__file__).parent / "emulator" / "dev-seed.yaml"
BROKER_IDENTITY = "system:serviceaccount:token-broker:token-broker"
# Shown in the banner's example command.
EXAMPLE_NAMESPACE = "demo"
EXAMPLE_SERVICE_ACCOUNT = "build-robot"


def broker_user_token(seed: dict[str, Any]) -> str:
    """The seed's bearer token for the broker's identity (else its first user's)."""
    users = seed.get("users") or []
    for user in users:
        if user.get("name") == BROKER_IDENTITY:
            return str(user["token"])
    if users:
        return str(users[0]["token"])
    raise ValueError("the dev seed defines no user for the broker")


def dev_settings(settings: Settings, kubeconfig: Path) -> Settings:
    """The given settings pointed at the emulator, plaintext allowed (on loopback only)."""
    return settings.model_copy(
        update={
            "server": settings.server.model_copy(update={"allow_plaintext": True}),
            "kubernetes": settings.kubernetes.model_copy(
                update={"mode": "kubeconfig", "kubeconfig": kubeconfig, "context": None}
            ),
        }
    )


def banner(server: BrokerServer, emulator: Emulator, kubeconfig: Path) -> str:
    target = server.address if server.settings.server.listen else f"unix:{server.unix_socket}"
    plaintext = " --plaintext" if server.settings.server.tls is None else ""
    args = f"token {EXAMPLE_SERVICE_ACCOUNT} -n {EXAMPLE_NAMESPACE} --server {target}{plaintext}"
    rule = "=" * 78
    return "\n".join(
        [
            rule,
            "  INSECURE DEV MODE: plaintext gRPC, in-process Kubernetes API emulator.",
            "  Tokens come from the emulator, not a real cluster. Never use in production.",
            rule,
            f"broker:     {target}",
            f"emulator:   {emulator.url} (CA {emulator.ca_file})",
            f"kubeconfig: {kubeconfig}",
            f"seed:       {DEV_SEED}",
            "",
            "Get a token:",
            f"  token-broker {args}",
            "From a checkout after `make run` (token-broker not on PATH):",
            f"  .venv/bin/token-broker {args}",
            "Health and reflection:",
            f"  grpcurl{' -plaintext' if plaintext else ''} {target} list",
            "",
            "Ctrl-C (SIGINT) or SIGTERM stops the broker and the emulator.",
            rule,
        ]
    )


async def run_dev(settings: Settings, out: TextIO | None = None) -> int:
    """Emulator + broker until SIGTERM/SIGINT; the exit status."""
    stream = out if out is not None else sys.stdout
    seed = await asyncio.to_thread(_read_seed)
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="token-broker-dev-"))
    try:
        emulator = Emulator(seed=seed, host="127.0.0.1", port=0)
        await emulator.start()
        try:
            kubeconfig = workdir / "kubeconfig"
            await asyncio.to_thread(
                emulator.write_kubeconfig, kubeconfig, user_token=broker_user_token(seed)
            )
            server = BrokerServer(dev_settings(settings, kubeconfig))
            await server.start()
            stream.write(banner(server, emulator, kubeconfig) + "\n")
            stream.flush()
            await serve_until_signal(server)
        finally:
            await emulator.stop()
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
    return 0


def _read_seed() -> dict[str, Any]:
    data = yaml.safe_load(DEV_SEED.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{DEV_SEED}: top level must be a mapping")
    return data
