"""Go durations (`time.ParseDuration`), as kubectl's --duration and the policy file take them."""

from __future__ import annotations

import re
from decimal import Decimal

_GO_UNITS = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    # Go accepts both micro signs: U+00B5 and U+03BC.
    "\u00b5s": Decimal("1e-6"),
    "\u03bcs": Decimal("1e-6"),
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_GO_PART = re.compile("([0-9]+(?:[.][0-9]*)?|[.][0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> Decimal:
    """Seconds in a Go duration: "10m", "1h30m", "1.5h", "3600s", "0"; signed."""
    value = text.strip()
    sign = -1 if value.startswith("-") else 1
    if value[:1] in ("+", "-"):
        value = value[1:]
    if value == "0":
        return Decimal(0)
    pos, total = 0, Decimal(0)
    while pos < len(value):
        match = _GO_PART.match(value, pos)
        if match is None:
            break
        total += Decimal(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if not value or pos != len(value):
        raise ValueError(f'invalid duration "{text}" (examples: 10m, 1h, 1h30m, 3600s)')
    return sign * total
