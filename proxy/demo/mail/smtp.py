"""The fake Microsoft 365 submission server (ESMTP) on top of Twisted's ``ESMTP``.

Twisted's ESMTP reads DATA one line at a time through per-recipient ``IMessage`` objects,
knows no SIZE, 8BITMIME, SMTPUTF8 or enhanced status codes and offers AUTH through cred
challengers only. Kept from Twisted: ``sendCode``, the timeout handling and STARTTLS via
the transport. Replaced: input framing (commands are split from a bytearray; DATA is read
raw and its end found with ``bytes.find``, so a 20 MB message costs a few C-level passes),
every command handler (M365 replies and codes), and AUTH (XOAUTH2 with an initial
response or a ``334`` continuation and the RFC 7628 error challenge, or ``454 4.7.0`` when the
temporary-failure knob is set; AUTH LOGIN is offered and refused as "basic authentication is
disabled", as Microsoft does).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from twisted.mail import smtp

from . import common

_MAIL = re.compile(rb"^FROM:\s*<([^<>]*)>\s*(.*)$", re.I | re.S)
_RCPT = re.compile(rb"^TO:\s*<([^<>]*)>\s*(.*)$", re.I | re.S)
_SIZE = re.compile(rb"(?:^|\s)SIZE=(\d+)", re.I)
_MAX_LINE = 64 * 1024
_BASIC_DISABLED = (b"5.7.139 Authentication unsuccessful, basic authentication is disabled. ["
                   + common.FRONTEND.encode() + b"]")
_SMTP_AUTH_DISABLED = (b"5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
                       b"disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for "
                       b"more information. [" + common.FRONTEND.encode() + b"]")
_AUTH_FAILED = b"5.7.3 Authentication unsuccessful [" + common.FRONTEND.encode() + b"]"


class SMTPServer(smtp.ESMTP):
    """One submission connection. ``factory`` supplies store, validator, knobs, TLS mode."""

    factory: Any
    transport: Any

    def __init__(self, factory: SMTPFactory, implicit_tls: bool) -> None:
        super().__init__(contextFactory=None if implicit_tls else factory.tls)
        self.factory = factory
        self.host = common.HOSTNAME.encode()
        self._tls = implicit_tls
        self._buf = bytearray()
        self._busy = False  # waiting for a deferred verdict: hold further input
        # called with the next line (AUTH continuations)
        self._waiter: Callable[[bytes], None] | None = None
        self._data_scan = -1  # >= 0 while receiving DATA: where to resume the search
        self._reset_session()

    def _reset_session(self) -> None:
        self._ehlo = False
        self._user: str | None = None
        self._app_only = False
        self._reset_mail()

    def _reset_mail(self) -> None:
        self._mail_from: str | None = None
        self._rcpts: list[str] = []

    def greeting(self):
        return (self.host + b" Microsoft ESMTP MAIL Service ready at "
                + formatdate(localtime=True).encode())

    def connectionMade(self):
        smtp.SMTP.connectionMade(self)

    # -- input framing
    def dataReceived(self, data):
        self._buf += data
        self._process()

    def _process(self) -> None:
        buf = self._buf
        while buf and not self._busy and not self.transport.disconnecting:
            if self._data_scan >= 0:
                if not self._scan_data():
                    return
                continue
            nl = buf.find(b"\r\n")
            if nl < 0:
                if len(buf) > _MAX_LINE:
                    buf.clear()
                    self.sendCode(500, b"5.5.2 Line too long")
                return
            line = bytes(buf[:nl])
            del buf[: nl + 2]
            self.resetTimeout()
            self.lineReceived(line)

    def _scan_data(self) -> bool:
        """Look for the end of DATA; deliver and return True once it has arrived."""
        buf = self._buf
        if buf[:3] == b".\r\n":  # an empty message
            end, body_end = 0, 0
        else:
            end = buf.find(b"\r\n.\r\n", max(0, self._data_scan - 4))
            if end < 0:
                self._data_scan = len(buf)
                self.resetTimeout()
                return False
            body_end, end = end + 2, end + 2
        raw = bytes(buf[:body_end])
        del buf[: end + 3]
        self._data_scan = -1
        message = raw.replace(b"\r\n.", b"\r\n")
        if message[:1] == b".":
            message = message[1:]
        self._deliver(message)
        return True

    def lineReceived(self, line):
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter(line)
            return
        verb, _, rest = line.strip().partition(b" ")
        handler = getattr(self, "do_" + verb.upper().decode("ascii", "replace"), None)
        if handler is None or not verb.isalpha():
            self.sendCode(500, b"5.3.3 Unrecognized command")
        else:
            handler(rest.strip())

    # -- session commands
    def _extensions(self) -> list[bytes]:
        ext = [b"SIZE %d" % self.factory.knobs.max_message_size, b"PIPELINING",
               b"ENHANCEDSTATUSCODES"]
        if self._tls:
            ext.append(b"AUTH LOGIN XOAUTH2")
        else:
            ext.append(b"STARTTLS")
        return ext + [b"8BITMIME", b"SMTPUTF8"]

    def _peer(self) -> bytes:
        return f"[{getattr(self.transport.getPeer(), 'host', '?')}]".encode()

    def do_EHLO(self, rest):
        if not rest:
            self.sendCode(501, b"5.5.4 Invalid domain name")
            return
        self._reset_mail()
        self._ehlo = True
        lines = [self.host + b" Hello " + self._peer()] + self._extensions()
        self.sendCode(250, b"\n".join(lines))

    def do_HELO(self, rest):
        self._reset_mail()
        self._ehlo = True
        self.sendCode(250, self.host + b" Hello " + self._peer())

    def do_STARTTLS(self, rest):
        if self._tls:
            self.sendCode(503, b"5.5.1 TLS already active")
            return
        self.sendCode(220, b"2.0.0 SMTP server ready")
        self._buf.clear()
        self.transport.startTLS(self.factory.tls)
        self._tls = self.startedTLS = True
        self._reset_session()

    def do_NOOP(self, rest):
        self.sendCode(250, b"2.0.0 OK")

    def do_RSET(self, rest):
        self._reset_mail()
        self.sendCode(250, b"2.0.0 Resetting")

    def do_QUIT(self, rest):
        self.sendCode(221, b"2.0.0 Service closing transmission channel")
        self.transport.loseConnection()

    # -- AUTH
    def do_AUTH(self, rest):
        mechanism, _, initial = rest.partition(b" ")
        mechanism = mechanism.upper()
        if not self._ehlo:
            self.sendCode(503, b"5.5.2 Send hello first")
        elif self._user is not None:
            self.sendCode(503, b"5.5.2 Already authenticated")
        elif not self._tls or mechanism not in (b"XOAUTH2", b"LOGIN"):
            self.sendCode(504, b"5.7.4 Unrecognized authentication type")
        elif self._mail_from is not None:
            self.sendCode(503, b"5.5.1 Bad sequence of commands")
        elif mechanism == b"LOGIN":
            self._auth_login(initial.strip() or None)
        elif not initial.strip():
            self.sendCode(334, b"")
            self._waiter = self._auth_response
        else:
            self._auth_response(initial.strip())

    def _auth_login(self, user: bytes | None) -> None:
        def password(line: bytes) -> None:
            if line.strip() == b"*":
                self.sendCode(501, b"5.7.0 Authentication aborted")
            else:
                self.sendCode(535, _BASIC_DISABLED)

        def username(line: bytes) -> None:
            if line.strip() == b"*":
                self.sendCode(501, b"5.7.0 Authentication aborted")
                return
            self.sendCode(334, b"UGFzc3dvcmQ6")
            self._waiter = password

        if user is None:
            self.sendCode(334, b"VXNlcm5hbWU6")
            self._waiter = username
        else:
            username(user)

    def _auth_response(self, line: bytes) -> None:
        if line.strip() == b"*":
            self.sendCode(501, b"5.7.0 Authentication aborted")
            return
        self._busy = True
        d = common.check_xoauth2(self.factory.validator, line.strip(), "smtp")
        d.addCallback(self._auth_verdict)

    def _auth_verdict(self, login: common.Login) -> None:
        if self.factory.knobs.xoauth2_temporary_failure:
            self.sendCode(454, b"4.7.0 " + common.TEMPORARY_FAILURE)
        elif self.factory.knobs.smtp_auth_disabled:
            self.sendCode(535, _SMTP_AUTH_DISABLED)
        elif login.ok:
            self._user = login.user
            self._app_only = login.app_only
            self.authenticated = True
            self.sendCode(235, b"2.7.0 Authentication successful")
        elif self.factory.knobs.xoauth2_error_challenge:
            self.sendCode(334, common.error_challenge("smtp"))
            self._waiter = lambda line: self.sendCode(535, _AUTH_FAILED)
        else:
            self.sendCode(535, _AUTH_FAILED)
        self._busy = False
        self._process()

    # -- mail transaction
    def do_MAIL(self, rest):
        m = _MAIL.match(rest)
        if not self._ehlo:
            self.sendCode(503, b"5.5.2 Send hello first")
        elif self._user is None:
            self.sendCode(530, b"5.7.57 Client not authenticated to send mail.")
        elif self._mail_from is not None:
            self.sendCode(503, b"5.5.2 Sender already specified")
        elif m is None:
            self.sendCode(501, b"5.5.4 Invalid arguments")
        else:
            sender = m.group(1).decode("utf-8", "replace")
            size = _SIZE.search(m.group(2))
            if size and int(size.group(1)) > self.factory.knobs.max_message_size:
                self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
            elif sender.lower() != self._user.lower() and not self._app_only:
                self.sendCode(
                    550, b"5.7.60 SMTP; Client does not have permissions to send as this sender")
            else:
                self._mail_from = sender
                self.sendCode(250, b"2.1.0 Sender OK")

    def do_RCPT(self, rest):
        m = _RCPT.match(rest)
        if self._mail_from is None:
            self.sendCode(503, b"5.5.1 Need mail command")
        elif m is None or b"@" not in m.group(1):
            self.sendCode(501, b"5.1.3 Invalid address")
        else:
            rcpt = m.group(1).decode("utf-8", "replace")
            if rcpt.split("@", 1)[0].lower().startswith("reject"):
                self.sendCode(550, b"5.1.1 User unknown")
            else:
                self._rcpts.append(rcpt)
                self.sendCode(250, b"2.1.5 Recipient OK")

    def do_DATA(self, rest):
        if self._mail_from is None:
            self.sendCode(503, b"5.5.1 Need mail command")
        elif not self._rcpts:
            self.sendCode(503, b"5.5.1 Need rcpt command")
        else:
            self.sendCode(354, b"Start mail input; end with <CRLF>.<CRLF>")
            self._data_scan = 0

    def _deliver(self, message: bytes) -> None:
        if len(message) > self.factory.knobs.max_message_size:
            self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
        else:
            for rcpt in self._rcpts:
                self.factory.store.deliver(rcpt, message)
            queue_id = f"<{uuid.uuid4().hex.upper()}@{common.HOSTNAME}>"
            reply = f"250 2.0.0 OK {queue_id} [Hostname={common.HOSTNAME}]\r\n".encode()
            if self.factory.knobs.smtp_extra_reply_after_data:
                reply += b"250 2.0.0 A reply to no command\r\n"  # in the same segment
            self.transport.write(reply)
        self._reset_mail()


class SMTPFactory(common.MailFactory):
    server = SMTPServer
