"""The one login pipeline, the same for IMAP, POP3, SMTP AUTH and the SMTP relay for devices.

classify the client's credentials (the protocol's machine did) → throttle gate (reserve before
trying) → unlock the token file and get an access token → open the upstream and log in →
classify the upstream's answer (ok / authentication failure / temporary / other, by
``proxy.protocol.login_reply``) → at most one refresh-and-retry, on an authentication failure
only → a verdict (``Granted`` or ``Denied``), one log line and the login metrics.

A protocol contributes an ``UpstreamOpener`` (how to open and authenticate its upstream) and
words the ``Denied`` verdict in its own reply form; it never repeats a step of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from proxy.auth.errors import TokenError
from proxy.auth.service import TokenService
from proxy.config import Account
from proxy.config import Protocol as MailProtocol
from proxy.graph.settings import GraphResource
from proxy.protocol.events import Failure, ReplyKind, UpstreamBroken, UpstreamRejected
from proxy.secret import Secret
from proxy.server.logins import LoginAttempt, unreachable, upstream_refusal

U = TypeVar("U")


class UpstreamUnavailable(Exception):
    """The upstream cannot be reached, or did not complete TLS or its greeting; the message
    says why (for the log; the client hears ``logins.unreachable``)."""


class TokenSource(Protocol):
    """Where a login's access token comes from: the client's local password, or the token
    file's service key (a device the relay rules let in)."""

    @property
    def name(self) -> str:
        """The account's name."""

    async def token(self, rejected: str | None = None) -> str:
        """A valid token; with ``rejected``, a different one (raises ``TokenError``)."""


@dataclass(frozen=True)
class PasswordToken:
    tokens: TokenService
    name: str
    password: Secret
    protocol: MailProtocol | GraphResource

    async def token(self, rejected: str | None = None) -> str:
        return await self.tokens.access_token(self.name, self.password, self.protocol,
                                              rejected=rejected)


@dataclass(frozen=True)
class ServiceToken:
    tokens: TokenService
    name: str
    protocol: MailProtocol | GraphResource

    async def token(self, rejected: str | None = None) -> str:
        return await self.tokens.service_token(self.name, self.protocol, rejected=rejected)


class UpstreamOpener(Protocol[U]):
    """How one protocol opens and authenticates its upstream."""

    @property
    def host(self) -> str: ...

    async def open(self, mailbox: str, token: str) -> U | UpstreamRejected | UpstreamBroken:
        """A logged-in upstream, or the upstream's refusal (its connection closed); raises
        ``UpstreamUnavailable``."""

    def tls_version(self, upstream: U) -> str | None:
        """The TLS version negotiated with the upstream (for the login's log line)."""


@dataclass(frozen=True)
class Granted(Generic[U]):
    upstream: U
    account: Account
    attempt: int


@dataclass(frozen=True)
class Denied:
    """A login that did not happen: ``failure`` picks the protocol's reply form, ``text`` is
    the sentence the client sees, ``result``/``reason`` what the log and metrics say.
    ``error`` is the token service's error when it decided, ``kind`` the upstream's refusal
    kind when the upstream did."""

    failure: Failure
    text: str
    result: str
    reason: str
    error: TokenError | None = None
    kind: ReplyKind | None = None


def token_refused(exc: TokenError) -> Denied:
    """The token service's refusal as the client's reply: its ``user_text`` says what to do
    (for a refresh token the identity platform refused: who must authorise again)."""
    return Denied(exc.failure, exc.user_text, exc.result, exc.detail, error=exc)


class Pipeline(Generic[U]):
    """One login through the pipeline. ``attempt`` (the throttle gate, log line and metrics)
    is None for a login that is not a client's (the relay's device, an SMTP reconnect)."""

    def __init__(self, tokens: TokenService, source: TokenSource, opener: UpstreamOpener[U], *,
                 attempt: LoginAttempt | None, permission: str,
                 client_tls: str | None = None) -> None:
        self.tokens, self.source, self.opener, self.attempt = tokens, source, opener, attempt
        self.permission, self.client_tls = permission, client_tls

    def _finish(self, denied: Denied, **fields: object) -> Denied:
        if self.attempt is not None:
            self.attempt.finish(denied.result, denied.reason, **fields)
        return denied

    async def run(self) -> Granted[U] | Denied:
        attempt = self.attempt
        if attempt is not None:
            refusal = attempt.refusal()  # the throttle gate: locked out, or a failure reserved
            if refusal is not None:
                return Denied(Failure.THROTTLED, refusal, "throttled", "")
        try:
            token = await self.source.token()
            account = self.tokens.account(self.source.name)
        except TokenError as exc:
            if exc.failure is Failure.BAD_CREDENTIALS and attempt is not None:
                await attempt.bad_credentials()
            return self._finish(token_refused(exc))
        if attempt is not None:
            attempt.good_credentials()
        return await self._log_in(account, token)

    async def _log_in(self, account: Account, token: str) -> Granted[U] | Denied:
        opener = self.opener
        for attempt in (1, 2):
            try:
                outcome = await opener.open(account.mailbox, token)
            except UpstreamUnavailable as exc:
                return self._finish(Denied(Failure.UNAVAILABLE, unreachable(opener.host),
                                           "upstream_unavailable", str(exc)))
            again = attempt if attempt > 1 else None
            if isinstance(outcome, UpstreamBroken):
                return self._finish(Denied(
                    Failure.UNAVAILABLE, f"The mail server {opener.host} did not complete the "
                                         "login; try again later.",
                    "upstream_unavailable", outcome.text))
            if not isinstance(outcome, UpstreamRejected):
                if self.attempt is not None:
                    self.attempt.finish("ok", attempt=again, tls=self.client_tls,
                                        upstream_tls=opener.tls_version(outcome))
                return Granted(outcome, account, attempt)
            if outcome.kind is ReplyKind.AUTH_FAILED and attempt == 1:
                # A token the service thought valid was refused: refresh once, and only then.
                try:
                    token = await self.source.token(rejected=token)
                except TokenError as exc:
                    return self._finish(token_refused(exc))
                continue
            refused = upstream_refusal(outcome.kind, outcome.code, outcome.text,
                                       host=opener.host, mailbox=account.mailbox,
                                       permission=self.permission)
            return self._finish(Denied(refused.failure, refused.text, refused.result,
                                       outcome.text, kind=outcome.kind),
                                upstream_reply=outcome.kind.value, attempt=again)
        raise AssertionError("unreachable")


__all__ = ["Denied", "Granted", "PasswordToken", "Pipeline", "ServiceToken", "TokenSource",
           "UpstreamOpener", "UpstreamUnavailable", "token_refused"]
