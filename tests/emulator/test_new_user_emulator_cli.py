"""`token-broker emulator` alone, as a new user runs it: once it serves it prints its URL (the
first line, for scripts), its CA certificate, a kubeconfig and where that kubeconfig's user may
create tokens, and an admin kubeconfig — never a bearer token — and kubectl works with both
(it printed only the URL; the admin token was only findable in the seed file)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import yaml

from broker.devmode import DEV_SEED
from tests.support.cli import REPO, Process, cli_env
from tests.support.client import Completed, run_command


def kubectl() -> str:
    return str(Path(sys.executable).parent / "kubectl")


async def kubectl_run(kubeconfig: Path, *args: str, home: Path) -> Completed:
    return await run_command(
        [kubectl(), "--kubeconfig", str(kubeconfig), *args], env={"HOME": str(home)}
    )


def value(lines: list[str], label: str) -> Path:
    line = next(line for line in lines if line.startswith(f"{label}:"))
    return Path(line.split(":", 1)[1].split()[0])


async def test_the_emulator_command_says_how_to_use_it(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "emulator",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env(None), cwd=REPO,
    )  # fmt: skip
    process = Process(proc)
    try:
        end = await process.wait_for("stops the emulator")
        lines = [line.rstrip("\n") for line in process.stdout[: end + 1]]
        url = lines[0]
        assert url.startswith("https://127.0.0.1:")
        ca, kubeconfig = value(lines, "CA certificate"), value(lines, "kubeconfig")
        admin_kubeconfig = value(lines, "admin kubeconfig")
        assert ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        assert kubeconfig.parent == admin_kubeconfig.parent == ca.parent  # its own directory
        for config in (kubeconfig, admin_kubeconfig):
            cluster = yaml.safe_load(config.read_text())["clusters"][0]["cluster"]
            assert cluster["server"] == url
        # Who the kubeconfig's user is, and where it may create tokens: every namespace of the
        # dev seed with service accounts.
        assert (
            "  user system:serviceaccount:token-broker:token-broker: may create tokens in ci, demo"
            in lines
        )
        assert any("user kubernetes-admin (an administrator)" in line for line in lines)
        assert f"seed:             {DEV_SEED} (objects, users and their bearer tokens, grants)" in (
            lines
        )
        # Never a bearer token: they are in the seed file.
        seed = yaml.safe_load(DEV_SEED.read_text())
        for user in seed["users"]:
            assert user["token"] not in "".join(process.stdout)

        for namespace, account in (("demo", "build-robot"), ("ci", "runner")):
            run = await kubectl_run(
                kubeconfig, "create", "token", account, "-n", namespace, home=tmp_path
            )
            assert run.returncode == 0, run.stderr
            assert run.stdout.startswith("eyJ")
        run = await kubectl_run(kubeconfig, "get", "namespaces", home=tmp_path)
        assert run.returncode == 1 and "cannot list resource" in run.stderr
        run = await kubectl_run(admin_kubeconfig, "get", "namespaces", "-o", "name", home=tmp_path)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["namespace/demo", "namespace/ci"]

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not ca.parent.exists()  # its temporary files go with it
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
