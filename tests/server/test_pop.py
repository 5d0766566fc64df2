"""POP3 through the proxy to the embedded fake Microsoft 365, with poplib and curl."""

from __future__ import annotations

import asyncio
import base64
import poplib
import shutil
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest

from proxy.demo import certs
from proxy.demo.process import DemoUpstream
from proxy.secret import Secret
from tests.proxyenv import PASSWORD, USER, ProxyEnv, start_proxy

DEVICE = "pop-device-password"  # ASCII: smtplib and curl cannot send UTF-8 credentials


def add_device_password(env: ProxyEnv) -> None:
    env.store.add_password_slot(env.store.unlock(USER, Secret(PASSWORD)), "device", Secret(DEVICE))


def pop(env: ProxyEnv) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", env.ports["pop"], timeout=30)


async def test_user_pass_list_retr_dele(proxy_env: ProxyEnv) -> None:
    messages = [f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode() for i in range(3)]
    for m in messages:
        proxy_env.upstream.deliver(USER, m)

    # poplib sends commands in latin-1, so the UTF-8 password goes through a raw write.
    def utf8_session() -> None:
        client = pop(proxy_env)
        client.user(USER)
        client.sock.sendall(b"PASS " + PASSWORD.encode() + b"\r\n")
        assert client._getresp().startswith(b"+OK")
        assert client.stat()[0] == 3
        listing = client.list()[1]
        assert len(listing) == 3
        assert b"\r\n".join(client.retr(2)[1]) + b"\r\n" == messages[1]
        client.dele(1)
        client.quit()
        again = pop(proxy_env)
        again.user(USER)
        again.sock.sendall(b"PASS " + PASSWORD.encode() + b"\r\n")
        again._getresp()
        assert again.stat()[0] == 2
        again.quit()

    await asyncio.to_thread(utf8_session)
    assert proxy_env.upstream.mailbox(USER) == messages[1:]


async def test_auth_plain_and_bad_password(proxy_env: ProxyEnv) -> None:
    add_device_password(proxy_env)

    def session() -> None:
        client = pop(proxy_env)
        ir = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert client._shortcmd("AUTH PLAIN " + ir).startswith(b"+OK")
        client.quit()
        client = pop(proxy_env)
        client.user(USER)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong-password")
        client.user(USER)  # the same connection may start over (RFC 1939)
        client.pass_(DEVICE)
        client.quit()

    await asyncio.to_thread(session)


async def test_local_stls(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    paths = certs.generate(tmp_path / "local-tls")
    env = await start_proxy(tmp_path, demo_upstream, protocols=("pop",), listener_extra={
        "pop": {"tls": "starttls", "cert_file": str(paths.cert_file),
                "key_file": str(paths.key_file)}})
    add_device_password(env)
    try:
        def session() -> None:
            client = pop(env)
            assert "STLS" in client.capa()
            client.stls(ssl.create_default_context(cafile=str(paths.ca_file)))
            client.user(USER)
            client.pass_(DEVICE)
            assert client.stat()[0] == 0
            client.quit()
        await asyncio.to_thread(session)
    finally:
        await env.daemon.stop(grace=1)


async def test_smtp_in_pop_out_byte_identical(proxy_env: ProxyEnv) -> None:
    add_device_password(proxy_env)
    body = "Grüße, ünïcode\r\n".encode() + b"..leading dot line\r\n" + (b"x" * 900 + b"\r\n") * 10
    sent = (f"From: {USER}\r\nTo: {USER}\r\nSubject: round trip\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + body

    def session() -> bytes:
        with smtplib.SMTP("127.0.0.1", proxy_env.ports["smtp"], timeout=30) as smtp:
            smtp.login(USER, DEVICE)
            smtp.sendmail(USER, [USER], sent, mail_options=["BODY=8BITMIME"])
        client = pop(proxy_env)
        client.user(USER)
        client.pass_(DEVICE)
        count = client.stat()[0]
        client.sock.sendall(f"RETR {count}\r\n".encode())
        assert client._getresp().startswith(b"+OK")
        raw = bytearray()
        while True:  # read the multi-line answer raw: poplib would strip line ends
            line = client.file.readline()
            if line == b".\r\n":
                break
            raw += line[1:] if line.startswith(b"..") else line
        client.quit()
        return bytes(raw)

    assert await asyncio.to_thread(session) == sent


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_pop3(proxy_env: ProxyEnv) -> None:
    add_device_password(proxy_env)
    proxy_env.upstream.deliver(USER, b"Subject: for curl\r\n\r\nhello curl\r\n")

    def run(url: str) -> str:
        out = subprocess.run(["curl", "-sS", "--max-time", "30", "--url", url,
                              "--user", f"{USER}:{DEVICE}"], capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.decode()

    base = f"pop3://127.0.0.1:{proxy_env.ports['pop']}"
    assert (await asyncio.to_thread(run, base + "/")).startswith("1 ")
    assert "hello curl" in await asyncio.to_thread(run, base + "/1")
