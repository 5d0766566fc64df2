"""One login attempt's bookkeeping, the same for every listener: the throttle gate before the
password is checked, the padded reply to a failed password, the wording of an upstream's
refusal by its kind, and the one log line and metrics at the end."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from proxy import logs, metrics
from proxy.protocol.events import Failure, ReplyKind
from proxy.protocol.login_reply import SMTP_AUTH_DISABLED
from proxy.server.limits import Throttle


def unreachable(host: str) -> str:
    return f"The mail server {host} cannot be reached right now; try again later."


@dataclass(frozen=True)
class Refusal:
    """A login the upstream did not accept, as the client and the log see it: ``failure``
    picks the reply form, ``result`` is the log line's and metric's result, ``text`` the
    reply's sentence (with the server's own text)."""

    failure: Failure
    result: str
    text: str


def upstream_refusal(kind: ReplyKind, code: str, server_text: str, *, host: str, mailbox: str,
                     permission: str) -> Refusal:
    """How a refusal of ``kind`` is answered. An authentication failure (after the one retry)
    is ``[AUTHENTICATIONFAILED]``/``[AUTH]``/``535``; a temporary one stays temporary
    (``[UNAVAILABLE]``/``[SYS/TEMP]``/``454 4.7.0``: the client retries, it does not ask for a
    new password); anything else is for an administrator (``[CONTACTADMIN]``/``[SYS/PERM]``/
    ``454 4.3.5``). ``permission`` names what the mailbox must be allowed (``SMTP AUTH`` …)."""
    if kind is ReplyKind.AUTH_FAILED:
        return Refusal(Failure.UPSTREAM_REJECTED, "upstream_rejected",
                       f"The mail server refused the login for {mailbox}: {server_text} "
                       f"(check the mailbox's permission for {permission})")
    if kind is ReplyKind.TEMPORARY:
        return Refusal(Failure.UNAVAILABLE, "upstream_unavailable",
                       f"The mail server {host} cannot log {mailbox} in right now: "
                       f"{server_text} (try again later)")
    assert kind is ReplyKind.OTHER, kind
    if code == SMTP_AUTH_DISABLED:
        advice = ("SMTP AUTH is disabled for this mailbox or its organisation; an administrator "
                  "must enable authenticated SMTP for the mailbox")
    else:
        advice = "a new password will not help; ask the administrator"
    return Refusal(Failure.CONTACT_ADMIN, "upstream_rejected",
                   f"The mail server refused the login for {mailbox}: {server_text} ({advice})")


class LoginAttempt:
    def __init__(self, throttle: Throttle, log: logging.Logger, *, protocol: str, listener: str,
                 user: str, peer: str, peer_host: str, mechanism: str) -> None:
        self.throttle, self.log, self.protocol, self.listener = throttle, log, protocol, listener
        self.user, self.peer, self.peer_host, self.mechanism = user, peer, peer_host, mechanism
        self.started = time.monotonic()

    def refusal(self) -> str | None:
        """The reply text if this account or source is locked out (the attempt is then over)."""
        locked = self.throttle.locked(self.user, self.peer_host)
        if locked <= 0:
            return None
        self.finish("throttled", "locked out after repeated failures")
        return f"Too many failed logins; try again in {int(locked) + 1} seconds."

    async def bad_credentials(self) -> None:
        """Count the failure and wait out its delay, measured from the attempt's start, so a
        wrong password and an unknown account take the same time (no timing oracle)."""
        delay = self.throttle.failure(self.user, self.peer_host)
        await asyncio.sleep(max(0.0, self.started + delay - time.monotonic()))

    def good_credentials(self) -> None:
        self.throttle.success(self.user, self.peer_host)

    def finish(self, result: str, reason: str = "", **fields: Any) -> None:
        elapsed = time.monotonic() - self.started
        metrics.LOGINS.labels(self.protocol, result).inc()
        if result == "ok":
            metrics.UPSTREAM_LOGIN_SECONDS.labels(self.protocol).observe(elapsed)
        logs.event(self.log, logging.INFO if result == "ok" else logging.WARNING, "login",
                   protocol=self.protocol, listener=self.listener, account=self.user[:200],
                   peer=self.peer, mechanism=self.mechanism, result=result,
                   reason=reason or None, latency=elapsed, **fields)
