"""The login gate between a listener's attempt and the token service.

A listener sets ``GATE`` for the task that checks a client's password; the token service asks it
before it starts a key derivation (at most one in flight per account and per source: the others
are refused at once, not queued) and tells it which password was wrong (a repeat of the same
wrong password is not counted twice). Outside a login (the CLI, tests of the service alone) no
gate is set and nothing is limited.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Protocol

from proxy.secret import Secret


class UnlockGate(Protocol):
    def begin_derivation(self) -> Callable[[], None] | None:
        """The release function of a claimed derivation, or None: refuse this attempt."""

    def wrong_password(self, password: Secret) -> None:
        """The password opened nothing (called before the failure is counted)."""


GATE: ContextVar[UnlockGate | None] = ContextVar("xoauth2_proxy_unlock_gate", default=None)
