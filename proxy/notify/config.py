"""``[[notify]]`` targets in the config: where operator events go.

Each target has a ``type`` — ``command``, ``webhook`` or ``email`` — and optional filters::

    [[notify]]
    type = "webhook"
    url = "https://ntfy.example.org/mail-proxy"
    events = ["authorisation_needed", "reauthorised"]   # default: every kind
    accounts = ["alice@contoso.com"]                      # default: every account
    repeat_after = 3600      # seconds before the same (event, account) is sent again
    retries = 5              # delivery attempts after the first, with back-off
    timeout = 10

``command``: ``argv = ["/usr/local/bin/page-me"]``, the event in environment variables.
``webhook``: ``url`` (https), ``ca_file`` (else the system's trust store).
``email``: ``account`` (the sending account), ``password_file`` (its device password),
``to = [...]``, ``listener`` (the proxy's own SMTP listener it is sent through),
``server_name`` (the name in that listener's certificate, if it has TLS), ``ca_file``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from proxy.config.reader import Table
from proxy.notify.events import KINDS

TargetKind = Literal["command", "webhook", "email"]
_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>.][^@\s<>]*")


@dataclass(frozen=True)
class NotifyTarget:
    name: str
    type: TargetKind
    events: tuple[str, ...] = KINDS
    accounts: tuple[str, ...] = ()  # empty: every account
    repeat_after: float = 3600.0
    retries: int = 5
    timeout: float = 10.0
    refresh_failing_minutes: float = 15.0
    argv: tuple[str, ...] = ()
    url: str = ""
    ca_file: Path | None = None
    account: str = ""
    password_file: Path | None = None
    to: tuple[str, ...] = ()
    listener: str = ""
    server_name: str | None = None

    def wants(self, kind: str, account: str) -> bool:
        return kind in self.events and (not self.accounts or not account
                                        or account in self.accounts)


def _strings(t: Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = t.get(name, list, None)
    if value is None:
        return default
    if not value or not all(isinstance(v, str) and v for v in value):
        raise t.fail(name, "must be a non-empty list of non-empty strings")
    return tuple(value)


def read_notify(top: Table, accounts: dict[str, Any],
                listeners: dict[str, str]) -> tuple[NotifyTarget, ...]:
    """``[[notify]]`` → targets. ``listeners``: each listener's protocol, by name."""
    return tuple(_read_target(i, t, accounts, listeners) for i, t in enumerate(top.array("notify")))


def _read_target(index: int, t: Table, accounts: dict[str, Any],
                 listeners: dict[str, str]) -> NotifyTarget:
    kind = t.choice("type", ("command", "webhook", "email"))
    events = _strings(t, "events", KINDS)
    unknown = [e for e in events if e not in KINDS]
    if unknown:
        raise t.fail("events", f"unknown event {unknown[0]!r}; known: {', '.join(KINDS)}")
    common: dict[str, Any] = dict(
        name=t.text("name", f"{kind}-{index}"), type=kind, events=events,
        accounts=tuple(a.lower() for a in _strings(t, "accounts", ())),
        repeat_after=t.number("repeat_after", 3600.0, 0, 7 * 86_400),
        retries=int(t.number("retries", 5, 0, 100)),
        timeout=t.number("timeout", 10.0, 0.1, 600),
        refresh_failing_minutes=t.number("refresh_failing_minutes", 15.0, 0, 10_080))
    if kind == "command":
        target = NotifyTarget(**common, argv=_strings(t, "argv", ...))  # type: ignore[arg-type]
    elif kind == "webhook":
        url = t.text("url")
        if not url.startswith("https://"):
            raise t.fail("url", "must be an https:// URL (the event names accounts)")
        target = NotifyTarget(**common, url=url, ca_file=t.file_path("ca_file", must_exist=True))
    else:
        target = _read_email(t, common, accounts, listeners)
    t.done()
    return target


def _read_email(t: Table, common: dict[str, Any], accounts: dict[str, Any],
                listeners: dict[str, str]) -> NotifyTarget:
    account = t.text("account").lower()
    if account not in accounts:
        raise t.fail("account", f"{account!r} is not a configured account")
    to = _strings(t, "to", ...)  # type: ignore[arg-type]
    bad = [a for a in to if not _ADDRESS.fullmatch(a)]
    if bad:
        raise t.fail("to", f"{bad[0]!r} is not a mail address")
    smtp = [name for name, protocol in listeners.items() if protocol == "smtp"]
    listener = t.text("listener", smtp[0] if len(smtp) == 1 else ...,
                      required_hint="the SMTP listener the notification is sent through")
    if listeners.get(listener) != "smtp":
        raise t.fail("listener", f"no SMTP listener named {listener!r}")
    return NotifyTarget(**common, account=account, to=to, listener=listener,
                        password_file=t.file_path("password_file", must_exist=True),
                        server_name=t.text("server_name", None),
                        ca_file=t.file_path("ca_file", must_exist=True))
