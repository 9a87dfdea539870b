"""A new user following the README in dev mode (`make run` = `token-broker serve --dev`): the
commands the banner prints work as pasted — by their full path, the kubectl credential plugin
against the emulator, grpcurl with `$API_KEY` —, the audit lines stay off the terminal, busy
default ports move, `serve` stays strict, and `token` without `--plaintext` says what to do.

Every command is run as printed (the venv's own `token-broker`, `kubectl`, `grpcurl`, through
bash where the line is shell), against a real dev-mode broker and its emulator.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from broker.emulator.config import DEFAULT_ISSUER
from tests.support.cli import REPO, Process, Spawn, cli_env, serve_config
from tests.support.client import Completed, run_command
from tests.support.suite_secrets import SUITE

BIN = Path(sys.executable).absolute().parent
# A line of gRPC's C core (absl format): `I1204 16:17:07.384066   29539 file.cc:1] ...`.
GRPC_CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.MULTILINE)


@dataclass
class Banner:
    """The dev-mode banner, as printed."""

    lines: list[str]

    def after(self, heading: str, count: int = 1) -> list[str]:
        """The `count` lines after the first line starting with `heading`, unindented."""
        index = next(i for i, line in enumerate(self.lines) if line.startswith(heading))
        return [line.strip() for line in self.lines[index + 1 : index + 1 + count]]

    def value(self, label: str) -> str:
        """The value of a `label:   value (...)` line."""
        line = next(line for line in self.lines if line.startswith(f"{label}:"))
        return line.split(":", 1)[1].split()[0]

    def line_with(self, text: str) -> str:
        return next(line.strip() for line in self.lines if text in line)


async def read_banner(process: Process) -> Banner:
    start = await process.wait_for("INSECURE DEV MODE")
    end = await process.wait_for("stops the broker and the emulator")
    return Banner([line.rstrip("\n") for line in process.stdout[start - 1 : end + 2]])


async def start_dev(spawn: Spawn, *args: str) -> tuple[Process, Banner]:
    process = await spawn("serve", "--dev", "--listen", "127.0.0.1:0", *args)
    return process, await read_banner(process)


async def paste(command: str, home: Path) -> Completed:
    """A banner line (or lines) as a user pastes them into bash, in a fresh HOME."""
    completed = await run_command(["bash", "-c", command], env={"HOME": str(home)}, credential=None)
    SUITE.add("cli stderr", completed.stderr)
    return completed


def audiences_of(token: str) -> list[str]:
    return list(jwt.decode(token, options={"verify_signature": False})["aud"])


# --- the banner's commands, as pasted ----------------------------------------------------------


async def test_the_banner_names_the_tools_by_their_full_path(spawn: Spawn, tmp_path: Path) -> None:
    _, banner = await start_dev(spawn)
    assert banner.value("tools") == str(BIN)
    over_unix, over_tcp = banner.after("Get a token", 2)
    for command in (over_unix, over_tcp):
        argv = shlex.split(command)
        assert argv[0] == str(BIN / "token-broker")  # not on PATH after `make run`
        run = await paste(command, tmp_path)
        assert run.returncode == 0, run.stderr
    # Without --audience: the API server's own audiences, as the README promises.
    assert audiences_of(run.stdout) == ["vault"]
    run = await paste(over_unix, tmp_path)
    assert audiences_of(run.stdout) == [DEFAULT_ISSUER]
    assert banner.line_with("grpcurl -plaintext -unix").startswith(str(BIN / "grpcurl"))


async def test_kubectl_with_the_credential_plugin_in_dev_mode(spawn: Spawn, tmp_path: Path) -> None:
    # The README's kubectl credential plugin, in dev mode: kubectl gets a token from the broker
    # through `exec-credential` (no --audience: the API server's audiences) and the emulator,
    # acting as the API server, accepts it (was 401: the dev policy's defaultAudiences won).
    _, banner = await start_dev(spawn)
    [command] = banner.after("kubectl as demo/build-robot")
    assert command.startswith("KUBECONFIG=") and f"{BIN / 'kubectl'} get serviceaccounts" in command
    run = await paste(command, tmp_path)
    assert run.returncode == 0, run.stderr
    names = [line.split()[0] for line in run.stdout.splitlines()[1:]]
    assert names == ["build-robot", "deployer"]
    # The API server saw the service account: its RBAC decides (get/list in demo only).
    run = await paste(command.replace("get serviceaccounts", "get serviceaccounts -n ci"), tmp_path)
    assert run.returncode == 1
    assert 'User "system:serviceaccount:demo:build-robot" cannot list' in run.stderr


async def test_grpcurl_with_the_exported_api_key(spawn: Spawn, tmp_path: Path) -> None:
    # The README's grpcurl example used $API_KEY, which nothing defined: the banner exports it
    # from the key's file (the key itself is never printed).
    process, banner = await start_dev(spawn)
    export, call = banner.after("gRPC with grpcurl", 3)[1:]
    assert export.startswith('export API_KEY="$(cat ') and "tbk_" not in "".join(process.stdout)
    assert '-H "authorization: Bearer $API_KEY"' in call
    run = await paste(f"{export}\n{call}", tmp_path)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)["token_request"]
    assert answer["spec"]["audiences"] == [DEFAULT_ISSUER]
    assert answer["metadata"]["name"] == "build-robot"


async def test_token_dash_o_json_prints_a_null_bound_object_ref(
    spawn: Spawn, tmp_path: Path
) -> None:
    # kubectl create token -o json prints "boundObjectRef": null (no omitempty on the spec).
    _, banner = await start_dev(spawn)
    over_unix = banner.after("Get a token")[0]
    run = await paste(f"{over_unix} -o json", tmp_path)
    assert run.returncode == 0, run.stderr
    spec = json.loads(run.stdout)["spec"]
    assert list(spec) == ["audiences", "expirationSeconds", "boundObjectRef"]
    assert spec["boundObjectRef"] is None and spec["expirationSeconds"] == 3600
    assert '"boundObjectRef": null' in run.stdout
    run = await paste(f"{over_unix} -o yaml", tmp_path)
    assert "  boundObjectRef: null\n" in run.stdout
    bound = f"{over_unix} -o json --bound-object-kind Pod --bound-object-name web-0"
    run = await paste(bound, tmp_path)
    assert json.loads(run.stdout)["spec"]["boundObjectRef"]["name"] == "web-0"


async def test_audit_lines_are_not_interleaved_with_the_logs(spawn: Spawn, tmp_path: Path) -> None:
    process, banner = await start_dev(spawn)
    audit = Path(banner.value("audit"))
    assert audit.parent == Path(banner.value("kubeconfig")).parent  # the dev directory
    run = await paste(banner.after("Get a token")[0], tmp_path)
    assert run.returncode == 0, run.stderr

    async def written() -> list[dict[str, object]]:
        while not audit.exists() or not audit.read_text():
            await asyncio.sleep(0.05)
        return [json.loads(line) for line in audit.read_text().splitlines()]

    [line] = await asyncio.wait_for(written(), 30)
    assert line["decision"] == "allowed" and line["user"] == "dev"
    await process.wait_for("CreateToken OK", stream="stderr")  # the text log line
    assert not [line for line in process.stdout if line.lstrip().startswith("{")]
    assert await process.terminate() == 0


# --- ports -------------------------------------------------------------------------------------


def hold(listen: str) -> socket.socket | None:
    """Listen on host:port, as another program would; None when something already does."""
    host, port = listen.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
        sock.listen()
    except OSError:
        sock.close()
        return None
    return sock


@pytest.fixture
def default_ports_busy() -> Iterator[None]:
    """127.0.0.1:50051 and 127.0.0.1:8082 (the defaults) busy for the test: held here, unless
    something else (another `make run`) holds them already."""
    held = [hold("127.0.0.1:50051"), hold("127.0.0.1:8082")]
    try:
        yield
    finally:
        for sock in held:
            if sock is not None:
                sock.close()


@pytest.fixture
async def dev_on_default_ports() -> AsyncIterator[Process]:
    """`serve --dev` as `make run` starts it: no --listen, no admin address in the
    environment (the tests' cli_env() puts the admin listener on port 0)."""
    env = cli_env(None)
    env.pop("TOKEN_BROKER_ADMIN__LISTEN")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", "--dev",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO,
    )  # fmt: skip
    process = Process(proc)
    try:
        yield process
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_dev_mode_moves_busy_default_ports(
    default_ports_busy: None, dev_on_default_ports: Process, tmp_path: Path
) -> None:
    # A second `make run` while one runs: free ports instead of 50051 and 8082, said so.
    banner = await read_banner(dev_on_default_ports)
    address = banner.value("broker")
    assert address.startswith("127.0.0.1:") and address != "127.0.0.1:50051"
    assert banner.line_with("127.0.0.1:50051 was in use").endswith("--listen HOST:PORT chooses)")
    admin = banner.value("admin")
    assert admin.startswith("http://127.0.0.1:") and not admin.endswith(":8082")
    assert "--admin-listen HOST:PORT chooses" in banner.line_with("127.0.0.1:8082 was in use")
    run = await paste(banner.after("Get a token", 2)[1], tmp_path)
    assert run.returncode == 0, run.stderr
    run = await paste(banner.line_with(f"curl {admin}/readyz"), tmp_path)
    assert run.stdout == "ok\n"


@pytest.mark.usefixtures("default_ports_busy")
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--listen", "127.0.0.1:50051"), "--listen or TOKEN_BROKER_SERVER__LISTEN"),
        (
            ("--dev", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:8082"),
            "--admin-listen or TOKEN_BROKER_ADMIN__LISTEN",
        ),
    ],
    ids=["serve", "dev"],
)
async def test_a_chosen_busy_port_is_an_error_naming_its_flag(
    args: tuple[str, ...], named: str, kubeconfig: Path, tmp_path: Path
) -> None:
    # `serve` (and dev mode, for an address the user chose) stays strict: exit 2, the reason,
    # and how to choose another address.
    config = serve_config(tmp_path / "config.yaml", kubeconfig)
    run = await run_command(
        [sys.executable, "-m", "broker", "serve", "--config", str(config), *args]
    )
    assert run.returncode == 2, run.stderr
    assert "(Address already in use); choose another address with " + named in run.stderr
    assert "Traceback" not in run.stderr


# --- `token` without --plaintext ---------------------------------------------------------------


async def test_token_over_tls_to_the_plaintext_broker_hints_plaintext(
    spawn: Spawn, tmp_path: Path
) -> None:
    _, banner = await start_dev(spawn)
    over_tcp = banner.after("Get a token", 2)[1]
    forgot = over_tcp.replace(" --plaintext", "") + " --max-attempts 1"
    run = await paste(f"unset GRPC_VERBOSITY; {forgot}", tmp_path)  # gRPC's default
    assert run.returncode == 1
    assert "Tls handshake failed" in run.stderr
    assert "hint: the server does not speak TLS" in run.stderr and "--plaintext" in run.stderr
    assert not GRPC_CORE_LINE.search(run.stderr), run.stderr
    assert run.stderr.startswith("error: failed to create token: UNAVAILABLE")
