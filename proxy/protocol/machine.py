"""What the sans-I/O machines share: their legal state changes, each machine's in one table
(h11's "Rule 1"), enforced with ``ProtocolMisuse`` (never with ``assert``, which ``python -O``
removes), and which driver call each state allows."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from proxy.protocol.events import ProtocolMisuse

S = TypeVar("S", bound=enum.Enum)


class Rules(Generic[S]):
    """One machine's rules: ``moves`` maps a state to the states it may change to; ``calls``
    maps a driver call (``"receive"``, ``"tls_started"`` …) to the states it is allowed in."""

    def __init__(self, moves: Mapping[S, Iterable[S]],
                 calls: Mapping[str, Iterable[S]] | None = None) -> None:
        self._moves = {old: frozenset(new) for old, new in moves.items()}
        self._calls = {name: frozenset(states) for name, states in (calls or {}).items()}

    def move(self, old: S, new: S) -> S:
        """``new``, if the machine may change from ``old`` to it; else ``ProtocolMisuse``."""
        if new not in self._moves.get(old, ()):
            raise ProtocolMisuse(f"{old.value} -> {new.value} is not allowed")
        return new

    def call(self, name: str, state: S) -> None:
        """``ProtocolMisuse`` unless the driver may call ``name`` in ``state``."""
        if state not in self._calls[name]:
            raise ProtocolMisuse(f"{name}() is not allowed in state {state.value}")


__all__ = ["Rules"]
