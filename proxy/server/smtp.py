"""The SMTP listener: aiosmtpd in front, one upstream session (a ``MessageSink``) behind each
client.

aiosmtpd's ``SMTP`` protocol (``smtp_protocol.ProxySMTP``) runs on the daemon's own loop
(``loop.create_server``, no threaded ``Controller``). It speaks EHLO, STARTTLS, AUTH and the
mail commands; ``SmtpFront`` (one per connection) is its handler:

- AUTH PLAIN/LOGIN (``smtp_auth``) with the *local* password goes through the login pipeline
  (``pipeline``: throttle, token, ``UpstreamSession.open`` over verified TLS with AUTH
  XOAUTH2, one retry with a fresh token on an authentication failure, and only then). The
  AUTH reply is its verdict: 235, ``535 5.7.8`` (password, authorisation, refused token),
  ``454 4.7.0`` (identity platform or upstream unreachable, or a temporary refusal: a device
  retries later) or ``454 4.3.5`` (proxy misconfigured for the account, or the upstream
  refused for another reason, such as ``535 5.7.139``).
- MAIL, RCPT, RSET and DATA go to the transaction relay (``smtp_transaction``), which speaks
  to the upstream only as a ``MessageSink``; the front holds the sink for it (``SinkLink``):
  logs in again when the upstream closed an idle session, and consults the relay rules
  (``smtp_relay.RelayRules``) at MAIL FROM. NOOP and QUIT go to the upstream session as
  well. An upstream that drops or stalls mid-session gets the client ``421 4.4.2``.

Without AUTH, MAIL is refused (``530 5.7.0``) unless the listener has ``[[relay]]`` rules: a
device a rule allows goes upstream as the rule's account (its token unlocked by the service
key).

AUTH before TLS is offered only to loopback peers (or with ``allow_insecure_non_loopback``),
decided per connection here rather than by aiosmtpd's ``auth_require_tls``, which would also
hide AUTH on implicit-TLS listeners. aiosmtpd's own logger (``mail.log``) logs every command
line at INFO and every DATA line at DEBUG; it is filtered down to errors (``quiet_aiosmtpd``),
so no content and no AUTH payload reaches a log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException

from proxy import __version__, logs
from proxy.auth.gate import GATE
from proxy.auth.service import TokenService
from proxy.config import Limits, Listener, Upstream
from proxy.graph.route import GraphRoute, service_session
from proxy.graph.sink import GraphSink
from proxy.protocol.events import Failure
from proxy.secret import Secret
from proxy.server.connection import Connection
from proxy.server.endpoint import writable
from proxy.server.limits import PreauthLimiter, Throttle
from proxy.server.listener import ListenerBase, ListenerSettings
from proxy.server.logins import LoginAttempt, ProvenGate
from proxy.server.pipeline import Denied, Granted, PasswordToken, Pipeline
from proxy.server.smtp_auth import Credentials, read_login, read_plain
from proxy.server.smtp_protocol import ProxySMTP, quiet_aiosmtpd
from proxy.server.smtp_relay import Decision, RelayRefused, RelayRules, seed_metrics
from proxy.server.smtp_sink import FAILURE_STATUS, MessageSink, SinkLost
from proxy.server.smtp_transaction import Ready, TransactionRelay
from proxy.server.smtp_upstream import SmtpOpener, UpstreamSession
from proxy.text import one_line

log = logging.getLogger("proxy.smtp")

CLIENT_IDLE = 300.0  # seconds of client silence before the connection is closed (RFC 5321: 5 min)
MAX_MESSAGE_SIZE = 64 * 1024 * 1024  # advertised SIZE; lowered to the upstream's after login

def failure_reply(failure: Failure, text: str) -> str:
    code, status = FAILURE_STATUS[failure]
    return f"{code} {status} {one_line(text)}"


def _local_name() -> str:
    name = socket.gethostname()
    return name if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", name) else "localhost"


class SmtpContext:
    """What every connection of one SMTP listener shares; a reload pushes new settings."""

    def __init__(self, settings: ListenerSettings, tokens: TokenService, throttle: Throttle,
                 preauth: PreauthLimiter) -> None:
        self.tokens, self.throttle, self.preauth = tokens, throttle, preauth
        self.hostname = _local_name()
        self.reconfigure(settings)

    def reconfigure(self, settings: ListenerSettings) -> None:
        """New sessions use ``settings`` (SMTP keeps no warm connections)."""
        self.listener: Listener = settings.listener
        self.upstream: Upstream = settings.upstream
        self.upstream_tls, self.server_tls = settings.upstream_tls, settings.server_tls
        self.limits: Limits = settings.limits
        self.relay = RelayRules(settings.listener.name, settings.relay_rules)
        self.graph: GraphRoute | None = settings.graph
        seed_metrics(settings.relay_rules)

    def opener(self) -> SmtpOpener:
        return SmtpOpener(self.upstream, self.upstream_tls, self.hostname)


class SmtpFront:
    """One client connection: aiosmtpd's handler (auth mechanisms and hooks), the holder of
    its upstream session (the transaction relay's ``SinkLink``) and its bookkeeping."""

    def __init__(self, ctx: SmtpContext,
                 on_connect: Callable[[SmtpFront], None] | None = None) -> None:
        self.ctx = ctx
        self.on_connect = on_connect
        self.server: ProxySMTP | None = None
        self.conn = Connection(ctx.listener, ctx.preauth, None)
        self.transactions = TransactionRelay(self, self.conn)
        self.credentials: tuple[str, Secret] | None = None
        self.upstream: UpstreamSession | GraphSink | None = None
        self.device_account: str | None = None  # set once a device's session went upstream
        self._gone: asyncio.Future[None] | None = None

    # --- what ProxySMTP asks (smtp_protocol.FrontHandler) ---------------------------------

    @property
    def limits(self) -> Limits:
        return self.ctx.limits

    @property
    def logged_in(self) -> bool:
        return self.conn.account is not None

    @property
    def peer(self) -> str:
        return self.conn.peer

    @property
    def rcpt_refused(self) -> int:
        return self.transactions.rcpt_refused

    @property
    def normalise_line_endings(self) -> bool:
        return self.ctx.listener.bare_line_endings == "normalise"

    def admit(self, transport: asyncio.BaseTransport) -> bytes | None:
        """None if the client may go on; else the reply line that refuses it."""
        self.conn.identify(transport.get_extra_info("peername"))
        return self.conn.admit(b"554 5.7.1",
                               b"421 4.7.0 Too many connections; try again later\r\n")

    def connected(self, server: ProxySMTP, transport: asyncio.BaseTransport) -> None:
        self.server = server
        self._gone = server.loop.create_future()
        self.conn.opened()
        if self.ctx.listener.tls == "implicit":
            self.conn.handshake_done(transport.get_extra_info("ssl_object"))
        if self.on_connect is not None:
            self.on_connect(self)

    def lost(self) -> None:
        self.conn.release_preauth()
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    async def relay_message(self, server: ProxySMTP) -> str | bytes:
        return await self.transactions.message(server)

    # --- life -------------------------------------------------------------------------------

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
            self.drop()
            self.conn.closed(messages=self.transactions.messages)

    def handle_STARTTLS(self, server: SMTP, session: Session, envelope: Envelope) -> bool:
        """aiosmtpd's hook once a STARTTLS handshake has completed: count it, go on."""
        transport = server.transport
        self.conn.handshake_done(
            transport.get_extra_info("ssl_object") if transport is not None else None)
        return True

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            logs.event(log, logging.INFO, "tls_failed", protocol="smtp", peer=self.peer,
                       reason=repr(error.__cause__))
            return "454 4.7.0 TLS handshake failed"
        log.error("smtp_session_failed", exc_info=error,
                  extra={"fields": {"peer": self.peer, "account": self.conn.account}})
        if self.server is not None:
            self.server.close_soon()
        return "421 4.3.0 Internal error in the proxy; closing connection"

    # --- AUTH ---------------------------------------------------------------------------

    def _auth_allowed(self, server: SMTP) -> bool:
        return self.conn.may_send_password(
            tls_active=server.session is not None and server.session.ssl is not None)

    async def _refuse_without_tls(self, server: SMTP) -> bool:
        if self._auth_allowed(server):
            return False
        hint = "; use STARTTLS first" if server.tls_context else ""
        await server.push(f"538 5.7.11 Encryption required for requested authentication "
                          f"mechanism{hint}")
        return True

    async def auth_PLAIN(self, server: ProxySMTP, args: list[str]) -> AuthResult:
        return await self._auth(server, args, read_plain, "PLAIN")

    async def auth_LOGIN(self, server: ProxySMTP, args: list[str]) -> AuthResult:
        return await self._auth(server, args, read_login, "LOGIN")

    async def _auth(self, server: ProxySMTP, args: list[str],
                    read: Callable[[ProxySMTP, list[str]], Awaitable[Credentials | None]],
                    mechanism: str) -> AuthResult:
        if await self._refuse_without_tls(server):
            return AuthResult(success=False, handled=True)
        credentials = await read(server, args)
        if credentials is None:  # answered already
            return AuthResult(success=False, handled=True)
        return await self._login(server, *credentials, mechanism)

    async def _login(self, server: ProxySMTP, user: str, password: Secret,
                     mechanism: str) -> AuthResult:
        if not user.isprintable():  # keeps log lines and the upstream's SASL intact
            await server.push("501 5.5.2 The user name has control characters")
            return AuthResult(success=False, handled=True)
        verdict = await self._attempted(user, password, mechanism)
        route = self.ctx.graph
        if (isinstance(verdict, Denied) and route is not None
                and route.falls_back(verdict.reason, user.strip().lower(), verdict.kind)):
            verdict = await self._attempted(user, password, mechanism)
        if isinstance(verdict, Denied):
            return AuthResult(success=False, handled=False,
                              message=failure_reply(verdict.failure, verdict.text))
        if route is not None and not isinstance(verdict.upstream, GraphSink):
            route.smtp_worked(verdict.account.name)
        self.drop()  # AUTH again after STARTTLS: the old session is done
        self.credentials = (user, password)
        # The session's later token requests (a reconnect, a Graph submission) pass this gate:
        # a key derivation still takes its turn, but counts no failure.
        GATE.set(ProvenGate(self.ctx.throttle, user, self.conn.peer_host))
        self._adopt(verdict.upstream, verdict.account.name)
        upstream = verdict.upstream
        if upstream.size_limit and (not server.data_size_limit
                                    or upstream.size_limit < server.data_size_limit):
            server.data_size_limit = upstream.size_limit
        return AuthResult(success=True, auth_data=verdict.account.name)

    async def _attempted(self, user: str, password: Secret, mechanism: str
                         ) -> Granted[UpstreamSession] | Granted[GraphSink] | Denied:
        """One login attempt through the pipeline; the attempt is let go when it is decided
        (the session keeps nothing of it)."""
        conn = self.conn
        attempt = LoginAttempt(self.ctx.throttle, log, protocol="smtp",
                               listener=self.ctx.listener.name, user=user, peer=conn.peer,
                               peer_host=conn.peer_host, mechanism=mechanism)
        try:
            return await self._pipeline(user, password, attempt).run()
        finally:
            attempt.leave()

    def _pipeline(self, user: str, password: Secret, attempt: LoginAttempt | None
                  ) -> Pipeline[UpstreamSession] | Pipeline[GraphSink]:
        tokens, route = self.ctx.tokens, self.ctx.graph
        if route is not None and route.wanted(user.strip().lower()):  # Microsoft Graph
            return route.pipeline(tokens, user, password, attempt, MAX_MESSAGE_SIZE,
                                  client_tls=self.conn.tls_version)
        return Pipeline(tokens, PasswordToken(tokens, user, password, "smtp"), self.ctx.opener(),
                        attempt=attempt, permission="SMTP AUTH",
                        client_tls=self.conn.tls_version)

    def _adopt(self, upstream: UpstreamSession | GraphSink, account: str) -> None:
        self.upstream = upstream
        self.transactions.in_transaction = False
        self.conn.logged_in(account)
        upstream.log_fields = {"account": account, "peer": self.conn.peer}

    # --- session hooks --------------------------------------------------------------------

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument EHLO hook
        await self.transactions.abandon()
        allowed = self._auth_allowed(server)
        out = [r for r in responses if allowed or not r.startswith("250-AUTH ")]
        out[-1:-1] = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return out

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname
        await self.transactions.abandon()
        return f"250 {server.hostname}"

    async def handle_RSET(self, server: ProxySMTP, session: Session, envelope: Envelope) -> Any:
        return await self.transactions.reset(server) or "250 2.0.0 OK"

    async def handle_NOOP(self, server: ProxySMTP, session: Session, envelope: Envelope,
                          arg: str) -> Any:
        upstream = self.upstream
        if upstream is None or not upstream.connected:
            return "250 2.0.0 OK"
        reply = await self.transactions.command(server, lambda _: upstream.noop())
        return reply if isinstance(reply, str) else reply.wire()

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        upstream, self.upstream = self.upstream, None
        reply = await upstream.quit() if upstream is not None else None
        return reply.wire() if reply is not None and reply.code == 221 else "221 2.0.0 Bye"

    async def handle_MAIL(self, server: ProxySMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> Any:
        return await self.transactions.mail(server, session, envelope, address, options)

    async def handle_RCPT(self, server: ProxySMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> Any:
        return await self.transactions.rcpt(server, envelope, address, options)

    # --- the transaction relay's SinkLink -------------------------------------------------

    def current(self) -> MessageSink | None:
        upstream = self.upstream
        return upstream if upstream is not None and upstream.connected else None

    def drop(self) -> None:
        if self.upstream is not None:
            self.upstream.drop()
            self.upstream = None

    async def ready(self, server: ProxySMTP, authenticated: bool, sender: str) -> Ready | str:
        relay = self.ctx.relay
        if not authenticated and not relay:
            return "530 5.7.0 Authentication required"
        try:
            decision = relay.decide(self.conn, self.conn.account if authenticated else None,
                                    sender)
            if not authenticated:
                assert decision.rule is not None
                await self._device_session(decision, sender)
        except RelayRefused as refused:
            return refused.reply
        sink = self.current()
        if sink is None:
            failed = await self._reconnect(server)
            if failed is not None:
                return failed
            sink = self.current()
            assert sink is not None
        return Ready(sink, decision.sender, decision.rule)

    async def _device_session(self, decision: Decision, sender: str) -> None:
        """Up as the device's rule's account (again, if the upstream dropped the session or
        the rule's account changed); raises ``RelayRefused`` (logged)."""
        rule = decision.rule
        assert rule is not None
        if self.current() is not None and self.device_account == rule.account:
            return
        self.drop()
        try:
            upstream = await service_session(self.ctx.graph, self.ctx.tokens, self.ctx.opener(),
                                             rule)
        except RelayRefused as refused:
            self.ctx.relay.refused(self.conn, rule, sender, refused)
            raise
        first = self.device_account is None
        self.device_account = rule.account
        self._adopt(upstream, rule.account)
        logs.event(log, logging.INFO, "relay_session" if first else "upstream_reconnected",
                   protocol="smtp", listener=self.ctx.listener.name, rule=rule.name,
                   account=rule.account, peer=self.conn.peer)

    async def _reconnect(self, server: ProxySMTP) -> str | None:
        """The upstream closed an idle session: log in again with the client's credentials."""
        if self.credentials is None:
            return self.transactions.lost(server, SinkLost("no upstream session"))
        verdict = await self._pipeline(*self.credentials, None).run()
        if isinstance(verdict, Denied):
            logs.event(log, logging.WARNING, "upstream_reconnect_failed", protocol="smtp",
                       account=self.conn.account, peer=self.conn.peer, reason=verdict.reason)
            server.close_soon()
            return "421 4.4.2 The mail server cannot be reached again right now; try again later"
        self._adopt(verdict.upstream, verdict.account.name)
        logs.event(log, logging.INFO, "upstream_reconnected", protocol="smtp",
                   account=self.conn.account, peer=self.conn.peer)
        return None


class SmtpListener(ListenerBase):
    """One SMTP listener; the daemon drives it like its IMAP/POP listeners."""

    def __init__(self, settings: ListenerSettings, tokens: TokenService, throttle: Throttle,
                 preauth: PreauthLimiter) -> None:
        super().__init__()
        self.ctx: SmtpContext = SmtpContext(settings, tokens, throttle, preauth)
        quiet_aiosmtpd()

    def _factory(self) -> ProxySMTP:
        ctx = self.ctx
        return ProxySMTP(
            SmtpFront(ctx, on_connect=self._spawn),
            data_size_limit=MAX_MESSAGE_SIZE,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=ctx.hostname,
            ident=f"ESMTP xoauth2-proxy {__version__}",
            tls_context=ctx.server_tls if ctx.listener.tls == "starttls" else None,
            timeout=CLIENT_IDLE,
            auth_required=False,  # checked at MAIL (aiosmtpd would warn per connection)
            auth_require_tls=False,  # decided per connection: Connection.may_send_password
            loop=asyncio.get_running_loop(),
        )

    def _spawn(self, front: SmtpFront) -> None:
        task = asyncio.get_running_loop().create_task(front.life(), name=f"{self.name} session")
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)


__all__ = ["SmtpFront", "SmtpListener", "failure_reply"]
