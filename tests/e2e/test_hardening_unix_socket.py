"""Hardening: the unix socket is never reachable with looser permissions than configured, and
(optionally) only peers with an allowed uid/gid may use it (SO_PEERCRED).

The start-up window of the issue: gRPC binds (and listens on) a unix socket in
`add_insecure_port`, with the umask's mode, before the broker could chmod it. These tests look
at the filesystem at the exact moments that matter, deterministically: a spy around gRPC's own
`add_insecure_port` (right after the real bind) and around `os.link` (the publication), with
umask 000. "Another user" is real: a forked child drops to uid/gid 65534 and connects.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from broker.authn import Authenticator
from broker.config import ConfigError, KubernetesSettings, Settings, load_settings
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.server import BrokerServer
from tests.support.stack import LOCAL_CALLER, broker_settings, create_request

NOBODY = 65534
# The client connection preface of HTTP/2 and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
H2_SETTINGS = 4

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short (unix socket paths are limited to 107 bytes); others may traverse it, so only the
    # socket's own mode (and the private directory's) decides.
    with tempfile.TemporaryDirectory(prefix="tb-") as directory:
        os.chmod(directory, 0o755)
        yield Path(directory)


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def as_user(uid: int, action: Callable[[], bytes]) -> bytes:
    """Run `action` in a forked child that dropped to uid/gid `uid`; what it returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = action()
        except BaseException as exc:
            result = f"child failed: {exc!r}".encode()
        try:
            os.write(write_end, result)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return b"".join(chunks)


def connect_errno(path: Path) -> Callable[[], bytes]:
    """An action: connect to `path`; b"0" when connected, else the errno's name."""

    def connect() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(path))
            except OSError as exc:
                return errno.errorcode.get(exc.errno or 0, "?").encode()
            return b"0"

    return connect


def first_frame(path: Path) -> Callable[[], bytes]:
    """An action: connect, send the HTTP/2 preface, and return the first bytes answered
    (b"" when the connection was closed without an answer)."""

    def speak() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)  # only to stop a hung test
            sock.connect(str(path))
            try:
                sock.sendall(H2_PREFACE)
                return sock.recv(9)
            except (ConnectionResetError, BrokenPipeError):  # closed before or after sending
                return b""
            except OSError as exc:
                return f"error {exc!r}".encode()

    return speak


@dataclass
class Moments:
    """What the filesystem looked like when gRPC had just bound the unix socket, and when
    the socket was published at its final path."""

    final: Path
    binds: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def moments(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], Moments]:
    def watch(final: Path) -> Moments:
        seen = Moments(final)
        real_add = aio._server.Server.add_insecure_port
        real_link = os.link

        def add_insecure_port(self: aio.Server, address: str) -> int:
            port = real_add(self, address)
            if address.startswith("unix:"):
                bound = Path(address.removeprefix("unix:"))
                seen.binds.append(
                    {
                        "bound": bound,
                        "bound mode": stat.S_IMODE(os.lstat(bound).st_mode),
                        "final exists": os.path.lexists(final),
                        "final mode": (
                            stat.S_IMODE(os.lstat(final).st_mode)
                            if os.path.lexists(final)
                            else None
                        ),
                        "directories": [
                            (d, stat.S_IMODE(os.stat(d).st_mode), os.stat(d).st_uid)
                            for d in bound.parents
                            if d != final.parent and final.parent in d.parents
                        ],
                        "others connect to final": (
                            as_user(NOBODY, connect_errno(final)) if os.geteuid() == 0 else None
                        ),
                        "others connect to bound": (
                            as_user(NOBODY, connect_errno(bound)) if os.geteuid() == 0 else None
                        ),
                    }
                )
            return port

        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(dst) == final:
                seen.links.append(
                    {
                        "source mode": stat.S_IMODE(os.lstat(src).st_mode),
                        "final exists": os.path.lexists(final),
                    }
                )
            real_link(src, dst, *args, **kwargs)

        monkeypatch.setattr(aio._server.Server, "add_insecure_port", add_insecure_port)
        monkeypatch.setattr(os, "link", link)
        return seen

    return watch


def unix_settings(kube: KubernetesSettings, path: Path, mode: int, **peers: Any) -> Settings:
    settings = broker_settings(kube, listen=None, unix_socket=path, unix_socket_mode=mode)
    if not peers:
        return settings
    authn = settings.authentication
    unix = authn.unix_socket.model_copy(update=peers)
    return settings.model_copy(
        update={"authentication": authn.model_copy(update={"unix_socket": unix})}
    )


async def create_token(path: Path) -> str:
    """A CreateToken call without credentials over the socket: the identity it got."""
    async with aio.insecure_channel(f"unix:{path}") as channel:
        stub = pb_grpc.TokenBrokerServiceStub(channel)
        await stub.CreateToken(create_request(), timeout=20)
    return LOCAL_CALLER


# --- the start-up window ------------------------------------------------------------------------


@needs_root
@pytest.mark.usefixtures("umask_000")
async def test_socket_never_reachable_with_a_looser_mode_while_starting(
    kubernetes_settings: KubernetesSettings,
    socket_dir: Path,
    moments: Callable[[Path], Moments],
) -> None:
    final = socket_dir / "broker.sock"
    seen = moments(final)
    async with BrokerServer(unix_settings(kubernetes_settings, final, 0o660)):
        # When gRPC bound (and listened): nothing at the final path, so nobody could connect
        # there; the socket itself (mode 0777 under umask 000) sat in a directory of the
        # broker's own, 0700, next to the final path, which other users cannot enter.
        [bind] = seen.binds
        assert bind["final exists"] is False, bind
        assert bind["others connect to final"] == b"ENOENT", bind
        assert bind["others connect to bound"] == b"EACCES", bind
        [(private, private_mode, owner)] = bind["directories"]
        assert private.parent == final.parent
        assert (private_mode, owner) == (0o700, os.geteuid())
        # Published by one atomic link, with its configured mode already set.
        assert seen.links == [{"source mode": 0o660, "final exists": False}]
        mode = os.lstat(final).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        assert sorted(socket_dir.iterdir()) == [final]  # the private directory is gone
        # The socket works, with the socket's identity, and the mode decides who connects.
        assert await create_token(final) == LOCAL_CALLER
        assert as_user(NOBODY, connect_errno(final)) == b"EACCES"
    assert list(socket_dir.iterdir()) == []  # removed on stop


@pytest.mark.usefixtures("umask_000")
async def test_failed_start_leaves_neither_socket_nor_private_directory(
    kubernetes_settings: KubernetesSettings, socket_dir: Path
) -> None:
    final = socket_dir / "broker.sock"
    settings = unix_settings(kubernetes_settings, final, 0o600)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The health listener starts after the unix socket was published: its busy port
        # fails the start then.
        server = settings.server.model_copy(update={"health_listen": f"127.0.0.1:{port}"})
        with pytest.raises(ConfigError, match="healthListen"):
            await BrokerServer(settings.model_copy(update={"server": server})).start()
    assert list(socket_dir.iterdir()) == []


async def test_a_file_that_appears_at_the_path_is_never_replaced(
    kubernetes_settings: KubernetesSettings,
    socket_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    final = socket_dir / "broker.sock"
    real_add = aio._server.Server.add_insecure_port

    def add_insecure_port(self: aio.Server, address: str) -> int:
        port = real_add(self, address)
        if address.startswith("unix:"):
            final.write_text("someone else's")  # between the stale check and publication
        return port

    monkeypatch.setattr(aio._server.Server, "add_insecure_port", add_insecure_port)
    with pytest.raises(ConfigError, match="appeared while the broker was starting"):
        await BrokerServer(unix_settings(kubernetes_settings, final, 0o600)).start()
    assert final.read_text() == "someone else's"
    assert list(socket_dir.iterdir()) == [final]


async def test_a_socket_path_too_long_for_the_private_directory_is_a_config_error(
    kubernetes_settings: KubernetesSettings, socket_dir: Path
) -> None:
    deep = socket_dir / ("d" * (100 - len(str(socket_dir))))
    deep.mkdir()
    final = deep / "s"  # 102 bytes: a valid path, but not with the private directory in it
    with pytest.raises(ConfigError, match=r"server\.unixSocket: .* is too long"):
        async with BrokerServer(unix_settings(kubernetes_settings, final, 0o600)):
            pass
    assert list(deep.iterdir()) == []


async def test_a_missing_directory_is_a_config_error(
    kubernetes_settings: KubernetesSettings, socket_dir: Path
) -> None:
    final = socket_dir / "missing" / "broker.sock"
    with pytest.raises(ConfigError, match=r"server\.unixSocket: cannot listen on .*: No such file"):
        await BrokerServer(unix_settings(kubernetes_settings, final, 0o600)).start()


# --- peer credentials (SO_PEERCRED) -------------------------------------------------------------


@needs_root
@pytest.mark.usefixtures("umask_000")
async def test_peer_uid_gate_closes_other_users_connections(
    kubernetes_settings: KubernetesSettings,
    socket_dir: Path,
    moments: Callable[[Path], Moments],
) -> None:
    final = socket_dir / "broker.sock"
    seen = moments(final)
    # A mode that lets everyone connect: the uid check alone must keep others out.
    settings = unix_settings(kubernetes_settings, final, 0o666, allowed_uids=(os.geteuid(),))
    async with BrokerServer(settings) as server:
        # gRPC's own socket stays in the private directory, never published.
        [bind] = seen.binds
        assert bind["bound"].parent.parent == socket_dir
        assert bind["others connect to bound"] == b"EACCES", bind
        assert seen.links == [{"source mode": 0o666, "final exists": False}]
        assert stat.S_IMODE(os.lstat(final).st_mode) == 0o666
        assert server.unix_socket == final
        # An allowed uid: relayed to gRPC, the call gets the socket's identity.
        assert await create_token(final) == LOCAL_CALLER
        # Another user connects (the mode allows it) and is closed without a byte answered.
        answer = await asyncio.to_thread(as_user, NOBODY, first_frame(final))
        assert answer == b"", answer
    assert list(socket_dir.iterdir()) == []


@needs_root
async def test_peer_gid_gate_lets_an_allowed_group_speak_to_grpc(
    kubernetes_settings: KubernetesSettings, socket_dir: Path
) -> None:
    final = socket_dir / "broker.sock"
    settings = unix_settings(kubernetes_settings, final, 0o666, allowed_gids=(NOBODY,))
    async with BrokerServer(settings):
        # Gid 65534 is allowed: the child reaches gRPC, which answers the HTTP/2 preface with
        # its SETTINGS frame (frame header: 3 bytes length, then the type).
        answer = await asyncio.to_thread(as_user, NOBODY, first_frame(final))
        assert len(answer) == 9 and answer[3] == H2_SETTINGS, answer
        # Root (this process) is neither an allowed uid nor in an allowed group.
        with pytest.raises(aio.AioRpcError) as err:
            await create_token(final)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_peer_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"authentication\.unixSocket\.allowedUids"):
        load_settings(
            None,
            {
                "server": {"listen": None, "unixSocket": "/run/tb.sock"},
                "authentication": {"unixSocket": {"allowedUids": [-1]}},
            },
        )
    tcp_only = load_settings(None, {"authentication": {"unixSocket": {"allowedGids": [0]}}})
    with pytest.raises(ConfigError, match=r"allowedUids/allowedGids: needs server\.unixSocket"):
        Authenticator.from_settings(tcp_only.authentication, tcp_only.server)
