"""`token-broker serve --dev`: emulator + broker in one process, as a user runs it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from broker.authn import hash_api_key
from broker.config import load_settings
from broker.devmode import DEV_SEED, broker_user_token, dev_settings
from broker.policy import DEV_POLICY_FILE
from tests.support.cli import claims, run_cli, start_broker


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
    settings = dev_settings(base, tmp_path, "the-dev-key")
    assert settings.server.allow_plaintext is True
    assert settings.server.listen == "127.0.0.1:6000"
    assert settings.server.shutdown_grace_seconds == 2
    assert settings.kubernetes.mode == "kubeconfig"
    assert settings.kubernetes.kubeconfig == tmp_path / "kubeconfig"
    assert settings.kubernetes.context is None
    # Callers still authenticate, and the explicit dev policy decides.
    assert settings.server.unix_socket == tmp_path / "broker.sock"
    assert settings.server.unix_socket_mode == 0o600
    assert settings.authentication.unix_socket.identity == "dev"
    [entry] = settings.authentication.api_keys.keys
    assert (entry.name, entry.sha256) == ("dev", hash_api_key("the-dev-key"))
    assert settings.policy.file == DEV_POLICY_FILE


def test_dev_settings_keep_a_configured_policy(tmp_path: Path) -> None:
    base = load_settings(None, {"dev": True, "policy": {"file": str(tmp_path / "mine.yaml")}})
    assert dev_settings(base, tmp_path, "k").policy.file == tmp_path / "mine.yaml"


def test_the_dev_seed_ships_with_the_package() -> None:
    assert DEV_SEED.is_file()


async def test_serve_dev_prints_a_working_command_and_stops_on_sigterm() -> None:
    process = await start_broker("serve", "--dev", "--listen", "127.0.0.1:0")
    proc = process.proc
    try:
        banner_at = await process.wait_for("INSECURE DEV MODE")
        index = await process.wait_for("Get a token")
        over_unix = shlex.split(process.stdout[index + 1])
        over_tcp = shlex.split(process.stdout[index + 2])
        # The venv's token-broker by its full path (not on PATH after `make run`).
        assert over_unix[0] == over_tcp[0] == str(Path(sys.executable).parent / "token-broker")
        assert over_unix[1] == over_tcp[1] == "token"
        assert over_unix[over_unix.index("--server") + 1].startswith("unix:")
        assert "--plaintext" in over_tcp and "--credential-file" in over_tcp
        kubeconfig_line = next(s for s in process.stdout[banner_at:] if "kubeconfig:" in s)
        kubeconfig = Path(kubeconfig_line.split("kubeconfig:", 1)[1].split()[0])
        assert kubeconfig.exists()

        # The printed commands, as a user would paste them (token-broker = python -m broker).
        audiences = []
        for command in (over_unix, over_tcp):
            rc, out, err = await run_cli(*command[1:], credential=None)
            assert rc == 0, err
            assert claims(out)["sub"] == "system:serviceaccount:demo:build-robot"
            audiences.append(claims(out)["aud"])
        # Without --audience: the API server's own (the emulator's issuer), as `token` promises;
        # the TCP example asks for one.
        assert audiences == [["https://kubernetes.default.svc.cluster.local"], ["vault"]]
        # Over TCP without the key: refused.
        tcp_without_key = over_tcp[1 : over_tcp.index("--credential-file")]
        rc, _, err = await run_cli(*tcp_without_key, credential=None)
        assert rc == 1 and "UNAUTHENTICATED" in err

        assert await process.terminate() == 0
        assert not kubeconfig.exists()  # the temporary directory is removed
        assert "eyJ" not in "".join(process.stderr)  # no token in the logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
