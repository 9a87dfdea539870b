"""`token-broker serve --dev`: emulator + broker in one process, as a user runs it."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

import pytest
from test_cli import REPO, Process, claims, cli_env, run_cli

from broker.config import load_settings
from broker.devmode import DEV_SEED, broker_user_token, dev_settings


def test_broker_user_token_prefers_the_broker_identity() -> None:
    seed = {
        "users": [
            {"token": "admin", "name": "kubernetes-admin"},
            {"token": "mine", "name": "system:serviceaccount:token-broker:token-broker"},
        ]
    }
    assert broker_user_token(seed) == "mine"
    assert broker_user_token({"users": [{"token": "first", "name": "x"}]}) == "first"
    with pytest.raises(ValueError, match="no user"):
        broker_user_token({})


def test_dev_settings_point_at_the_emulator_and_keep_the_rest(tmp_path: Path) -> None:
    base = load_settings(
        None,
        {
            "dev": True,
            "server": {"listen": "127.0.0.1:6000", "shutdownGraceSeconds": 2},
            "kubernetes": {"mode": "inCluster", "context": "prod"},
        },
    )
    settings = dev_settings(base, tmp_path / "kubeconfig")
    assert settings.server.allow_plaintext is True
    assert settings.server.listen == "127.0.0.1:6000"
    assert settings.server.shutdown_grace_seconds == 2
    assert settings.kubernetes.mode == "kubeconfig"
    assert settings.kubernetes.kubeconfig == tmp_path / "kubeconfig"
    assert settings.kubernetes.context is None


def test_the_dev_seed_ships_with_the_package() -> None:
    assert DEV_SEED.is_file()


async def test_serve_dev_prints_a_working_command_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", "--dev", "--listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env(), cwd=REPO,
    )  # fmt: skip
    process = Process(proc)
    try:
        banner_at = await process.wait_for("INSECURE DEV MODE")
        index = await process.wait_for("Get a token:")
        command = shlex.split(process.stdout[index + 1])
        assert command[:2] == ["token-broker", "token"]
        assert "--plaintext" in command
        kubeconfig_line = next(s for s in process.stdout[banner_at:] if "kubeconfig:" in s)
        kubeconfig = Path(kubeconfig_line.split("kubeconfig:", 1)[1].strip())
        assert kubeconfig.exists()

        # The printed command, as a user would paste it (token-broker = python -m broker).
        rc, out, err = await run_cli(*command[1:])
        assert rc == 0, err
        assert claims(out)["sub"] == "system:serviceaccount:demo:build-robot"

        assert await process.terminate() == 0
        assert not kubeconfig.exists()  # the temporary directory is removed
        assert "eyJ" not in "".join(process.stderr)  # no token in the logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
