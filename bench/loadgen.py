"""The load generator: K processes x C concurrent calls, closed loop, latencies collected.

Each process (multiprocessing "spawn") opens its connections, makes one call per connection
(not measured), reports ready and waits for the common start signal; then C coroutines call
back to back until the process's share of the requests is done (or `max_seconds` passed).
Every call's latency (perf_counter) and the process's own CPU time are sent back.

Two kinds of load:
- "grpc": raw bytes over a grpc.aio channel (no protobuf work on the client: the request is
  serialized once, the response is not parsed), to a broker or the bare server;
- "kube": the broker's own upstream path without the broker, `UpstreamClient.create_token`
  (kubernetes.aio) against the emulator;
- "http": the broker's HTTP door (broker.http_door), raw aiohttp POSTs of a TokenRequest body
  (JSON) to `target` (a URL), `channels` keep-alive connections per process, the answer read
  whole and not parsed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

METHOD = "/tokenbroker.v1.TokenBrokerService/CreateToken"


@dataclass(frozen=True)
class LoadSpec:
    kind: Literal["grpc", "kube", "http"]
    # Per process.
    requests: int
    concurrency: int
    # grpc: host:port, the serialized request, call metadata, connections per process.
    target: str = ""
    request: bytes = b""
    # The calls that open the connections (not measured); default: `request`.
    warmup: bytes = b""
    metadata: tuple[tuple[str, str], ...] = ()
    channels: int = 1
    # kube: a kubeconfig for the emulator, and what to ask for.
    kubeconfig: str = ""
    namespace: str = ""
    service_account: str = ""
    audiences: tuple[str, ...] = ()
    expiration_seconds: int = 3600
    max_seconds: float = 60.0
    timeout: float = 30.0


@dataclass
class ProcessResult:
    latencies: array[float]
    started: float  # time.monotonic(): comparable across processes on Linux
    ended: float
    errors: int
    first_error: str
    cpu_seconds: float


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    first_error: str = ""
    client_cpu_seconds: float = 0.0
    # CPU time the machine spent on anything else than the measured processes during the run
    # (filled in by bench.run): a busy neighbour on a shared machine.
    other_cpu_seconds: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


async def _grpc_load(spec: LoadSpec, ready: Any, go: Any) -> ProcessResult:
    from grpc import aio

    channels = [
        # A local subchannel pool: each channel is a connection of its own (the kernel spreads
        # connections, not calls, over `serve --workers` processes).
        aio.insecure_channel(spec.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(spec.channels)
    ]
    # No serializers: bytes in, bytes out.
    calls: list[aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
        ch.unary_unary(METHOD) for ch in channels
    ]

    async def call(i: int, request: bytes = spec.request) -> None:
        await calls[i % len(calls)](request, metadata=spec.metadata, timeout=spec.timeout)

    try:
        for i in range(len(calls)):
            await call(i, spec.warmup or spec.request)
        return await _closed_loop(spec, ready, go, call)
    finally:
        for ch in channels:
            await ch.close()


async def _http_load(spec: LoadSpec, ready: Any, go: Any) -> ProcessResult:
    import aiohttp

    headers = {"Content-Type": "application/json", **dict(spec.metadata)}
    # One session (a pool of keep-alive connections) per channel, as gRPC's channels.
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) for _ in range(spec.channels)
    ]
    timeout = aiohttp.ClientTimeout(total=spec.timeout)

    async def call(i: int, request: bytes = spec.request) -> None:
        async with sessions[i % len(sessions)].post(
            spec.target, data=request, headers=headers, timeout=timeout
        ) as response:
            await response.read()
            if response.status != 201:
                raise RuntimeError(f"HTTP {response.status}")

    try:
        for i in range(len(sessions)):
            await call(i, spec.warmup or spec.request)
        return await _closed_loop(spec, ready, go, call)
    finally:
        for session in sessions:
            await session.close()


async def _kube_load(spec: LoadSpec, ready: Any, go: Any) -> ProcessResult:
    from pathlib import Path

    from broker.config import KubernetesSettings
    from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
    from broker.upstream import UpstreamClient

    client = await UpstreamClient.from_settings(
        KubernetesSettings(mode="kubeconfig", kubeconfig=Path(spec.kubeconfig))
    )
    token_request = pb.TokenRequest(
        spec=pb.TokenRequestSpec(
            audiences=list(spec.audiences), expiration_seconds=spec.expiration_seconds
        )
    )

    async def call(i: int) -> None:
        await client.create_token(
            spec.namespace, spec.service_account, token_request, timeout=spec.timeout
        )

    try:
        await call(0)
        return await _closed_loop(spec, ready, go, call)
    finally:
        await client.close()


async def _closed_loop(spec: LoadSpec, ready: Any, go: Any, call: Any) -> ProcessResult:
    latencies = array("d")
    errors = 0
    first_error = ""
    remaining = spec.requests
    ready.set()
    await asyncio.to_thread(go.wait)
    cpu0 = time.process_time()
    started = time.monotonic()
    stop_at = started + spec.max_seconds

    async def worker(i: int) -> None:
        nonlocal remaining, errors, first_error
        while remaining > 0 and time.monotonic() < stop_at:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                await call(i)
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(i) for i in range(spec.concurrency)))
    ended = time.monotonic()
    return ProcessResult(latencies, started, ended, errors, first_error, time.process_time() - cpu0)


def _process_main(spec: LoadSpec, ready: Any, go: Any, conn: Connection) -> None:
    try:
        run = {"grpc": _grpc_load, "kube": _kube_load, "http": _http_load}[spec.kind]
        result = asyncio.run(run(spec, ready, go))
        conn.send(result)
    except BaseException as exc:
        ready.set()
        conn.send(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        conn.close()


class LoadGenerator:
    """`processes` load processes for one spec: `prepare()` (connect, warm), then
    `fire()` releases them together and collects the results."""

    def __init__(self, spec: LoadSpec, processes: int) -> None:
        self.spec = spec
        ctx = multiprocessing.get_context("spawn")
        self._go = ctx.Event()
        self._procs: list[tuple[Any, Connection, Any]] = []
        for _ in range(processes):
            ready = ctx.Event()
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_process_main, args=(spec, ready, self._go, child), daemon=True
            )
            self._procs.append((proc, parent, ready))
            del child

    def prepare(self, timeout: float = 60.0) -> None:
        for proc, _, _ in self._procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for proc, _, ready in self._procs:
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"load process {proc.pid} not ready in {timeout:.0f}s")

    def fire(self, timeout: float = 300.0) -> LoadResult:
        self._go.set()
        out = LoadResult()
        starts, ends = [], []
        for proc, conn, _ in self._procs:
            if not conn.poll(timeout):
                raise RuntimeError(f"load process {proc.pid} did not answer in {timeout:.0f}s")
            got = conn.recv()
            if isinstance(got, str):
                raise RuntimeError(f"load process {proc.pid} failed: {got}")
            out.latencies.extend(got.latencies)
            starts.append(got.started)
            ends.append(got.ended)
            out.errors += got.errors
            out.first_error = out.first_error or got.first_error
            out.client_cpu_seconds += got.cpu_seconds
        for proc, conn, _ in self._procs:
            proc.join(30)
            conn.close()
        out.seconds = max(ends) - min(starts)
        return out

    def close(self) -> None:
        for proc, _, _ in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def run_load(spec: LoadSpec, processes: int) -> LoadResult:
    gen = LoadGenerator(spec, processes)
    try:
        gen.prepare()
        return gen.fire()
    finally:
        gen.close()


def cpu_count() -> int:
    return os.cpu_count() or 1
