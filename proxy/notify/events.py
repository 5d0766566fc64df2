"""Operator events: what the proxy tells people about, kept in one place.

``publish(kind, account, **fields)`` records an event (the admin page shows the recent ones)
and hands it to every subscriber (the notifier's delivery queue). It never blocks and never
raises: a login that publishes an event goes on whatever the subscribers do.

Kinds (the ``event`` field of every notification):

- ``authorisation_needed``: an account's refresh token was refused; with ``url``,
  ``user_code`` and ``expires_at`` when an in-band device-code flow runs for it
- ``refresh_failing``: an account's token refresh has kept failing (not refused: the identity
  platform unreachable or erring) for ``minutes``
- ``reauthorised``: an account has new tokens (``via``: ``in_band`` or ``admin``)
- ``source_locked_out``: a client address was locked out after failed logins (``source``)
- ``smtp_fallback``: sending switched between SMTP and Microsoft Graph (``state``)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("proxy.notify")

KINDS = ("authorisation_needed", "refresh_failing", "reauthorised", "source_locked_out",
         "smtp_fallback")


@dataclass(frozen=True)
class Event:
    kind: str
    account: str  # "" when the event is not about an account (a locked-out source)
    fields: dict[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, str]:
        """What deduplication counts as the same incident."""
        return self.kind, self.account or self.fields.get("source", "")

    def summary(self) -> str:
        """One line a person reads (a subject, a chat message)."""
        f = self.fields
        who = self.account or f.get("source", "")
        if self.kind == "authorisation_needed" and f.get("user_code"):
            return (f"Authorisation needed for {who}: open {f.get('url')} and enter "
                    f"{f.get('user_code')} before {_clock(f.get('expires_at'))}")
        return {
            "authorisation_needed": f"Authorisation needed for {who}: mail has stopped",
            "refresh_failing": f"Token refresh for {who} has failed for {f.get('minutes')} "
                               f"minutes ({f.get('reason', '')})",
            "reauthorised": f"{who} is authorised again; mail flows",
            "source_locked_out": f"Client address {who} was locked out after failed logins",
            "smtp_fallback": f"Sending for {who or 'all accounts'} switched to "
                             f"{f.get('state', '?')}",
        }.get(self.kind, f"{self.kind} {who}")

    def as_dict(self) -> dict[str, str]:
        return {"event": self.kind, "account": self.account, "time": _iso(self.at),
                "summary": self.summary(), **self.fields}


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _clock(value: str | None) -> str:
    try:
        return _iso(float(value or ""))
    except ValueError:
        return "it expires"


class Hub:
    def __init__(self, keep: int = 200) -> None:
        self.recent: deque[Event] = deque(maxlen=keep)
        self.subscribers: list[Callable[[Event], None]] = []

    def publish(self, kind: str, account: str = "", **fields: object) -> Event:
        event = Event(kind, account, {k: str(v) for k, v in fields.items() if v is not None})
        self.recent.append(event)
        for subscriber in list(self.subscribers):
            try:
                subscriber(event)
            except Exception:  # noqa: BLE001 - a broken subscriber never fails the caller
                log.exception("notify subscriber failed")
        return event


HUB = Hub()


def publish(kind: str, account: str = "", **fields: object) -> Event:
    """Record and dispatch an operator event (see the module docstring for the kinds)."""
    return HUB.publish(kind, account, **fields)


class RefreshWatch:
    """Publishes ``refresh_failing`` once an account's refreshes have failed (not been
    refused: that is ``authorisation_needed``) for ``after`` seconds, once per incident."""

    def __init__(self, after: float = 900.0) -> None:
        self.after = after
        self.failing_since: dict[str, float] = {}
        self.told: set[str] = set()

    def failed(self, account: str, reason: str) -> None:
        now = time.monotonic()
        since = self.failing_since.setdefault(account, now)
        if now - since >= self.after and account not in self.told:
            self.told.add(account)
            publish("refresh_failing", account, minutes=round((now - since) / 60), reason=reason)

    def succeeded(self, account: str) -> None:
        self.failing_since.pop(account, None)
        self.told.discard(account)


WATCH = RefreshWatch()
