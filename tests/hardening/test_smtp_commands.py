"""Malformed SMTP commands from a real client (smtplib on a real socket), before and after AUTH,
through the proxy to the demo upstream.

Each gets a 5xx with an enhanced status code and a sentence, the session goes on (the next NOOP
is the upstream's 250, and a real message goes through at the end), and the upstream never sees
the malformed command (``UpstreamRecorder``: nothing is sent upstream while it is answered).
A generated corpus (every truncation, deletion and hostile-byte insertion of well-formed
commands) gets defined replies on one connection, and whatever of it reached the upstream is
well-formed.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.demo.process import DemoUpstream
from tests.hardening.conftest import Trouble, assert_healthy, start_env
from tests.proxyenv import USER, ProxyEnv
from tests.server.smtp_commands import CLOSING, Client, UpstreamRecorder, check_reply
from tests.server.smtp_util import DEVICE_PASSWORD, RCPT, add_device_password, message

ME = USER.encode()
TO = RCPT.encode()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# (bytes sent, the (code, enhanced status) of each reply, in order)
Case = tuple[bytes, list[tuple[int, str]]]

BEFORE_AUTH: list[Case] = [
    (b"AUTH\r\n", [(501, "5.5.4")]),
    (b"AUTH PLAIN a b\r\n", [(501, "5.5.4")]),
    (b"AUTH CRAM-MD5\r\n", [(504, "5.5.4")]),
    (b"AUTH PLAIN !!!!\r\n", [(501, "5.5.2")]),
    (b"AUTH PLAIN QUJD=\r\n", [(501, "5.5.2")]),
    (b"AUTH PLAIN " + b64(b"alice") + b"\r\n", [(501, "5.5.2")]),
    (b"AUTH PLAIN " + b"Q" * 600 + b"\r\n", [(500, "5.5.6")]),
    (b"AUTH LOGIN\r\n%%%\r\n", [(334, ""), (501, "5.5.2")]),
    (b"AUTH PLAIN\r\n*\r\n", [(334, ""), (501, "5.7.0")]),
    (b"AUTH PLAIN\r\n" + b"Q" * 13000 + b"\r\n", [(334, ""), (500, "5.5.6")]),
    (b"AUTH PLAIN\r\n" + b"Q" * 70000 + b"\r\n", [(334, ""), (500, "5.5.6")]),
    (b"AUTH PLAIN\r\nQUJD\n", [(334, ""), (501, "5.5.2")]),
    (b"AUTH PLAIN\r\nQU\x00JD\r\n", [(334, ""), (501, "5.5.2")]),
    (b"AUTH PLAIN " + b64(b"\0" + ME + b"\0x") + b"\x00\r\n", [(500, "5.5.2")]),
    (b"MAIL FROM:<" + ME + b"\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<" + ME + b">\r\n", [(530, "5.7.0")]),
]

AFTER_AUTH: list[Case] = [
    # the paths seen crashing (421) or repaired before
    (b"MAIL FROM:<\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<@\r\n", [(501, "5.1.7")]),
    (b'MAIL FROM:<"\r\n', [(501, "5.1.7")]),
    (b"MAIL FROM:<a@[1.2.3\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<a\r\n", [(501, "5.1.7")]),
    # paths
    (b"MAIL\r\n", [(501, "5.5.4")]),
    (b"MAIL FROM:\r\n", [(501, "5.5.4")]),
    (b"MAIL TO:<" + ME + b">\r\n", [(501, "5.5.4")]),
    (b"MAIL FROM:" + ME + b"\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<" + ME + b"\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<<" + ME + b">>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<alice>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<@contoso.example>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<alice@>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<al..ice@contoso.example>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<al ice@contoso.example>\r\n", [(501, "5.1.7")]),
    (b'MAIL FROM:<"alice@contoso.example>\r\n', [(501, "5.1.7")]),
    (b"MAIL FROM:<alice@-contoso.example>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<alice@contoso..example>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<alice@[1.2.3.4.5]>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<alice@[256.1.1.1]>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<alice@[1.2.3.4>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<alice@[IPv6:::g]>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<alice@[x-tag:1]>\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<@relay:>\r\n", [(501, "5.1.7")]),
    # parameters
    (b"MAIL FROM:<" + ME + b">SIZE=10\r\n", [(501, "5.1.7")]),
    (b"MAIL FROM:<" + ME + b"> SIZE=ten\r\n", [(501, "5.5.4")]),
    (b"MAIL FROM:<" + ME + b"> SIZE=\r\n", [(501, "5.5.4")]),
    (b"MAIL FROM:<" + ME + b"> SIZE=999999999999\r\n", [(552, "5.3.4")]),
    (b"MAIL FROM:<" + ME + b"> SIZE=1 SIZE=1\r\n", [(501, "5.5.4")]),
    (b"MAIL FROM:<" + ME + b"> BODY=BINARYMIME\r\n", [(501, "5.5.4")]),
    (b"MAIL FROM:<" + ME + b"> SMTPUTF8=yes\r\n", [(501, "5.5.4")]),
    (b"MAIL FROM:<" + ME + b"> FOO=BAR\r\n", [(555, "5.5.4")]),
    (b"MAIL FROM:<" + ME + b"> =\r\n", [(501, "5.5.4")]),
    (b"MAIL FROM:<" + ME + b"> (comment)\r\n", [(501, "5.5.4")]),
    # bytes that are never part of a command
    (b"MAIL FROM:<al\x00ice@contoso.example>\r\n", [(500, "5.5.2")]),
    (b"MAIL FROM:<" + ME + b">\x7f\r\n", [(500, "5.5.2")]),
    (b"MAIL FROM:<" + ME + b">\tSIZE=1\r\n", [(500, "5.5.2")]),
    (b"MAIL FROM:<\xff@contoso.example>\r\n", [(500, "5.5.2")]),
    (b"MAIL FROM:<" + ME + b">\rRCPT TO:<" + TO + b">\r\n", [(500, "5.5.2")]),
    (b"MAIL FROM:<" + ME + b">\r\r\n", [(500, "5.5.2")]),
    (b"MAIL FROM:<" + ME + b">\nRCPT TO:<" + TO + b">\r\n", [(500, "5.5.2"), (503, "5.5.1")]),
    (b"NOOP\x00\r\n", [(500, "5.5.2")]),
    (b"\x00\x00\r\n", [(500, "5.5.2")]),
    (b"\r\n", [(500, "5.5.2")]),
    (b"   \r\n", [(500, "5.5.2")]),
    (b"\xff\xfe\r\n", [(500, "5.5.2")]),
    # over-long lines: the command cap, and past the reader's 64 KiB
    (b"NOOP " + b"x" * 600 + b"\r\n", [(500, "5.5.2")]),
    (b"MAIL FROM:<" + b"a" * 70000 + b"@contoso.example>\r\n", [(500, "5.5.2")]),
    # other commands
    (b"FROB\r\n", [(500, "5.5.2")]),
    (b"EHLO\r\n", [(501, "5.5.4")]),
    (b"HELO\r\n", [(501, "5.5.4")]),
    (b"RSET x\r\n", [(501, "5.5.4")]),
    (b"QUIT now\r\n", [(501, "5.5.4")]),
    (b"DATA\r\n", [(503, "5.5.1")]),
    (b"VRFY\r\n", [(501, "5.5.4")]),
    (b"EXPN staff\r\n", [(502, "5.5.1")]),
    (b"HELP FROB\r\n", [(501, "5.5.4")]),
    (b"STARTTLS\r\n", [(502, "5.5.1")]),
    (b"AUTH PLAIN " + b64(b"\0" + ME + b"\0x") + b"\r\n", [(503, "5.5.1")]),
    (b"RCPT TO:<" + TO + b">\r\n", [(503, "5.5.1")]),
]

IN_TRANSACTION: list[Case] = [  # after a MAIL the upstream accepted
    (b"MAIL FROM:<" + ME + b">\r\n", [(503, "5.5.1")]),
    (b"RCPT TO:<>\r\n", [(501, "5.1.3")]),
    (b"RCPT TO:<bob\r\n", [(501, "5.1.3")]),
    (b"RCPT TO:bob@contoso.example\r\n", [(501, "5.1.3")]),
    (b"RCPT TO:<bob@[1.2.3]>\r\n", [(501, "5.1.3")]),
    (b"RCPT TO:<" + TO + b"> NOTIFY=NEVER\r\n", [(555, "5.5.4")]),
    (b"RCPT TO:<" + TO + b"> SIZE=\r\n", [(501, "5.5.4")]),
    (b"RCPT FROM:<" + TO + b">\r\n", [(501, "5.5.4")]),
    (b"DATA now\r\n", [(503, "5.5.1")]),
]


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[ProxyEnv]:
    env = await start_env(tmp_path, demo_upstream)
    add_device_password(env)
    yield env
    await env.daemon.stop(grace=1)


def _run_cases(conn: Client, cases: list[Case], upstream: UpstreamRecorder) -> None:
    for data, expected in cases:
        sent_before = len(upstream.lines)
        replies = conn.send(data, len(expected))
        assert [(code, text.split(b" ", 1)[0].decode() if code != 334 else "")
                for code, text in replies] == expected, (data[:80], replies)
        for code, text in replies:
            check_reply(data[:80], code, text)
        assert upstream.lines[sent_before:] == [], (data[:80], "reached the upstream")
        assert conn.get().noop() == (250, b"2.0.0 OK")  # the upstream's: the session goes on


def _hostile_commands(port: int, upstream: UpstreamRecorder, mailbox: DemoUpstream) -> None:
    conn = Client(port, login=False)
    try:
        _run_cases(conn, BEFORE_AUTH, upstream)
        conn.get().login(USER, DEVICE_PASSWORD)
        _run_cases(conn, AFTER_AUTH, upstream)
        assert conn.get().mail(USER) == (250, b"2.1.0 Sender OK")
        _run_cases(conn, IN_TRANSACTION, upstream)
        assert conn.get().rset()[0] == 250
        body = message("after the hostile commands")
        assert conn.get().sendmail(USER, [RCPT], body) == {}  # a real message goes through
    finally:
        conn.drop()
    assert mailbox.mailbox(RCPT) == [body]


async def test_malformed_commands_get_5xx_with_enhanced_codes_and_the_session_goes_on(
        env: ProxyEnv, trouble: Trouble, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = UpstreamRecorder(monkeypatch)
    await asyncio.to_thread(_hostile_commands, env.ports["smtp"], upstream, env.upstream)
    upstream.assert_well_formed()
    await assert_healthy(env, trouble)


# --- a generated corpus ----------------------------------------------------------------------

HOSTILE = [b"\x00", b"\r", b"\n", b"\x7f", b"\xff", b"\t", b" ", b'"', b"<", b">", b"@", b"[",
           b"]", b":", b"\\", b"=", b"\xc3\xa9"]
BASES = [b"MAIL FROM:<" + ME + b"> SIZE=100 BODY=8BITMIME",
         b"MAIL FROM:<" + ME + b">",
         b"RCPT TO:<" + TO + b">",
         b"RCPT TO:<bob@[192.0.2.1]>",
         b'RCPT TO:<"b\\"ob"@contoso.example>']


def corpus(seed: int = 20240601) -> list[bytes]:
    """Every truncation and every one-byte deletion of each base command, and each hostile
    byte inserted at eight seeded positions (each line without its CR LF)."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    for base in BASES:
        lines += [base[:i] for i in range(1, len(base))]
        lines += [base[:i] + base[i + 1:] for i in range(len(base))]
        for byte in HOSTILE:
            for i in rng.sample(range(len(base) + 1), 8):
                lines.append(base[:i] + byte + base[i:])
    return lines


def _corpus_replies(port: int) -> int:
    conn = Client(port)
    sent = 0
    try:
        for line in corpus():
            if line.startswith(b"RCPT"):
                assert conn.get().mail(USER)[0] == 250
            data = line + b"\r\n"
            for code, text in conn.send(data, data.count(b"\n")):
                check_reply(line, code, text)
                if code in CLOSING:  # the fifth unknown command (a line cut by a LF)
                    conn.drop()
                    break
            assert conn.get().rset()[0] == 250  # alive, and the next line starts afresh
            sent += 1
    finally:
        conn.drop()
    return sent


async def test_generated_corpus_gets_defined_replies_and_nothing_malformed_goes_upstream(
        env: ProxyEnv, trouble: Trouble, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = UpstreamRecorder(monkeypatch)
    sent = await asyncio.to_thread(_corpus_replies, env.ports["smtp"])
    assert sent == len(corpus()) > 1000
    upstream.assert_well_formed()
    assert sum(line.startswith(b"MAIL FROM:") for line in upstream.lines) > len(BASES)
    await assert_healthy(env, trouble)
