"""In-band re-authorisation through the proxy and the demo upstream: a refused refresh token is
answered with a device code, approved at the fake Entra, and the same client's next login works
(no CLI anywhere)."""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import re
import smtplib
import time
from pathlib import Path

from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from tests.ops.util import poll
from tests.proxyenv import USER, ProxyEnv, login_reply, start_proxy

PASSWORD = "first-device"  # ASCII: smtplib and imaplib's login() send nothing else

SENTENCE = re.compile(
    r"Authorisation needed for alice@contoso\.example: open (https://127\.0\.0\.1:\d+/devicelogin) "
    r"and enter ([A-Z0-9]{9}) within 15 minutes, then log in again")


def add_device(env: ProxyEnv, label: str, password: str) -> None:
    unlocked = env.store.unlock(USER, Secret(PASSWORD))
    env.store.add_password_slot(unlocked, label, Secret(password))


def pop_error(env: ProxyEnv) -> str:
    client = poplib.POP3("127.0.0.1", env.ports["pop"], timeout=30)
    try:
        client.user(USER)
        client.pass_("second-device")
    except poplib.error_proto as exc:
        return exc.args[0].decode()
    finally:
        client.close()
    raise AssertionError("POP3 login should have failed")


def smtp_error(env: ProxyEnv, password: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", env.ports["smtp"], timeout=30) as client:
        client.ehlo()
        try:
            client.login(USER, password)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
    raise AssertionError("SMTP login should have failed")


async def test_refused_refresh_token_answered_with_device_code(tmp_path: Path,
                                                               demo_upstream: DemoUpstream) -> None:
    env = await start_proxy(tmp_path, demo_upstream, password=PASSWORD)
    try:
        demo_upstream.configure(auto_approve_user=None)
        demo_upstream.reset_stats()
        await asyncio.to_thread(add_device, env, "phone", "second-device")
        client = await asyncio.to_thread(imaplib.IMAP4, "127.0.0.1", env.ports["imap"], 30)
        assert await asyncio.to_thread(login_reply, client, USER, PASSWORD) == "OK"
        await asyncio.to_thread(client.logout)

        demo_upstream.revoke(USER, access_tokens=True, refresh_tokens=True)
        client = await asyncio.to_thread(imaplib.IMAP4, "127.0.0.1", env.ports["imap"], 30)
        wrong = await asyncio.to_thread(login_reply, client, USER, "not the password")
        assert "Invalid user name or local password" in wrong
        assert demo_upstream.stats()["devicecode_requests"] == 0

        text = await asyncio.to_thread(login_reply, client, USER, PASSWORD)
        assert text.startswith("[AUTHENTICATIONFAILED] "), text
        match = SENTENCE.search(text)
        assert match, text
        url, code = match.groups()
        # The same flow for every login and protocol while it runs: one code, one request.
        assert SENTENCE.search(await asyncio.to_thread(pop_error, env)).group(2) == code  # type: ignore[union-attr]
        smtp_code, smtp_text = await asyncio.to_thread(smtp_error, env, PASSWORD)
        assert smtp_code == 535 and smtp_text.startswith("5.7.8 ") and code in smtp_text
        assert demo_upstream.stats()["devicecode_requests"] == 1
        assert url == f"{demo_upstream.entra_url.rstrip('/')}/devicelogin"

        await asyncio.to_thread(demo_upstream.approve, code, USER)
        flows = env.daemon.tokens.reauth
        await poll(lambda: flows.current(USER).outcome == "done", timeout=60)  # type: ignore[union-attr]

        assert await asyncio.to_thread(login_reply, client, USER, PASSWORD) == "OK"  # the same client
        await asyncio.to_thread(client.logout)
        second = await asyncio.to_thread(imaplib.IMAP4, "127.0.0.1", env.ports["imap"], 30)
        assert await asyncio.to_thread(login_reply, second, USER, "second-device") == "OK"
        await asyncio.to_thread(second.logout)
        info = env.store.info(USER)
        assert {s.label for s in info.slots} >= {"phone"} and len(info.slots) == 2
        assert info.meta.needs_reauth is None
    finally:
        await env.daemon.stop(grace=1)


async def test_switched_off_names_the_login_command(tmp_path: Path,
                                                    demo_upstream: DemoUpstream) -> None:
    env = await start_proxy(tmp_path, demo_upstream, password=PASSWORD, protocols=("smtp",), accounts={
        USER: {"provider": "demo", "reauthorise_in_band": False}})
    try:
        demo_upstream.configure(auto_approve_user=None)
        demo_upstream.reset_stats()
        demo_upstream.revoke(USER, access_tokens=True, refresh_tokens=True)
        code, text = await asyncio.to_thread(smtp_error, env, PASSWORD)
        assert code == 535 and f"xoauth2-proxy login {USER}" in text
        assert demo_upstream.stats()["devicecode_requests"] == 0
    finally:
        await env.daemon.stop(grace=1)


async def test_expired_flow_replaced_on_the_next_refused_login(tmp_path: Path,
                                                               demo_upstream: DemoUpstream) -> None:
    env = await start_proxy(tmp_path, demo_upstream, password=PASSWORD, protocols=("smtp",))
    try:
        demo_upstream.configure(auto_approve_user=None)
        demo_upstream.reset_stats()
        demo_upstream.revoke(USER, access_tokens=True, refresh_tokens=True)
        first = SENTENCE.search((await asyncio.to_thread(smtp_error, env, PASSWORD))[1])
        assert first
        flow = env.daemon.tokens.reauth.current(USER)
        assert flow is not None
        flow.flow["expires_at"] = time.time() - 1  # the code ran out (the poller stops)
        await poll(lambda: flow.outcome == "expired", timeout=60)
        assert env.daemon.tokens.reauth.current(USER) is flow  # nothing new without a login
        second = SENTENCE.search((await asyncio.to_thread(smtp_error, env, PASSWORD))[1])
        assert second and second.group(2) != first.group(2)
        assert demo_upstream.stats()["devicecode_requests"] == 2
    finally:
        await env.daemon.stop(grace=1)
