"""Failed-login throttling and pre-login connection limits."""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
import socket
import time
from pathlib import Path

import pytest

from proxy.config import Limits
from proxy.demo.process import DemoUpstream
from proxy.server.limits import PreauthLimiter, Throttle
from tests.proxyenv import PASSWORD, USER, start_proxy
from tests.server.smtp_util import closed_port, plain_b64


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delay_grows_then_locks_out() -> None:
    clock = Clock()
    throttle = Throttle(Limits(failure_delay=1, max_failure_delay=8, lockout_after=5,
                               lockout_seconds=60), clock)
    delays = [throttle.failure("a@x", "192.0.2.1") for _ in range(4)]
    assert delays == [1, 2, 4, 8]
    assert throttle.locked("a@x", "192.0.2.1") == 0
    throttle.failure("a@x", "192.0.2.1")
    assert throttle.locked("a@x", "192.0.2.1") == 60
    assert throttle.locked("a@x", "192.0.2.9") == 60  # the account is locked from anywhere
    assert throttle.locked("b@x", "192.0.2.1") == 60  # and so is the source, for any account
    throttle.success("a@x", "192.0.2.1")  # a success during lockout does not lift it
    assert throttle.locked("a@x", "192.0.2.1") == 60
    clock.now += 61
    assert throttle.locked("a@x", "192.0.2.1") == 0


def test_loopback_sources_count_per_account_only() -> None:
    throttle = Throttle(Limits(lockout_after=2), Clock())
    throttle.failure("a@x", "127.0.0.1")
    throttle.failure("a@x", "127.0.0.1")
    assert throttle.locked("a@x", "127.0.0.1") > 0
    assert throttle.locked("b@x", "127.0.0.1") == 0  # other accounts on this machine unaffected


def test_quiet_keys_are_forgotten_and_memory_bounded() -> None:
    clock = Clock()
    throttle = Throttle(Limits(failure_delay=1, forget_after=10), clock)
    throttle.failure("a@x", "192.0.2.1")
    clock.now += 11
    assert throttle.failure("a@x", "192.0.2.1") == 1  # starts again from the first delay
    for i in range(60_000):
        throttle.failure(f"user{i}@x", "127.0.0.1")
    assert len(throttle._records) <= 50_000


def test_preauth_limiter() -> None:
    limiter = PreauthLimiter(Limits(max_preauth_per_source=2, max_preauth_total=3))
    assert limiter.admit("a") and limiter.admit("a")
    assert not limiter.admit("a")
    assert limiter.admit("b")
    assert not limiter.admit("c")  # total reached
    limiter.release("a")
    assert limiter.admit("c")


def login_error(port: int, user: str, password: str) -> str:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        client.login(user, password)
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        client.shutdown()
    return "OK"


async def test_lockout_refuses_even_the_right_password(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    simple = "simple-password"
    env = await start_proxy(tmp_path, demo_upstream, protocols=("imap",), limits={
        "failure_delay": 0.2, "max_failure_delay": 0.4, "lockout_after": 3, "lockout_seconds": 4})
    from tests.proxyenv import authorise
    authorise(env.config, demo_upstream, password=simple)
    port = env.ports["imap"]
    try:
        started = time.monotonic()
        first = await asyncio.to_thread(login_error, port, USER, "wrong-password")
        assert "[AUTHENTICATIONFAILED]" in first
        assert time.monotonic() - started >= 0.2  # the failure reply is delayed
        for _ in range(2):
            await asyncio.to_thread(login_error, port, USER, "wrong-password")
        locked = await asyncio.to_thread(login_error, port, USER, simple)
        assert "[UNAVAILABLE]" in locked and "Too many failed logins" in locked
        deadline = time.monotonic() + 15
        result = locked
        while result != "OK" and time.monotonic() < deadline:
            await asyncio.sleep(0.25)  # waiting out the 4-second lockout itself
            result = await asyncio.to_thread(login_error, port, USER, simple)
        assert result == "OK"
    finally:
        await env.daemon.stop(grace=1)
    assert PASSWORD  # the shared password is not used here


@pytest.mark.parametrize("protocol", ["imap", "smtp"])
async def test_right_password_clears_failures_even_if_the_server_is_down(
        tmp_path: Path, demo_upstream: DemoUpstream, protocol: str) -> None:
    """The password is proven once it unlocks the token: that resets the failure count on
    every protocol, whatever the mail server then says (here: nothing, it is down)."""
    simple = "simple-password"
    env = await start_proxy(tmp_path, demo_upstream, protocols=(protocol,),
                            upstream_ports={protocol: closed_port()}, limits={
                                "failure_delay": 0.01, "max_failure_delay": 0.02,
                                "lockout_after": 3, "lockout_seconds": 60})
    from tests.proxyenv import authorise
    authorise(env.config, demo_upstream, password=simple)
    port = env.ports[protocol]

    def attempt(password: str) -> str:
        if protocol == "imap":
            return login_error(port, USER, password)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            code, text = client.docmd("AUTH", "PLAIN " + plain_b64(USER, password))
            return f"{code} {text.decode()}"

    try:
        for password in ("wrong-1", "wrong-2", simple, "wrong-3", "wrong-4"):
            reply = await asyncio.to_thread(attempt, password)
            assert "Too many failed logins" not in reply, (password, reply)
        right = await asyncio.to_thread(attempt, simple)
        assert "Too many failed logins" not in right and ("UNAVAILABLE" in right
                                                          or right.startswith("454 4.7.0"))
    finally:
        await env.daemon.stop(grace=1)


async def test_preauth_connection_limit(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    env = await start_proxy(tmp_path, demo_upstream, protocols=("imap",),
                            limits={"max_preauth_per_source": 3})
    port = env.ports["imap"]
    try:
        def connect_many() -> list[str]:
            held = [imaplib.IMAP4("127.0.0.1", port, timeout=10) for _ in range(3)]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                    greeting = extra.makefile("rb").readline().decode()
                # a logged-in client frees its slot: another may connect
                held[0].login(USER, PASSWORD) if PASSWORD.isascii() else None
                return [greeting]
            finally:
                for client in held:
                    client.shutdown()

        (greeting,) = await asyncio.to_thread(connect_many)
        assert greeting.startswith("* BYE [UNAVAILABLE]") and "Too many connections" in greeting
        ok = await asyncio.to_thread(lambda: imaplib.IMAP4("127.0.0.1", port, timeout=10).welcome)
        assert ok.startswith(b"* OK")
    finally:
        await env.daemon.stop(grace=1)


@pytest.mark.parametrize("silence", [True])
async def test_preauth_idle_timeout(tmp_path: Path, demo_upstream: DemoUpstream, silence: bool) -> None:
    env = await start_proxy(tmp_path, demo_upstream, protocols=("imap",),
                            limits={"preauth_idle": 0.5})
    try:
        def idle() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", env.ports["imap"]), timeout=10) as sock:
                reader = sock.makefile("rb")
                return [reader.readline(), reader.readline(), reader.read()]

        greeting, bye, rest = await asyncio.to_thread(idle)
        assert greeting.startswith(b"* OK") and bye.startswith(b"* BYE") and rest == b""
    finally:
        await env.daemon.stop(grace=1)
