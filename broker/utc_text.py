"""Timestamps as text on the hot path: the whole second's text made once per second."""

from __future__ import annotations

import math
import time

# The last second utc_second_and_micros formatted, and its text.
_second: tuple[int, str] = (-1, "")


def utc_second_and_micros(timestamp: float) -> tuple[str, int]:
    """`YYYY-MM-DDTHH:MM:SS` (UTC) of `timestamp` and its microseconds, rounded half to even
    as `datetime.fromtimestamp` rounds them; the seconds' text is cached for the second."""
    global _second
    fraction, whole = math.modf(timestamp)
    seconds = int(whole)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        seconds += 1
        micros -= 1_000_000
    elif micros < 0:
        seconds -= 1
        micros += 1_000_000
    cached_second, text = _second
    if cached_second != seconds:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text)
    return text, micros
