"""Soak with faults: hundreds of real client sessions (IMAP fetch/append loops, POP RETR, SMTP
submissions) through the proxy while faults are injected at random — client resets, access
tokens that live 30 s (so refreshes happen during the run), the token endpoint hanging or
answering 503 for short spells, upstream connections reset mid-relay.

Afterwards: every SMTP message the client saw acknowledged with 250 is in the upstream mailbox
exactly once; every session failure was a defined reply or a reset we caused; the token file
decrypts; no session task and no descriptor leaked; nothing escaped a connection.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import email
import functools
import imaplib
import os
import poplib
import random
import smtplib
import socket
import struct
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from proxy.secret import Secret
from proxy.server import session as session_mod
from tests.hardening.conftest import (
    Trouble,
    assert_healthy,
    fd_baseline,
    open_sessions,
    start_env,
    wait_for,
)
from tests.proxyenv import PASSWORD, USER

SEED = int(os.environ.get("SOAK_SEED", "7"))
CONCURRENT = 150  # client threads, each running one session after another
DURATION = 45.0  # seconds of sessions (several access-token lifetimes)
MAX_SESSIONS = 8000
BUDGET = 150.0  # seconds for the whole test (it must end within 3 minutes on 2 cores)

pytestmark = pytest.mark.slow

# Outcomes that are defined answers to injected faults (anything else fails the test).
DEFINED = ("[UNAVAILABLE]", "[SYS/TEMP]", "454", "421")


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.acknowledged: list[str] = []  # Message-IDs the client saw 250 for
        self.other: list[str] = []
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1


def _message(kind: str) -> tuple[str, bytes]:
    mid = f"<{kind}-{uuid.uuid4().hex}@soak.example>"
    body = (f"From: soak@contoso.example\r\nTo: {USER}\r\nSubject: soak {kind}\r\n"
            f"Message-ID: {mid}\r\n\r\n" + "line of text\r\n" * 40).encode()
    return mid, body


def _imap(port: int, rng: random.Random) -> None:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        client.literal = PASSWORD.encode()  # type: ignore[attr-defined]
        typ, data = client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]
        if typ != "OK":
            raise imaplib.IMAP4.error(data[-1].decode("utf-8", "replace"))
        client.state = "AUTH"
        for _ in range(3):
            time.sleep(rng.random() * 0.3)  # a client that stays a while: more at once
            typ, data = client.select("INBOX")
            assert typ == "OK"
            count = int(data[0])
            if count:
                n = rng.randint(1, count)
                assert client.fetch(str(n), "(BODY.PEEK[])")[0] == "OK"
            _, body = _message("imap")
            assert client.append("INBOX", None, None, body)[0] == "OK"
        client.logout()
    except BaseException:
        client.shutdown()
        raise


def _pop(port: int, rng: random.Random) -> None:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        for _ in range(2):
            if count:
                client.retr(rng.randint(1, count))
        client.quit()
    except BaseException:
        client.close()
        raise


def _smtp(port: int, tally: Tally) -> None:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        client.ehlo("soak")
        blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        code, text = client.docmd("AUTH", "PLAIN " + blob)
        if code != 235:
            raise smtplib.SMTPAuthenticationError(code, text)
        for _ in range(2):
            mid, body = _message("smtp")
            client.sendmail(USER, [USER], body)  # raises unless 250
            with tally.lock:
                tally.acknowledged.append(mid)
        client.quit()
    except BaseException:
        client.close()
        raise


def _reset_client(port: int, rng: random.Random, protocol: str) -> None:
    """A client that logs in (or starts to) and then resets."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.recv(4096)
        if protocol == "imap":
            password = PASSWORD.encode()
            sock.sendall(b"a LOGIN " + USER.encode() + b" {%d+}\r\n" % len(password) + password
                         + b"\r\nb SELECT INBOX\r\nc FETCH 1:* (BODY.PEEK[])\r\n")
        else:
            sock.sendall(b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode()
                         + b"\r\nRETR 1\r\n")
        time.sleep(rng.random() * 0.2)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _classify(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):  # an OSError subclass: first
        return "refused (defined reply)" if exc.smtp_code in (421, 454) else "other"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "other"
    text = str(exc)
    if any(code in text for code in DEFINED):
        return "refused (defined reply)"
    if isinstance(exc, OSError | EOFError | imaplib.IMAP4.abort | smtplib.SMTPServerDisconnected) \
            or (isinstance(exc, poplib.error_proto)
                and exc.args[:1] in (("-ERR EOF",), (b"-ERR EOF",))):
        return "connection ended (injected reset)"
    if isinstance(exc, poplib.error_proto) and b"[SYS/TEMP]" in (exc.args[0] if exc.args and
                                                                 isinstance(exc.args[0], bytes)
                                                                 else b""):
        return "refused (defined reply)"
    return "other"


async def test_soak_with_faults(tmp_path: Path, demo_upstream_factory: Any, trouble: Trouble,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    upstream = demo_upstream_factory(access_token_lifetime=30)
    protocols = ("imap", "pop", "smtp")
    relaying: weakref.WeakSet[session_mod.Session] = weakref.WeakSet()
    real_relay = session_mod.Session.relay

    async def tracked_relay(self: session_mod.Session, client_bytes: bytes) -> None:
        relaying.add(self)
        await real_relay(self, client_bytes)
    monkeypatch.setattr(session_mod.Session, "relay", tracked_relay)

    env = await start_env(tmp_path, upstream, protocols=protocols, provider_timeout=2,
                          limits={"lockout_after": 10_000})
    try:
        for i in range(20):  # a mailbox to read from
            upstream.deliver(USER, _message(f"seed{i}")[1])
        baseline = await fd_baseline(env)
        rng = random.Random(SEED)
        tally = Tally()
        faults: collections.Counter[str] = collections.Counter()
        done = threading.Event()

        def session(i: int, seed: int) -> None:
            r = random.Random(seed)
            weights = [4, 3, 3, 1]
            kind = r.choices(["imap", "pop", "smtp", "reset"], weights)[0]
            try:
                if kind == "imap":
                    _imap(env.ports["imap"], r)
                elif kind == "pop":
                    _pop(env.ports["pop"], r)
                elif kind == "smtp":
                    _smtp(env.ports["smtp"], tally)
                else:
                    p = r.choice(["imap", "pop"])
                    _reset_client(env.ports[p], r, p)
                tally.add(f"{kind} ok")
            except Exception as exc:  # noqa: BLE001 - classified below
                what = _classify(exc)
                tally.add(f"{kind} {what}")
                with tally.lock:
                    examples = tally.examples[f"{kind} {what}"]
                    if len(examples) < 3:
                        examples.append(f"{type(exc).__name__}: {exc}"[:200])
                if what == "other":
                    with tally.lock:
                        tally.other.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])

        async def inject() -> None:
            """Random faults while the sessions run; always ends with the platform healthy."""
            loop = asyncio.get_running_loop()
            try:
                while not done.is_set():
                    await asyncio.sleep(rng.uniform(0.5, 1.5))
                    fault = rng.choices(["hang", "503", "upstream_reset", "none"], [3, 1, 4, 2])[0]
                    if fault == "503" and (faults["503"] or time.monotonic() < late):
                        # One 503 spell, late in the run: MSAL replays a 5xx for 60 s to every
                        # refresh of that account and scope (its service protection).
                        fault = "hang"
                    faults[fault] += 1
                    if fault in ("hang", "503"):
                        await loop.run_in_executor(None, functools.partial(
                            upstream.configure, token_endpoint_mode=fault))
                        await asyncio.sleep(rng.uniform(0.3, 1.0))
                        await loop.run_in_executor(None, lambda: upstream.configure(
                            token_endpoint_mode="ok"))
                    elif fault == "upstream_reset":
                        live = [s for s in relaying if s.upstream is not None
                                and not s.upstream.is_closed]
                        if live:
                            rng.choice(live).upstream.abort()  # type: ignore[union-attr]
            finally:
                await loop.run_in_executor(None, lambda: upstream.configure(
                    token_endpoint_mode="ok"))

        seeds = [rng.getrandbits(64) for _ in range(MAX_SESSIONS)]
        stop_at = time.monotonic() + DURATION
        late = time.monotonic() + DURATION * 0.8
        injector = asyncio.create_task(inject())
        counter = iter(range(MAX_SESSIONS))
        counter_lock = threading.Lock()
        peak = [0]

        def worker() -> None:
            while time.monotonic() < stop_at:
                with counter_lock:
                    i = next(counter, None)
                if i is None:
                    return
                session(i, seeds[i])

        def run_all() -> None:
            with ThreadPoolExecutor(CONCURRENT) as pool:
                for future in [pool.submit(worker) for _ in range(CONCURRENT)]:
                    future.result()

        async def watch_peak() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], open_sessions(env.daemon))
                await asyncio.sleep(0.1)
        watcher = asyncio.create_task(watch_peak())
        try:
            async with asyncio.timeout(BUDGET - (time.monotonic() - started) - 20):
                await asyncio.to_thread(run_all)
        finally:
            done.set()
            await injector
            await watcher
        ran = time.monotonic() - started
        sessions = sum(tally.counts.values())

        # --- the verdict -------------------------------------------------------------------
        assert tally.other == [], tally.other[:5]
        for kind in protocols:
            assert tally.counts[f"{kind} ok"] > 0, (tally.counts, dict(tally.examples))
        await wait_for(lambda: open_sessions(env.daemon) == 0, 20, "every session to end")
        ids = collections.Counter()
        for raw in await asyncio.to_thread(upstream.mailbox, USER):
            mid = email.message_from_bytes(raw).get("Message-ID", "")
            if mid.startswith("<smtp-"):
                ids[mid] += 1
        missing = [m for m in tally.acknowledged if ids[m] != 1]
        assert missing == [], (len(missing), [(m, ids[m]) for m in missing[:5]])
        unlocked = env.store.unlock(USER, Secret(PASSWORD))
        assert unlocked.payload and unlocked.meta.refresh_token_present
        env.daemon.tokens.reconfigure(env.config)  # forget MSAL's replayed 503, if any
        await assert_healthy(env, trouble, fd_baseline=baseline, timeout=20)
        refreshes = len(trouble.events("token_refresh", result="ok"))
        print(f"\nsoak: {sessions} sessions ({peak[0]} open at peak) in {ran:.1f}s; "
              f"outcomes {dict(tally.counts)}; SMTP messages acknowledged "
              f"{len(tally.acknowledged)}; token refreshes ok "
              f"{refreshes}; faults {dict(faults)}")
        assert refreshes and peak[0] >= 100
    finally:
        await env.daemon.stop(grace=1)
