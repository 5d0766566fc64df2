"""The SMTP proxy end to end: real clients (smtplib, swaks) → proxy → fake Microsoft 365.

Every test runs with logging captured at DEBUG and ends by checking that no password, in
clear or base64, reached a log record (``no_password_in_logs``)."""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import smtplib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.config import Address, Limits, Listener
from proxy.demo import certs
from proxy.demo.process import DemoUpstream
from proxy.protocol import sasl
from proxy.server import smtp as smtp_mod
from proxy.server.connection import Connection
from proxy.server.limits import PreauthLimiter
from proxy.server.smtp_upstream import Reply, queue_id
from tests.proxyenv import PASSWORD, USER, ProxyEnv, authorise
from tests.server.smtp_commands import CLOSING, Client, UpstreamRecorder, check_reply
from tests.server.smtp_util import (
    DEVICE_PASSWORD,
    RCPT,
    ScriptedUpstream,
    assert_no_leak,
    big_message,
    client,
    closed_port,
    in_thread,
    login_count,
    message,
    message_count,
    plain_b64,
    poll,
    secret_forms,
    start_smtp_proxy,
    trust,
    wait_until_eof_seen,
)

WRONG_PASSWORD = "Not-The-Password-123"
BOB = "bob@contoso.example"
SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"


@pytest.fixture(autouse=True)
def no_password_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    assert_no_leak(records, secret_forms(PASSWORD, DEVICE_PASSWORD, WRONG_PASSWORD))
    chatty = [r for r in records if r.name == "mail.log" and r.levelno < logging.ERROR]
    assert not chatty, "aiosmtpd's mail.log must stay quiet (it logs commands and DATA lines)"


@pytest.fixture
async def proxies() -> AsyncIterator[list[ProxyEnv]]:
    started: list[ProxyEnv] = []
    yield started
    for env in started:
        await env.daemon.stop(grace=1)


@pytest.fixture
async def smtp_env(tmp_path: Path, demo_upstream: DemoUpstream,
                   proxies: list[ProxyEnv]) -> ProxyEnv:
    env = await start_smtp_proxy(tmp_path, demo_upstream)
    proxies.append(env)
    return env


def send_ok(port: int, subject: str = "check", password: str = DEVICE_PASSWORD) -> None:
    with client(port) as s:
        s.login(USER, password)
        assert s.sendmail(USER, [RCPT], message(subject)) == {}


def auth_plain(port: int, password: str, user: str = USER) -> tuple[int, bytes]:
    with client(port) as s:
        s.ehlo()
        return s.docmd("AUTH", "PLAIN " + plain_b64(user, password))


# --- the happy paths --------------------------------------------------------------------------


async def test_auth_plain_several_messages_with_rset_and_noop(smtp_env: ProxyEnv) -> None:
    port, up = smtp_env.ports["smtp"], smtp_env.upstream
    accepted = message_count("accepted")
    logins = login_count("ok")
    msgs = [message(f"message {i}", b"Line one\r\n.leading dot\r\nCR LF line ends\r\n")
            for i in range(3)]

    def run() -> None:
        with client(port) as s:
            code, features = s.ehlo()
            assert code == 250
            for extension in ("AUTH LOGIN PLAIN", "SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING"):
                assert extension.encode() in features
            s.login(USER, DEVICE_PASSWORD)  # smtplib picks PLAIN
            assert s.sendmail(USER, [RCPT], msgs[0]) == {}
            assert s.noop() == (250, b"2.0.0 OK")  # the upstream's NOOP reply
            assert s.mail(USER) == (250, b"2.1.0 Sender OK")
            assert s.rset() == (250, b"2.0.0 Resetting")  # the upstream's RSET reply
            assert s.sendmail(USER, [RCPT], msgs[1]) == {}
            s.ehlo()  # EHLO inside a session resets the transaction, not the login
            assert s.sendmail(USER, [RCPT], msgs[2]) == {}

    await in_thread(run)
    assert await in_thread(lambda: up.mailbox(RCPT)) == msgs
    assert login_count("ok") == logins + 1
    assert message_count("accepted") == accepted + 3


async def test_message_log_line_has_the_envelope_and_queue_id(
        smtp_env: ProxyEnv, caplog: pytest.LogCaptureFixture) -> None:
    await in_thread(lambda: send_ok(smtp_env.ports["smtp"], "logged"))
    lines = [r for r in caplog.records if r.name == "proxy.smtp" and r.getMessage() == "message"]
    assert len(lines) == 1
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert fields["account"] == USER and fields["sender"] == USER
    assert fields["recipients"] == 1 and fields["result"] == "accepted"
    assert fields["size"] == len(message("logged"))
    assert fields["queue_id"] and "@" in fields["queue_id"]  # M365 style <id@host>
    assert "Hello from the scanner" not in caplog.text


async def test_auth_login_and_utf8_passwords(smtp_env: ProxyEnv) -> None:
    port = smtp_env.ports["smtp"]
    b64 = sasl.b64encode

    def run() -> None:
        with client(port) as s:  # smtplib's own AUTH LOGIN (no initial response)
            s.ehlo()
            s.user, s.password = USER, DEVICE_PASSWORD
            assert s.auth("LOGIN", s.auth_login, initial_response_ok=False)[0] == 235
            assert s.sendmail(USER, [RCPT], message("via LOGIN")) == {}
        with client(port) as s:  # AUTH PLAIN, password with spaces, quotes and non-ASCII
            s.ehlo()
            assert s.docmd("AUTH", "PLAIN " + plain_b64(USER, PASSWORD))[0] == 235
        with client(port) as s:  # AUTH PLAIN without initial response
            s.ehlo()
            assert s.docmd("AUTH", "PLAIN") == (334, b"")
            assert s.docmd(plain_b64(USER, PASSWORD))[0] == 235
        with client(port) as s:  # AUTH LOGIN with initial response and a UTF-8 password
            s.ehlo()
            code, challenge = s.docmd("auth", "login " + b64(USER).decode())
            assert (code, base64.b64decode(challenge)) == (334, b"Password:")
            assert s.docmd(b64(PASSWORD).decode())[0] == 235

    await in_thread(run)
    assert len(await in_thread(lambda: smtp_env.upstream.mailbox(RCPT))) == 1


async def test_rejected_recipients_and_sender_pass_through(smtp_env: ProxyEnv) -> None:
    port = smtp_env.ports["smtp"]

    def run() -> None:
        with client(port) as s:
            s.login(USER, DEVICE_PASSWORD)
            refused = s.sendmail(USER, [RCPT, "reject-me@contoso.example", "carol@contoso.example"],
                                 message("some refused"))
            assert refused == {"reject-me@contoso.example": (550, b"5.1.1 User unknown")}
            # every recipient refused: DATA is answered 554 5.5.1 (RFC 2920), not 354
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                s.sendmail(USER, ["reject1@contoso.example"], message("none"))
            s.mail(USER)
            assert s.rcpt("reject2@contoso.example")[0] == 550
            assert s.docmd("DATA") == (554, b"5.5.1 No valid recipients")
            s.rset()
            # the upstream's refusal of a sender reaches the client word for word
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                s.sendmail("mallory@contoso.example", [RCPT], message("spoof"))
            assert info.value.smtp_code == 550
            assert info.value.smtp_error == (b"5.7.60 SMTP; Client does not have permissions "
                                             b"to send as this sender")
            assert s.sendmail(USER, [RCPT], message("after refusals")) == {}

    await in_thread(run)
    up = smtp_env.upstream
    assert len(await in_thread(lambda: up.mailbox(RCPT))) == 2
    assert len(await in_thread(lambda: up.mailbox("carol@contoso.example"))) == 1


async def test_8bitmime_and_smtputf8(smtp_env: ProxyEnv) -> None:
    port = smtp_env.ports["smtp"]
    to = "jürgen@contoso.example"
    body = ("From: Scanner <alice@contoso.example>\r\nTo: Jürgen <jürgen@contoso.example>\r\n"
            "Subject: Größenwahn ✓ 日本語\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            "Grüße, ça marche — 8 bits.\r\n").encode()

    def run() -> None:
        with client(port) as s:
            s.login(USER, DEVICE_PASSWORD)
            assert s.sendmail(USER, [to], body, mail_options=["BODY=8BITMIME", "SMTPUTF8"]) == {}

    await in_thread(run)
    assert await in_thread(lambda: smtp_env.upstream.mailbox(to)) == [body]


async def test_twenty_megabytes_arrive_byte_identical(smtp_env: ProxyEnv) -> None:
    port, up = smtp_env.ports["smtp"], smtp_env.upstream
    data = big_message(20 * 1024 * 1024)

    def via_proxy() -> float:
        with client(port) as s:
            s.login(USER, DEVICE_PASSWORD)
            started = time.monotonic()
            assert s.sendmail(USER, [RCPT], data) == {}
            return time.monotonic() - started

    def direct() -> float:  # the same message straight to the fake M365, XOAUTH2 by hand
        token = up.issue_token(USER, [SMTP_SCOPE])
        with smtplib.SMTP("127.0.0.1", up.ports["submission"], timeout=60) as s:
            s.starttls(context=trust(up.ca_file))
            s.ehlo()
            assert s.docmd("AUTH", "XOAUTH2 " + sasl.xoauth2_b64(USER, token).decode())[0] == 235
            started = time.monotonic()
            assert s.sendmail(USER, ["direct@contoso.example"], data) == {}
            return time.monotonic() - started

    proxied = await in_thread(via_proxy)
    straight = await in_thread(direct)
    print(f"\n20 MB message: through the proxy {proxied:.2f}s, direct {straight:.2f}s "
          f"(x{proxied / straight:.1f})")
    delivered = await in_thread(lambda: up.mailbox(RCPT))
    assert len(delivered) == 1 and delivered[0] == data


async def test_local_starttls_and_implicit_tls(tmp_path: Path, demo_upstream: DemoUpstream,
                                               proxies: list[ProxyEnv]) -> None:
    local = certs.generate(tmp_path / "local-tls")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = {"cert_file": str(local.cert_file), "key_file": str(local.key_file)}
    starttls_env = await start_smtp_proxy(tmp_path / "a", demo_upstream,
                                          listener_extra={"smtp": {"tls": "starttls", **files}})
    proxies.append(starttls_env)
    implicit_env = await start_smtp_proxy(tmp_path / "b", demo_upstream,
                                          listener_extra={"smtp": {"tls": "implicit", **files}})
    proxies.append(implicit_env)
    context = trust(local.ca_file)

    def run() -> None:
        with client(starttls_env.ports["smtp"]) as s:
            s.ehlo()
            assert s.has_extn("starttls") and s.has_extn("auth")  # loopback: AUTH offered too
            s.starttls(context=context)
            s.ehlo()
            assert not s.has_extn("starttls") and s.has_extn("auth")
            s.login(USER, DEVICE_PASSWORD)
            assert s.sendmail(USER, [RCPT], message("over STARTTLS")) == {}
        with smtplib.SMTP_SSL("127.0.0.1", implicit_env.ports["smtp"], context=context,
                              timeout=30) as s:
            s.ehlo()
            assert not s.has_extn("starttls") and s.has_extn("auth")
            s.login(USER, DEVICE_PASSWORD)
            assert s.sendmail(USER, [RCPT], message("over implicit TLS")) == {}

    await in_thread(run)
    assert len(await in_thread(lambda: demo_upstream.mailbox(RCPT))) == 2


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks(smtp_env: ProxyEnv, mechanism: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", "127.0.0.1", "--port", str(smtp_env.ports["smtp"]),
        "--auth", mechanism, "--auth-user", USER, "--auth-password", DEVICE_PASSWORD,
        "--from", USER, "--to", RCPT, "--header", f"Subject: swaks {mechanism}",
        "--body", "sent by swaks", "--timeout", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode(errors="replace")
    assert b"235 2.7.0 Authentication successful" in out
    delivered = await in_thread(lambda: smtp_env.upstream.mailbox(RCPT))
    assert len(delivered) == 1 and f"Subject: swaks {mechanism}".encode() in delivered[0]


async def test_pipelined_commands_get_replies_in_order(smtp_env: ProxyEnv) -> None:
    def run() -> None:
        with client(smtp_env.ports["smtp"]) as s:
            s.login(USER, DEVICE_PASSWORD)
            s.send(f"MAIL FROM:<{USER}>\r\nRCPT TO:<{RCPT}>\r\nRCPT TO:<reject9@contoso.example>"
                   "\r\nDATA\r\n")
            replies = [s.getreply() for _ in range(4)]
            assert [code for code, _ in replies] == [250, 250, 550, 354]
            s.send(message("pipelined") + b".\r\n")
            assert s.getreply()[0] == 250

    await in_thread(run)
    assert len(await in_thread(lambda: smtp_env.upstream.mailbox(RCPT))) == 1


async def test_end_of_data_pipelined_with_the_next_commands(smtp_env: ProxyEnv) -> None:
    """The final dot, the next transaction and QUIT in one write: the message ends exactly at
    the dot and every command after it gets its own reply."""
    first, second = message("first of two"), message("second of two")

    def run() -> None:
        with client(smtp_env.ports["smtp"]) as s:
            s.login(USER, DEVICE_PASSWORD)
            assert s.mail(USER)[0] == 250 and s.rcpt(RCPT)[0] == 250
            assert s.docmd("DATA")[0] == 354
            s.send(first + b".\r\n" + f"MAIL FROM:<{USER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
            assert [s.getreply()[0] for _ in range(4)] == [250, 250, 250, 354]
            s.send(b"." + second + b".\r\nQUIT\r\n")  # a leading dot, stuffed by the client
            assert s.getreply()[0] == 250
            assert s.getreply()[0] == 221

    await in_thread(run)
    assert await in_thread(lambda: smtp_env.upstream.mailbox(RCPT)) == [first, second]


async def test_message_over_the_upstream_size_is_cut_off_never_delivered(
        smtp_env: ProxyEnv) -> None:
    """Over the upstream's SIZE (announced without SIZE=): the proxy stops forwarding, drops
    the upstream session instead of ending the message, reads the client to the final dot and
    says 552; the next message on the same connection goes through a fresh upstream login."""
    up = smtp_env.upstream
    up.configure(max_message_size=200_000)
    rejected = message_count("rejected")

    def run() -> None:
        with client(smtp_env.ports["smtp"]) as s:
            s.login(USER, DEVICE_PASSWORD)
            assert s.mail(USER)[0] == 250 and s.rcpt(RCPT)[0] == 250
            code, text = s.data(big_message(1_000_000))
            assert code == 552 and text.startswith(b"5.3.4 Message too big") and b"200000" in text
            assert s.sendmail(USER, [RCPT], message("small enough")) == {}

    await in_thread(run)
    assert await in_thread(lambda: up.mailbox(RCPT)) == [message("small enough")]
    assert message_count("rejected") == rejected + 1


async def test_client_gone_mid_message_delivers_nothing(smtp_env: ProxyEnv) -> None:
    port, up = smtp_env.ports["smtp"], smtp_env.upstream

    def run() -> None:
        s = client(port)
        s.login(USER, DEVICE_PASSWORD)
        assert s.mail(USER)[0] == 250 and s.rcpt(RCPT)[0] == 250
        assert s.docmd("DATA")[0] == 354
        s.send(big_message(300_000)[:250_000])  # no end of data
        s.sock.close()

    await in_thread(run)
    await in_thread(lambda: send_ok(port, "after the broken one"))
    assert await in_thread(lambda: up.mailbox(RCPT)) == [message("after the broken one")]


async def test_idle_timer_spares_a_slow_message_and_ends_silence(
        smtp_env: ProxyEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """After login the idle limit restarts with every chunk received: a message trickling in
    for three times the limit goes through; then silence ends the session with 421 4.4.2."""
    monkeypatch.setattr(smtp_mod, "CLIENT_IDLE", 1.0)
    body = message("slow", b"line\r\n" * 2000)

    def run() -> float:
        with client(smtp_env.ports["smtp"]) as s:
            s.login(USER, DEVICE_PASSWORD)
            assert s.mail(USER)[0] == 250 and s.rcpt(RCPT)[0] == 250
            assert s.docmd("DATA")[0] == 354
            pieces = [body[i:i + len(body) // 10] for i in range(0, len(body), len(body) // 10)]
            for piece in pieces:
                s.send(piece)
                time.sleep(0.3)  # the client is this slow: 3 s in all, the limit is 1 s
            s.send(b".\r\n")
            assert s.getreply()[0] == 250
            quiet = time.monotonic()
            code, text = s.getreply()
            assert (code, text[:24]) == (421, b"4.4.2 Idle too long; clo")
            return time.monotonic() - quiet

    silent = await in_thread(run)
    assert 0.8 < silent < 3, silent
    assert await in_thread(lambda: smtp_env.upstream.mailbox(RCPT)) == [body]


async def test_daemon_stop_says_421_to_idle_clients(smtp_env: ProxyEnv) -> None:
    def connect() -> smtplib.SMTP:
        s = client(smtp_env.ports["smtp"])
        s.login(USER, DEVICE_PASSWORD)
        return s

    s = await in_thread(connect)
    await smtp_env.daemon.stop(grace=0.2)
    try:
        code, text = await in_thread(s.getreply)
        assert (code, text) == (421, b"4.3.2 Proxy shutting down; try again later")
    finally:
        s.close()


# --- the proxy's own refusals -----------------------------------------------------------------


async def test_wrong_password_unknown_account_and_bad_sasl(smtp_env: ProxyEnv) -> None:
    port = smtp_env.ports["smtp"]
    bad = login_count("bad_password")

    def run() -> None:
        expected = (535, b"5.7.8 Invalid user name or local password.")
        assert auth_plain(port, WRONG_PASSWORD) == expected
        assert auth_plain(port, WRONG_PASSWORD, user="nobody@contoso.example") == expected
        with client(port) as s:
            s.ehlo()
            assert s.docmd("AUTH", "PLAIN not*base64") == (501, b"5.5.2 invalid base64")
            code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(
                f"{BOB}\0{USER}\0{DEVICE_PASSWORD}".encode()).decode())
            assert code == 501 and b"authzid" in text
            assert s.docmd("AUTH", "LOGIN") == (334, b"VXNlcm5hbWU6")
            assert s.docmd("%%%") == (501, b"5.5.2 Can't decode base64")
            assert s.docmd("AUTH", "CRAM-MD5") == (504, b"5.5.4 Unrecognized authentication type")
            assert s.docmd("MAIL", "FROM:<" + USER + ">") == (530, b"5.7.0 Authentication required")
        send_ok(port, "still works")

    await in_thread(run)
    assert login_count("bad_password") == bad + 1


async def test_upstream_unreachable_is_temporary(tmp_path: Path, demo_upstream: DemoUpstream,
                                                 proxies: list[ProxyEnv]) -> None:
    env = await start_smtp_proxy(tmp_path, demo_upstream,
                                 upstream_ports={"smtp": closed_port()})
    proxies.append(env)
    before = login_count("upstream_unavailable")
    for _ in range(2):  # and the next client is served the same way: nothing got stuck
        code, text = await in_thread(lambda: auth_plain(env.ports["smtp"], DEVICE_PASSWORD))
        assert code == 454 and text.startswith(b"4.7.0 The mail server 127.0.0.1 cannot be reached")
    assert login_count("upstream_unavailable") == before + 2


async def test_identity_platform_down_is_temporary(tmp_path: Path,
                                                   demo_upstream: DemoUpstream,
                                                   proxies: list[ProxyEnv]) -> None:
    demo_upstream.configure(access_token_lifetime=4)  # alice's token soon needs a refresh
    env = await start_smtp_proxy(tmp_path, demo_upstream,
                                 accounts={USER: {"provider": "demo"}, BOB: {"provider": "demo"}})
    proxies.append(env)
    demo_upstream.configure(access_token_lifetime=3600)  # bob's does not
    authorise(env.config, demo_upstream, user=BOB, password=DEVICE_PASSWORD)
    port = env.ports["smtp"]
    before = login_count("provider_unavailable")
    demo_upstream.configure(token_endpoint_mode="503")

    def refused() -> tuple[int, bytes] | None:  # once the cached token is too old to hand out
        reply = auth_plain(port, DEVICE_PASSWORD)
        return reply if reply[0] != 235 else None

    code, text = await poll(refused)
    assert code == 454
    assert text == (b"4.7.0 The Microsoft identity platform cannot be reached right now; "
                    b"try again later.")
    assert login_count("provider_unavailable") > before

    def bob_sends() -> None:  # a client whose token is still good is not affected
        with client(port) as s:
            s.login(BOB, DEVICE_PASSWORD)
            assert s.sendmail(BOB, [RCPT], message("from bob", sender=BOB)) == {}

    await in_thread(bob_sends)
    # (alice recovers once the platform answers again and MSAL's throttle — 60 s after a 5xx
    # without Retry-After, for a public client — has passed; not waited for here.)


async def test_revoked_refresh_token_needs_authorisation(tmp_path: Path,
                                                         demo_upstream: DemoUpstream,
                                                         proxies: list[ProxyEnv]) -> None:
    demo_upstream.configure(access_token_lifetime=4)
    env = await start_smtp_proxy(tmp_path, demo_upstream,
                                 accounts={USER: {"provider": "demo", "reauthorise_in_band": False},
                                           BOB: {"provider": "demo"}})
    proxies.append(env)
    authorise(env.config, demo_upstream, user=BOB, password=DEVICE_PASSWORD)
    port = env.ports["smtp"]
    before = login_count("authorisation_needed")
    demo_upstream.revoke(USER)

    def refused() -> tuple[int, bytes] | None:
        reply = auth_plain(port, DEVICE_PASSWORD)
        return reply if reply[0] != 235 else None

    code, text = await poll(refused)
    assert code == 535
    assert text.startswith(b"5.7.8 Authorisation needed for alice@contoso.example: ask the "
                           b"administrator to run `xoauth2-proxy login alice@contoso.example`")
    assert b"AADSTS" in text
    assert login_count("authorisation_needed") > before

    def bob_sends() -> None:  # another account is not affected
        with client(port) as s:
            s.login(BOB, DEVICE_PASSWORD)
            assert s.sendmail(BOB, [RCPT], message("from bob", sender=BOB)) == {}

    await in_thread(bob_sends)


async def test_revoked_access_token_error_challenge_then_refresh_refused(
        smtp_env: ProxyEnv) -> None:
    """The upstream refuses the cached token with a 334 error challenge (RFC 7628); the proxy
    answers it, asks for a new token (refused: revoked) and answers with a device code."""
    port, up = smtp_env.ports["smtp"], smtp_env.upstream
    await in_thread(lambda: send_ok(port, "token cached"))
    up.configure(xoauth2_error_challenge=True)
    up.revoke(USER, access_tokens=True)
    code, text = await in_thread(lambda: auth_plain(port, DEVICE_PASSWORD))
    assert code == 535 and text.startswith(b"5.7.8 Authorisation needed for alice@contoso.example: "
                                           b"open https://") and b"then log in again" in text


# --- faults of the upstream session (a scripted upstream) -------------------------------------


async def scripted_proxy(tmp_path: Path, demo_upstream: DemoUpstream, proxies: list[ProxyEnv],
                         **script: Any) -> tuple[ProxyEnv, ScriptedUpstream]:
    fake = ScriptedUpstream(tmp_path / "scripted", **script)
    port = await fake.start()

    def point_at_fake(data: dict[str, Any]) -> None:
        data["upstreams"]["smtp"].update(port=port, tls="implicit", ca_file=str(fake.paths.ca_file))

    env = await start_smtp_proxy(tmp_path, demo_upstream, point_at_fake)
    proxies.append(env)
    return env, fake


async def test_refused_token_is_replaced_once(tmp_path: Path, demo_upstream: DemoUpstream,
                                              proxies: list[ProxyEnv]) -> None:
    env, fake = await scripted_proxy(tmp_path, demo_upstream, proxies,
                                     auth_replies=[b"535 5.7.3 Authentication unsuccessful"])
    await in_thread(lambda: send_ok(env.ports["smtp"], "second token"))
    assert fake.commands.count(b"AUTH") == 2
    assert fake.messages and fake.messages[0].endswith(b"\r\n.\r\n")
    await fake.close()


async def test_token_refused_twice_is_535_with_upstream_text(
        tmp_path: Path, demo_upstream: DemoUpstream, proxies: list[ProxyEnv]) -> None:
    refusal = b"535 5.7.3 Authentication unsuccessful [SN4PR0201CA0000]"
    env, fake = await scripted_proxy(tmp_path, demo_upstream, proxies,
                                     auth_replies=[refusal, refusal])
    before = login_count("upstream_rejected")
    code, text = await in_thread(lambda: auth_plain(env.ports["smtp"], DEVICE_PASSWORD))
    assert code == 535
    assert text.startswith(b"5.7.8 The mail server refused the login for alice@contoso.example: "
                           b"535 5.7.3 Authentication unsuccessful")
    assert login_count("upstream_rejected") == before + 1
    assert fake.commands.count(b"AUTH") == 2  # refreshed once and retried
    await fake.close()


async def test_smtp_auth_disabled_is_not_retried(
        tmp_path: Path, demo_upstream: DemoUpstream, proxies: list[ProxyEnv]) -> None:
    """Exchange's 535 5.7.139 (SMTP AUTH disabled for the tenant or mailbox): no new token can
    help, so none is asked for; the client hears what the administrator must do."""
    refusal = b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
    env, fake = await scripted_proxy(tmp_path, demo_upstream, proxies, auth_replies=[refusal])
    demo_upstream.reset_stats()
    before = login_count("upstream_rejected")
    code, text = await in_thread(lambda: auth_plain(env.ports["smtp"], DEVICE_PASSWORD))
    assert code == 454
    assert text == (b"4.3.5 The mail server refused the login for alice@contoso.example: "
                    b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
                    b"disabled (SMTP AUTH is disabled for this mailbox or its organisation; an "
                    b"administrator must enable authenticated SMTP for the mailbox)")
    assert fake.commands.count(b"AUTH") == 1
    assert demo_upstream.stats()["token_requests"] == 0  # no refresh
    assert login_count("upstream_rejected") == before + 1
    await in_thread(lambda: send_ok(env.ports["smtp"], "enabled again"))  # the next AUTH is 235
    await fake.close()


async def test_upstream_dropping_mid_transaction(tmp_path: Path, demo_upstream: DemoUpstream,
                                                 proxies: list[ProxyEnv]) -> None:
    env, fake = await scripted_proxy(tmp_path, demo_upstream, proxies, drop_on=b"RCPT")
    port = env.ports["smtp"]

    def run() -> None:
        with client(port) as s:
            s.login(USER, DEVICE_PASSWORD)
            assert s.mail(USER)[0] == 250
            code, text = s.rcpt(RCPT)
            assert code == 421 and text.startswith(b"4.4.2 Connection to the mail server lost")
            with pytest.raises(smtplib.SMTPServerDisconnected):
                s.noop()

    await in_thread(run)
    fake.drop_on = None
    await in_thread(lambda: send_ok(port, "next client"))
    await fake.close()


async def test_a_half_closed_client_hears_the_reply_to_its_message(
        tmp_path: Path, demo_upstream: DemoUpstream, proxies: list[ProxyEnv]) -> None:
    """The client sends its message's end and QUIT, half-closes (SHUT_WR) and reads on. The
    proxy sees the end of the stream while the upstream still holds its reply to the message:
    the client hears that reply and QUIT's, then the close (the end of the stream used to
    cancel the command, so the upstream took the message and the client heard nothing, and
    would send it again)."""
    held = asyncio.Event()
    env, fake = await scripted_proxy(tmp_path, demo_upstream, proxies, hold_end=held)
    s = await in_thread(lambda: client(env.ports["smtp"]))

    def send() -> None:
        s.login(USER, DEVICE_PASSWORD)
        assert s.mail(USER)[0] == 250 and s.rcpt(RCPT)[0] == 250
        assert s.docmd("DATA")[0] == 354
        s.send(message("half-closed") + b".\r\nQUIT\r\n")
        s.sock.shutdown(socket.SHUT_WR)
        wait_until_eof_seen(s.sock)

    try:
        await in_thread(send)
        await poll(lambda: fake.messages, interval=0.01)  # the upstream holds its reply
        await asyncio.sleep(0)  # the proxy's loop is this one: let it take the EOF first
        held.set()

        def replies() -> tuple[int, int, bytes]:
            s.sock.settimeout(10)
            end, bye = s.getreply()[0], s.getreply()[0]
            return end, bye, s.sock.recv(1)

        assert await in_thread(replies) == (250, 221, b"")
    finally:
        s.close()
    assert fake.messages == [message("half-closed") + b".\r\n"]
    await fake.close()


async def test_upstream_closing_an_idle_session_is_logged_in_again(
        tmp_path: Path, demo_upstream: DemoUpstream, proxies: list[ProxyEnv]) -> None:
    env, fake = await scripted_proxy(tmp_path, demo_upstream, proxies, close_after_data=True)

    def run() -> None:
        with client(env.ports["smtp"]) as s:
            s.login(USER, DEVICE_PASSWORD)
            for i in range(3):
                assert s.sendmail(USER, [RCPT], message(f"session {i}")) == {}

    await in_thread(run)
    assert len(fake.messages) == 3 and fake.connections == 3
    await fake.close()


async def test_upstream_gone_between_messages(smtp_env: ProxyEnv) -> None:
    """The upstream dies while the client is idle: the next MAIL gets 421 4.4.2 and a close."""
    port = smtp_env.ports["smtp"]

    def run() -> None:
        with client(port) as s:
            s.login(USER, DEVICE_PASSWORD)
            assert s.sendmail(USER, [RCPT], message("before")) == {}
            smtp_env.upstream.kill()
            code, text = s.mail(USER)
            assert code == 421 and text.startswith(b"4.4.2 ")
        with client(port) as s:  # the proxy itself carries on
            s.ehlo()
            code, text = s.docmd("AUTH", "PLAIN " + plain_b64(USER, DEVICE_PASSWORD))
            assert code == 454 and text.startswith(b"4.7.0 ")

    await in_thread(run)


# --- units --------------------------------------------------------------------------------------


def test_auth_before_tls_only_for_loopback_peers() -> None:
    def allowed(host: str, tls: str = "starttls", ssl_info: object = None,
                insecure: bool = False) -> bool:
        listener = Listener("smtp", "smtp", Address("0.0.0.0", 587), "up", tls,  # noqa: S104
                            Path("/c"), Path("/k"), insecure)
        conn = Connection(listener, PreauthLimiter(Limits()), (host, 2525))
        return conn.may_send_password(tls_active=ssl_info is not None)

    assert allowed("127.0.0.1") and allowed("::1") and allowed("::ffff:127.0.0.1")
    assert not allowed("192.0.2.7")
    assert allowed("192.0.2.7", ssl_info={"cipher": "x"})  # after STARTTLS
    assert allowed("192.0.2.7", tls="implicit")
    assert allowed("192.0.2.7", tls="none", insecure=True)


def test_reply_wire_keeps_upstream_lines_and_codes() -> None:
    assert Reply(250, "2.0.0 OK").wire() == b"250 2.0.0 OK"
    assert Reply(550, "5.1.1 one\n5.1.1 two").wire() == b"550-5.1.1 one\r\n550 5.1.1 two"
    assert Reply(250, "ok\x00\rinjected").wire() == b"250 ok  injected"
    assert Reply(250, "caf\udcc3\udca9").wire() == "250 café".encode()  # surrogateescape bytes
    assert Reply(221, "").wire() == b"221"


def test_queue_id() -> None:
    m365 = "2.0.0 OK <DM6PR01MB1234.namprd01.prod.outlook.com> [Hostname=DM6PR01MB1234]"
    assert queue_id(m365) == "DM6PR01MB1234.namprd01.prod.outlook.com"
    assert queue_id("2.0.0 Ok: queued as 4ZxY1q2w3e") == "4ZxY1q2w3e"
    assert queue_id("2.0.0 OK") is None



# --- every command line gets a defined reply, over a real socket ---------------------------------

VERBS = ["NOOP", "RSET", "VRFY", "HELP", "EHLO", "HELO", "AUTH", "EXPN", "DATA", "QUIT",
         "STARTTLS", "FROB", "noop", "MAIL", "RCPT", "\x00", "\x16\x03\x01"]
PATH_BITS = ["<", ">", "@", '"', "\\", "[", "]", ":", ",", ".", " ", "a", "-", "é", "\r",
             "\x00", "\t", "IPv6:", "::1", "1.2.3.4", "999", USER, BOB, " SIZE=", "10", "=",
             " SMTPUTF8", "x" * 600]
LOCALS = ["alice", "bob", "a.b+c", '"quoted local"', '"a\\"b"', "jürgen", '"open', "a..b", ".a",
          "a b", "a\x00b", "", "<a", "a\udcff"]
DOMAINS = ["contoso.example", "[192.0.2.1]", "[IPv6:2001:db8::1]", "bücher.example", "[1.2.3",
           "[1.2.3]", "[300.1.1.1]", "[IPv6:zz]", "[tag:x]", "-x.example", "b..c", "", "b_c",
           "x" * 64 + ".example"]
PARAMS = [" SIZE=10", " SIZE=x", " SIZE=99999999999", " BODY=8BITMIME", " BODY=BINARYMIME",
          " SMTPUTF8", " SMTPUTF8=1", " NOTIFY=NEVER", " RET=HDRS", " X=", " =", "junk", " (c)",
          "  ", "\r", "\x7f"]
PATHS = (st.builds(lambda local, domain, params: f"<{local}@{domain}>{''.join(params)}",
                   st.sampled_from(LOCALS), st.sampled_from(DOMAINS),
                   st.lists(st.sampled_from(PARAMS), max_size=3))
         | st.lists(st.sampled_from(PATH_BITS), max_size=10).map("".join)
         | st.sampled_from(["<>", "<Postmaster>", "<@relay.example:bob@contoso.example>", ""]))
ENVELOPE = st.builds(lambda keyword, path: keyword + path,
                     st.sampled_from(["MAIL FROM:", "RCPT TO:", "mail from: ", "RCPT TO:  ",
                                      "MAIL FROM", "MAIL TO:", "RCPT FROM:", "MAIL ", "RCPT"]),
                     PATHS)
OTHER = st.builds(lambda verb, arg: verb + " " + arg if arg else verb,
                  st.sampled_from(VERBS),
                  st.just("") | st.text(st.characters(exclude_characters="\n"), max_size=30))
LINES = (ENVELOPE | ENVELOPE | ENVELOPE | OTHER).map(
    lambda line: line.encode("utf-8", "surrogateescape"))  # "\udcff": a byte that is not UTF-8


def _command_lines_get_defined_replies(port: int) -> None:
    conn = Client(port)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.booleans(), st.lists(LINES, min_size=1, max_size=3))
    @example(False, [b"MAIL FROM:<"])
    @example(False, [b"MAIL FROM:<@"])
    @example(False, [b'MAIL FROM:<"'])
    @example(False, [b"MAIL FROM:<a@[1.2.3"])
    @example(False, [b"MAIL FROM:<a"])
    @example(True, [b"RCPT TO:<" + BOB.encode() + b">", b"DATA"])
    def check(in_transaction: bool, lines: list[bytes]) -> None:
        if in_transaction:  # most RCPT lines need a sender first
            assert conn.get().mail(USER)[0] == 250
        for line in lines:
            [(code, text)] = conn.send(line + b"\r\n")
            check_reply(line, code, text)
            if code == 354:  # a whole transaction was generated: end an empty message
                assert conn.send(b".\r\n")[0][0] == 250
            if code in CLOSING:
                conn.drop()
        s = conn.get()
        assert s.noop()[0] == 250, lines  # the session is alive
        assert s.ehlo()[0] == 250  # and starts the next example afresh

    try:
        check()
    finally:
        conn.drop()


async def test_every_command_line_gets_a_defined_reply_and_the_session_goes_on(
        smtp_env: ProxyEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated MAIL/RCPT and other command lines, one logged-in connection for all: a reply
    from a fixed set (5xx with an enhanced status code), the session alive afterwards (NOOP),
    and nothing malformed sent upstream."""
    upstream = UpstreamRecorder(monkeypatch)
    await in_thread(lambda: _command_lines_get_defined_replies(smtp_env.ports["smtp"]))
    upstream.assert_well_formed()
    assert any(line.startswith(b"MAIL FROM:<") for line in upstream.lines)
