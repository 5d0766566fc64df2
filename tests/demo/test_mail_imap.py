"""The fake Microsoft 365 IMAP server, driven by ``imaplib`` (and raw lines where imaplib
cannot: SASL-IR, LITERAL+, IDLE) over TLS verified with the demo CA."""

from __future__ import annotations

import base64
import imaplib
import json
import smtplib
import socket

import pytest

from proxy.protocol.sasl import xoauth2_b64, xoauth2_response
from tests.demo.demotools import IMAP, POP, USER

MSG = (b"From: Bob <bob@example.com>\r\nTo: alice@example.com\r\nSubject: hello\r\n"
       b"Date: Fri, 21 Nov 2025 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\n"
       b"first line\r\n.leading dot\r\n\r\nlast line\r\n")


def imaps(up, ctx) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("127.0.0.1", up.ports["imaps"], ssl_context=ctx, timeout=10)


def login(up, ctx, token: str, user: str = USER) -> imaplib.IMAP4_SSL:
    m = imaps(up, ctx)
    typ, _ = m.authenticate("XOAUTH2", lambda _: xoauth2_response(user, token))
    assert typ == "OK"
    return m


class Raw:
    """Line-level IMAP over a verified TLS socket."""

    def __init__(self, up, ctx) -> None:
        sock = socket.create_connection(("127.0.0.1", up.ports["imaps"]), timeout=10)
        self.sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        self.f = self.sock.makefile("rwb")
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()

    def line(self) -> bytes:
        line = self.f.readline()
        assert line.endswith(b"\r\n"), line
        return line[:-2]

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            lines.append(self.line())
            if lines[-1].startswith(tag + b" "):
                return lines

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def test_capabilities_and_login_refused(demo_upstream, ctx) -> None:
    m = imaps(demo_upstream, ctx)
    for cap in ("IMAP4REV1", "AUTH=XOAUTH2", "SASL-IR", "IDLE", "UIDPLUS", "MOVE", "ID",
                "LITERAL+", "LOGINDISABLED"):
        assert cap in m.capabilities
    assert "STARTTLS" not in m.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="LOGIN failed."):
        m.login(USER, "password")
    m.logout()


def test_plain_port_needs_starttls(demo_upstream, ctx, token) -> None:
    m = imaplib.IMAP4("127.0.0.1", demo_upstream.ports["imap"], timeout=10)
    assert {"STARTTLS", "LOGINDISABLED"} <= set(m.capabilities)
    assert "AUTH=XOAUTH2" not in m.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        m.authenticate("XOAUTH2", lambda _: xoauth2_response(USER, token))
    m.starttls(ssl_context=ctx)
    assert "AUTH=XOAUTH2" in m.capabilities and "STARTTLS" not in m.capabilities
    assert m.authenticate("XOAUTH2", lambda _: xoauth2_response(USER, token))[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()


M365_CAPS_AFTER_LOGIN = ("IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID "
                         "UNSELECT CHILDREN IDLE NAMESPACE LITERAL+")


def test_authenticate_with_continuation(demo_upstream, ctx, token) -> None:
    """Like Microsoft 365: a plain OK, the capabilities only from CAPABILITY after login."""
    m = imaps(demo_upstream, ctx)
    typ, data = m.authenticate("XOAUTH2", lambda _: xoauth2_response(USER, token))
    assert (typ, data) == ("OK", [b"AUTHENTICATE completed."])
    typ, data = m.capability()
    assert (typ, data) == ("OK", [M365_CAPS_AFTER_LOGIN.encode()])
    m.logout()


def test_sasl_ir_good_and_bad(demo_upstream, ctx, token) -> None:
    raw = Raw(demo_upstream, ctx)
    assert raw.greeting.startswith(b"* OK ")
    raw.send(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2_b64(USER, "wrong-token") + b"\r\n")
    assert raw.line() == b"a1 NO AUTHENTICATE failed."
    raw.send(b"a2 AUTHENTICATE XOAUTH2 " + xoauth2_b64(USER, token) + b"\r\n")
    assert raw.line() == b"a2 OK AUTHENTICATE completed."
    raw.send(b"a3 LOGOUT\r\n")
    assert raw.until(b"a3")[-1] == b"a3 OK LOGOUT completed."
    raw.close()


def test_bad_token_wrong_scope_wrong_user(demo_upstream, ctx) -> None:
    pop_only = demo_upstream.issue_token(USER, [POP])
    bobs = demo_upstream.issue_token("bob@example.com", [IMAP])
    for user, tok in ((USER, "garbage"), (USER, pop_only), (USER, bobs)):
        m = imaps(demo_upstream, ctx)
        with pytest.raises(imaplib.IMAP4.error, match=r"^AUTHENTICATE failed\.$"):
            m.authenticate("XOAUTH2", lambda _, u=user, t=tok: xoauth2_response(u, t))
        m.logout()


def test_error_challenge(demo_upstream, ctx) -> None:
    demo_upstream.configure(xoauth2_error_challenge=True)
    challenges: list[bytes] = []

    def respond(challenge: bytes) -> bytes:
        if challenge:
            challenges.append(challenge)
            return b""  # the client's empty response to the error challenge
        return xoauth2_response(USER, "bad")

    m = imaps(demo_upstream, ctx)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATE failed."):
        m.authenticate("XOAUTH2", respond)
    assert json.loads(challenges[0]) == {"status": "401", "schemes": "bearer", "scope": IMAP}
    m.logout()

    raw = Raw(demo_upstream, ctx)  # and with SASL-IR
    raw.send(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2_b64(USER, "bad") + b"\r\n")
    line = raw.line()
    assert line.startswith(b"+ ")
    assert json.loads(base64.b64decode(line[2:]))["status"] == "401"
    raw.send(b"\r\n")
    assert raw.line() == b"a1 NO AUTHENTICATE failed."
    raw.close()


def test_fetch_variants_byte_identical(demo_upstream, ctx, token) -> None:
    demo_upstream.deliver(USER, MSG)
    m = login(demo_upstream, ctx, token)
    assert m.select("INBOX") == ("OK", [b"1"])
    typ, data = m.fetch("1", "(UID FLAGS RFC822.SIZE BODY.PEEK[] INTERNALDATE ENVELOPE)")
    assert typ == "OK"
    head, body = data[0]
    assert body == MSG
    assert b"UID 1" in head and b"FLAGS ()" in head and b"RFC822.SIZE %d" % len(MSG) in head
    assert b'"hello"' in data[1] and b"INTERNALDATE" in data[1]
    header_end = MSG.index(b"\r\n\r\n") + 4
    _, data = m.fetch("1", "(BODY.PEEK[HEADER] BODY.PEEK[TEXT] BODY.PEEK[]<5.10> "
                           "BODY.PEEK[HEADER.FIELDS (SUBJECT TO)])")
    parts = [p[1] for p in data if isinstance(p, tuple)]
    assert parts == [MSG[:header_end], MSG[header_end:], MSG[5:15],
                     b"To: alice@example.com\r\nSubject: hello\r\n\r\n"]
    assert m.fetch("1", "(FLAGS)")[1] == [b"1 (FLAGS ())"]  # PEEK leaves \Seen unset
    _, data = m.uid("FETCH", "1:*", "(RFC822)")
    assert data[0][1] == MSG
    assert b"\\Seen" in m.fetch("1", "(FLAGS)")[1][0]
    assert m.search(None, "SUBJECT", "hello") == ("OK", [b"1"])
    assert m.search(None, "UNSEEN") == ("OK", [b""])
    m.close()
    m.logout()


def test_examine_is_read_only(demo_upstream, ctx, token) -> None:
    demo_upstream.deliver(USER, MSG)
    m = login(demo_upstream, ctx, token)
    typ, _ = m.select("INBOX", readonly=True)
    assert typ == "OK"
    assert m.fetch("1", "(BODY[])")[1][0][1] == MSG
    assert m.fetch("1", "(FLAGS)")[1] == [b"1 (FLAGS ())"]
    m.logout()


def test_append_uidplus_literal_plus_and_expunge(demo_upstream, ctx, token) -> None:
    m = login(demo_upstream, ctx, token)
    typ, data = m.append("INBOX", r"(\Flagged)", '"21-Nov-2025 10:00:00 +0000"', MSG)
    assert typ == "OK" and data[0].startswith(b"[APPENDUID ")
    assert data[0].endswith(b" 1] APPEND completed.")
    assert demo_upstream.mailbox(USER) == [MSG]
    m.logout()

    raw = Raw(demo_upstream, ctx)  # LITERAL+: no continuation request
    raw.send(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2_b64(USER, token) + b"\r\n")
    assert raw.until(b"a1")[-1].startswith(b"a1 OK")
    raw.send(b"a2 APPEND INBOX {%d+}\r\n" % len(MSG) + MSG + b"\r\n")
    assert raw.until(b"a2")[-1].endswith(b" 2] APPEND completed.")
    raw.send(b"a3 SELECT INBOX\r\n")
    assert b"* 2 EXISTS" in raw.until(b"a3")
    raw.send(b"a4 STORE 1:2 +FLAGS.SILENT (\\Deleted)\r\na5 UID EXPUNGE 2\r\n")
    assert raw.until(b"a4")[-1] == b"a4 OK STORE completed"
    assert raw.until(b"a5") == [b"* 2 EXPUNGE", b"a5 OK EXPUNGE completed."]
    raw.send(b"a6 EXPUNGE\r\n")
    assert raw.until(b"a6") == [b"* 1 EXPUNGE", b"a6 OK EXPUNGE completed."]
    raw.close()
    assert demo_upstream.mailbox(USER) == []


def test_idle_announces_mail_submitted_by_smtp(demo_upstream, ctx, token) -> None:
    demo_upstream.deliver(USER, MSG)
    raw = Raw(demo_upstream, ctx)
    raw.send(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2_b64(USER, token) + b"\r\n")
    raw.until(b"a1")
    raw.send(b"a2 SELECT INBOX\r\n")
    assert b"* 1 EXISTS" in raw.until(b"a2")
    raw.send(b"a3 IDLE\r\n")
    assert raw.line() == b"+ idling"
    with smtplib.SMTP_SSL("127.0.0.1", demo_upstream.ports["smtps"], context=ctx,
                          timeout=10) as s:
        s.ehlo("test")
        s.auth("XOAUTH2", lambda _=None: xoauth2_response(USER, token).decode())
        s.sendmail(USER, [USER], MSG)
    assert raw.line() == b"* 2 EXISTS"  # the socket timeout is the deadline
    raw.send(b"DONE\r\n")
    assert raw.line() == b"a3 OK IDLE terminated"
    raw.send(b"a4 FETCH 2 (BODY.PEEK[])\r\n")
    assert raw.line() == b"* 2 FETCH (BODY[] {%d}" % len(MSG)
    raw.close()


def test_mailbox_commands(demo_upstream, ctx, token) -> None:
    m = login(demo_upstream, ctx, token)
    assert m.noop()[0] == "OK"
    assert m.namespace() == ("OK", [b'(("" "/")) NIL NIL'])
    typ, data = m.xatom("ID", '("name" "test")')
    assert typ == "OK"
    assert m.create("Archive")[0] == "OK"
    assert m.create("Archive")[0] == "NO"
    typ, boxes = m.list()
    assert typ == "OK" and {b.split(b'"/" ')[1] for b in boxes} == {b'"INBOX"', b'"Archive"'}
    assert m.lsub()[0] == "OK"
    assert m.append("Archive", None, None, MSG)[0] == "OK"
    assert m.status("Archive", "(MESSAGES UIDNEXT UNSEEN)") == (
        "OK", [b"Archive (MESSAGES 1 UIDNEXT 2 UNSEEN 1)"])
    assert m.select("Nope")[0] == "NO"
    assert m.select("Archive") == ("OK", [b"1"])
    assert m.store("1", "+FLAGS", r"(\Deleted)")[0] == "OK"
    assert m.close()[0] == "OK"  # CLOSE expunges silently
    assert m.status("Archive", "(MESSAGES)") == ("OK", [b"Archive (MESSAGES 0)"])
    assert demo_upstream.mailbox(USER) == []
    m.logout()


def test_move_and_uid_move(demo_upstream, ctx, token) -> None:
    msgs = [MSG.replace(b"hello", b"hello %d" % n) for n in (1, 2, 3)]
    for msg in msgs:
        demo_upstream.deliver(USER, msg)
    raw = Raw(demo_upstream, ctx)
    raw.send(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2_b64(USER, token) + b"\r\n")
    raw.until(b"a1")
    raw.send(b"a2 CREATE Archive\r\na3 SELECT INBOX\r\n")
    raw.until(b"a2")
    assert b"* 3 EXISTS" in raw.until(b"a3")
    raw.send(b"a4 MOVE 2 Archive\r\n")
    copyuid, *rest = raw.until(b"a4")
    assert copyuid.startswith(b"* OK [COPYUID ") and copyuid.endswith(b" 2 1]")
    assert rest == [b"* 2 EXPUNGE", b"a4 OK MOVE completed."]
    raw.send(b"a5 UID MOVE 3 Archive\r\n")
    copyuid, *rest = raw.until(b"a5")
    assert copyuid.endswith(b" 3 2]")
    assert rest == [b"* 2 EXPUNGE", b"a5 OK MOVE completed."]
    raw.send(b"a6 UID MOVE 1 Nope\r\n")
    assert raw.until(b"a6") == [b"a6 NO [TRYCREATE] Mailbox doesn't exist."]
    raw.send(b"a7 STATUS Archive (MESSAGES)\r\n")
    assert raw.until(b"a7")[0] == b"* STATUS Archive (MESSAGES 2)"
    raw.close()
    assert demo_upstream.mailbox(USER) == msgs[:1]


def test_commands_need_login(demo_upstream, ctx) -> None:
    m = imaps(demo_upstream, ctx)
    with pytest.raises(imaplib.IMAP4.error):
        m.select("INBOX")
    m.logout()
