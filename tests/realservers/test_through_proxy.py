"""The proxy in front of real Dovecot (IMAP, POP3) and Postfix (submission), with real clients.

Tokens come from the fake Entra ID through MSAL; Dovecot validates them by introspection and
answers a rejected token with an RFC 7628 error challenge (unlike Microsoft 365).
"""

from __future__ import annotations

import asyncio
import base64
import email.message
import email.utils
import imaplib
import poplib
import shutil
import smtplib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.server.daemon import Daemon
from tests.proxyenv import ProxyEnv, imap_client, local_tls, start_proxy

from .dovecot import Dovecot
from .postfix import Postfix

pytestmark = pytest.mark.realserver

USER = "alice@example.test"
PASSWORD = "Réal server pässword"  # non-ASCII: travels as an IMAP literal
ASCII_PASSWORD = "ascii-device-password"


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: Any, dovecot: Dovecot, postfix: Postfix
              ) -> AsyncIterator[ProxyEnv]:
    upstreams = {
        "imap": {"port": dovecot.ports["imaps"], "tls": "implicit", "ca_file": str(dovecot.ca_file)},
        "pop": {"port": dovecot.ports["pop3"], "tls": "starttls", "ca_file": str(dovecot.ca_file)},
        "smtp": {"port": postfix.submission_port, "tls": "starttls",
                 "ca_file": str(postfix.ca_file)},
    }
    env = await start_proxy(tmp_path, demo_upstream, user=USER, password=PASSWORD,
                            upstreams=upstreams, accounts={USER: {"provider": "demo"}})
    from proxy.secret import Secret
    unlocked = env.store.unlock(USER, Secret(PASSWORD))
    env.store.add_password_slot(unlocked, "device", Secret(ASCII_PASSWORD))
    yield env
    await env.daemon.stop(grace=1)


def imap_login(port: int, password: str = PASSWORD) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.literal = password.encode()  # type: ignore[attr-defined]
    typ, data = client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]
    if typ != "OK":
        client.shutdown()
        raise imaplib.IMAP4.error(data[-1].decode())
    client.state = "AUTH"
    return client


def message(subject: str) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = USER, USER, subject
    msg["Message-ID"] = f"<{uuid.uuid4()}@example.test>"
    msg["Date"] = email.utils.formatdate()
    msg.set_content("Through xoauth2-proxy to a real server.\n")
    return msg.as_bytes().replace(b"\n", b"\r\n")


async def test_imap_suite_against_dovecot(env: ProxyEnv) -> None:
    port = env.ports["imap"]

    def session() -> None:
        client = imap_login(port)
        assert client.append("INBOX", None, None, message("appended"))[0] == "OK"
        typ, data = client.select("INBOX")
        assert typ == "OK" and int(data[0]) == 1
        typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"appended" in data[0][1]
        tag = client._new_tag()  # type: ignore[attr-defined]
        client.send(tag + b" IDLE\r\n")
        assert client.readline().startswith(b"+")
        other = imap_login(port, ASCII_PASSWORD)  # a second device delivers meanwhile
        other.append("INBOX", None, None, message("second"))
        other.logout()
        assert b"EXISTS" in client.readline()
        client.send(b"DONE\r\n")
        while not (line := client.readline()).startswith(tag):
            pass
        assert b"OK" in line
        client.logout()

        plain = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        assert plain.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())[0] == "OK"
        plain.logout()

    await asyncio.to_thread(session)


@pytest.mark.parametrize("mode", ["none", "starttls", "implicit"])
async def test_dovecot_capabilities_announced_before_login(tmp_path: Path, demo_upstream: Any,
                                                           dovecot: Dovecot, mode: str) -> None:
    """Dovecot puts its post-login list in the OK: one login teaches the proxy, and the next
    imaplib client sees IDLE, MOVE, UIDPLUS… before login; a restarted proxy at once."""
    listener, context = local_tls(tmp_path, mode)
    upstream = {"port": dovecot.ports["imaps"], "tls": "implicit", "ca_file": str(dovecot.ca_file)}
    env = await start_proxy(tmp_path, demo_upstream, user=USER, password=PASSWORD,
                            protocols=("imap",), upstreams={"imap": upstream},
                            listener_extra={"imap": listener}, accounts={USER: {"provider": "demo"}})

    def session(port: int) -> tuple[set[str], bytes]:
        client = imap_client(port, mode, context)
        caps = set(client.capabilities)
        if mode == "starttls":
            assert "STARTTLS" in caps
            client.starttls(context)
            assert set(client.capabilities) == caps - {"STARTTLS"}
        assert "STARTTLS" not in client.capabilities and "LOGINDISABLED" not in caps
        assert [c for c in caps if c.startswith("AUTH=")] == ["AUTH=PLAIN"]
        client.literal = PASSWORD.encode()  # type: ignore[attr-defined]
        typ, data = client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]
        assert typ == "OK", data
        client.state = "AUTH"
        assert client.select("INBOX")[0] == "OK"
        client.logout()
        return caps, data[0]

    try:
        first, ok = await asyncio.to_thread(session, env.ports["imap"])
        assert "IDLE" not in first  # nothing learned yet
        assert ok.startswith(b"[CAPABILITY IMAP4rev1 ") and b" IDLE " in ok  # Dovecot's own OK
        learned = set(ok[len(b"[CAPABILITY "):ok.index(b"]")].decode().upper().split())
        caps, _ = await asyncio.to_thread(session, env.ports["imap"])
        assert {"IDLE", "MOVE", "UIDPLUS", "ENABLE", "CONDSTORE", "LITERAL+"} <= caps
        assert caps - first == learned - first  # all of Dovecot's post-login list, no more
    finally:
        await env.daemon.stop(grace=1)
    daemon = Daemon(env.config)
    await daemon.start()
    try:
        assert (await asyncio.to_thread(session, daemon.ports()["imap"]))[0] == caps
    finally:
        await daemon.stop(grace=1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_through_proxy_to_dovecot(env: ProxyEnv) -> None:
    def run() -> None:
        client = imap_login(env.ports["imap"])
        client.append("INBOX", None, None, message("for curl"))
        client.logout()
        for url in (f"imap://127.0.0.1:{env.ports['imap']}/INBOX;UID=1",
                    f"pop3://127.0.0.1:{env.ports['pop']}/1"):
            out = subprocess.run(["curl", "-sS", "--max-time", "30", "--url", url, "--user",
                                  f"{USER}:{ASCII_PASSWORD}"], capture_output=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert b"for curl" in out.stdout

    await asyncio.to_thread(run)


async def test_pop_against_dovecot(env: ProxyEnv) -> None:
    def run() -> None:
        client = imap_login(env.ports["imap"])
        for subject in ("one", "two"):
            client.append("INBOX", None, None, message(subject))
        client.logout()
        pop = poplib.POP3("127.0.0.1", env.ports["pop"], timeout=30)
        pop.user(USER)
        pop.pass_(ASCII_PASSWORD)
        assert pop.stat()[0] == 2
        assert len(pop.list()[1]) == 2
        assert any(b"Subject: two" in line for line in pop.retr(2)[1])
        pop.dele(1)
        pop.quit()
        pop = poplib.POP3("127.0.0.1", env.ports["pop"], timeout=30)
        pop._shortcmd("AUTH PLAIN " + __import__("base64").b64encode(
            f"\0{USER}\0{ASCII_PASSWORD}".encode()).decode())
        assert pop.stat()[0] == 1
        pop.quit()

    await asyncio.to_thread(run)


async def test_smtp_through_postfix_arrives_in_dovecot(env: ProxyEnv, dovecot: Dovecot) -> None:
    sent = message(f"via postfix {time.time()}")

    def run() -> bytes:
        with smtplib.SMTP("127.0.0.1", env.ports["smtp"], timeout=30) as smtp:
            smtp.login(USER, ASCII_PASSWORD)
            assert smtp.sendmail(USER, [USER], sent) == {}
        return dovecot.first_message(USER)

    delivered = await asyncio.to_thread(run)
    assert delivered.endswith(sent.replace(b"\r\n", b"\n"))  # after the trace headers


async def test_dovecot_rejection_after_refresh(env: ProxyEnv, demo_upstream: Any) -> None:
    """Dovecot answers a dead token with an error challenge: the proxy answers it, refreshes
    once, and logs in; with a token that can never work, Dovecot's text reaches the client."""
    def login() -> str:
        try:
            imap_login(env.ports["imap"]).logout()
        except imaplib.IMAP4.error as exc:
            return str(exc)
        return "OK"

    assert await asyncio.to_thread(login) == "OK"
    demo_upstream.revoke(USER, access_tokens=True, refresh_tokens=False)
    demo_upstream.reset_stats()
    assert await asyncio.to_thread(login) == "OK"
    assert demo_upstream.stats()["grant_types"] == {"refresh_token": 1}

    demo_upstream.configure(access_token_lifetime=3600)
    from proxy.config import Account
    account = env.config.accounts[USER]
    env.config.accounts[USER] = Account(account.name, account.provider, account.flow,
                                        upstream_user="mallory@example.test")
    try:
        text = await asyncio.to_thread(login)
    finally:
        env.config.accounts[USER] = account
    assert "[AUTHENTICATIONFAILED]" in text and "Authentication failed" in text



# --- Dovecot cannot check tokens: a temporary failure, passed on as one, with no refresh ------


def attempt_login(env: ProxyEnv, protocol: str) -> str:
    """One login through the proxy with a real client: "OK", or the client-visible error."""
    port = env.ports[protocol]
    if protocol == "imap":
        try:
            imap_login(port).logout()
        except imaplib.IMAP4.error as exc:
            return f"NO {exc}"
        return "OK"
    if protocol == "pop":
        pop = poplib.POP3("127.0.0.1", port, timeout=30)
        try:
            pop.user(USER)
            pop.pass_(ASCII_PASSWORD)
        except poplib.error_proto as exc:
            return bytes(exc.args[0]).decode()
        finally:
            pop.close()
        return "OK"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:  # one AUTH, not smtplib's round
        smtp.ehlo()
        plain = base64.b64encode(f"\0{USER}\0{ASCII_PASSWORD}".encode()).decode()
        code, text = smtp.docmd("AUTH", "PLAIN " + plain)
        return "OK" if code == 235 else f"{code} {text.decode()}"


@pytest.mark.parametrize(
    ("protocol", "reply"),
    [("imap", "NO [UNAVAILABLE] The mail server 127.0.0.1 cannot log alice@example.test in right "
              "now: [UNAVAILABLE] Temporary authentication failure. ["),
     ("pop", "-ERR [SYS/TEMP] The mail server 127.0.0.1 cannot log alice@example.test in right "
             "now: [SYS/TEMP] Temporary authentication failure. [")])
async def test_dovecot_token_check_down_is_temporary(env: ProxyEnv, demo_upstream: Any,
                                                    protocol: str, reply: str) -> None:
    """The introspection endpoint Dovecot checks tokens with answers 503: Dovecot answers the
    login NO [UNAVAILABLE] / -ERR [SYS/TEMP]. The client hears a temporary failure with
    Dovecot's text (not AUTHENTICATIONFAILED, which makes clients ask for a new password),
    and the proxy asks the identity platform for no new token."""
    demo_upstream.configure(introspection_mode="503")
    demo_upstream.reset_stats()
    text = await asyncio.to_thread(attempt_login, env, protocol)
    assert text.startswith(reply), text
    assert text.endswith("(try again later)")
    stats = demo_upstream.stats()
    assert stats["introspect_requests"] == 1  # Dovecot asked once: one login, no retry
    assert stats["token_requests"] == 0  # no refresh

    demo_upstream.configure(introspection_mode="ok")  # the check is back: the same login works
    assert await asyncio.to_thread(attempt_login, env, protocol) == "OK"


async def test_postfix_dovecot_token_check_down_is_535(env: ProxyEnv, demo_upstream: Any) -> None:
    """Postfix's Dovecot SASL client does not pass Dovecot's temporary failure on: it answers
    535 5.7.8 as for a bad token, so the proxy cannot tell them apart and refreshes once."""
    demo_upstream.configure(introspection_mode="503")
    demo_upstream.reset_stats()
    text = await asyncio.to_thread(attempt_login, env, "smtp")
    assert text.startswith("535 5.7.8 The mail server refused the login for alice@example.test: "
                           "535 5.7.8 Error: authentication failed"), text
    assert demo_upstream.stats()["grant_types"] == {"refresh_token": 1}


async def test_postfix_losing_dovecot_auth_is_temporary(env: ProxyEnv, demo_upstream: Any,
                                                        dovecot: Dovecot) -> None:
    """Postfix answers 454 4.7.0 when its connection to Dovecot's auth server is lost during
    the login (here: Dovecot's token check hangs and its auth process dies meanwhile). The
    client hears 454 4.7.0 with Postfix's text, and the proxy asks for no new token."""
    demo_upstream.configure(introspection_mode="hang")
    demo_upstream.reset_stats()
    login = asyncio.ensure_future(asyncio.to_thread(attempt_login, env, "smtp"))
    deadline = time.monotonic() + 10
    while (await asyncio.to_thread(demo_upstream.stats))["introspect_requests"] < 1:
        assert not login.done() and time.monotonic() < deadline, "Dovecot never asked"
        await asyncio.sleep(0.02)
    dovecot.kill_auth()  # Postfix now waits on a dead socket
    text = await login
    assert text == ("454 4.7.0 The mail server 127.0.0.1 cannot log alice@example.test in right "
                    "now: 454 4.7.0 Temporary authentication failure: Connection lost to "
                    "authentication server (try again later)"), text
    assert demo_upstream.stats()["token_requests"] == 0  # no refresh
