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

from broker.emulator.auth import ALL, TOKEN_RESOURCE, UserInfo
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
    summary: bool = False,
) -> None:
    """Start an emulator, announce it, and serve until SIGTERM/SIGINT (or `stop` is set).

    Once serving: the kubeconfig is written (for `user_token`, else the seed's first user), then
    the ready file (JSON: url, caFile, kubeconfig, pid), then one line with the URL on stdout.
    `setup` may adjust the emulator (faults, users) before it starts serving. With
    `handle_signals=False` the caller's own signal handling is left alone.

    `summary` (the `token-broker emulator` command, for people): a kubeconfig is written in
    any case (without `kubeconfig_out`, in the emulator's temporary directory), and one for
    the seed's first admin user next to the CA; after the URL line, what a user needs: the CA,
    both kubeconfigs, whom they authenticate and where that user may create tokens.
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
        if summary and kubeconfig_out is None:
            kubeconfig_out = emulator.directory / "kubeconfig"
        token = user_token or emulator.access.first_token()
        if kubeconfig_out is not None:
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
        if summary:
            sys.stdout.write(_summary(emulator, kubeconfig_out, token, config.seed))
        sys.stdout.flush()
        await stop.wait()
    finally:
        await emulator.stop()
        for signum in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)


def _summary(emulator: Emulator, kubeconfig: Path | None, token: str | None, seed: object) -> str:
    """The lines after the URL: the CA, the kubeconfigs and what their users may do (never a
    bearer token: the seed file holds them)."""
    lines = [f"CA certificate:   {emulator.ca_file}"]
    user = emulator.access.user_of(token) if token is not None else None
    if kubeconfig is not None and user is not None:
        lines += [f"kubeconfig:       {kubeconfig}", f"  user {user.name}: {_may(emulator, user)}"]
    admin_token = emulator.access.first_admin_token()
    admin = emulator.access.user_of(admin_token) if admin_token is not None else None
    if admin_token is not None and admin is not None:
        admin_kubeconfig = emulator.write_kubeconfig(
            emulator.directory / "admin.kubeconfig", user_token=admin_token
        )
        lines += [
            f"admin kubeconfig: {admin_kubeconfig}",
            f"  user {admin.name} (an administrator): everything, the /emulator/* endpoints"
            " (faults, recorded requests) too",
        ]
    else:
        lines.append("admin:            none (a seed user in the group system:masters is one)")
    if isinstance(seed, str | Path):
        lines.append(f"seed:             {seed} (objects, users and their bearer tokens, grants)")
    lines.append("Ctrl-C (SIGINT) or SIGTERM stops the emulator; its temporary files go with it.")
    return "".join(f"{line}\n" for line in lines)


def _may(emulator: Emulator, user: UserInfo) -> str:
    """Where `user` may create service-account tokens, against where the seed has accounts."""
    allowed = emulator.access.namespaces_allowed(user, "create", TOKEN_RESOURCE)
    if ALL in allowed:
        return "may create tokens in every namespace"
    if not allowed:
        return "may create no tokens (give it a grant in the seed's rbac)"
    text = f"may create tokens in {', '.join(sorted(allowed))}"
    with_accounts = {sa.namespace for sa in emulator.store.list_service_accounts()}
    missing = sorted(with_accounts - allowed)
    if missing:
        text += f"; not in {', '.join(missing)} (use the admin kubeconfig, or grant it there)"
    return text
