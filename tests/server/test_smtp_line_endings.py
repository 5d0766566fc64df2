"""Bare line endings in a message, and an upstream that answers more than it was asked:
smtplib → proxy → fake Microsoft 365. (The smuggling attack itself, against a Postfix that
takes a bare LF as a line end, is in ``tests/realservers/test_smuggling_postfix.py``.)"""

from __future__ import annotations

import logging
import smtplib
import socket
from pathlib import Path
from typing import Any

import pytest

from proxy.demo.process import DemoUpstream
from proxy.server.smtp_upstream import queue_id
from tests.proxyenv import USER, ProxyEnv
from tests.server.smtp_util import (
    DEVICE_PASSWORD,
    RCPT,
    client,
    in_thread,
    message,
    message_count,
    start_smtp_proxy,
    wait_until_read,
)


@pytest.fixture
async def proxy(tmp_path: Path, demo_upstream: DemoUpstream, request: pytest.FixtureRequest
                ) -> Any:
    bare = getattr(request, "param", "reject")
    env = await start_smtp_proxy(tmp_path, demo_upstream,
                                 listener_extra={"smtp": {"bare_line_endings": bare}})
    yield env
    await env.daemon.stop(grace=1)


def send_raw(s: smtplib.SMTP, raw: bytes) -> tuple[int, bytes]:
    """The message bytes as they are: smtplib's ``data()`` would mend the line ends."""
    assert s.mail(USER)[0] == 250 and s.rcpt(RCPT)[0] == 250
    s.putcmd("DATA")
    assert s.getreply()[0] == 354
    s.send(raw)
    return s.getreply()


@pytest.mark.parametrize("body, kind", [
    (b"line one\nline two\r\n", "LF"),
    (b"line one\rline two\r\n", "CR"),
    (b"ends with a bare LF\n", "LF"),
])
async def test_a_bare_line_ending_refuses_the_message_and_sends_nothing(
        body: bytes, kind: str, proxy: ProxyEnv, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rejected = message_count("rejected")

    def run() -> tuple[int, bytes]:
        with client(proxy.ports["smtp"]) as s:
            s.login(USER, DEVICE_PASSWORD)
            reply = send_raw(s, message("bare", body) + b".\r\n")
            with pytest.raises(smtplib.SMTPServerDisconnected):
                s.noop()
            return reply

    code, text = await in_thread(run)
    assert code == 550
    assert text.startswith(f"5.6.11 Bare {kind} in the message: SMTP lines end with CR LF".encode())
    assert await in_thread(lambda: proxy.upstream.mailbox(RCPT)) == []
    assert message_count("rejected") == rejected + 1
    logged = [r for r in caplog.records if r.getMessage() == "message"]
    assert logged[-1].fields["result"] == "rejected"  # type: ignore[attr-defined]
    assert f"bare {kind}" in logged[-1].fields["reason"]  # type: ignore[attr-defined]
    # The next session is served as usual.
    await in_thread(lambda: _send_ok(proxy.ports["smtp"], "after"))
    assert len(await in_thread(lambda: proxy.upstream.mailbox(RCPT))) == 1


@pytest.mark.parametrize("proxy", ["normalise"], indirect=True)
async def test_normalise_sends_crlf_and_ends_where_a_lenient_server_would(
        proxy: ProxyEnv) -> None:
    def run() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with client(proxy.ports["smtp"]) as s:
            s.login(USER, DEVICE_PASSWORD)
            first = send_raw(s, message("lf only", b"one\ntwo\rthree\n") + b".\nNOOP\r\n")
            return first, s.getreply()  # NOOP after the dot line: a command of the session

    (code, text), noop = await in_thread(run)
    assert code == 250 and queue_id(text.decode()) is not None
    assert noop[0] == 250
    assert await in_thread(lambda: proxy.upstream.mailbox(RCPT)) == [
        message("lf only", b"one\r\ntwo\r\nthree\r\n")]


def _send_ok(port: int, subject: str) -> None:
    with client(port) as s:
        s.login(USER, DEVICE_PASSWORD)
        assert s.sendmail(USER, [RCPT], message(subject)) == {}


async def test_an_extra_upstream_reply_closes_that_upstream_session(
        proxy: ProxyEnv, caplog: pytest.LogCaptureFixture) -> None:
    """The upstream answers the end of a message twice: the first reply is the message's,
    the session is closed (the second would have been taken for the next command's reply)
    and the next message goes through a new one."""
    caplog.set_level(logging.INFO)
    proxy.upstream.configure(smtp_extra_reply_after_data=True)

    def run() -> list[tuple[int, bytes]]:
        with client(proxy.ports["smtp"]) as s:
            s.login(USER, DEVICE_PASSWORD)
            assert s.mail(USER)[0] == 250 and s.rcpt(RCPT)[0] == 250
            replies = [s.data(message("one"))]
            proxy.upstream.configure(smtp_extra_reply_after_data=False)
            replies.append(s.mail(USER))
            replies.append(s.rcpt(RCPT))
            replies.append(s.data(message("two")))
            return replies

    first, mail, rcpt, second = await in_thread(run)
    assert first[0] == 250 and second[0] == 250
    assert queue_id(first[1].decode()) != queue_id(second[1].decode())
    assert mail == (250, b"2.1.0 Sender OK") and rcpt[0] == 250  # not the stray "250 2.0.0"
    assert [m.split(b"Subject: ")[1][:3] for m in
            await in_thread(lambda: proxy.upstream.mailbox(RCPT))] == [b"one", b"two"]
    events = [r.getMessage() for r in caplog.records]
    assert "upstream_out_of_step" in events
    assert events.index("upstream_reconnected") > events.index("upstream_out_of_step")


@pytest.mark.parametrize("cut", [1, 2, 3, 4], ids=["CRLF.CR|LF", "CRLF.|CRLF", "CRLF|.CRLF",
                                                   "CR|LF.CRLF"])
async def test_an_end_of_data_split_across_reads_ends_the_message_once(
        cut: int, proxy: ProxyEnv) -> None:
    """The client sends its message with the end-of-data line cut ``cut`` bytes before its
    end, and the rest only once the proxy has read the first part: the message is sent
    upstream as it was, without a stuffed dot, and the client hears the upstream's 250 at
    once (it used to hear a 421 after the 10-minute end-of-data timeout)."""
    whole = message("split") + b".\r\n"

    def run() -> tuple[int, bytes]:
        with client(proxy.ports["smtp"]) as s:
            s.login(USER, DEVICE_PASSWORD)
            assert s.mail(USER)[0] == 250 and s.rcpt(RCPT)[0] == 250
            s.putcmd("DATA")
            assert s.getreply()[0] == 354
            s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.send(whole[:-cut])
            wait_until_read(s.sock)
            s.sock.settimeout(10)
            s.send(whole[-cut:])
            reply = s.getreply()
            assert s.noop()[0] == 250
            return reply

    code, text = await in_thread(run)
    assert code == 250 and queue_id(text.decode()) is not None
    assert await in_thread(lambda: proxy.upstream.mailbox(RCPT)) == [message("split")]
