"""One login attempt's bookkeeping, the same for every listener: the throttle gate before the
password is checked, the padded reply to a failed password, the wording of an upstream's
refusal by its kind, and the one log line and metrics at the end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy import logs, metrics
from proxy.auth.gate import GATE
from proxy.protocol.events import Failure, ReplyKind
from proxy.protocol.login_reply import SMTP_AUTH_DISABLED
from proxy.secret import Secret
from proxy.server.limits import Reservation, Throttle


def throttled_text(seconds: float) -> str:
    return f"Too many failed logins; try again in {int(seconds) + 1} seconds."


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


class _Gate:
    """What the task's gate holds for an attempt until it leaves. Callbacks registered during
    the login (the upstream socket's reader) keep a copy of the task's context, and with it
    this object, for the connection's life; the attempt itself is let go. Asked after that,
    it refuses a key derivation."""

    __slots__ = ("attempt",)

    def __init__(self, attempt: LoginAttempt) -> None:
        self.attempt: LoginAttempt | None = attempt

    def begin_derivation(self) -> Callable[[], None] | None:
        return None if self.attempt is None else self.attempt.begin_derivation()

    def wrong_password(self, password: Secret) -> None:
        if self.attempt is not None:
            self.attempt.wrong_password(password)


class ProvenGate:
    """The gate for a session whose password was proven already (an SMTP session's later
    token requests: an upstream reconnect, a Graph submission): its key derivation, if any,
    still takes its turn, but counts no failure."""

    __slots__ = ("throttle", "user", "peer_host")

    def __init__(self, throttle: Throttle, user: str, peer_host: str) -> None:
        self.throttle, self.user, self.peer_host = throttle, user, peer_host

    def begin_derivation(self) -> Callable[[], None] | None:
        return self.throttle.begin_derivation(
            Reservation(self.user, self.peer_host, (), counted=True, settled=True))

    def wrong_password(self, password: Secret) -> None:
        pass


class LoginAttempt:
    """One attempt: past the lockout check, its failure reserved before a password is tried
    (when the key derivation is claimed), settled once.

    Creating it sets the token service's gate (``proxy.auth.gate``) for the current task, so the
    service asks this attempt before it starts a key derivation and tells it a wrong password."""

    def __init__(self, throttle: Throttle, log: logging.Logger, *, protocol: str, listener: str,
                 user: str, peer: str, peer_host: str, mechanism: str) -> None:
        self.throttle, self.log, self.protocol, self.listener = throttle, log, protocol, listener
        self.user, self.peer, self.peer_host, self.mechanism = user, peer, peer_host, mechanism
        self.started = time.monotonic()
        self.reservation: Reservation | None = None
        self._wrong_tag: bytes | None = None
        self._gate = _Gate(self)
        self._gate_token = GATE.set(self._gate)

    def leave(self) -> None:
        """Unset the task's gate again (once, in the task that created the attempt): a
        session that only relays after its login keeps no attempt for its lifetime."""
        self._gate.attempt = None
        GATE.reset(self._gate_token)

    def refusal(self) -> str | None:
        """The reply text if this account and source are locked out (the attempt is then
        over)."""
        reserved = self.throttle.reserve(self.user, self.peer_host)
        if isinstance(reserved, Reservation):
            self.reservation = reserved
            return None
        self.finish("throttled", "locked out after repeated failures")
        return throttled_text(reserved)

    # --- the token service's gate ---------------------------------------------------------

    def begin_derivation(self) -> Callable[[], None] | None:
        if self.reservation is None or self.reservation.settled:  # proven already
            return ProvenGate(self.throttle, self.user, self.peer_host).begin_derivation()
        return self.throttle.begin_derivation(self.reservation)

    def wrong_password(self, password: Secret) -> None:
        self._wrong_tag = self.throttle.password_tag(password.reveal())

    # --- verdicts -----------------------------------------------------------------------

    async def bad_credentials(self) -> None:
        """Count the failure and wait out its delay, measured from the attempt's start, so a
        wrong password, an unknown account and an account without tokens take the same time."""
        if self.reservation is None or self.reservation.settled:
            delay = self.throttle.failure(self.user, self.peer_host, self._wrong_tag)
        else:
            delay = self.throttle.failed(self.reservation, self._wrong_tag)
        await asyncio.sleep(max(0.0, self.started + delay - time.monotonic()))

    def good_credentials(self) -> None:
        if self.reservation is not None and not self.reservation.settled:
            self.throttle.succeeded(self.reservation)

    def finish(self, result: str, reason: str = "", **fields: Any) -> None:
        """Log the attempt's end; a failure still reserved and not decided is given back."""
        if self.reservation is not None and not self.reservation.settled:
            self.throttle.release(self.reservation)
        elapsed = time.monotonic() - self.started
        metrics.LOGINS.labels(self.protocol, result).inc()
        if result == "ok":
            metrics.UPSTREAM_LOGIN_SECONDS.labels(self.protocol).observe(elapsed)
        logs.event(self.log, logging.INFO if result == "ok" else logging.WARNING, "login",
                   protocol=self.protocol, listener=self.listener, account=self.user[:200],
                   peer=self.peer, mechanism=self.mechanism, result=result,
                   reason=reason or None, latency=elapsed, **fields)
