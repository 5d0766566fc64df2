"""A device with no AUTH relays through the proxy to real Postfix, and the message lands in
Dovecot: the proxy logs in to Postfix's submission port with XOAUTH2, using a token the
service key unlocks (no client password anywhere); a source outside the rules gets 550 5.7.1.
"""

from __future__ import annotations

import asyncio
import io
import smtplib
import time
from collections.abc import AsyncIterator
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
from .test_through_proxy import USER, message

pytestmark = pytest.mark.realserver

ALLOWED, DENIED = "127.0.0.2", "127.0.0.3"
DEVICE_SENDER = "mfp-3rd-floor@devices.example.test"


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: Any, dovecot: Dovecot, postfix: Postfix
              ) -> AsyncIterator[ProxyEnv]:
    key = tmp_path / "alice.key"
    store.generate_key_file(key)
    data = config_dict(
        tmp_path, demo_upstream, protocols=("smtp",),
        accounts={USER: {"provider": "demo", "service_key_file": str(key)}},
        upstreams={"smtp": {"port": postfix.submission_port, "tls": "starttls",
                            "ca_file": str(postfix.ca_file)}})
    data["relay"] = [{"name": "copiers", "listener": "smtp", "sources": [f"{ALLOWED}/32"],
                      "account": USER, "allowed_senders": ["@devices.example.test"],
                      "force_sender": USER}]
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    account = cfg.account(USER)
    assert account is not None
    demo_upstream.configure(auto_approve_user=account.mailbox)
    token_store = open_store(cfg)
    flows.login(cfg, account, token_store, Secret("a local password"), out=io.StringIO(),
                service_key=store.read_key_file(key))
    daemon = Daemon(cfg)
    await daemon.start()
    yield ProxyEnv(demo_upstream, cfg, token_store, daemon, USER, "a local password")
    await daemon.stop(grace=1)


async def test_device_relays_to_postfix_without_auth(env: ProxyEnv, dovecot: Dovecot) -> None:
    sent = message(f"relayed by a copier {time.time()}")
    port = env.ports["smtp"]

    def run() -> bytes:
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(ALLOWED, 0)) as smtp:
            assert smtp.sendmail(DEVICE_SENDER, [USER], sent) == {}
        return dovecot.first_message(USER)

    delivered = await asyncio.to_thread(run)
    assert delivered.endswith(sent.replace(b"\r\n", b"\n"))
    head = delivered.split(b"\n\n", 1)[0]
    assert f"Return-Path: <{USER}>".encode() in head  # the envelope sender was forced

    def denied() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(DENIED, 0)) as smtp:
            smtp.ehlo()
            return smtp.mail(DEVICE_SENDER)

    assert await asyncio.to_thread(denied) == (
        550, b"5.7.1 Relaying from 127.0.0.3 is not allowed by the proxy's rules")
