"""Helpers for the tests that send SMTP command lines, well-formed or not, through the proxy:
a logged-in smtplib client that sends raw lines and reconnects when the proxy closed it, a
recorder of what the proxy sent upstream, and the checks every reply and upstream line must
pass."""

from __future__ import annotations

import re
import smtplib
from typing import Any

import pytest

from proxy.protocol.smtp_syntax import Refused, parse_mail, parse_rcpt
from proxy.server.smtp_upstream import Reply, UpstreamSession
from tests.proxyenv import USER
from tests.server.smtp_util import DEVICE_PASSWORD, client

# Every reply the proxy may give to a command line (its own, or the demo upstream's).
DEFINED = {214, 221, 250, 252, 334, 354, 500, 501, 502, 503, 504, 530, 550, 552, 553, 555}
CLOSING = {221, 502}  # QUIT; aiosmtpd's fifth unknown command ("502 5.5.1 Too many ...")
ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3} \S")  # RFC 3463 code, then a sentence
_UPSTREAM_VERBS = {b"MAIL", b"RCPT", b"NOOP", b"RSET", b"DATA", b"QUIT"}


def check_reply(line: bytes, code: int, text: bytes) -> None:
    """A defined reply; a 5xx carries an enhanced status code and says what is wrong."""
    assert code in DEFINED, (line, code, text)
    if code >= 500:
        assert ENHANCED.match(text), (line, code, text)


class Client:
    """One smtplib connection, logged in unless ``login=False``; opened again (``get``) after
    ``drop``. ``send`` writes raw bytes and returns one (code, text) per line sent."""

    def __init__(self, port: int, *, login: bool = True) -> None:
        self.port, self.login = port, login
        self.smtp: smtplib.SMTP | None = None

    def get(self) -> smtplib.SMTP:
        if self.smtp is None:
            self.smtp = client(self.port)
            self.smtp.ehlo()
            if self.login:
                self.smtp.login(USER, DEVICE_PASSWORD)
        return self.smtp

    def send(self, data: bytes, replies: int = 1) -> list[tuple[int, bytes]]:
        s = self.get()
        s.send(data)
        return [s.getreply() for _ in range(replies)]

    def drop(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
            self.smtp = None


class UpstreamRecorder:
    """Every command line the proxy sends upstream (``UpstreamSession.command``), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lines: list[bytes] = []
        command = UpstreamSession.command

        async def recorded(session: UpstreamSession, *args: bytes, **kwargs: Any) -> Reply:
            self.lines.append(b" ".join(args))
            return await command(session, *args, **kwargs)

        monkeypatch.setattr(UpstreamSession, "command", recorded)

    def assert_well_formed(self) -> None:
        """Nothing malformed reached the upstream: known verbs, MAIL and RCPT with a path and
        parameters the strict parser accepts, no other arguments."""
        for line in self.lines:
            verb, _, arg = line.partition(b" ")
            assert verb in _UPSTREAM_VERBS, line
            if verb == b"MAIL":
                parsed: object = parse_mail(arg.decode("utf-8"), extended=True, utf8=True,
                                            size_limit=None)
            elif verb == b"RCPT":
                parsed = parse_rcpt(arg.decode("utf-8"), extended=True)
            else:
                assert not arg, line
                continue
            assert not isinstance(parsed, Refused), (line, parsed)
