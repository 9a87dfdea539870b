"""Hot reload of the policy file: polled by content hash, and on SIGHUP.

`PolicyStore.current` is always a valid policy: the store is built from a file that loads,
and a new version that fails to read, parse or validate is refused (logged on the
"broker.policy" logger with the error, counted in `reload_failures`) while the last good
policy stays in force. Polling compares the SHA-256 of the file's bytes, read through the
path, so it sees any kind of update: in-place writes, renames, and Kubernetes ConfigMap
volumes, where the kubelet swaps the `..data` symlink the file's path goes through (mtime
and inotify on the path see nothing there). A refused version is reported once, not at
every poll; an explicit `reload()` (SIGHUP) always reports. File reads and parsing run off
the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.config import ConfigError, PolicySettings
from broker.policy import Policy
from broker.policy_schema import PolicyError

logger = logging.getLogger("broker.policy")

DEFAULT_RELOAD_INTERVAL_SECONDS = 5.0


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class PolicyStore:
    """The policy in force, and its reloads. Build with `load` (sync) or `open` (async)."""

    def __init__(
        self,
        path: Path,
        policy: Policy,
        digest: str,
        *,
        reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS,
    ) -> None:
        if reload_interval_seconds <= 0:
            raise ValueError("reload_interval_seconds must be positive")
        self.path = path
        self.reload_interval_seconds = reload_interval_seconds
        self._policy = policy
        self._digest = digest
        # Successful reloads that installed a new policy (the first load not counted).
        self.reload_count = 0
        # Refused versions (each reported once by polling; every failed reload() counts).
        self.reload_failures = 0
        # Why the file's current content is refused; None when it is the policy in force.
        self.last_error: str | None = None
        self._refused: str | None = None  # digest (or read error) of the refused content
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def load(
        cls, path: Path, *, reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS
    ) -> PolicyStore:
        """Load the file (blocking); PolicyError if it is invalid: there is no fallback."""
        raw = _read_bytes(path)
        policy = Policy.from_yaml(raw, str(path))
        return cls(path, policy, _digest(raw), reload_interval_seconds=reload_interval_seconds)

    @classmethod
    async def open(
        cls, path: Path, *, reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS
    ) -> PolicyStore:
        """`load`, off the event loop."""
        return await asyncio.to_thread(
            cls.load, path, reload_interval_seconds=reload_interval_seconds
        )

    @property
    def current(self) -> Policy:
        return self._policy

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the file content in force: the policy version, for audit."""
        return self._digest

    async def reload(self) -> bool:
        """Re-read the file now (SIGHUP); True if a new policy was installed."""
        return await self._refresh(explicit=True)

    async def check(self) -> bool:
        """One poll: like `reload`, but silent when nothing changed since the last check."""
        return await self._refresh(explicit=False)

    async def run(self) -> None:
        """Poll the file every `reload_interval_seconds`, until cancelled."""
        while True:
            await asyncio.sleep(self.reload_interval_seconds)
            try:
                await self.check()
            except Exception:
                logger.exception("policy file %s: unexpected error while checking it", self.path)

    def install_sighup_handler(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Reload on SIGHUP; returns a function removing the handler."""

        def on_sighup() -> None:
            task = loop.create_task(self._reload_logged())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def remove() -> None:
            loop.remove_signal_handler(signal.SIGHUP)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        return remove

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Exception:
            logger.exception("policy file %s: unexpected error while reloading it", self.path)

    async def _refresh(self, *, explicit: bool) -> bool:
        async with self._lock:
            try:
                raw = await asyncio.to_thread(_read_bytes, self.path)
            except PolicyError as exc:
                return self._refuse(f"read:{exc}", str(exc), explicit=explicit)
            digest = _digest(raw)
            if digest == self._digest:
                # Unchanged, or back to the policy in force after a refused version.
                self._refused = self.last_error = None
                if explicit:
                    logger.info("policy file %s unchanged (sha256 %s)", self.path, digest[:12])
                return False
            if digest == self._refused and not explicit:
                return False
            try:
                policy = await asyncio.to_thread(Policy.from_yaml, raw, str(self.path))
            except PolicyError as exc:
                return self._refuse(digest, str(exc), explicit=explicit)
            self._policy, self._digest = policy, digest
            self._refused = self.last_error = None
            self.reload_count += 1
            logger.info(
                "policy reloaded from %s: %d rules (sha256 %s)",
                self.path,
                len(policy.rules),
                digest[:12],
            )
            return True

    def _refuse(self, key: str, error: str, *, explicit: bool) -> bool:
        if key == self._refused and not explicit:
            return False
        self._refused, self.last_error = key, error
        self.reload_failures += 1
        logger.error(
            "policy reload refused, keeping the policy in force (sha256 %s): %s",
            self._digest[:12],
            error,
        )
        return False


@dataclass(frozen=True)
class FixedPolicy:
    """A policy that never changes: the deny-all in force when no policy file is configured."""

    current: Policy
    digest: str = "none"


async def open_policy(settings: PolicySettings) -> PolicyStore | FixedPolicy:
    """The policy source the settings name. ConfigError when the file does not load: a
    broker must not start on a policy it cannot read (there is no last good one yet)."""
    if settings.file is None:
        logger.warning("no policy.file is configured: every request will be denied")
        return FixedPolicy(Policy.from_dict({"rules": []}, "<no policy file>"))
    try:
        return await PolicyStore.open(
            settings.file, reload_interval_seconds=settings.reload_interval_seconds
        )
    except PolicyError as exc:
        raise ConfigError(f"policy.file: {exc}") from None
