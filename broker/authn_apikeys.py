"""API keys: `authorization: Bearer <key>`, checked against SHA-256 hashes of the keys.

The broker never stores a key, only `sha256(key)` in hex mapped to an identity name, inline in
`authentication.apiKeys.keys` and/or in a mounted YAML file (`authentication.apiKeys.file`):

    keys:
      - name: ci-deployer
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

The presented key's hash is compared with every configured hash in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from broker.config import ApiKeyEntry, ApiKeySettings, ConfigError, check_unique_api_keys


def hash_api_key(key: str) -> str:
    """The SHA-256 (hex) of an API key: what goes into the configuration."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> str:
    """A new random API key (256 bits, URL-safe; never looks like a JWT)."""
    return "tbk_" + secrets.token_urlsafe(32)


class _ApiKeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: tuple[ApiKeyEntry, ...] = ()


def read_api_key_file(path: Path) -> tuple[ApiKeyEntry, ...]:
    """Parse a key file (blocking). Errors name the file and entry, never quote a value."""
    key = "authentication.apiKeys.file"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"{key}: {path} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} must hold a mapping with a `keys` list")
    try:
        entries = _ApiKeyFile.model_validate(data).keys
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(p) for p in err["loc"]) + ": " + err["msg"] for err in exc.errors()
        )
        raise ConfigError(f"{key}: {path}: {problems}") from None
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

    @classmethod
    async def load(cls, settings: ApiKeySettings) -> ApiKeyStore:
        """Inline keys plus the key file's (read off the event loop)."""
        entries = list(settings.keys)
        if settings.file is not None:
            entries += await asyncio.to_thread(read_api_key_file, settings.file)
        return cls(entries)

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
