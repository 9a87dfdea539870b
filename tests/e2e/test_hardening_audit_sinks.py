"""Audit sinks that block or fail: bounded waits, readiness, reopening, truthful fail-closed.

A pipe nobody reads is the honest blocked sink: the broker's stdout in a child process, or a
named pipe (FIFO) as `audit.file` in-process, both shrunk to one page and filled up front, so
that the broker's first line blocks. A directory removed under the audit file is the honest
failing sink.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import audit
from broker.audit import AuditLog, AuditRecord, AuditWriteError
from broker.config import KubernetesSettings, load_settings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import Reason
from broker.server import BrokerServer
from broker.upstream import UpstreamClient
from tests.support.cli import REPO, Spawn, cli_env, serve_config
from tests.support.stack import (
    CALLER_KEY,
    NAMESPACE,
    BearerCredential,
    access_config,
    call_error,
    create_request,
)
from tests.support.suite_secrets import SUITE

PAGE = 4096  # the pipes' capacity here: a few audit lines


async def eventually(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def record(request_id: str) -> AuditRecord:
    return AuditRecord.for_call(
        create_request(), request_id=request_id, identity=None, peer=None, latency_ms=1.0
    )


class PipeReader:
    """The read end of a one-page pipe, read only while `drain()` is on."""

    def __init__(self, read_fd: int) -> None:
        self.fd = read_fd
        os.set_blocking(read_fd, False)
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PAGE)
        self.data = bytearray()
        self._draining = False

    def drain(self) -> None:
        asyncio.get_running_loop().add_reader(self.fd, self._read)
        self._draining = True

    def stop_draining(self) -> None:
        if self._draining:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._draining = False
        self._read()  # what is in the pipe now

    def _read(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                self.data += chunk
        except BlockingIOError:
            pass

    def lines(self) -> list[dict[str, Any]]:
        """The JSON lines read so far, after the filler that blocked the pipe."""
        text = bytes(self.data).lstrip(b"x").decode()
        SUITE.add("audit pipe", text)
        return [json.loads(line) for line in text.splitlines()]

    def close(self) -> None:
        self.stop_draining()
        os.close(self.fd)  # a writer still blocked on it gets EPIPE and moves on


class Fifo(PipeReader):
    """A named pipe at `path` (the broker's audit.file), its read end held here."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        super().__init__(os.open(path, os.O_RDONLY | os.O_NONBLOCK))

    def fill(self) -> None:
        """Fill the pipe: the next line written to it blocks until `drain()`."""
        fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            while True:
                os.write(fd, b"x" * 512)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


# --- the AuditLog itself -------------------------------------------------------------------------


async def test_a_blocked_sink_bounds_every_wait_fail_open(tmp_path: Path) -> None:
    fifo = Fifo(tmp_path / "audit.pipe")
    flips: list[str | None] = []
    log = AuditLog(fifo.path, write_timeout_seconds=0.2, max_queued_lines=5)
    log.add_listener(lambda: flips.append(log.problem()))
    try:
        fifo.fill()
        async with asyncio.timeout(30):  # a stalled write would hang here
            for i in range(8):
                await log.write(record(f"open-{i}"))  # fail-open: returns, written or not
        problem = log.problem()
        assert problem is not None and "has not taken a line" in problem
        assert flips and flips[0] is not None
        # Five lines wait (one of them in the blocked write); three found the queue full.
        assert (log.pending_lines, log.lost_lines, log.written_lines) == (5, 3, 0)

        fifo.drain()
        await eventually(lambda: log.pending_lines == 0)
        assert log.problem() is None
        assert flips[-1] is None
        # The lines of calls that went on are written late, in order; the others are lost.
        assert [line["requestID"] for line in fifo.lines()] == [f"open-{i}" for i in range(5)]
        assert (log.written_lines, log.lost_lines) == (5, 3)
    finally:
        await log.close()
        fifo.close()


async def test_a_blocked_sink_refuses_fail_closed_and_withdraws_queued_lines(
    tmp_path: Path,
) -> None:
    fifo = Fifo(tmp_path / "audit.pipe")
    log = AuditLog(fifo.path, fail_closed=True, write_timeout_seconds=0.2)
    try:
        fifo.fill()
        # Concurrent lines: the first is stuck in write(2), the others wait behind it.
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(log.write(record(f"closed-{i}")) for i in range(4)), return_exceptions=True
            ),
            30,
        )
        for outcome in outcomes:
            assert isinstance(outcome, AuditWriteError)
            assert outcome.cause == "not written within 0.2s"
        # Known blocked (a write outstanding for longer than the timeout): refused at once,
        # nothing queued.
        await eventually(lambda: log.problem() is not None)
        with pytest.raises(AuditWriteError) as caught:
            await asyncio.wait_for(log.write(record("closed-late")), 30)
        assert caught.value.cause.startswith("the audit log has not taken a line for ")
        assert log.pending_lines == 1  # only the line in the blocked write
        assert log.lost_lines == 0  # refusals answer for their own lines

        fifo.drain()
        await eventually(lambda: log.pending_lines == 0)
        # Withdrawn lines were never written: at most the one already in write(2) was.
        written = [line["requestID"] for line in fifo.lines()]
        assert len(written) <= 1 and set(written) <= {f"closed-{i}" for i in range(4)}
        await log.write(record("after"))
        assert [line["requestID"] for line in fifo.lines()][-1] == "after"
    finally:
        await log.close()
        fifo.close()


async def test_close_does_not_wait_for_a_blocked_sink(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fifo = Fifo(tmp_path / "audit.pipe")
    log = AuditLog(fifo.path, write_timeout_seconds=0.2)
    try:
        fifo.fill()
        await asyncio.wait_for(log.write(record("stuck")), 30)
        log.write_nowait(record("queued"))
        await asyncio.wait_for(log.close(), 30)
        assert log.lost_lines == 2
        assert "2 line(s) not written at shutdown" in caplog.text
    finally:
        fifo.close()


@pytest.mark.parametrize("how", ["deleted", "moved"])
async def test_the_file_is_reopened_when_its_path_names_another(tmp_path: Path, how: str) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path, fail_closed=True) as log:
        await log.write(record("before"))
        if how == "deleted":
            path.unlink()
        else:
            path.rename(tmp_path / "audit.jsonl.1")
        await log.write(record("after"))
    assert [json.loads(x)["requestID"] for x in path.read_text().splitlines()] == ["after"]
    assert path.stat().st_mode & 0o777 == 0o640 & ~_umask()
    if how == "moved":
        old = (tmp_path / "audit.jsonl.1").read_text().splitlines()
        assert [json.loads(x)["requestID"] for x in old] == ["before"]


async def test_reopen_creates_the_file_again_without_a_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path) as log:
        await log.write(record("before"))
        path.unlink()
        log.reopen()  # what SIGHUP does
        await eventually(path.exists)
        assert path.read_text() == ""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the broker, in-process ----------------------------------------------------------------------


class Broker:
    def __init__(self, server: BrokerServer) -> None:
        self.server = server

    def metric(self, name: str, **labels: str) -> float:
        found = self.server.metrics.registry.get_sample_value(name, labels)
        return found if found is not None else 0.0

    def channel(self) -> aio.Channel:
        return aio.insecure_channel(
            self.server.address, interceptors=[BearerCredential(CALLER_KEY)]
        )


@pytest.fixture
async def start_broker(
    kubernetes_settings: KubernetesSettings, upstream: UpstreamClient
) -> AsyncIterator[Callable[..., Any]]:
    """Brokers with the token cache on and the given `audit` settings."""
    started: list[BrokerServer] = []

    async def start(**audit_settings: Any) -> Broker:
        settings = load_settings(
            None,
            {
                "server": {"listen": "127.0.0.1:0", "allowPlaintext": True},
                "kubernetes": kubernetes_settings,
                "cache": {"enabled": True},
                "rateLimit": {"enabled": False},
                **access_config(),
                "audit": {"sink": "file", **audit_settings},
            },
        )
        server = BrokerServer(settings, upstream=upstream)
        await server.start()
        started.append(server)
        return Broker(server)

    yield start
    for server in started:
        await server.stop(None)


async def create(
    stub: pb_grpc.TokenBrokerServiceStub, request_id: str, timeout: float = 30.0
) -> grpc.StatusCode:
    try:
        await stub.CreateToken(
            create_request(), metadata=(("x-request-id", request_id),), timeout=timeout
        )
    except aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_fail_closed_a_stuck_line_withholds_the_token_and_uncaches_it(
    start_broker: Callable[..., Any], emulator: Emulator, tmp_path: Path
) -> None:
    fifo = Fifo(tmp_path / "audit.pipe")
    try:
        broker = await start_broker(file=str(fifo.path), failClosed=True)  # 2 s timeout
        cache = broker.server.cache
        fifo.fill()
        async with broker.channel() as channel:
            stub = pb_grpc.TokenBrokerServiceStub(channel)
            request = create_request()
            first = await call_error(stub, request, timeout=30)
            assert first.code == grpc.StatusCode.UNAVAILABLE
            assert first.message == (
                "the Kubernetes API server minted a token, but the token broker withheld it: "
                "its audit line could not be written (not written within 2s); the token is "
                "not cached; retry later"
            )
            assert first.error_info is not None
            assert first.error_info.reason == Reason.AUDIT_UNAVAILABLE
            assert first.retry_info is not None
            assert emulator.token_request_count == 1
            assert len(cache) == 0  # not left for the next caller

            await eventually(lambda: not broker.server.readiness.state().ready)
            assert "has not taken a line" in broker.server.readiness.state().reason
            assert broker.metric("token_broker_audit_sink_up") == 0

            # Single-flight waiters: one API call, each its own (refused) outcome.
            emulator.faults.latency = 60.0
            calls = [
                asyncio.ensure_future(create(stub, f"waiter-{i}", timeout=60)) for i in range(3)
            ]
            await eventually(lambda: cache.stats.coalesced == 2 and emulator.in_flight == 1)
            emulator.faults.latency = 0.0
            assert await asyncio.gather(*calls) == [grpc.StatusCode.UNAVAILABLE] * 3
            assert emulator.token_request_count == 2
            assert len(cache) == 0
            assert (
                broker.metric("token_broker_tokens_withheld_total", reason=Reason.AUDIT_UNAVAILABLE)
                == 4
            )
            assert broker.metric("token_broker_tokens_issued_total", namespace=NAMESPACE) == 0

            # The sink takes lines again: ready, and tokens flow, freshly minted.
            fifo.drain()
            await eventually(lambda: broker.server.readiness.state().ready)
            assert await create(stub, "after") == grpc.StatusCode.OK
            assert emulator.token_request_count == 3

        # Every refused call's last line says what happened: a token (its jti) was minted and
        # withheld. (The stuck first line, written late, says "allowed": the refusal follows.)
        await eventually(lambda: broker.metric("token_broker_audit_lines_pending") == 0)
        lines = fifo.lines()
        last = {line["requestID"]: line for line in lines}
        for request_id in ("waiter-0", "waiter-1", "waiter-2"):
            line = last[request_id]
            assert (line["decision"], line["reason"], line["code"]) == (
                "error",
                Reason.AUDIT_UNAVAILABLE,
                "UNAVAILABLE",
            )
            assert line["jti"] is not None and line["upstreamStatus"] == 201
        assert len({last[f"waiter-{i}"]["jti"] for i in range(3)}) == 1
        refused = [line for line in lines if line["reason"] == Reason.AUDIT_UNAVAILABLE]
        assert len(refused) == 4
        assert last["after"]["decision"] == "allowed"
        assert broker.metric("token_broker_audit_sink_up") == 1
    finally:
        fifo.close()


async def test_fail_closed_a_deleted_file_is_reopened_not_written_blind(
    start_broker: Callable[..., Any], tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    broker = await start_broker(file=str(path), failClosed=True)
    async with broker.channel() as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        assert await create(stub, "before") == grpc.StatusCode.OK
        path.unlink()  # logrotate without copytruncate, or a mistake
        assert await create(stub, "after") == grpc.StatusCode.OK
    assert [json.loads(x)["requestID"] for x in path.read_text().splitlines()] == ["after"]


async def test_a_failing_sink_is_not_ready_until_repaired_even_without_calls(
    start_broker: Callable[..., Any],
    emulator: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audit, "SINK_CHECK_INTERVAL_SECONDS", 0.05, raising=False)
    directory = tmp_path / "audit"
    directory.mkdir()
    path = directory / "audit.jsonl"
    broker = await start_broker(file=str(path), failClosed=True)
    async with broker.channel() as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        path.unlink()
        directory.rmdir()
        status = await call_error(stub, create_request(), timeout=30)
        assert status.code == grpc.StatusCode.UNAVAILABLE
        assert os.strerror(errno.ENOENT) in status.message
        assert "minted a token, but the token broker withheld it" in status.message
        state = broker.server.readiness.state()
        assert not state.ready
        assert state.reason == f"cannot write the audit log {path} ({os.strerror(errno.ENOENT)})"
        assert broker.metric("token_broker_audit_sink_up") == 0
        assert (
            broker.metric("token_broker_tokens_withheld_total", reason=Reason.AUDIT_UNAVAILABLE)
            == 1
        )

        directory.mkdir()  # repaired: seen without another call
        await eventually(lambda: broker.server.readiness.state().ready)
        assert path.exists()
        assert await create(stub, "repaired") == grpc.StatusCode.OK
    assert json.loads(path.read_text().splitlines()[-1])["requestID"] == "repaired"


# --- the broker as a process: its stdout is a pipe nobody reads ---------------------------------


class Child:
    """`python -m broker serve` whose stdout is `stdout_fd`; stderr read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stdout: list[str] = []  # for the suite-wide secrets scan
        self.stderr: list[str] = []
        assert proc.stderr is not None
        self._reader = asyncio.ensure_future(self._pump(proc.stderr))
        SUITE.children.append(self)

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.stderr.append(raw.decode())

    async def wait_for(self, text: str) -> dict[str, Any]:
        """The first JSON log line whose message contains `text` (bounded: 60 s)."""

        async def scan() -> dict[str, Any]:
            while True:
                for line in self.stderr:
                    if line.startswith("{") and text in json.loads(line)["message"]:
                        return dict(json.loads(line))
                assert self.proc.returncode is None, "".join(self.stderr)
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(scan(), 60)


async def http_get(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url) as response,
    ):
        return response.status, await response.text()


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_serve_with_a_stdout_pipe_nobody_reads(
    kubeconfig: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    read_fd, write_fd = os.pipe()
    pipe = PipeReader(read_fd)
    os.write(write_fd, b"x" * PAGE)  # full: the broker's first audit line blocks
    config = serve_config(tmp_path / "config.yaml", kubeconfig)  # audit: stdout, fail-open
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", "--config", str(config),
        stdout=write_fd, stderr=asyncio.subprocess.PIPE, env=cli_env(), cwd=REPO,
    )  # fmt: skip
    child = Child(proc)
    try:
        ready = await child.wait_for("token broker serving")
        address, admin = ready["listen"], f"http://{ready['admin_listen']}"
        async with aio.insecure_channel(address) as channel:
            stub = pb_grpc.TokenBrokerServiceStub(channel)
            # The reproduction: one unauthenticated 100 KB call...
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.CreateToken(create_request("n" * 100_000), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # ...and the calls after it are answered, not held until their deadline.
            authenticated = (("authorization", f"Bearer {CALLER_KEY}"),)
            for i in range(4):
                response = await stub.CreateToken(
                    create_request(),
                    metadata=(*authenticated, ("x-request-id", f"call-{i}")),
                    timeout=30,
                )
                assert response.token_request.status.token

            status, reason = await http_get(f"{admin}/readyz")
            assert status == 503
            assert "the audit log <stdout> has not taken a line for" in reason
            health = health_pb2_grpc.HealthStub(channel)
            check = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            metrics = (await http_get(f"{admin}/metrics"))[1]
            assert metric_value(metrics, "token_broker_audit_sink_up") == 0
            assert metric_value(metrics, "token_broker_audit_lines_pending") == 5
            assert metric_value(metrics, "token_broker_audit_lines_lost_total") == 0

            # Someone reads the pipe: the waiting lines are written, in order, and it is
            # ready again.
            pipe.drain()
            for _ in range(600):
                metrics = (await http_get(f"{admin}/metrics"))[1]
                if metric_value(metrics, "token_broker_audit_lines_pending") == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await http_get(f"{admin}/readyz"))[0] == 200
            assert metric_value(metrics, "token_broker_audit_sink_up") == 1
            assert metric_value(metrics, "token_broker_audit_lines_written_total") == 5
            assert metric_value(metrics, "token_broker_audit_lines_pending") == 0
            lines = pipe.lines()
            assert lines[0]["reason"] == Reason.CREDENTIALS_MISSING
            assert [line["requestID"] for line in lines[1:]] == [f"call-{i}" for i in range(4)]
            assert all(line["decision"] == "allowed" for line in lines[1:])

            # Blocked again, and stopped: the exit does not wait for the pipe.
            pipe.stop_draining()
            os.write(write_fd, b"x" * PAGE)
            await stub.CreateToken(create_request(), metadata=authenticated, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await child._reader
        assert any("1 line(s) not written at shutdown" in line for line in child.stderr)
        child.stdout.append(bytes(pipe.data).decode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(write_fd)
        pipe.close()


async def test_serve_sighup_reopens_the_audit_file(
    spawn: Spawn, kubeconfig: Path, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    config = serve_config(
        tmp_path / "config.yaml",
        kubeconfig,
        audit={"sink": "file", "file": str(path), "failClosed": True},
    )
    process = await spawn("serve", "--config", str(config))
    await process.wait_for("serving", stream="stderr")
    path.unlink()
    process.proc.send_signal(signal.SIGHUP)
    await process.wait_for(f"audit log {path} reopened", stream="stderr")
    assert path.exists() and path.stat().st_mode & 0o777 == 0o640 & ~_umask()
    assert await process.terminate() == 0
