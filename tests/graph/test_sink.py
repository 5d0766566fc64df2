"""``GraphSink`` and ``GraphClient`` against the fake Graph over HTTPS, with tokens from the token
service (real MSAL against the fake Entra): MIME sends byte for byte, a 25 MB message through a
draft and upload sessions, the envelope deciding the recipients, and each refusal's reply."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from proxy import config as config_mod
from proxy.auth.errors import AuthorisationNeeded
from proxy.auth.service import TokenService
from proxy.demo.process import DemoUpstream
from proxy.graph import client as client_mod
from proxy.graph import sink as sink_mod
from proxy.graph.client import GraphClient
from proxy.graph.sink import GraphSink, spool_dir
from proxy.secret import Secret
from tests.graph.util import graph_config
from tests.proxyenv import PASSWORD, USER, authorise

MIME = (b"From: Alice <alice@contoso.example>\r\nTo: bob@example.com, header.only@example.com\r\n"
        b"Subject: through Graph\r\nMessage-ID: <m1@contoso.example>\r\n\r\n"
        b"first line\r\n..a line that began with a dot\r\n.\r\n".replace(b"\r\n.\r\n", b"\r\n"))


@dataclass
class Env:
    cfg: config_mod.Config
    tokens: TokenService
    client: GraphClient
    upstream: DemoUpstream

    def sink(self, **kw: object) -> GraphSink:
        async def token(rejected: str | None) -> str:
            return await self.tokens.access_token(USER, Secret(PASSWORD), "graph",
                                                  rejected=rejected)
        args: dict = {"client": self.client, "account": USER, "mailbox": USER, "token": token,
                      "spool": spool_dir(self.cfg.state_dir), "size_limit": 150 * 1024 * 1024}
        return GraphSink(**{**args, **kw})


@pytest.fixture
async def env(tmp_path: Path, demo_upstream: DemoUpstream) -> AsyncIterator[Env]:
    cfg = graph_config(tmp_path, demo_upstream)
    tokens = TokenService(cfg, authorise(cfg, demo_upstream))
    client = GraphClient(cfg.graph.upstreams["graph"])
    yield Env(cfg, tokens, client, demo_upstream)
    await client.close()
    await tokens.aclose()


async def send(sink: GraphSink, message: bytes, recipients: list[str],
               sender: str = USER, step: int = 7) -> tuple[int, str]:
    assert (await sink.mail(sender, [])).code == 250
    for rcpt in recipients:
        assert (await sink.rcpt(rcpt, [])).code == 250
    assert (await sink.data()).code == 354
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    stuffed = b"." + stuffed if stuffed.startswith(b".") else stuffed
    for first in range(0, len(stuffed), step):  # odd chunk sizes cut CR LF and dots apart
        await sink.write(stuffed[first:first + step])
    reply = await sink.end()
    return reply.code, reply.text


async def test_mime_send_byte_for_byte_with_envelope_recipients(env: Env) -> None:
    code, text = await send(env.sink(), MIME, ["bob@example.com", "bcc.only@example.com"])
    assert code == 250 and text.startswith("2.0.0 OK queued as ") and "Graph" in text
    expected = MIME.replace(b"bob@example.com, header.only@example.com", b"bob@example.com")
    assert env.upstream.mailbox("bob@example.com") == [expected]
    assert env.upstream.mailbox("bcc.only@example.com") == [expected]  # Bcc stripped
    assert env.upstream.mailbox("header.only@example.com") == []
    assert not [n for n in os.listdir(spool_dir(env.cfg.state_dir)) if n.startswith("msg-")]
    assert oct(spool_dir(env.cfg.state_dir).stat().st_mode & 0o777) == "0o700"


async def test_unchanged_header_is_sent_byte_identical(env: Env) -> None:
    raw = (b"From: alice@contoso.example\r\nTo: bob@example.com\r\nSubject: =?utf-8?q?=C3=A9?=\r\n"
           b"\r\n\xc3\xa9 8bit\r\n.leading dot\r\nlast")
    code, _ = await send(env.sink(), raw + b"\r\n", ["bob@example.com"], step=1)
    assert code == 250
    assert env.upstream.mailbox("bob@example.com") == [raw + b"\r\n"]


def big_message(size: int) -> tuple[bytes, bytes, bytes]:
    scan = os.urandom(size)
    note = b"plain attachment\n" * 10
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = USER
    msg["To"] = "bob@example.com"
    msg["Cc"] = "header.only@example.com"
    msg["Reply-To"] = "desk@contoso.example"
    msg["Subject"] = "Scan 42"
    msg["Date"] = "Fri, 04 Dec 2026 10:00:00 +0000"
    msg["Message-ID"] = "<scan-42@contoso.example>"
    msg.set_content("text body")
    msg.add_alternative('<p>html body <img src="cid:logo@x"></p>', subtype="html")
    msg.get_payload()[1].add_related(b"GIF89a-logo", "image", "gif", cid="<logo@x>",
                                     filename="logo.gif")
    msg.add_attachment(scan, maintype="application", subtype="pdf", filename="scan.pdf")
    msg.add_attachment(note, maintype="text", subtype="plain", filename="note.txt")
    return msg.as_bytes(), scan, note


async def test_large_message_through_draft_and_upload_sessions(env: Env) -> None:
    raw, scan, note = big_message(25 * 1024 * 1024 // 4 * 3)  # about 25 MB once in base64
    assert len(raw) > 25_000_000
    code, text = await send(env.sink(), raw, ["bob@example.com", "bcc.only@example.com"],
                            step=65536)
    assert code == 250, text
    for rcpt in ("bob@example.com", "bcc.only@example.com"):
        (got,) = env.upstream.mailbox(rcpt)
        parsed = email.message_from_bytes(got, policy=email.policy.default)
        assert parsed["Subject"] == "Scan 42" and parsed["Message-ID"] == "<scan-42@contoso.example>"
        assert parsed["Reply-To"] == "desk@contoso.example" and parsed["Cc"] is None
        assert parsed["X-Original-Date"] == "Fri, 04 Dec 2026 10:00:00 +0000"
        assert "html body" in parsed.get_body(("html",)).get_content()
        parts = {p.get_filename(): p for p in parsed.walk() if p.get_filename()}
        assert parts["scan.pdf"].get_content() == scan
        assert parts["scan.pdf"].get_content_type() == "application/pdf"
        assert parts["note.txt"].get_content().encode() == note
        assert parts["logo.gif"]["Content-ID"] == "<logo@x>"
    assert env.upstream.mailbox("header.only@example.com") == []
    stats = env.upstream.graph_stats()
    assert stats["upload chunk"] >= 5 and stats["send"] == 1 and "sendMail" not in stats
    assert not [n for n in os.listdir(spool_dir(env.cfg.state_dir)) if n.startswith("msg-")]


async def test_throttled_then_accepted(env: Env) -> None:
    env.upstream.configure(graph_throttle=1, graph_retry_after=3)
    code, text = await send(env.sink(), MIME, ["bob@example.com"])
    assert (code, text.split(" ", 1)[0]) == (451, "4.7.0")
    assert "retry after 3 s" in text and "ApplicationThrottled" in text
    assert (await send(env.sink(), MIME, ["bob@example.com"]))[0] == 250


@pytest.mark.parametrize(("knobs", "sender", "rcpt", "expected"), [
    ({}, "boss@contoso.example", "bob@example.com", "550 5.7.1"),
    ({}, USER, "reject.me@example.com", "550 5.1.1"),
    ({"graph_outage": True}, USER, "bob@example.com", "451 4.7.0"),
])
async def test_refusals(env: Env, knobs: dict, sender: str, rcpt: str, expected: str) -> None:
    env.upstream.configure(**knobs)
    message = MIME.replace(b"Alice <alice@contoso.example>", sender.encode())
    code, text = await send(env.sink(), message, [rcpt], sender=sender)
    assert f"{code} {text}".startswith(expected)
    assert "Graph said" in text
    if code == 550 and "5.7.1" in text:
        assert "Send As" in text


async def test_network_failure_and_token_failure(env: Env) -> None:
    closed = GraphClient(dataclasses.replace(env.cfg.graph.upstreams["graph"],
                                             base_url="https://127.0.0.1:9/v1.0"))
    code, text = await send(env.sink(client=closed), MIME, ["bob@example.com"])
    await closed.close()
    assert (code, text[:5]) == (451, "4.4.1")
    code, text = await send(env.sink(token=_bad_token), MIME, ["bob@example.com"])
    assert (code, text[:5]) == (535, "5.7.8") and "xoauth2-proxy login" in text


async def _bad_token(rejected: str | None) -> str:
    raise AuthorisationNeeded(USER, "invalid_grant")


async def test_local_checks(env: Env) -> None:
    sink = env.sink(size_limit=1000)
    assert (await sink.rcpt("bob@example.com", [])).code == 503
    assert (await sink.mail("not an address", [])).code == 501
    assert (await sink.mail(USER, ["SIZE=5000"])).code == 552
    assert (await sink.mail(USER, ["SIZE=500"])).code == 250
    assert (await sink.rcpt("bob", [])).code == 501
    assert (await sink.data()).code == 503
    assert (await sink.rcpt("bob@example.com", [])).code == 250
    assert (await sink.data()).code == 354
    await sink.write(b"x" * 2000 + b"\r\n")
    assert (await sink.end()).code == 552
    assert env.upstream.mailbox("bob@example.com") == []
    assert (await sink.reset()).code == 250


async def test_without_sent_items_copy(tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    cfg = graph_config(tmp_path, demo_upstream, graph={"save_to_sent_items": False})
    tokens = TokenService(cfg, authorise(cfg, demo_upstream))
    env = Env(cfg, tokens, GraphClient(cfg.graph.upstreams["graph"]), demo_upstream)
    raw, scan, _ = big_message(100_000)
    assert (await send(env.sink(), raw, ["bob@example.com"], step=4096))[0] == 250
    (got,) = demo_upstream.mailbox("bob@example.com")
    parsed = email.message_from_bytes(got, policy=email.policy.default)
    parts = {p.get_filename(): p for p in parsed.walk() if p.get_filename()}
    assert parts["scan.pdf"].get_content() == scan
    assert demo_upstream.graph_stats().get("sendMail") == 1
    await env.client.close()
    await tokens.aclose()


SPOOLER = """
import sys
from pathlib import Path
from proxy.graph.spool import spool_dir, spool_prefix
folder = spool_dir(Path(sys.argv[1]))
for name in ("m1", "m1.part"):
    (folder / (spool_prefix(folder) + name)).write_bytes(b"spooled")
print(spool_prefix(folder), flush=True)
sys.stdin.readline()
"""


def spooler(state: Path) -> tuple[subprocess.Popen[str], str]:
    """Another process spooling in ``state``'s folder: it and its files' prefix."""
    proc = subprocess.Popen([sys.executable, "-c", SPOOLER, str(state)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_spool_files_of_a_killed_process_are_removed_on_first_use(tmp_path: Path) -> None:
    victim, dead = spooler(tmp_path)
    survivor, alive = spooler(tmp_path)
    try:
        victim.kill()  # in the middle of a message
        victim.wait()
        folder = tmp_path / "graph-spool"
        (folder / "msg-1-from-an-older-release").write_bytes(b"no lock of its own")
        assert spool_dir(tmp_path) == folder  # this process's first use: the sweep
        left = sorted(os.listdir(folder))
        assert not [name for name in left if name.startswith(dead) or name.startswith("msg-1-")]
        assert f"{alive}m1" in left and f"{alive}m1.part" in left  # a live process's
        assert len([name for name in left if name.startswith("lock-")]) == 2  # its and ours
    finally:
        for proc in (victim, survivor):
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=30)


@pytest.mark.parametrize("cancels", [1, 2])
@pytest.mark.parametrize("stage", ["spool file", "decoded part"])
async def test_a_transaction_cancelled_while_a_thread_writes_leaves_no_file(
        tmp_path: Path, demo_upstream: DemoUpstream, monkeypatch: pytest.MonkeyPatch,
        stage: str, cancels: int) -> None:
    """The SMTP session ends (its task is cancelled, perhaps twice: the client's EOF, then the
    lost connection) while a worker thread creates the spool file or decodes an attachment:
    what the thread writes is removed once it is done, not left behind until the next start."""
    cfg = graph_config(tmp_path, demo_upstream,
                       graph={"save_to_sent_items": False, "mime_limit": 1024})  # the draft path
    tokens = TokenService(cfg, authorise(cfg, demo_upstream))
    env = Env(cfg, tokens, GraphClient(cfg.graph.upstreams["graph"]), demo_upstream)
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    module, name = (sink_mod, "_spool_file") if stage == "spool file" else (client_mod,
                                                                             "_decode_to")
    real = getattr(module, name)

    def gated(*args: Any) -> Any:
        entered.set()
        release.wait(30)
        try:
            return real(*args)
        finally:
            finished.set()

    monkeypatch.setattr(module, name, gated)
    raw, _, _ = big_message(100_000)
    try:
        task = asyncio.create_task(send(env.sink(), raw, ["bob@example.com"], step=65536))
        assert await asyncio.to_thread(entered.wait, 30)
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(finished.wait, 30)
        assert not [n for n in os.listdir(spool_dir(cfg.state_dir)) if n.startswith("msg-")]
        assert demo_upstream.mailbox("bob@example.com") == []
    finally:
        release.set()
        await env.client.close()
        await tokens.aclose()


DAMAGED = (b"From: alice@contoso.example\r\nTo: bob@example.com\r\nSubject: bad base64\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n"
           b"--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
           b"--B\r\nContent-Type: application/pdf; name=\"x.pdf\"\r\n"
           b"Content-Disposition: attachment; filename=\"x.pdf\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n"
           + b"QUJD\r\n" * 400 + b"QUJDRA\r\nQQQ\r\n--B--\r\n")  # 4n + 1 base64 characters


@pytest.mark.parametrize("graph", [{"save_to_sent_items": False}, {"mime_limit": 1024}],
                         ids=["json sendMail", "draft"])
async def test_a_damaged_attachment_is_a_permanent_refusal(
        tmp_path: Path, demo_upstream: DemoUpstream, caplog: pytest.LogCaptureFixture,
        graph: dict[str, Any]) -> None:
    """An attachment whose base64 cannot be decoded is found only while it is read for the
    JSON ``sendMail`` or the draft: the client hears ``554 5.6.0`` (not a ``421`` it would
    retry for ever), and nothing is sent (a draft made for it is deleted)."""
    cfg = graph_config(tmp_path, demo_upstream, graph=graph)
    tokens = TokenService(cfg, authorise(cfg, demo_upstream))
    env = Env(cfg, tokens, GraphClient(cfg.graph.upstreams["graph"]), demo_upstream)
    try:
        code, text = await send(env.sink(), DAMAGED, ["bob@example.com"], step=4096)
        assert code == 554 and text.startswith("5.6.0 "), text
        assert "base64" in text
        assert demo_upstream.mailbox("bob@example.com") == []
        stats = demo_upstream.graph_stats()
        assert stats.get("sendMail", 0) == stats.get("send", 0) == 0
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        await env.client.close()
        await tokens.aclose()
