"""A start that fails (or is cancelled) late leaves nothing behind: no listening socket, no
unix socket file or private directory, no background task, no open audit file.

BrokerServer.start() builds its parts on an AsyncExitStack; these tests fail it at the late
steps (after gRPC is serving: the health listener, the admin listener) and in the middle
(cancelled while the first readiness probe waits for the API server), end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import (
    AdminSettings,
    AuditSettings,
    ConfigError,
    KubernetesSettings,
    Settings,
    UnixSocketAuthSettings,
)
from broker.server import BrokerServer
from tests.support.stack import broker_settings

# Sockets of this process in the listening state: /proc/net/{tcp,tcp6} state 0A, and unix
# sockets with __SO_ACCEPTCON (flags 0x10000).
_TCP_LISTEN = "0A"
_SO_ACCEPTCON = 0x10000
# Bounded waits (never a timing assertion): gRPC core closes listeners on its own threads.
_SETTLE_SECONDS = 10.0


def _own_socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def listening_sockets() -> set[str]:
    """Inodes of this process's listening TCP and unix sockets."""
    ours = _own_socket_inodes()
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == _TCP_LISTEN and fields[9] in ours:
                    listening.add(fields[9])
    with open("/proc/net/unix") as lines:
        for line in list(lines)[1:]:
            fields = line.split()
            if int(fields[3], 16) & _SO_ACCEPTCON and fields[6] in ours:
                listening.add(fields[6])
    return listening


def open_files_at(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
    return found


def other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


class Snapshot:
    """What the process had open before a start; `assert_restored` waits (bounded) for the
    same afterwards."""

    def __init__(self) -> None:
        self.listening = listening_sockets()
        self.tasks = other_tasks()

    async def assert_restored(self, socket_dir: Path, audit_file: Path) -> None:
        async with asyncio.timeout(_SETTLE_SECONDS):
            while listening_sockets() - self.listening or other_tasks() - self.tasks:
                await asyncio.sleep(0.05)
        assert not listening_sockets() - self.listening
        assert not {t.get_name() for t in other_tasks() - self.tasks}
        assert list(socket_dir.iterdir()) == []  # no socket file, no private directory
        assert open_files_at(audit_file) == []


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes (pytest's tmp_path can be longer).
    with tempfile.TemporaryDirectory(prefix="tb-") as directory:
        yield Path(directory)


@pytest.fixture
async def busy_port() -> AsyncIterator[str]:
    """host:port of a TCP socket listening (not SO_REUSEPORT): binding it again fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def settings_with(
    kube: KubernetesSettings,
    socket_dir: Path,
    audit_file: Path,
    *,
    admin: str = "127.0.0.1:0",
    relay: bool = False,
    **server: Any,
) -> Settings:
    settings = broker_settings(kube, unix_socket=socket_dir / "broker.sock", **server)
    authentication = settings.authentication
    if relay:
        peers = UnixSocketAuthSettings(
            identity=authentication.unix_socket.identity, allowed_uids=(os.getuid(),)
        )
        authentication = authentication.model_copy(update={"unix_socket": peers})
    return settings.model_copy(
        update={
            "admin": AdminSettings(listen=admin),
            "audit": AuditSettings(sink="file", file=audit_file),
            "authentication": authentication,
        }
    )


# The step that fails (its listener given a busy port), the settings key the error names, and
# whether unix-socket peers are checked (the relay in front of gRPC's socket). The admin
# listener is the last step: gRPC, its unix socket and the health listener serve already.
BUSY_STEPS = {
    "admin": ("admin", r"admin\.listen", False),
    "admin-with-relay": ("admin", r"admin\.listen", True),
    "health": ("health_listen", r"server\.healthListen", True),
    "grpc": ("listen", r"server\.listen", False),
}


@pytest.mark.parametrize("step", BUSY_STEPS)
async def test_a_busy_port_at_a_late_step_unwinds_the_whole_start(
    kubernetes_settings: KubernetesSettings,
    socket_dir: Path,
    tmp_path: Path,
    busy_port: str,
    step: str,
) -> None:
    key, named, relay = BUSY_STEPS[step]
    audit_file = tmp_path / "audit.log"
    listeners = {"health_listen": "127.0.0.1:0", key: busy_port}
    settings = settings_with(kubernetes_settings, socket_dir, audit_file, relay=relay, **listeners)
    before = Snapshot()
    with pytest.raises(ConfigError, match=rf"{named}: cannot listen"):
        await BrokerServer(settings).start()
    await before.assert_restored(socket_dir, audit_file)


async def test_start_cancelled_while_probing_the_api_server_unwinds(
    kubernetes_settings: KubernetesSettings, socket_dir: Path, tmp_path: Path
) -> None:
    """The first readiness probe waits on an API server that accepts and never answers; the
    start is cancelled there (a signal's task cancellation): the parts built so far (the
    token cache's maintenance task, the audit file, the upstream client) are closed."""
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        accepted.set()

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    assert kubernetes_settings.kubeconfig is not None
    kubeconfig = yaml.safe_load(kubernetes_settings.kubeconfig.read_text())
    kubeconfig["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    silent_kubeconfig = tmp_path / "silent-kubeconfig"
    silent_kubeconfig.write_text(yaml.safe_dump(kubeconfig))
    kube = kubernetes_settings.model_copy(update={"kubeconfig": silent_kubeconfig})
    audit_file = tmp_path / "audit.log"
    settings = settings_with(kube, socket_dir, audit_file, health_listen="127.0.0.1:0")
    try:
        before = Snapshot()
        starting = asyncio.create_task(BrokerServer(settings).start())
        async with asyncio.timeout(_SETTLE_SECONDS):
            await accepted.wait()
        assert not starting.done()
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await before.assert_restored(socket_dir, audit_file)
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()
