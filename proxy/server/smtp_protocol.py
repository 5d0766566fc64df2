"""aiosmtpd's ``SMTP`` protocol as the SMTP listener runs it (see ``smtp`` for the handler).

``ProxySMTP`` adds what the proxy needs on top of aiosmtpd's public hooks; ``quiet_aiosmtpd``
keeps aiosmtpd's own logger from logging commands and message lines.

Every reply the proxy itself gives carries an enhanced status code (RFC 2034/3463; EHLO
advertises ENHANCEDSTATUSCODES). Command lines, MAIL and RCPT are checked by
``proxy.protocol.smtp_syntax`` (strict, never raising); what aiosmtpd still answers itself is
reworded on the way out (``smtp_syntax.aiosmtpd_reply``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from base64 import b64decode, b64encode
from collections.abc import AsyncGenerator, Callable
from typing import Any, AnyStr, Protocol, TypeVar

from aiosmtpd.smtp import ALLOWED_BEFORE_STARTTLS, BOGUS_LIMIT, MISSING, SMTP, TLSSetupException

from proxy.config import Limits
from proxy.protocol.smtp_data import BareLineEnding, DataScanner
from proxy.protocol.smtp_syntax import (
    AUTH_LINE_TOO_LONG,
    EMPTY_LINE,
    HELP,
    LINE_TOO_LONG,
    TOO_MANY_UNKNOWN,
    Mail,
    Rcpt,
    Refused,
    aiosmtpd_reply,
    command_line,
    line_too_long,
    parse_mail,
    parse_rcpt,
    split_command,
    unknown_command,
)
from proxy.server.endpoint import writable
from proxy.server.smtp_adapter import AdaptedSMTP


class FrontHandler(Protocol):
    """What ``ProxySMTP`` asks of its handler (``smtp.SmtpFront``) besides aiosmtpd's hooks."""

    @property
    def limits(self) -> Limits: ...
    @property
    def logged_in(self) -> bool: ...  # logged in upstream, or relaying for a device
    @property
    def peer(self) -> str: ...
    @property
    def rcpt_refused(self) -> int: ...  # recipients the upstream refused in this transaction
    @property
    def normalise_line_endings(self) -> bool: ...
    def admit(self, transport: asyncio.BaseTransport) -> bytes | None: ...
    def connected(self, server: ProxySMTP, transport: asyncio.BaseTransport) -> None: ...
    def lost(self) -> None: ...
    async def relay_message(self, server: ProxySMTP) -> str | bytes: ...


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


class ProxySMTP(AdaptedSMTP):
    """aiosmtpd's protocol with what the proxy needs on top of the public hooks.

    - its own command loop (``_handle_client``): lines framed and checked by ``smtp_syntax``
      (CR LF only, no control characters, caps), every refusal a 5xx with an enhanced status
      code, and the session goes on (only aiosmtpd's five unknown commands end it); no PROXY
      protocol or per-command call limits (the listener configures neither);
    - MAIL and RCPT parsed strictly by ``smtp_syntax`` (aiosmtpd's parser repairs some paths
      and raises on others), their parameters sent upstream in canonical form;
    - a per-connection life task (``SmtpFront.life``) the daemon can wait for;
    - the idle timer restarts on every byte received, so a slow 20 MB DATA is not cut off at
      CLIENT_IDLE (aiosmtpd restarts it per command only), and can be held while the upstream
      takes its time over a message;
    - DATA after every recipient was refused: ``554 5.5.1`` (RFC 2920), not ``503``;
    - the message is not collected line by line but streamed (``message_chunks``);
    - ``command_size_limits`` per instance and set afresh by each EHLO (aiosmtpd shares one
      dict across all connections and grows it on every EHLO).
    """

    event_handler: FrontHandler
    # aiosmtpd sizes its StreamReader by this (its own DATA loop, replaced here, also checked
    # lines against it). At 1001 the reader paused and resumed the socket for every chunk of a
    # message; command lines are still held to ``command_size_limits`` by the command loop.
    line_length_limit = 64 * 1024

    def __init__(self, handler: FrontHandler, **kwargs: Any) -> None:
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **kwargs)
        self._proxy_started = False
        self._refused = False
        self._login_deadline: asyncio.TimerHandle | None = None
        self.data_scanner = DataScanner()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = not self._proxy_started
        self._proxy_started = True
        refusal = self.event_handler.admit(transport) if first else None
        if refusal is not None:
            self._refused = True  # a source not allowed, or too many: say so, never greet
            writer = writable(transport)
            if writer is not None:
                writer.write(refusal)
                writer.close()
            return
        super().connection_made(transport)  # called again after STARTTLS, with the TLS transport
        self.watch_handler_task()
        if first:
            self.event_handler.connected(self, transport)
            limits = self.event_handler.limits
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
            self.retrieve_reset()

    def eof_received(self) -> bool:
        """The client sends no more (a FIN; it may still read). aiosmtpd cancels the command
        task here, even in the middle of a command, and a reply the client waits for was
        lost: the one to a message's end, after the upstream accepted it (so the client sent
        the message again). Here the end of the stream is the command loop's to find: every
        command before it is answered, then the loop closes. A TLS transport cannot stay half
        open: it closes, and the lost connection ends the task."""
        if self._refused:
            return False
        keep_open = asyncio.StreamReaderProtocol.eof_received(self)  # the reader's EOF
        return bool(keep_open) and (self.session is None or self.session.ssl is None)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self.restart_idle()
        super().data_received(data)

    def _before_login(self) -> bool:
        return not self.event_handler.logged_in  # neither logged in nor relaying

    def idle_duration(self) -> float:
        """Before login the shorter ``limits.preauth_idle`` applies, as on IMAP and POP3."""
        if self._before_login():
            return self.event_handler.limits.preauth_idle
        return super().idle_duration()

    def idle_expired(self) -> None:
        transport = writable(self.transport)
        if transport is not None:
            transport.write(b"421 4.4.2 Idle too long; closing the connection\r\n")

    def _too_long(self) -> None:
        transport = writable(self.transport)
        if self._before_login() and transport is not None:
            transport.write(b"421 4.4.2 Too long without logging in; closing the connection\r\n")
            transport.close()

    def hold_idle_timer(self, seconds: float | None) -> None:
        """Give the client ``seconds`` of silence from now (None: back to CLIENT_IDLE)."""
        if self.transport is not None:
            self.restart_idle(seconds)

    def close_soon(self) -> None:
        """Close after the reply being sent now (pushed before the loop runs callbacks)."""
        transport = self.transport
        if transport is not None:
            self.loop.call_soon(transport.close)

    # --- the command loop ---------------------------------------------------------------------

    async def serve(self) -> None:
        """aiosmtpd's command loop, with the proxy's framing and replies (see the class)."""
        assert self.session is not None
        await self.push(f"220 {self.hostname} {self.ident}")
        unknown_left = BOGUS_LIMIT
        while self.transport is not None:
            try:
                raw = await self._read_line()
                framed = command_line(raw) if raw is not None else LINE_TOO_LONG
                if isinstance(framed, Refused):
                    await self.push(str(framed))
                    continue
                split = split_command(framed, utf8=self.enable_SMTPUTF8)
                if isinstance(split, Refused):
                    await self.push(str(split))
                    continue
                verb, arg = split
                limit = (self.command_size_limits.get(verb, self.command_size_limit)
                         if self.session.extended_smtp else self.command_size_limit)
                if len(framed) > limit:
                    await self.push(str(line_too_long(verb, limit)))
                    continue
                method = self.command_method(verb)
                if method is None:
                    unknown_left -= 1
                    if unknown_left < 1:
                        await self.push(str(TOO_MANY_UNKNOWN))
                        self.transport.close()
                        continue
                    await self.push(str(unknown_command(verb)))
                    continue
                if not self.tls_handshake_okay and verb != "QUIT":
                    await self.push("554 5.7.0 Command refused due to lack of security")
                    continue
                if (self.require_starttls and not self.tls_started
                        and verb not in ALLOWED_BEFORE_STARTTLS):
                    await self.push("530 5.7.0 Must issue a STARTTLS command first")
                    continue
                self.restart_idle()
                await method(arg)
            except (asyncio.CancelledError, ConnectionResetError):
                self.writer.close()
                raise
            except Exception as error:  # aiosmtpd's handling: the handler words the reply
                status = await self.handle_exception(error)
                if isinstance(error, TLSSetupException):
                    if self.transport is not None:
                        self.transport.close()
                    self.connection_lost(error)
                else:
                    await self.push(status)

    async def _read_line(self) -> bytes | None:
        """The next line through its LF; None if it ran past the reader's limit (then it has
        been read to its end and dropped). The client's end of stream: ConnectionResetError."""
        reader = self.reader
        try:
            return await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as error:
            await reader.read(error.consumed)  # buffered already
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("the client closed the connection") from None
        while True:
            try:
                await reader.readuntil(b"\n")
                return None
            except asyncio.LimitOverrunError as error:
                await reader.read(error.consumed)  # buffered already
            except asyncio.IncompleteReadError:
                raise ConnectionResetError("the client closed the connection") from None

    async def push(self, status: AnyStr) -> None:
        """A reply line; aiosmtpd's own are given an enhanced status code on the way."""
        if isinstance(status, str):
            await super().push(aiosmtpd_reply(status))
        else:
            await super().push(status)

    def _parse(self, parse: Callable[..., _T | Refused], arg: str | None,
               **kwargs: Any) -> _T | Refused:
        """Run a ``smtp_syntax`` parser. They are total (property-tested); should one raise all
        the same, the command is refused and the session goes on."""
        try:
            return parse(arg, **kwargs)
        except Exception:
            log.error("smtp_parser_failed", exc_info=True,
                      extra={"fields": {"peer": self.event_handler.peer}})
            return _PARSER_FAILED

    # --- commands ---------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if hostname:  # aiosmtpd adds SIZE's and SMTPUTF8's allowance to MAIL's cap per EHLO
            self.command_size_limits.clear()
        await super().smtp_EHLO(hostname)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        assert self.session is not None and self.envelope is not None
        mail = self._parse(parse_mail, arg, extended=self.session.extended_smtp,
                           utf8=self.enable_SMTPUTF8, size_limit=self.data_size_limit,
                           local_part_limit=self.local_part_limit)
        if isinstance(mail, Refused):
            await self.push(str(mail))
            return
        assert isinstance(mail, Mail)
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Sender already given; send RSET to start again")
            return
        self.envelope.smtp_utf8 = mail.smtputf8
        options = list(mail.options)
        status = await self.call_hook("MAIL", mail.sender, options)
        if status is MISSING:
            self.envelope.mail_from = mail.sender
            self.envelope.mail_options.extend(options)
            status = "250 2.1.0 OK"
        await self.push(status)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        assert self.session is not None and self.envelope is not None
        if not self.envelope.mail_from:
            await self.push("503 5.5.1 Need MAIL command before RCPT")
            return
        rcpt = self._parse(parse_rcpt, arg, extended=self.session.extended_smtp,
                           local_part_limit=self.local_part_limit)
        if isinstance(rcpt, Refused):
            await self.push(str(rcpt))
            return
        assert isinstance(rcpt, Rcpt)
        status = await self.call_hook("RCPT", rcpt.recipient, [])
        if status is MISSING:
            self.envelope.rcpt_tos.append(rcpt.recipient)
            status = "250 2.1.5 OK"
        await self.push(status)

    async def smtp_VRFY(self, arg: str | None) -> None:
        """Never forwarded (aiosmtpd echoed the argument, which could not always be encoded)."""
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY address")
        else:
            await self.push("252 2.5.0 Cannot VRFY user; send the message and the mail server "
                            "will try to deliver it")

    async def smtp_STARTTLS(self, arg: str) -> None:
        await super().smtp_STARTTLS(arg)
        if self._tls_protocol is not None and self.session is not None and self.session.ssl is None:
            # Closed during the handshake (the idle timer, a client that only sent its FIN):
            # asyncio wakes the waiter without an error, and the TLS layer never passes the
            # lost connection on. Ended here as a failed handshake, the connection is freed.
            raise TLSSetupException() from ConnectionAbortedError("closed during the TLS handshake")

    async def smtp_HELP(self, arg: str | None) -> None:
        commands = {verb: usage for verb, usage in HELP.items()
                    if verb != "STARTTLS" or (self.tls_context and not self.tls_started)}
        if not arg:
            await self.push("214 2.0.0 Commands: " + " ".join(commands))
        elif arg.upper() in commands:
            await self.push(f"214 2.0.0 Syntax: {commands[arg.upper()]}")
        else:
            await self.push("501 5.5.4 HELP: no such command; send HELP for the list")

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's, with the response line framed like a command line and held to RFC
        4954's 12288 octets; never logs the response. MISSING once the client was answered."""
        if isinstance(challenge, str):
            challenge = challenge.encode()
        await self.push(b"334 " + (b64encode(challenge) if encode_to_b64 else challenge))
        raw = await self._read_line()
        if raw is None or len(raw) > _AUTH_RESPONSE_LIMIT:
            await self.push(str(AUTH_LINE_TOO_LONG))
            return MISSING
        line = command_line(raw)
        if isinstance(line, Refused) and line is not EMPTY_LINE:  # empty: an empty response
            await self.push(f"501 {line.status} {line.text}")
            return MISSING
        blob = line.strip(b" ") if isinstance(line, bytes) else b""
        if blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except ValueError:  # binascii.Error
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    async def smtp_AUTH(self, arg: str) -> None:
        if self.envelope is not None and self.envelope.mail_from:  # RFC 4954 4
            await self.push("503 5.5.1 AUTH is not allowed in a mail transaction; finish the "
                            "message or send RSET first")
            return
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
        self.after_data()
        if isinstance(status, bytes):  # the upstream's reply
            await self.push(status)
        else:
            await self.push(status)
        if self.data_scanner.bare is not None:
            await self.discard_and_close()

    async def message_chunks(self) -> AsyncGenerator[tuple[bytes, bool], None]:
        """The client's message after ``354`` as it arrives, as sent (dot-stuffed), with whether
        it is the last chunk (the end-of-data line came: its ``.CRLF`` is not in the chunk,
        which may be empty). Bytes after that (pipelined commands) are left to the command
        loop. ``data_scanner.size`` is the message size. A bare line ending (unless the
        listener normalises them) raises ``BareLineEndingRefused`` before any byte from its
        chunk on is yielded."""
        reader = self.reader
        normalise = self.event_handler.normalise_line_endings
        scanner = self.data_scanner = DataScanner(normalise=normalise)
        while True:
            chunk = await reader.read(_READ_ALL)
            if not chunk:  # the client's end of stream
                raise ConnectionResetError("the client closed the connection during DATA")
            forward, rest = scanner.feed(chunk)
            if scanner.bare is not None:
                raise BareLineEndingRefused(scanner.bare)
            if rest is None:
                if forward:
                    yield forward, False
                continue
            if rest:
                # read() emptied the reader (its buffer never holds _READ_ALL bytes: the
                # transport pauses at twice its limit), so putting the rest back keeps the
                # order of the bytes.
                self.unread(rest)
            yield forward, True
            return

    async def discard_and_close(self) -> None:
        """After a refused bare line ending: where the client thinks its message ends is
        unknown, so nothing more it sends is read as a command. The proxy stops writing
        (a half-close, where the transport has one), reads and drops the client's bytes until
        it stops sending (closing with unread input would reset the connection and could lose
        the reply), then closes."""
        reader, transport = self.reader, self.transport
        if transport is None:
            return
        if self.writer.can_write_eof():  # a TLS transport cannot half-close
            self.writer.write_eof()
        try:
            async with asyncio.timeout(DISCARD_SECONDS):
                while True:
                    async with asyncio.timeout(DISCARD_QUIET_SECONDS):
                        if not await reader.read(_READ_ALL):
                            break
        except TimeoutError:
            pass
        transport.close()


class BareLineEndingRefused(Exception):
    """A message had a bare CR or LF; ``kind`` says which."""

    def __init__(self, kind: BareLineEnding) -> None:
        super().__init__(f"bare {kind} in the message")
        self.kind = kind


DISCARD_SECONDS = 10.0  # at most, after a refused bare line ending
DISCARD_QUIET_SECONDS = 1.0  # or once the client has sent nothing for this long
_READ_ALL = 1 << 24  # more than a StreamReader with aiosmtpd's line limit ever buffers
_AUTH_RESPONSE_LIMIT = 12288 + 2  # RFC 4954 4: a SASL response line, with its CR LF
_PARSER_FAILED = Refused(501, "5.5.4", "Syntax error: the proxy could not read this command")
_T = TypeVar("_T")
log = logging.getLogger("proxy.smtp")


__all__ = ["ProxySMTP", "BareLineEndingRefused", "quiet_aiosmtpd"]
