"""`token-broker serve --workers N`: N broker processes sharing one listening port.

One Python process serves gRPC on one core. With `--workers N` the command becomes a small
supervisor: it checks the settings, then starts N worker processes (`python -m
broker.workers`, each given the resolved settings on its stdin) that each run the ordinary
`BrokerServer` with `SO_REUSEPORT` on its TCP listeners, so the kernel spreads incoming
*connections* over them (an HTTP/2 connection and all its calls stay on one worker).

What is shared and what is not:

- shared: `server.listen` and `server.healthListen` (SO_REUSEPORT; fixed ports only: with
  port 0 every worker would get a port of its own), and rate limits with
  `rateLimit.backend: redis`;
- per worker: the token cache (and its single flight: identical requests on different
  workers make one upstream call per worker), memory rate limits (each worker enforces the
  configured limits on its own, so together they allow up to N times as much), the upstream
  concurrency cap, the policy reload, the metrics registry and readiness;
- `admin.listen`: worker i listens on the configured port + i (port 0: a free port each),
  each with its own `/metrics`, `/healthz` and `/readyz`; scrape all N;
- `server.unixSocket` is refused: a socket file has one listener.

Signals: SIGTERM/SIGINT to the supervisor are forwarded (as SIGTERM) to every worker, which
stops as `serve` does (not ready, serving on for `server.shutdownDelaySeconds`, then draining
within `server.shutdownGraceSeconds`); a second one is forwarded too and cancels the calls
still in flight. SIGHUP is forwarded (files re-read). Workers run in their own session,
so a terminal's Ctrl-C reaches them only through the supervisor, once. A worker whose
supervisor disappears (its stdin closes) stops as if sent SIGTERM.

Exit status: 0 when every worker stopped cleanly after a signal; a worker that exits on its
own (crash, failed start: busy port, bad TLS file) is logged, the others are stopped, and the
supervisor exits with that worker's status (1 when it was killed by a signal, or exited 0).

Log lines of workers carry `worker` (the index) and `pid`; the supervisor's carry `pid`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.config import Settings

logger = logging.getLogger(__name__)

MAX_WORKERS = 64
STDIN_FD = 0
EXIT_USAGE = 2


class WorkerLogFields(logging.Filter):
    """Adds `pid` (and `worker`, the index, in a worker) to every record."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if self._worker is not None and not hasattr(record, "worker"):
            record.worker = self._worker
        if not hasattr(record, "pid"):
            record.pid = record.process or os.getpid()
        return True


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse settings that N processes cannot share (ConfigError naming the key)."""
    from broker.config import ConfigError, split_host_port

    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers: {workers} is not between 1 and {MAX_WORKERS}")
    if workers == 1:
        return
    server = settings.server
    if settings.dev:
        raise ConfigError(
            "--workers: dev mode runs in one process (its API-server emulator is in-process)"
        )
    if server.unix_socket is not None:
        raise ConfigError(
            f"server.unixSocket: a unix socket cannot be shared by {workers} worker processes; "
            "serve it from a single process, or use server.listen with --workers"
        )
    if server.listen is None:
        raise ConfigError("server.listen: --workers needs a TCP listener for the workers to share")
    for key, listen in (
        ("server.listen", server.listen),
        ("server.healthListen", server.health_listen),
        ("server.httpListen", server.http_listen),
    ):
        if listen is None:
            continue
        if split_host_port(listen, key)[1] == 0:
            raise ConfigError(
                f"{key}: port 0 cannot be shared by --workers {workers} (each worker would get "
                f"a port of its own); give a fixed port"
            )
    if settings.admin.listen is not None:
        port = split_host_port(settings.admin.listen, "admin.listen")[1]
        if port != 0 and port + workers - 1 > 65535:
            raise ConfigError(
                f"admin.listen: worker i listens on port {port} + i; {port + workers - 1} is "
                "not a port"
            )


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: its admin listener on the configured port + index."""
    from broker.config import split_host_port

    admin = settings.admin.listen
    if admin is None or index == 0:
        return settings
    host, port = split_host_port(admin, "admin.listen")
    if port == 0:
        return settings
    return settings.model_copy(
        update={"admin": settings.admin.model_copy(update={"listen": f"{host}:{port + index}"})}
    )


# --- the supervisor ---------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process
    # SIGTERM was sent to it (killed by SIGTERM before it could install its handler: stopped).
    terminated: bool = False
    status: int | None = None
    waiter: asyncio.Future[int] = field(init=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.returncode is not None:
            return
        if sig == signal.SIGTERM:
            self.terminated = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)


async def _spawn(settings: Settings, index: int) -> _Worker:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.workers",
        "--index",
        str(index),
        stdin=asyncio.subprocess.PIPE,
        # Not in the terminal's process group: Ctrl-C reaches workers once, via us.
        start_new_session=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(worker_settings(settings, index).model_dump_json().encode() + b"\n")
    await proc.stdin.drain()
    # stdin stays open: its end tells the worker that the supervisor is gone.
    worker = _Worker(index, proc)
    worker.waiter = asyncio.ensure_future(proc.wait())
    return worker


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


async def run_workers(settings: Settings, workers: int) -> int:
    """Run `workers` broker processes on the shared port until SIGTERM/SIGINT; the exit
    status. Raises ConfigError for settings the workers cannot share."""
    from broker.config import check_transport_security

    check_workers(settings, workers)
    check_transport_security(settings)
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerLogFields())
    supervisor = _Supervisor(settings, workers)
    try:
        with supervisor.signal_handlers(asyncio.get_running_loop()):
            await supervisor.start_workers()
            await supervisor.wait_for_workers()
    finally:
        await supervisor.reap()
    return supervisor.exit_status()


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Supervisor:
    """The workers of `run_workers`, whether they are being stopped, and the first failure."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self._settings = settings
        self._count = workers
        self.running: list[_Worker] = []
        self.stopping = False
        self.failure: int | None = None

    @contextlib.contextmanager
    def signal_handlers(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """SIGTERM/SIGINT stop the workers (a second one too: they cancel their calls);
        SIGHUP is forwarded."""
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        try:
            yield
        finally:
            for sig in (*_STOP_SIGNALS, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _signal_all(self, sig: signal.Signals) -> None:
        for worker in self.running:
            worker.signal(sig)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self.stopping:
            logger.warning("second %s: workers cancel their in-flight calls", sig.name)
        else:
            logger.info("received %s: stopping %d worker(s)", sig.name, len(self.running))
        self.stopping = True
        self._signal_all(signal.SIGTERM)

    async def start_workers(self) -> None:
        """Spawn the workers one by one (none more once a stop signal came)."""
        for index in range(self._count):
            if self.stopping:
                return
            self.running.append(await _spawn(self._settings, index))
        if self.stopping:
            return
        logger.info(
            "started %d workers on %s",
            len(self.running),
            self._settings.server.listen,
            extra={"workers": len(self.running), "worker_pids": [w.pid for w in self.running]},
        )

    async def wait_for_workers(self) -> None:
        """Until every worker has exited; the first to exit on its own stops the others."""
        pending = {w.waiter: w for w in self.running}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                worker = pending.pop(future)
                worker.status = future.result()
                self._exited(worker, worker.status)

    def _exited(self, worker: _Worker, status: int) -> None:
        clean = status == 0 or (worker.terminated and status == -signal.SIGTERM)
        if not self.stopping:
            logger.error(
                "worker %d (pid %d) exited unexpectedly with %s; stopping the others",
                worker.index,
                worker.pid,
                _describe(status),
                extra={"worker": worker.index, "status": status},
            )
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            self.failure = status if status > 0 else 1
        elif not clean:
            logger.error(
                "worker %d (pid %d) exited with %s",
                worker.index,
                worker.pid,
                _describe(status),
                extra={"worker": worker.index, "status": status},
            )
            if self.failure is None:
                self.failure = status if status > 0 else 1
        else:
            logger.info(
                "worker %d (pid %d) stopped",
                worker.index,
                worker.pid,
                extra={"worker": worker.index},
            )

    async def reap(self) -> None:
        """Kill the workers still running (cancelled: do not leave workers behind)."""
        for worker in self.running:
            if worker.proc.returncode is None:
                worker.proc.kill()
                await worker.proc.wait()
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()

    def exit_status(self) -> int:
        if self.failure is None:
            logger.info("all %d workers stopped", len(self.running))
            return 0
        return self.failure


# --- a worker ---------------------------------------------------------------------------------


def _read_settings_line() -> bytes:
    """The first line of stdin, read from the file descriptor (no buffered reader: its lock
    would be held by the watching thread at interpreter shutdown)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(STDIN_FD, 65536)
        if not chunk:
            break
        data += chunk
    return data


def _watch_supervisor() -> None:
    """Stop (as on SIGTERM) when stdin closes: the supervisor is gone."""
    try:
        while os.read(STDIN_FD, 4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


async def _serve_worker(settings: Settings, early: list[int]) -> int:
    from broker.server import BrokerServer, serve_until_signal, signals_while_starting

    with signals_while_starting() as started:
        if signal.SIGTERM in early or signal.SIGINT in early:
            started.stop.set()
        started.reload = signal.SIGHUP in early
        server = BrokerServer(settings, reuse_port=True)
        await server.start()
        await serve_until_signal(server, started)
    return 0


def worker_main(argv: list[str] | None = None) -> int:
    """A worker: settings (JSON) on the first line of stdin, then serve until SIGTERM."""
    early: list[int] = []

    def remember(signum: int, frame: Any) -> None:
        early.append(signum)

    # Signals that arrive while starting are remembered, not fatal.
    signal.signal(signal.SIGTERM, remember)
    signal.signal(signal.SIGINT, remember)
    signal.signal(signal.SIGHUP, remember)
    parser = argparse.ArgumentParser(prog="python -m broker.workers")
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    line = _read_settings_line()
    if not line:
        print(f"token-broker: worker {args.index}: no settings on stdin", file=sys.stderr)
        return EXIT_USAGE

    from broker.config import ConfigError, Settings
    from broker.logs import setup_logging

    # model_validate: the environment and file were applied by the supervisor already.
    settings = Settings.model_validate(json.loads(line))
    setup_logging(settings.log).addFilter(WorkerLogFields(args.index))
    threading.Thread(target=_watch_supervisor, name="supervisor-watch", daemon=True).start()
    try:
        return asyncio.run(_serve_worker(settings, early))
    except ConfigError as exc:
        print(f"token-broker: worker {args.index}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(worker_main())
