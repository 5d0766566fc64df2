"""The fake Microsoft 365 IMAP4rev1 server: Twisted's ``IMAP4Server`` taught XOAUTH2.

What was added or replaced on top of Twisted:

- login: only ``AUTHENTICATE XOAUTH2`` (with SASL-IR or an empty ``+ `` continuation) after
  TLS; LOGIN always ``NO LOGIN failed.``; the RFC 7628 error challenge when the knob asks,
  ``NO [UNAVAILABLE]`` to every XOAUTH2 login when the temporary-failure knob does;
  a plain ``OK AUTHENTICATE completed.`` without ``[CAPABILITY ...]``, and after login the
  capability list Microsoft 365 announces (``IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR
  UIDPLUS MOVE ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+``);
- LITERAL+ (``{n+}`` literals), ID, UNSELECT, ``UID EXPUNGE`` and ``APPENDUID`` (UIDPLUS),
  MOVE and ``UID MOVE`` (RFC 6851, with ``COPYUID``), ``+ idling`` for IDLE, ``* SEARCH``
  always answered (Twisted omits it when nothing matched);
- FETCH of whole messages, ``TEXT``, ``HEADER`` and ``HEADER.FIELDS`` sends the stored bytes
  as they are (Twisted rebuilds headers from a parsed dict and ignores ``<partial>``
  ranges), in large chunks with backpressure instead of 64 KiB pull-producer steps.

Mailboxes come from ``store.MailStore`` through the adapters in ``imap_mailbox``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from twisted.internet import defer
from twisted.mail import imap4

from . import common
from .imap_mailbox import AccountAdapter, Message

_CHUNK_INLINE = 64 * 1024
_NONSYNC = re.compile(rb"\{(\d+)\+\}$")


def _header_fields(header: bytes, names: list[bytes], negate: bool) -> bytes:
    """The header lines (with continuations) whose names are (not) in ``names``."""
    wanted = {n.upper() for n in names}
    out: list[bytes] = []
    keep = False
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] not in (b" ", b"\t"):
            keep = (line.split(b":", 1)[0].strip().upper() in wanted) != negate
        if keep:
            out.append(line)
    out.append(b"\r\n")
    return b"".join(out)


# Twisted's search_SUBJECT/FROM/HEADER/... compare str headers with the parsed (bytes)
# argument; BODY/TEXT want bytes. Decode the arguments of the header keys (and dates).
_STR_ARGS = {b"SUBJECT": 1, b"FROM": 1, b"TO": 1, b"CC": 1, b"BCC": 1, b"HEADER": 2,
             b"BEFORE": 1, b"ON": 1, b"SINCE": 1, b"SENTBEFORE": 1, b"SENTON": 1,
             b"SENTSINCE": 1}


def _text_search_args(query: list) -> list:
    out: list = []
    pending = 0
    for item in query:
        if isinstance(item, list):
            out.append(_text_search_args(item))
        elif pending:
            out.append(item.decode("utf-8", "replace"))
            pending -= 1
        else:
            out.append(item)
            pending = _STR_ARGS.get(item.upper(), 0)
    return out


class IMAPServer(imap4.IMAP4Server):
    """One IMAP connection. ``factory`` supplies store, validator, knobs and the TLS mode."""

    IDENT = b"The Microsoft Exchange IMAP4 service is ready."
    account: Any
    mbox: Any
    blocked: Any
    _pendingLiteral: Any
    transport: Any
    MAX_LENGTH = 64 * 1024

    def __init__(self, factory: IMAPFactory, implicit_tls: bool) -> None:
        super().__init__(contextFactory=None if implicit_tls else factory.tls)
        self.factory = factory
        self._tls = implicit_tls
        self._nonsync = False
        self.timeOut = factory.knobs.preauth_timeout  # Twisted's pre-login timeout (60 s)

    # -- capabilities and greeting
    def listCapabilities(self):
        if self.state != "unauth":  # Microsoft 365's list after login, in its order
            return [b"IMAP4", b"IMAP4rev1", b"AUTH=PLAIN", b"AUTH=XOAUTH2", b"SASL-IR",
                    b"UIDPLUS", b"MOVE", b"ID", b"UNSELECT", b"CHILDREN", b"IDLE",
                    b"NAMESPACE", b"LITERAL+"]
        caps = [b"IMAP4rev1"]
        if not self._tls:
            caps.append(b"STARTTLS")
        else:
            caps += [b"AUTH=XOAUTH2", b"SASL-IR"]
        caps.append(b"LOGINDISABLED")
        return caps + [b"IDLE", b"UIDPLUS", b"MOVE", b"ID", b"LITERAL+", b"NAMESPACE",
                       b"UNSELECT", b"CHILDREN"]

    def do_LOGOUT(self, tag):
        self.sendUntaggedResponse(b"BYE Microsoft Exchange Server IMAP4 server signing off.")
        self.sendPositiveResponse(tag, b"LOGOUT completed.")
        self.transport.loseConnection()

    unauth_LOGOUT: Any = (do_LOGOUT,)
    auth_LOGOUT: Any = unauth_LOGOUT
    select_LOGOUT: Any = unauth_LOGOUT
    logout_LOGOUT: Any = unauth_LOGOUT

    def connectionLost(self, reason):
        if self.mbox is not None:
            self.mbox.removeListener(self)
            self.mbox = None
        super().connectionLost(reason)

    def do_STARTTLS(self, tag):
        if self._tls:
            self.sendBadResponse(tag, b"Command received in Invalid state.")
            return
        self.sendPositiveResponse(tag, b"Begin TLS negotiation now.")
        self.transport.startTLS(self.ctx)
        self.startedTLS = self._tls = True

    unauth_STARTTLS: Any = (do_STARTTLS,)

    def do_ID(self, tag, args):
        self.sendUntaggedResponse(
            b'ID ("name" "Microsoft.Exchange.Imap4.Imap4Server" "version" "15.20")')
        self.sendPositiveResponse(tag, b"ID completed.")

    def arg_rest(self, line):
        """Everything left on the line (None when there is nothing)."""
        return (line or None, b"")

    unauth_ID: Any = (do_ID, arg_rest)
    auth_ID: Any = unauth_ID
    select_ID: Any = unauth_ID

    # -- login
    def do_LOGIN(self, tag, user, passwd):
        self.sendNegativeResponse(tag, b"LOGIN failed.")

    unauth_LOGIN: Any = (do_LOGIN, imap4.IMAP4Server.arg_astring,
                         imap4.IMAP4Server.arg_finalastring)

    def do_AUTHENTICATE(self, tag, mechanism, initial):
        if mechanism.upper() != b"XOAUTH2":
            self.sendNegativeResponse(tag, b"Unsupported authentication mechanism.")
        elif not self._tls:
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Use STARTTLS first.")
        elif initial is None:
            self.sendLine(b"+ ")
            self._await_line().addCallback(self._auth_response, tag)
        else:
            self._auth_response(initial.strip(), tag)

    unauth_AUTHENTICATE: Any = (do_AUTHENTICATE, imap4.IMAP4Server.arg_atom, arg_rest)

    def _await_line(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        d.addCallback(lambda result: result[0] if isinstance(result, tuple) else result)
        self.parseState = "pending"
        self._pendingLiteral = d
        return d

    def _auth_response(self, line: bytes, tag: bytes) -> None:
        if line == b"*":
            self.sendBadResponse(tag, b"AUTHENTICATE aborted.")
            return
        self.blocked = []  # hold pipelined commands until the verdict
        common.check_xoauth2(self.factory.validator, line, "imap").addCallback(
            self._auth_verdict, tag)

    def _auth_verdict(self, login: common.Login, tag: bytes) -> None:
        if self.factory.knobs.xoauth2_temporary_failure:
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] " + common.TEMPORARY_FAILURE)
        elif login.ok:
            self.account = AccountAdapter(self.factory.store.account(login.user))
            self.state = "auth"
            self.setTimeout(self.POSTAUTH_TIMEOUT)
            self.sendPositiveResponse(tag, b"AUTHENTICATE completed.")  # no [CAPABILITY]
        elif self.factory.knobs.xoauth2_error_challenge:
            self.sendLine(b"+ " + common.error_challenge("imap"))
            self._await_line().addCallback(
                lambda _: self.sendNegativeResponse(tag, b"AUTHENTICATE failed."))
        else:
            self.sendNegativeResponse(tag, b"AUTHENTICATE failed.")
        self._unblock()

    # -- LITERAL+ : "{n+}" literals get no continuation request
    def lineReceived(self, line):
        self._nonsync = False
        if self.blocked is None and self.parseState in ("command", "pending"):
            m = _NONSYNC.search(line)
            if m:
                line = line[: m.start()] + b"{" + m.group(1) + b"}"
                self._nonsync = True
        super().lineReceived(line)

    def sendContinuationRequest(self, msg=b"Ready for additional command text"):
        if self._nonsync:
            self._nonsync = False
            return
        super().sendContinuationRequest(msg)

    # -- selection
    def _cbSelectWork(self, mbox, cmdName, tag):
        if mbox is None:
            self.sendNegativeResponse(tag, b"Mailbox doesn't exist.")
            return
        self.sendUntaggedResponse(b"%d EXISTS" % mbox.getMessageCount())
        self.sendUntaggedResponse(b"0 RECENT")
        self.sendUntaggedResponse(b"FLAGS (" + " ".join(mbox.getFlags()).encode() + b")")
        self.sendPositiveResponse(
            None, b"[PERMANENTFLAGS (" + " ".join(mbox.getFlags()).encode() + b")]")
        self.sendPositiveResponse(None, b"[UIDVALIDITY %d]" % mbox.getUIDValidity())
        self.sendPositiveResponse(None, b"[UIDNEXT %d]" % mbox.getUIDNext())
        mode = b"READ-WRITE" if mbox.isWriteable() else b"READ-ONLY"
        mbox.addListener(self)
        self.mbox = mbox
        self.state = "select"
        self.sendPositiveResponse(tag, b"[" + mode + b"] " + cmdName + b" completed.")

    auth_SELECT: Any = (imap4.IMAP4Server._selectWork, imap4.IMAP4Server.arg_astring, 1,
                        b"SELECT")
    select_SELECT: Any = auth_SELECT
    auth_EXAMINE: Any = (imap4.IMAP4Server._selectWork, imap4.IMAP4Server.arg_astring, 0,
                         b"EXAMINE")
    select_EXAMINE: Any = auth_EXAMINE

    def do_UNSELECT(self, tag):
        self.mbox.removeListener(self)
        self.mbox.close()
        self.mbox = None
        self.state = "auth"
        self.sendPositiveResponse(tag, b"UNSELECT completed.")

    select_UNSELECT: Any = (do_UNSELECT,)

    def do_IDLE(self, tag):
        self.sendLine(b"+ idling")
        self.parseTag = tag
        self.lastState = self.parseState
        self.parseState = "idle"

    auth_IDLE: Any = (do_IDLE,)
    select_IDLE: Any = auth_IDLE

    # -- APPEND with APPENDUID (UIDPLUS)
    def _cbAppendGotMailbox(self, mbox, tag, flags, date, message):
        if not mbox:
            self.sendNegativeResponse(tag, b"[TRYCREATE] Mailbox doesn't exist.")
            return
        flags = [f.decode() if isinstance(f, bytes) else f for f in flags or ()]
        d = mbox.addMessage(message, flags, date)

        def appended(uid):
            self.sendPositiveResponse(
                tag, b"[APPENDUID %d %d] APPEND completed." % (mbox.getUIDValidity(), uid))

        d.addCallback(appended).addErrback(
            lambda f: self.sendBadResponse(tag, b"APPEND failed."))

    # -- EXPUNGE, UID EXPUNGE
    def do_EXPUNGE(self, tag, messages=None, uid=0):
        if not self.mbox.isWriteable():
            self.sendNegativeResponse(tag, b"EXPUNGE ignored on read-only mailbox.")
            return
        for seq in self.mbox.expunge(messages):
            self.sendUntaggedResponse(b"%d EXPUNGE" % seq)
        self.sendPositiveResponse(tag, b"EXPUNGE completed.")

    select_EXPUNGE: Any = (do_EXPUNGE,)

    # -- MOVE, UID MOVE (RFC 6851)
    def do_MOVE(self, tag, messages, mailbox, uid=0):
        target = self.account.select(mailbox.decode("imap4-utf-7"))
        if target is None:
            self.sendNegativeResponse(tag, b"[TRYCREATE] Mailbox doesn't exist.")
            return
        if not self.mbox.isWriteable():
            self.sendNegativeResponse(tag, b"MOVE not allowed on a read-only mailbox.")
            return
        moved, copies, seqs = self.mbox.move(messages, uid, target.folder)
        if moved:
            self.sendPositiveResponse(None, b"[COPYUID %d %s %s]" % (
                target.getUIDValidity(), b",".join(b"%d" % u for u in moved),
                b",".join(b"%d" % u for u in copies)))
        for seq in seqs:
            self.sendUntaggedResponse(b"%d EXPUNGE" % seq)
        self.sendPositiveResponse(tag, b"MOVE completed.")

    select_MOVE: Any = (do_MOVE, imap4.IMAP4Server.arg_seqset,
                        imap4.IMAP4Server.arg_finalastring)

    def do_UID(self, tag, command, line):
        if command.upper() == b"MOVE":
            self.dispatchCommand(tag, b"MOVE", line, uid=1)
            return
        if command.upper() == b"EXPUNGE":
            messages, rest = self.arg_seqset(line)
            if rest:
                raise imap4.IllegalClientResponse("Too many arguments")
            self.do_EXPUNGE(tag, messages)
            return
        super().do_UID(tag, command, line)

    select_UID: Any = (do_UID, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_line)

    # -- SEARCH: synchronous, and "* SEARCH" even when nothing matched
    def do_SEARCH(self, tag, charset, query, uid=0):
        query = _text_search_args(query)
        msgs = self.mbox.fetch(imap4.MessageSet(1, None), False)
        last_seq = msgs[-1][0] if msgs else 0
        last_uid = msgs[-1][1].getUID() if msgs else 0
        try:
            hits = [
                msg.getUID() if uid else seq
                for seq, msg in msgs
                if self._searchFilter(copy.deepcopy(query), seq, msg, last_seq, last_uid)
            ]
        except Exception as exc:  # Twisted's search keys raise many kinds
            self.sendBadResponse(tag, b"SEARCH failed: " + str(exc).encode(errors="replace"))
            return
        self.sendUntaggedResponse(b"SEARCH" + b"".join(b" %d" % h for h in hits))
        self.sendPositiveResponse(tag, b"SEARCH completed.")

    select_SEARCH: Any = (do_SEARCH, imap4.IMAP4Server.opt_charset,
                          imap4.IMAP4Server.arg_searchkeys)

    # -- FETCH of raw bytes
    def _mark_seen(self, msg: Any, peek: bool) -> None:
        if not peek and isinstance(msg, Message) and self.mbox.isWriteable():
            msg.stored.flags.add(r"\Seen")

    def _spew_literal(self, label: bytes, payload: bytes, _w, _f):
        _w(label + b" {%d}\r\n" % len(payload))
        if len(payload) <= _CHUNK_INLINE:
            _w(payload)
            return None
        _f()
        return common.send_bytes(self.transport, payload)

    def spew_rfc822(self, id, msg, _w=None, _f=None):
        if not isinstance(msg, Message):
            return super().spew_rfc822(id, msg, _w, _f)
        self._mark_seen(msg, False)
        return self._spew_literal(b"RFC822", msg.stored.data, _w, _f)

    def spew_rfc822header(self, id, msg, _w=None, _f=None):
        if not isinstance(msg, Message):
            return super().spew_rfc822header(id, msg, _w, _f)
        data = msg.stored.data
        return self._spew_literal(b"RFC822.HEADER", data[: msg.stored.header_end()], _w, _f)

    def spew_rfc822text(self, id, msg, _w=None, _f=None):
        if not isinstance(msg, Message):
            return super().spew_rfc822text(id, msg, _w, _f)
        self._mark_seen(msg, False)
        data = msg.stored.data
        return self._spew_literal(b"RFC822.TEXT", data[msg.stored.header_end():], _w, _f)

    def spew_body(self, part, id, msg, _w=None, _f=None):
        plain_section = part.empty or part.text or part.header or part.mime
        if part.part or not plain_section or not isinstance(msg, Message):
            self._mark_seen(msg, part.peek or not plain_section)
            return super().spew_body(part, id, msg, _w, _f)
        data, end = msg.stored.data, msg.stored.header_end()
        if part.empty:
            section, payload = b"", data
        elif part.text:
            section, payload = b"TEXT", data[end:]
        elif part.header and part.header.fields:
            section = bytes(part.header)
            payload = _header_fields(data[:end], part.header.fields, part.header.negate)
        else:
            section, payload = (b"HEADER" if part.header else b"MIME"), data[:end]
        label = b"BODY[" + section + b"]"
        if part.partialBegin is not None:
            begin = part.partialBegin
            payload = payload[begin : begin + part.partialLength]
            label += b"<%d>" % begin
        self._mark_seen(msg, part.peek)
        return self._spew_literal(label, payload, _w, _f)


class IMAPFactory(common.MailFactory):
    server = IMAPServer


__all__ = ["IMAPFactory", "IMAPServer"]
