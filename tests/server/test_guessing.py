"""Password guessing through the proxy, with real clients against the fake Microsoft 365:
parallel guesses are refused while one is being checked (never queued, never delaying other
accounts), a lockout holds one (account, source) only, and a client cannot tell an account
without tokens from an unknown one."""

from __future__ import annotations

import asyncio
import smtplib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxy.demo.process import DemoUpstream
from proxy.store import slots as slots_mod
from tests.proxyenv import USER, authorise, imap_login_reply, start_proxy
from tests.server.smtp_util import plain_b64

T = TypeVar("T")
BOB = "bob@contoso.example"
BOB_PASSWORD = "bobs-own-password"
SIMPLE = "simple-password"  # smtplib sends AUTH as ASCII


login_reply = imap_login_reply


def smtp_auth(port: int, source: str, user: str, password: str) -> str:
    """AUTH PLAIN from the loopback address ``source`` (127.0.0.x: another client host)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as client:
        client.ehlo()
        code, text = client.docmd("AUTH", "PLAIN " + plain_b64(user, password))
        return f"{code} {text.decode()}"


@pytest.fixture
def clients() -> Iterator[ThreadPoolExecutor]:
    """Threads for blocking clients: never the event loop's default executor, which the
    daemon under test uses itself."""
    with ThreadPoolExecutor(80, thread_name_prefix="client") as pool:
        yield pool


def run(pool: ThreadPoolExecutor, call: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    return asyncio.get_running_loop().run_in_executor(pool, call, *args)


class HeldScrypt:
    """scrypt that waits for ``release`` before it runs (counting the calls)."""

    def __init__(self, real: Callable[..., bytes]) -> None:
        self.real, self.calls = real, 0
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, password: bytes, salt: bytes, params: Any) -> bytes:
        self.calls += 1
        self.entered.set()
        self.release.wait(60)
        return self.real(password, salt, params)


async def test_parallel_guesses_are_refused_while_one_is_checked(
        tmp_path: Path, demo_upstream: DemoUpstream, monkeypatch: pytest.MonkeyPatch,
        clients: ThreadPoolExecutor) -> None:
    """Sixty wrong passwords and the right one at once: one is stretched, the rest are refused
    at once with the throttled reply (not queued behind it), and another account's login goes
    through meanwhile."""
    env = await start_proxy(tmp_path, demo_upstream, protocols=("imap",),
                            accounts={USER: {"provider": "demo"}, BOB: {"provider": "demo"}},
                            password=SIMPLE, limits={"lockout_after": 10})
    authorise(env.config, demo_upstream, user=BOB, password=BOB_PASSWORD)
    port = env.ports["imap"]
    try:
        assert await run(clients, login_reply, port, BOB, BOB_PASSWORD) == "OK"  # warm
        held = HeldScrypt(slots_mod.scrypt_derive)
        monkeypatch.setattr(slots_mod, "scrypt_derive", held)
        first = run(clients, login_reply, port, USER, "guess-0")
        assert await asyncio.to_thread(held.entered.wait, 30)
        burst = [run(clients, login_reply, port, USER, f"guess-{i}") for i in range(1, 60)]
        burst.append(run(clients, login_reply, port, USER, SIMPLE))
        done, pending = await asyncio.wait(burst, timeout=30)
        assert not pending, f"{len(pending)} guesses were queued behind the one being checked"
        replies = [task.result() for task in done]
        # the throttled reply: "…at once…", or "…failed logins…" once reserved failures reach
        # the lockout threshold
        assert all("[UNAVAILABLE] Too many" in r for r in replies), set(replies)
        assert await asyncio.wait_for(run(clients, login_reply, port, BOB, BOB_PASSWORD),
                                      30) == "OK"
        assert held.calls == 1
        held.release.set()
        assert "[AUTHENTICATIONFAILED]" in await first
        assert await run(clients, login_reply, port, USER, SIMPLE) == "OK"
    finally:
        held.release.set()
        await env.daemon.stop(grace=1)


async def test_a_lockout_holds_one_source_and_a_stale_password_none(
        tmp_path: Path, demo_upstream: DemoUpstream, clients: ThreadPoolExecutor) -> None:
    """A device retrying a revoked password forever never locks the account; a source that
    guesses locks itself out, while another host's right password still logs in."""
    env = await start_proxy(tmp_path, demo_upstream, protocols=("smtp",), password=SIMPLE,
                            limits={"lockout_after": 3, "lockout_seconds": 300})
    port = env.ports["smtp"]
    try:
        for _ in range(8):  # the printer with the revoked password
            reply = await run(clients, smtp_auth, port, "127.0.0.2", USER, "revoked-password")
            assert reply.startswith("535 "), reply
        assert (await run(clients, smtp_auth, port, "127.0.0.2", USER, SIMPLE)).startswith("235")
        for i in range(3):  # a guesser on another host
            await run(clients, smtp_auth, port, "127.0.0.3", USER, f"guess-{i}")
        locked = await run(clients, smtp_auth, port, "127.0.0.3", USER, SIMPLE)
        assert locked.startswith("454 ") and "Too many failed logins" in locked, locked
        for source in ("127.0.0.2", "127.0.0.4"):
            reply = await run(clients, smtp_auth, port, source, USER, SIMPLE)
            assert reply.startswith("235"), (source, reply)
    finally:
        await env.daemon.stop(grace=1)


async def test_an_account_without_tokens_answers_like_an_unknown_one(
        tmp_path: Path, demo_upstream: DemoUpstream, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, clients: ThreadPoolExecutor) -> None:
    """Same reply, same work (one key derivation, also on a repeat: none), the detail only in
    the log."""
    env = await start_proxy(tmp_path, demo_upstream, protocols=("imap",),
                            accounts={USER: {"provider": "demo"}, BOB: {"provider": "demo"}})
    port = env.ports["imap"]
    real = slots_mod.scrypt_derive
    calls: list[int] = []

    def counted(password: bytes, salt: bytes, params: Any) -> bytes:
        calls.append(params.n)
        return real(password, salt, params)

    monkeypatch.setattr(slots_mod, "scrypt_derive", counted)
    try:
        replies = {}
        for user in (BOB, "nobody@contoso.example", USER):
            before = len(calls)
            replies[user] = await run(clients, login_reply, port, user, "some password")
            assert len(calls) == before + 1, user  # one derivation each, at the same cost
            await run(clients, login_reply, port, user, "some password")
            assert len(calls) == before + 1, user  # a repeat costs none, for each alike
        assert len(set(replies.values())) == 1, replies
        assert "Invalid user name or local password." in replies[BOB]
        assert len(set(calls)) == 1
        reasons = [str((getattr(r, "fields", None) or {}).get("reason")) for r in caplog.records
                   if r.getMessage() == "login"]
        assert any(f"run: xoauth2-proxy login {BOB}" in reason for reason in reasons), reasons
    finally:
        await env.daemon.stop(grace=1)
