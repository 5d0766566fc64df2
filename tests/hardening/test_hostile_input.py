"""Hostile input on every listener before login: each gets a defined reply or a clean close,
within bounded time and memory, nothing escapes a connection, and the daemon keeps serving.

Each case runs on a fresh raw connection: exact bytes out, then the replies are matched in
order. Cases that do not end the connection are followed by the protocol's goodbye, so every
case ends in a closed socket and a bounded read.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.demo.process import DemoUpstream
from tests.hardening.conftest import (
    PROTOCOLS,
    Raw,
    Trouble,
    assert_healthy,
    fd_baseline,
    imap_roundtrip,
    open_sessions,
    start_env,
    wait_for,
)
from tests.proxyenv import PASSWORD, USER, ProxyEnv


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@dataclass(frozen=True)
class Case:
    name: str
    send: tuple[bytes, ...]  # chunks, written one after the other
    replies: tuple[bytes, ...]  # regexes the replies must match, in order
    closes: bool  # the proxy ends the connection by itself


IMAP_GREETING = rb"\* OK \[CAPABILITY [^\]]*\] "
IMAP_CASES = [
    Case("overlong line, no line end", (b"a " + b"A" * 9000,), (rb"\* BYE \[TOOBIG\]",), True),
    Case("overlong line", (b"a LOGIN " + b"x" * 20000 + b" y\r\n",), (rb"\* BYE \[TOOBIG\]",),
         True),
    Case("huge synchronising literal", (b"a LOGIN {99999999999999999999999999}\r\n",),
         (rb"a NO \[TOOBIG\]",), False),
    Case("literal just over the cap", (b"a LOGIN {65537}\r\n",), (rb"a NO \[TOOBIG\]",), False),
    Case("huge non-synchronising literal", (b"a LOGIN {1000000000+}\r\n",),
         (rb"a BAD \[TOOBIG\]", rb"\* BYE"), True),
    Case("literal on a command that takes none", (b"a NOOP {5}\r\n",), (rb"a BAD",), False),
    Case("literal before login on another command", (b"a SELECT {5}\r\n",), (rb"a BAD",), False),
    Case("literals summing over the cap",
         (b"a ID (\"k\" {40000+}\r\n" + b"v" * 40000 + b" \"k2\" {40000+}\r\n",),
         (rb"a BAD \[TOOBIG\]", rb"\* BYE"), True),
    Case("NUL in a quoted string", (b'a LOGIN "al\x00ice" "pw"\r\n',), (rb"a BAD",), False),
    Case("NUL in an atom", (b"a LOGIN al\x00ice pw\r\n",), (rb"a BAD",), False),
    Case("NUL as the tag", (b"\x00 NOOP\r\n",), (rb"\* BAD",), False),
    Case("8-bit tag", (b"\xff\xfe NOOP\r\n",), (rb"\* BAD",), False),
    Case("8-bit user name, not UTF-8", (b"a LOGIN {2+}\r\n\xff\xfe pw\r\n",), (rb"a BAD",), False),
    Case("8-bit password, not UTF-8", (b"a LOGIN bob {2+}\r\n\xc3\x28\r\n",), (rb"a BAD",), False),
    Case("control character in the user name",
         (b"a AUTHENTICATE PLAIN " + b64(b"\0al\x01ice\0pw") + b"\r\n",), (rb"a BAD",), False),
    Case("invalid base64 (SASL-IR)", (b"a AUTHENTICATE PLAIN !!!!\r\n",), (rb"a BAD",), False),
    Case("invalid base64 padding", (b"a AUTHENTICATE PLAIN QUJD=\r\n",), (rb"a BAD",), False),
    Case("invalid base64 (continuation)", (b"a AUTHENTICATE PLAIN\r\n", b"%%%%\r\n"),
         (rb"\+ ", rb"a BAD"), False),
    Case("PLAIN without NULs", (b"a AUTHENTICATE PLAIN " + b64(b"alice") + b"\r\n",),
         (rb"a BAD",), False),
    Case("PLAIN acting for another user",
         (b"a AUTHENTICATE PLAIN " + b64(b"root\0alice\0pw") + b"\r\n",), (rb"a BAD",), False),
    Case("SASL cancelled", (b"a AUTHENTICATE PLAIN\r\n", b"*\r\n"), (rb"\+ ", rb"a BAD"), False),
    Case("overlong SASL response", (b"a AUTHENTICATE PLAIN\r\n", b"Q" * 9000),
         (rb"\+ ", rb"\* BYE \[TOOBIG\]"), True),
    Case("unknown mechanism", (b"a AUTHENTICATE XOAUTH2 abc\r\n",), (rb"a NO \[CANNOT\]",), False),
    Case("unbalanced ID list", (b"a ID ((((((((\r\n",), (rb"a BAD",), False),
    Case("empty lines", (b"\r\n\r\n\n",), (rb"\* BAD", rb"\* BAD", rb"\* BAD"), False),
    Case("pipelined garbage",
         (b"a NOOP\r\n\x00\x01\x02\r\nb CAPABILITY\r\nc FROB x\r\n\x16\x03\x01\x02\x00\x01\r\n"
          b"d LOGOUT\r\ne NOOP\r\n",),
         (rb"a OK", rb"\* BAD", rb"\* CAPABILITY", rb"b OK", rb"c BAD", rb"\* BAD",
          rb"\* BYE", rb"d OK"), True),
    Case("command after the login, pipelined, then the wrong password",
         (b'a LOGIN "' + USER.encode() + b'" "wrong"\r\nb NOOP\r\n',),
         (rb"a NO \[AUTHENTICATIONFAILED\]", rb"b OK"), False),
    Case("unknown account", (b"a LOGIN nobody@nowhere.example secret\r\n",),
         (rb"a NO \[AUTHENTICATIONFAILED\]",), False),
    Case("STARTTLS where it is not offered", (b"a STARTTLS\r\n",), (rb"a BAD",), False),
    Case("split at every byte", tuple(bytes([c]) for c in b"a NOOP\r\nb CAPABILITY\r\n"),
         (rb"a OK", rb"b OK"), False),
]

POP_CASES = [
    Case("overlong line, no line end", (b"USER " + b"u" * 3000,), (rb"-ERR",), True),
    Case("overlong line", (b"PASS " + b"p" * 50000 + b"\r\n",), (rb"-ERR",), True),
    Case("NUL line", (b"\x00\x00\x00\r\n",), (rb"-ERR",), False),
    Case("8-bit user name, not UTF-8", (b"USER \xff\xfe\r\n",), (rb"-ERR",), False),
    Case("control character in the user name", (b"USER al\x01ice\r\n",), (rb"-ERR",), False),
    Case("PASS before USER", (b"PASS secret\r\n",), (rb"-ERR",), False),
    Case("8-bit password, not UTF-8", (b"USER bob\r\nPASS \xc3\x28\r\n",), (rb"\+OK", rb"-ERR"),
         False),
    Case("invalid base64 (initial response)", (b"AUTH PLAIN !!!!\r\n",), (rb"-ERR",), False),
    Case("invalid base64 (continuation)", (b"AUTH PLAIN\r\n", b"%%%%\r\n"), (rb"\+ ", rb"-ERR"),
         False),
    Case("PLAIN without NULs", (b"AUTH PLAIN " + b64(b"alice") + b"\r\n",), (rb"-ERR",), False),
    Case("SASL cancelled", (b"AUTH PLAIN\r\n", b"*\r\n"), (rb"\+ ", rb"-ERR"), False),
    Case("overlong SASL response", (b"AUTH PLAIN\r\n", b"Q" * 5000 + b"\r\n"), (rb"\+ ", rb"-ERR"),
         True),
    Case("unknown mechanism", (b"AUTH XOAUTH2 abc\r\n",), (rb"-ERR",), False),
    Case("too many AUTH arguments", (b"AUTH PLAIN a b c\r\n",), (rb"-ERR",), False),
    Case("TOP before login", (b"TOP 1 10\r\n",), (rb"-ERR",), False),
    Case("pipelined garbage",
         (b"CAPA\r\nXYZZY\r\n\xff\xfe\r\n\x16\x03\x01\x02\x00\x01\r\nQUIT\r\nNOOP\r\n",),
         (rb"\+OK", rb"\r\n\.\r\n", rb"-ERR", rb"-ERR", rb"-ERR", rb"\+OK Bye"), True),
    Case("wrong password, then a pipelined command",
         (b"USER " + USER.encode() + b"\r\nPASS wrong\r\nCAPA\r\n",),
         (rb"\+OK", rb"-ERR \[AUTH\]", rb"\+OK"), False),
    Case("split at every byte", tuple(bytes([c]) for c in b"CAPA\r\nUSER bob\r\n"),
         (rb"\+OK", rb"\+OK"), False),
]

SMTP_CASES = [
    Case("overlong line", (b"EHLO " + b"h" * 5000 + b"\r\n",), (rb"500 5\.5\.2 Line too long",),
         False),
    Case("line past the reader's limit", (b"EHLO " + b"h" * 300_000 + b"\r\n",),
         (rb"500 5\.5\.2 Line too long",), False),
    Case("NUL bytes", (b"EHLO a\x00b\r\n\x00\x00\r\n",), (rb"500 5\.5\.2 ", rb"500 5\.5\.2 "),
         False),
    Case("8-bit garbage", (b"\xff\xfe\xfd\r\n",), (rb"500 5\.5\.2 ",), False),
    Case("bare LF and bare CR", (b"NOOP\nNOOP\rNOOP\r\n",), (rb"500 5\.5\.2 ", rb"500 5\.5\.2 "),
         False),
    Case("invalid base64 (initial response)", (b"EHLO x\r\n", b"AUTH PLAIN !!!!\r\n"),
         (rb"250 ", rb"501 5\.5\.2 "), False),
    Case("invalid base64 (continuation)", (b"EHLO x\r\n", b"AUTH PLAIN\r\n", b"%%%%\r\n"),
         (rb"250 ", rb"334", rb"501 5\.5\.2 "), False),
    Case("invalid base64 (AUTH LOGIN)", (b"EHLO x\r\n", b"AUTH LOGIN\r\n", b"***\r\n"),
         (rb"250 ", rb"334", rb"501 5\.5\.2 "), False),
    Case("MAIL before AUTH", (b"EHLO x\r\nMAIL FROM:<a@b>\r\n",), (rb"250 ", rb"530 5\.7\.0 "),
         False),
    Case("MAIL over its cap after a second EHLO (the cap does not grow per EHLO)",
         (b"EHLO x\r\nEHLO x\r\nMAIL FROM:<" + b"a" * 540 + b"@b>\r\n",),
         (rb"250 ", rb"250 ", rb"500 5\.5\.2 Line too long"), False),
    Case("malformed MAIL before AUTH", (b"EHLO x\r\nMAIL FROM:<\r\n",),
         (rb"250 ", rb"501 5\.1\.7 "), False),
    Case("pipelined garbage", (b"EHLO x\r\nFROB\r\n\x16\x03\x01\x00\r\nNOOP\r\n",),
         (rb"250 ", rb"500 5\.5\.2 ", rb"500 5\.5\.2 ", rb"250"), False),
    Case("wrong password",
         (b"EHLO x\r\nAUTH PLAIN " + b64(b"\0" + USER.encode() + b"\0wrong") + b"\r\n",),
         (rb"250 ", rb"535 5\.7\.8 "), False),
]

GOODBYE = {"imap": (b"z LOGOUT\r\n", rb"z OK"), "pop": (b"QUIT\r\n", rb"\+OK"),
           "smtp": (b"QUIT\r\n", rb"221")}
GREETING = {"imap": IMAP_GREETING, "pop": rb"\+OK [^\r]*\r\n", "smtp": rb"220 [^\r]*\r\n"}
CASES = {"imap": IMAP_CASES, "pop": POP_CASES, "smtp": SMTP_CASES}


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[ProxyEnv]:
    env = await start_env(tmp_path, demo_upstream, limits={"preauth_idle": 1, "preauth_total": 3})
    yield env
    await env.daemon.stop(grace=1)


def _match_in_order(patterns: tuple[bytes, ...], data: bytes, what: str) -> None:
    pos = 0
    for pattern in patterns:
        found = re.compile(pattern).search(data, pos)
        assert found is not None, f"{what}: no {pattern!r} after offset {pos} in {data[:600]!r}"
        pos = found.end()


async def _run_case(port: int, protocol: str, case: Case) -> None:
    what = f"{protocol} {case.name!r}"
    client = await Raw.open(port)
    try:
        greeting = await client.expect(b"\r\n")
        assert re.match(GREETING[protocol], greeting), (what, greeting)
        for chunk in case.send:
            await client.send(chunk)
        if not case.closes:
            bye, bye_reply = GOODBYE[protocol]
            # Replies may come a little later (a failed login is answered after a delay).
            await client.send(bye)
            data = await client.until_closed(timeout=10)
            _match_in_order((*case.replies, bye_reply), data, what)
        else:
            started = time.monotonic()
            data = await client.until_closed(timeout=10)
            _match_in_order(case.replies, data, what)
            assert time.monotonic() - started < 5, what
    finally:
        client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_hostile_input_gets_defined_replies(env: ProxyEnv, trouble: Trouble,
                                                  protocol: str) -> None:
    for case in CASES[protocol]:
        await _run_case(env.ports[protocol], protocol, case)
    await assert_healthy(env, trouble)


async def test_same_cases_concurrently(env: ProxyEnv, trouble: Trouble) -> None:
    """Every case of every protocol at once, three times over."""
    jobs = [_run_case(env.ports[p], p, case) for p in PROTOCOLS for case in CASES[p]] * 3
    await asyncio.gather(*jobs)
    await assert_healthy(env, trouble)


# --- floods: bounded memory ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["imap", "pop"])
async def test_flood_without_newline_is_cut_off(env: ProxyEnv, trouble: Trouble,
                                                protocol: str) -> None:
    """64 MB with no line end: the proxy closes long before it could have buffered it."""
    client = await Raw.open(env.ports[protocol])
    await client.expect(b"\r\n")
    sent, chunk = 0, b"A" * 65536
    with pytest.raises((ConnectionError, OSError)):
        async with asyncio.timeout(20):
            for _ in range(1024):
                await client.send(chunk)
                sent += len(chunk)
    client.close()
    assert sent < 32 * 1024 * 1024, f"{sent} bytes accepted before the proxy closed"
    await assert_healthy(env, trouble)


@pytest.mark.parametrize("protocol,command,reply",
                         [("imap", b"a NOOP\r\n", b"a OK NOOP completed\r\n"),
                          ("pop", b"NOOP\r\n",
                           b"-ERR NOOP is not allowed before login; log in\r\n")])
async def test_command_flood_from_a_client_that_does_not_read(
        env: ProxyEnv, trouble: Trouble, protocol: str, command: bytes, reply: bytes) -> None:
    """Pipelined commands while never reading the replies: the proxy stops reading (its
    writes back up) instead of queueing replies without bound; all replies arrive in order
    once the client reads. Valid commands keep the connection alive, so the idle timer is
    not what ends it."""
    client = await Raw.open(env.ports[protocol])
    await client.expect(b"\r\n")
    batch = command * 8192
    sent = 0
    try:
        async with asyncio.timeout(3):
            for _ in range(2000):  # ~ 150 MB if nothing pushed back
                await client.send(batch)
                sent += len(batch)
    except TimeoutError:
        pass  # the expected outcome: the proxy stopped reading
    assert sent < 64 * 1024 * 1024, f"the proxy took {sent} bytes without being read"
    # Read a bounded amount: the replies flow again in order.
    got = await client.expect(reply * 1000, timeout=10)
    assert got.startswith(reply) and got.count(reply) >= 1000
    client.reset()
    await assert_healthy(env, trouble)


# --- slowloris: half lines and silence end within the pre-auth timeouts -----------------------


@pytest.mark.parametrize("protocol,opening,bye", [
    ("imap", b"a LOG", rb"\* BYE Idle too long"),
    ("imap", b"a LOGIN {10}\r\n" b"abc", rb"\* BYE Idle too long"),
    ("imap", b"a AUTHENTICATE PLAIN\r\n", rb"\* BYE Idle too long"),
    ("imap", b"", rb"\* BYE Idle too long"),
    ("pop", b"US", rb"-ERR \[SYS/TEMP\] Idle too long"),
    ("pop", b"AUTH PLAIN\r\n", rb"-ERR \[SYS/TEMP\] Idle too long"),
    ("pop", b"", rb"-ERR \[SYS/TEMP\] Idle too long"),
])
async def test_half_line_then_silence(env: ProxyEnv, trouble: Trouble, protocol: str,
                                      opening: bytes, bye: bytes) -> None:
    client = await Raw.open(env.ports[protocol])
    await client.expect(b"\r\n")
    started = time.monotonic()
    await client.send(opening)
    data = await client.until_closed(timeout=5)
    elapsed = time.monotonic() - started
    assert re.search(bye, data), data
    assert 0.8 < elapsed < 3, elapsed  # preauth_idle is 1 s
    assert trouble.events("preauth_timeout", protocol=protocol)
    await assert_healthy(env, trouble)


@pytest.mark.parametrize("protocol", ["imap", "pop"])
async def test_trickle_ends_at_the_total_preauth_limit(env: ProxyEnv, trouble: Trouble,
                                                       protocol: str) -> None:
    """One byte every 0.3 s never trips the idle timer; preauth_total (3 s) ends it."""
    client = await Raw.open(env.ports[protocol])
    await client.expect(b"\r\n")
    started = time.monotonic()
    closed = False
    for _ in range(40):  # 12 s at most
        try:
            await client.send(b"x")
        except (ConnectionError, OSError):
            closed = True
            break
        try:
            async with asyncio.timeout(0.3):
                chunk = await client.reader.read(4096)
            if not chunk:
                closed = True
                break
            client.received += chunk
        except TimeoutError:
            pass
        except ConnectionError:
            closed = True
            break
    elapsed = time.monotonic() - started
    assert closed and elapsed < 5, (closed, elapsed)
    assert b"Idle too long" in client.received
    client.close()
    await assert_healthy(env, trouble)


async def test_many_slow_clients_do_not_block_a_real_one(env: ProxyEnv, trouble: Trouble) -> None:
    baseline = await fd_baseline(env)
    slow = []
    for i in range(150):
        protocol = ("imap", "pop")[i % 2]
        client = await Raw.open(env.ports[protocol])
        await client.send(b"a LOG" if protocol == "imap" else b"US")
        slow.append(client)
    started = time.monotonic()
    await asyncio.to_thread(imap_roundtrip, env.ports["imap"])
    assert time.monotonic() - started < 5
    await asyncio.gather(*(c.until_closed(timeout=5) for c in slow))
    for client in slow:
        client.close()
    await assert_healthy(env, trouble, fd_baseline=baseline)


async def test_smtp_silence_before_auth_ends_within_preauth_idle(env: ProxyEnv) -> None:
    client = await Raw.open(env.ports["smtp"])
    await client.expect(b"\r\n")
    await client.send(b"EHL")
    try:
        await client.until_closed(timeout=4)
    finally:
        client.close()


# --- TLS confusion ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_tls_client_hello_to_a_plaintext_port(env: ProxyEnv, trouble: Trouble,
                                                    protocol: str) -> None:
    import ssl
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await Raw.open(env.ports[protocol], tls=context, timeout=10)
    assert time.monotonic() - started < 5
    await assert_healthy(env, trouble)


async def test_wrong_traffic_on_implicit_tls_ports(tmp_path: Path, demo_upstream: DemoUpstream,
                                                   trouble: Trouble, local_certs: object,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.server import listener as listener_mod
    from tests.hardening.conftest import client_context
    monkeypatch.setattr(listener_mod, "TLS_HANDSHAKE_TIMEOUT", 1.0)  # every listener opens here
    paths = local_certs
    tls = {"tls": "implicit", "cert_file": str(paths.cert_file),  # type: ignore[attr-defined]
           "key_file": str(paths.key_file)}  # type: ignore[attr-defined]
    protocols = PROTOCOLS
    env = await start_env(tmp_path, demo_upstream, protocols=protocols,
                          listener_extra={p: tls for p in protocols},
                          limits={"preauth_idle": 1})
    try:
        for protocol in protocols:
            port = env.ports[protocol]
            # Plaintext commands to a TLS port: no plaintext answer, a close.
            client = await Raw.open(port)
            await client.send(b"a LOGIN alice secret\r\nUSER alice\r\nEHLO x\r\n")
            data = await client.until_closed(timeout=5)
            assert not re.search(rb"(OK|ERR|\d{3} )", data), (protocol, data)
            client.close()
            # Silence on a TLS port: the handshake times out.
            client = await Raw.open(port)
            started = time.monotonic()
            try:
                await client.until_closed(timeout=5)
            except TimeoutError:
                raise AssertionError(f"{protocol}: a silent client outlived the TLS handshake "
                                     "timeout") from None
            assert time.monotonic() - started < 4
            client.close()
            # A TLS client that resets mid-handshake.
            client = await Raw.open(port)
            await client.send(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
            client.reset()
        # A real client over TLS still logs in.
        import imaplib
        context = client_context(paths)  # type: ignore[arg-type]

        def tls_login() -> None:
            client = imaplib.IMAP4_SSL("127.0.0.1", env.ports["imap"], ssl_context=context,
                                       timeout=30)
            client.literal = PASSWORD.encode()  # type: ignore[attr-defined]
            typ, _ = client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]
            assert typ == "OK"
            client.shutdown()
        await asyncio.to_thread(tls_login)
        await wait_for(lambda: open_sessions(env.daemon) == 0, 10, "sessions to end")
        trouble.check()
    finally:
        await env.daemon.stop(grace=1)


# --- abrupt resets at every step ------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_reset_before_and_during_the_first_line(env: ProxyEnv, trouble: Trouble,
                                                      protocol: str) -> None:
    baseline = await fd_baseline(env)
    for i in range(30):
        client = await Raw.open(env.ports[protocol])
        if i % 3 == 1:
            await client.expect(b"\r\n")
        elif i % 3 == 2:
            await client.expect(b"\r\n")
            await client.send(b"a LOGIN alice" if protocol == "imap" else b"USER al")
        client.reset()
    await assert_healthy(env, trouble, fd_baseline=baseline)


def _login_bytes(protocol: str) -> bytes:
    if protocol == "imap":
        return b"a LOGIN " + USER.encode() + b" {%d+}\r\n" % len(PASSWORD.encode()) \
            + PASSWORD.encode() + b"\r\n"
    if protocol == "pop":
        return b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n"
    return b"EHLO x\r\nAUTH PLAIN " + b64(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()) \
        + b"\r\n"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_reset_while_the_login_is_decided(env: ProxyEnv, trouble: Trouble,
                                                protocol: str) -> None:
    """RST right after the login command, at delays covering unlock, token, upstream login."""
    for delay in (0, 0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4) * 2:
        client = await Raw.open(env.ports[protocol])
        await client.expect(b"\r\n")
        await client.send(_login_bytes(protocol))
        if delay:
            await asyncio.sleep(delay)  # the point is where in the login the reset lands
        client.reset()
    await assert_healthy(env, trouble)


async def test_reset_while_the_token_refresh_hangs(tmp_path: Path, demo_upstream_factory: object,
                                                   trouble: Trouble) -> None:
    """The client leaves while the shared refresh hangs: the refresh is not cancelled with it,
    the session ends when the verdict comes, and the next login works."""
    upstream = demo_upstream_factory(access_token_lifetime=60)  # type: ignore[operator]
    env = await start_env(tmp_path, upstream, protocols=("imap", "pop"), provider_timeout=2)
    try:
        upstream.configure(token_endpoint_mode="hang")
        clients = []
        for protocol in ("imap", "pop", "imap"):
            client = await Raw.open(env.ports[protocol])
            await client.expect(b"\r\n")
            await client.send(_login_bytes(protocol))
            clients.append(client)
        await wait_for(lambda: any(s.flights for s in env.daemon.tokens._states.values()), 10,
                       "a token request in flight")
        for client in clients:
            client.reset()
        await wait_for(lambda: open_sessions(env.daemon) == 0, 10, "sessions to end")
        upstream.configure(token_endpoint_mode="ok")
        await assert_healthy(env, trouble)
    finally:
        await env.daemon.stop(grace=1)


@pytest.mark.parametrize("protocol", ["imap", "pop"])
async def test_reset_mid_relay(env: ProxyEnv, trouble: Trouble, protocol: str) -> None:
    baseline = await fd_baseline(env)
    message = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 40000  # 3.2 MB
    env.upstream.deliver(USER, message)
    for after in (0, 1, 1000, 100_000):
        client = await Raw.open(env.ports[protocol])
        await client.expect(b"\r\n")
        await client.send(_login_bytes(protocol))
        if protocol == "imap":
            await client.expect(b"a OK")
            await client.send(b"b SELECT INBOX\r\nc FETCH 1 BODY[]\r\n")
        else:
            await client.expect(b"+OK Logged in")
            await client.send(b"RETR 1\r\n")
        got = 0
        async with asyncio.timeout(10):
            while got < after:
                chunk = await client.reader.read(65536)
                assert chunk
                got += len(chunk)
        client.reset()
    await assert_healthy(env, trouble, fd_baseline=baseline)
