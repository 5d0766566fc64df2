"""aiosmtpd's ``SMTP`` protocol as the SMTP listener runs it (see ``smtp`` for the handler).

``ProxySMTP`` adds what the proxy needs on top of aiosmtpd's public hooks; ``quiet_aiosmtpd``
keeps aiosmtpd's own logger from logging commands and message lines.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP

from proxy.protocol.smtp_data import DataScanner

if TYPE_CHECKING:
    from proxy.server.smtp import ConnectionHandler


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_QUIET = _QuietFilter()


def quiet_aiosmtpd() -> None:
    """Keep aiosmtpd's ``mail.log`` to errors: it logs commands at INFO (addresses), DATA lines
    at DEBUG (content) and a deprecation warning per AUTH. A filter, so that setting the level
    to DEBUG (caplog, ``log_level = "debug"``) cannot bring the lines back."""
    mail_log = logging.getLogger("mail.log")
    if _QUIET not in mail_log.filters:
        mail_log.addFilter(_QUIET)
    if mail_log.level < logging.WARNING:  # also skips building the records (per DATA line)
        mail_log.setLevel(logging.WARNING)


class ProxySMTP(SMTP):
    """aiosmtpd's protocol with what the proxy needs on top of the public hooks.

    - a per-connection life task (``ConnectionHandler.life``) the daemon can wait for;
    - the idle timer restarts on every byte received, so a slow 20 MB DATA is not cut off at
      CLIENT_IDLE (aiosmtpd restarts it per command only), and can be held while the upstream
      takes its time over a message;
    - DATA after every recipient was refused: ``554 5.5.1`` (RFC 2920), not ``503``;
    - the message is not collected line by line but streamed (``message_chunks``);
    - ``command_size_limits`` per instance (aiosmtpd shares one dict across all connections
      and grows it on every EHLO).
    """

    event_handler: ConnectionHandler
    # aiosmtpd sizes its StreamReader by this (its own DATA loop, replaced here, also checked
    # lines against it). At 1001 the reader paused and resumed the socket for every chunk of a
    # message; command lines are still held to ``command_size_limits`` by aiosmtpd.
    line_length_limit = 64 * 1024

    def __init__(self, handler: ConnectionHandler, **kwargs: Any) -> None:
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **kwargs)
        self._proxy_started = False
        self._refused = False
        self._login_deadline: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0
        self.data_scanner = DataScanner()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = not self._proxy_started
        self._proxy_started = True
        if first and not self.event_handler.admit(transport):
            self._refused = True  # too many connections before login: say so, never greet
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.7.0 Too many connections; try again later\r\n")
            transport.close()
            return
        super().connection_made(transport)  # called again after STARTTLS, with the TLS transport
        task = self._handler_coroutine
        if task is not None and not getattr(task, "_proxy_watched", False):
            # aiosmtpd re-raises a client reset from its task; nothing else would retrieve it.
            task._proxy_watched = True  # type: ignore[attr-defined]
            task.add_done_callback(_retrieve)
        if first:
            self.event_handler.connected(self, transport)
            limits = self.event_handler.ctx.tokens.config.limits
            self._login_deadline = self.loop.call_later(limits.preauth_total, self._too_long)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._login_deadline is not None:
            self._login_deadline.cancel()
        try:
            super().connection_lost(error)
        finally:
            self.event_handler.lost()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._reset_timeout()
        super().data_received(data)

    def _before_login(self) -> bool:
        return self.event_handler.account is None  # neither logged in nor relaying

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Restart the idle timer; before login the shorter ``limits.preauth_idle`` applies,
        as on IMAP and POP3. Called per command and per chunk received, so it only moves a
        deadline: the timer is re-armed when it fires early, or when the deadline comes
        sooner than it."""
        if duration is None:
            duration = (self.event_handler.ctx.tokens.config.limits.preauth_idle
                        if self._before_login() else self._timeout_duration)
        self._idle_deadline = deadline = self.loop.time() + duration
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._idle_deadline:  # activity since: wait for the rest
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(b"421 4.4.2 Idle too long; closing the connection\r\n")
        super()._timeout_cb()

    def _too_long(self) -> None:
        transport = self.transport
        if (self._before_login() and isinstance(transport, asyncio.WriteTransport)
                and not transport.is_closing()):
            transport.write(b"421 4.4.2 Too long without logging in; closing the connection\r\n")
            transport.close()

    def hold_idle_timer(self, seconds: float | None) -> None:
        """Give the client ``seconds`` of silence from now (None: back to CLIENT_IDLE)."""
        if self.transport is not None:
            self._reset_timeout(seconds)

    def close_soon(self) -> None:
        """Close after the reply being sent now (pushed before the loop runs callbacks)."""
        transport = self.transport
        if transport is not None:
            self.loop.call_soon(transport.close)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT path parser, with a fast path for the usual ``<dot-atom@domain>``:
        aiosmtpd's runs the RFC 5322 header parser (and defines a class) on every call, a tenth
        of the proxy's CPU per message. Anything else goes to aiosmtpd's own."""
        match = _SIMPLE_PATH.match(arg)
        if match is None:
            return super()._getaddr(arg)
        rest = arg[match.end():].lstrip(" \t")
        if rest.startswith("("):  # a comment after the path: aiosmtpd's parser drops it
            return super()._getaddr(arg)
        address = match.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    async def smtp_AUTH(self, arg: str) -> None:
        if arg:  # mechanism names are case-insensitive (RFC 4954); aiosmtpd matches them exactly
            mechanism, sep, rest = arg.partition(" ")
            arg = mechanism.upper() + sep + rest
        await super().smtp_AUTH(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """DATA as aiosmtpd checks it; the message itself is the handler's (``relay_message``),
        which streams it upstream as it arrives."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            if envelope.mail_from and self.event_handler.rcpt_refused:
                await self.push("554 5.5.1 No valid recipients")
            else:
                await self.push("503 5.5.1 Need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        status = await self.event_handler.relay_message(self)
        self._set_post_data_state()
        await self.push(status)  # type: ignore[type-var]  # str, or the upstream's bytes

    async def message_chunks(self) -> AsyncGenerator[tuple[bytes, bool], None]:
        """The client's message after ``354`` as it arrives, as sent (dot-stuffed), with whether
        it is the last chunk (which ends with the end-of-data line). Bytes after that
        (pipelined commands) are left to aiosmtpd's command loop. ``data_scanner.size`` is
        the message size."""
        reader = self._reader
        scanner = self.data_scanner = DataScanner()
        while True:
            chunk = await reader.read(_READ_ALL)
            if not chunk:  # EOF: aiosmtpd cancels this task as well
                raise ConnectionResetError("the client closed the connection during DATA")
            end = scanner.feed(chunk)
            if end == -1:
                yield chunk, False
                continue
            if end < len(chunk):
                rest, chunk = chunk[end:], chunk[:end]
                if not reader.at_eof():
                    # read() emptied the reader (its buffer never holds _READ_ALL bytes: the
                    # transport pauses at twice its limit), so feeding the rest back keeps
                    # the order of the bytes.
                    reader.feed_data(rest)
            yield chunk, True
            return


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>")
_READ_ALL = 1 << 24  # more than a StreamReader with aiosmtpd's line limit ever buffers


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


__all__ = ["ProxySMTP", "quiet_aiosmtpd"]
