"""Bounds for caller-controlled values in log and audit lines (one helper for both).

A value longer than its bound is cut, and the cut is marked with the value's original length
and a short SHA-256 prefix of the whole value, so that the same huge value can still be
recognised across lines (and against a copy an investigator holds) without being written out:

    "aaaa...(truncated: 1000000 chars, sha256:9c4b1f0e8a2d)"

Lists are bounded in count too: after `max_items` values one marker item says how many there
were in all and hashes them all. Escaping is not done here: JSON lines are escaped by
`json.dumps`, text log lines by broker.logs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

# A DNS-1123 subdomain (the longest Kubernetes object name): valid names are never cut.
MAX_FIELD_CHARS: Final = 253
HASH_HEX_CHARS: Final = 12


def short_hash(value: str) -> str:
    """The first HASH_HEX_CHARS hex digits of the SHA-256 of `value` (UTF-8)."""
    data = value.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:HASH_HEX_CHARS]


def bounded(value: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`value` itself when at most `limit` characters, else its first `limit` characters and
    a marker with its length and short hash."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...(truncated: {len(value)} chars, sha256:{short_hash(value)})"


def bounded_list(values: Sequence[str], max_items: int, limit: int = MAX_FIELD_CHARS) -> list[str]:
    """The first `max_items` values, each `bounded`; when there are more, one marker item
    with their count and the short hash of all of them (joined by NUL)."""
    shown = [bounded(value, limit) for value in values[:max_items]]
    if len(values) > max_items:
        digest = short_hash("\0".join(values))
        shown.append(f"...(truncated: {len(values)} items, sha256:{digest})")
    return shown
