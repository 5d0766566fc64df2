"""The SMTP transaction relay: MAIL, RCPT, DATA and RSET of one client, to its sink.

The relay knows its upstream only as a ``MessageSink`` (``smtp_sink``), held for it by the
front (``SinkLink``: the front logs in, reconnects and applies the relay rules). Every reply
the client hears to a transaction command is the sink's, unchanged. After the sink's ``354``
the message streams through as it arrives, byte for byte and still dot-stuffed
(``ProxySMTP.message_chunks``, which finds the end with ``DataScanner``), and the client hears
the sink's reply to the end of data — so a ``250`` the client sees is a message the sink
accepted. A message over the size limit, a bare line ending or a lost sink ends the
transaction with ``abort`` (never an end of data). One log line per message: envelope only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiosmtpd.smtp import Envelope, Session

from proxy import logs, metrics
from proxy.config import RelayRule
from proxy.server.connection import Connection
from proxy.server.smtp_protocol import BareLineEndingRefused, ProxySMTP
from proxy.server.smtp_relay import count
from proxy.server.smtp_sink import END_TIMEOUT, MessageSink, Reply, SinkLost, queue_id

log = logging.getLogger("proxy.smtp")

LOST = ("421 4.4.2 Connection to the mail server lost; any message in progress was not sent, "
        "try again")


@dataclass(frozen=True)
class Ready:
    """What a MAIL FROM goes to: the sink, the envelope sender to give it, and the relay rule
    that decided (None for a logged-in session no rule applies to)."""

    sink: MessageSink
    sender: str
    rule: RelayRule | None = None


class SinkLink(Protocol):
    """The front's hold on a client's sink."""

    def current(self) -> MessageSink | None:
        """The sink of this session, None before login (or after it was dropped)."""

    async def ready(self, server: ProxySMTP, authenticated: bool, sender: str) -> Ready | str:
        """The sink for a new transaction from ``sender`` (logging in again if the upstream
        closed an idle session, or as a device's rule says), or the reply refusing it."""

    def drop(self) -> None:
        """Forget the sink (closing it at once): it is broken or was aborted."""


def bare_line_ending_reply(kind: str) -> str:
    return (f"550 5.6.11 Bare {kind} in the message: SMTP lines end with CR LF, and a mail "
            "server could end the message at a bare line ending; the message was not sent and "
            "the connection is closed. Fix the sender, or have the administrator set "
            "bare_line_endings = \"normalise\" on this listener")


def _result(reply: Reply) -> str:
    return "accepted" if reply.positive else "deferred" if reply.code < 500 else "rejected"


class TransactionRelay:
    """One client's transactions. ``in_transaction``: the sink accepted MAIL and has not seen
    the end of data (an abandoned transaction is reset there first)."""

    def __init__(self, link: SinkLink, conn: Connection) -> None:
        self.link, self.conn = link, conn
        self.in_transaction = False
        self.rcpt_refused = 0
        self.messages = 0
        self.rule: RelayRule | None = None  # the relay rule of the current transaction

    async def mail(self, server: ProxySMTP, session: Session, envelope: Envelope,
                   address: str, options: list[str]) -> str | bytes:
        ready = await self.link.ready(server, bool(session.authenticated), address)
        if isinstance(ready, str):
            return ready
        self.rule = ready.rule
        await self.abandon()
        self.rcpt_refused = 0
        reply = await self.command(server, lambda sink: sink.mail(ready.sender, options))
        if not isinstance(reply, Reply):
            return reply
        if reply.positive:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            self.in_transaction = True
        return reply.wire()

    async def rcpt(self, server: ProxySMTP, envelope: Envelope, address: str,
                   options: list[str]) -> str | bytes:
        reply = await self.command(server, lambda sink: sink.rcpt(address, options))
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

    async def reset(self, server: ProxySMTP) -> str | bytes | None:
        """RSET at the sink; None before login (aiosmtpd's own answer)."""
        self.in_transaction = False
        if self.link.current() is None:
            return None
        reply = await self.command(server, lambda sink: sink.reset())
        return reply.wire() if isinstance(reply, Reply) else reply

    async def message(self, server: ProxySMTP) -> str | bytes:
        """DATA at the sink; on its ``354`` the message streams through as the client sends
        it, and the client hears the sink's reply to the end of data (or to DATA itself)."""
        envelope, started = server.envelope, time.monotonic()
        assert envelope is not None
        sink = self.link.current()
        reply = await self.command(server, lambda sink: sink.data())
        if not isinstance(reply, Reply):
            return reply  # the sink is gone: 421
        if reply.code != 354:
            # The sink's transaction stays open (aiosmtpd resets ours): the next MAIL or EHLO
            # resets it first (in_transaction).
            self._logged(envelope, 0, reply, _result(reply), started)
            return reply.wire()
        await server.push(reply.wire())
        assert sink is not None  # it answered DATA
        finished = False
        try:
            end = await self._stream(server, sink)
            finished = end is not None
        except SinkLost as exc:
            self._logged(envelope, server.data_scanner.size, None, "failed", started,
                         reason=str(exc))
            return self.lost(server, exc)
        except BareLineEndingRefused as exc:
            self._logged(envelope, server.data_scanner.size, None, "rejected", started,
                         reason=f"{exc}: the connection is closed without an end of data "
                                "upstream")
            return bare_line_ending_reply(exc.kind)
        finally:
            server.hold_idle_timer(None)
            if not finished:  # never let the sink see an end of data
                self.in_transaction = False
                await sink.abort()
                self.link.drop()
        if end is None:
            text = (f"552 5.3.4 Message too big: the mail server takes at most "
                    f"{server.data_size_limit} bytes")
            self._logged(envelope, server.data_scanner.size, None, "rejected", started,
                         reason=text)
            return text
        self.in_transaction = False  # after the end of data the sink's transaction is over
        self._logged(envelope, server.data_scanner.size, end, _result(end), started)
        if end.code == 421:
            server.close_soon()
        return end.wire()

    async def _stream(self, server: ProxySMTP, sink: MessageSink) -> Reply | None:
        """The message to the sink, chunk by chunk; the sink's reply to its end, or None when
        it ran over the size limit (read to its end, the rest not passed on)."""
        limit, too_big = server.data_size_limit, False
        async with contextlib.aclosing(server.message_chunks()) as chunks:
            async for chunk, last in chunks:
                too_big = too_big or bool(limit and server.data_scanner.size > limit)
                if too_big:
                    continue  # read to the end of the message, forward nothing more
                if chunk:  # never the end-of-data line's ".CRLF": that is the sink's to send
                    await sink.write(chunk)
                if not last:
                    continue
                server.hold_idle_timer(END_TIMEOUT + 60)  # the client awaits the sink
                return await sink.end()
        return None

    async def abandon(self) -> None:
        """The client's transaction ended without the sink knowing (EHLO, a refused DATA,
        aiosmtpd's own 552): reset the sink's, quietly."""
        sink = self.link.current()
        if self.in_transaction and sink is not None:
            self.in_transaction = False
            try:
                await sink.reset()
            except SinkLost:
                self.link.drop()
        self.in_transaction = False

    async def command(self, server: ProxySMTP,
                       send: Callable[[MessageSink], Awaitable[Reply]]) -> Reply | str:
        """One command at the sink; the reply, or (the sink lost) a 421 for the client."""
        sink = self.link.current()
        if sink is None:
            return self.lost(server, SinkLost("no upstream session"))
        try:
            reply = await send(sink)
        except SinkLost as exc:
            return self.lost(server, exc)
        if reply.code == 421:  # the upstream is closing: so does this connection
            server.close_soon()
        return reply

    def lost(self, server: ProxySMTP, exc: SinkLost) -> str:
        logs.event(log, logging.WARNING, "upstream_lost", protocol="smtp",
                   account=self.conn.account, peer=self.conn.peer, reason=str(exc))
        self.link.drop()
        self.in_transaction = False
        server.close_soon()
        return LOST

    def _logged(self, envelope: Envelope, size: int, reply: Reply | None, result: str,
                started: float, reason: str | None = None) -> None:
        if result == "accepted":
            self.messages += 1
        metrics.SMTP_MESSAGES.labels(result).inc()
        rule = self.rule
        if rule is not None:
            count(rule, result)
        logs.event(log, logging.INFO if result == "accepted" else logging.WARNING, "message",
                   protocol="smtp", listener=self.conn.listener.name, account=self.conn.account,
                   rule=rule.name if rule is not None else None, peer=self.conn.peer,
                   sender=envelope.mail_from, envelope_sender=rule.force_sender if rule else None,
                   recipients=len(envelope.rcpt_tos),
                   rejected_recipients=self.rcpt_refused or None, size=size,
                   queue_id=queue_id(reply.text) if reply is not None and reply.positive else None,
                   result=result, reply=str(reply)[:300] if reply is not None else None,
                   reason=reason, latency=time.monotonic() - started)


__all__ = ["LOST", "Ready", "SinkLink", "TransactionRelay", "bare_line_ending_reply"]
