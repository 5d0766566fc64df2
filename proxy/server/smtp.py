"""The SMTP listener: aiosmtpd in front, one aiosmtplib XOAUTH2 session behind each client.

aiosmtpd's ``SMTP`` protocol (``smtp_protocol.ProxySMTP``) runs on the daemon's own loop
(``loop.create_server``, no threaded ``Controller``). It speaks EHLO, STARTTLS, AUTH and the
mail commands; ``ConnectionHandler`` (one per connection) supplies the async
``auth_PLAIN``/``auth_LOGIN`` mechanisms and the ``handle_*`` hooks:

- AUTH PLAIN/LOGIN with the *local* password → token service → ``UpstreamSession.open``
  (verified TLS, EHLO, AUTH XOAUTH2, one retry with a fresh token if the upstream refuses the
  first as an authentication failure, and only then). The AUTH reply is the verdict of that
  whole chain: 235, ``535 5.7.8`` (password, authorisation, refused token), ``454 4.7.0``
  (identity platform or upstream unreachable, or the upstream answered the login with a
  temporary failure: a device retries later) or ``454 4.3.5`` (proxy misconfigured for the
  account, or the upstream refused for another reason, such as ``535 5.7.139``).
- MAIL, RCPT, RSET, NOOP and DATA go to the upstream as the client sent them and the
  upstream's reply goes back unchanged. After its ``354`` the message streams through as it
  arrives, byte for byte and still dot-stuffed (``relay_message``), and the client hears the
  upstream's reply to the final dot — so a ``250`` the client sees is a message the upstream
  accepted. A message over the size limit is cut off by dropping the upstream session (never
  by an end of data) and refused ``552``. QUIT ends both sessions.
- An upstream that drops or stalls mid-session gets the client ``421 4.4.2`` and a close.

Without AUTH, MAIL is refused (``530 5.7.0``) unless the listener has ``[[relay]]`` rules:
then ``smtp_relay.RelayHandler`` decides by source address and sender, and a device a rule
allows goes upstream as the rule's account (its token unlocked by the service key).

AUTH before TLS is offered only to loopback peers (or with ``allow_insecure_non_loopback``),
decided per connection here rather than by aiosmtpd's ``auth_require_tls``, which would also
hide AUTH on implicit-TLS listeners. aiosmtpd's own logger (``mail.log``) logs every command
line at INFO and every DATA line at DEBUG; it is filtered down to errors (``quiet_aiosmtpd``),
so no content and no AUTH payload reaches a log. One log line per message: envelope only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException

from proxy import __version__, logs, metrics
from proxy.auth.errors import TokenError
from proxy.auth.service import TokenService
from proxy.config import Config, Listener, RelayRule, Upstream
from proxy.protocol.events import Failure, ReplyKind
from proxy.protocol.sasl import SaslError, b64decode_strict, decode_plain
from proxy.secret import Secret
from proxy.server.limits import PreauthLimiter, Throttle, is_loopback
from proxy.server.listener import ListenerBase
from proxy.server.logins import LoginAttempt, unreachable, upstream_refusal
from proxy.server.session import source_refused
from proxy.server.smtp_protocol import BareLineEndingRefused, ProxySMTP, quiet_aiosmtpd, writable
from proxy.server.smtp_relay import RelayHandler, RelayRefused, count, seed_metrics
from proxy.server.smtp_upstream import (
    DATA_END_TIMEOUT,
    Reply,
    UpstreamLost,
    UpstreamRejected,
    UpstreamSession,
    UpstreamUnavailable,
    queue_id,
)
from proxy.server.tls import handshake_done

log = logging.getLogger("proxy.smtp")

CLIENT_IDLE = 300.0  # seconds of client silence before the connection is closed (RFC 5321: 5 min)
MAX_MESSAGE_SIZE = 64 * 1024 * 1024  # advertised SIZE; lowered to the upstream's after login
_REPLY_TEXT_LIMIT = 400  # an SMTP reply line is at most 512 octets

_FAILURE_REPLY = {
    Failure.BAD_CREDENTIALS: "535 5.7.8",
    Failure.AUTHORISATION_NEEDED: "535 5.7.8",
    Failure.UPSTREAM_REJECTED: "535 5.7.8",
    Failure.UNAVAILABLE: "454 4.7.0",
    Failure.THROTTLED: "454 4.7.0",
    Failure.CONTACT_ADMIN: "454 4.3.5",
}
_USERNAME_CHALLENGE = b"VXNlcm5hbWU6"  # "Username:"
_PASSWORD_CHALLENGE = b"UGFzc3dvcmQ6"  # "Password:"


def _text(text: str) -> str:
    """One reply line of our own: printable, no CR/LF, length capped."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat[:_REPLY_TEXT_LIMIT]


def failure_reply(failure: Failure, text: str) -> str:
    return f"{_FAILURE_REPLY[failure]} {_text(text)}"


def _local_name() -> str:
    name = socket.gethostname()
    return name if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", name) else "localhost"


class SmtpContext:
    """What every connection of one SMTP listener shares."""

    def __init__(self, listener: Listener, upstream: Upstream, tokens: TokenService,
                 upstream_tls: ssl.SSLContext, server_tls: ssl.SSLContext | None,
                 throttle: Throttle, preauth: PreauthLimiter) -> None:
        self.listener, self.upstream, self.tokens = listener, upstream, tokens
        self.upstream_tls, self.server_tls = upstream_tls, server_tls
        self.throttle, self.preauth = throttle, preauth
        self.hostname = _local_name()

    def reconfigure(self, upstream: Upstream, upstream_tls: ssl.SSLContext) -> None:
        """A reload: new sessions use ``upstream`` (SMTP keeps no warm connections)."""
        self.upstream, self.upstream_tls = upstream, upstream_tls

    def relay_rules(self) -> tuple[RelayRule, ...]:
        """This listener's ``[[relay]]`` rules, from the current config (a reload applies)."""
        return self.tokens.config.relay_rules(self.listener.name)


class ConnectionHandler(RelayHandler):
    """One client connection: aiosmtpd's handler (auth mechanisms and hooks) and its state."""

    def __init__(self, ctx: SmtpContext,
                 on_connect: Callable[[ConnectionHandler], None] | None = None) -> None:
        self.ctx = ctx
        self.on_connect = on_connect
        self.server: ProxySMTP | None = None
        self.peer = "?"
        self.peer_host = ""
        self.account: str | None = None
        self.credentials: tuple[str, Secret] | None = None
        self.upstream: UpstreamSession | None = None
        self.in_transaction = False  # the upstream accepted MAIL and has not seen the final dot
        self.rcpt_refused = 0
        self.messages = 0
        self.started = time.monotonic()
        self._gone: asyncio.Future[None] | None = None
        self.preauth_slot = False  # holds one of the pre-login connection slots
        self.tls_version: str | None = None  # the client's, once TLS is up

    def admit(self, transport: asyncio.BaseTransport) -> bytes | None:
        """None if the client may go on; else the reply line that refuses it."""
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else ""
        if not self.ctx.listener.admits(host):
            return b"554 5.7.1 " + source_refused(self.ctx.listener, host) + b"\r\n"
        if not self.ctx.preauth.admit(host):
            logs.event(log, logging.WARNING, "connection_refused", protocol="smtp",
                       peer=host, reason="too many connections before login")
            return b"421 4.7.0 Too many connections; try again later\r\n"
        self.preauth_slot = True
        return None

    def release_preauth(self) -> None:
        if self.preauth_slot:
            self.preauth_slot = False
            self.ctx.preauth.release(self.peer_host)

    # --- life -----------------------------------------------------------------------------

    def connected(self, server: ProxySMTP, transport: asyncio.BaseTransport) -> None:
        self.server = server
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "?")
        self.peer_host = peer[0] if isinstance(peer, tuple) else ""
        self._gone = server.loop.create_future()
        labels = ("smtp", self.ctx.listener.name)
        metrics.CONNECTIONS.labels(*labels).inc()
        metrics.CONNECTIONS_ACTIVE.labels(*labels).inc()
        if self.ctx.listener.tls == "implicit":
            self._handshake_done(transport)
        if self.on_connect is not None:
            self.on_connect(self)

    def _handshake_done(self, transport: asyncio.BaseTransport | None) -> None:
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        self.tls_version = handshake_done(self.ctx.listener, ssl_object, self.peer,
                                          self.peer_host)

    def handle_STARTTLS(self, server: SMTP, session: Session, envelope: Envelope) -> bool:
        """aiosmtpd's hook once a STARTTLS handshake has completed: count it, go on."""
        self._handshake_done(server.transport)
        return True

    def lost(self) -> None:
        self.release_preauth()
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    async def life(self) -> None:
        """Runs while the client is connected; cancelling it (daemon stop) says 421 and closes."""
        assert self._gone is not None and self.server is not None
        try:
            await self._gone
        except asyncio.CancelledError:
            transport = writable(self.server.transport)
            if transport is not None:
                transport.write(b"421 4.3.2 Proxy shutting down; try again later\r\n")
                transport.close()
            raise
        finally:
            if self.upstream is not None:
                self.upstream.close()
            metrics.CONNECTIONS_ACTIVE.labels("smtp", self.ctx.listener.name).dec()
            if self.account is not None:
                logs.event(log, logging.INFO, "session_end", protocol="smtp",
                           account=self.account, peer=self.peer, messages=self.messages,
                           duration=time.monotonic() - self.started)

    # --- AUTH -----------------------------------------------------------------------------

    def _tls_active(self, server: SMTP) -> bool:
        return self.ctx.listener.tls == "implicit" or (
            server.session is not None and server.session.ssl is not None)

    def _auth_allowed(self, server: SMTP) -> bool:
        return (self._tls_active(server) or self.ctx.listener.allow_insecure_non_loopback
                or is_loopback(self.peer_host))

    async def _refuse_without_tls(self, server: SMTP) -> bool:
        if self._auth_allowed(server):
            return False
        hint = "; use STARTTLS first" if server.tls_context else ""
        await server.push(f"538 5.7.11 Encryption required for requested authentication "
                          f"mechanism{hint}")
        return True

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if await self._refuse_without_tls(server):
            return AuthResult(success=False, handled=True)
        if len(args) == 1:
            raw = await server.challenge_auth(b"", encode_to_b64=False)  # "334 "
            if raw is MISSING:  # aiosmtpd has answered (501 for "*" or bad base64)
                return AuthResult(success=False, handled=True)
            assert isinstance(raw, bytes)
            response = base64.b64encode(raw)
        else:
            response = args[1].encode("utf-8", "surrogateescape")
        try:
            user, password = decode_plain(response)
        except SaslError as exc:
            await server.push(f"501 5.5.2 {exc}")
            return AuthResult(success=False, handled=True)
        return await self._login(server, user, password, "PLAIN")

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if await self._refuse_without_tls(server):
            return AuthResult(success=False, handled=True)
        try:
            if len(args) == 2:
                raw_user: object = b64decode_strict(args[1].encode("utf-8", "surrogateescape"))
            else:
                raw_user = await server.challenge_auth(_USERNAME_CHALLENGE, encode_to_b64=False)
            if raw_user is MISSING:
                return AuthResult(success=False, handled=True)
            raw_password = await server.challenge_auth(_PASSWORD_CHALLENGE, encode_to_b64=False)
            if raw_password is MISSING:
                return AuthResult(success=False, handled=True)
            assert isinstance(raw_user, bytes) and isinstance(raw_password, bytes)
            user = raw_user.decode("utf-8").strip()
            password = Secret(raw_password.decode("utf-8"))
        except SaslError:
            await server.push("501 5.5.2 Can't decode base64")
            return AuthResult(success=False, handled=True)
        except UnicodeDecodeError:
            await server.push("501 5.5.2 User name and password must be UTF-8")
            return AuthResult(success=False, handled=True)
        if not user or not password.reveal():
            await server.push("501 5.5.2 Empty user name or password")
            return AuthResult(success=False, handled=True)
        return await self._login(server, user, password, "LOGIN")

    async def _login(self, server: SMTP, user: str, password: Secret,
                     mechanism: str) -> AuthResult:
        if not user.isprintable():  # keeps log lines and the upstream's SASL intact
            await server.push("501 5.5.2 The user name has control characters")
            return AuthResult(success=False, handled=True)
        login = LoginAttempt(self.ctx.throttle, log, protocol="smtp", listener=self.ctx.listener.name,
                             user=user, peer=self.peer, peer_host=self.peer_host,
                             mechanism=mechanism)
        finish = login.finish
        refusal = login.refusal()
        if refusal is not None:
            return _refused(failure_reply(Failure.THROTTLED, refusal))
        try:
            upstream, account, attempt = await self._open_upstream(
                user, password, proven=login.good_credentials)
        except TokenError as exc:
            if exc.failure is Failure.BAD_CREDENTIALS:
                await login.bad_credentials()
            finish(exc.result, exc.detail)
            return _refused(failure_reply(exc.failure, exc.user_text))
        except UpstreamUnavailable as exc:
            finish("upstream_unavailable", str(exc))
            return _refused(failure_reply(Failure.UNAVAILABLE, unreachable(self.ctx.upstream.host)))
        except _Refused as exc:
            refused = upstream_refusal(exc.kind, exc.code, exc.text, host=self.ctx.upstream.host,
                                       mailbox=exc.mailbox, permission="SMTP AUTH")
            finish(refused.result, exc.text, upstream_reply=exc.kind.value,
                   attempt=exc.attempt if exc.attempt > 1 else None)
            return _refused(failure_reply(refused.failure, refused.text))
        if self.upstream is not None:  # AUTH again after STARTTLS: the old session is done
            self.upstream.close()
        self.upstream, self.account, self.credentials = upstream, account, (user, password)
        self.in_transaction = False
        self._adopt_size(server, upstream)
        self.release_preauth()
        finish("ok", attempt=attempt if attempt > 1 else None, tls=self.tls_version,
               upstream_tls=upstream.tls_version)
        return AuthResult(success=True, auth_data=account)

    async def _open_upstream(self, user: str, password: Secret,
                             proven: Callable[[], None] | None = None,
                             ) -> tuple[UpstreamSession, str, int]:
        """Token, then upstream login; a token refused as an authentication failure is
        replaced once (``rejected=``), any other refusal ends the attempt at once.
        ``proven`` is called once the password has unlocked the token: as on IMAP and POP3,
        that clears the throttle, whatever the upstream then says."""
        ctx = self.ctx
        token = await ctx.tokens.access_token(user, password, "smtp")
        if proven is not None:
            proven()
        account = ctx.tokens.account(user)
        for attempt in (1, 2):
            try:
                session = await UpstreamSession.open(ctx.upstream, ctx.upstream_tls,
                                                     account.mailbox, token,
                                                     local_name=ctx.hostname)
                return session, account.name, attempt
            except UpstreamRejected as exc:
                if exc.kind is not ReplyKind.AUTH_FAILED or attempt == 2:
                    raise _Refused(account.mailbox, exc, attempt) from None
                token = await ctx.tokens.access_token(user, password, "smtp", rejected=token)
        raise AssertionError("unreachable")

    @staticmethod
    def _adopt_size(server: SMTP, upstream: UpstreamSession) -> None:
        if upstream.size_limit and (not server.data_size_limit
                                    or upstream.size_limit < server.data_size_limit):
            server.data_size_limit = upstream.size_limit

    # --- session hooks --------------------------------------------------------------------

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument EHLO hook
        await self._abandon_transaction()
        allowed = self._auth_allowed(server)
        out = [r for r in responses if allowed or not r.startswith("250-AUTH ")]
        out[-1:-1] = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return out

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname
        await self._abandon_transaction()
        return f"250 {server.hostname}"

    async def handle_RSET(self, server: ProxySMTP, session: Session, envelope: Envelope) -> Any:
        self.in_transaction = False
        return await self._forward(server, session, b"RSET") or "250 2.0.0 OK"

    async def handle_NOOP(self, server: ProxySMTP, session: Session, envelope: Envelope,
                          arg: str) -> Any:
        return await self._forward(server, session, b"NOOP") or "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        upstream, self.upstream = self.upstream, None
        reply = await upstream.quit() if upstream is not None else None
        return reply.wire() if reply is not None and reply.code == 221 else "221 2.0.0 Bye"

    async def handle_MAIL(self, server: ProxySMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> Any:
        if not session.authenticated and not self.ctx.relay_rules():
            return "530 5.7.0 Authentication required"
        try:
            sender = await self.relay_sender(bool(session.authenticated), address)
        except RelayRefused as refused:
            return refused.reply
        if self.upstream is None or not self.upstream.connected:
            failed = await self._reconnect(server)
            if failed is not None:
                return failed
        await self._abandon_transaction()
        self.rcpt_refused = 0
        path = b"<>" if sender in ("", "<>") else b"<" + _raw(sender) + b">"  # aiosmtpd: "<>"
        args = [b"MAIL", b"FROM:" + path, *(_raw(o) for o in options)]
        reply = await self._command(server, *args)
        if isinstance(reply, Reply) and reply.positive:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            self.in_transaction = True
        return reply.wire() if isinstance(reply, Reply) else reply

    async def handle_RCPT(self, server: ProxySMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> Any:
        args = [b"RCPT", b"TO:<" + _raw(address) + b">", *(_raw(o) for o in options)]
        reply = await self._command(server, *args)
        if not isinstance(reply, Reply):
            return reply
        if reply.positive:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
            metrics.SMTP_RECIPIENTS.labels("accepted").inc()
        else:
            self.rcpt_refused += 1
            metrics.SMTP_RECIPIENTS.labels("rejected").inc()
        return reply.wire()

    async def relay_message(self, server: ProxySMTP) -> str | bytes:
        """DATA upstream; on its ``354`` the message streams through as the client sends it,
        and the client hears the upstream's reply to the final dot (or to DATA itself)."""
        envelope, started = server.envelope, time.monotonic()
        assert envelope is not None
        reply = await self._command(server, b"DATA")
        if not isinstance(reply, Reply):
            return reply  # the upstream is gone: 421
        if reply.code != 354:
            # The upstream's transaction stays open (aiosmtpd resets ours): the next MAIL or
            # EHLO resets it first (in_transaction).
            self._message_logged(envelope, 0, reply, _result(reply), started)
            return reply.wire()
        await server.push(reply.wire())
        upstream, limit = self.upstream, server.data_size_limit
        assert upstream is not None
        too_big, finished = False, False
        try:
            async with contextlib.aclosing(server.message_chunks()) as chunks:
                async for chunk, last in chunks:
                    too_big = too_big or bool(limit and server.data_scanner.size > limit)
                    if too_big:
                        continue  # read to the end of the message, forward nothing more
                    if not last:
                        await upstream.write_message(chunk)
                        continue
                    server.hold_idle_timer(DATA_END_TIMEOUT + 60)  # the client awaits the upstream
                    reply = await upstream.end_message(chunk)
            finished = not too_big
        except UpstreamLost as exc:
            self._message_logged(envelope, server.data_scanner.size, None, "failed", started,
                                 reason=str(exc))
            return self._lost(server, exc)
        except BareLineEndingRefused as exc:
            self._message_logged(envelope, server.data_scanner.size, None, "rejected", started,
                                 reason=f"{exc}: the connection is closed without an end of "
                                        "data upstream")
            return bare_line_ending_reply(exc.kind)
        finally:
            server.hold_idle_timer(None)
            if not finished:  # never let the upstream see an end of data: drop the session
                upstream.close()
                self.upstream, self.in_transaction = None, False
        if too_big:
            text = f"552 5.3.4 Message too big: the mail server takes at most {limit} bytes"
            self._message_logged(envelope, server.data_scanner.size, None, "rejected", started,
                                 reason=text)
            return text
        self.in_transaction = False  # after the final dot the upstream's transaction is over
        self._message_logged(envelope, server.data_scanner.size, reply, _result(reply), started)
        if upstream.out_of_step:
            logs.event(log, logging.WARNING, "upstream_out_of_step", protocol="smtp",
                       account=self.account, peer=self.peer,
                       reason=f"{self.ctx.upstream.host} sent more than one reply to the end "
                              "of a message; its session is closed and the next message "
                              "opens a new one")
            self.upstream = None
        if reply.code == 421:
            server.close_soon()
        return reply.wire()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            logs.event(log, logging.INFO, "tls_failed", protocol="smtp", peer=self.peer,
                       reason=repr(error.__cause__))
            return "454 4.7.0 TLS handshake failed"
        log.error("smtp_session_failed", exc_info=error,
                  extra={"fields": {"peer": self.peer, "account": self.account}})
        if self.server is not None:
            self.server.close_soon()
        return "421 4.3.0 Internal error in the proxy; closing connection"

    # --- helpers --------------------------------------------------------------------------

    async def _forward(self, server: ProxySMTP, session: Session, verb: bytes) -> Any:
        """Forward a session command once upstream; None before (aiosmtpd's own answer)."""
        if self.upstream is None or not self.upstream.connected:
            return None
        reply = await self._command(server, verb)
        return reply.wire() if isinstance(reply, Reply) else reply

    async def _command(self, server: ProxySMTP, *args: bytes) -> Reply | str:
        """One command upstream; the reply, or (upstream lost) a 421 for the client."""
        if self.upstream is None:
            return self._lost(server, UpstreamLost("no upstream session"))
        try:
            reply = await self.upstream.command(*args)
        except UpstreamLost as exc:
            return self._lost(server, exc)
        if reply.code == 421:  # the upstream is closing: so does this connection
            server.close_soon()
        return reply

    def _lost(self, server: ProxySMTP, exc: UpstreamLost) -> str:
        logs.event(log, logging.WARNING, "upstream_lost", protocol="smtp", account=self.account,
                   peer=self.peer, reason=str(exc))
        if self.upstream is not None:
            self.upstream.close()
        self.upstream, self.in_transaction = None, False
        server.close_soon()
        return ("421 4.4.2 Connection to the mail server lost; any message in progress was not "
                "sent, try again")

    async def _abandon_transaction(self) -> None:
        """The client's transaction ended without the upstream knowing (EHLO, a refused DATA,
        aiosmtpd's own 552): reset the upstream's, quietly."""
        if self.in_transaction and self.upstream is not None and self.upstream.connected:
            self.in_transaction = False
            try:
                await self.upstream.command(b"RSET")
            except UpstreamLost:
                self.upstream.close()
        self.in_transaction = False

    async def _reconnect(self, server: ProxySMTP) -> str | None:
        """The upstream closed an idle session: log in again with the client's credentials."""
        if self.credentials is None:
            return self._lost(server, UpstreamLost("no upstream session"))
        user, password = self.credentials
        try:
            upstream, _, _ = await self._open_upstream(user, password)
        except (TokenError, UpstreamUnavailable, _Refused) as exc:
            logs.event(log, logging.WARNING, "upstream_reconnect_failed", protocol="smtp",
                       account=self.account, peer=self.peer, reason=str(exc))
            server.close_soon()
            return "421 4.4.2 The mail server cannot be reached again right now; try again later"
        self.upstream, self.in_transaction = upstream, False
        logs.event(log, logging.INFO, "upstream_reconnected", protocol="smtp",
                   account=self.account, peer=self.peer)
        return None

    def _message_logged(self, envelope: Envelope, size: int, reply: Reply | None,
                        result: str, started: float, reason: str | None = None) -> None:
        if result == "accepted":
            self.messages += 1
        metrics.SMTP_MESSAGES.labels(result).inc()
        rule = self.relay_rule
        if rule is not None:
            count(rule, result)
        logs.event(log, logging.INFO if result == "accepted" else logging.WARNING, "message",
                   protocol="smtp", listener=self.ctx.listener.name, account=self.account,
                   rule=rule.name if rule is not None else None, peer=self.peer,
                   sender=envelope.mail_from, envelope_sender=rule.force_sender if rule else None,
                   recipients=len(envelope.rcpt_tos),
                   rejected_recipients=self.rcpt_refused or None, size=size,
                   queue_id=queue_id(reply.text) if reply is not None and reply.positive else None,
                   result=result, reply=str(reply)[:300] if reply is not None else None,
                   reason=reason, latency=time.monotonic() - started)


class _Refused(Exception):
    """The upstream did not accept the login: for an authentication failure, twice (a fresh
    token included); otherwise at the first answer."""

    def __init__(self, mailbox: str, rejected: UpstreamRejected, attempt: int) -> None:
        super().__init__(rejected.text)
        self.mailbox, self.attempt = mailbox, attempt
        self.text, self.kind, self.code = rejected.text, rejected.kind, rejected.code


def bare_line_ending_reply(kind: str) -> str:
    return (f"550 5.6.11 Bare {kind} in the message: SMTP lines end with CR LF, and a mail "
            "server could end the message at a bare line ending; the message was not sent and "
            "the connection is closed. Fix the sender, or have the administrator set "
            "bare_line_endings = \"normalise\" on this listener")


def _result(reply: Reply) -> str:
    return "accepted" if reply.positive else "deferred" if reply.code < 500 else "rejected"


def _refused(status: str) -> AuthResult:
    return AuthResult(success=False, handled=False, message=status)


def _raw(text: str) -> bytes:
    """aiosmtpd decoded the command with surrogateescape (SMTPUTF8): the bytes again."""
    return text.encode("utf-8", "surrogateescape")


class SmtpListener(ListenerBase):
    """One SMTP listener; the daemon drives it like its IMAP/POP listeners."""

    def __init__(self, config: Config, listener: Listener, upstream: Upstream,
                 tokens: TokenService, upstream_tls: ssl.SSLContext,
                 server_tls: ssl.SSLContext | None, throttle: Throttle | None = None,
                 preauth: PreauthLimiter | None = None) -> None:
        super().__init__()
        self.ctx: SmtpContext = SmtpContext(listener, upstream, tokens, upstream_tls, server_tls,
                               throttle or Throttle(config.limits),
                               preauth or PreauthLimiter(config.limits))
        seed_metrics(config.relay_rules(listener.name))
        quiet_aiosmtpd()

    def _factory(self) -> ProxySMTP:
        ctx = self.ctx
        handler = ConnectionHandler(ctx, on_connect=self._spawn)
        return ProxySMTP(
            handler,
            data_size_limit=MAX_MESSAGE_SIZE,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=ctx.hostname,
            ident=f"ESMTP xoauth2-proxy {__version__}",
            tls_context=ctx.server_tls if ctx.listener.tls == "starttls" else None,
            timeout=CLIENT_IDLE,
            auth_required=False,  # checked in handle_MAIL (aiosmtpd would warn per connection)
            auth_require_tls=False,  # decided per connection: ConnectionHandler._auth_allowed
            loop=asyncio.get_running_loop(),
        )

    def _spawn(self, handler: ConnectionHandler) -> None:
        task = asyncio.get_running_loop().create_task(handler.life(), name=f"{self.name} session")
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)


__all__ = ["SmtpListener", "ConnectionHandler", "ProxySMTP", "quiet_aiosmtpd", "failure_reply"]
