"""The unix socket listener: never reachable with looser permissions than configured.

gRPC binds a unix socket, and already listens on it, in `add_insecure_port`, with the mode the
process umask gives; the broker can chmod it only afterwards. A socket bound at its final
path is therefore connectable, for a moment, by anyone the umask lets in, and a connection
made then stays open with the socket's identity. So the socket is bound in a new private
directory instead (`PrivateSocketDirectory`: mode 0700, created next to the final path so it
is on the same filesystem), given its configured mode there, and then published: hard-linked
to the final path (atomic, and it refuses to replace a file that appeared meanwhile) and
unlinked from the private directory, which is removed. The umask is never touched (it is
process-wide: other threads create files too).

With `authentication.unixSocket.allowedUids` / `allowedGids` set, the file mode is not the
only gate: `PeerCredentialRelay` owns the public socket, reads each connection's peer
credentials (SO_PEERCRED: uid and gid of the process that connected, recorded by the kernel
at connect time) and closes connections from other users at once; accepted connections are
relayed byte for byte to gRPC's socket, which then stays in the private directory for the
server's lifetime (only the broker's own user, and root, can reach it there). grpc-python
has no hook to see a connection's socket, hence the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from broker.config import ConfigError

logger = logging.getLogger(__name__)

PRIVATE_DIRECTORY_PREFIX: Final = ".token-broker-"
# sockaddr_un.sun_path is 108 bytes on Linux, with the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_RELAY_CHUNK_BYTES = 64 * 1024


async def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a crashed broker; refuse to touch anything else."""
    try:
        mode = (await asyncio.to_thread(os.lstat, path)).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"server.unixSocket: {path} exists and is not a socket")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except (OSError, TimeoutError):
        # Nobody listening: stale.
        await asyncio.to_thread(path.unlink, missing_ok=True)
        return
    writer.close()
    raise ConfigError(f"server.unixSocket: {path} is in use by a running server")


class PrivateSocketDirectory:
    """A directory only the broker's user can enter, next to `final` (same filesystem),
    where sockets are bound before they are published with their configured mode."""

    def __init__(self, final: Path, directory: Path) -> None:
        self.final = final
        self.directory = directory

    @classmethod
    async def create(cls, final: Path) -> PrivateSocketDirectory:
        try:
            directory = Path(
                await asyncio.to_thread(
                    tempfile.mkdtemp, prefix=PRIVATE_DIRECTORY_PREFIX, dir=final.parent
                )
            )
        except OSError as exc:
            raise ConfigError(
                f"server.unixSocket: cannot listen on {final}: {exc.strerror} ({final.parent})"
            ) from None
        # mkdtemp asks for 0700 and the umask can only take bits away; a umask that took the
        # owner's away too would make the directory unusable, so set it outright.
        await asyncio.to_thread(os.chmod, directory, 0o700)
        private = cls(final, directory)
        for name in ("grpc", "relay"):
            if len(os.fsencode(private.path(name))) > MAX_SOCKET_PATH_BYTES:
                await private.remove()
                raise ConfigError(
                    f"server.unixSocket: {final} is too long: the socket is first bound at "
                    f"{private.path(name)}, longer than {MAX_SOCKET_PATH_BYTES} bytes"
                )
        return private

    def path(self, name: str) -> Path:
        """Where a socket is bound (reachable only through this directory)."""
        return self.directory / name

    async def publish(self, name: str, mode: int) -> None:
        """Give the socket `name` its mode, then make it appear at `final` (atomically)."""
        await asyncio.to_thread(self._publish, self.path(name), mode)

    def _publish(self, bound: Path, mode: int) -> None:
        os.chmod(bound, mode)
        try:
            os.link(bound, self.final)
        except FileExistsError:
            raise ConfigError(
                f"server.unixSocket: {self.final} appeared while the broker was starting"
            ) from None
        bound.unlink()

    async def remove(self) -> None:
        """Remove the directory and any socket still in it (not the published one)."""
        await asyncio.to_thread(self._remove)

    def _remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for entry in self.directory.iterdir():
                entry.unlink(missing_ok=True)
            self.directory.rmdir()


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The uid/gid/pid of the process that connected a unix socket (SO_PEERCRED, Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


class PeerCredentialRelay:
    """The public unix socket when peers are checked: connections whose peer uid is in
    `uids` or whose peer gid is in `gids` are relayed to gRPC's private socket; any other
    connection is closed before a byte is read from or sent to it."""

    def __init__(self, target: Path, *, uids: Iterable[int], gids: Iterable[int]) -> None:
        self.target = target
        self.uids = frozenset(uids)
        self.gids = frozenset(gids)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, private: PrivateSocketDirectory, name: str, mode: int) -> None:
        """Bind `name` in the private directory, publish it with `mode`, and serve."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(private.path(name)))
            await private.publish(name, mode)
        except BaseException:
            sock.close()
            raise
        try:
            # asyncio's server calls listen(): only now, with the socket at its final mode.
            self._server = await asyncio.start_unix_server(self._accepted, sock=sock)
        except BaseException:
            sock.close()
            await asyncio.to_thread(private.final.unlink, missing_ok=True)
            raise

    def allows(self, peer: PeerCredentials) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                peer = peer_credentials(writer.get_extra_info("socket"))
            except OSError as exc:  # the peer is gone already
                logger.debug("unix socket relay: no peer credentials: %s", exc)
                return
            if not self.allows(peer):
                logger.warning(
                    "unix socket connection refused: peer uid/gid not allowed",
                    extra={"peer_uid": peer.uid, "peer_gid": peer.gid, "peer_pid": peer.pid},
                )
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_unix_connection(
                    str(self.target)
                )
            except OSError as exc:
                logger.warning("unix socket relay: gRPC's socket refused: %s", exc)
                return
            try:
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
            finally:
                upstream_writer.close()
        finally:
            writer.close()
            self._connections.discard(task)

    async def stop_accepting(self) -> None:
        """No new connections (those open keep relaying: their calls may finish)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Close every relayed connection (after gRPC's server stopped)."""
        await self.stop_accepting()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connections.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close; a reset on either side ends both directions."""
    try:
        while data := await reader.read(_RELAY_CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()
