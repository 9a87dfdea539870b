"""`token-broker serve --workers N`: worker processes sharing one port (broker.workers).

The broker runs as a real process tree (`python -m broker serve --workers 2`); calls go over
fresh connections until both workers have answered one (the access log lines carry the
worker's pid), then SIGTERM stops the supervisor and both workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from broker.config import ConfigError, load_settings
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.workers import check_workers, worker_settings
from tests.support.cli import Process, Spawn, run_cli, serve_config
from tests.support.stack import CALLER_KEY, BearerCredential, create_request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path, kubeconfig: Path, port: int, **server: Any) -> Path:
    return serve_config(
        tmp_path / "config.yaml",
        kubeconfig,
        server={"listen": f"127.0.0.1:{port}", **server},
        rateLimit={"enabled": False},
        log={"format": "json", "level": "info"},
    )


def log_entries(process: Process) -> list[dict[str, Any]]:
    entries = []
    for line in list(process.stderr):
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


async def until(predicate: Callable[[], bool], process: Process) -> None:
    """Wait (bounded) until `predicate()` holds; fail if the broker exits first."""

    async def poll() -> None:
        while not predicate():
            assert process.proc.returncode is None, "".join(process.stderr)
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), 60)


async def exit_status(process: Process) -> int:
    """Wait (bounded) for the broker to exit on its own, and for the rest of its output."""
    rc = await asyncio.wait_for(process.proc.wait(), 60)
    # Its stderr closes once the workers, which share it, have exited too.
    await asyncio.wait_for(asyncio.gather(*process._readers), 60)
    return rc


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_two_workers_share_the_port_and_stop_on_sigterm(
    spawn: Spawn, kubeconfig: Path, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path, kubeconfig, port)
    process = await spawn("serve", "--config", str(config), "--workers", "2")

    def serving() -> list[dict[str, Any]]:
        return [e for e in log_entries(process) if e["message"] == "token broker serving"]

    await until(lambda: len(serving()) == 2, process)
    workers = {e["pid"]: e for e in serving()}
    assert len(workers) == 2
    assert {e["worker"] for e in workers.values()} == {0, 1}
    assert all(e["listen"] == f"127.0.0.1:{port}" for e in workers.values())
    assert process.proc.pid not in workers
    # Each worker has an admin listener of its own (admin.listen 127.0.0.1:0 in the tests).
    assert len({e["admin_listen"] for e in workers.values()}) == 2

    def answered_by() -> set[int]:
        return {
            e["pid"]
            for e in log_entries(process)
            if e["logger"] == "broker.access" and e.get("grpc_code") == "OK"
        }

    # The kernel spreads connections (not calls) over the workers: one fresh connection per
    # call. 64 connections all landing on one of two workers would be a broken SO_REUSEPORT.
    for _ in range(64):
        async with aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.use_local_subchannel_pool", 1)],
            interceptors=[BearerCredential(CALLER_KEY)],
        ) as channel:
            stub = pb_grpc.TokenBrokerServiceStub(channel)
            response = await stub.CreateToken(create_request(), timeout=10)
            assert response.token_request.status.token
        await asyncio.sleep(0)
        if len(answered_by()) == 2:
            break
    await until(lambda: len(answered_by()) == 2, process)
    assert answered_by() == set(workers)

    assert await process.terminate() == 0
    messages = [e["message"] for e in log_entries(process)]
    assert "received SIGTERM: stopping 2 worker(s)" in messages
    assert messages.count("stopped") == 2  # each worker's BrokerServer drained and stopped
    assert "all 2 workers stopped" in messages
    assert all(pid_gone(pid) for pid in workers)


async def test_a_worker_that_dies_stops_the_others(
    spawn: Spawn, kubeconfig: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, kubeconfig, free_port())
    process = await spawn("serve", "--config", str(config), "--workers", "2")
    started = await process.wait_for("started 2 workers", stream="stderr")
    pids = json.loads(process.stderr[started])["worker_pids"]
    await process.wait_for("token broker serving", stream="stderr")
    os.kill(pids[0], signal.SIGKILL)
    assert await exit_status(process) == 1
    errors = [e["message"] for e in log_entries(process) if e["level"] == "error"]
    assert (
        f"worker 0 (pid {pids[0]}) exited unexpectedly with signal SIGKILL; stopping the others"
        in errors
    )
    assert all(pid_gone(pid) for pid in pids)


async def test_a_busy_port_fails_the_start(spawn: Spawn, kubeconfig: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, kubeconfig, port)
        process = await spawn("serve", "--config", str(config), "--workers", "2")
        rc = await exit_status(process)
    assert rc == 2
    assert f"cannot listen on 127.0.0.1:{port}" in "".join(process.stderr)


# --- settings the workers cannot share --------------------------------------------------------


def settings(**server: Any) -> Any:
    return load_settings(
        None, {"server": {"allowPlaintext": True, **server}, "admin": {"listen": "127.0.0.1:9100"}}
    )


@pytest.mark.parametrize(
    ("server", "dev", "message"),
    [
        ({"listen": "127.0.0.1:0"}, False, "server.listen: port 0 cannot be shared"),
        ({"listen": "127.0.0.1:50051", "unixSocket": "/tmp/x.sock"}, False, "server.unixSocket"),
        ({"listen": None, "unixSocket": "/tmp/x.sock"}, False, "server.unixSocket"),
        (
            {"listen": "127.0.0.1:50051", "healthListen": "127.0.0.1:0"},
            False,
            "server.healthListen: port 0",
        ),
        ({"listen": "127.0.0.1:50051"}, True, "dev mode"),
    ],
)
def test_settings_workers_cannot_share_are_refused(
    server: dict[str, Any], dev: bool, message: str
) -> None:
    cfg = settings(**server).model_copy(update={"dev": dev})
    with pytest.raises(ConfigError, match=message):
        check_workers(cfg, 2)
    check_workers(settings(listen="127.0.0.1:50051"), 2)


def test_worker_count_and_admin_ports() -> None:
    with pytest.raises(ConfigError, match="--workers: 0"):
        check_workers(settings(listen="127.0.0.1:50051"), 0)
    cfg = settings(listen="127.0.0.1:50051")
    assert [worker_settings(cfg, i).admin.listen for i in range(3)] == [
        "127.0.0.1:9100",
        "127.0.0.1:9101",
        "127.0.0.1:9102",
    ]
    assert worker_settings(cfg, 2).server == cfg.server
    high = cfg.model_copy(
        update={"admin": cfg.admin.model_copy(update={"listen": "127.0.0.1:65535"})}
    )
    with pytest.raises(ConfigError, match=r"admin\.listen"):
        check_workers(high, 2)


async def test_serve_refuses_port_0_with_workers() -> None:
    rc, _, err = await run_cli(
        "serve", "--listen", "127.0.0.1:0", "--allow-plaintext", "--workers", "2"
    )
    assert rc == 2
    assert "port 0 cannot be shared by --workers 2" in err
    assert "Traceback" not in err
