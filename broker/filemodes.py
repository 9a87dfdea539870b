"""File modes in configuration (`unixSocketMode: 0660`, an agent sink's `mode: 0600`).

YAML reads `0660` as octal but `660` as decimal, and the environment gives strings; these two
checks are shared by every setting that takes a file mode.
"""

from __future__ import annotations


def octal_file_mode(value: object, example: str) -> object:
    """A string is read as octal ("0660", "0o660"); anything else is left to validation."""
    if isinstance(value, str):
        try:
            return int(value.removeprefix("0o"), 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal file mode such as {example}") from None
    return value


def check_file_mode(value: int, example: str) -> int:
    if not 0 <= value <= 0o777:
        # YAML `660` is decimal 660 (0o1224): almost surely meant 0660.
        raise ValueError(f"{value} is not a file mode; write it in octal, e.g. {example}")
    return value
