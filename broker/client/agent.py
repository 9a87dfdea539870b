"""`token-broker agent`: keeps service-account token files fresh, like Vault Agent's sinks.

For every sink (broker.client.agent_config) the agent asks the broker for a token with the
Python client (broker.client, its own bounded retries included) and writes it to the sink's
path (broker.client.files):

- **atomically**: a temporary file in the same directory (the sink's mode from the start),
  written, fsynced, renamed over the path, then the directory fsynced. A reader sees the old
  token or the new one, never a partial or empty file. The token is written without a newline.
- **refreshed at 80% of its lifetime minus jitter** (0-10 s): the broker cache's rule,
  `broker.lifetime.refresh_due_at`, the lifetime measured on the API server's clock
  (`TokenResult.lifetime_seconds`: exp - iat) and anchored at the moment the answer arrived.
- **on failure**: retried with capped exponential backoff (`retry.initialBackoffSeconds`
  doubling up to `retry.maxBackoffSeconds`, equal jitter: broker.backoff), never sooner than
  the server's RetryInfo / `grpc-retry-pushback-ms`. The old file stays while its token is
  valid (a warning); once no valid token is on disk each failure is logged as an error and
  /healthz answers 503. The file is never deleted: an app holding an expired token gets a 401
  from the service it calls, as it would from any stale credential.

`--once` (init containers) writes every sink once and exits 0, or 1 naming each sink that
failed and why. SIGTERM/SIGINT stop the long-running agent: calls in flight are cancelled,
the files are left in place, exit 0.

Tests drive the agent with an injected clock (`clock`, `jitter`) and `poke()`, which makes
every sink look at the clock again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from broker.backoff import backoff_delay
from broker.client import AsyncTokenBrokerClient, ClientConfig, TokenBrokerError, TokenResult
from broker.client.files import write_atomically
from broker.lifetime import default_jitter, refresh_due_at

if TYPE_CHECKING:
    from aiohttp import web

    from broker.client.agent_config import AgentConfig, SinkConfig

logger = logging.getLogger("broker.agent")

# A sleeping sink looks at the clock at least this often (wall-clock jumps, suspend).
MAX_SLEEP_SECONDS = 30.0
EXIT_OK = 0
EXIT_FAILED = 1


@dataclass(eq=False)
class SinkState:
    """One sink's progress. Times are on the agent's clock (seconds)."""

    sink: SinkConfig
    client: AsyncTokenBrokerClient = field(repr=False)
    # The token on disk (written by this agent) expires then; None: none written yet.
    expires_at: float | None = None
    refresh_at: float | None = None
    # The next refresh or retry is due then (0: at once).
    next_attempt_at: float = 0.0
    # Consecutive failures.
    failures: int = 0
    writes: int = 0
    # Attempts finished, successful or not.
    attempts: int = 0
    last_error: str | None = None

    def valid(self, now: float) -> bool:
        return self.expires_at is not None and now < self.expires_at


class Agent:
    """Runs the sinks of one AgentConfig. `run()` until `stop()`, or `run_once()`."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        """`clock`: seconds (only differences matter); `jitter`: seconds subtracted from
        each refresh point (default: the cache's, uniform in [0, 10 s)); `rng`: in [0, 1),
        for the retry backoff's jitter."""
        self.config = config
        self._clock = clock
        self._jitter = jitter if jitter is not None else default_jitter
        self._rng = rng
        clients: dict[ClientConfig, AsyncTokenBrokerClient] = {}
        self.sinks: list[SinkState] = []
        for sink in config.sinks:
            client_config = config.connection(sink).client_config()
            if client_config not in clients:  # sinks with one connection share a channel
                clients[client_config] = AsyncTokenBrokerClient(client_config)
            self.sinks.append(SinkState(sink=sink, client=clients[client_config]))
        self._clients = list(clients.values())
        # run_once(): a failed sink is not retried (the agent exits 1 instead).
        self._once = False
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._health_runner: web.AppRunner | None = None
        self.health_address: tuple[str, int] | None = None

    # --- control --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to return (safe from a signal handler)."""
        self._stopping.set()
        self.poke()

    def poke(self) -> None:
        """Make every sink look at the clock now (tests move their clock, then poke)."""
        self._wake.set()
        self._wake = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Wait (at most `timeout` real seconds) until `predicate()` holds; it is checked
        after every attempt of every sink."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def healthy(self) -> bool:
        now = self._clock()
        return all(state.valid(now) for state in self.sinks)

    def health_report(self) -> dict[str, Any]:
        now = self._clock()
        sinks = []
        for state in self.sinks:
            entry: dict[str, Any] = {
                "name": state.sink.label,
                "path": str(state.sink.path),
                "valid": state.valid(now),
                "consecutiveFailures": state.failures,
            }
            if state.expires_at is not None:
                entry["expiresInSeconds"] = round(state.expires_at - now, 3)
            if state.last_error is not None:
                entry["lastError"] = state.last_error
            sinks.append(entry)
        return {"status": "ok" if self.healthy() else "unhealthy", "sinks": sinks}

    # --- running --------------------------------------------------------------------------

    async def run_once(self) -> list[tuple[SinkConfig, str]]:
        """Write every sink once (concurrently); the (sink, reason) of each failure."""
        self._once = True
        try:
            results = await asyncio.gather(*(self._attempt(s) for s in self.sinks))
        finally:
            await self.close()
        return [(s.sink, why) for s, why in zip(self.sinks, results, strict=True) if why]

    async def run(self) -> None:
        """Keep every sink fresh until `stop()`; then close everything (files stay)."""
        try:
            if self.config.health is not None:
                await self._start_health()
            tasks = [
                asyncio.create_task(self._run_sink(s), name=f"agent-sink {s.sink.label}")
                for s in self.sinks
            ]
            try:
                await self._stopping.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await self.close()
        logger.info("agent stopped")

    async def close(self) -> None:
        runner, self._health_runner = self._health_runner, None
        if runner is not None:
            await runner.cleanup()
        for client in self._clients:
            await client.close()

    async def _run_sink(self, state: SinkState) -> None:
        while not self._stopping.is_set():
            delay = state.next_attempt_at - self._clock()
            if delay <= 0:
                await self._attempt(state)
                continue
            wake = self._wake
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, MAX_SLEEP_SECONDS)):
                    await wake.wait()

    async def _attempt(self, state: SinkState) -> str | None:
        """One refresh of one sink; the reason it failed, or None."""
        sink = state.sink
        why: str | None
        try:
            result = await state.client.create_token(
                sink.namespace,
                sink.service_account,
                audiences=sink.audiences,
                expiration_seconds=sink.duration,
                bound_object=sink.bound_object.to_client() if sink.bound_object else None,
            )
            if not result.token:
                raise ValueError("the broker answered without a token")
            received = self._clock()
            lifetime = _lifetime(result)
            await asyncio.to_thread(
                write_atomically, sink.path, result.token.encode("utf-8"), sink.mode
            )
        except TokenBrokerError as err:
            why = err.describe()
            self._failed(state, why, err.retry_delay)
        except (OSError, ValueError) as err:  # the file, the credential file, the answer
            why = f"{type(err).__name__}: {err}"
            self._failed(state, why, None)
        else:
            why = None
            self._succeeded(state, result, received, lifetime)
        state.attempts += 1
        async with self._changed:
            self._changed.notify_all()
        return why

    def _succeeded(
        self, state: SinkState, result: TokenResult, received: float, lifetime: float
    ) -> None:
        recovered = state.failures > 0
        state.writes += 1
        state.failures = 0
        state.last_error = None
        state.expires_at = received + lifetime
        state.refresh_at = refresh_due_at(received, state.expires_at, self._jitter())
        state.next_attempt_at = state.refresh_at
        for warning in result.warnings:
            logger.warning("sink %s: the broker warns: %s", state.sink.label, warning)
        logger.info(
            "sink %s: wrote a token for %s/%s to %s (expires %s, refresh in %.0fs)%s",
            state.sink.label,
            state.sink.namespace,
            state.sink.service_account,
            state.sink.path,
            result.expiration_timestamp.isoformat(),
            state.refresh_at - received,
            " after failures" if recovered else "",
        )

    def _failed(self, state: SinkState, why: str, retry_delay: float | None) -> None:
        retry = self.config.retry
        state.failures += 1
        state.last_error = why.splitlines()[0]
        delay = backoff_delay(
            state.failures,
            initial=retry.initial_backoff_seconds,
            maximum=retry.max_backoff_seconds,
            min_fraction=0.5,  # jittered, never below half the ceiling
            rng=self._rng,
        )
        if retry_delay is not None:
            delay = max(delay, retry_delay)  # never sooner than the server asked
        now = self._clock()
        state.next_attempt_at = now + delay
        # What happens next: --once does not retry, the agent exits 1 once every sink was tried.
        then = (
            "not retried (--once: the agent exits 1)" if self._once else f"retrying in {delay:.1f}s"
        )
        if state.valid(now):
            assert state.expires_at is not None
            logger.warning(
                "sink %s: refresh failed (attempt %d): %s; the token on disk stays valid for "
                "%.0fs; %s",
                state.sink.label,
                state.failures,
                why,
                state.expires_at - now,
                then,
            )
        else:
            on_disk = "has expired" if state.expires_at is not None else "was never written"
            logger.error(
                "sink %s: CANNOT GET A TOKEN (attempt %d): %s; the token at %s %s; %s",
                state.sink.label,
                state.failures,
                why,
                state.sink.path,
                on_disk,
                then,
            )

    # --- /healthz -------------------------------------------------------------------------

    async def _start_health(self) -> None:
        from aiohttp import web

        health = self.config.health
        assert health is not None

        async def healthz(request: web.Request) -> web.Response:
            report = self.health_report()
            return web.Response(
                status=200 if report["status"] == "ok" else 503,
                text=json.dumps(report) + "\n",
                content_type="application/json",
            )

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, health.host, health.port, reuse_port=False)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._health_runner = runner
        for address in runner.addresses:
            host, port = address[:2]
            self.health_address = (host, port)
            logger.info("health: http://%s:%d/healthz", host, port)


def _lifetime(result: TokenResult) -> float:
    """Seconds from issue to expiry (the API server's clock), as the broker's cache measures
    them; else what is left until the expiration timestamp by this machine's clock."""
    lifetime = result.lifetime_seconds()
    if lifetime is None:
        lifetime = (result.expiration_timestamp - datetime.now(UTC)).total_seconds()
    if lifetime <= 0:
        raise ValueError("the broker answered with an expired token")
    return lifetime


async def run_agent(config: AgentConfig, *, once: bool = False) -> int:
    """The `agent` command: the exit status."""
    agent = Agent(config)
    if once:
        failures = await agent.run_once()
        for sink, why in failures:
            print(f"token-broker agent: sink {sink.describe()}: {why}", file=sys.stderr)
        return EXIT_FAILED if failures else EXIT_OK
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stop)
    try:
        await agent.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return EXIT_OK
