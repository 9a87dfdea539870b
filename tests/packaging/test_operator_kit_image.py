"""The image, without a container engine: what the Dockerfile does, done on this machine.

The build context is what `.dockerignore` lets through; the builder stage's instructions are
carried out as written (ENV, WORKDIR, COPY from the context, RUN with `sh -c`) under a
scratch root directory that stands in for the image's `/` (absolute paths under `/opt` and
`/src` are put there); the source tree is then dropped, as the final stage copies only the
venv. The final stage's user (65532:65532; the tests run as root on CI, so the child
process is started with that uid and gid), environment and ENTRYPOINT + CMD start
`token-broker serve` from a directory that user cannot write, against the emulator: a gRPC
health check and a CreateToken must succeed, and /metrics answers.

What this does not check: the `python:3.11-slim` base (this machine's Python 3.11 stands in
for it) and the layering itself. Slow-ish (a fresh venv with every runtime wheel, byte
compiled: about 35-45 s here).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.cli import Process
from tests.support.stack import (
    CALLER_KEY,
    CORE_POLICY,
    BearerCredential,
    access_config,
    create_request,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
# Absolute paths of the image that the Dockerfile writes to: put under the scratch root.
IMAGE_PATHS = re.compile(r"(?<![\w./-])/(?=(?:opt|src|etc/token-broker)(?:/|\b))")

pytestmark = pytest.mark.timeout(600)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(text: str) -> list[Stage]:
    """The Dockerfile's stages and their instructions (continuation lines joined)."""
    lines: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        op, _, rest = line.strip().partition(" ")
        if op.upper() == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert match is not None, line
            stages.append(Stage(match.group(1), match.group(2)))
        elif stages:
            stages[-1].instructions.append((op.upper(), rest.strip()))
    return stages


def env_pairs(argument: str) -> dict[str, str]:
    pairs = {}
    for word in shlex.split(argument):
        key, sep, value = word.partition("=")
        assert sep, f"ENV {argument}: only the key=value form is simulated"
        pairs[key] = value
    return pairs


def in_root(root: Path, text: str) -> str:
    """`text` with the image's absolute paths moved under `root`."""
    return IMAGE_PATHS.sub(str(root) + "/", text)


def build_context(destination: Path) -> Path:
    """The files `.dockerignore` lets through: it ignores everything (`*`) but `!` entries."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the test expects an allow-list .dockerignore"
    destination.mkdir()
    for rule in rules[1:]:
        if not rule.startswith("!"):
            continue
        source = ROOT / rule[1:].rstrip("/")
        if source.is_dir():
            shutil.copytree(source, destination / source.name)
        else:
            shutil.copy2(source, destination / source.name)
    ignored = [rule for rule in rules[1:] if not rule.startswith("!")]
    # Beyond the allow-list: caches (removed below) and the venv (outside it anyway).
    assert set(ignored) <= {"**/__pycache__", "**/*.pyc", ".venv"}, ignored
    for cache in list(destination.rglob("__pycache__")):
        shutil.rmtree(cache)
    for compiled in destination.rglob("*.pyc"):
        compiled.unlink()
    return destination


def world_executable(path: Path) -> bool:
    """Can any user run `path` (every directory on the way searchable by others)?"""
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def python_on_path(directory: Path) -> Path:
    """`directory` (the image's /usr/local/bin, where the base image has it) with `python`:
    a Python 3.11 of this machine that the image's user can run (the venv's interpreter
    links to it; the one running the tests may live under root's home)."""
    candidates = [Path(getattr(sys, "_base_executable", "") or sys.executable)]
    candidates += [Path(p) for p in ("/usr/local/bin/python3.11", "/usr/bin/python3.11")]
    usable = [p for p in candidates if p.is_file() and world_executable(p)]
    assert usable, f"no Python 3.11 that any user may run among {candidates}"
    directory.mkdir(parents=True)
    (directory / "python").symlink_to(usable[0])
    return directory


def run_builder(stage: Stage, root: Path, context: Path, path: str) -> None:
    env = {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8"}
    # How this machine reaches the package index (pip's own settings), nothing else.
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    workdir = root
    for op, argument in stage.instructions:
        if op == "ENV":
            env.update(env_pairs(argument))
        elif op == "WORKDIR":
            workdir = Path(in_root(root, argument))
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "COPY":
            *sources, target = shlex.split(argument)
            assert not any(s.startswith("--") for s in sources), argument
            absolute = target.startswith("/")
            destination = Path(in_root(root, target)) if absolute else workdir / target
            for source in sources:
                if (context / source).is_dir():
                    shutil.copytree(context / source, destination, dirs_exist_ok=True)
                else:
                    destination.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(context / source, destination / source)
        elif op == "RUN":
            result = subprocess.run(
                ["sh", "-c", in_root(root, argument)],
                cwd=workdir, env=env, capture_output=True, text=True, timeout=540,
            )  # fmt: skip
            assert result.returncode == 0, f"RUN {argument}\n{result.stdout}\n{result.stderr}"
        else:
            pytest.fail(f"builder stage: {op} is not simulated by this test")


@dataclass
class Runtime:
    env: dict[str, str]
    user: tuple[int, int]
    argv: list[str]


def runtime_of(stage: Stage, root: Path) -> Runtime:
    env: dict[str, str] = {}
    user = (0, 0)
    entrypoint: list[str] = []
    cmd: list[str] = []
    for op, argument in stage.instructions:
        if op == "ENV":
            env.update(env_pairs(argument))
        elif op == "COPY":
            source, target = shlex.split(argument.removeprefix("--from=builder "))
            # The venv is used where the builder made it (its scripts name that path).
            assert source == target and argument.startswith("--from=builder "), argument
        elif op == "USER":
            uid, gid = argument.split(":")
            user = (int(uid), int(gid))
        elif op == "ENTRYPOINT":
            entrypoint = json.loads(argument)
        elif op == "CMD":
            cmd = json.loads(argument)
        elif op != "EXPOSE":
            pytest.fail(f"final stage: {op} is not simulated by this test")
    env = {key: in_root(root, value) for key, value in env.items()}
    return Runtime(env, user, [in_root(root, arg) for arg in entrypoint + cmd])


@pytest.fixture
def image_root() -> Iterator[Path]:
    """A scratch `/` for the image, readable by everyone (mkdtemp makes it 0700)."""
    root = Path(tempfile.mkdtemp(prefix="token-broker-image-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_the_image_as_the_dockerfile_builds_it_serves_as_a_non_root_user(
    image_root: Path, kubeconfig: Path, tmp_path: Path
) -> None:
    builder, final = dockerfile_stages(DOCKERFILE.read_text())
    assert builder.name == "builder" and final.base == builder.base
    shim = python_on_path(image_root / "usr" / "local" / "bin")
    run_builder(builder, image_root, build_context(tmp_path / "context"), f"{shim}:/usr/bin:/bin")
    venv = image_root / "opt" / "venv"
    assert not (venv / "bin" / "pip").exists()  # removed, as the Dockerfile says
    shutil.rmtree(image_root / "src")  # the final stage has the venv, not the source tree
    runtime = runtime_of(final, image_root)
    assert runtime.user == (65532, 65532)
    assert runtime.argv[:2] == ["token-broker", "serve"]

    # The broker's configuration, where CMD looks for it; readable by the user only.
    etc = image_root / "etc" / "token-broker"
    etc.mkdir(parents=True)
    shutil.copy(kubeconfig, etc / "kubeconfig")
    shutil.copy(CORE_POLICY, etc / "policy.yaml")
    config = {
        "server": {"listen": "127.0.0.1:0", "allowPlaintext": True},
        "admin": {"listen": "127.0.0.1:0"},
        "kubernetes": {"mode": "kubeconfig", "kubeconfig": str(etc / "kubeconfig")},
        **access_config(etc / "policy.yaml"),
        "log": {"format": "json"},
    }
    config_path = Path(runtime.argv[-1])
    assert config_path.parent == etc
    config_path.write_text(yaml.safe_dump(config))
    as_root = os.geteuid() == 0
    for path in etc.iterdir():
        path.chmod(0o400)
        if as_root:
            os.chown(path, *runtime.user)
    user: dict[str, object] = (
        {"user": runtime.user[0], "group": runtime.user[1], "extra_groups": []} if as_root else {}
    )
    env = {
        "PATH": f"{runtime.env.get('PATH', '').split(':')[0]}:/usr/bin:/bin",
        **{k: v for k, v in runtime.env.items() if k != "PATH"},
    }
    assert env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"

    # The installed package is the one that runs (not a source tree), with the redis extra.
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import broker, redis; print(broker.__file__)"],
        env=env, cwd=image_root, capture_output=True, text=True, timeout=60, **user,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(venv / "lib"))

    tree = sorted(image_root.rglob("*"))
    process = Process(
        await asyncio.create_subprocess_exec(
            str(venv / "bin" / runtime.argv[0]), *runtime.argv[1:],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, cwd=image_root, **user,
        )
    )  # fmt: skip
    try:
        serving = json.loads(process.stderr[await process.wait_for("serving", stream="stderr")])
        assert serving["ready"] is True
        if as_root:
            status = Path(f"/proc/{process.proc.pid}/status").read_text()
            uid, gid = (re.search(rf"^{k}:\s+(\d+)", status, re.M) for k in ("Uid", "Gid"))
            assert uid and gid and (int(uid.group(1)), int(gid.group(1))) == runtime.user
        async with aio.insecure_channel(
            serving["listen"], interceptors=[BearerCredential(CALLER_KEY)]
        ) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tokenbroker.v1.TokenBrokerService"),
                timeout=10,
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            answer = await pb_grpc.TokenBrokerServiceStub(channel).CreateToken(
                create_request(), timeout=10
            )
            assert answer.token_request.status.token.count(".") == 2
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{serving['admin_listen']}/metrics") as response,
        ):
            assert response.status == 200
            assert "process_resident_memory_bytes" in await response.text()
    finally:
        if process.proc.returncode is None:
            assert await process.terminate() == 0
    assert not [line for line in process.stderr if '"level": "error"' in line]
    # Nothing was written into the image's tree (no .pyc, no state): a read-only root is fine.
    assert sorted(image_root.rglob("*")) == tree
