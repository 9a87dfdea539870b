"""SPIFFE IDs, checked as the SPIFFE ID specification defines them, and the policy's patterns.

A SPIFFE ID is `spiffe://<trust domain>[/<segment>...]`:

- the scheme is exactly `spiffe` (lowercase), followed by `://`;
- the trust domain is 1 to 255 characters of lowercase letters, digits, `.`, `-` and `_`;
- each path segment is letters, digits, `.`, `-` and `_`; never empty (no `//`, no trailing
  `/`), never `.` or `..`;
- at most 2048 bytes in all.

Those character sets leave no room for percent-encoding (`%`), a query (`?`), a fragment (`#`),
a port (`:`) or userinfo (`@`): an ID with any of them is invalid, not normalised.

A pattern (a policy subject's `name`) has the same shape and rules, except that a path segment
may contain `*` (any characters within that one segment, none included), or be `**` (one or
more whole segments, at most once per pattern). The trust domain is always exact. Patterns are
matched segment by segment against valid IDs only: `*` never matches a `/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Final

SCHEME: Final = "spiffe://"
MAX_ID_BYTES: Final = 2048
MAX_TRUST_DOMAIN_CHARS: Final = 255
ANY_DEPTH: Final = "**"

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_PATTERN_SEGMENT = re.compile(r"[A-Za-z0-9._*-]+")


def looks_like_spiffe(text: str) -> bool:
    """A name meant as a SPIFFE ID (or pattern), valid or not: its scheme is `spiffe`."""
    return text[:7].lower() == "spiffe:"


def spiffe_id_problem(text: str) -> str | None:
    """Why `text` is not a valid SPIFFE ID; None when it is one."""
    return _problem(text, pattern=False)


def _problem(text: str, *, pattern: bool) -> str | None:
    if not text.startswith(SCHEME):
        return "a SPIFFE ID starts with spiffe:// (lowercase)"
    if len(text.encode("utf-8")) > MAX_ID_BYTES:
        return f"longer than {MAX_ID_BYTES} bytes"
    trust_domain, slash, path = text[len(SCHEME) :].partition("/")
    if not trust_domain:
        return "no trust domain"
    if len(trust_domain) > MAX_TRUST_DOMAIN_CHARS:
        return f"the trust domain is longer than {MAX_TRUST_DOMAIN_CHARS} characters"
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        exact = " (and is matched exactly: no wildcards)" if pattern else ""
        return (
            f"trust domain {trust_domain!r}: only lowercase letters, digits, '.', '-' and '_'"
            f" (no port, userinfo, query or fragment){exact}"
        )
    if not slash:
        return None
    segments = path.split("/")
    if pattern and segments.count(ANY_DEPTH) > 1:
        return f"{ANY_DEPTH!r} may appear once"
    for segment in segments:
        if not segment:
            return "an empty path segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"a {segment!r} path segment"
        if pattern and "**" in segment and segment != ANY_DEPTH:
            return f"path segment {segment!r}: '**' is a whole segment of its own"
        allowed = _PATTERN_SEGMENT if pattern else _SEGMENT
        if not allowed.fullmatch(segment):
            what = "letters, digits, '.', '-', '_'" + (" and '*'" if pattern else "")
            encoded = " (percent-encoding is not allowed)" if "%" in segment else ""
            return f"path segment {segment!r}: only {what}{encoded}"
    return None


@dataclass(frozen=True)
class SpiffePattern:
    """A validated pattern; `matches` takes valid SPIFFE IDs (see `spiffe_id_problem`)."""

    text: str
    trust_domain: str
    # Path segments before and after `**` (all of them in `head` when there is none).
    head: tuple[str, ...]
    tail: tuple[str, ...]
    any_depth: bool

    @classmethod
    def parse(cls, text: str) -> SpiffePattern:
        """ValueError saying what is wrong with `text` as a SPIFFE ID pattern."""
        problem = _problem(text, pattern=True)
        if problem is not None:
            raise ValueError(f"{text!r} is not a SPIFFE ID pattern: {problem}")
        trust_domain, slash, path = text[len(SCHEME) :].partition("/")
        segments = tuple(path.split("/")) if slash else ()
        if ANY_DEPTH in segments:
            i = segments.index(ANY_DEPTH)
            return cls(text, trust_domain, segments[:i], segments[i + 1 :], any_depth=True)
        return cls(text, trust_domain, segments, (), any_depth=False)

    @property
    def has_segment_wildcard(self) -> bool:
        """A `*` within a segment (which used to match across '/')."""
        return any("*" in s for s in (*self.head, *self.tail))

    def matches(self, spiffe_id: str) -> bool:
        trust_domain, slash, path = spiffe_id[len(SCHEME) :].partition("/")
        if trust_domain != self.trust_domain:
            return False
        segments = path.split("/") if slash else []
        head, tail = self.head, self.tail
        if not self.any_depth:
            return len(segments) == len(head) and all(map(_segment_matches, segments, head))
        if len(segments) < len(head) + len(tail) + 1:
            return False
        return all(map(_segment_matches, segments[: len(head)], head)) and all(
            map(_segment_matches, segments[len(segments) - len(tail) :], tail)
        )


def _segment_matches(segment: str, pattern: str) -> bool:
    # Neither holds a '/': fnmatch's `*` stays within the segment. (Python's fnmatch compiles
    # `*` so that many of them cannot backtrack catastrophically.)
    return segment == pattern if "*" not in pattern else fnmatchcase(segment, pattern)
