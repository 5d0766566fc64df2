"""A string that never shows itself in a repr, a log line or a traceback."""

from __future__ import annotations

import hmac
from typing import Any


class Secret:
    """Wraps a password or token; ``reveal()`` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:  # equal secrets have equal lengths; the value stays out of it
        return hash(("Secret", len(self._value)))

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("a Secret is not to be pickled")
