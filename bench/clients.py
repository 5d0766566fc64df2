"""The clients the bench drives: stdlib (imaplib, poplib, smtplib) for throughput, and a
minimal asyncio IMAP client on raw sockets for thousands of sessions at once.

Every contestant gets the same client code; only how it logs in differs:

- ``direct``: TLS to the fake Microsoft 365 with ``AUTHENTICATE XOAUTH2`` and a token minted
  by the fake Entra ID (``issue_token``), as a mail client with OAuth support would do;
- ``xoauth2-proxy`` and ``email-oauth2-proxy``: plain loopback TCP, ``LOGIN user password``.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import poplib
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import harness


@dataclass(frozen=True)
class Target:
    """Where a client connects and how it logs in."""

    name: str  # "direct", "xoauth2-proxy", "email-oauth2-proxy"
    host: str
    ports: dict[str, int]  # imap, pop, smtp
    user: str
    password: str | None = None  # proxies: the local password
    token: Callable[[str], str] | None = None  # direct: protocol -> access token
    ca_file: str | None = None  # direct: the demo CA

    @property
    def direct(self) -> bool:
        return self.token is not None

    def tls(self) -> ssl.SSLContext:
        assert self.ca_file is not None
        return ssl.create_default_context(cafile=self.ca_file)

    def xoauth2(self, protocol: str) -> bytes:
        assert self.token is not None
        return f"user={self.user}\x01auth=Bearer {self.token(protocol)}\x01\x01".encode()


def nodelay(sock: socket.socket) -> None:
    """Every client, for every contestant, disables Nagle: otherwise smtplib's and poplib's
    small writes meet delayed ACKs and the client, not the path, sets the pace."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- IMAP (imaplib) ------------------------------------------------------------------------------


def imap_connect(target: Target, timeout: float = 120) -> imaplib.IMAP4:
    if target.direct:
        client: imaplib.IMAP4 = imaplib.IMAP4_SSL(target.host, target.ports["imap"],
                                                  ssl_context=target.tls(), timeout=timeout)
        blob = target.xoauth2("imap")
        nodelay(client.sock)
        typ, data = client.authenticate("XOAUTH2", lambda _: blob)
    else:
        client = imaplib.IMAP4(target.host, target.ports["imap"], timeout=timeout)
        nodelay(client.sock)
        assert target.password is not None
        typ, data = client.login(target.user, target.password)
    if typ != "OK":
        raise RuntimeError(f"{target.name}: IMAP login failed: {data!r}")
    return client


def imap_fetch_all(target: Target, count: int, batch: int = 10,
                   on_chunk: Callable[[int], None] | None = None,
                   budget: float | None = None) -> tuple[int, float]:
    """Log in, EXAMINE INBOX, FETCH BODY.PEEK[] of messages 1..count; (bytes, seconds).

    The time runs from the first FETCH to the last tagged OK (login excluded). ``budget``:
    stop after that many seconds (and per socket read), returning what arrived by then — a
    contestant that stalls gets its real, tiny rate instead of holding up the whole run."""
    client = imap_connect(target, timeout=budget or 120)
    if budget:
        batch = 1
    try:
        typ, data = client.select("INBOX", readonly=True)
        if typ != "OK" or int(data[0]) < count:
            raise RuntimeError(f"{target.name}: INBOX has {data!r}, need {count}")
        total = 0
        started = time.perf_counter()
        for first in range(1, count + 1, batch):
            if budget and time.perf_counter() - started > budget:
                break
            last = min(count, first + batch - 1)
            try:
                typ, data = client.fetch(f"{first}:{last}", "(BODY.PEEK[])")
            except TimeoutError:
                if not budget:
                    raise
                break  # stalled: the rate so far is the answer
            if typ != "OK":
                raise RuntimeError(f"{target.name}: FETCH failed: {data!r}")
            got = sum(len(item[1]) for item in data if isinstance(item, tuple))
            total += got
            if on_chunk is not None:
                on_chunk(got)
        elapsed = time.perf_counter() - started
        client.logout()
        return total, elapsed
    finally:
        try:
            client.shutdown()
        except OSError:
            pass


# --- POP3 (poplib) ------------------------------------------------------------------------------


def pop_connect(target: Target, timeout: float = 120) -> poplib.POP3:
    if target.direct:
        client: poplib.POP3 = poplib.POP3_SSL(target.host, target.ports["pop"],
                                              context=target.tls(), timeout=timeout)
        nodelay(client.sock)
        blob = base64.b64encode(target.xoauth2("pop")).decode()
        reply = client._shortcmd(f"AUTH XOAUTH2 {blob}")  # type: ignore[attr-defined]
    else:
        client = poplib.POP3(target.host, target.ports["pop"], timeout=timeout)
        nodelay(client.sock)
        client.user(target.user)
        assert target.password is not None
        reply = client.pass_(target.password)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"{target.name}: POP login failed: {reply!r}")
    return client


def pop_retr_all(target: Target, count: int) -> tuple[int, float]:
    """RETR 1..count, reading each multi-line reply in large chunks (poplib's line-at-a-time
    ``retr`` would make the client the bottleneck); (bytes on the wire, seconds)."""
    client = pop_connect(target)
    try:
        n, _ = client.stat()
        if n < count:
            raise RuntimeError(f"{target.name}: maildrop has {n} messages, need {count}")
        total = 0
        started = time.perf_counter()
        reader = client.file
        for i in range(1, count + 1):
            client._putcmd(f"RETR {i}")  # type: ignore[attr-defined]
            tail = b""
            while not tail.endswith(b"\r\n.\r\n"):
                chunk = reader.read1(262144)
                if not chunk:
                    raise ConnectionError(f"{target.name}: closed during RETR {i}")
                total += len(chunk)
                tail = (tail + chunk)[-5:] if len(chunk) < 5 else chunk[-5:]
        elapsed = time.perf_counter() - started
        client.quit()
        return total, elapsed
    finally:
        try:
            client.close()
        except OSError:
            pass


# --- SMTP (smtplib) -----------------------------------------------------------------------------


def smtp_send_all(target: Target, messages: list[bytes], sender: str, rcpt: str) -> tuple[int, float]:
    """Log in, then MAIL/RCPT/DATA each message; (bytes, seconds from the first MAIL on)."""
    if target.direct:
        client = smtplib.SMTP(target.host, target.ports["smtp"], timeout=120)
        nodelay(client.sock)
        client.starttls(context=target.tls())
        client.ehlo()
        blob = target.xoauth2("smtp")
        client.auth("XOAUTH2", lambda challenge=None: blob.decode(), initial_response_ok=True)
    else:
        client = smtplib.SMTP(target.host, target.ports["smtp"], timeout=120)
        nodelay(client.sock)
        client.ehlo()
        assert target.password is not None
        client.login(target.user, target.password)
    try:
        total = 0
        started = time.perf_counter()
        for data in messages:
            refused = client.sendmail(sender, [rcpt], data)
            if refused:
                raise RuntimeError(f"{target.name}: refused {refused!r}")
            total += len(data)
        elapsed = time.perf_counter() - started
        client.quit()
        return total, elapsed
    finally:
        client.close()


# --- a minimal asyncio IMAP client for many sessions --------------------------------------------


class ImapConn:
    """One IMAP session on asyncio streams: just enough for LOGIN, SELECT, IDLE, NOOP, FETCH."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.greeting = b""
        self._tag = 0

    @classmethod
    async def open(cls, target: Target, *, limit: int = 2**20) -> ImapConn:
        if target.direct:
            reader, writer = await asyncio.open_connection(
                target.host, target.ports["imap"], ssl=target.tls(), limit=limit)
        else:
            reader, writer = await asyncio.open_connection(target.host, target.ports["imap"],
                                                           limit=limit)
        conn = cls(reader, writer)
        conn.greeting = await reader.readline()
        if not conn.greeting.startswith(b"* OK"):
            writer.close()
            raise RuntimeError(f"bad greeting {conn.greeting[:100]!r}")
        return conn

    async def command(self, text: str) -> list[bytes]:
        """Send ``TAG text``; return the lines up to the tagged reply (which must be OK)."""
        self._tag += 1
        tag = f"a{self._tag}".encode()
        self.writer.write(tag + b" " + text.encode() + b"\r\n")
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed by the server")
            lines.append(line)
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"{text.split()[0]}: {line[:200]!r}")
                return lines
            if line.endswith(b"}\r\n") and b"{" in line:  # a literal follows
                size = int(line[line.rindex(b"{") + 1:-3])
                await self.reader.readexactly(size)

    async def login(self, target: Target) -> None:
        if target.direct:
            blob = base64.b64encode(target.xoauth2("imap")).decode()
            await self.command(f"AUTHENTICATE XOAUTH2 {blob}")
        else:
            await self.command(f'LOGIN "{target.user}" "{target.password}"')

    async def idle(self) -> None:
        self._tag += 1
        self.idle_tag = f"a{self._tag}".encode()
        self.writer.write(self.idle_tag + b" IDLE\r\n")
        line = await self.reader.readline()
        if not line.startswith(b"+"):
            raise RuntimeError(f"IDLE: {line[:200]!r}")

    async def done(self) -> None:
        self.writer.write(b"DONE\r\n")
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed by the server")
            if line.startswith(self.idle_tag + b" "):
                return

    def close(self) -> None:
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass


async def greeting_latency(target: Target) -> float:
    """Seconds from connect() to the full greeting line: the proxy's own loop, no upstream."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(target.host, target.ports["imap"])
    try:
        line = await reader.readline()
        if not line.startswith(b"* OK"):
            raise RuntimeError(f"bad greeting {line!r}")
        return time.perf_counter() - started
    finally:
        writer.close()


async def login_latency(target: Target) -> tuple[float, ImapConn]:
    """Seconds from sending LOGIN (or AUTHENTICATE) to its tagged OK, greeting excluded."""
    conn = await ImapConn.open(target)
    started = time.perf_counter()
    await conn.login(target)
    return time.perf_counter() - started, conn


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": harness.percentile(values, 50), "p99": harness.percentile(values, 99),
            "max": max(values) if values else float("nan"), "n": float(len(values))}
