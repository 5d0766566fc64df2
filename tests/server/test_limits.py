"""Failed-login throttling and pre-login connection limits."""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import Limits
from proxy.demo.process import DemoUpstream
from proxy.server.limits import MIN_FAILURE_DELAY, PreauthLimiter, Reservation, Throttle
from proxy.server.logins import ProvenGate
from tests.proxyenv import PASSWORD, USER, imap_login_reply, local_tls, start_proxy
from tests.server.smtp_util import closed_port, plain_b64, start_smtp_proxy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delay_grows_then_locks_out_the_pair_and_the_source() -> None:
    clock = Clock()
    throttle = Throttle(Limits(failure_delay=1, max_failure_delay=8, lockout_after=5,
                               lockout_seconds=60), clock)
    delays = [throttle.failure("a@x", "192.0.2.1", bytes([i])) for i in range(4)]
    assert delays == [1, 2, 4, 8]
    assert throttle.locked("a@x", "192.0.2.1") == 0
    throttle.failure("a@x", "192.0.2.1", b"5")
    assert throttle.locked("a@x", "192.0.2.1") == 60
    assert throttle.locked("b@x", "192.0.2.1") == 60  # the source, for any account
    clock.now += 61
    assert throttle.locked("a@x", "192.0.2.1") == 0


def test_other_sources_are_delayed_never_locked_out() -> None:
    """Failures of an account from one source lengthen replies elsewhere but never refuse a
    source that has none: a printer retrying stale passwords cannot lock a shared mailbox."""
    clock = Clock()
    throttle = Throttle(Limits(failure_delay=1, max_failure_delay=8, lockout_after=3,
                               lockout_seconds=60), clock)
    for i in range(10):
        throttle.failure("a@x", "192.0.2.1", bytes([i]))
    assert throttle.locked("a@x", "192.0.2.1") == 60
    assert throttle.locked("a@x", "198.51.100.7") == 0
    reservation = throttle.reserve("A@X ", "198.51.100.7")
    assert isinstance(reservation, Reservation)
    assert throttle.failed(reservation, b"other") == 8  # delayed by the account's history
    right = throttle.reserve("a@x", "198.51.100.7")
    assert isinstance(right, Reservation)
    throttle.succeeded(right)


def test_a_repeated_wrong_password_counts_once() -> None:
    throttle = Throttle(Limits(failure_delay=1, lockout_after=3), Clock())
    stale = throttle.password_tag("revoked password")
    for _ in range(50):
        reservation = throttle.reserve("a@x", "192.0.2.1")
        assert isinstance(reservation, Reservation)
        throttle.failed(reservation, stale)
    assert throttle.locked("a@x", "192.0.2.1") == 0
    for other in ("guess 1", "guess 2"):
        throttle.failure("a@x", "192.0.2.1", throttle.password_tag(other))
    assert throttle.locked("a@x", "192.0.2.1") > 0  # three distinct wrong passwords


@pytest.mark.parametrize(("first", "second"), [
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe"),
    ("2001:db8:1:2::1%eth0", "2001:db8:1:2::99"),
])
def test_source_variants_share_a_lockout(first: str, second: str) -> None:
    throttle = Throttle(Limits(lockout_after=2), Clock())
    throttle.failure("a@x", first, b"1")
    throttle.failure("a@x", second, b"2")
    assert throttle.locked("a@x", first) > 0 and throttle.locked("a@x", second) > 0
    assert throttle.locked("a@x", "2001:db8:1:3::1") == 0  # the next /64 is another source


def test_a_failure_is_reserved_when_its_password_is_tried() -> None:
    """Attempts admitted together count their failures as soon as each password is tried, so
    the guess after the lockout threshold is refused even before the earlier ones are
    answered; attempts that never try a password (a warm login) count nothing."""
    throttle = Throttle(Limits(lockout_after=3), Clock())
    admitted = [throttle.reserve("a@x", "192.0.2.1") for _ in range(60)]
    tried = 0
    for reservation in admitted:
        assert isinstance(reservation, Reservation)
        release = throttle.begin_derivation(reservation)
        if release is None:
            throttle.release(reservation)
            continue
        tried += 1
        release()  # the derivation ended; its verdict is not in yet
    assert tried == 3
    assert throttle.locked("a@x", "192.0.2.1") > 0
    warm = Throttle(Limits(lockout_after=3), Clock())
    for _ in range(60):
        reservation = warm.reserve("a@x", "192.0.2.1")
        assert isinstance(reservation, Reservation)
        warm.succeeded(reservation)
    assert warm.locked("a@x", "192.0.2.1") == 0


def test_one_derivation_in_flight_per_account_and_source() -> None:
    throttle = Throttle(Limits(), Clock())

    def claim(account: str, source: str) -> Callable[[], None] | None:
        reservation = throttle.reserve(account, source)
        assert isinstance(reservation, Reservation)
        return throttle.begin_derivation(reservation)

    release = claim("a@x", "192.0.2.1")
    assert release is not None
    assert claim("A@x", "198.51.100.7") is None  # same account
    assert claim("b@x", "192.0.2.1") is None  # same source
    assert claim("b@x", "198.51.100.7") is not None
    release()
    assert claim("a@x", "192.0.2.1") is not None


def test_a_proven_session_takes_its_turn_and_counts_no_failure() -> None:
    """An SMTP session's upstream reconnect, its password proven at its login, waits for its
    turn like any key derivation but never counts a failure towards a lockout."""
    throttle = Throttle(Limits(lockout_after=1), Clock())
    proven = ProvenGate(throttle, "a@x", "192.0.2.1")
    guess = throttle.reserve("a@x", "198.51.100.7")
    assert isinstance(guess, Reservation)
    guessing = throttle.begin_derivation(guess)
    assert guessing is not None
    assert proven.begin_derivation() is None  # the account's one derivation is in flight
    guessing()
    throttle.release(guess)
    for _ in range(3):
        release = proven.begin_derivation()
        assert release is not None
        release()
    assert throttle.locked("a@x", "192.0.2.1") == 0


def test_no_failure_is_answered_at_once() -> None:
    """``failure_delay = 0`` would make the reply's timing an oracle; there is a floor."""
    throttle = Throttle(Limits(failure_delay=0, max_failure_delay=0), Clock())
    assert throttle.failure("a@x", "192.0.2.1", b"1") == MIN_FAILURE_DELAY > 0


def test_loopback_sources_count_per_account_only() -> None:
    throttle = Throttle(Limits(lockout_after=2), Clock())
    throttle.failure("a@x", "127.0.0.1", b"1")
    throttle.failure("a@x", "127.0.0.1", b"2")
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


login_error = imap_login_reply


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
        for i in range(2):  # distinct passwords: a repeated wrong one counts once
            await asyncio.to_thread(login_error, port, USER, f"wrong-password-{i}")
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


@pytest.mark.parametrize("fin", [False, True], ids=["silent", "fin"])
async def test_a_starttls_handshake_that_never_comes_frees_the_connection(
        tmp_path: Path, demo_upstream: DemoUpstream, fin: bool) -> None:
    """A client sends STARTTLS and then nothing, or only its FIN: the idle timer closes the
    connection in the middle of the handshake, and its pre-login place is given back (the
    command loop used to go on as if the handshake had worked, and the connection was never
    counted as gone). A byte-level client: a real one always goes on with the handshake."""
    listener, _ = local_tls(tmp_path, "starttls")
    env = await start_smtp_proxy(tmp_path, demo_upstream, listener_extra={"smtp": listener},
                                 limits={"preauth_idle": 0.5})
    try:
        def stall() -> bytes:
            with socket.create_connection(("127.0.0.1", env.ports["smtp"]), timeout=10) as sock:
                reader = sock.makefile("rb")
                assert reader.readline().startswith(b"220 ")
                sock.sendall(b"EHLO device\r\nSTARTTLS\r\n")
                while not (line := reader.readline()).startswith(b"220 "):
                    assert line.startswith(b"250"), line
                if fin:
                    sock.shutdown(socket.SHUT_WR)
                return reader.read()  # until the proxy closes

        assert await asyncio.to_thread(stall) == b""
        deadline = time.monotonic() + 10
        while env.daemon.preauth.total:
            assert time.monotonic() < deadline, "the connection still holds its place"
            await asyncio.sleep(0.02)
    finally:
        await env.daemon.stop(grace=1)
