"""API keys: `authorization: Bearer <key>`, checked against SHA-256 hashes of the keys.

The broker never stores a key, only `sha256(key)` in hex mapped to an identity name, inline in
`authentication.apiKeys.keys` and/or in a mounted YAML file (`authentication.apiKeys.file`):

    keys:
      - name: ci-deployer
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

The presented key's hash is compared with every configured hash in constant time. The file
must have its `keys` list: `keys: []` revokes every key of the file, while a file that is
missing, empty or without `keys` is refused and the last good keys stay in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from broker.config import ApiKeyEntry, ApiKeySettings, ConfigError, check_unique_api_keys
from broker.file_reload import DEFAULT_RELOAD_INTERVAL_SECONDS, ReloadingFiles

logger = logging.getLogger(__name__)


def hash_api_key(key: str) -> str:
    """The SHA-256 (hex) of an API key: what goes into the configuration."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> str:
    """A new random API key (256 bits, URL-safe; never looks like a JWT)."""
    return "tbk_" + secrets.token_urlsafe(32)


FILE_KEY = "authentication.apiKeys.file"


class _ApiKeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Required: revoking every key of the file takes an explicit `keys: []`. A file that
    # says nothing of keys (`{}`, a half-rendered template) is refused, and the last good
    # keys stay in force, as for a file that is missing or empty.
    keys: tuple[ApiKeyEntry, ...]


def parse_api_key_file(data: bytes, path: Path) -> tuple[ApiKeyEntry, ...]:
    """A key file's entries. Errors name the file and entry, never quote a value."""
    try:
        parsed = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"{FILE_KEY}: {path} is not valid YAML") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{FILE_KEY}: {path} must hold a mapping with a `keys` list")
    try:
        entries = _ApiKeyFile.model_validate(parsed).keys
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(p) for p in err["loc"]) + ": " + err["msg"] for err in exc.errors()
        )
        raise ConfigError(f"{FILE_KEY}: {path}: {problems}") from None
    return entries


class ApiKeyStore:
    """Key hashes -> identity names."""

    def __init__(self, entries: Iterable[ApiKeyEntry]) -> None:
        entries = tuple(entries)
        try:
            check_unique_api_keys(entries)
        except ValueError as exc:
            raise ConfigError(f"authentication.apiKeys: {exc}") from None
        self._entries = tuple((e.name, bytes.fromhex(e.sha256)) for e in entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ApiKeyStore(<{len(self._entries)} key hashes>)"

    def lookup(self, key: str) -> str | None:
        """The identity name of `key`, or None. Every entry is compared (no early exit)."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for name, expected in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found


@dataclass(frozen=True)
class FixedApiKeys:
    """Inline keys only (`authentication.apiKeys.keys`): nothing to reload."""

    current: ApiKeyStore


async def open_api_keys(
    settings: ApiKeySettings, *, reload_interval_seconds: float = DEFAULT_RELOAD_INTERVAL_SECONDS
) -> FixedApiKeys | ReloadingFiles[ApiKeyStore]:
    """The inline keys, plus the key file's, followed as it changes (a key added to or removed
    from the mounted Secret counts without a restart). ConfigError naming the setting."""
    inline = settings.keys
    if settings.file is None:
        return FixedApiKeys(ApiKeyStore(inline))
    path = settings.file

    def build(contents: Sequence[bytes]) -> ApiKeyStore:
        return ApiKeyStore((*inline, *parse_api_key_file(contents[0], path)))

    files = ReloadingFiles(
        "API key file",
        [path],
        build,
        settings_keys=[FILE_KEY],
        reload_interval_seconds=reload_interval_seconds,
        describe=lambda store: f"{len(store)} key hashes",
        log=logger,
    )
    return await files.open()
