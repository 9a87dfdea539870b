"""Fixtures of the emulator tests: emulators seeded with tests/support/emulator.py's SEED, and
clients of their HTTPS API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.emulator import Emulator
from broker.emulator.client import EmulatorClient
from tests.support.emulator import ADMIN_TOKEN, BROKER_TOKEN, MakeEmulator, started


@pytest.fixture
async def make_emu() -> AsyncIterator[MakeEmulator]:
    """Start emulators with config overrides; all are stopped afterwards."""
    emulators: list[Emulator] = []

    async def make(**overrides: Any) -> Emulator:
        emulators.append(await started(**overrides))
        return emulators[-1]

    yield make
    for emu in emulators:
        await emu.stop()


@pytest.fixture
async def emu(make_emu: MakeEmulator) -> Emulator:
    return await make_emu()


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[EmulatorClient]:
    async with EmulatorClient(emu.url, emu.ca_file, BROKER_TOKEN) as c:
        yield c


@pytest.fixture
async def admin(emu: Emulator) -> AsyncIterator[EmulatorClient]:
    async with EmulatorClient(emu.url, emu.ca_file, ADMIN_TOKEN) as c:
        yield c
