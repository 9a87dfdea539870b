"""`token-broker serve --dev`: the broker against an in-process API-server emulator.

INSECURE by design: plaintext gRPC on loopback, a throwaway CA and kubeconfig in a temporary
directory, tokens signed by the emulator's own key (no real cluster accepts them).

Callers still authenticate and the policy still decides, explicitly: a unix socket in the
temporary directory (mode 0600: this user only) gives the identity `dev`, a random API key
written next to it gives the identity `dev` over TCP, and `broker/dev-policy.yaml` (a
permissive policy for the seed's namespaces) is in force unless --config names another.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import yaml

from broker.authn_apikeys import generate_api_key, hash_api_key
from broker.config import Settings
from broker.emulator import Emulator
from broker.policy import DEV_POLICY_FILE
from broker.server import BrokerServer, serve_until_signal, signals_while_starting

DEV_SEED = Path(__file__).parent / "emulator" / "dev-seed.yaml"
BROKER_IDENTITY = "system:serviceaccount:token-broker:token-broker"
# Shown in the banner's example command.
EXAMPLE_NAMESPACE = "demo"
EXAMPLE_SERVICE_ACCOUNT = "build-robot"
# The identity of dev-mode callers (the dev policy's subjects name it).
DEV_IDENTITY = "dev"


def broker_user_token(seed: dict[str, Any]) -> str:
    """The seed's bearer token for the broker's identity (else its first user's)."""
    users = seed.get("users") or []
    for user in users:
        if user.get("name") == BROKER_IDENTITY:
            return str(user["token"])
    if users:
        return str(users[0]["token"])
    raise ValueError("the dev seed defines no user for the broker")


def dev_settings(settings: Settings, workdir: Path, api_key: str) -> Settings:
    """The given settings pointed at the emulator, plaintext allowed (on loopback only), with
    the dev identities and (unless one is configured) the dev policy."""
    data = settings.model_dump()
    server = data["server"]
    server["allow_plaintext"] = True
    if server["unix_socket"] is None:
        server.update(unix_socket=workdir / "broker.sock", unix_socket_mode=0o600)
    authentication = data["authentication"]
    authentication["unix_socket"] = {"identity": DEV_IDENTITY}
    dev_key = {"name": DEV_IDENTITY, "sha256": hash_api_key(api_key)}
    authentication["api_keys"]["keys"] = [*authentication["api_keys"]["keys"], dev_key]
    if data["policy"]["file"] is None:
        data["policy"]["file"] = DEV_POLICY_FILE
    data["kubernetes"].update(mode="kubeconfig", kubeconfig=workdir / "kubeconfig", context=None)
    # model_validate, not Settings(...): the environment was already applied to `settings`.
    return Settings.model_validate(data)


def banner(server: BrokerServer, emulator: Emulator, workdir: Path) -> str:
    token = f"token {EXAMPLE_SERVICE_ACCOUNT} -n {EXAMPLE_NAMESPACE}"
    key_file = workdir / "api-key"
    commands = [f"{token} --server unix:{server.unix_socket}"]
    grpcurl = [f"grpcurl -plaintext -unix {server.unix_socket} list"]
    if server.settings.server.listen:
        plaintext = " --plaintext" if server.settings.server.tls is None else ""
        commands.append(
            f"{token} --server {server.address}{plaintext} --credential-file {key_file}"
        )
        grpcurl.append(f"grpcurl{' -plaintext' if plaintext else ''} {server.address} list")
    admin = server.admin_url
    admin_where = f"{admin} (/metrics, /healthz, /readyz)" if admin else "- (admin.listen unset)"
    admin_lines = [f"  curl {admin}/metrics", f"  curl {admin}/readyz"] if admin is not None else []
    rule = "=" * 78
    return "\n".join(
        [
            rule,
            "  INSECURE DEV MODE: plaintext gRPC, in-process Kubernetes API emulator.",
            "  Tokens come from the emulator, not a real cluster. Never use in production.",
            rule,
            f"broker:     {server.address if server.settings.server.listen else '-'}"
            f" and unix:{server.unix_socket}",
            f"callers:    identity `{DEV_IDENTITY}`: the unix socket, or the API key in {key_file}",
            f"admin:      {admin_where}",
            f"policy:     {server.settings.policy.file}",
            f"emulator:   {emulator.url} (CA {emulator.ca_file})",
            f"kubeconfig: {workdir / 'kubeconfig'}",
            f"seed:       {DEV_SEED}",
            "",
            "Get a token:",
            *(f"  token-broker {c}" for c in commands),
            "From a checkout after `make run` (token-broker not on PATH):",
            *(f"  .venv/bin/token-broker {c}" for c in commands),
            "Health, reflection and metrics:",
            *(f"  {g}" for g in grpcurl),
            *admin_lines,
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
            await asyncio.to_thread(
                emulator.write_kubeconfig,
                workdir / "kubeconfig",
                user_token=broker_user_token(seed),
            )
            api_key = generate_api_key()
            await asyncio.to_thread(_write_private, workdir / "api-key", api_key)
            server = BrokerServer(dev_settings(settings, workdir, api_key))
            with signals_while_starting() as started:
                await server.start()
                stream.write(banner(server, emulator, workdir) + "\n")
                stream.flush()
                await serve_until_signal(server, started)
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


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.write_text(text + "\n", encoding="utf-8")
