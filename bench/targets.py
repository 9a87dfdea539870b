"""The processes under test: a bare gRPC server, the API-server emulator, the broker.

Each runs in a process of its own, so its CPU time can be read from /proc (utime + stime of
the process and, for `serve --workers`, of its children).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

# The broker that is measured: this checkout, or another one (BENCH_BROKER_SRC=DIR, e.g. a copy
# from before a change, for before/after numbers on the same machine).
REPO = Path(os.environ.get("BENCH_BROKER_SRC") or Path(__file__).resolve().parents[1])
NAMESPACE = "demo"
SERVICE_ACCOUNT = "build-robot"
AUDIENCE = "bench"
BROKER_USER = "system:serviceaccount:token-broker:token-broker"
BROKER_TOKEN = "bench-broker-credential-7d1f"
CALLER = "bench-caller"
CALLER_KEY = "tbk_bench-caller-key-9a7e3c21"
SEED: dict[str, Any] = {
    "namespaces": [{"name": NAMESPACE, "serviceAccounts": [{"name": SERVICE_ACCOUNT}]}],
    "users": [{"token": BROKER_TOKEN, "name": BROKER_USER}],
    "rbac": [{"user": BROKER_USER, "namespaces": [NAMESPACE]}],
}
POLICY: dict[str, Any] = {
    "rules": [
        {
            "name": "bench",
            "subjects": [{"method": "apiKey", "name": CALLER}],
            "namespaces": [NAMESPACE],
            "serviceAccounts": [SERVICE_ACCOUNT],
            "audiences": [AUDIENCE],
            "maxExpiration": "24h",
        }
    ]
}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- CPU time from /proc ---------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy (not idle or waiting for I/O) since boot, in seconds;
    steal time (the hypervisor running another machine) counts as busy."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the bare server: the same message size, no work --------------------------------------------


def _bare_main(port: int, response: bytes, ready: Any, protocol: bool) -> None:
    import grpc
    from grpc import aio

    async def handle(request: bytes, context: Any) -> bytes:
        return response

    async def handle_as_the_broker(requests: Any, context: Any) -> bytes:
        # What the broker's protocol asks of any server answering CreateToken as it does:
        # the request id in the response headers, and the request message received inside
        # the call (registered request-streaming) rather than before it.
        await context.send_initial_metadata((("x-request-id", "bench"),))
        await context.read()
        return response

    async def main() -> None:
        server = aio.server()
        method: Any = (
            grpc.stream_unary_rpc_method_handler(handle_as_the_broker)
            if protocol
            else grpc.unary_unary_rpc_method_handler(handle)
        )
        handler = grpc.method_handlers_generic_handler(
            "tokenbroker.v1.TokenBrokerService", {"CreateToken": method}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        await stop.wait()
        await server.stop(None)

    asyncio.run(main())


class BareServer:
    """A grpc.aio server answering CreateToken with `response`, doing nothing else; with
    `protocol`, only what the broker's protocol requires besides (the x-request-id header,
    the request received inside the call)."""

    def __init__(self, response: bytes, *, protocol: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.port = free_port()
        ready = ctx.Event()
        self._proc = ctx.Process(target=_bare_main, args=(self.port, response, ready, protocol))
        self._proc.start()
        if not ready.wait(60):
            raise RuntimeError("the bare server did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        assert self._proc.pid is not None
        return [self._proc.pid]

    def stop(self) -> None:
        if self._proc.pid is not None and self._proc.is_alive():
            os.kill(self._proc.pid, signal.SIGTERM)
        self._proc.join(30)


# --- the emulator, in a process of its own, with a control pipe ------------------------------


def _emulator_main(conn: Connection, kubeconfig: str) -> None:
    from broker.emulator import Emulator

    async def main() -> None:
        emulator = Emulator(seed=SEED, host="127.0.0.1", port=0)
        await emulator.start()
        emulator.write_kubeconfig(Path(kubeconfig), user_token=BROKER_TOKEN)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def command(cmd: str, arg: Any) -> Any:
            if cmd == "count":
                return emulator.token_request_count
            if cmd == "reset":
                emulator.reset_counters()
                return None
            if cmd == "latency":
                emulator.faults.latency = float(arg)
                return None
            if cmd == "stop":
                done.set()
                return None
            raise ValueError(cmd)

        def serve_commands() -> None:
            while True:
                try:
                    cmd, arg = conn.recv()
                except EOFError:
                    loop.call_soon_threadsafe(done.set)
                    return
                answer = asyncio.run_coroutine_threadsafe(_call(command, cmd, arg), loop)
                conn.send(answer.result())
                if cmd == "stop":
                    return

        conn.send(emulator.url)
        threading.Thread(target=serve_commands, daemon=True).start()
        await done.wait()
        await emulator.stop()

    asyncio.run(main())


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


class EmulatorHost:
    def __init__(self, workdir: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.kubeconfig = workdir / "kubeconfig"
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_emulator_main, args=(child, str(self.kubeconfig)))
        self._proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("the emulator did not start")
        self.url: str = self._conn.recv()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def _ask(self, cmd: str, arg: Any = None) -> Any:
        self._conn.send((cmd, arg))
        return self._conn.recv()

    def token_request_count(self) -> int:
        return int(self._ask("count"))

    def reset(self) -> None:
        self._ask("reset")

    def set_latency(self, seconds: float) -> None:
        self._ask("latency", seconds)

    def stop(self) -> None:
        if self._proc.is_alive():
            self._ask("stop")
        self._proc.join(30)


# --- the broker, as `token-broker serve` runs it ----------------------------------------------


def write_broker_config(
    workdir: Path, kubeconfig: Path, *, cache: bool, port: int, http_port: int | None = None
) -> Path:
    """`http_port`: also serve the HTTP door there (plaintext on loopback, as gRPC here)."""
    from broker.authn_apikeys import hash_api_key

    policy = workdir / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    config = workdir / f"broker-{'cache' if cache else 'nocache'}-{port}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {
                    "listen": f"127.0.0.1:{port}",
                    "allowPlaintext": True,
                    **({"httpListen": f"127.0.0.1:{http_port}"} if http_port else {}),
                },
                "kubernetes": {"mode": "kubeconfig", "kubeconfig": str(kubeconfig)},
                "authentication": {
                    "apiKeys": {"keys": [{"name": CALLER, "sha256": hash_api_key(CALLER_KEY)}]}
                },
                "policy": {"file": str(policy)},
                "cache": {"enabled": cache},
                "rateLimit": {"enabled": False},
                # The production defaults otherwise: JSON logs at info (one access line per
                # call) and audit lines on stdout.
                "log": {"format": "json", "level": "info"},
                "admin": {"listen": "127.0.0.1:0"},
            }
        )
    )
    return config


class BrokerProcess:
    """`python -m broker serve --config FILE [--workers N]`; its audit lines (stdout) and logs
    (stderr) are pipes, as in a container, drained into files by threads of this process, as
    the container runtime's log collector would read them."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        *,
        workers: int = 1,
        port: int,
        python_args: tuple[str, ...] = (),
        src: Path | None = None,
    ) -> None:
        """`src`: the tree holding the broker/ to run (default: REPO)."""
        src = src if src is not None else REPO
        self.port = port
        self.workers = workers
        tag = f"{config.stem}-w{workers}-{time.monotonic_ns()}"
        self.log_file = workdir / f"{tag}.log"
        self.audit_file = workdir / f"{tag}.audit"
        args = [sys.executable, *python_args, "-m", "broker", "serve", "--config", str(config)]
        if workers != 1:
            args += ["--workers", str(workers)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=src
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._drains = [
            threading.Thread(target=_drain, args=(pipe, path.open("wb")), daemon=True)
            for pipe, path in (
                (self.proc.stdout, self.audit_file),
                (self.proc.stderr, self.log_file),
            )
        ]
        for drain in self._drains:
            drain.start()
        self.admin_urls = self._wait_serving()

    def _serving(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_file.read_text().splitlines():
            if line.startswith("{") and '"token broker serving"' in line:
                out.append(json.loads(line))
        return out

    def _wait_serving(self, timeout: float = 90.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the broker exited: {self.log_file.read_text()[-2000:]}")
            serving = self._serving()
            if len(serving) == self.workers:
                return [f"http://{entry['admin_listen']}" for entry in serving]
            time.sleep(0.1)
        raise RuntimeError("the broker did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        """The processes that serve: the broker, or its workers."""
        return [self.proc.pid] if self.workers == 1 else children(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        """The token_broker_cache_* counters, summed over the workers."""
        totals: dict[str, float] = {}
        for url in self.admin_urls:
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
                text = response.read().decode()
            for line in text.splitlines():
                if line.startswith("token_broker_cache_") and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    totals[name] = totals.get(name, 0.0) + float(value)
        return totals

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        for drain in self._drains:
            drain.join(10)
        return code


def _drain(pipe: Any, out: Any) -> None:
    """Copy a child's pipe into the file `out` until it closes."""
    with out:
        while chunk := pipe.read1(65536):
            out.write(chunk)
            out.flush()
