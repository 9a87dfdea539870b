"""The request id of a call: the caller's `x-request-id` when it is sane, else a new one.

The id is echoed to the caller (response initial metadata), and appears in the logs and the
audit line of the call, so a caller-chosen value is only kept when it cannot forge or break a
log line: visible ASCII (no spaces, no control characters), at most 128 characters.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

REQUEST_ID_METADATA_KEY = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128

# Visible ASCII: '!' (0x21) to '~' (0x7e).
_SANE = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID_LENGTH}}}")


def new_request_id() -> str:
    return str(uuid.uuid4())


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
