"""Running an emulator as its own process, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from broker.emulator.config import EmulatorConfig
from broker.emulator.emulator import Emulator


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a poller never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


async def run_emulator_forever(
    config: EmulatorConfig,
    kubeconfig_out: Path | None,
    ready_file: Path | None,
    *,
    user_token: str | None = None,
    stop: asyncio.Event | None = None,
    setup: Callable[[Emulator], None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Start an emulator, announce it, and serve until SIGTERM/SIGINT (or `stop` is set).

    Once serving: the kubeconfig is written (for `user_token`, else the seed's first user), then
    the ready file (JSON: url, caFile, kubeconfig, pid), then one line with the URL on stdout.
    `setup` may adjust the emulator (faults, users) before it starts serving. With
    `handle_signals=False` the caller's own signal handling is left alone.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for signum in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)

    emulator = Emulator(config)
    if setup is not None:
        setup(emulator)
    await emulator.start()
    try:
        if kubeconfig_out is not None:
            token = user_token or emulator.access.first_token()
            if token is None:
                raise SystemExit("--kubeconfig-out needs a user: add one to the seed")
            emulator.write_kubeconfig(kubeconfig_out, user_token=token)
        if ready_file is not None:
            info = {
                "url": emulator.url,
                "caFile": str(emulator.ca_file),
                "kubeconfig": str(kubeconfig_out) if kubeconfig_out else None,
                "pid": os.getpid(),
            }
            _write_atomically(ready_file, json.dumps(info) + "\n")
        sys.stdout.write(f"{emulator.url}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await emulator.stop()
        for signum in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
