"""Listen addresses that cannot be bound: why (the OS's reason), and the error that names the
setting, its `serve` flag and its variable, so a second broker on a busy port says how to
choose another one.

`serve` is strict: a busy port stops it (exit 2). Dev mode (broker.devmode) asks
`bind_error` first and moves a *default* address that is busy to a free port instead.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from aiohttp import web

from broker.config import ConfigError, env_var_name, split_host_port

# The `token-broker serve` flag of each listener's key.
LISTEN_FLAGS = {
    "server.listen": "--listen",
    "server.healthListen": "--health-listen",
    "admin.listen": "--admin-listen",
    "server.httpListen": "--http-listen",
}


def bind_error(listen: str) -> OSError | None:
    """Why `host:port` cannot be bound now (None: it can). Binds with SO_REUSEADDR and
    without SO_REUSEPORT, as the broker's listeners do, so a port held by a listening socket
    is busy and one in TIME_WAIT is not. A quick, blocking probe: for start-up only."""
    host, port = split_host_port(listen)
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, socktype, proto, _, address = infos[0]
        with socket.socket(family, socktype, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        return exc
    return None


def bind_listener(
    listen: str, key: str, *, reuse_port: bool = False, backlog: int = 128
) -> socket.socket:
    """A listening, non-blocking TCP socket on `listen` (host:port) for an aiohttp listener
    (the admin listener, the HTTP door); ConfigError naming `key` when it cannot be bound.
    SO_REUSEADDR (restart over TIME_WAIT); SO_REUSEPORT only when asked (`serve --workers N`
    shares the port): otherwise a busy port fails."""
    host, port = split_host_port(listen, key)
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ConfigError(f"{key}: cannot listen on {listen}: {exc}") from None
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise listen_error(key, listen, exc.strerror or str(exc)) from None
    return sock


def listen_error(key: str, listen: str, reason: str) -> ConfigError:
    """`admin.listen: cannot listen on 127.0.0.1:8082 (Address already in use); choose another
    address with --admin-listen or TOKEN_BROKER_ADMIN__LISTEN`."""
    message = f"{key}: cannot listen on {listen} ({reason})"
    flag = LISTEN_FLAGS.get(key)
    if flag is not None:
        message += f"; choose another address with {flag} or {env_var_name(tuple(key.split('.')))}"
    return ConfigError(message)


def reason_not_bound(listen: str) -> str:
    """The OS's reason `listen` cannot be bound, for an error message (gRPC's own says only
    that it failed)."""
    error = bind_error(listen)
    if error is None:
        return "the port could not be bound"
    return error.strerror or str(error)


async def serve_app(
    app: web.Application,
    listen: str,
    key: str,
    *,
    reuse_port: bool = False,
    backlog: int = 128,
    ssl_context: ssl.SSLContext | None = None,
    **runner_options: Any,
) -> tuple[web.AppRunner, str]:
    """Serve `app` on a socket bound by bind_listener: its runner (`cleanup()` stops it) and
    host:port with the real port when 0 was asked for. Nothing is left open on failure."""
    host, _ = split_host_port(listen, key)
    sock = bind_listener(listen, key, reuse_port=reuse_port, backlog=backlog)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **runner_options)
    try:
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return runner, f"{host}:{sock.getsockname()[1]}"
