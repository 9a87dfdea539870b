"""JSON from untrusted bytes, bounded in size and nesting depth before the parser runs.

`json.loads` recurses once per nesting level: a few thousand `[` (an 8 KB JWT header) raise
RecursionError, which is not a ValueError and escaped every handler that expected one. Here the
size is checked first, then the depth, by a linear scan of the brackets outside strings; only
then does `json.loads` run. Every refusal is a `JsonRejected` (a ValueError), as is every
parse error; `NaN`, `Infinity` and `-Infinity` (not JSON) are refused too.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, Final

# Far deeper than a JWT header, JWT claims or a JWKS document ever nest (3 or 4 levels).
MAX_DEPTH: Final = 32

# A JSON string, or an unterminated one up to the end (as the parser sees it too). Possessive
# and with disjoint alternatives: linear time whatever the input (no backtracking).
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")


class JsonRejected(ValueError):
    """The bytes are not JSON within the bounds; the message says which bound (never the
    content)."""


def depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text` (0: a scalar)."""
    brackets = _NOT_A_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    return max(accumulate(1 if ch in "[{" else -1 for ch in brackets))


def _no_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not JSON")


def loads(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of `data` (UTF-8), or JsonRejected: larger than `max_bytes`, nested
    deeper than `max_depth`, not UTF-8, or not JSON."""
    if len(data) > max_bytes:
        raise JsonRejected(f"larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise JsonRejected("not UTF-8") from None
    if depth(text) > max_depth:
        raise JsonRejected(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except JsonRejected:
        raise
    except ValueError:  # json.JSONDecodeError, or an integer of more than 4300 digits
        raise JsonRejected("not JSON") from None
