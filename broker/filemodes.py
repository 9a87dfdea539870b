"""File modes in configuration (`unixSocketMode: 0660`, an agent sink's `mode: 0600`).

YAML reads `0660` as octal but `660` as decimal, and the environment gives strings. One type
for every setting that takes a file mode: `Annotated[int, FileMode("0660")]` reads a string
as octal ("0660", "0o660") and refuses anything outside 0-0777, with the example in the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema


@dataclass(frozen=True)
class FileMode:
    """Pydantic metadata for an int field holding a file mode; `example` is shown in errors."""

    example: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        checked = core_schema.no_info_after_validator_function(self._in_range, handler(source))
        return core_schema.no_info_before_validator_function(self._octal, checked)

    def _octal(self, value: object) -> object:
        """A string is read as octal; anything else is left to the int validation."""
        if isinstance(value, str):
            try:
                return int(value.removeprefix("0o"), 8)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an octal file mode such as {self.example}"
                ) from None
        return value

    def _in_range(self, value: int) -> int:
        if not 0 <= value <= 0o777:
            # YAML `660` is decimal 660 (0o1224): almost surely meant 0660.
            raise ValueError(f"{value} is not a file mode; write it in octal, e.g. {self.example}")
        return value
