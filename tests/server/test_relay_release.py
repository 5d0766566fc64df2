"""A session that relays keeps only what relaying needs: once an IMAP or POP3 client has
logged in, its login dialogue's machine and the login attempt are gone (no reference left to
them, not even from callbacks registered during the login), while the session still relays;
an SMTP session keeps no login attempt either."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import imaplib
import poplib
import smtplib
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.auth.gate import GATE
from proxy.demo.process import DemoUpstream
from proxy.server import logins, session, smtp
from proxy.server.daemon import ListenerRuntime
from tests.proxyenv import USER, ProxyEnv, start_proxy

PASSWORD = "relay-release-password"


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[ProxyEnv]:
    env = await start_proxy(tmp_path, demo_upstream, password=PASSWORD,
                            protocols=("imap", "pop"))
    yield env
    await env.daemon.stop(grace=1)


def record(env: ProxyEnv, monkeypatch: pytest.MonkeyPatch, protocol: str
           ) -> tuple[list[weakref.ref[Any]], list[weakref.ref[Any]]]:
    """Weak references to every client machine and login attempt made from now on."""
    machines: list[weakref.ref[Any]] = []
    attempts: list[weakref.ref[Any]] = []
    runtime = next(r for r in env.daemon.listeners
                   if isinstance(r, ListenerRuntime) and r.ctx.spec.protocol == protocol)
    make_machine = runtime.ctx.spec.client_machine

    def machine(**kw: Any) -> Any:
        made = make_machine(**kw)
        machines.append(weakref.ref(made))
        return made

    class RecordedAttempt(logins.LoginAttempt):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            attempts.append(weakref.ref(self))

    monkeypatch.setattr(runtime.ctx, "spec",
                        dataclasses.replace(runtime.ctx.spec, client_machine=machine))
    monkeypatch.setattr(session, "LoginAttempt", RecordedAttempt)
    return machines, attempts


async def check_released(machines: list[weakref.ref[Any]],
                         attempts: list[weakref.ref[Any]]) -> None:
    await asyncio.sleep(0)  # let the session task reach the relay
    gc.collect()
    assert len(machines) == 1 and len(attempts) == 1
    assert machines[0]() is None, "the login dialogue's machine outlives the login"
    assert attempts[0]() is None, "the login attempt outlives the login"


async def test_imap_relay_keeps_no_login_state(env: ProxyEnv,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    machines, attempts = record(env, monkeypatch, "imap")

    def logged_in() -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", env.ports["imap"], timeout=30)
        assert client.login(USER, PASSWORD)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"  # through the relay
        return client

    client = await asyncio.to_thread(logged_in)
    try:
        await check_released(machines, attempts)
        assert (await asyncio.to_thread(client.noop))[0] == "OK"  # still relaying
    finally:
        await asyncio.to_thread(client.logout)


async def test_pop_relay_keeps_no_login_state(env: ProxyEnv,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    machines, attempts = record(env, monkeypatch, "pop")

    def logged_in() -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", env.ports["pop"], timeout=30)
        client.user(USER)
        assert client.pass_(PASSWORD).startswith(b"+OK")
        return client

    client = await asyncio.to_thread(logged_in)
    try:
        await asyncio.to_thread(client.stat)  # through the relay
        await check_released(machines, attempts)
        assert (await asyncio.to_thread(client.noop)).startswith(b"+OK")  # still relaying
    finally:
        await asyncio.to_thread(client.quit)


async def test_smtp_session_keeps_no_login_attempt(tmp_path: Path, demo_upstream: DemoUpstream,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The attempt is let go once the login is decided; the session's later token requests (an
    upstream reconnect) pass a gate for a proven password instead."""
    env = await start_proxy(tmp_path, demo_upstream, password=PASSWORD, protocols=("smtp",))
    attempts: list[weakref.ref[Any]] = []
    gates: list[str] = []

    class RecordedAttempt(logins.LoginAttempt):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            attempts.append(weakref.ref(self))

    real = env.daemon.tokens.access_token

    async def access_token(*args: Any, **kw: Any) -> str:
        gates.append(type(GATE.get()).__name__)
        return await real(*args, **kw)

    monkeypatch.setattr(smtp, "LoginAttempt", RecordedAttempt)
    monkeypatch.setattr(env.daemon.tokens, "access_token", access_token)

    def logged_in() -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", env.ports["smtp"], timeout=30)  # loopback: no TLS
        client.login(USER, PASSWORD)
        assert client.noop()[0] == 250  # through the upstream session
        return client

    def send(subject: str) -> dict[str, Any]:
        return client.sendmail(USER, ["bob@example.com"],
                               f"Subject: {subject}\r\n\r\nbody\r\n".encode())

    try:
        client = await asyncio.to_thread(logged_in)
        gc.collect()
        assert len(attempts) == 1
        assert attempts[0]() is None, "the login attempt outlives the login"
        demo_upstream.configure(smtp_extra_reply_after_data=True)  # that session is closed
        assert await asyncio.to_thread(send, "one") == {}
        demo_upstream.configure(smtp_extra_reply_after_data=False)
        assert await asyncio.to_thread(send, "two") == {}  # through a new upstream session
        assert gates == ["_Gate", "ProvenGate"]
        await asyncio.to_thread(client.quit)
    finally:
        await env.daemon.stop(grace=1)
