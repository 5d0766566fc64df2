"""Prove the real-server fixtures with stdlib clients and tokens from the fake Entra ID.

Every login here is checked by Dovecot's oauth2 passdb, which introspects the token at
the demo upstream over HTTPS; nothing is mocked. The failure tests pin the exact wire
behaviour of Dovecot 2.3 (RFC 7628 error challenge, then a tagged NO / -ERR / 535),
which the proxy must relay unchanged.
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import smtplib
import socket
import ssl
import time
import uuid
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from . import ServerStartError, make_tls_files, pid_alive, process_group_members
from . import dovecot as dovecot_module
from . import postfix as postfix_module
from .dovecot import Dovecot
from .postfix import Postfix

pytestmark = pytest.mark.realserver

ALICE = "alice@example.test"
BOB = "bob@example.test"
IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
POP_SCOPE = "https://outlook.office.com/POP.AccessAsUser.All"
SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"
ALL_SCOPES = [IMAP_SCOPE, POP_SCOPE, SMTP_SCOPE, "offline_access"]

# Dovecot 2.3's XOAUTH2 failure: this challenge, then NO/-ERR once the client answers "".
DOVECOT_ERROR_JSON = {"status": "401", "schemes": "bearer", "scope": "mail"}
DOVECOT_ERROR_CHALLENGE = b"eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0="
IMAP_AUTH_FAILED = b"NO [AUTHENTICATIONFAILED] Authentication failed."
POP_AUTH_FAILED = b"-ERR [AUTH] Authentication failed."


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


class Xoauth2Answers:
    """imaplib/smtplib authobject: the initial response, then "" to any error challenge."""

    def __init__(self, user: str, token: str) -> None:
        self.initial = xoauth2(user, token)
        self.challenges: list[bytes] = []

    def imap(self, challenge: bytes) -> bytes:
        if not self.challenges and challenge == b"":
            self.challenges.append(challenge)
            return self.initial
        self.challenges.append(challenge)
        return b""

    def smtp(self, challenge: bytes | None = None) -> str:
        first = not self.challenges
        if challenge is not None:
            self.challenges.append(challenge)
        if challenge is None or (first and challenge == b""):
            return self.initial.decode()  # initial response, or the answer to an empty 334
        return ""


def imap_login(server: Dovecot, user: str, token: str, *, starttls: bool = False) -> imaplib.IMAP4:
    context = client_context(server.ca_file)
    if starttls:
        imap: imaplib.IMAP4 = imaplib.IMAP4(server.host, server.ports["imap"], timeout=15)
        imap.starttls(ssl_context=context)
    else:
        imap = imaplib.IMAP4_SSL(
            server.host, server.ports["imaps"], ssl_context=context, timeout=15
        )
    try:
        typ, _ = imap.authenticate("XOAUTH2", Xoauth2Answers(user, token).imap)
        assert typ == "OK"
    except BaseException:
        imap.shutdown()
        raise
    return imap


# -- IMAP ---------------------------------------------------------------------------------


def test_imaps_xoauth2_with_fake_entra_token(dovecot: Dovecot, demo_upstream: Any) -> None:
    token = demo_upstream.issue_token(ALICE, [IMAP_SCOPE])
    imap = imap_login(dovecot, ALICE, token)
    try:
        assert imap.state == "AUTH"
        typ, data = imap.select("INBOX")
        assert (typ, data) == ("OK", [b"0"])
    finally:
        imap.logout()


def test_imap_starttls_xoauth2(dovecot: Dovecot, demo_upstream: Any) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.ports["imap"], timeout=15) as imap:
        assert "STARTTLS" in imap.capabilities
        # No plaintext mechanism is configured, so LOGIN is always disabled. Note that
        # Dovecot counts a connection whose remote IP equals its local IP (loopback) as
        # secured, so it offers AUTH=XOAUTH2 here even before STARTTLS.
        assert "LOGINDISABLED" in imap.capabilities
        assert "AUTH=XOAUTH2" in imap.capabilities
        imap.starttls(ssl_context=client_context(dovecot.ca_file))
        assert "AUTH=XOAUTH2" in imap.capabilities
        assert "AUTH=OAUTHBEARER" in imap.capabilities
        token = demo_upstream.issue_token(ALICE, [IMAP_SCOPE])
        typ, _ = imap.authenticate("XOAUTH2", Xoauth2Answers(ALICE, token).imap)
        assert typ == "OK"
        assert imap.noop()[0] == "OK"


def test_imap_login_name_is_case_insensitive(dovecot: Dovecot, demo_upstream: Any) -> None:
    token = demo_upstream.issue_token(ALICE, [IMAP_SCOPE])
    imap = imap_login(dovecot, "Alice@Example.TEST", token)
    imap.logout()


def test_imap_oauthbearer(dovecot: Dovecot, demo_upstream: Any) -> None:
    token = demo_upstream.issue_token(ALICE, [IMAP_SCOPE])
    response = f"n,a={ALICE},\x01auth=Bearer {token}\x01\x01".encode()
    with imaplib.IMAP4_SSL(
        dovecot.host, dovecot.ports["imaps"], ssl_context=client_context(dovecot.ca_file)
    ) as imap:
        assert imap.authenticate("OAUTHBEARER", lambda _: response)[0] == "OK"


@pytest.mark.parametrize("case", ["unknown token", "revoked token", "token of another user"])
def test_imap_rejected_token(case: str, dovecot: Dovecot, demo_upstream: Any) -> None:
    user, token = ALICE, "not-a-token-the-fake-entra-issued"
    if case == "revoked token":
        token = demo_upstream.issue_token(ALICE, [IMAP_SCOPE])
        imap_login(dovecot, ALICE, token).logout()  # valid until revoked
        demo_upstream.revoke(ALICE, access_tokens=True)
    elif case == "token of another user":
        token = demo_upstream.issue_token(ALICE, [IMAP_SCOPE])
        user = BOB
    answers = Xoauth2Answers(user, token)
    with imaplib.IMAP4_SSL(
        dovecot.host, dovecot.ports["imaps"], ssl_context=client_context(dovecot.ca_file)
    ) as imap:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            imap.authenticate("XOAUTH2", answers.imap)
        # One error challenge after the initial response: RFC 7628 JSON from Dovecot.
        assert [json.loads(c) for c in answers.challenges[1:]] == [DOVECOT_ERROR_JSON]
        assert imap.state == "NONAUTH"


def test_imap_failure_transcript_with_sasl_ir(dovecot: Dovecot) -> None:
    """The exact bytes of a failed XOAUTH2 login (SASL-IR, as the proxy sends it)."""
    context = client_context(dovecot.ca_file)
    raw = socket.create_connection((dovecot.host, dovecot.ports["imaps"]), timeout=15)
    with context.wrap_socket(raw, server_hostname=dovecot.host) as tls:
        stream = tls.makefile("rwb")
        assert stream.readline().startswith(b"* OK [CAPABILITY ")
        initial = base64.b64encode(xoauth2(ALICE, "bogus"))
        stream.write(b"a1 AUTHENTICATE XOAUTH2 " + initial + b"\r\n")
        stream.flush()
        began = time.monotonic()
        assert stream.readline() == b"+ " + DOVECOT_ERROR_CHALLENGE + b"\r\n"
        stream.write(b"\r\n")
        stream.flush()
        assert stream.readline() == b"a1 " + IMAP_AUTH_FAILED + b"\r\n"
        # auth_failure_delay (2 s, whole-second clock) delays the final NO by 1-2 s.
        assert time.monotonic() - began >= 0.9
        stream.write(b"a2 LOGOUT\r\n")
        stream.flush()
        assert stream.readline() == b"* BYE Logging out\r\n"


# -- POP3 ---------------------------------------------------------------------------------


def pop_auth(pop: poplib.POP3, user: str, token: str) -> bytes:
    """AUTH XOAUTH2 with an initial response (RFC 5034); returns the final reply.

    poplib has no AUTH support; its command helper treats any "+" reply (also the SASL
    continuation) as success and raises ``error_proto`` on "-ERR".
    """
    command: Any = pop._shortcmd  # type: ignore[attr-defined]
    reply: bytes = command("AUTH XOAUTH2 " + base64.b64encode(xoauth2(user, token)).decode())
    if reply.startswith(b"+ "):  # the error challenge
        assert reply == b"+ " + DOVECOT_ERROR_CHALLENGE
        reply = command("")
    return reply


def test_pop3s_xoauth2(dovecot: Dovecot, demo_upstream: Any) -> None:
    token = demo_upstream.issue_token(ALICE, [POP_SCOPE])
    pop = poplib.POP3_SSL(
        dovecot.host, dovecot.ports["pop3s"], context=client_context(dovecot.ca_file), timeout=15
    )
    try:
        assert pop_auth(pop, ALICE, token).startswith(b"+OK")
        assert pop.stat() == (0, 0)
    finally:
        pop.quit()


def test_pop3_stls_xoauth2_and_failure(dovecot: Dovecot, demo_upstream: Any) -> None:
    pop = poplib.POP3(dovecot.host, dovecot.ports["pop3"], timeout=15)
    try:
        assert "STLS" in pop.capa()
        pop.stls(context=client_context(dovecot.ca_file))
        assert "XOAUTH2" in pop.capa()["SASL"]
        with pytest.raises(poplib.error_proto) as failure:
            pop_auth(pop, ALICE, "bogus")
        assert failure.value.args[0] == POP_AUTH_FAILED
        token = demo_upstream.issue_token(ALICE, [POP_SCOPE])
        assert pop_auth(pop, ALICE, token).startswith(b"+OK")
    finally:
        pop.quit()


# -- SMTP submission through Postfix, delivery to Dovecot ---------------------------------


def test_submission_offers_xoauth2_only_after_starttls(postfix: Postfix) -> None:
    with smtplib.SMTP(postfix.host, postfix.submission_port, timeout=15) as smtp:
        smtp.ehlo()
        assert "auth" not in smtp.esmtp_features
        code, _ = smtp.docmd("AUTH XOAUTH2 " + base64.b64encode(xoauth2(ALICE, "x")).decode())
        assert code == 530  # 5.7.0 Must issue a STARTTLS command first
        smtp.starttls(context=client_context(postfix.ca_file))
        smtp.ehlo()
        assert smtp.esmtp_features["auth"].split() == ["XOAUTH2", "OAUTHBEARER"]


def test_submission_rejects_bad_token_with_dovecot_challenge(
    postfix: Postfix, demo_upstream: Any
) -> None:
    with smtplib.SMTP(postfix.host, postfix.submission_port, timeout=15) as smtp:
        smtp.starttls(context=client_context(postfix.ca_file))
        smtp.ehlo()
        answers = Xoauth2Answers(ALICE, "bogus")
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            smtp.auth("XOAUTH2", answers.smtp, initial_response_ok=True)
        assert [json.loads(c) for c in answers.challenges] == [DOVECOT_ERROR_JSON]
        assert failure.value.smtp_code == 535
        error: bytes | str = failure.value.smtp_error
        assert (error.decode() if isinstance(error, bytes) else error).startswith("5.7.8 ")
        # Unauthenticated mail is refused.
        smtp.docmd("MAIL FROM:<alice@example.test>")
        code, _ = smtp.docmd("RCPT TO:<bob@example.test>")
        assert code == 554


@pytest.mark.parametrize("initial_response", [True, False], ids=["sasl-ir", "continuation"])
def test_submission_long_xoauth2_response(
    initial_response: bool, postfix: Postfix, demo_upstream: Any
) -> None:
    """Postfix cuts command lines at line_length_limit (2048): a long SASL-IR breaks.

    Real Entra access tokens are 1.5-3 KB, so "AUTH XOAUTH2 <base64>" can exceed the
    limit; the same response sent after an empty 334 continuation is read whole.
    Padding with an extra "x=" pair (Dovecot ignores unknown keys) stands in for a
    long token, since the fake Entra issues short opaque ones.
    """
    token = demo_upstream.issue_token(ALICE, [SMTP_SCOPE])
    padded = b"x=" + b"A" * 3000 + b"\x01" + xoauth2(ALICE, token)
    encoded = base64.b64encode(padded).decode()
    assert len(encoded) > 2048
    with smtplib.SMTP(postfix.host, postfix.submission_port, timeout=15) as smtp:
        smtp.starttls(context=client_context(postfix.ca_file))
        smtp.ehlo()
        if initial_response:
            code, text = smtp.docmd("AUTH XOAUTH2 " + encoded)
            assert (code, text) == (
                535,
                b"5.7.8 Error: authentication failed: Invalid base64 data in initial response",
            )
        else:
            assert smtp.docmd("AUTH XOAUTH2") == (334, b"")
            assert smtp.docmd(encoded)[0] == 235


def make_message(message_id: str) -> bytes:
    """A message with every header Postfix would otherwise add, and awkward body lines."""
    return (
        "From: Alice <alice@example.test>\r\n"
        "To: Bob <bob@example.test>\r\n"
        f"Subject: real-server delivery {message_id}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "First line.\r\n"
        ".a leading dot survives dot-stuffing\r\n"
        "..and two dots\r\n"
        "From the start of a line, not an mbox separator\r\n"
        "trailing spaces   \r\n"
        "Gr\u00fc\u00dfe in 8 bit\r\n"
        "\r\n"
        "last line\r\n"
    ).encode()


def fetch_by_message_id(
    server: Dovecot, user: str, token: str, message_id: str, timeout: float = 20.0
) -> bytes:
    """Poll ``user``'s INBOX over IMAP until the message arrives; return its raw bytes."""
    imap = imap_login(server, user, token)
    try:
        deadline = time.monotonic() + timeout
        while True:
            imap.select("INBOX", readonly=True)
            typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", f"<{message_id}>")
            assert typ == "OK"
            uids = data[0].split()
            if uids:
                assert len(uids) == 1
                typ, fetched = imap.uid("FETCH", uids[0], "(BODY.PEEK[])")
                assert typ == "OK"
                return fetched[0][1]
            if time.monotonic() > deadline:
                raise AssertionError(f"{message_id} not delivered to {user} in {timeout}s")
            time.sleep(0.1)
    finally:
        imap.logout()


def header_names(block: bytes) -> list[str]:
    names = []
    for line in block.split(b"\r\n"):
        if line and not line[:1].isspace():
            names.append(line.split(b":", 1)[0].decode())
    return names


def test_submission_xoauth2_delivers_to_dovecot(
    postfix: Postfix, dovecot: Dovecot, demo_upstream: Any
) -> None:
    message_id = f"{uuid.uuid4()}@example.test"
    message = make_message(message_id)
    with smtplib.SMTP(postfix.host, postfix.submission_port, timeout=15) as smtp:
        smtp.starttls(context=client_context(postfix.ca_file))
        smtp.ehlo()
        token = demo_upstream.issue_token(ALICE, [SMTP_SCOPE])
        code, _ = smtp.auth("XOAUTH2", Xoauth2Answers(ALICE, token).smtp, initial_response_ok=False)
        assert code == 235
        refused = smtp.sendmail(ALICE, [BOB], message, mail_options=["BODY=8BITMIME"])
        assert refused == {}

    delivered = fetch_by_message_id(
        dovecot, BOB, demo_upstream.issue_token(BOB, ALL_SCOPES), message_id
    )
    # The delivered message is the submitted one, byte for byte, after the trace headers
    # that Postfix (Received) and Dovecot LMTP (Return-Path, Delivered-To, Received) add.
    assert delivered.endswith(message)
    added = delivered[: -len(message)]
    assert added.endswith(b"\r\n")
    assert set(header_names(added)) <= {"Return-Path", "Delivered-To", "Received"}
    assert f"Delivered-To: {BOB}".encode() in added
    assert f"Return-Path: <{ALICE}>".encode() in added
    # The maildir holds the same message (LF line ends on disk).
    on_disk = dovecot.mailbox_messages(BOB)
    assert len(on_disk) == 1
    assert on_disk[0].endswith(message.replace(b"\r\n", b"\n"))
    assert f"sasl_method=XOAUTH2, sasl_username={ALICE}" in postfix.log_text()


# -- the helpers themselves ----------------------------------------------------------------


def test_two_dovecots_at_once_and_clean_stop(dovecot: Dovecot, demo_upstream: Any) -> None:
    second = Dovecot.start(
        introspection_url=f"{demo_upstream.authority}/oauth2/v2.0/introspect",
        introspection_ca_file=demo_upstream.ca_file,
    )
    try:
        assert set(second.ports.values()).isdisjoint(dovecot.ports.values())
        token = demo_upstream.issue_token(ALICE, [IMAP_SCOPE])
        imap_login(second, ALICE, token).logout()
        imap_login(dovecot, ALICE, token).logout()
        assert second.process is not None
        master = second.process.pid
    finally:
        second.stop()
    assert not pid_alive(master)
    assert process_group_members(master) == []
    assert not second.root.exists()
    with pytest.raises(OSError):
        socket.create_connection((second.host, second.ports["imaps"]), timeout=2).close()


def test_postfix_stop_kills_master_and_children(postfix: Postfix) -> None:
    master = postfix.master_pid()
    assert master is not None
    postfix.stop()
    assert not pid_alive(master)
    assert process_group_members(master) == []
    assert not postfix.root.exists()
    postfix.stop()  # idempotent; the fixture calls it again


def test_dovecot_start_failure_reports_log(
    _dovecot_runnable: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dovecot_module, "_CONFIG", dovecot_module._CONFIG + "no_such_setting = 1\n")
    ca = make_tls_files(tmp_path / "ca").ca_file
    with pytest.raises(ServerStartError, match="no_such_setting") as failure:
        Dovecot.start(introspection_url="https://127.0.0.1:9/introspect", introspection_ca_file=ca)
    assert "Dovecot did not start" in str(failure.value)


def test_postfix_start_failure_reports_its_error(
    _postfix_runnable: None, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        postfix_module, "_MAIN_CF", postfix_module._MAIN_CF + "maillog_file_prefixes = /nowhere\n"
    )
    with pytest.raises(
        ServerStartError, match="does not match any prefix in maillog_file_prefixes"
    ):
        Postfix.start(dovecot)
