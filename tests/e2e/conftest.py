"""Fixtures of the end-to-end tests that start real processes: `python -m broker` children and
a redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.cli import Process, Spawn, start_broker
from tests.support.http_door import HttpPki, http_pki
from tests.support.redis_server import RedisServer


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Start `python -m broker ...` children; any still running at the end are killed
    (workers of `serve --workers` stop on their own when their supervisor's stdin closes)."""
    started: list[Process] = []

    async def start(*args: str) -> Process:
        started.append(await start_broker(*args))
        return started[-1]

    yield start
    for process in started:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server (no password), stopped after the test."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pki(tmp_path: Path) -> HttpPki:
    """The HTTP door's test PKI: a CA, the server's certificate, a JWT signer (tests with a
    PKI of another kind define their own `pki`)."""
    return http_pki(tmp_path)
