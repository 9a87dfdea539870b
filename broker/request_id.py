"""The request id of a call: the caller's `x-request-id` when it is sane, else a new one.

The id is echoed to the caller (response initial metadata), and appears in the logs and the
audit line of the call, so a caller-chosen value is only kept when it cannot forge or break a
log line: visible ASCII (no spaces, no control characters), at most 128 characters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

REQUEST_ID_METADATA_KEY = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128

# Visible ASCII: '!' (0x21) to '~' (0x7e).
_SANE = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID_LENGTH}}}")


def new_request_id() -> str:
    """A random (version 4) UUID, as `str(uuid.uuid4())` writes it, without building a UUID."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_sane_request_id(value: str) -> bool:
    return _SANE.fullmatch(value) is not None


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The first `x-request-id` of the invocation metadata if sane, else a new uuid4 string.

    `metadata` is what `context.invocation_metadata()` returns (None when there is none).
    """
    for key, value in metadata or ():
        if key.lower() != REQUEST_ID_METADATA_KEY:
            continue
        # Only the first value counts: a second one cannot override a rejected first.
        if isinstance(value, str) and is_sane_request_id(value):
            return value
        break
    return new_request_id()
