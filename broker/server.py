"""The gRPC server: listeners, TLS, health, reflection and graceful shutdown. Wiring only.

The request path lives in `broker.service`; this module builds its parts from the settings
(authenticator, policy source, upstream client, audit log), binds it to TCP and/or a unix
socket next to the standard `grpc.health.v1.Health` and server reflection services, and
owns the parts' lifecycles. Around them: the metrics (`broker.metrics`, fed by the
`broker.observe` interceptor on every gRPC server), readiness (`broker.readiness`: the gRPC
health statuses follow it) and the admin HTTP listener (`broker.admin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from grpc import aio
from grpc_health.v1 import _async as health_aio  # the asyncio HealthServicer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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
from broker.metrics import BrokerMetrics
from broker.observe import CallObserver
from broker.policy_reload import FixedPolicy, PolicyStore, open_policy
from broker.ratelimit import RateLimiter
from broker.readiness import Clock, KubernetesProber, Readiness, ReadyState
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


class BrokerServer:
    """The broker's gRPC server. `start()`, then `stop()` (or use `async with`).

    An upstream passed in belongs to the caller; one created by `start()` is closed by `stop()`.
    `clock` (monotonic seconds) drives readiness's "unreachable for how long" (tests).
    `reuse_port`: bind the TCP listeners with SO_REUSEPORT, shared with the other workers of
    `serve --workers N` (broker.workers); off otherwise, so a busy port fails the start.
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
        self._upstream = upstream
        self._owns_upstream = upstream is None
        self.metrics = BrokerMetrics(settings.metrics)
        self.readiness = Readiness(
            unreachable_after_seconds=settings.readiness.unreachable_after_seconds,
            **({"clock": clock} if clock is not None else {}),
        )
        self.readiness.add_listener(self._readiness_changed)
        self.metrics.watch_readiness(lambda: self.readiness.state().ready)
        self.metrics.watch_kubernetes_api(self.readiness.last_success_timestamp)
        self._prober: KubernetesProber | None = None
        self._prober_task: asyncio.Task[None] | None = None
        self._admin: AdminServer | None = None
        self._server: aio.Server | None = None
        self._health: Any = None  # health_aio.HealthServicer (the stubs lack the aio module)
        self._address: str | None = None
        self._health_server: aio.Server | None = None
        self._health_address: str | None = None
        self._unix_socket: Path | None = None
        # Where gRPC's unix socket is bound, and the relay checking peers in front of it.
        self._unix_private: PrivateSocketDirectory | None = None
        self._unix_relay: PeerCredentialRelay | None = None
        self._stopped = False
        self._authenticator: Authenticator | None = None
        self._policy: PolicyStore | FixedPolicy | None = None
        # The files followed while serving (policy, TLS, API keys, JWKS), and their pollers.
        self._reloading: list[ReloadingFiles[Any]] = []
        self._reload_tasks: list[asyncio.Task[None]] = []
        self._audit: AuditLog | None = None
        self._cache: TokenCache | None = None
        self._limiter: RateLimiter | None = None
        self._servicer: TokenBrokerServicer | None = None

    @property
    def address(self) -> str:
        """host:port of the TCP listener, with the real port when 0 was asked for."""
        if self._address is None:
            raise RuntimeError("no TCP listener (not started, or server.listen is unset)")
        return self._address

    @property
    def health_address(self) -> str | None:
        """host:port of the plaintext health-only listener, if configured."""
        return self._health_address

    @property
    def unix_socket(self) -> Path | None:
        return self._unix_socket

    @property
    def admin_address(self) -> str | None:
        """host:port of the admin HTTP listener (/metrics, /healthz, /readyz), if enabled."""
        return self._admin.address if self._admin is not None else None

    @property
    def admin_url(self) -> str | None:
        return self._admin.url if self._admin is not None else None

    @property
    def prober(self) -> KubernetesProber:
        if self._prober is None:
            raise RuntimeError("server not started")
        return self._prober

    @property
    def limiter(self) -> RateLimiter:
        if self._limiter is None:
            raise RuntimeError("server not started")
        return self._limiter

    @property
    def cache(self) -> TokenCache:
        if self._cache is None:
            raise RuntimeError("server not started")
        return self._cache

    @property
    def policy(self) -> PolicyStore | FixedPolicy:
        if self._policy is None:
            raise RuntimeError("server not started")
        return self._policy

    @property
    def reloading_files(self) -> list[ReloadingFiles[Any]]:
        """The files followed while serving: polled, and re-read at once on SIGHUP."""
        return list(self._reloading)

    def reopen_audit_log(self) -> None:
        """Reopen the audit file (SIGHUP: after a rotation); the outcome is logged."""
        if self._audit is not None:
            self._audit.reopen()

    @property
    def upstream(self) -> UpstreamClient:
        if self._upstream is None:
            raise RuntimeError("server not started")
        return self._upstream

    async def start(self) -> None:
        """Check the settings, bind the listeners and start serving. Raises ConfigError."""
        if self._server is not None:
            raise RuntimeError("server already started")
        cfg = self.settings.server
        check_transport_security(self.settings)
        certificates = await ServerCertificates(cfg.tls).open() if cfg.tls is not None else None
        if cfg.unix_socket is not None:
            await remove_stale_socket(cfg.unix_socket)
        server = aio.server(
            options=channel_options(self.settings, reuse_port=self._reuse_port),
            interceptors=[
                CallObserver(self.metrics, receive_timeout_seconds=cfg.receive_timeout_seconds)
            ],
        )
        try:
            # Each part checks its own settings; any failure stops the start (ConfigError).
            self._authenticator = Authenticator.from_settings(
                self.settings.authentication, self.settings.server
            )
            await self._authenticator.start()
            self._policy = await open_policy(self.settings.policy)
            self._audit = await AuditLog.from_settings(self.settings.audit)
            if self._upstream is None:
                self._upstream = await UpstreamClient.from_settings(self.settings.kubernetes)
            self.metrics.watch_audit(self._audit)
            self.readiness.watch_audit(self._audit)
            self._cache = TokenCache(
                self.settings.cache,
                fetch_timeout=self.settings.kubernetes.request_timeout_seconds,
            )
            self._cache.start()
            self._limiter = RateLimiter.from_settings(self.settings.rate_limit)
            self._limiter.add_observer(self.metrics)
            self.metrics.watch_rate_limiter(self._limiter)
            guard = UpstreamGuard.from_settings(self.settings.rate_limit.upstream)
            guard.add_observer(self.metrics)
            cache = self._cache
            self.metrics.watch_cache(lambda: cache.stats)
            self.readiness.policy_loaded()
            self._upstream.add_observer(self.metrics)
            self._upstream.add_observer(self.readiness)
            self._servicer = TokenBrokerServicer(
                authenticator=self._authenticator,
                policy=self._policy,
                upstream=self._upstream,
                audit=self._audit,
                cache=self._cache,
                limiter=self._limiter,
                guard=guard,
                metrics=self.metrics,
                throttle=AuthFailureThrottle(self.settings.rate_limit.auth_failures_per_peer),
                receive_timeout_seconds=cfg.receive_timeout_seconds,
                default_deadline_seconds=cfg.default_deadline_seconds,
                max_pending_calls=cfg.max_pending_calls,
            )
            add_token_broker_service(self._servicer, server)
            self.metrics.grpc_method("unary", SERVICE_NAME, "CreateToken")
            self._health = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            # The first probe sets the health statuses: SERVING once the API server answered.
            self._prober = KubernetesProber(
                self._upstream,
                self.readiness,
                interval_seconds=self.settings.readiness.probe_interval_seconds,
                timeout_seconds=min(
                    self.settings.readiness.probe_interval_seconds,
                    self.settings.kubernetes.request_timeout_seconds,
                ),
            )
            await self._prober.check()
            reflection.enable_server_reflection(
                [SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
            )
            if cfg.listen is not None:
                host, _ = split_host_port(cfg.listen)
                creds = certificates.credentials() if certificates is not None else None
                port = _bind(server, cfg.listen, creds, "server.listen")
                self._address = f"{host}:{port}"
            if cfg.unix_socket is not None:
                await self._listen_on_unix_socket(server, cfg.unix_socket, cfg.unix_socket_mode)
            await server.start()
            if cfg.health_listen is not None:
                await self._start_health_server(cfg.health_listen)
            if self.settings.admin.listen is not None:
                self._admin = AdminServer(
                    self.settings.admin.listen,
                    registry=self.metrics.registry,
                    readiness=self.readiness,
                )
                await self._admin.start()
        except BaseException:
            await server.stop(None)
            if self._health_server is not None:
                await self._health_server.stop(None)
                self._health_server = None
            if self._admin is not None:
                await self._admin.stop()
                self._admin = None
            await self._close_unix_socket()
            await self._close_parts()
            raise
        self._server = server
        self._reloading = [
            *([self._policy] if isinstance(self._policy, PolicyStore) else []),
            *([certificates.files] if certificates is not None else []),
            *self._authenticator.reloading_files(),
        ]
        self._reload_tasks = [
            asyncio.create_task(files.run(), name=f"reload {files.what}")
            for files in self._reloading
        ]
        self.metrics.watch_files(
            lambda: self._reloading,
            (lambda: certificates.material.not_after) if certificates is not None else None,
        )
        self._prober_task = asyncio.create_task(self._prober.run(), name="readiness-probe")
        state = self.readiness.state()
        if not state.ready:
            logger.warning("not ready yet: %s", state.reason)
        logger.info(
            "token broker serving",
            extra={
                "listen": self._address,
                "health_listen": self._health_address,
                "admin_listen": self.admin_address,
                "ready": state.ready,
                "unix_socket": str(self._unix_socket) if self._unix_socket else None,
                "tls": _tls_mode(certificates.material if certificates is not None else None),
            },
        )

    async def _listen_on_unix_socket(self, server: aio.Server, path: Path, mode: int) -> None:
        """Plaintext: who may connect is decided by the file mode (and, when configured, by
        the peer's uid/gid). Never reachable with a looser mode: see broker.unix_socket."""
        self._unix_private = private = await PrivateSocketDirectory.create(path)
        _bind(server, f"unix:{private.path('grpc')}", None, "server.unixSocket")
        peers = self.settings.authentication.unix_socket
        if peers.checks_peers:
            relay = PeerCredentialRelay(
                private.path("grpc"), uids=peers.allowed_uids, gids=peers.allowed_gids
            )
            self._unix_relay = relay
            await relay.start(private, "relay", mode)
        else:
            await private.publish("grpc", mode)
            await private.remove()
            self._unix_private = None
        self._unix_socket = path

    async def _close_unix_socket(self) -> None:
        """After gRPC's server stopped: the relay, the published socket, the private directory."""
        if self._unix_relay is not None:
            await self._unix_relay.close()
            self._unix_relay = None
        if self._unix_socket is not None:
            await asyncio.to_thread(self._unix_socket.unlink, missing_ok=True)
            self._unix_socket = None
        if self._unix_private is not None:
            await self._unix_private.remove()
            self._unix_private = None

    async def _readiness_changed(self, state: ReadyState) -> None:
        """The gRPC health statuses follow readiness (both "" and the service)."""
        if self._health is None:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if state.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _start_health_server(self, listen: str) -> None:
        # Same HealthServicer: probes see exactly what gRPC clients see, NOT_SERVING included.
        # Its own observer: wrapped handlers are cached per server (never serve a method
        # of the main server here).
        cfg = self.settings.server
        health_server = aio.server(
            options=[
                ("grpc.so_reuseport", int(self._reuse_port)),
                ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
            ],
            interceptors=[
                CallObserver(self.metrics, receive_timeout_seconds=cfg.receive_timeout_seconds)
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, health_server)
        self._health_server = health_server
        port = _bind(health_server, listen, None, "server.healthListen")
        self._health_address = f"{split_host_port(listen)[0]}:{port}"
        await health_server.start()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new calls, let in-flight ones finish
        within `grace` seconds (None: cancel them now), then close the upstream."""
        if self._server is None or self._stopped:
            return
        self._stopped = True
        logger.info("shutting down", extra={"grace_seconds": grace})
        await self.leave_rotation()
        if self._unix_relay is not None:
            await self._unix_relay.stop_accepting()
        await self._server.stop(grace)
        if self._health_server is not None:
            # Up until the main server is done, so probes saw NOT_SERVING all along.
            await self._health_server.stop(None)
        if self._admin is not None:
            await self._admin.stop()
        await self._close_parts()
        await self._close_unix_socket()
        logger.info("stopped")

    async def leave_rotation(self) -> None:
        """Not ready from now on: probes and load balancers see NOT_SERVING (and /readyz
        503), while calls are still served. The first step of a stop."""
        self.readiness.shutting_down()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()

    async def _close_parts(self) -> None:
        # After the last call has finished: every call's audit line is written.
        if self._prober_task is not None:
            self._prober_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober_task
            self._prober_task = None
        if self._upstream is not None:
            self._upstream.remove_observer(self.metrics)
            self._upstream.remove_observer(self.readiness)
        for task in self._reload_tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._reload_tasks = []
        if self._cache is not None:
            # Background refreshes end before the upstream client closes under them.
            await self._cache.close()
            self._cache = None
        if self._limiter is not None:
            await self._limiter.close()
            self._limiter = None
        if self._servicer is not None:
            await self._servicer.close()  # its last audit lines
            self._servicer = None
        if self._audit is not None:
            await self._audit.close()
            self._audit = None
        if self._authenticator is not None:
            await self._authenticator.close()
            self._authenticator = None
        if self._owns_upstream and self._upstream is not None:
            await self._upstream.close()
            self._upstream = None

    async def stop_now(self) -> None:
        """Cancel in-flight calls of a stop in progress (a second SIGTERM/SIGINT)."""
        if self._server is not None:
            await self._server.stop(None)

    async def wait_for_termination(self) -> None:
        if self._server is None:
            raise RuntimeError("server not started")
        await self._server.wait_for_termination()

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


def _tls_mode(tls: ServerTLSMaterial | None) -> str:
    if tls is None:
        return "off"
    if tls.client_ca is None:
        return "on"
    return "mutual" if tls.require_client_auth else "optional client certificates"


def _bind(server: aio.Server, address: str, creds: Any, key: str) -> int:
    try:
        if creds is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise ConfigError(f"{key}: cannot listen on {address}: {exc}") from None
    if port == 0 and not address.startswith("unix:"):
        raise ConfigError(f"{key}: cannot listen on {address} (in use?)")
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
