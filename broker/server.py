"""The gRPC server: listeners, TLS, health, reflection and graceful shutdown. Wiring only.

The request path lives in `broker.request_path` (its gRPC adapter: `broker.service`); this
module builds its parts from the settings (authenticator, policy source, upstream client,
audit log), binds it to TCP and/or a unix socket next to the standard `grpc.health.v1.Health`
and server reflection services, and owns the parts' lifecycles. Around them: the metrics
(`broker.metrics`, fed by the CreateToken adapter and, for the other services, by
`broker.observe`'s wrappers, put around their handlers when they are registered),
readiness (`broker.readiness`: the gRPC health statuses follow it) and the admin HTTP
listener (`broker.admin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from grpc import aio
from grpc_health.v1 import _async as health_aio  # the asyncio HealthServicer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from broker.admin import AdminServer
from broker.audit import AuditLog
from broker.authn import Authenticator
from broker.authn_throttle import AuthFailureThrottle
from broker.cache import TokenCache
from broker.config import (
    ConfigError,
    Settings,
    check_transport_security,
    split_host_port,
)
from broker.file_reload import ReloadingFiles, reload_on_sighup
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.http_door import HttpDoor
from broker.listen_ports import listen_error, reason_not_bound
from broker.metrics import BrokerMetrics
from broker.observe import CallObserver, ObservedServer
from broker.policy_reload import FixedPolicy, PolicyStore, open_policy
from broker.ratelimit import RateLimiter
from broker.readiness import Clock, KubernetesProber, Readiness, ReadyState
from broker.request_path import RequestPath
from broker.service import TokenBrokerServicer, add_token_broker_service
from broker.tls import ServerCertificates, ServerTLSMaterial
from broker.unix_socket import PeerCredentialRelay, PrivateSocketDirectory, remove_stale_socket
from broker.upstream import UpstreamClient
from broker.upstream_guard import UpstreamGuard

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name
HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Requests are a few hundred bytes; anything near this is abuse.
MAX_RECEIVE_MESSAGE_BYTES = 1024 * 1024


def channel_options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, Any]]:
    server = settings.server
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        # Linux defaults to SO_REUSEPORT, which lets a second broker bind the same port
        # silently and steal half the connections; a busy port must fail the start instead.
        # Only the worker processes of `serve --workers N` (broker.workers) share it.
        ("grpc.so_reuseport", int(reuse_port)),
        # One connection cannot open calls without end (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS);
        # calls in flight across connections are bounded by server.maxPendingCalls.
        ("grpc.max_concurrent_streams", server.max_concurrent_streams),
    ]
    if server.max_connection_age_seconds is not None:
        # Long-lived HTTP/2 connections pin clients to one replica; age them out.
        options += [
            ("grpc.max_connection_age_ms", int(server.max_connection_age_seconds * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                int(server.max_connection_age_grace_seconds * 1000),
            ),
        ]
    return options


@dataclass(frozen=True)
class _RequestPath:
    """The parts `start()` builds for the request path (broker.service) before listening."""

    authenticator: Authenticator
    policy: PolicyStore | FixedPolicy
    upstream: UpstreamClient
    cache: TokenCache
    limiter: RateLimiter
    audit: AuditLog


@dataclass(frozen=True)
class _Listeners:
    """Where a started server listens."""

    address: str | None = None
    unix_socket: Path | None = None
    # The relay checking unix-socket peers, in front of gRPC's socket (when configured).
    unix_relay: PeerCredentialRelay | None = None
    health_address: str | None = None
    admin: AdminServer | None = None
    # The HTTP door (server.httpListen): Kubernetes-compatible and OAuth token exchange.
    http: HttpDoor | None = None


@dataclass(frozen=True)
class _Running:
    """What a successful `start()` built; `teardown` undoes it, in reverse order."""

    server: aio.Server
    parts: _RequestPath
    listeners: _Listeners
    prober: KubernetesProber
    reloading: tuple[ReloadingFiles[Any], ...]
    teardown: contextlib.AsyncExitStack
    request_path: RequestPath


class BrokerServer:
    """The broker's gRPC server. `start()`, then `stop()` (or use `async with`).

    An upstream passed in belongs to the caller; one created by `start()` is closed by `stop()`.
    `clock` (monotonic seconds) drives readiness's "unreachable for how long" and the token
    cache's freshness (tests).
    `reuse_port`: bind the TCP listeners with SO_REUSEPORT, shared with the other workers of
    `serve --workers N` (broker.workers); off otherwise, so a busy port fails the start.

    Startup and teardown are one sequence: `start()` builds each part in order on an
    `AsyncExitStack`, pushing its cleanup right after it exists, so a failure at any step
    unwinds exactly what was built, in reverse; `stop()` first stops gRPC gracefully (the
    calls in flight finish), then closes the same stack. The order of construction is
    therefore the order guarantees of teardown, reversed: the servicer (its last audit
    lines) closes before the audit log, the token cache (its background refreshes) before
    the upstream client, the listeners before the parts that serve them.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        upstream: UpstreamClient | None = None,
        clock: Clock | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self._reuse_port = reuse_port
        self._given_upstream = upstream
        self.metrics = BrokerMetrics(settings.metrics)
        self._clock = clock
        self.readiness = Readiness(
            unreachable_after_seconds=settings.readiness.unreachable_after_seconds,
            **({"clock": clock} if clock is not None else {}),
        )
        # The gRPC health statuses of every listener; they follow readiness.
        self._health: Any = health_aio.HealthServicer()  # (the stubs lack the aio module)
        self.readiness.add_listener(self._readiness_changed)
        self.metrics.watch_readiness(lambda: self.readiness.state().ready)
        self.metrics.watch_kubernetes_api(self.readiness.last_success_timestamp)
        self._running: _Running | None = None
        self._stopping = False

    def _started(self) -> _Running:
        if self._running is None:
            raise RuntimeError("server not started")
        return self._running

    @property
    def _listeners(self) -> _Listeners:
        return self._running.listeners if self._running is not None else _Listeners()

    @property
    def address(self) -> str:
        """host:port of the TCP listener, with the real port when 0 was asked for."""
        address = self._listeners.address
        if address is None:
            raise RuntimeError("no TCP listener (not started, or server.listen is unset)")
        return address

    @property
    def health_address(self) -> str | None:
        """host:port of the plaintext health-only listener, if configured."""
        return self._listeners.health_address

    @property
    def unix_socket(self) -> Path | None:
        return self._listeners.unix_socket

    @property
    def admin_address(self) -> str | None:
        """host:port of the admin HTTP listener (/metrics, /healthz, /readyz), if enabled."""
        admin = self._listeners.admin
        return admin.address if admin is not None else None

    @property
    def http_address(self) -> str | None:
        """host:port of the HTTP door (server.httpListen), if enabled."""
        http = self._listeners.http
        return http.address if http is not None else None

    @property
    def http_url(self) -> str | None:
        """https://host:port (http:// in plaintext dev mode) of the HTTP door, if enabled."""
        http = self._listeners.http
        return http.url if http is not None else None

    @property
    def admin_url(self) -> str | None:
        admin = self._listeners.admin
        return admin.url if admin is not None else None

    @property
    def prober(self) -> KubernetesProber:
        return self._started().prober

    @property
    def request_path(self) -> RequestPath:
        """CreateToken's request path (broker.request_path), which the transports share."""
        return self._started().request_path

    @property
    def limiter(self) -> RateLimiter:
        return self._started().parts.limiter

    @property
    def cache(self) -> TokenCache:
        return self._started().parts.cache

    @property
    def policy(self) -> PolicyStore | FixedPolicy:
        return self._started().parts.policy

    @property
    def reloading_files(self) -> list[ReloadingFiles[Any]]:
        """The files followed while serving: polled, and re-read at once on SIGHUP."""
        return list(self._running.reloading) if self._running is not None else []

    def reopen_audit_log(self) -> None:
        """Reopen the audit file (SIGHUP: after a rotation); the outcome is logged."""
        if self._running is not None and not self._stopping:
            self._running.parts.audit.reopen()

    @property
    def upstream(self) -> UpstreamClient:
        if self._running is None and self._given_upstream is not None:
            return self._given_upstream
        return self._started().parts.upstream

    async def start(self) -> None:
        """Check the settings, bind the listeners and start serving. Raises ConfigError."""
        if self._running is not None:
            raise RuntimeError("server already started")
        cfg = self.settings.server
        check_transport_security(self.settings)
        certificates = await ServerCertificates(cfg.tls).open() if cfg.tls is not None else None
        # The HTTP door's own certificate (server.httpTls), else gRPC's.
        http_certificates = (
            await ServerCertificates(cfg.http_tls).open()
            if cfg.http_tls is not None and cfg.http_listen is not None
            else certificates
        )
        if cfg.unix_socket is not None:
            await remove_stale_socket(cfg.unix_socket)
        # On failure (or cancellation) the stack unwinds what was built; on success its
        # callbacks move to the running server's teardown (pop_all).
        async with contextlib.AsyncExitStack() as stack:
            parts = await self._open_parts(stack)
            servicer = self._servicer(parts)
            stack.push_async_callback(servicer.close)  # its last audit lines
            # No interceptor: grpc.aio would run its chain on every call before finding the
            # handler. CreateToken observes itself; the other services' handlers are wrapped
            # once, as they are registered.
            server = aio.server(options=channel_options(self.settings, reuse_port=self._reuse_port))
            observed = ObservedServer(server, self._observer())
            # Stopped before the parts behind it close (after `stop()`'s graceful stop, a
            # no-op); a start failing later also frees the ports it bound.
            stack.push_async_callback(server.stop, None)
            add_token_broker_service(servicer, server)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, observed)
            # The first probe sets the health statuses: SERVING once the API server answered.
            prober = KubernetesProber(
                parts.upstream,
                self.readiness,
                interval_seconds=self.settings.readiness.probe_interval_seconds,
                timeout_seconds=min(
                    self.settings.readiness.probe_interval_seconds,
                    self.settings.kubernetes.request_timeout_seconds,
                ),
            )
            await prober.check()
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                ReflectionServicer([SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME]),
                observed,
            )
            listeners = await self._listen(
                stack, server, certificates, http_certificates, servicer.path
            )
            reloading: tuple[ReloadingFiles[Any], ...] = (
                *([parts.policy] if isinstance(parts.policy, PolicyStore) else []),
                *([certificates.files] if certificates is not None else []),
                *(
                    [http_certificates.files]
                    if http_certificates is not None and http_certificates is not certificates
                    else []
                ),
                *parts.authenticator.reloading_files(),
            )
            for files in reloading:
                _run_until_teardown(stack, files.run(), f"reload {files.what}")
            self.metrics.watch_files(
                lambda: reloading,
                (lambda: certificates.material.not_after) if certificates is not None else None,
            )
            _run_until_teardown(stack, prober.run(), "readiness-probe")
            self._running = _Running(
                server=server,
                parts=parts,
                listeners=listeners,
                prober=prober,
                reloading=reloading,
                teardown=stack.pop_all(),
                request_path=servicer.path,
            )
        state = self.readiness.state()
        if not state.ready:
            logger.warning("not ready yet: %s", state.reason)
        logger.info(
            "token broker serving",
            extra={
                "listen": listeners.address,
                "health_listen": listeners.health_address,
                "admin_listen": self.admin_address,
                "http_listen": listeners.http.address if listeners.http is not None else None,
                "ready": state.ready,
                "unix_socket": str(listeners.unix_socket) if listeners.unix_socket else None,
                "tls": _tls_mode(certificates.material if certificates is not None else None),
            },
        )

    async def _open_parts(self, stack: contextlib.AsyncExitStack) -> _RequestPath:
        """The request path's parts, each closed by `stack`. Each part checks its own
        settings; any failure stops the start (ConfigError)."""
        settings = self.settings
        authenticator = Authenticator.from_settings(settings.authentication, settings.server)
        stack.push_async_callback(authenticator.close)
        await authenticator.start()
        policy = await open_policy(settings.policy)
        audit = await AuditLog.from_settings(settings.audit)
        stack.push_async_callback(audit.close)
        upstream = self._given_upstream
        if upstream is None:
            upstream = await UpstreamClient.from_settings(settings.kubernetes)
            stack.push_async_callback(upstream.close)
        self.metrics.watch_audit(audit)
        self.readiness.watch_audit(audit)
        cache = TokenCache(
            settings.cache,
            fetch_timeout=settings.kubernetes.request_timeout_seconds,
            **({"clock": self._clock} if self._clock is not None else {}),
        )
        # Background refreshes end before the upstream client closes under them.
        stack.push_async_callback(cache.close)
        cache.start()
        limiter = RateLimiter.from_settings(settings.rate_limit)
        stack.push_async_callback(limiter.close)
        limiter.add_observer(self.metrics)
        self.metrics.watch_rate_limiter(limiter)
        self.metrics.watch_cache(lambda: cache.stats)
        self.readiness.policy_loaded()
        for observer in (self.metrics, self.readiness):
            upstream.add_observer(observer)
            stack.callback(upstream.remove_observer, observer)
        return _RequestPath(
            authenticator=authenticator,
            policy=policy,
            upstream=upstream,
            cache=cache,
            limiter=limiter,
            audit=audit,
        )

    def _observer(self) -> CallObserver:
        return CallObserver(
            self.metrics, receive_timeout_seconds=self.settings.server.receive_timeout_seconds
        )

    def _servicer(self, parts: _RequestPath) -> TokenBrokerServicer:
        cfg = self.settings.server
        rate_limit = self.settings.rate_limit
        guard = UpstreamGuard.from_settings(rate_limit.upstream)
        guard.add_observer(self.metrics)
        path = RequestPath(
            authenticator=parts.authenticator,
            policy=parts.policy,
            upstream=parts.upstream,
            audit=parts.audit,
            cache=parts.cache,
            limiter=parts.limiter,
            guard=guard,
            metrics=self.metrics,
            throttle=AuthFailureThrottle(rate_limit.auth_failures_per_peer),
            receive_timeout_seconds=cfg.receive_timeout_seconds,
            default_deadline_seconds=cfg.default_deadline_seconds,
            max_pending_calls=cfg.max_pending_calls,
        )
        return TokenBrokerServicer(path)

    async def _listen(
        self,
        stack: contextlib.AsyncExitStack,
        server: aio.Server,
        certificates: ServerCertificates | None,
        http_certificates: ServerCertificates | None,
        path: RequestPath,
    ) -> _Listeners:
        """Bind the gRPC listeners and start serving, then the HTTP door, the health and admin
        listeners; each is closed by `stack`."""
        cfg = self.settings.server
        address = None
        if cfg.listen is not None:
            host, _ = split_host_port(cfg.listen)
            creds = certificates.credentials() if certificates is not None else None
            port = _bind(server, cfg.listen, creds, "server.listen")
            address = f"{host}:{port}"
        relay = None
        if cfg.unix_socket is not None:
            relay = await self._listen_on_unix_socket(
                stack, server, cfg.unix_socket, cfg.unix_socket_mode
            )
        await server.start()
        http = None
        if cfg.http_listen is not None:
            http = HttpDoor(
                cfg.http_listen, path, certificates=http_certificates, reuse_port=self._reuse_port
            )
            await http.start()
            # After `stop()`'s graceful stop of it, a no-op.
            stack.push_async_callback(http.stop, None)
        health_address = None
        if cfg.health_listen is not None:
            health_address = await self._start_health_server(stack, cfg.health_listen)
        admin = None
        if self.settings.admin.listen is not None:
            admin = AdminServer(
                self.settings.admin.listen,
                registry=self.metrics.registry,
                readiness=self.readiness,
            )
            await admin.start()
            stack.push_async_callback(admin.stop)
        return _Listeners(
            address=address,
            unix_socket=cfg.unix_socket,
            unix_relay=relay,
            health_address=health_address,
            admin=admin,
            http=http,
        )

    async def _listen_on_unix_socket(
        self, stack: contextlib.AsyncExitStack, server: aio.Server, path: Path, mode: int
    ) -> PeerCredentialRelay | None:
        """Plaintext: who may connect is decided by the file mode (and, when configured, by
        the peer's uid/gid). Never reachable with a looser mode: see broker.unix_socket.
        Closed after gRPC's server stopped: the relay, the published socket, the private
        directory."""
        private = await PrivateSocketDirectory.create(path)
        stack.push_async_callback(private.remove)
        _bind(server, f"unix:{private.path('grpc')}", None, "server.unixSocket")
        peers = self.settings.authentication.unix_socket
        relay = None
        if peers.checks_peers:
            relay = PeerCredentialRelay(
                private.path("grpc"), uids=peers.allowed_uids, gids=peers.allowed_gids
            )
            await relay.start(private, "relay", mode)
        else:
            await private.publish("grpc", mode)
            await private.remove()
        stack.push_async_callback(asyncio.to_thread, path.unlink, missing_ok=True)
        if relay is not None:
            stack.push_async_callback(relay.close)
        return relay

    async def _readiness_changed(self, state: ReadyState) -> None:
        """The gRPC health statuses follow readiness (both "" and the service)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if state.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _start_health_server(self, stack: contextlib.AsyncExitStack, listen: str) -> str:
        """The plaintext health-only listener; its host:port."""
        # Same HealthServicer: probes see exactly what gRPC clients see, NOT_SERVING included.
        cfg = self.settings.server
        health_server = aio.server(
            options=[
                ("grpc.so_reuseport", int(self._reuse_port)),
                ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(
            self._health, ObservedServer(health_server, self._observer())
        )
        # Stopped once the main server is done (`stop()` stops that one first), so probes
        # see NOT_SERVING all along.
        stack.push_async_callback(health_server.stop, None)
        port = _bind(health_server, listen, None, "server.healthListen")
        await health_server.start()
        return f"{split_host_port(listen)[0]}:{port}"

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new calls, let in-flight ones finish
        within `grace` seconds (None: cancel them now), then close what `start()` built, in
        reverse order (the upstream last)."""
        running = self._running
        if running is None or self._stopping:
            return
        self._stopping = True
        logger.info("shutting down", extra={"grace_seconds": grace})
        await self.leave_rotation()
        if running.listeners.unix_relay is not None:
            await running.listeners.unix_relay.stop_accepting()
        # Both doors stop accepting at once; their calls in flight finish within `grace`.
        stops = [running.server.stop(grace)]
        if running.listeners.http is not None:
            stops.append(running.listeners.http.stop(grace))
        await asyncio.gather(*stops)
        # After the last call has finished: every call's audit line is written.
        await running.teardown.aclose()
        logger.info("stopped")

    async def leave_rotation(self) -> None:
        """Not ready from now on: probes and load balancers see NOT_SERVING (and /readyz
        503), while calls are still served. The first step of a stop."""
        self.readiness.shutting_down()
        await self._health.enter_graceful_shutdown()

    async def stop_now(self) -> None:
        """Cancel in-flight calls of a stop in progress (a second SIGTERM/SIGINT)."""
        if self._running is not None:
            if self._running.listeners.http is not None:
                await self._running.listeners.http.stop(None)
            await self._running.server.stop(None)

    async def wait_for_termination(self) -> None:
        await self._started().server.wait_for_termination()

    async def __aenter__(self) -> BrokerServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop(self.settings.server.shutdown_grace_seconds)


def _run_until_teardown(
    stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], name: str
) -> None:
    """Run `work` as a background task, cancelled (and awaited) when `stack` closes."""
    task = asyncio.create_task(work, name=name)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(cancel)


def _tls_mode(tls: ServerTLSMaterial | None) -> str:
    if tls is None:
        return "off"
    if tls.client_ca is None:
        return "on"
    return "mutual" if tls.require_client_auth else "optional client certificates"


def _bind(server: aio.Server, address: str, creds: Any, key: str) -> int:
    unix = address.startswith("unix:")
    try:
        if creds is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        if unix:
            raise ConfigError(f"{key}: cannot listen on {address}: {exc}") from None
        port = 0
    if port == 0 and not unix:
        # gRPC says only that it failed: the OS's reason, and how to choose another address.
        raise listen_error(key, address, reason_not_bound(address))
    return port


async def run_server(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; the exit status.

    Raises ConfigError when the server cannot start (bad TLS files, busy port, ...).
    """
    server = BrokerServer(settings)
    with signals_while_starting() as started:
        await server.start()
        await serve_until_signal(server, started)
    return 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartSignals:
    """The signals that came while a server started (`signals_while_starting`)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()  # SIGTERM/SIGINT: stop as soon as serving
        self.reload = False  # SIGHUP: re-read the followed files as soon as serving


@contextlib.contextmanager
def signals_while_starting() -> Iterator[StartSignals]:
    """SIGTERM/SIGINT/SIGHUP handlers for a server's start: a signal then is remembered (pass
    the result to `serve_until_signal`, which acts on it), not fatal. Without them a signal in
    the instant between the listeners opening and `serve_until_signal` would kill the process
    with the calls it had already accepted (SIGHUP's default action terminates too)."""
    loop = asyncio.get_running_loop()
    started = StartSignals()

    def on_sighup() -> None:
        started.reload = True

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, started.stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        yield started
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def serve_until_signal(server: BrokerServer, started: StartSignals | None = None) -> None:
    """Wait for SIGTERM/SIGINT (or the server ending), then stop: not ready at once, serving
    on for `server.shutdownDelaySeconds`, then the graceful stop with `shutdownGraceSeconds`.

    A second signal, during the delay or the grace period, cancels the calls in flight and
    stops at once. `started`: from `signals_while_starting`; a stop signal came while the
    server started: it stops without the delay; a SIGHUP: the files are re-read at once.
    """
    loop = asyncio.get_running_loop()
    if started is None:
        started = StartSignals()
    stop_requested = started.stop
    signalled_while_starting = stop_requested.is_set()
    background: set[asyncio.Task[None]] = set()

    def on_signal(sig: signal.Signals) -> None:
        if stop_requested.is_set():
            logger.warning("second %s: cancelling in-flight calls", sig.name)
            task = loop.create_task(server.stop_now())
            background.add(task)
            task.add_done_callback(background.discard)
            return
        logger.info("received %s", sig.name)
        stop_requested.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    # SIGHUP re-reads the followed files at once (they are also polled), and reopens the audit
    # file.
    remove_sighup = reload_on_sighup(
        loop, server.reloading_files, pending=started.reload, reopen=(server.reopen_audit_log,)
    )
    terminated = asyncio.ensure_future(server.wait_for_termination())
    requested = asyncio.ensure_future(stop_requested.wait())
    try:
        await asyncio.wait({terminated, requested}, return_when=asyncio.FIRST_COMPLETED)
        delay = server.settings.server.shutdown_delay_seconds
        if requested.done() and delay > 0 and not signalled_while_starting:
            await server.leave_rotation()
            logger.info(
                "not ready; serving on for %gs before closing the listeners",
                delay,
                extra={"delay_seconds": delay},
            )
            # A second signal stops the server (stop_now), which ends the wait early.
            await asyncio.wait({terminated}, timeout=delay)
        await server.stop(server.settings.server.shutdown_grace_seconds)
    finally:
        requested.cancel()
        terminated.cancel()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        remove_sighup()
