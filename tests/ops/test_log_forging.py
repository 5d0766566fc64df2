"""A peer cannot forge or disguise a log line: every value is one printable line, and SMTP
refuses control characters in user names and addresses (as IMAP and POP3 do in user names)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import smtplib
from pathlib import Path

import pytest

from proxy.demo.process import DemoUpstream
from proxy.logs import KeyValueFormatter
from tests.ops.util import NotifySocket, ProxyProcess
from tests.proxyenv import PASSWORD, USER, authorise, config_dict, make_config, to_toml

FORGED = "<6>level=info event=login account=ceo@bank.example result=ok"
HOSTILE = [
    "\r\n" + FORGED, "\n" + FORGED, "\x85" + FORGED, "\u2028" + FORGED, "\u2029" + FORGED,
    "\x1b[2K\r" + FORGED, "\x1c\x1d\x1e" + FORGED, "\x0b\x0c" + FORGED,
    "alice\u202e" + "kO=tluser", "\u2066x\u2069", "del\x7f", "nul\x00",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_a_value_renders_as_one_printable_line(value: str) -> None:
    record = logging.LogRecord("proxy.smtp", logging.WARNING, __file__, 1, "login", None, None)
    record.fields = {"user": value, "result": "bad_password"}
    for formatter in (KeyValueFormatter(journald=True, timestamps=False),
                      KeyValueFormatter(journald=False, timestamps=True)):
        line = formatter.format(record)
        assert line.isprintable(), line
        assert len(line.splitlines()) == 1
        assert line.endswith(" result=bad_password")


def test_escapes_say_which_character_it_was() -> None:
    record = logging.LogRecord("proxy", logging.INFO, __file__, 1, "e", None, None)
    record.fields = {"v": "a\u2028b\x1bc\\d\te\U000e0001"}
    line = KeyValueFormatter(journald=False, timestamps=False).format(record)
    assert line == r"level=info event=e v=a\u2028b\x1bc\\d\te\U000e0001"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def smtp_hostile(port: int) -> list[tuple[int, bytes]]:
    replies = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        for name in ("\u2028" + FORGED, "x\x1b[1A" + FORGED, "bob\x85"):
            replies.append(smtp.docmd("AUTH", "PLAIN " + b64(f"\0{name}\0whatever")))
        assert smtp.docmd("AUTH", "LOGIN " + b64("carol\u2029" + FORGED))[0] == 334
        replies.append(smtp.docmd(b64("whatever")))
        assert smtp.docmd("AUTH", "PLAIN " + b64(f"\0{USER}\0{PASSWORD}"))[0] == 235
        smtp.command_encoding = "utf-8"  # what smtplib does for SMTPUTF8 (offered)
        for sender in ("a\u2028" + FORGED.replace(" ", "") + "@b.example", "ceo@bank.example\u202e"):
            replies.append(smtp.docmd("MAIL", f"FROM:<{sender}> SMTPUTF8"))
    return replies


async def test_hostile_names_reach_neither_the_upstream_nor_the_log_raw(
        tmp_path: Path, demo_upstream: DemoUpstream) -> None:
    authorise(make_config(tmp_path, demo_upstream, protocols=("smtp",)), demo_upstream)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config_dict(tmp_path, demo_upstream, protocols=("smtp",))))
    log = tmp_path / "proxy.log"
    log.touch()
    st = os.stat(log)
    notify = NotifySocket()
    proc = ProxyProcess(path, log, notify=notify, args=("--log-level", "debug"),
                        env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    try:
        await asyncio.to_thread(notify.expect, "READY", proc=proc.proc)
        replies = await asyncio.to_thread(smtp_hostile, proc.port("listening", " listener=smtp "))
    finally:
        proc.stop()
        notify.close()
    assert replies[:4] == [(501, b"5.5.2 The user name has control characters")] * 4
    for code, text in replies[4:]:
        assert code == 501 and text.startswith(b"5.1.7 Bad sender address syntax: the address "
                                               b"or its parameters hold control"), text
    text = proc.text()
    assert "event=login" in text and "result=ok" in text  # the real login was logged
    lines = text.split("\n")[:-1]
    for line in lines:
        assert line.isprintable() and line.startswith("<"), repr(line)
    assert not any("account=ceo@bank.example" in line.split(" ", 2)[-1][:80] for line in lines)
