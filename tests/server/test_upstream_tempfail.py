"""The mail server answers the proxy's XOAUTH2 login with a temporary failure (as Dovecot does
when it cannot check tokens): real clients (imaplib, poplib, smtplib) through the proxy to the
embedded fake Microsoft 365 with its ``xoauth2_temporary_failure`` knob.

The client must hear a temporary failure with the server's text — never AUTHENTICATIONFAILED,
which makes mail clients ask the person for a new password — and the proxy must not ask the
identity platform for a new token (the fake Entra counts token requests)."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import logging
import poplib
import smtplib

import pytest

from proxy import metrics
from proxy.demo.mail.common import TEMPORARY_FAILURE
from proxy.secret import Secret
from tests.proxyenv import PASSWORD, USER, ProxyEnv

DEVICE = "tempfail-device-password"  # ASCII, for poplib and smtplib
SERVER_TEXT = TEMPORARY_FAILURE.decode()
EXPECTED = {
    "imap": f"[UNAVAILABLE] The mail server 127.0.0.1 cannot log {USER} in right now: "
            f"[UNAVAILABLE] {SERVER_TEXT} (try again later)",
    "pop": f"-ERR [SYS/TEMP] The mail server 127.0.0.1 cannot log {USER} in right now: "
           f"[SYS/TEMP] {SERVER_TEXT} (try again later)",
    "smtp": f"454 4.7.0 The mail server 127.0.0.1 cannot log {USER} in right now: "
            f"454 4.7.0 {SERVER_TEXT} (try again later)",
}


def login(env: ProxyEnv, protocol: str) -> str:
    """One login with a real client: "OK", or the reply the client got."""
    port = env.ports[protocol]
    if protocol == "imap":
        client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        try:
            client.login(USER, DEVICE)
        except imaplib.IMAP4.error as exc:
            return bytes(exc.args[0]).decode()
        finally:
            client.shutdown()
        return "OK"
    if protocol == "pop":
        pop = poplib.POP3("127.0.0.1", port, timeout=30)
        try:
            pop.user(USER)
            pop.pass_(DEVICE)
        except poplib.error_proto as exc:
            return bytes(exc.args[0]).decode()
        finally:
            pop.close()
        return "OK"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()  # one AUTH PLAIN: smtplib.login would try LOGIN as well after a failure
        plain = base64.b64encode(f"\0{USER}\0{DEVICE}".encode()).decode()
        code, text = smtp.docmd("AUTH", "PLAIN " + plain)
        return "OK" if code == 235 else f"{code} {text.decode()}"


def logins(protocol: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("xoauth2_proxy_logins_total",
                                              {"protocol": protocol, "result": result})
    return value or 0.0


@pytest.mark.parametrize("protocol", ["imap", "pop", "smtp"])
async def test_temporary_failure_reaches_the_client_without_a_refresh(
        proxy_env: ProxyEnv, protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    env, upstream = proxy_env, proxy_env.upstream
    env.store.add_password_slot(env.store.unlock(USER, Secret(PASSWORD)), "device", Secret(DEVICE))
    assert await asyncio.to_thread(login, env, protocol) == "OK"  # a token is cached and works

    upstream.configure(xoauth2_temporary_failure=True)
    upstream.reset_stats()
    before = logins(protocol, "upstream_unavailable")
    caplog.set_level(logging.INFO)
    assert await asyncio.to_thread(login, env, protocol) == EXPECTED[protocol]
    assert upstream.stats()["token_requests"] == 0  # no refresh
    assert logins(protocol, "upstream_unavailable") == before + 1
    fields = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "login"]
    assert [(f["result"], f.get("upstream_reply"), f.get("attempt")) for f in fields] == [
        ("upstream_unavailable", "temporary", None)]  # one attempt, no retry

    upstream.configure(xoauth2_temporary_failure=False)  # the server is back: same token works
    assert await asyncio.to_thread(login, env, protocol) == "OK"
    assert upstream.stats()["token_requests"] == 0
