"""`token-broker agent`: its configuration, atomic writes, refreshes (driven by an injected
clock), a broker restart, /healthz, RetryInfo and backoff, and the `--once` and SIGTERM
behaviour of the real command. The broker is a real BrokerServer over the emulator."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
import yaml

from broker.client.agent import Agent, SinkState
from broker.client.agent_config import AgentConfig, AgentConfigError, parse_agent_config
from broker.client.files import write_atomically
from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.reasons import Reason
from tests.support.cli import REPO, cli_env
from tests.support.client import (
    Fail,
    FakeClock,
    Running,
    ScriptedBroker,
    file_mode,
    run_broker_cli,
    sink,
    start_broker,
)
from tests.support.stack import (
    CALLER_KEY,
    NAMESPACE,
    OTHER_SERVICE_ACCOUNT,
    SERVICE_ACCOUNT,
    RunningBroker,
)

SA_USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"


def tcp_broker(broker: RunningBroker, key_file: Path) -> dict[str, Any]:
    return {"address": broker.address, "plaintext": True, "credentialFile": str(key_file)}


def subject(path: Path) -> str:
    return str(jwt.decode(path.read_text(), options={"verify_signature": False})["sub"])


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-key"
    path.write_text(CALLER_KEY)
    return path


@pytest.fixture
async def run_agent() -> AsyncIterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(config: AgentConfig, **kwargs: Any) -> Running:
        running.append(Running(Agent(config, **kwargs)))
        return running[-1]

    yield start
    for r in running:
        if not r.task.done():
            await r.stop()


# --- configuration ------------------------------------------------------------------------------


def test_config_camel_case_durations_modes_and_defaults(tmp_path: Path) -> None:
    config = parse_agent_config(
        {
            "broker": {"address": "unix:/run/tb.sock"},
            "sinks": [
                sink(
                    tmp_path / "a",
                    audiences=["vault"],
                    duration="1h30m",
                    mode="0640",
                    boundObject={"kind": "Pod", "name": "web-0"},
                ),
                sink(
                    tmp_path / "b",
                    name="b",
                    duration=600,
                    broker={
                        "address": "broker.example:8443",
                        "caFile": "/ca.crt",
                        "credentialFile": "/key",
                        "serverName": "broker.example",
                    },
                ),
            ],
            "retry": {"initialBackoffSeconds": 0.5, "maxBackoffSeconds": 30},
            "health": {"listen": "127.0.0.1:8081"},
        }
    )
    a, b = config.sinks
    assert (a.duration, a.mode, a.audiences, a.label) == (5400, 0o640, ["vault"], str(a.path))
    assert a.bound_object is not None and a.bound_object.to_client().kind == "Pod"
    assert (b.duration, b.mode, b.label) == (600, 0o600, "b")
    assert config.connection(a).address == "unix:/run/tb.sock"
    assert config.connection(b).client_config().server_name == "broker.example"
    assert config.health is not None
    assert (config.health.host, config.health.port) == ("127.0.0.1", 8081)
    # YAML's octal 0600 is an int.
    loaded = yaml.safe_load("mode: 0600")
    yaml_sink = sink(tmp_path / "c", **loaded)
    config = parse_agent_config({"broker": {"address": "unix:/x"}, "sinks": [yaml_sink]})
    assert config.sinks[0].mode == 0o600


@pytest.mark.parametrize(
    ("change", "key", "text"),
    [
        ({"sinks": []}, "sinks", "at least 1"),
        (
            {"sinks": [{"path": "/x", "namespace": "demo"}]},
            "sinks.0.serviceAccount",
            "Field required",
        ),
        ({"sinks": [sink(Path("/x"), namespace="Demo!")]}, "sinks.0.namespace", "DNS-1123 label"),
        ({"sinks": [sink(Path("/x"), mode=600)]}, "sinks.0.mode", "write it in octal"),
        ({"sinks": [sink(Path("/x"), duration="5m")]}, "sinks.0.duration", "less than 10 minutes"),
        ({"sinks": [sink(Path("/x"), duration="soon")]}, "sinks.0.duration", "invalid duration"),
        ({"sinks": [sink(Path("/x"), servceAccount="x")]}, "sinks.0.servceAccount", "Extra inputs"),
        ({"sinks": [sink(Path("/x"), audiences=[""])]}, "sinks.0.audiences", "must not be empty"),
        (
            {"sinks": [sink(Path("/x"), boundObject={"kind": "Deployment", "name": "x"})]},
            "sinks.0.boundObject.kind",
            "Pod",
        ),
        ({"broker": {"address": "h:1", "certFile": "/c"}}, "broker", "together"),
        ({"broker": {"address": "h:1", "plaintext": True, "caFile": "/c"}}, "broker", "plaintext"),
        ({"health": {"listen": "8081"}}, "health.listen", "host:port"),
        ({"sinks": [sink(Path("/x")), sink(Path("/x"))]}, "(top level)", "sinks.1.path"),
        ({"broker": None}, "(top level)", "sinks.0.broker: required"),
        ({"retry": {"initialBackoffSeconds": 5, "maxBackoffSeconds": 1}}, "retry", "at least"),
    ],
)
def test_config_errors_name_the_key(change: dict[str, Any], key: str, text: str) -> None:
    data: dict[str, Any] = {"broker": {"address": "unix:/run/tb.sock"}, "sinks": [sink(Path("/t"))]}
    data.update(change)
    with pytest.raises(AgentConfigError) as info:
        parse_agent_config(data, "agent.yaml")
    message = str(info.value)
    assert message.startswith("invalid agent configuration (agent.yaml):")
    line = next((ln for ln in message.splitlines() if ln.strip().startswith(f"{key}:")), None)
    assert line is not None, message
    assert text in line, message


def test_write_atomically(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "token"
    write_atomically(path, b"one", 0o600)
    assert path.read_bytes() == b"one" and file_mode(path) == 0o600
    write_atomically(path, b"two", 0o640)
    assert path.read_bytes() == b"two" and file_mode(path) == 0o640
    assert os.listdir(path.parent) == ["token"]  # no temporary file left behind
    shared = tmp_path / "shared" / "token"
    write_atomically(shared, b"x", 0o644)
    assert file_mode(shared.parent) & 0o055 == 0o055  # others may reach a file they may read


# --- the agent against the real broker ----------------------------------------------------------


async def test_writes_and_refreshes_atomically(
    broker: RunningBroker,
    emulator: Emulator,
    key_file: Path,
    tmp_path: Path,
    run_agent: Callable[..., Running],
) -> None:
    path = tmp_path / "tokens" / "robot"
    config = parse_agent_config(
        {"broker": tcp_broker(broker, key_file), "sinks": [sink(path, duration="20m")]}
    )
    clock = FakeClock()
    running = run_agent(config, clock=clock, jitter=lambda: 0.0)
    [state] = running.agent.sinks
    await running.until(lambda: state.writes == 1)
    assert file_mode(path) == 0o600
    assert subject(path) == SA_USER
    # Refresh at 80% of the 20 minutes (no jitter), measured from the answer.
    assert state.refresh_at == pytest.approx(clock.now + 960)
    assert state.expires_at == pytest.approx(clock.now + 1200)

    # A reader loops over the file while the agent replaces it: it never sees a partial or
    # empty token, only whole JWTs (each decodes, with the right subject).
    seen: set[str] = set()
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            text = path.read_text()
            try:
                jwt.decode(text, options={"verify_signature": False})
            except jwt.PyJWTError:
                bad.append(text)
            seen.add(text)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(2, 22):
            assert state.refresh_at is not None
            clock.now = state.refresh_at
            running.agent.poke()
            await running.until(lambda n=n: state.writes == n)  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(30)
    assert bad == []
    assert len(seen) > 1
    assert emulator.token_request_count == 21
    assert sorted(os.listdir(path.parent)) == ["robot"]
    assert file_mode(path) == 0o600


async def test_survives_a_broker_restart(
    kubernetes_settings: KubernetesSettings,
    emulator: Emulator,
    tmp_path: Path,
    run_agent: Callable[..., Running],
) -> None:
    socket = tmp_path / "broker.sock"
    server = await start_broker(kubernetes_settings, listen=None, unix_socket=socket)
    path = tmp_path / "token"
    config = parse_agent_config(
        {
            "broker": {"address": f"unix:{socket}", "timeoutSeconds": 5},
            "sinks": [sink(path, duration="10m")],
            "retry": {"initialBackoffSeconds": 1, "maxBackoffSeconds": 8},
            "health": {"listen": "127.0.0.1:0"},
        }
    )
    clock = FakeClock()
    running = run_agent(config, clock=clock, jitter=lambda: 0.0, rng=lambda: 1.0)
    agent = running.agent
    [state] = agent.sinks
    try:
        await running.until(lambda: state.writes == 1 and agent.health_address is not None)
        first = path.read_text()
        assert await healthz(agent) == (200, "ok")

        await server.stop(None)
        assert state.refresh_at is not None
        clock.now = state.refresh_at
        agent.poke()
        await running.until(lambda: state.failures >= 1)
        # The old token is still valid: kept, healthy, retried with backoff.
        assert path.read_text() == first
        assert state.last_error is not None and "UNAVAILABLE" in state.last_error
        assert await healthz(agent) == (200, "ok")
        assert clock.now + 1 <= state.next_attempt_at <= clock.now + 8

        # Past its expiry: still kept on disk, but /healthz says so.
        assert state.expires_at is not None
        clock.now = max(state.expires_at, state.next_attempt_at)
        agent.poke()
        await running.until(lambda: state.failures >= 2)
        assert path.read_text() == first
        status, report = await healthz(agent)
        assert (status, report) == (503, "unhealthy")

        # The broker comes back on the same socket: the agent recovers by itself.
        server = await start_broker(kubernetes_settings, listen=None, unix_socket=socket)
        for _ in range(30):  # gRPC reconnects within its (5 s) backoff
            before = state.attempts
            clock.now = max(clock.now, state.next_attempt_at)
            agent.poke()
            await running.until(lambda before=before: state.attempts > before)  # type: ignore[misc]
            if state.writes == 2:
                break
        assert state.writes == 2 and state.failures == 0
        assert path.read_text() != first and subject(path) == SA_USER
        assert await healthz(agent) == (200, "ok")
    finally:
        await server.stop(None)


async def healthz(agent: Agent) -> tuple[int, str]:
    assert agent.health_address is not None
    host, port = agent.health_address
    url = f"http://{host}:{port}/healthz"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body = await response.json()
        return response.status, str(body["status"])


async def test_health_is_503_until_every_sink_has_a_token(
    broker: RunningBroker, key_file: Path, tmp_path: Path, run_agent: Callable[..., Running]
) -> None:
    config = parse_agent_config(
        {
            "broker": tcp_broker(broker, key_file),
            "sinks": [
                sink(tmp_path / "ok"),
                # Denied by the policy: never written.
                sink(tmp_path / "denied", serviceAccount=OTHER_SERVICE_ACCOUNT, audiences=["nope"]),
            ],
            "health": {"listen": "127.0.0.1:0"},
        }
    )
    running = run_agent(config, clock=FakeClock(), jitter=lambda: 0.0)
    ok, denied = running.agent.sinks
    await running.until(lambda: ok.writes == 1 and denied.failures == 1)
    assert not (tmp_path / "denied").exists()
    status, _ = await healthz(running.agent)
    assert status == 503
    report = running.agent.health_report()
    assert [s["valid"] for s in report["sinks"]] == [True, False]
    assert "PERMISSION_DENIED" in report["sinks"][1]["lastError"]


async def test_retry_info_is_honoured_and_backoff_is_capped(
    tmp_path: Path, run_agent: Callable[..., Running]
) -> None:
    scripted = ScriptedBroker()
    await scripted.start()
    try:
        scripted.script = [
            # Not retried by the client (RetryInfo longer than it waits): the agent waits it.
            Fail(grpc.StatusCode.UNAVAILABLE, retry_after=120.0),
            Fail(grpc.StatusCode.PERMISSION_DENIED),
            Fail(grpc.StatusCode.PERMISSION_DENIED),
            Fail(grpc.StatusCode.PERMISSION_DENIED),
            Fail(grpc.StatusCode.PERMISSION_DENIED),
        ]
        config = parse_agent_config(
            {
                "broker": {"address": scripted.address, "plaintext": True},
                "sinks": [sink(tmp_path / "t")],
                "retry": {"initialBackoffSeconds": 2, "maxBackoffSeconds": 5},
            }
        )
        clock = FakeClock()
        running = run_agent(config, clock=clock, rng=lambda: 1.0)
        [state] = running.agent.sinks
        await running.until(lambda: state.failures == 1)
        assert state.next_attempt_at - clock.now >= 120.0
        delays = []
        for n in range(2, 6):
            clock.now = state.next_attempt_at
            running.agent.poke()
            await running.until(lambda n=n: state.failures == n)  # type: ignore[misc]
            delays.append(state.next_attempt_at - clock.now)
        assert delays == [4.0, 5.0, 5.0, 5.0]  # 2 s doubling, capped at 5 s
        clock.now = state.next_attempt_at
        running.agent.poke()
        await running.until(lambda: state.writes == 1)
        assert (tmp_path / "t").read_text() == scripted.token
    finally:
        await scripted.stop()


# --- the command --------------------------------------------------------------------------------


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


async def test_once_writes_every_sink_and_exits_0(
    broker: RunningBroker, key_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "agent.yaml",
        {
            "broker": tcp_broker(broker, key_file),
            "sinks": [
                sink(out / "robot"),
                sink(
                    out / "db",
                    serviceAccount=OTHER_SERVICE_ACCOUNT,
                    mode="0640",
                    audiences=["https://vault.example.com"],
                ),
            ],
        },
    )
    run = await run_broker_cli("agent", "--config", str(config), "--once")
    assert run.returncode == 0, run.stderr
    assert subject(out / "robot") == SA_USER
    assert subject(out / "db") == f"system:serviceaccount:{NAMESPACE}:{OTHER_SERVICE_ACCOUNT}"
    assert (file_mode(out / "robot"), file_mode(out / "db")) == (0o600, 0o640)
    assert sorted(os.listdir(out)) == ["db", "robot"]


async def test_once_fails_with_the_reason(
    broker: RunningBroker, key_file: Path, tmp_path: Path
) -> None:
    denied = write_config(
        tmp_path / "denied.yaml",
        {
            "broker": tcp_broker(broker, key_file),
            "sinks": [sink(tmp_path / "d", audiences=["nope"])],
        },
    )
    run = await run_broker_cli("agent", "--config", str(denied), "--once")
    assert run.returncode == 1
    assert f"sink {tmp_path / 'd'}" in run.stderr
    assert "PERMISSION_DENIED" in run.stderr and Reason.AUDIENCE_NOT_ALLOWED in run.stderr
    assert not (tmp_path / "d").exists()

    unreachable = write_config(
        tmp_path / "unreachable.yaml",
        {
            "broker": {"address": "127.0.0.1:1", "plaintext": True, "timeoutSeconds": 3},
            "sinks": [sink(tmp_path / "u")],
        },
    )
    run = await run_broker_cli("agent", "--config", str(unreachable), "--once")
    assert run.returncode == 1
    assert "UNAVAILABLE" in run.stderr

    bad = write_config(tmp_path / "bad.yaml", {"sinks": [sink(tmp_path / "b", mode=777)]})
    run = await run_broker_cli("agent", "--config", str(bad), "--once")
    assert run.returncode == 2
    assert "sinks.0.mode" in run.stderr


async def test_sigterm_stops_the_agent_and_leaves_the_file(
    broker: RunningBroker, key_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    config = write_config(
        tmp_path / "agent.yaml",
        {
            "broker": tcp_broker(broker, key_file),
            "sinks": [sink(path)],
            "health": {"listen": "127.0.0.1:0"},
        },
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "agent",
        "--config",
        str(config),
        "--log-format",
        "text",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(None),
        cwd=REPO,
    )
    try:
        async with asyncio.timeout(60):
            while not path.exists():
                assert proc.returncode is None
                await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "agent stopped" in err.decode()
    assert subject(path) == SA_USER


def test_sink_state_validity() -> None:
    state = SinkState(sink=None, client=None)  # type: ignore[arg-type]
    assert not state.valid(0.0)
    state.expires_at = 10.0
    assert state.valid(9.9) and not state.valid(10.0)
