"""Helpers for the SMTP proxy tests: real clients (smtplib in a thread, swaks), a device
password, a scripted upstream for faults the fake Microsoft 365 cannot produce, and the
password-leak check over captured log records."""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxy import config as config_mod
from proxy import metrics
from proxy.demo import certs
from proxy.demo.process import DemoUpstream
from proxy.logs import KeyValueFormatter
from proxy.secret import Secret
from proxy.server.daemon import Daemon
from tests.proxyenv import PASSWORD, USER, ProxyEnv, authorise, config_dict

T = TypeVar("T")

DEVICE_LABEL = "scanner"
DEVICE_PASSWORD = "Scanner-Pa55-w0rd"  # smtplib and swaks encode AUTH as ASCII
RCPT = "bob@contoso.example"


def add_device_password(env: ProxyEnv, label: str = DEVICE_LABEL,
                        password: str = DEVICE_PASSWORD) -> None:
    """A per-device key slot for the account, as ``xoauth2-proxy passwd --add`` would add."""
    unlocked = env.store.unlock(env.user, Secret(env.password))
    env.store.add_password_slot(unlocked, label, Secret(password))


async def start_smtp_proxy(tmp_path: Path, upstream: DemoUpstream,
                           mutate: Callable[[dict[str, Any]], None] | None = None,
                           **kw: Any) -> ProxyEnv:
    """An SMTP-only proxy in front of ``upstream`` (its Entra ID at least), the account
    authorised, a device password added; ``mutate`` edits the config dict first."""
    data = config_dict(tmp_path, upstream, protocols=("smtp",), **kw)
    if mutate is not None:
        mutate(data)
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    token_store = authorise(cfg, upstream)
    daemon = Daemon(cfg)
    await daemon.start()
    env = ProxyEnv(upstream, cfg, token_store, daemon)
    add_device_password(env)
    return env


def plain_b64(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def secret_forms(*passwords: str, user: str = USER) -> list[str]:
    """Every form a password could leak in: clear, base64 alone, inside a PLAIN blob."""
    forms: list[str] = []
    for password in passwords:
        forms += [password, base64.b64encode(password.encode()).decode(),
                  plain_b64(user, password), plain_b64("", password)[4:]]
    return forms


def assert_no_leak(records: list[logging.LogRecord], forms: list[str]) -> None:
    formatter = KeyValueFormatter(journald=False, timestamps=False)
    text = "\n".join(formatter.format(r) + " " + repr(r.args) + " " + r.getMessage()
                     for r in records)
    for form in forms:
        assert form not in text, "a password (or its base64) reached the logs"


def login_count(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("xoauth2_proxy_logins_total",
                                              {"protocol": "smtp", "result": result})
    return value or 0.0


def message_count(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("xoauth2_proxy_smtp_messages_total",
                                              {"result": result})
    return value or 0.0


def client(port: int, **kw: Any) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=30, **kw)


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def message(subject: str, body: bytes = b"Hello from the scanner.\r\n", *,
            sender: str = USER, to: str = RCPT) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@test>\r\n\r\n").encode() + body


def big_message(size: int) -> bytes:
    """A realistic large message: base64 lines of 76 characters, some lines starting with a
    dot (transparency), CRLF everywhere."""
    head = message("twenty megabytes", b"")
    line = base64.b64encode(bytes(range(57)) * 1)  # 76 characters
    lines = []
    total = len(head)
    i = 0
    while total < size:
        chunk = (b"." + line[1:] if i % 1000 == 0 else line) + b"\r\n"
        lines.append(chunk)
        total += len(chunk)
        i += 1
    return head + b"".join(lines)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trust(ca_file: Path | str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


async def poll(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2) -> Any:
    """Call ``check`` (in a thread) until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def _proc_address(host: str, port: int) -> str:
    """An IPv4 socket address as ``/proc/net/tcp`` writes it."""
    return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"


def _wait_for_row(sock: socket.socket, ready: Callable[[list[str]], bool], what: str,
                  timeout: float, *, peer: bool = True) -> None:
    """Poll ``/proc/net/tcp`` until the row of the proxy's side of ``sock`` (a loopback IPv4
    connection to the proxy; ``peer=False``: the client's side) is ``ready``."""
    local, remote = (_proc_address(*a[:2]) for a in (sock.getsockname(), sock.getpeername()))
    row_key = (remote, local) if peer else (local, remote)
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/net/tcp") as table:
            for row in table.readlines()[1:]:
                fields = row.split()
                if (fields[1], fields[2]) == row_key and ready(fields):
                    return
        if time.monotonic() > deadline:
            pytest.fail(f"the proxy {what} within {timeout}s")
        time.sleep(0.01)


def wait_until_read(sock: socket.socket, timeout: float = 10.0) -> None:
    """Until the proxy has read everything sent on ``sock`` (its receive queue is empty), so
    the next bytes sent reach it in a read of their own."""
    _wait_for_row(sock, lambda row: row[4].endswith(":00000000"),
                  "did not read the bytes sent", timeout)


def wait_until_eof_seen(sock: socket.socket, timeout: float = 10.0) -> None:
    """After ``shutdown(SHUT_WR)``: until the proxy's system has the client's FIN (the
    client's side is in FIN_WAIT2 or later), so the proxy's event loop's next poll reports
    the end of the stream."""
    _wait_for_row(sock, lambda row: row[3] in ("05", "06", "07"),
                  "did not acknowledge the end of the stream", timeout, peer=False)


class ScriptedUpstream:
    """A tiny SMTP submission server with implicit TLS and scripted misbehaviour.

    ``auth_replies``: replies to successive AUTH commands (then 235). ``drop_on``: a verb on
    which the connection is cut without a reply. ``close_after_data``: the server closes the
    session after each message. ``hold_end``: the reply to a message's end waits for this
    event (``messages`` has the message meanwhile). ``commands`` records the verbs seen."""

    def __init__(self, workdir: Path, *, auth_replies: list[bytes] | None = None,
                 drop_on: bytes | None = None, close_after_data: bool = False,
                 hold_end: asyncio.Event | None = None) -> None:
        self.paths = certs.generate(workdir)
        self.hold_end = hold_end
        self.close_after_data = close_after_data
        self.connections = 0
        self.auth_replies = list(auth_replies or [])
        self.drop_on = drop_on
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.paths.cert_file, self.paths.key_file)
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 scripted.example ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].strip().upper()
                self.commands.append(verb)
                if verb == self.drop_on:
                    writer.transport.abort()
                    return
                if verb == b"EHLO":
                    writer.write(b"250-scripted.example\r\n250-SIZE 30000000\r\n"
                                 b"250-PIPELINING\r\n250 AUTH XOAUTH2\r\n")
                elif verb == b"AUTH":
                    if len(line.split()) == 2:  # no initial response: ask for it
                        writer.write(b"334 \r\n")
                        await writer.drain()
                        await reader.readline()
                    reply = self.auth_replies.pop(0) if self.auth_replies else b"235 2.7.0 OK"
                    writer.write(reply + b"\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    self.messages.append(data)
                    if self.hold_end is not None:
                        await self.hold_end.wait()
                    writer.write(b"250 2.0.0 Ok: queued as SCRIPTED42\r\n")
                    if self.close_after_data:  # like a server ending an idle session
                        await writer.drain()
                        break
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 2.0.0 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


__all__ = ["PASSWORD", "USER"]
