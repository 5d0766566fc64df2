"""Fixtures for the hardening tests: hostile raw clients, misbehaving upstreams, health checks.

These tests are the one place where hand-written bytes on raw sockets are right: the point is
to send what no real client sends. Everything is bounded: every read has a deadline, every loop
a count, and waiting is polling with a deadline (``wait_for``), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import gc
import imaplib
import logging
import os
import poplib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy import metrics
from proxy.demo import certs
from proxy.demo.process import DemoUpstream
from proxy.server.daemon import Daemon
from tests.proxyenv import PASSWORD, USER, ProxyEnv, authorise, config_dict

PROTOCOLS: tuple[str, ...] = ("imap", "pop", "smtp")


# --- what must never happen ----------------------------------------------------------------


class Trouble:
    """Collects what no hostile input may cause: an exception escaping a connection.

    ``session_failed`` is what ``Session.run`` logs for a bug; the loop's exception handler
    sees "Task exception was never retrieved", "Exception in callback …" and friends.
    """

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.loop_errors: list[dict[str, Any]] = []

    def handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(context)
        loop.default_exception_handler(context)

    def problems(self) -> list[str]:
        gc.collect()  # "Task exception was never retrieved" is reported when the task is freed
        found = [f"loop: {c.get('message')} {c.get('exception')!r} {c.get('future')!r}"
                 for c in self.loop_errors]
        for record in self.caplog.records:
            message = record.getMessage()
            if message == "session_failed" or (
                    record.name == "asyncio" and record.levelno >= logging.ERROR):
                error = record.exc_info[1] if record.exc_info else None
                found.append(f"log: {record.name} {message} {error!r}")
            elif record.name.startswith("proxy") and record.exc_info \
                    and record.levelno >= logging.ERROR:
                found.append(f"log: {record.name} {message}")
        return found

    def check(self) -> None:
        problems = self.problems()
        assert problems == [], problems[:5]

    def events(self, event: str, **fields: object) -> list[dict[str, Any]]:
        """Log records of ``event`` (the message) whose fields include ``fields``."""
        out = []
        for record in self.caplog.records:
            if record.getMessage() != event:
                continue
            have = getattr(record, "fields", None) or {}
            if all(have.get(k) == v for k, v in fields.items()):
                out.append(have)
        return out


@pytest.fixture
async def trouble(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Trouble]:
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    watch = Trouble(caplog)
    previous = loop.get_exception_handler()
    loop.set_exception_handler(watch.handler)
    try:
        yield watch
    finally:
        loop.set_exception_handler(previous)


# --- the proxy -------------------------------------------------------------------------------


async def start_env(tmp_path: Path, upstream: DemoUpstream, *,
                    protocols: tuple[str, ...] = PROTOCOLS,
                    limits: dict[str, Any] | None = None,
                    provider_timeout: float | None = None,
                    upstreams: dict[str, dict[str, Any]] | None = None,
                    listener_extra: dict[str, dict[str, Any]] | None = None) -> ProxyEnv:
    """Like ``tests.proxyenv.start_proxy``, with the provider's timeout and any upstream
    setting (host, port, ca_file, tls …) overridable."""
    data = config_dict(tmp_path, upstream, protocols=protocols, limits=limits,
                       listener_extra=listener_extra)
    if provider_timeout is not None:
        data["providers"]["demo"]["timeout"] = provider_timeout
    for name, override in (upstreams or {}).items():
        data["upstreams"][name].update(override)
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    token_store = authorise(cfg, upstream)
    daemon = Daemon(cfg)
    await daemon.start()
    return ProxyEnv(upstream, cfg, token_store, daemon)


def open_sessions(daemon: Daemon) -> int:
    return sum(len(runtime.sessions) for runtime in daemon.listeners)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def daemon_fds(env: ProxyEnv) -> int:
    """Open descriptors, less what the test itself holds: the demo upstream's admin client
    keeps HTTPS connections alive (closed here), and objects dropped by a reload hold theirs
    until collected. Warm upstream connections are closed first: the pool opens them after
    each login and holds them for ``warm_seconds`` by design (``tests/server/test_warm.py``
    checks that they are closed after that)."""
    for runtime in env.daemon.listeners:
        warm = getattr(runtime.ctx, "warm", None)
        if warm is not None:
            warm.clear()
    env.upstream.session.close()
    gc.collect()
    return fd_count()


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def imap_roundtrip(port: int, user: str = USER, password: str = PASSWORD) -> None:
    """A real imaplib client logs in (password as a literal: it is not ASCII), selects, leaves."""
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        client.literal = password.encode("utf-8")  # type: ignore[attr-defined]
        typ, data = client._simple_command("LOGIN", user)  # type: ignore[attr-defined]
        assert typ == "OK", data
        client.state = "AUTH"
        assert client.select("INBOX")[0] == "OK"
    except BaseException:
        client.shutdown()
        raise
    client.logout()


def pop_roundtrip(port: int, user: str = USER, password: str = PASSWORD) -> None:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        client.user(user)
        assert client.pass_(password).startswith(b"+OK")
        client.stat()
    except BaseException:
        client.close()
        raise
    client.quit()


async def assert_healthy(env: ProxyEnv, trouble: Trouble, fd_baseline: int | None = None,
                         timeout: float = 15.0) -> None:
    """Nothing escaped, every session ended, a real client logs in, no descriptor leaked."""
    await wait_for(lambda: open_sessions(env.daemon) == 0, timeout, "every session to end")
    await asyncio.to_thread(imap_roundtrip, env.ports["imap"])
    await wait_for(lambda: open_sessions(env.daemon) == 0, timeout, "the check session to end")
    if fd_baseline is not None:
        await wait_for(lambda: daemon_fds(env) <= fd_baseline, timeout,
                       f"open descriptors to return to {fd_baseline} (now {fd_count()})")
    trouble.check()


async def fd_baseline(env: ProxyEnv) -> int:
    """Open descriptors once the daemon is warm: one login done, so the token service holds
    its unlocked account and its pooled HTTPS connection to the identity platform."""
    await asyncio.to_thread(imap_roundtrip, env.ports["imap"])
    await wait_for(lambda: open_sessions(env.daemon) == 0, 10, "the warm-up session to end")
    return daemon_fds(env)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# --- hostile raw clients -------------------------------------------------------------------


class Raw:
    """A raw client connection: exact bytes out, bounded reads in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = bytearray()

    @classmethod
    async def open(cls, port: int, *, tls: ssl.SSLContext | None = None,
                   timeout: float = 10.0) -> Raw:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname="127.0.0.1" if tls else None,
                limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def expect(self, needle: bytes, timeout: float = 10.0) -> bytes:
        """Read until ``needle`` has arrived; returns (and forgets) everything up to it."""
        async with asyncio.timeout(timeout):
            while needle not in self.received:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise AssertionError(f"closed before {needle!r}; got {bytes(self.received)!r}")
                self.received += chunk
        end = self.received.index(needle) + len(needle)
        out = bytes(self.received[:end])
        del self.received[:end]
        return out

    async def until_closed(self, timeout: float = 10.0, limit: int = 1 << 20) -> bytes:
        """Everything until the peer closes (EOF or reset); fails after ``timeout`` seconds or
        ``limit`` bytes."""
        async with asyncio.timeout(timeout):
            while len(self.received) <= limit:
                try:
                    chunk = await self.reader.read(65536)
                except (ConnectionResetError, BrokenPipeError):
                    break
                if not chunk:
                    break
                self.received += chunk
        assert len(self.received) <= limit, "the proxy kept sending"
        out = bytes(self.received)
        self.received.clear()
        return out

    def reset(self) -> None:
        """Abort with SO_LINGER 0: the peer sees a TCP RST, not a FIN."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.transport.abort() if self.writer.transport.is_closing() else self.writer.close()


def rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


# --- misbehaving upstreams ------------------------------------------------------------------

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakeUpstream:
    """A tiny mail server on loopback that misbehaves as told (implicit TLS unless ``tls`` is
    None). Its handler tasks are tracked and cancelled on ``stop``."""

    def __init__(self, behaviour: Behaviour, tls: ssl.SSLContext | None) -> None:
        self.behaviour, self.tls = behaviour, tls
        self.server: asyncio.Server | None = None
        self.accepted = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self.behaviour(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                self._tasks.discard(task)
                writer.transport.abort()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.tls)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
def local_certs(tmp_path: Path) -> certs.CertPaths:
    return certs.generate(tmp_path / "local-certs")


def server_context(paths: certs.CertPaths) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(paths.cert_file), str(paths.key_file))
    return context


def client_context(paths: certs.CertPaths) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(paths.ca_file))
