"""Faults: the identity platform, the upstream mail server and the state directory misbehave.

Each fault ends in a defined client reply (IMAP ``NO [UNAVAILABLE]`` / ``NO
[AUTHENTICATIONFAILED]``, POP ``-ERR [SYS/TEMP]`` / ``-ERR [AUTH]``), a metric, a log line, and
no token lost or corrupted: the token file is unchanged (or validly rewritten) and decrypts, and
once the fault is gone a real client logs in.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import certs
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from proxy.server import session as session_mod
from tests.hardening.conftest import (
    FakeUpstream,
    Raw,
    Trouble,
    assert_healthy,
    imap_roundtrip,
    open_sessions,
    pop_roundtrip,
    rst,
    sample,
    server_context,
    start_env,
    wait_for,
)
from tests.proxyenv import PASSWORD, USER, ProxyEnv

LOGINS = "xoauth2_proxy_logins_total"
REFRESHES = "xoauth2_proxy_token_refreshes_total"
WRITE_ERRORS = "xoauth2_proxy_token_file_write_errors_total"

EXPECT = {  # the proxy's reply to a login it refuses, per failure kind
    ("imap", "unavailable"): rb"^a NO \[UNAVAILABLE\] ",
    ("pop", "unavailable"): rb"^-ERR \[SYS/TEMP\] ",
    ("imap", "authorisation"): rb"^a NO \[AUTHENTICATIONFAILED\] ",
    ("pop", "authorisation"): rb"^-ERR \[AUTH\] ",
}


async def raw_login(port: int, protocol: str, timeout: float = 15.0) -> tuple[bytes, float]:
    """Log in by hand; returns the proxy's reply line to the login and how long it took."""
    client = await Raw.open(port)
    try:
        await client.expect(b"\r\n")
        started = time.monotonic()
        if protocol == "imap":
            password = PASSWORD.encode()
            await client.send(b"a LOGIN " + USER.encode() + b" {%d+}\r\n" % len(password)
                              + password + b"\r\n")
            line = await client.expect(b"\r\n", timeout=timeout)
            while line.startswith(b"* "):  # untagged data before the tagged reply
                line = await client.expect(b"\r\n", timeout=timeout)
        else:
            await client.send(b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
            await client.expect(b"\r\n")  # +OK to USER
            line = await client.expect(b"\r\n", timeout=timeout)
        return line, time.monotonic() - started
    finally:
        client.close()


async def login_eventually(port: int, protocol: str, timeout: float, trouble: Trouble) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(100):
        line, _ = await raw_login(port, protocol)
        if line.startswith((b"a OK", b"+OK")):
            return
        assert re.match(EXPECT[protocol, "unavailable"], line), line
        assert time.monotonic() < deadline, (
            f"still refused after {timeout}s: {line!r}", trouble.events("token_refresh")[-3:])
        await asyncio.sleep(0.5)
    raise AssertionError("no successful login")


def cache_payload(env: ProxyEnv) -> bytes:
    """The token file's decrypted MSAL cache. (Its clear metadata may change on a login:
    the token service records each password slot's last use.)"""
    return env.store.unlock(USER, Secret(PASSWORD)).payload


def assert_file_intact(env: ProxyEnv, before: bytes | None = None) -> None:
    """The file decrypts and holds a refresh token; with ``before``, its MSAL cache is
    exactly the one it held then."""
    path = env.store.path(USER)
    unlocked = env.store.unlock(USER, Secret(PASSWORD))
    if before is not None:
        assert unlocked.payload == before, "the token cache in the file changed"
    assert unlocked.payload and unlocked.meta.refresh_token_present
    assert not unlocked.meta.needs_reauth
    leftovers = [n for n in os.listdir(path.parent) if n.startswith(".")]
    assert not [n for n in leftovers if not n.endswith(".lock")], leftovers


# --- the identity platform --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["503", "garbage", "hang", "kill"])
async def test_identity_platform_faults(tmp_path: Path, demo_upstream_factory: Any,
                                        trouble: Trouble, mode: str) -> None:
    # MSAL refreshes any access token with less than 5 minutes left, so with 60 s tokens the
    # daemon's first login of each protocol asks the token endpoint.
    upstream: DemoUpstream = demo_upstream_factory(access_token_lifetime=60)
    env = await start_env(tmp_path, upstream, protocols=("imap", "pop"), provider_timeout=2)
    before = cache_payload(env)
    try:
        if mode == "kill":
            upstream.kill()
        else:
            upstream.configure(token_endpoint_mode=mode)
        for protocol in ("imap", "pop"):
            logins = sample(LOGINS, protocol=protocol, result="provider_unavailable")
            refreshes = sample(REFRESHES, result="provider_unavailable")
            line, took = await raw_login(env.ports[protocol], protocol)
            assert re.match(EXPECT[protocol, "unavailable"], line), line
            assert b"identity platform" in line and b"try again later" in line, line
            assert took < 2 + 3, took  # the provider timeout, plus slack
            assert sample(LOGINS, protocol=protocol, result="provider_unavailable") == logins + 1
            assert sample(REFRESHES, result="provider_unavailable") == refreshes + 1
            assert trouble.events("login", protocol=protocol, result="provider_unavailable")
        assert trouble.events("token_refresh", account=USER, result="provider_unavailable")
        await wait_for(lambda: open_sessions(env.daemon) == 0, 10, "sessions to end")
        assert_file_intact(env, before)  # a failed refresh never touches the file
        if mode != "kill":
            upstream.configure(token_endpoint_mode="ok")
            if mode == "503":
                # MSAL's service protection answers the same refresh from its own HTTP cache
                # for Retry-After seconds after a 5xx (60 s for a public client when the reply
                # has none), so the daemon recovers a minute later on its own. A reload
                # (what SIGHUP does) starts every account afresh, without that cache.
                line, _ = await raw_login(env.ports["imap"], "imap")
                assert re.match(EXPECT["imap", "unavailable"], line), line
                env.daemon.tokens.reconfigure(env.config)
            for protocol in ("imap", "pop"):
                await login_eventually(env.ports[protocol], protocol, timeout=20, trouble=trouble)
            await asyncio.to_thread(imap_roundtrip, env.ports["imap"])
            await asyncio.to_thread(pop_roundtrip, env.ports["pop"])
            assert_file_intact(env)  # rewritten with the refreshed cache, still decrypts
        trouble.check()
    finally:
        await env.daemon.stop(grace=1)


# --- the upstream mail server -----------------------------------------------------------------


IMAP_GREETING = b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR] fake\r\n"
POP_GREETING = b"+OK fake\r\n"


@dataclass
class Switch:
    """A TCP front for the demo upstream's IMAPS and POP3S ports whose behaviour a test
    changes at will: ``forward`` passes bytes (TLS end to end), anything else misbehaves."""

    fakes: dict[str, FakeUpstream]
    targets: dict[str, int]
    ports: dict[str, int]
    tls: Any
    mode: str = "forward"


def _line_reader(reader: asyncio.StreamReader) -> Callable[[], Awaitable[bytes]]:
    async def line() -> bytes:
        data = await asyncio.wait_for(reader.readline(), 30)
        if not data:
            raise ConnectionResetError("client closed")
        return data
    return line


async def _fake_login(protocol: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    """Play an upstream that accepts any XOAUTH2 login."""
    line = _line_reader(reader)
    if protocol == "imap":
        writer.write(IMAP_GREETING)
        command = await line()
        tag = command.split(b" ", 1)[0]
        if command.rstrip().upper().endswith(b"XOAUTH2"):  # no SASL-IR
            writer.write(b"+ \r\n")
            await line()
        writer.write(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] fake logged in\r\n")
    else:
        writer.write(POP_GREETING)
        await line()  # CAPA
        writer.write(b"+OK\r\nSASL XOAUTH2\r\n.\r\n")
        command = await line()
        if command.rstrip().upper() == b"AUTH XOAUTH2":
            writer.write(b"+ \r\n")
            await line()
        writer.write(b"+OK fake logged in\r\n")
    await writer.drain()


def _behaviour(switch: Switch, protocol: str) -> Callable[..., Awaitable[None]]:
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = switch.mode
        if mode == "forward":
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                 switch.targets[protocol])

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while chunk := await src.read(65536):
                        dst.write(chunk)
                        await dst.drain()
                finally:
                    dst.close()
            try:
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            finally:
                up_writer.transport.abort()
            return
        if mode == "rst":
            rst(writer)
            return
        if mode == "silent":
            await reader.read()
            return
        if mode == "untrusted":
            await writer.start_tls(switch.tls["other"])
            await reader.read()
            return
        await writer.start_tls(switch.tls["ours"])
        line = _line_reader(reader)
        greeting = IMAP_GREETING if protocol == "imap" else POP_GREETING
        if mode == "silent_after_tls":
            await reader.read()
        elif mode == "garbage":
            writer.write(greeting)
            await line()
            writer.write(b"\x00\xff\xfe garbage \x01\x02\r\n" * 3)
            await reader.read()
        elif mode == "huge_line":
            writer.write(greeting)
            await line()
            for _ in range(160):  # 10 MB with no line end, unless the proxy hangs up first
                writer.write(b"A" * 65536)
                await writer.drain()
        elif mode == "rst_mid_login":
            writer.write(greeting)
            await writer.drain()
            await line()
            rst(writer)
        elif mode == "login_then_rst":
            await _fake_login(protocol, reader, writer)
            await line()  # the client's first command after login
            rst(writer)
        else:
            raise AssertionError(mode)
    return behave


@pytest.fixture
async def switch_env(tmp_path: Path, demo_upstream: DemoUpstream,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[ProxyEnv, Switch]]:
    monkeypatch.setattr(session_mod, "UPSTREAM_LOGIN_TIMEOUT", 1.0)
    ours = certs.generate(tmp_path / "fake-upstream")
    other = certs.generate(tmp_path / "untrusted")  # a CA the proxy does not trust
    bundle = tmp_path / "ca-bundle.pem"  # the demo upstream's CA and the fake's
    bundle.write_bytes(Path(demo_upstream.ca_file).read_bytes() + ours.ca_file.read_bytes())
    switch = Switch({}, {"imap": demo_upstream.ports["imaps"], "pop": demo_upstream.ports["pop3s"]},
                    {}, {"ours": server_context(ours), "other": server_context(other)})
    for protocol in ("imap", "pop"):
        fake = FakeUpstream(_behaviour(switch, protocol), tls=None)
        switch.ports[protocol] = await fake.start()
        switch.fakes[protocol] = fake
    # No warm connections: the switch picks a behaviour per connection, when it is made, and
    # each test means the behaviour it sets for the logins that follow.
    env = await start_env(tmp_path, demo_upstream, protocols=("imap", "pop"), upstreams={
        p: {"port": switch.ports[p], "ca_file": str(bundle), "connect_timeout": 1,
            "warm_connections": 0}
        for p in ("imap", "pop")})
    try:
        yield env, switch
    finally:
        await env.daemon.stop(grace=1)
        for fake in switch.fakes.values():
            await fake.stop()


@pytest.mark.parametrize("mode,says", [
    ("refused", b"cannot be reached"),
    ("rst", b"cannot be reached"),
    ("silent", b"cannot be reached"),
    ("untrusted", b"cannot be reached"),
    ("silent_after_tls", b"did not complete the login"),
    ("garbage", b"did not complete the login"),
    ("huge_line", b"did not complete the login"),
    ("rst_mid_login", b"did not complete the login"),
])
async def test_upstream_faults_during_login(switch_env: tuple[ProxyEnv, Switch],
                                            trouble: Trouble, mode: str, says: bytes) -> None:
    env, switch = switch_env
    switch.mode = mode
    if mode == "refused":  # nobody listens on the upstream port for a moment
        for fake in switch.fakes.values():
            assert fake.server is not None
            fake.server.close()
            await fake.server.wait_closed()
    for protocol in ("imap", "pop"):
        logins = sample(LOGINS, protocol=protocol, result="upstream_unavailable")
        line, took = await raw_login(env.ports[protocol], protocol)
        assert re.match(EXPECT[protocol, "unavailable"], line), line
        assert says in line, line
        assert took < 5, took
        assert sample(LOGINS, protocol=protocol, result="upstream_unavailable") == logins + 1
        assert trouble.events("login", protocol=protocol, result="upstream_unavailable")
    if mode == "refused":
        for protocol, fake in switch.fakes.items():
            fake.server = await _restart(fake, switch.ports[protocol])
    switch.mode = "forward"
    assert_file_intact(env)
    await assert_healthy(env, trouble)
    await asyncio.to_thread(pop_roundtrip, env.ports["pop"])


async def _restart(fake: FakeUpstream, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await fake.behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.transport.abort()
    return await asyncio.start_server(handle, "127.0.0.1", port, reuse_address=True)


async def test_upstream_resets_after_login(switch_env: tuple[ProxyEnv, Switch],
                                           trouble: Trouble) -> None:
    """The upstream accepts the login and resets on the first command: the client had its
    OK, then sees the connection end; the session ends cleanly."""
    env, switch = switch_env
    switch.mode = "login_then_rst"
    for protocol, command in (("imap", b"b SELECT INBOX\r\n"), ("pop", b"STAT\r\n")):
        line, _ = await raw_login(env.ports[protocol], protocol)
        # raw_login closed its client; do it again and keep this one open.
        client = await Raw.open(env.ports[protocol])
        await client.expect(b"\r\n")
        if protocol == "imap":
            password = PASSWORD.encode()
            await client.send(b"a LOGIN " + USER.encode() + b" {%d+}\r\n" % len(password)
                              + password + b"\r\n")
            assert (await client.expect(b"\r\n")).startswith(b"a OK")
        else:
            await client.send(b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
            await client.expect(b"\r\n")
            assert (await client.expect(b"\r\n")).startswith(b"+OK")
        await client.send(command)
        await client.until_closed(timeout=10)
        client.close()
        assert trouble.events("session_end", protocol=protocol, account=USER)
    switch.mode = "forward"
    await assert_healthy(env, trouble)


# --- the state directory ----------------------------------------------------------------------


def _inject_write_fault(monkeypatch: pytest.MonkeyPatch, state_dir: Path, kind: str) -> list[str]:
    """Make writes under ``state_dir`` fail as a full disk (ENOSPC at fsync) or a read-only
    file system (EROFS when a file is opened for writing or renamed) would. Reads still work.
    Tests run as root, which chmod cannot stop; a read-only bind mount needs privileges the
    test runner may lack; so the fault is injected at the system calls the store makes."""
    hits: list[str] = []
    state = str(state_dir.resolve())
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def inside(path: Any) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(state)
        except TypeError:
            return False

    def fd_inside(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(state)
        except OSError:
            return False

    if kind == "enospc":
        def fsync(fd: int) -> None:
            if fd_inside(fd) and not os.path.isdir(f"/proc/self/fd/{fd}"):
                hits.append("fsync")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    else:
        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                hits.append("open")
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real_open(path, flags, *args, **kwargs)

        def replace(src: Any, dst: Any, **kwargs: Any) -> None:
            if inside(dst):
                hits.append("replace")
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            real_replace(src, dst, **kwargs)
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "replace", replace)
    return hits


@pytest.mark.parametrize("kind", ["enospc", "read_only"])
async def test_token_file_cannot_be_written(tmp_path: Path, demo_upstream_factory: Any,
                                            trouble: Trouble, monkeypatch: pytest.MonkeyPatch,
                                            kind: str) -> None:
    """A refresh whose result cannot be saved: the login succeeds from memory, the write-error
    metric moves, the error is logged, and the old file is untouched and still decrypts."""
    upstream: DemoUpstream = demo_upstream_factory(access_token_lifetime=60)
    env = await start_env(tmp_path, upstream, protocols=("imap", "pop"))
    before = cache_payload(env)
    try:
        errors = sample(WRITE_ERRORS)
        hits = _inject_write_fault(monkeypatch, env.config.state_dir, kind)
        await asyncio.to_thread(imap_roundtrip, env.ports["imap"])  # refreshes, cannot save
        await asyncio.to_thread(pop_roundtrip, env.ports["pop"])  # POP scope: again
        assert hits, "the fault was never hit: no write was attempted"
        assert sample(WRITE_ERRORS) >= errors + 1
        failed = trouble.events("token_file_write_failed", account=USER)
        assert failed and ("no space" in failed[0]["reason"] or "read-only" in
                           failed[0]["reason"].lower()), failed
        monkeypatch.undo()
        assert_file_intact(env, before)
        await asyncio.to_thread(imap_roundtrip, env.ports["imap"])  # still served from memory
        await assert_healthy(env, trouble)
    finally:
        monkeypatch.undo()
        await env.daemon.stop(grace=1)


@pytest.mark.parametrize("damage", ["deleted", "garbage", "truncated"])
async def test_token_file_lost_while_running(tmp_path: Path, demo_upstream: DemoUpstream,
                                             trouble: Trouble, damage: str) -> None:
    """The next login is refused like a wrong password (whether an account has tokens is
    nothing a client learns); the log line says authorisation is needed and names the command;
    the damaged file is left as it is (not overwritten, not recreated)."""
    env = await start_env(tmp_path, demo_upstream, protocols=("imap", "pop"))
    path = env.store.path(USER)
    try:
        await asyncio.to_thread(imap_roundtrip, env.ports["imap"])  # the account is in memory
        if damage == "deleted":
            path.unlink()
        elif damage == "garbage":
            path.write_bytes(os.urandom(700))
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        after = path.read_bytes() if path.exists() else None
        for protocol in ("imap", "pop"):
            logins = sample(LOGINS, protocol=protocol, result="authorisation_needed")
            line, _ = await raw_login(env.ports[protocol], protocol)
            assert re.match(EXPECT[protocol, "authorisation"], line), line
            assert b"Invalid user name or local password." in line, line
            assert sample(LOGINS, protocol=protocol, result="authorisation_needed") == logins + 1
            events = trouble.events("login", protocol=protocol, result="authorisation_needed")
            assert any(f"xoauth2-proxy login {USER}" in str(e.get("reason")) for e in events)
        assert (path.read_bytes() if path.exists() else None) == after
        await wait_for(lambda: open_sessions(env.daemon) == 0, 10, "sessions to end")
        trouble.check()
    finally:
        await env.daemon.stop(grace=1)
