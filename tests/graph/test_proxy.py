"""Through the proxy with real clients (smtplib, swaks, imaplib): an SMTP listener whose upstream
is the fake Graph, and an SMTP upstream that falls back to it when SMTP AUTH is switched off."""

from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import logging
import shutil
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy import metrics
from proxy.config import loader
from proxy.demo.process import DemoUpstream
from proxy.server.daemon import Daemon
from tests.graph.test_sink import big_message
from tests.graph.util import graph_dict
from tests.proxyenv import USER, ProxyEnv, authorise
from tests.server.smtp_util import DEVICE_PASSWORD, add_device_password

MESSAGE = (f"From: Alice <{USER}>\r\nTo: {USER}\r\nSubject: via Graph\r\n"
           "Message-ID: <graph-1@contoso.example>\r\n\r\nfirst line\r\n"
           ".a line that began with a dot\r\nlast line\r\n").encode()


@pytest.fixture
async def graph_env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[ProxyEnv]:
    data = graph_dict(tmp_path, demo_upstream, fallback=True)
    data["listeners"].append({"name": "graph", "protocol": "smtp", "listen": "127.0.0.1:0",
                              "upstream": "graph"})
    cfg = loader.parse(data, tmp_path / "config.toml")
    token_store = authorise(cfg, demo_upstream)
    daemon = Daemon(cfg)
    await daemon.start()
    env = ProxyEnv(demo_upstream, cfg, token_store, daemon)
    add_device_password(env)  # smtplib, imaplib and swaks send ASCII passwords
    try:
        yield env
    finally:
        await daemon.stop()


def in_thread(fn: Any) -> Any:
    return asyncio.to_thread(fn)


def smtp_login(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=120)
    client.ehlo("client.example")
    client.login(USER, DEVICE_PASSWORD)
    return client


def imap_messages(port: int) -> list[bytes]:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    try:
        client.login(USER, DEVICE_PASSWORD)
        client.select("INBOX", readonly=True)
        _, data = client.fetch("1:*", "(BODY.PEEK[])")
        return [item[1] for item in data if isinstance(item, tuple)]
    finally:
        client.logout()


async def test_mime_send_read_back_through_imap_byte_identical(graph_env: ProxyEnv) -> None:
    ports = graph_env.ports

    def send() -> Any:
        with smtp_login(ports["graph"]) as client:
            return client.sendmail(USER, [USER, "bcc.only@example.com"], MESSAGE)

    assert await in_thread(send) == {}
    assert await in_thread(lambda: imap_messages(ports["imap"])) == [MESSAGE]
    assert graph_env.upstream.mailbox("bcc.only@example.com") == [MESSAGE]
    assert graph_env.upstream.graph_stats()["sendMail"] == 1


async def test_header_only_addresses_are_not_sent_to(graph_env: ProxyEnv) -> None:
    message = MESSAGE.replace(f"To: {USER}".encode(),
                              f"To: {USER}, header.only@example.com".encode())

    def send() -> None:
        with smtp_login(graph_env.ports["graph"]) as client:
            client.sendmail(USER, [USER, "bcc.only@example.com"], message)

    await in_thread(send)
    assert graph_env.upstream.mailbox("header.only@example.com") == []
    (copy,) = graph_env.upstream.mailbox("bcc.only@example.com")
    assert b"header.only" not in copy and copy.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])


async def test_25_mb_message_through_upload_sessions(graph_env: ProxyEnv) -> None:
    raw, scan, note = big_message(25 * 1024 * 1024 // 4 * 3)

    def send() -> None:
        with smtp_login(graph_env.ports["graph"]) as client:
            client.sendmail(USER, [USER], raw)

    await in_thread(send)
    (got,) = await in_thread(lambda: imap_messages(graph_env.ports["imap"]))
    parsed = email.message_from_bytes(got, policy=email.policy.default)
    parts = {p.get_filename(): p for p in parsed.walk() if p.get_filename()}
    assert parts["scan.pdf"].get_content() == scan
    assert parts["note.txt"].get_content().encode() == note
    assert parts["logo.gif"]["Content-ID"] == "<logo@x>"
    assert "html body" in parsed.get_body(("html",)).get_content()
    assert parsed["Message-ID"] == "<scan-42@contoso.example>"
    assert graph_env.upstream.graph_stats()["upload chunk"] >= 5


async def test_throttled_451_then_accepted(graph_env: ProxyEnv) -> None:
    graph_env.upstream.configure(graph_throttle=1, graph_retry_after=3)

    def send() -> None:
        with smtp_login(graph_env.ports["graph"]) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail(USER, [USER], MESSAGE)
            assert refused.value.smtp_code == 451
            assert b"4.7.0" in refused.value.smtp_error
            assert b"retry after 3 s" in refused.value.smtp_error
            client.rset()
            assert client.sendmail(USER, [USER], MESSAGE) == {}

    await in_thread(send)
    assert len(graph_env.upstream.mailbox(USER)) == 1


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_smtp_auth_off_falls_back_to_graph(graph_env: ProxyEnv,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    graph_env.upstream.configure(smtp_auth_disabled=True)
    before = metrics.REGISTRY.get_sample_value(
        "xoauth2_proxy_graph_fallback_switches_total",
        {"upstream": "smtp", "direction": "to_graph"}) or 0.0

    async def swaks(subject: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "swaks", "--server", "127.0.0.1", "--port", str(graph_env.ports["smtp"]),
            "--auth", "PLAIN", "--auth-user", USER, "--auth-password", DEVICE_PASSWORD,
            "--from", USER, "--to", USER, "--header", f"Subject: {subject}",
            "--body", "sent by swaks", "--timeout", "60",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, out.decode(errors="replace")
        return out.decode(errors="replace")

    with caplog.at_level(logging.INFO):
        first = await swaks("fallback one")
        second = await swaks("fallback two")
    for out in (first, second):
        assert "235 2.7.0" in out and "(Microsoft Graph)" in out
    delivered = graph_env.upstream.mailbox(USER)
    assert [b"Subject: fallback one" in m for m in delivered] == [True, False]
    assert b"Subject: fallback two" in delivered[1]
    assert sum(r.getMessage() == "graph_fallback" for r in caplog.records) == 1
    after = metrics.REGISTRY.get_sample_value(
        "xoauth2_proxy_graph_fallback_switches_total",
        {"upstream": "smtp", "direction": "to_graph"})
    assert after == before + 1
