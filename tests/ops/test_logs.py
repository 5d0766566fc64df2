"""No secret reaches the logs, at debug level, through whole sessions of a real ``run``.

The proxy runs as a child process with ``--log-level debug`` and its stderr connected as the
journal's would be (``JOURNAL_STREAM`` names the file), so the journald line format is checked
on the way. Clients log in over IMAP (LOGIN with a literal, AUTHENTICATE PLAIN with and without
an initial response, a wrong password) and SMTP (AUTH PLAIN, AUTH LOGIN, a message). Then every
secret is searched for: the local passwords in clear and every base64 form they travelled in,
the client secret, and every live token: those in the token file (unlocked here) and the XOAUTH2
strings that carried them upstream.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import json
import os
import smtplib
from pathlib import Path

from proxy import store
from proxy.demo.process import DemoUpstream
from proxy.logs import _render
from proxy.secret import Secret
from tests.ops.util import NotifySocket, ProxyProcess
from tests.proxyenv import (
    CLIENT_SECRET,
    PASSWORD,
    USER,
    authorise,
    config_dict,
    make_config,
    to_toml,
)

WRONG = "Wr0ng-Horse-Battery-Staple"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def imap_sessions(port: int) -> None:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.literal = PASSWORD.encode()  # type: ignore[attr-defined]
    assert client._simple_command("LOGIN", USER)[0] == "OK"  # type: ignore[attr-defined]
    client.state = "AUTH"
    client.select("INBOX")
    client.logout()

    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    assert client.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())[0] == "OK"
    client.logout()

    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)  # initial response (SASL-IR)
    tag = client._new_tag().decode()  # type: ignore[attr-defined]
    client.send(f"{tag} AUTHENTICATE PLAIN {b64(f'{chr(0)}{USER}{chr(0)}{PASSWORD}')}\r\n".encode())
    while not (line := client.readline()).startswith(tag.encode()):
        pass
    assert b" OK " in line, line
    client.logout()

    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        client.login(USER, WRONG)
    except imaplib.IMAP4.error:
        pass
    else:
        raise AssertionError("a wrong password logged in")
    client.logout()


def smtp_sessions(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        assert s.docmd("AUTH", "PLAIN " + b64(f"\0{USER}\0{PASSWORD}"))[0] == 235
        assert s.sendmail(USER, ["bob@contoso.example"],
                          b"Subject: leak test\r\n\r\nnothing secret here\r\n") == {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        assert s.docmd("AUTH", "LOGIN " + b64(USER))[0] == 334
        assert s.docmd(b64(PASSWORD))[0] == 235
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        assert s.docmd("AUTH", "PLAIN " + b64(f"\0{USER}\0{WRONG}"))[0] == 535


def cache_secrets(token_store: store.TokenStore) -> set[str]:
    """Every token in the account's MSAL cache (access, refresh, id tokens)."""
    payload = token_store.unlock(USER, Secret(PASSWORD)).payload
    cache = json.loads(payload.decode())
    found = {entry["secret"] for section in cache.values() if isinstance(section, dict)
             for entry in section.values() if isinstance(entry, dict) and "secret" in entry}
    assert found, "no tokens in the token file?"
    return found


def secret_forms(tokens: set[str]) -> list[str]:
    forms = [CLIENT_SECRET, WRONG, b64(WRONG), b64(f"\0{USER}\0{WRONG}")]
    for password in (PASSWORD,):
        forms += [password, _render(password), repr(password)[1:-1], b64(password),
                  b64(f"\0{USER}\0{password}"), b64(f"{USER}\0{password}"),
                  password.encode("unicode_escape").decode()]
    for token in tokens:
        forms += [token, token[-24:], b64(f"user={USER}\x01auth=Bearer {token}\x01\x01")]
    return forms


async def test_no_secret_in_debug_logs(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    token_store = authorise(make_config(tmp_path, demo_upstream, protocols=("imap", "smtp")),
                            demo_upstream)
    tokens = cache_secrets(token_store)
    data = config_dict(tmp_path, demo_upstream, protocols=("imap", "smtp"))
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    log = tmp_path / "proxy.log"
    log.touch()
    st = os.stat(log)
    notify = NotifySocket()
    proc = ProxyProcess(path, log, notify=notify, args=("--log-level", "debug"),
                        env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    try:
        await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
        await asyncio.to_thread(imap_sessions, proc.port("listening", " listener=imap "))
        await asyncio.to_thread(smtp_sessions, proc.port("listening", " listener=smtp "))
        # A forced refresh too: Microsoft revokes the access tokens, the proxy gets new ones.
        demo_upstream.revoke(USER, access_tokens=True)
        imap = proc.port("listening", " listener=imap ")
        await asyncio.to_thread(imap_sessions_after_revoke, imap)
    finally:
        proc.stop()
        notify.close()
    tokens |= cache_secrets(token_store)
    text = proc.text()
    assert "event=login" in text and "result=bad_password" in text and "result=ok" in text
    assert "<7>level=debug " in text  # debug lines were written, with journald priorities
    assert all(line.startswith("<") for line in text.splitlines()), text
    for form in secret_forms(tokens):
        assert form not in text, f"a secret ({len(form)} characters) reached the log"


def imap_sessions_after_revoke(port: int) -> None:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.literal = PASSWORD.encode()  # type: ignore[attr-defined]
    client._simple_command("LOGIN", USER)  # type: ignore[attr-defined]  # NO: needs login
    client.logout()
