"""The fake Microsoft 365 POP3 server: Twisted's ``POP3`` with XOAUTH2 and STLS.

Twisted supplies the line handling, STAT/LIST/UIDL formatting, pipelining ("blocked"
commands) and timeouts. Replaced here: the command dispatch (M365 wording, states), CAPA,
``AUTH XOAUTH2`` with an initial response or a ``+ `` continuation and the optional RFC
7628 error challenge (or ``-ERR [SYS/TEMP]`` when the temporary-failure knob is set),
USER/PASS (always refused), STLS (Twisted has none), and RETR/TOP: Twisted's
``transformChunk`` turns every LF into CRLF (so CRLF becomes CR CR LF) and dot-stuffs per
chunk; here the whole message is stuffed once and streamed in big chunks.
DELE marks; the deletions reach the shared store at QUIT.
"""

from __future__ import annotations

from typing import Any

from twisted.mail import pop3
from zope.interface import implementer

from . import common
from .store import Folder, StoredMessage

AUTH_FAILED = b"Authentication failure: unknown user name or bad password."
BAD_STATE = b"Command is not valid in this state."


@implementer(pop3.IMailbox)
class _Maildrop:
    """The INBOX as it was at login; deletions are applied to the folder by ``sync``."""

    def __init__(self, folder: Folder) -> None:
        self._folder = folder
        self.msgs: list[StoredMessage] = list(folder.messages)
        self.deleted: set[int] = set()

    def message(self, i: int) -> StoredMessage:
        if not 0 <= i < len(self.msgs) or i in self.deleted:
            raise ValueError(i)
        return self.msgs[i]

    def listMessages(self, i=None):
        if i is None:
            return [0 if n in self.deleted else len(m.data) for n, m in enumerate(self.msgs)]
        return len(self.message(i).data)

    def getMessage(self, i):
        raise NotImplementedError("RETR and TOP are served by POPServer")

    def getUidl(self, i):
        msg = self.message(i)
        return b"%d.%d" % (self._folder.uid_validity, msg.uid)

    def deleteMessage(self, i):
        self.message(i)
        self.deleted.add(i)

    def undeleteMessages(self):
        self.deleted.clear()

    def sync(self):
        self._folder.remove(self.msgs[i] for i in self.deleted)
        self.deleted.clear()


def _dot_stuff(data: bytes) -> bytes:
    """The message as a POP3 multi-line body, terminator included."""
    body = data.replace(b"\r\n.", b"\r\n..")
    if body[:1] == b".":
        body = b"." + body
    return body + (b".\r\n" if body.endswith(b"\r\n") or not body else b"\r\n.\r\n")


def _top(data: bytes, lines: int) -> bytes:
    """Header, blank line and the first ``lines`` lines of the body."""
    end = StoredMessage(0, data).header_end()
    pos = end
    for _ in range(lines):
        nl = data.find(b"\n", pos)
        if nl < 0:
            return data
        pos = nl + 1
    return data[:pos]


class POPServer(pop3.POP3):
    """One POP3 connection. ``factory`` supplies store, validator, knobs and the TLS mode."""

    MAX_LENGTH = 64 * 1024
    timeOut = 600
    factory: Any
    mbox: Any
    blocked: Any
    transport: Any

    def __init__(self, factory: POPFactory, implicit_tls: bool) -> None:
        self.factory = factory
        self._tls = implicit_tls
        self._auth_waiter: Any = None

    def successResponse(self, message=b""):
        if not isinstance(message, bytes):
            message = str(message).encode()
        self.sendLine(b"+OK " + message if message else b"+OK")

    def connectionMade(self):
        self.sendLine(b"+OK The Microsoft Exchange POP3 service is ready.")
        self.setTimeout(self.factory.knobs.preauth_timeout)  # until the login

    def lineReceived(self, line):
        self.resetTimeout()
        if self._auth_waiter is not None:
            waiter, self._auth_waiter = self._auth_waiter, None
            waiter(line)
            return
        parts = line.split(b" ")
        self.processCommand(parts[0], *parts[1:])

    def processCommand(self, command, *args):
        if self.blocked is not None:
            self.blocked.append((command, args))
            return
        command = command.upper()
        authorised = self.mbox is not None
        allowed = (
            {b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET", b"NOOP"}
            if authorised else {b"AUTH", b"USER", b"PASS", b"STLS"}
        ) | {b"CAPA", b"QUIT"}
        handler = getattr(self, "do_" + command.decode("ascii", "replace"), None)
        if handler is None:
            self.failResponse(b"Unknown command.")
        elif command not in allowed:
            self.failResponse(BAD_STATE)
        else:
            try:
                return handler(*args)
            except (TypeError, ValueError, IndexError):
                self.failResponse(b"Protocol error.")

    # -- capabilities and TLS
    def listCapabilities(self):
        caps = [b"TOP", b"UIDL"]
        if self.mbox is None:
            caps.append(b"SASL XOAUTH2" if self._tls else b"STLS")
        return caps

    def do_CAPA(self):
        self.sendLine(b"+OK")
        for cap in self.listCapabilities():
            self.sendLine(cap)
        self.sendLine(b".")

    def do_STLS(self):
        if self._tls:
            self.failResponse(BAD_STATE)
            return
        self.sendLine(b"+OK Begin TLS negotiation.")
        self.transport.startTLS(self.factory.tls)
        self._tls = True

    # -- login
    def do_USER(self, *user):
        self.successResponse()

    def do_PASS(self, *password):
        self.failResponse(AUTH_FAILED)

    def do_AUTH(self, mechanism=None, initial=None, *extra):
        if mechanism is None:
            self.sendLine(b"+OK")
            if self._tls:
                self.sendLine(b"XOAUTH2")
            self.sendLine(b".")
        elif not self._tls:
            self.failResponse(BAD_STATE)
        elif mechanism.upper() != b"XOAUTH2" or extra:
            self.failResponse(b"Unrecognized authentication type.")
        elif initial is None:
            self.sendLine(b"+ ")
            self._auth_waiter = self._auth_response
        else:
            self._auth_response(initial)

    def _auth_response(self, line: bytes) -> None:
        if line.strip() == b"*":
            self.failResponse(b"Authentication canceled.")
            return
        self.blocked = []
        d = common.check_xoauth2(self.factory.validator, line.strip(), "pop")
        d.addCallback(self._auth_verdict)

    def _auth_verdict(self, login: common.Login) -> None:
        if self.factory.knobs.xoauth2_temporary_failure:
            self.failResponse(b"[SYS/TEMP] " + common.TEMPORARY_FAILURE)
        elif login.ok:
            self.mbox = _Maildrop(self.factory.store.account(login.user).inbox)
            self.setTimeout(self.timeOut)
            self.sendLine(b"+OK User successfully authenticated.")
        elif self.factory.knobs.xoauth2_error_challenge:
            self.sendLine(b"+ " + common.error_challenge("pop"))
            self._auth_waiter = lambda line: self.failResponse(AUTH_FAILED)
        else:
            self.failResponse(AUTH_FAILED)
        self._unblock(None)

    # -- transaction. Twisted's STAT, LIST and UIDL count and list deleted messages (with
    # size 0, or fail on them); RFC 1939 leaves them out.
    def _live(self) -> list[tuple[int, StoredMessage]]:
        return [(n + 1, m) for n, m in enumerate(self.mbox.msgs) if n not in self.mbox.deleted]

    def _one(self, i) -> tuple[int, StoredMessage] | None:
        try:
            return int(i), self.mbox.message(int(i) - 1)
        except ValueError:
            self.failResponse(b"The specified message is out of range.")
            return None

    def do_STAT(self):
        live = self._live()
        self.successResponse(b"%d %d" % (len(live), sum(len(m.data) for _, m in live)))

    def _listing(self, i, show) -> None:
        if i is not None:
            one = self._one(i)
            if one is not None:
                self.successResponse(b"%d %s" % (one[0], show(one[1])))
            return
        live = self._live()
        lines = [b"+OK %d messages\r\n" % len(live)]
        lines += [b"%d %s\r\n" % (n, show(m)) for n, m in live]
        self.transport.write(b"".join(lines) + b".\r\n")

    def do_LIST(self, i=None):
        self._listing(i, lambda m: b"%d" % len(m.data))

    def do_UIDL(self, i=None):
        validity = self.mbox._folder.uid_validity
        self._listing(i, lambda m: b"%d.%d" % (validity, m.uid))

    def _send_message(self, i, make):
        one = self._one(i)
        if one is None:
            return None
        self.successResponse()
        d = common.send_bytes(self.transport, _dot_stuff(make(one[1].data)))
        if d is None:
            return None
        return self._longOperation(d)

    def do_RETR(self, i):
        return self._send_message(i, lambda data: data)

    def do_TOP(self, i, lines):
        n = int(lines)
        if n < 0:
            raise ValueError(lines)
        return self._send_message(i, lambda data: _top(data, n))

    def do_DELE(self, i):
        one = self._one(i)
        if one is not None:
            self.mbox.deleteMessage(one[0] - 1)
            self.successResponse()

    def do_QUIT(self):
        if self.mbox is not None:
            self.mbox.sync()
        self.sendLine(b"+OK Microsoft Exchange Server POP3 server signing off.")
        self.transport.loseConnection()


class POPFactory(common.MailFactory):
    server = POPServer


__all__ = ["POPFactory", "POPServer"]
