"""The fake Microsoft 365 submission server, driven by ``smtplib`` (plus ``curl`` and
``swaks``) over TLS verified with the demo CA; and mail flowing from SMTP to IMAP and POP3,
byte for byte, including a 20 MB message."""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import shutil
import smtplib
import subprocess
import time

import pytest

from proxy.demo import tokens
from proxy.protocol.sasl import xoauth2_b64, xoauth2_response
from tests.demo.demotools import IMAP, SMTP, USER

FAILURE_535 = b"5.7.3 Authentication unsuccessful [SN4PR0201CA0000.namprd02.prod.outlook.com]"
MSG = (b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: hi \xc3\xa9\r\n\r\n"
       b"8bit body \xe2\x82\xac\r\n.leading dot\r\n..two\r\n\r\nend\r\n")


def xoauth2(user: str, tok: str):
    return lambda challenge=None: xoauth2_response(user, tok).decode()


def submission(up, ctx) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", up.ports["submission"], timeout=30)
    s.starttls(context=ctx)
    s.ehlo("client.example")
    return s


def smtps(up, ctx, token: str, user: str = USER) -> smtplib.SMTP_SSL:
    s = smtplib.SMTP_SSL("127.0.0.1", up.ports["smtps"], context=ctx, timeout=60)
    s.ehlo("client.example")
    assert s.auth("XOAUTH2", xoauth2(user, token))[0] == 235
    return s


def test_ehlo_before_and_after_starttls(demo_upstream, ctx) -> None:
    demo_upstream.configure(max_message_size=1234567)
    s = smtplib.SMTP("127.0.0.1", demo_upstream.ports["submission"], timeout=10)
    code, banner = s.ehlo("client.example")
    assert code == 250 and b"STARTTLS" in banner and b"AUTH" not in banner
    assert s.docmd("AUTH", "XOAUTH2") == (504, b"5.7.4 Unrecognized authentication type")
    s.starttls(context=ctx)
    code, banner = s.ehlo("client.example")
    lines = banner.split(b"\n")[1:]
    assert lines == [b"SIZE 1234567", b"PIPELINING", b"ENHANCEDSTATUSCODES",
                     b"AUTH LOGIN XOAUTH2", b"8BITMIME", b"SMTPUTF8"]
    s.quit()


def test_mail_before_auth(demo_upstream, ctx) -> None:
    s = submission(demo_upstream, ctx)
    assert s.mail(USER) == (530, b"5.7.57 Client not authenticated to send mail.")
    s.quit()


def test_auth_with_and_without_initial_response(demo_upstream, ctx, token) -> None:
    for initial in (True, False):
        s = submission(demo_upstream, ctx)
        code, text = s.auth("XOAUTH2", xoauth2(USER, token), initial_response_ok=initial)
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        assert s.docmd("AUTH", "XOAUTH2") == (503, b"5.5.2 Already authenticated")
        s.quit()


def test_bad_token_wrong_scope_and_basic_auth(demo_upstream, ctx) -> None:
    imap_only = demo_upstream.issue_token(USER, [IMAP])
    for tok in ("garbage", imap_only):
        s = submission(demo_upstream, ctx)
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.auth("XOAUTH2", xoauth2(USER, tok))
        assert (err.value.smtp_code, err.value.smtp_error) == (535, FAILURE_535)
        s.quit()
    s = submission(demo_upstream, ctx)
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        s.login(USER, "password")  # smtplib picks AUTH LOGIN
    assert err.value.smtp_error.startswith(b"5.7.139 Authentication unsuccessful, basic auth")
    s.quit()


def test_error_challenge(demo_upstream, ctx) -> None:
    demo_upstream.configure(xoauth2_error_challenge=True)
    s = submission(demo_upstream, ctx)
    code, challenge = s.docmd("AUTH", "XOAUTH2 " + xoauth2_b64(USER, "bad").decode())
    assert code == 334
    assert json.loads(base64.b64decode(challenge)) == {
        "status": "401", "schemes": "bearer", "scope": SMTP}
    assert s.docmd("") == (535, FAILURE_535)
    s.quit()


def test_sender_must_be_the_user(demo_upstream, ctx, token) -> None:
    s = submission(demo_upstream, ctx)
    s.auth("XOAUTH2", xoauth2(USER, token))
    assert s.mail("mallory@example.com") == (
        550, b"5.7.60 SMTP; Client does not have permissions to send as this sender")
    assert s.mail("ALICE@example.com")[0] == 250
    s.quit()


def test_app_only_token(demo_upstream, ctx) -> None:
    app = demo_upstream.issue_token(None, ["https://outlook.office365.com/.default"])
    s = smtps(demo_upstream, ctx, app)
    if hasattr(tokens.Validator, "app_only"):  # the validator tells app-only tokens apart
        assert s.mail("someone.else@example.com")[0] == 250
    else:
        assert s.mail(USER)[0] == 250
    s.quit()


def test_flow_to_imap_and_pop_with_rejected_recipient(demo_upstream, ctx, token) -> None:
    s = smtps(demo_upstream, ctx, token)
    refused = s.sendmail(USER, ["bob@example.com", "reject.me@example.com", USER], MSG,
                         mail_options=["BODY=8BITMIME"])
    assert refused == {"reject.me@example.com": (550, b"5.1.1 User unknown")}
    s.quit()
    assert demo_upstream.mailbox("bob@example.com") == [MSG]
    assert demo_upstream.mailbox("reject.me@example.com") == []

    m = imaplib.IMAP4_SSL("127.0.0.1", demo_upstream.ports["imaps"], ssl_context=ctx,
                          timeout=10)
    m.authenticate("XOAUTH2", lambda _: xoauth2_response(USER, token))
    m.select("INBOX")
    assert m.fetch("1", "(BODY.PEEK[])")[1][0][1] == MSG
    m.logout()

    p = poplib.POP3_SSL("127.0.0.1", demo_upstream.ports["pop3s"], context=ctx, timeout=10)
    p._shortcmd("AUTH XOAUTH2 " + xoauth2_b64(USER, token).decode())
    assert b"\r\n".join(p.retr(1)[1]) + b"\r\n" == MSG
    p.quit()


def test_session_with_several_messages(demo_upstream, ctx, token) -> None:
    s = smtps(demo_upstream, ctx, token)
    replies = set()
    for n in range(3):
        s.mail(USER)
        s.rcpt("bob@example.com")
        code, reply = s.data(b"Subject: %d\r\n\r\nbody\r\n" % n)
        assert code == 250 and reply.startswith(b"2.0.0 OK <")
        assert reply.endswith(b"> [Hostname=demo.outlook.example]")
        replies.add(reply)
    assert len(replies) == 3  # unique queue ids
    s.mail(USER)
    assert s.rset() == (250, b"2.0.0 Resetting")
    assert s.rcpt("bob@example.com")[0] == 503
    assert s.noop() == (250, b"2.0.0 OK")
    assert s.docmd("DATA") == (503, b"5.5.1 Need mail command")
    s.quit()
    assert [m.split(b"\r\n")[0] for m in demo_upstream.mailbox("bob@example.com")] == [
        b"Subject: 0", b"Subject: 1", b"Subject: 2"]


def test_size_limit(demo_upstream, ctx, token) -> None:
    demo_upstream.configure(max_message_size=1000)
    s = smtps(demo_upstream, ctx, token)
    assert s.mail(USER, ["SIZE=2000"])[0] == 552
    s.mail(USER)
    s.rcpt("bob@example.com")
    assert s.data(b"x" * 1500 + b"\r\n")[0] == 552
    s.quit()
    assert demo_upstream.mailbox("bob@example.com") == []


def _big_message(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n"
    body = (line * (size // len(line))).replace(b"\r\n0123", b"\r\n.123", 1000)
    return b"Subject: big\r\nFrom: alice@example.com\r\n\r\n" + body


def test_20_mb_message(demo_upstream, ctx, token) -> None:
    big = _big_message(20 * 1024 * 1024)
    s = smtps(demo_upstream, ctx, token)
    started = time.perf_counter()
    assert s.sendmail(USER, [USER], big) == {}
    submitted = time.perf_counter() - started
    s.quit()

    m = imaplib.IMAP4_SSL("127.0.0.1", demo_upstream.ports["imaps"], ssl_context=ctx,
                          timeout=60)
    m.authenticate("XOAUTH2", lambda _: xoauth2_response(USER, token))
    m.select("INBOX")
    started = time.perf_counter()
    fetched = m.fetch("1", "(BODY.PEEK[])")[1][0][1]
    imap_time = time.perf_counter() - started
    assert fetched == big
    m.logout()

    p = poplib.POP3_SSL("127.0.0.1", demo_upstream.ports["pop3s"], context=ctx, timeout=60)
    p._shortcmd("AUTH XOAUTH2 " + xoauth2_b64(USER, token).decode())
    assert b"\r\n".join(p.retr(1)[1]) + b"\r\n" == big
    p.quit()
    print(f"20 MB: SMTP submit {submitted:.2f}s, IMAP fetch {imap_time:.2f}s")
    assert submitted < 30 and imap_time < 30


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sends_and_fetches(demo_upstream, ctx, token, tmp_path) -> None:
    message = tmp_path / "msg.eml"
    message.write_bytes(MSG)
    common = ["curl", "--silent", "--show-error", "--max-time", "20", "--cacert",
              demo_upstream.ca_file, "--user", USER, "--oauth2-bearer", token]
    subprocess.run(common + [
        f"smtp://127.0.0.1:{demo_upstream.ports['submission']}", "--ssl-reqd",
        "--mail-from", USER, "--mail-rcpt", USER, "--upload-file", str(message),
    ], check=True, timeout=30)
    assert demo_upstream.mailbox(USER) == [MSG]
    fetched = subprocess.run(common + [
        f"imaps://127.0.0.1:{demo_upstream.ports['imaps']}/INBOX;UID=1",
    ], check=True, timeout=30, capture_output=True).stdout
    assert fetched == MSG


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_basic_auth_is_refused(demo_upstream) -> None:
    # swaks (20201014) has no XOAUTH2; it shows STARTTLS (verified) and AUTH LOGIN refused.
    result = subprocess.run([
        "swaks", "--server", f"127.0.0.1:{demo_upstream.ports['submission']}", "--tls",
        "--tls-verify", "--tls-ca-path", demo_upstream.ca_file, "--auth", "LOGIN",
        "--auth-user", USER, "--auth-password", "password", "--from", USER, "--to", USER,
        "--timeout", "20",
    ], timeout=60, capture_output=True, text=True)
    assert result.returncode != 0
    assert "535 5.7.139 Authentication unsuccessful, basic authentication is disabled." in (
        result.stdout)
    assert "220 2.0.0 SMTP server ready" in result.stdout
