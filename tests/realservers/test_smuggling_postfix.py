"""SMTP smuggling through the proxy, against a real Postfix that takes a bare LF as a line end
(``smtpd_forbid_bare_newline = no``, the default before Postfix 3.9, and in effect for
``$mynetworks`` under ``normalize``).

A client hides a second transaction after an end of data that only the upstream sees
(``LF . LF`` and its variants). First the fixture itself is shown to be open to it: sent
straight to Postfix, the hidden message is delivered. Through the proxy, for a logged-in
client and for a ``[[relay]]`` device, no variant delivers anything: the client gets
``550 5.6.11`` and the proxy drops its upstream session without an end of data. With
``bare_line_endings = "normalise"`` the proxy ends the message where Postfix would, so the
hidden commands reach the proxy as the client's own, and its relay rules refuse the forged
sender.
"""

from __future__ import annotations

import asyncio
import io
import smtplib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy import store
from proxy.auth import flows
from proxy.secret import Secret
from proxy.server.daemon import Daemon
from tests.proxyenv import ProxyEnv, config_dict, open_store

from .dovecot import Dovecot
from .postfix import Postfix
from .test_relay_postfix import ALLOWED, DEVICE_SENDER
from .test_servers import SMTP_SCOPE, Xoauth2Answers, client_context
from .test_through_proxy import USER, message

pytestmark = pytest.mark.realserver

PASSWORD = "a local password"
FORGED_SENDER = "ceo@bank.example"
HIDDEN = (f"MAIL FROM:<{FORGED_SENDER}>\r\nRCPT TO:<{USER}>\r\nDATA\r\n"
          "Subject: smuggled\r\n\r\nforged by a hidden transaction\r\n.\r\n").encode()
LF_MARKERS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n"]  # what Postfix ends DATA at
MARKERS = [*LF_MARKERS, b"\r.\r", b"\r\n.\r"]  # and what other servers might


def payload(marker: bytes) -> bytes:
    return b"Subject: visible\r\n\r\nthe visible message" + marker + HIDDEN


def send_raw(smtp: smtplib.SMTP, sender: str, raw: bytes) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA with smtplib, then the message bytes as they are (smtplib's
    ``data()`` would dot-stuff and mend the line ends the test is about)."""
    mail = smtp.mail(sender)
    assert mail[0] == 250, mail
    assert smtp.rcpt(USER)[0] == 250
    smtp.putcmd("DATA")
    assert smtp.getreply()[0] == 354
    smtp.send(raw)
    return smtp.getreply()


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: Any, dovecot: Dovecot, postfix: Postfix,
              request: pytest.FixtureRequest) -> AsyncIterator[ProxyEnv]:
    key = tmp_path / "alice.key"
    store.generate_key_file(key)
    bare = getattr(request, "param", "reject")
    data = config_dict(
        tmp_path, demo_upstream, protocols=("smtp",),
        accounts={USER: {"provider": "demo", "service_key_file": str(key)}},
        upstreams={"smtp": {"port": postfix.submission_port, "tls": "starttls",
                            "ca_file": str(postfix.ca_file)}},
        listener_extra={"smtp": {"bare_line_endings": bare}})
    data["relay"] = [{"name": "copiers", "listener": "smtp", "sources": [f"{ALLOWED}/32"],
                      "account": USER, "allowed_senders": ["@devices.example.test"],
                      "force_sender": USER}]
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    account = cfg.account(USER)
    assert account is not None
    demo_upstream.configure(auto_approve_user=account.mailbox)
    token_store = open_store(cfg)
    flows.login(cfg, account, token_store, Secret(PASSWORD), out=io.StringIO(),
                service_key=store.read_key_file(key))
    daemon = Daemon(cfg)
    await daemon.start()
    yield ProxyEnv(demo_upstream, cfg, token_store, daemon, USER, PASSWORD)
    await daemon.stop(grace=1)


def hidden_delivered(dovecot: Dovecot, postfix: Postfix) -> bool:
    return (any(b"forged by a hidden" in m for m in dovecot.mailbox_messages(USER))
            or FORGED_SENDER in postfix.log_text())


def proxy_client(port: int, device: bool) -> smtplib.SMTP:
    if device:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(ALLOWED, 0))
        smtp.ehlo()
        return smtp
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    smtp.login(USER, PASSWORD)
    return smtp


def deliver_sentinel(port: int, dovecot: Dovecot) -> None:
    """A normal message after the attempts: once it is in the mailbox, anything the attempts
    had queued before it would be there (or in Postfix's log) as well."""
    subject = f"sentinel {time.time()}"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.login(USER, PASSWORD)
        assert smtp.sendmail(USER, [USER], message(subject)) == {}
    dovecot.first_message(USER)


@pytest.mark.parametrize("marker", LF_MARKERS)
async def test_postfix_fixture_runs_hidden_commands_when_sent_directly(
        marker: bytes, postfix: Postfix, dovecot: Dovecot, demo_upstream: Any) -> None:
    """The attack works against this Postfix without the proxy (else the tests below would
    prove nothing)."""
    def run() -> tuple[int, bytes]:
        smtp = smtplib.SMTP(postfix.host, postfix.submission_port, timeout=30)
        try:
            smtp.starttls(context=client_context(postfix.ca_file))
            smtp.ehlo()
            token = demo_upstream.issue_token(USER, [SMTP_SCOPE])
            assert smtp.auth("XOAUTH2", Xoauth2Answers(USER, token).smtp,
                             initial_response_ok=False)[0] == 235
            reply = send_raw(smtp, USER, payload(marker))
            # The hidden transaction's replies follow: MAIL, RCPT, DATA, its end of data.
            assert [smtp.getreply()[0] for _ in range(4)] == [250, 250, 354, 250]
            return reply
        finally:
            smtp.close()  # no QUIT: its reply would not be the next one

    assert (await asyncio.to_thread(run))[0] == 250
    assert await asyncio.to_thread(
        lambda: _wait(lambda: hidden_delivered(dovecot, postfix)))


def _wait(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("device", [False, True], ids=["logged-in client", "relay device"])
async def test_no_variant_smuggles_a_message_through_the_proxy(
        device: bool, env: ProxyEnv, dovecot: Dovecot, postfix: Postfix) -> None:
    port = env.ports["smtp"]
    sender = DEVICE_SENDER if device else USER

    def attempt(marker: bytes) -> tuple[int, bytes]:
        smtp = proxy_client(port, device)
        try:
            reply = send_raw(smtp, sender, payload(marker))
            with pytest.raises(smtplib.SMTPServerDisconnected):  # closed: nothing more is read
                smtp.noop()
            return reply
        finally:
            smtp.close()

    for marker in MARKERS:
        code, text = await asyncio.to_thread(attempt, marker)
        assert code == 550, (marker, text)
        kind = "LF" if marker.count(b"\n") > marker.count(b"\r\n") else "CR"
        assert text.startswith(f"5.6.11 Bare {kind} in the message".encode())
        assert b"bare_line_endings" in text
    await asyncio.to_thread(deliver_sentinel, port, dovecot)
    delivered = dovecot.mailbox_messages(USER)
    assert len(delivered) == 1 and b"sentinel" in delivered[0]
    assert not hidden_delivered(dovecot, postfix)
    assert b"the visible message" not in b"".join(delivered)  # no end of data went upstream


@pytest.mark.parametrize("env", ["normalise"], indirect=True)
async def test_normalising_ends_where_postfix_does_and_rules_still_apply(
        env: ProxyEnv, dovecot: Dovecot, postfix: Postfix) -> None:
    """Normalised, the visible message ends at its bare dot line (as Postfix would end it) and
    the hidden MAIL FROM is read by the proxy as the device's next command: refused."""
    port = env.ports["smtp"]

    def run() -> list[tuple[int, bytes]]:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(ALLOWED, 0))
        try:
            smtp.ehlo()
            first = send_raw(smtp, DEVICE_SENDER, payload(b"\n.\n"))
            return [first, smtp.getreply(), smtp.getreply(), smtp.getreply()]
        finally:
            smtp.close()

    replies = await asyncio.to_thread(run)
    assert replies[0][0] == 250  # the visible message, accepted by Postfix
    assert replies[1] == (550, f"5.7.1 Sender {FORGED_SENDER} is not allowed for relay rule "
                               "copiers".encode())
    assert all(code >= 500 for code, _ in replies[2:])  # RCPT and DATA: no transaction
    first = await asyncio.to_thread(dovecot.first_message, USER)
    assert first.rstrip(b"\n").endswith(b"the visible message")
    assert not hidden_delivered(dovecot, postfix)
