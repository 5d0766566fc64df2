"""Operator notifications through the proxy and the demo upstream: one incident (a revoked
refresh token, answered in-band with a device code) makes exactly one notification per target,
whatever number of logins meets it; an email notification is read back through the IMAP proxy."""

from __future__ import annotations

import asyncio
import email
import imaplib
import re
import smtplib
import time
from pathlib import Path
from typing import Any

from proxy import config as config_mod
from proxy.demo.process import DemoUpstream
from proxy.notify import events
from proxy.notify.config import NotifyTarget
from proxy.notify.dispatch import NOTIFICATIONS, Notifier
from proxy.server.daemon import Daemon
from tests.notify.receivers import Webhook, command_calls, command_target
from tests.ops.util import poll
from tests.proxyenv import USER, ProxyEnv, authorise, config_dict, fresh_login_reply

PASSWORD = "alice-device"
BOB, BOB_PASSWORD = "bob@contoso.example", "bob-device"
CODE = re.compile(r"enter ([A-Z0-9]{9}) within")


async def start(tmp_path: Path, upstream: DemoUpstream, notify: list[dict[str, Any]]) -> ProxyEnv:
    data = config_dict(tmp_path, upstream, protocols=("imap", "smtp"),
                       accounts={USER: {"provider": "demo"}, BOB: {"provider": "demo"}})
    data["notify"] = notify
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    token_store = authorise(cfg, upstream, USER, PASSWORD)
    authorise(cfg, upstream, BOB, BOB_PASSWORD)
    upstream.configure(auto_approve_user=None)
    daemon = Daemon(cfg)
    await daemon.start()
    return ProxyEnv(upstream, cfg, token_store, daemon, USER, PASSWORD)


def smtp_login(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        try:
            client.login(USER, PASSWORD)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
    return 235


def subjects(port: int) -> list[str]:
    """The subjects in alice's INBOX, read through the IMAP proxy."""
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        client.login(USER, PASSWORD)
        client.select("INBOX")
        _, data = client.search(None, "ALL")
        found = []
        for num in data[0].split():
            _, parts = client.fetch(num, "(RFC822)")
            found.append(str(email.message_from_bytes(parts[0][1])["Subject"]))  # type: ignore[index]
        return found
    finally:
        client.logout()


async def test_one_notification_per_incident(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    out = tmp_path / "command.jsonl"
    password_file = tmp_path / "bob-password"
    password_file.write_text(BOB_PASSWORD + "\n")
    async with Webhook(tmp_path) as hook:
        env = await start(tmp_path, demo_upstream, [
            hook.target(), command_target(out),
            {"type": "email", "account": BOB, "password_file": str(password_file),
             "to": [USER], "events": ["authorisation_needed"]}])
        try:
            ports = env.ports
            demo_upstream.revoke(USER, access_tokens=True, refresh_tokens=True)
            replies = [await asyncio.to_thread(fresh_login_reply, ports["imap"], USER, PASSWORD) for _ in range(3)]
            replies.append(str(await asyncio.to_thread(smtp_login, ports["smtp"])))
            codes = {m.group(1) for r in replies if (m := CODE.search(r))}
            assert len(codes) == 1 and replies[-1] == "535", replies
            code = codes.pop()

            await asyncio.to_thread(demo_upstream.approve, code, USER)
            await poll(lambda: len(hook.received) >= 2, timeout=60)
            await poll(lambda: len(command_calls(out)) >= 2, timeout=60)
            assert await asyncio.to_thread(fresh_login_reply, ports["imap"], USER, PASSWORD) == "OK"
            assert env.daemon.operator.notifier is not None
            await env.daemon.operator.notifier.idle()

            kinds = [doc["event"] for doc in hook.received]
            assert kinds == ["authorisation_needed", "reauthorised"], hook.received
            needed = hook.received[0]
            assert needed["account"] == USER and needed["user_code"] == code
            assert needed["url"].endswith("/devicelogin") and int(needed["expires_at"]) > time.time()
            assert code in needed["text"] and needed["summary"] == needed["text"]
            calls = command_calls(out)
            assert [c["XOAUTH2_PROXY_EVENT"] for c in calls] == kinds
            assert calls[0]["XOAUTH2_PROXY_USER_CODE"] == code
            assert calls[0]["stdin"]["account"] == USER and calls[1]["XOAUTH2_PROXY_VIA"] == "in_band"

            async def mail() -> list[str]:
                found = await asyncio.to_thread(subjects, ports["imap"])
                return [s for s in found if "Authorisation needed" in s]
            found = await poll(mail, timeout=60)
            assert len(found) == 1 and code in found[0]
        finally:
            await env.daemon.stop(grace=1)


async def test_failed_delivery_retried_with_back_off(tmp_path: Path) -> None:
    hub = events.Hub()
    before = NOTIFICATIONS.labels("webhook", "retried")._value.get()
    async with Webhook(tmp_path, fail_first=2) as hook:
        target = NotifyTarget(**config_mod.parse(
            {"providers": {"p": {"tenant": "t", "client_id": "c"}}, "accounts": {USER: {}},
             "notify": [hook.target(repeat_after=3600)]}, tmp_path / "c.toml").notify[0].__dict__)
        notifier = Notifier((target,), lambda name: ("127.0.0.1", 0, "none"), backoff=0.01,
                            hub=hub)
        notifier.start()
        try:
            hub.publish("source_locked_out", source="192.0.2.7", user=USER)
            hub.publish("source_locked_out", source="192.0.2.7", user=USER)  # the same incident
            await poll(lambda: hook.received, timeout=60)
            await notifier.idle()
        finally:
            await notifier.aclose()
    assert hook.requests == 3 and len(hook.received) == 1
    assert hook.received[0]["source"] == "192.0.2.7"
    assert NOTIFICATIONS.labels("webhook", "retried")._value.get() == before + 2
