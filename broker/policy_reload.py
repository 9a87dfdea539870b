"""Hot reload of the policy file (broker.file_reload): polled by content hash, and on SIGHUP.

`PolicyStore.current` is always a valid policy: the store is built from a file that loads,
and a new version that fails to read, parse or validate is refused (logged on the
"broker.policy" logger with the error, counted in `reload_failures`) while the last good
policy stays in force.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.config import ConfigError, PolicySettings
from broker.file_reload import DEFAULT_RELOAD_INTERVAL_SECONDS, ReloadingFiles
from broker.policy import Policy
from broker.policy_schema import PolicyError

logger = logging.getLogger("broker.policy")


class PolicyStore(ReloadingFiles[Policy]):
    """The policy in force, and its reloads. Build with `load` (sync) or `open` (async)."""

    def __init__(
        self, path: Path, *, reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS
    ) -> None:
        def build(contents: Sequence[bytes]) -> Policy:
            policy = Policy.from_yaml(contents[0], str(path))
            for warning in policy.warnings:  # once per version loaded
                logger.warning("policy %s: %s", path, warning)
            return policy

        super().__init__(
            "policy",
            [path],
            build,
            reload_interval_seconds=reload_interval_seconds,
            error=PolicyError,
            describe=lambda policy: f"{len(policy.rules)} rules",
            log=logger,
        )
        self.path = path

    @classmethod
    def load_file(
        cls, path: Path, *, reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS
    ) -> PolicyStore:
        """Load the file (blocking); PolicyError if it is invalid: there is no fallback."""
        store = cls(path, reload_interval_seconds=reload_interval_seconds)
        store.load()
        return store

    @classmethod
    async def open_file(
        cls, path: Path, *, reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS
    ) -> PolicyStore:
        """`load_file`, off the event loop."""
        return await asyncio.to_thread(
            cls.load_file, path, reload_interval_seconds=reload_interval_seconds
        )


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
        return await PolicyStore.open_file(
            settings.file, reload_interval_seconds=settings.reload_interval_seconds
        )
    except PolicyError as exc:
        raise ConfigError(f"policy.file: {exc}") from None
