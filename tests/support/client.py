"""Shared support for the client-side tests (tests/client/): the Python client (test_client.py),
the agent (test_agent.py), the kubectl credential plugin (test_exec_credential.py) and the
Node.js example (test_node_client.py).

- `ScriptedBroker`: a tiny grpc.aio TokenBrokerService that answers from a script (rich
  errors, RetryInfo, pushback trailers), for retry semantics the real broker cannot be made
  to show on demand. Everything else runs against the real BrokerServer + emulator.
- `run_command`: `python -m broker ...` (or any program) as a child with extra environment.
- `start_broker`: a BrokerServer on TCP and/or a unix socket (tests/support/stack.py settings).
- `FakeClock`, `sink`, `Running`: an agent's clock, one of its sinks, an agent running in-process.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from broker.client.agent import Agent
from broker.config import KubernetesSettings
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.server import BrokerServer
from tests.support.cli import REPO, cli_env
from tests.support.stack import NAMESPACE, SERVICE_ACCOUNT, broker_settings

# --- a scripted broker --------------------------------------------------------------------------


@dataclass
class Fail:
    """One scripted failure: a BrokerError (rich details), or a bare status with trailers."""

    code: grpc.StatusCode
    message: str = "scripted failure"
    reason: str = "SCRIPTED"
    retry_after: float | None = None
    # Only these trailers, no grpc-status-details-bin (e.g. a bare pushback).
    bare_trailers: tuple[tuple[str, str], ...] | None = None


@dataclass
class ScriptedBroker(pb_grpc.TokenBrokerServiceServicer):
    """Answers CreateToken from `script` (then OK with `token`); records each call."""

    script: list[Fail] = field(default_factory=list)
    token: str = "header.payload.signature"
    calls: list[tuple[pb.CreateTokenRequest, dict[str, str]]] = field(default_factory=list)
    server: aio.Server | None = None
    address: str = ""

    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.CreateTokenResponse:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self.calls.append((request, metadata))
        if self.script:
            fail = self.script.pop(0)
            if fail.bare_trailers is not None:
                await context.abort(fail.code, fail.message, fail.bare_trailers)
            await BrokerError(
                code=fail.code,
                message=fail.message,
                reason=fail.reason,
                retry_after=fail.retry_after,
            ).abort(context)
        token_request = pb.TokenRequest(spec=request.token_request.spec)
        token_request.status.token = self.token
        token_request.status.expiration_timestamp.FromSeconds(2_000_000_000)
        return pb.CreateTokenResponse(token_request=token_request)

    async def start(self) -> str:
        self.server = aio.server()
        pb_grpc.add_TokenBrokerServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)


# --- the real broker ----------------------------------------------------------------------------


async def start_broker(kube: KubernetesSettings, **server: Any) -> BrokerServer:
    """A started BrokerServer with the core-tests access settings (see stack.broker_settings)."""
    broker = BrokerServer(broker_settings(kube, **server))
    await broker.start()
    return broker


# --- child processes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run_command(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    credential: str | None = None,
    timeout: float = 120.0,
    cwd: Path = REPO,
) -> Completed:
    """Run a program (bounded by `timeout`) with cli_env() plus `env`."""
    full_env = cli_env(credential)
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(), err.decode())


async def run_broker_cli(*args: str, **kwargs: Any) -> Completed:
    """`python -m broker ARGS` as a child process."""
    return await run_command([sys.executable, "-m", "broker", *args], **kwargs)


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


# --- the agent -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def sink(path: Path, **extra: Any) -> dict[str, Any]:
    return {"namespace": NAMESPACE, "serviceAccount": SERVICE_ACCOUNT, "path": str(path), **extra}


class Running:
    """An in-process agent running until the test ends."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.task = asyncio.create_task(agent.run())

    async def until(self, predicate: Callable[[], bool]) -> None:
        if self.task.done():
            self.task.result()
        await self.agent.wait_until(predicate, timeout=60)

    async def stop(self) -> None:
        self.agent.stop()
        await asyncio.wait_for(self.task, 30)
