"""Hot reload of what the broker reads from mounted files: polled by content hash, and on SIGHUP.

The policy (policy_reload.py), the server's TLS certificate, key and client CA (tls.py), the
API key file (authn_apikeys.py) and JWKS files (authn_jwt.py) live in ConfigMaps and Secrets
that change under a running pod: a policy edit, a cert-manager renewal, a new caller's key.

`ReloadingFiles.current` is always a good value: it is built from files that load, and a new
version that fails to read or build is refused (logged with the error, counted in
`reload_failures`) while the last good value stays in force. Polling compares the SHA-256 of
the files' bytes, read through their paths, so it sees any kind of update: in-place writes,
renames, and Kubernetes ConfigMap and Secret volumes, where the kubelet swaps the `..data`
symlink the paths go through (mtime and inotify on the path see nothing there). A refused
version is reported once, not at every poll; an explicit `reload()` (SIGHUP) always reports.
File reads and building run off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from broker.config import ConfigError

T = TypeVar("T")

DEFAULT_RELOAD_INTERVAL_SECONDS = 5.0


class ReloadingFiles(Generic[T]):
    """A value built from the bytes of some files, rebuilt when they change.

    `build` gets the files' contents in `paths` order and raises `error` for content it
    refuses (any message it gives names the file, never quotes a secret). `load()` (blocking)
    or `await open()` reads the first version: there is no last good value to keep yet, so a
    failure there raises `error`.
    """

    def __init__(
        self,
        what: str,
        paths: Sequence[Path],
        build: Callable[[Sequence[bytes]], T],
        *,
        reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS,
        error: type[Exception] = ConfigError,
        describe: Callable[[T], str] | None = None,
        log: logging.Logger | None = None,
        on_reload: Callable[[T], None] | None = None,
        settings_keys: Sequence[str] | None = None,
    ) -> None:
        if reload_interval_seconds <= 0:
            raise ValueError("reload_interval_seconds must be positive")
        if not paths:
            raise ValueError("no file to read")
        self.what = what
        self.paths = tuple(paths)
        self.reload_interval_seconds = reload_interval_seconds
        self._build = build
        self._error = error
        self._describe = describe
        self._log = log if log is not None else logging.getLogger(__name__)
        # Called with each new value (not the first), e.g. to hand it to gRPC.
        self._on_reload = on_reload
        # The settings naming the files, for read errors ("server.tls.certFile: ...").
        self._settings_keys = tuple(settings_keys) if settings_keys is not None else None
        self._value: T | None = None
        self._digest = ""
        # Successful reloads that installed a new value (the first load not counted).
        self.reload_count = 0
        # Refused versions (each reported once by polling; every failed reload() counts).
        self.reload_failures = 0
        # Why the files' current content is refused; None when it is the value in force.
        self.last_error: str | None = None
        self._refused: str | None = None  # digest (or read error) of the refused content
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"ReloadingFiles({self.what!r}, {self._names()})"

    def load(self) -> ReloadingFiles[T]:
        """Read and build the first version (blocking); raises `error` when it does not."""
        contents = self._read()
        self._value = self._build(contents)
        self._digest = _digest(contents)
        return self

    async def open(self) -> ReloadingFiles[T]:
        """`load`, off the event loop."""
        return await asyncio.to_thread(self.load)

    @property
    def current(self) -> T:
        if self._value is None:
            raise RuntimeError(f"{self.what}: not loaded yet")
        return self._value

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the content in force (of the file's bytes, for one file)."""
        return self._digest

    async def reload(self) -> bool:
        """Re-read the files now (SIGHUP); True if a new value was installed."""
        return await self._refresh(explicit=True)

    async def reload_logged(self) -> None:
        """`reload`, with an unexpected error logged rather than raised (SIGHUP)."""
        try:
            await self.reload()
        except Exception:
            self._log.exception("%s: unexpected error while reloading %s", self.what, self._names())

    async def check(self) -> bool:
        """One poll: like `reload`, but silent when nothing changed since the last check."""
        return await self._refresh(explicit=False)

    async def run(self) -> None:
        """Poll the files every `reload_interval_seconds`, until cancelled."""
        while True:
            await asyncio.sleep(self.reload_interval_seconds)
            try:
                await self.check()
            except Exception:
                self._log.exception(
                    "%s: unexpected error while checking %s", self.what, self._names()
                )

    def _names(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    def _read(self) -> list[bytes]:
        contents = []
        for i, path in enumerate(self.paths):
            try:
                contents.append(path.read_bytes())
            except OSError as exc:
                if self._settings_keys is not None:
                    where = f"{self._settings_keys[i]}: cannot read {path}"
                else:
                    where = f"cannot read {self.what} file {path}"
                raise self._error(f"{where}: {exc.strerror}") from None
        return contents

    async def _refresh(self, *, explicit: bool) -> bool:
        async with self._lock:
            try:
                contents = await asyncio.to_thread(self._read)
            except self._error as exc:
                return self._refuse(f"read:{exc}", str(exc), explicit=explicit)
            digest = _digest(contents)
            if digest == self._digest:
                # Unchanged, or back to the value in force after a refused version.
                self._refused = self.last_error = None
                if explicit:
                    self._log.info(
                        "%s file %s unchanged (sha256 %s)", self.what, self._names(), digest[:12]
                    )
                return False
            if digest == self._refused and not explicit:
                return False
            try:
                value = await asyncio.to_thread(self._build, contents)
            except self._error as exc:
                return self._refuse(digest, str(exc), explicit=explicit)
            self._value, self._digest = value, digest
            self._refused = self.last_error = None
            self.reload_count += 1
            if self._on_reload is not None:
                self._on_reload(value)
            described = f": {self._describe(value)}" if self._describe is not None else ""
            self._log.info(
                "%s reloaded from %s%s (sha256 %s)",
                self.what,
                self._names(),
                described,
                digest[:12],
            )
            return True

    def _refuse(self, key: str, error: str, *, explicit: bool) -> bool:
        if key == self._refused and not explicit:
            return False
        self._refused, self.last_error = key, error
        self.reload_failures += 1
        self._log.error(
            "%s reload refused, keeping the %s in force (sha256 %s): %s",
            self.what,
            self.what,
            self._digest[:12],
            error,
        )
        return False


def _digest(contents: Sequence[bytes]) -> str:
    if len(contents) == 1:
        return hashlib.sha256(contents[0]).hexdigest()
    return hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in contents)).hexdigest()


def reload_on_sighup(
    loop: asyncio.AbstractEventLoop,
    files: Sequence[ReloadingFiles[Any]],
    *,
    pending: bool = False,
    reopen: Sequence[Callable[[], None]] = (),
) -> Callable[[], None]:
    """SIGHUP re-reads each of `files` at once (they are polled too); returns a function
    removing the handler. `pending`: a SIGHUP came before (while the server started), so they
    are re-read now too. `reopen`: also called on SIGHUP, e.g. to reopen the audit file after
    a rotation (they must not block: they log their own outcome)."""
    tasks: set[asyncio.Task[None]] = set()

    async def reload_all() -> None:
        for reloading in files:
            await reloading.reload_logged()

    def on_sighup() -> None:
        for action in reopen:
            action()
        task = loop.create_task(reload_all())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def remove() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if pending:
        on_sighup()
    return remove
