"""Socket-level fuzz against a live proxy: protocol-shaped and random bytes, random splits,
random pauses, random endings (FIN, RST, mid-send RST, silence). Seeded, so a failure replays
with the same ``FUZZ_SEED``; bounded in connections, bytes, time and concurrency.

Afterwards the daemon must be healthy: a real client logs in, no session task is left, no
descriptor leaked, and nothing escaped a connection.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.demo.process import DemoUpstream
from tests.hardening.conftest import (
    PROTOCOLS,
    Raw,
    Trouble,
    assert_healthy,
    fd_baseline,
    start_env,
)
from tests.proxyenv import PASSWORD, USER, ProxyEnv

SEED = int(os.environ.get("FUZZ_SEED", "20240601"))
CONNECTIONS = 200
CONCURRENCY = 25


def _plain(user: str, password: str) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


PASSWORD_LITERAL = b"{%d+}\r\n" % len(PASSWORD.encode()) + PASSWORD.encode()
SHAPES = {
    "imap": [b"a CAPABILITY\r\n", b"b NOOP\r\n", b"c LOGOUT\r\n", b"d STARTTLS\r\n",
             b"e ID NIL\r\n", b'f ID ("name" "fuzz")\r\n', b"g LOGIN bob secret\r\n",
             b"h LOGIN " + USER.encode() + b" " + PASSWORD_LITERAL + b"\r\n",
             b"i AUTHENTICATE PLAIN " + _plain(USER, PASSWORD) + b"\r\n",
             b"j AUTHENTICATE PLAIN\r\n", b"k LOGIN {5}\r\n", b"l LOGIN {5+}\r\nabcde x\r\n",
             b"m SELECT INBOX\r\n", b"n FETCH 1:* (FLAGS)\r\n", b"*\r\n", b"{99999999}\r\n",
             b'"unterminated\r\n', b"\r\n", b"o LOGIN \"a\\\"b\" \"c\\\\d\"\r\n"],
    "pop": [b"CAPA\r\n", b"USER bob\r\n", b"PASS secret\r\n", b"USER " + USER.encode() + b"\r\n",
            b"PASS " + PASSWORD.encode() + b"\r\n", b"AUTH\r\n", b"AUTH PLAIN\r\n",
            b"AUTH PLAIN " + _plain(USER, PASSWORD) + b"\r\n", b"STLS\r\n", b"STAT\r\n",
            b"LIST\r\n", b"RETR 1\r\n", b"QUIT\r\n", b"NOOP\r\n", b"*\r\n", b"\r\n"],
    "smtp": [b"EHLO fuzz\r\n", b"HELO fuzz\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n",
             b"AUTH PLAIN " + _plain(USER, "wrong") + b"\r\n", b"MAIL FROM:<a@b>\r\n",
             b"RCPT TO:<c@d>\r\n", b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"STARTTLS\r\n",
             b"QUIT\r\n", b".\r\n", b"\r\n",
             # logged in, then malformed and well-formed envelopes (the proxy's own parser)
             b"AUTH PLAIN " + _plain(USER, PASSWORD) + b"\r\n",
             b"MAIL FROM:<" + USER.encode() + b"> SIZE=10 BODY=8BITMIME\r\n",
             b"RCPT TO:<bob@[IPv6:2001:db8::1]>\r\n", b"MAIL FROM:<\r\n", b'MAIL FROM:<"\r\n',
             b"MAIL FROM:<a@[1.2.3\r\n", b"RCPT TO:<@\r\n", b"MAIL FROM:<a@b> X=\r\n",
             b"VRFY \xff\r\n", b"HELP\r\n"],
}


def _payload(rng: random.Random, protocol: str) -> bytes:
    parts: list[bytes] = []
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        if roll < 0.55:
            parts.append(rng.choice(SHAPES[protocol]))
        elif roll < 0.75:
            parts.append(rng.randbytes(rng.randint(1, 300)))
        elif roll < 0.85:  # a shaped command with a random byte flipped
            shaped = bytearray(rng.choice(SHAPES[protocol]))
            shaped[rng.randrange(len(shaped))] = rng.randrange(256)
            parts.append(bytes(shaped))
        elif roll < 0.95:
            parts.append(bytes([rng.choice(b"\x00\r\n\xff{}\"\\ +*")]) * rng.randint(1, 64))
        else:
            parts.append(b"A" * rng.randint(2000, 20000))  # near and past the line caps
    return b"".join(parts)


async def _one(rng: random.Random, env: ProxyEnv) -> None:
    protocol = rng.choice(PROTOCOLS)
    payload = _payload(rng, protocol)
    ending = rng.choice(["fin", "rst", "rst_mid", "read_then_fin", "silence"])
    client = await Raw.open(env.ports[protocol])

    async def drain_replies() -> None:
        try:
            await client.until_closed(timeout=8, limit=8 << 20)
        except (TimeoutError, AssertionError, OSError):
            pass

    reader = asyncio.create_task(drain_replies())
    try:
        pos = 0
        stop_at = rng.randrange(len(payload) + 1) if ending == "rst_mid" else len(payload)
        while pos < stop_at:
            size = rng.choice([1, 2, 7, 64, 1024, len(payload)])
            await client.send(payload[pos:min(pos + size, stop_at)])
            pos += size
            if rng.random() < 0.2:
                await asyncio.sleep(rng.random() * 0.01)
        if ending in ("rst", "rst_mid"):
            client.reset()
        elif ending == "fin":
            client.writer.write_eof()
        elif ending == "read_then_fin":
            await asyncio.sleep(0.05)
            client.writer.write_eof()
        # "silence": the pre-login idle timer (1 s) or the relay's peer closes it
    except (ConnectionError, OSError):
        pass  # the proxy hung up on us first: fine
    finally:
        try:
            async with asyncio.timeout(10):
                await reader
        finally:
            client.close()


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[ProxyEnv]:
    # Fuzzed logins fail often: no lockout here (throttling has its own tests).
    env = await start_env(tmp_path, demo_upstream, limits={
        "preauth_idle": 1, "preauth_total": 4, "lockout_after": 10_000,
        "failure_delay": 0.01, "max_failure_delay": 0.02})
    yield env
    await env.daemon.stop(grace=1)


async def test_socket_fuzz(env: ProxyEnv, trouble: Trouble) -> None:
    baseline = await fd_baseline(env)
    rng = random.Random(SEED)
    seeds = [rng.getrandbits(64) for _ in range(CONNECTIONS)]
    limit = asyncio.Semaphore(CONCURRENCY)

    async def run(seed: int) -> None:
        async with limit:
            await _one(random.Random(seed), env)

    async with asyncio.timeout(150):
        results = await asyncio.gather(*(run(s) for s in seeds), return_exceptions=True)
    failed = [(seeds[i], r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [], f"FUZZ_SEED={SEED}: {failed[:3]}"
    await assert_healthy(env, trouble, fd_baseline=baseline, timeout=20)
