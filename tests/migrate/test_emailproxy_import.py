"""From the real email-oauth2-proxy to xoauth2-proxy with no new sign-in.

email-oauth2-proxy (installed from PyPI) authorises three accounts against the embedded fake
Microsoft 365 through its own code and stores their tokens, encrypted, in its own config. Then
`xoauth2-proxy import emailproxy` reads that config, our daemon takes over the same ports, and
imaplib, poplib and smtplib log in with the same passwords. The fake Entra's record of grants
shows refreshes only: nobody signed in again.
"""

from __future__ import annotations

import asyncio
import configparser
import imaplib
import os
import poplib
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.demo.process import DemoUpstream
from proxy.server.daemon import Daemon
from tests.migrate.peer import Peer, config_text, free_port
from tests.ops.util import PROJECT_ROOT

ALICE, BOB, CAROL = "alice@contoso.example", "bob@contoso.example", "carol@contoso.example"
GMAIL = "dave@gmail.com"
# Spaces and quotes on purpose (imaplib sends only ASCII in LOGIN).
PASSWORDS = {ALICE: "alice's old password", BOB: 'b0b "quoted" password', CAROL: "carol-pass-1"}


def run_import(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-m", "proxy", "import", "emailproxy", *args],
                          capture_output=True, text=True, timeout=180, env=env, cwd=PROJECT_ROOT)


def imap_login(port: int, user: str, password: str) -> str:
    with imaplib.IMAP4("127.0.0.1", port, timeout=30) as imap:
        typ, _ = imap.login(user, password)
        imap.select("INBOX")
        return typ


def pop_login(port: int, user: str, password: str) -> bytes:
    pop = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        pop.user(user)
        return pop.pass_(password)
    finally:
        pop.quit()


def smtp_login(port: int, user: str, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        code, _ = smtp.login(user, password)
        smtp.sendmail(user, [user], f"From: {user}\r\nSubject: moved\r\n\r\nhello\r\n")
        return code


@pytest.mark.parametrize("where", ["config", "cache-store"])
async def test_import_keeps_ports_passwords_and_sign_ins(
        tmp_path: Path, demo_upstream: DemoUpstream, emailproxy_python: Path, where: str) -> None:
    """``where``: email-oauth2-proxy keeps its tokens in its config, or with --cache-store in
    a file of their own."""
    ports = {"imap": free_port(), "pop": free_port(), "smtp": free_port()}
    peer_dir = tmp_path / "emailproxy"
    peer_dir.mkdir()
    peer_config = peer_dir / "emailproxy.config"
    peer_config.write_text(config_text(demo_upstream, ports,
                                       {user: free_port() for user in PASSWORDS}, GMAIL))

    cache = peer_dir / "tokens.cache" if where == "cache-store" else None
    peer = Peer(emailproxy_python, peer_config, demo_upstream.ca_file, cache)
    try:
        peer.wait_listening(list(ports.values()))
        for user, password in PASSWORDS.items():
            await asyncio.to_thread(peer.authorise, user, password, ports["imap"])
    finally:
        peer.stop()
    stored = configparser.ConfigParser(interpolation=None)
    stored.read(cache or peer_config)
    for user in PASSWORDS:  # email-oauth2-proxy wrote them itself, encrypted
        assert stored.get(user, "refresh_token", fallback="").startswith("gAAAA"), user
    if cache is not None:  # the config itself holds no token then
        assert "refresh_token" not in peer_config.read_text()
    signed_in = demo_upstream.stats()["grant_types"]
    assert signed_in.get("authorization_code") == 3, signed_in

    demo_upstream.reset_stats()
    passwords = tmp_path / "passwords"
    passwords.write_text(f"{ALICE} {PASSWORDS[ALICE]}\n{BOB} {PASSWORDS[BOB]}\n"
                         f"{CAROL} not-carols-password\n")
    output = tmp_path / "xoauth2-proxy.toml"
    done = run_import(str(peer_config), "--output", str(output), "--state-dir",
                      str(tmp_path / "state"), "--password-file", str(passwords),
                      "--ca-file", demo_upstream.ca_file,
                      *(["--cache-store", str(cache)] if cache else []))
    assert done.returncode == 1, done  # not all accounts: Carol's and the Gmail one skipped
    lines = done.stdout.splitlines()
    assert any(line.startswith(f"{ALICE}: imported") for line in lines), done.stdout
    assert any(line.startswith(f"{BOB}: imported") for line in lines), done.stdout
    carol = [line for line in lines if line.startswith(f"{CAROL}: skipped: ")]
    assert len(carol) == 1 and "does not decrypt" in carol[0], done.stdout
    gmail = [line for line in lines if line.startswith(f"{GMAIL}: skipped: ")]
    assert len(gmail) == 1 and "not a Microsoft 365 account" in gmail[0], done.stdout
    assert "imported 2 of 4 accounts" in done.stdout
    for secret in (*PASSWORDS.values(), "not-carols-password"):
        assert secret not in done.stdout + done.stderr
    assert demo_upstream.stats()["grant_types"] == {"refresh_token": 2}

    config = config_mod.load(output)
    assert {li.listen.port for li in config.listeners} == set(ports.values())
    assert set(config.accounts) == {ALICE, BOB, CAROL}  # Carol's can `xoauth2-proxy login`
    daemon = Daemon(config)
    await daemon.start()
    try:
        assert sorted(daemon.ports().values()) == sorted(ports.values())
        for user in (ALICE, BOB):
            password = PASSWORDS[user]
            assert await asyncio.to_thread(imap_login, ports["imap"], user, password) == "OK"
            assert (await asyncio.to_thread(pop_login, ports["pop"], user, password)
                    ).startswith(b"+OK")
            assert await asyncio.to_thread(smtp_login, ports["smtp"], user, password) == 235
    finally:
        await daemon.stop(grace=1)
    stats = demo_upstream.stats()
    assert set(stats["grant_types"]) == {"refresh_token"}, stats
    assert stats["authorize_requests"] == 0 and stats["devicecode_requests"] == 0, stats
    assert len(demo_upstream.mailbox(ALICE)) == 1 and len(demo_upstream.mailbox(BOB)) == 1
