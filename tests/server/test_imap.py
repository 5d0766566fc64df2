"""IMAP through the proxy to the embedded fake Microsoft 365, with real clients."""

from __future__ import annotations

import asyncio
import imaplib
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.demo import certs
from proxy.demo.process import DemoUpstream
from proxy.server.capabilities import FILE_NAME
from proxy.server.daemon import Daemon
from tests.proxyenv import PASSWORD, USER, ProxyEnv, imap_client, local_tls, start_proxy

MESSAGE = b"From: bob@contoso.example\r\nTo: alice@contoso.example\r\nSubject: hello\r\n\r\nHi Alice!\r\n"


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[ProxyEnv]:
    env = await start_proxy(tmp_path, demo_upstream, protocols=("imap",))
    yield env
    await env.daemon.stop(grace=1)


def connect(env: ProxyEnv) -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", env.ports["imap"], timeout=30)


def login_literal(client: imaplib.IMAP4, user: str, password: str) -> tuple[str, list[bytes]]:
    """LOGIN with the password as a synchronising literal (how non-ASCII passwords travel)."""
    client.literal = password.encode("utf-8")  # type: ignore[attr-defined]
    typ, data = client._simple_command("LOGIN", user)  # type: ignore[attr-defined]
    if typ == "OK":
        client.state = "AUTH"
    return typ, data


def login(client: imaplib.IMAP4, user: str, password: str) -> None:
    """Like imaplib's login(), also for non-ASCII passwords (sent as a literal)."""
    typ, data = login_literal(client, user, password)
    if typ != "OK":
        raise imaplib.IMAP4.error(data[-1].decode("utf-8", "replace"))


def login_error(env: ProxyEnv, user: str = USER, password: str = PASSWORD) -> str:
    """The error text of a login that must fail, on a fresh connection."""
    client = connect(env)
    try:
        login(client, user, password)
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        client.shutdown()
    raise AssertionError("login should have failed")


async def test_login_select_fetch_append(env: ProxyEnv) -> None:
    env.upstream.deliver(USER, MESSAGE)

    def session() -> None:
        client = connect(env)
        assert "AUTH=PLAIN" in client.capabilities and "LITERAL+" in client.capabilities
        typ, data = login_literal(client, USER, PASSWORD)
        assert typ == "OK", data
        assert b"CAPABILITY" in data[0] and b"IDLE" in data[0]  # the upstream's capabilities
        typ, data = client.select("INBOX")
        assert typ == "OK" and data == [b"1"]
        typ, data = client.fetch("1", "(BODY[])")
        assert typ == "OK" and data[0][1] == MESSAGE
        typ, _ = client.append("INBOX", None, None, MESSAGE.replace(b"hello", b"appended"))
        assert typ == "OK"
        typ, data = client.search(None, "SUBJECT", "appended")
        assert typ == "OK" and data == [b"2"]
        client.logout()

    await asyncio.to_thread(session)
    assert env.upstream.mailbox(USER)[1] == MESSAGE.replace(b"hello", b"appended")


@pytest.mark.parametrize("password", [PASSWORD, "plain-ascii-password", 'with "quotes" and \\ back'])
async def test_login_quoted_password(tmp_path: Path, demo_upstream: DemoUpstream, password: str) -> None:
    from tests.proxyenv import authorise, make_config
    cfg = make_config(tmp_path, demo_upstream, protocols=("imap",))
    authorise(cfg, demo_upstream, password=password)
    from proxy.server.daemon import Daemon
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        def session() -> None:
            client = imaplib.IMAP4("127.0.0.1", daemon.ports()["imap"], timeout=30)
            if password.isascii():
                typ, _ = client.login(USER, password)  # imaplib quotes it (\" and \\ escapes)
            else:
                typ, _ = login_literal(client, USER, password)
            assert typ == "OK"
            client.logout()
        await asyncio.to_thread(session)
    finally:
        await daemon.stop(grace=1)


async def test_authenticate_plain(env: ProxyEnv) -> None:
    def session() -> None:
        client = connect(env)
        typ, _ = client.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())
        assert typ == "OK"
        assert client.select("INBOX")[0] == "OK"
        client.logout()

    await asyncio.to_thread(session)


async def test_bad_logins_get_actionable_replies(env: ProxyEnv) -> None:
    wrong = await asyncio.to_thread(login_error, env, USER, "not the password")
    unknown = await asyncio.to_thread(login_error, env, "nobody@contoso.example", "whatever-password")
    assert "[AUTHENTICATIONFAILED]" in wrong and wrong == unknown  # no account enumeration

    def select_before_login() -> str:
        client = connect(env)
        try:
            client.state = "AUTH"  # make imaplib send it anyway
            client.select("INBOX")
        except imaplib.IMAP4.error as exc:
            return str(exc)
        finally:
            client.shutdown()
        raise AssertionError("SELECT before login should fail")

    assert "log in" in (await asyncio.to_thread(select_before_login)).lower()


async def test_revoked_account_names_login_command(tmp_path: Path, demo_upstream_factory: object) -> None:
    upstream = demo_upstream_factory(access_token_lifetime=1)  # type: ignore[operator]
    env = await start_proxy(tmp_path, upstream, protocols=("imap",), accounts={  # in-band: tests/reauth
        USER: {"provider": "demo", "reauthorise_in_band": False}})
    try:
        upstream.revoke(USER)
        await asyncio.sleep(1.1)  # the access token's lifetime
        text = await asyncio.to_thread(login_error, env)
        assert "[AUTHENTICATIONFAILED]" in text and f"xoauth2-proxy login {USER}" in text
        assert "AADSTS50173" in text
    finally:
        await env.daemon.stop(grace=1)


async def test_unavailable_upstream_and_provider(tmp_path: Path, demo_upstream_factory: object) -> None:
    upstream = demo_upstream_factory(access_token_lifetime=1)  # type: ignore[operator]
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    env = await start_proxy(tmp_path, upstream, protocols=("imap",),
                            upstream_ports={"imap": closed_port})
    try:
        text = await asyncio.to_thread(login_error, env)
        assert "[UNAVAILABLE]" in text and "try again later" in text
        upstream.configure(token_endpoint_mode="503")
        await asyncio.sleep(1.1)
        text = await asyncio.to_thread(login_error, env)
        assert "[UNAVAILABLE]" in text and "identity platform" in text
    finally:
        await env.daemon.stop(grace=1)


async def test_local_starttls(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    paths = certs.generate(tmp_path / "local-tls")
    env = await start_proxy(tmp_path, demo_upstream, protocols=("imap",), listener_extra={
        "imap": {"tls": "starttls", "cert_file": str(paths.cert_file), "key_file": str(paths.key_file)}})
    try:
        def session() -> None:
            client = connect(env)
            assert "STARTTLS" in client.capabilities
            context = ssl.create_default_context(cafile=str(paths.ca_file))
            client.starttls(context)
            assert "STARTTLS" not in client.capabilities
            assert login(client, USER, PASSWORD) is None
            assert client.select("INBOX")[0] == "OK"
            client.logout()
        await asyncio.to_thread(session)
    finally:
        await env.daemon.stop(grace=1)


M365_EXTRAS = {"IDLE", "MOVE", "UIDPLUS", "UNSELECT", "CHILDREN", "NAMESPACE", "IMAP4"}


@pytest.mark.parametrize("mode", ["none", "starttls", "implicit"])
async def test_upstream_capabilities_announced_before_login(tmp_path: Path, demo_upstream: DemoUpstream,
                                                            mode: str) -> None:
    """imaplib reads the capabilities once, before login: after one login has taught the proxy
    what the upstream offers after login (the demo, like Microsoft 365, says so only when
    asked), the next client sees IDLE, MOVE, UIDPLUS there; so does the first client after a
    restart (the list is kept in the state directory)."""
    listener, context = local_tls(tmp_path, mode)
    env = await start_proxy(tmp_path, demo_upstream, protocols=("imap",),
                            listener_extra={"imap": listener})

    def session(port: int) -> tuple[set[str], bytes]:
        client = imap_client(port, mode, context)
        caps = set(client.capabilities)
        assert ("STARTTLS" in caps) is (mode == "starttls")
        if mode == "starttls":
            client.starttls(context)
            assert set(client.capabilities) == caps - {"STARTTLS"}
        assert {"IMAP4REV1", "AUTH=PLAIN", "SASL-IR", "ID"} <= caps
        assert not {"AUTH=XOAUTH2", "LOGINDISABLED"} & caps
        typ, data = login_literal(client, USER, PASSWORD)
        assert typ == "OK", data
        assert client.noop()[0] == "OK"  # the proxy's own CAPABILITY reply stayed with it
        assert client.select("INBOX")[0] == "OK"
        client.logout()
        return caps, data[0]

    asked = (b"[CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID "
             b"UNSELECT CHILDREN IDLE NAMESPACE LITERAL+] Logged in")  # the upstream's, in full
    try:
        first, ok = await asyncio.to_thread(session, env.ports["imap"])
        assert not M365_EXTRAS & first and "LITERAL+" in first  # nothing learned yet
        assert ok == asked  # the proxy asked the upstream after this login
        caps, ok = await asyncio.to_thread(session, env.ports["imap"])
        assert M365_EXTRAS | {"LITERAL+"} <= caps
        assert ok == b"Logged in"  # known and fresh: not asked again
    finally:
        await env.daemon.stop(grace=1)
    saved = env.config.state_dir / FILE_NAME
    assert saved.stat().st_mode & 0o777 == 0o600
    assert b"MOVE" in saved.read_bytes() and b"AUTH=" in saved.read_bytes()  # as the upstream said

    daemon = Daemon(env.config)
    await daemon.start()
    try:
        assert await asyncio.to_thread(session, daemon.ports()["imap"]) == (caps, asked)
    finally:
        await daemon.stop(grace=1)


async def test_idle_sees_new_mail(env: ProxyEnv) -> None:
    def session() -> None:
        client = connect(env)
        login(client, USER, PASSWORD)
        client.select("INBOX")
        tag = client._new_tag()  # type: ignore[attr-defined]
        client.send(tag + b" IDLE\r\n")
        assert client.readline().startswith(b"+")
        env.upstream.deliver(USER, MESSAGE)
        assert client.readline().strip().endswith(b"EXISTS")
        client.send(b"DONE\r\n")
        assert client.readline().startswith(tag + b" OK")
        client.logout()

    await asyncio.to_thread(session)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_list_and_fetch(env: ProxyEnv) -> None:
    env.upstream.deliver(USER, MESSAGE)
    base = f"imap://127.0.0.1:{env.ports['imap']}"
    auth = f"{USER}:{PASSWORD}"

    def curl(url: str) -> str:
        result = subprocess.run(["curl", "-sS", "--max-time", "30", "--url", url, "--user", auth],
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.decode()

    assert "INBOX" in await asyncio.to_thread(curl, base + "/")
    assert "Hi Alice!" in await asyncio.to_thread(curl, base + "/INBOX;UID=1")


async def test_500_simultaneous_clients(env: ProxyEnv) -> None:
    clients = 500
    barrier = threading.Barrier(clients)
    failures: list[str] = []

    def one() -> None:
        try:
            barrier.wait(timeout=60)
            client = connect(env)
            assert client.welcome.startswith(b"* OK")
            assert login(client, USER, PASSWORD) is None
            client.logout()
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    await asyncio.to_thread(lambda: [t.join(120) for t in threads])
    assert failures == [], failures[:5]
    assert time.monotonic() - started < 120


async def test_50mb_message_byte_identical(env: ProxyEnv) -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!@#$%^&*()_+-=[]{}\r\n"
    body = line * (50 * 1024 * 1024 // len(line))
    message = b"Subject: big\r\n\r\n" + body

    def session() -> None:
        client = connect(env)
        login(client, USER, PASSWORD)
        assert client.append("INBOX", None, None, message)[0] == "OK"
        client.select("INBOX")
        typ, data = client.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == message
        client.logout()

    await asyncio.to_thread(session)


async def test_upstream_rejection_refreshes_once(env: ProxyEnv) -> None:
    """The mail server stops honouring the proxy's cached token: refresh once, then log in."""

    def session() -> None:
        client = connect(env)
        login(client, USER, PASSWORD)
        client.logout()

    await asyncio.to_thread(session)  # the proxy now holds a token it believes valid
    env.upstream.revoke(USER, access_tokens=True, refresh_tokens=False)
    env.upstream.reset_stats()
    await asyncio.to_thread(session)
    assert env.upstream.stats()["grant_types"] == {"refresh_token": 1}


async def test_upstream_keeps_rejecting(env: ProxyEnv) -> None:
    """A token refused again after a refresh: the server's own text reaches the client."""
    env.upstream.configure(access_token_lifetime=3600)

    # The account's mailbox name upstream differs from the user the tokens are for.
    from proxy.config import Account
    account = env.config.accounts[USER]
    env.config.accounts[USER] = Account(account.name, account.provider, account.flow,
                                        upstream_user="someone-else@contoso.example")
    try:
        text = await asyncio.to_thread(login_error, env)
    finally:
        env.config.accounts[USER] = account
    assert "[AUTHENTICATIONFAILED]" in text and "AUTHENTICATE failed" in text
