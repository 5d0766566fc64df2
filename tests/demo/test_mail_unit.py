"""Socket-free tests of the fake Microsoft 365 mail servers' pure parts.

The store, XOAUTH2 parsing, the RFC 7628 error document, POP3 dot-stuffing and TOP,
IMAP header-field selection and the SMTP DATA framing, fed whole and byte by byte.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.demo.mail import MailStore
from proxy.demo.mail.common import check_xoauth2, error_challenge, parse_xoauth2
from proxy.demo.mail.imap import _header_fields, _text_search_args
from proxy.demo.mail.pop import _dot_stuff, _top
from proxy.protocol.sasl import SaslError, xoauth2_b64, xoauth2_response

MSG = b"From: a@example.com\r\nSubject: x\r\n\r\nline 1\r\n.dot\r\nline 3\r\n"


def test_store_delivers_byte_identical_and_case_insensitively() -> None:
    store = MailStore()
    store.deliver("Alice@Example.com", MSG)
    store.deliver("alice@example.com", b"second")
    assert store.messages("ALICE@example.COM") == [MSG, b"second"]
    assert store.messages("nobody@example.com") == []
    inbox = store.account("alice@example.com").inbox
    assert [m.uid for m in inbox.messages] == [1, 2]


def test_store_listeners_and_remove() -> None:
    store = MailStore()
    seen: list[bytes] = []
    inbox = store.account("a@x").inbox
    inbox.add_listener(lambda m: seen.append(m.data))
    store.deliver("a@x", b"1")
    inbox.remove(inbox.messages[:1])
    store.deliver("a@x", b"2")
    assert seen == [b"1", b"2"]
    assert store.messages("a@x") == [b"2"]
    assert inbox.messages[0].uid == 2  # UIDs are never reused


def test_account_folders() -> None:
    acct = MailStore().account("a@x")
    assert acct.folder("inbox") is acct.inbox
    assert acct.create("Archive") and not acct.create("Archive") and not acct.create("INBOX")
    assert acct.delete("Archive") and not acct.delete("INBOX")


def test_parse_xoauth2_roundtrip() -> None:
    assert parse_xoauth2(xoauth2_response("a@example.com", "tok.en-_")) == ("a@example.com",
                                                                           "tok.en-_")


@pytest.mark.parametrize("raw", [
    b"", b"user=a\x01auth=Bearer t\x01", b"user=a\x01\x01", b"auth=Bearer t\x01\x01",
    b"user=a\x01auth=Basic t\x01\x01", b"user=a\x01auth=Bearer \x01\x01", b"\xff\x01\x01",
    b"user=a\x01junk\x01\x01",
])
def test_parse_xoauth2_rejects(raw: bytes) -> None:
    with pytest.raises(SaslError):
        parse_xoauth2(raw)


class _Validator:
    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, str]] = []

    def validate(self, token: str, user: str, protocol: str) -> object:
        self.calls.append((token, user, protocol))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _verdict(validator: object, b64: bytes, protocol: str = "imap"):
    results = []
    check_xoauth2(validator, b64, protocol).addCallback(results.append)
    assert len(results) == 1  # a synchronous validator answers at once
    return results[0]


def test_check_xoauth2_verdicts() -> None:
    good = _Validator(True)
    login = _verdict(good, xoauth2_b64("a@x", "T"), "smtp")
    assert (login.ok, login.user, login.app_only) == (True, "a@x", False)
    assert good.calls == [("T", "a@x", "smtp")]
    assert not _verdict(_Validator(False), xoauth2_b64("a@x", "T")).ok
    assert not _verdict(good, b"not base64!").ok
    assert not _verdict(_Validator(RuntimeError("boom")), xoauth2_b64("a@x", "T")).ok

    class AppOnly(_Validator):
        def app_only(self, token: str) -> bool:
            return True

    assert _verdict(AppOnly(True), xoauth2_b64("a@x", "T")).app_only


def test_error_challenge_document() -> None:
    doc = json.loads(base64.b64decode(error_challenge("smtp")))
    assert doc == {"status": "401", "schemes": "bearer",
                   "scope": "https://outlook.office.com/SMTP.Send"}


def test_dot_stuff() -> None:
    assert _dot_stuff(b".a\r\nb\r\n..c\r\n") == b"..a\r\nb\r\n...c\r\n.\r\n"
    assert _dot_stuff(b"no newline") == b"no newline\r\n.\r\n"
    assert _dot_stuff(b"") == b".\r\n"


def test_top() -> None:
    assert _top(MSG, 0) == b"From: a@example.com\r\nSubject: x\r\n\r\n"
    assert _top(MSG, 2) == b"From: a@example.com\r\nSubject: x\r\n\r\nline 1\r\n.dot\r\n"
    assert _top(MSG, 99) == MSG


def test_header_fields() -> None:
    header = b"From: a\r\nSubject: long\r\n folded\r\nTo: b\r\n\r\n"
    assert _header_fields(header, [b"SUBJECT"], False) == b"Subject: long\r\n folded\r\n\r\n"
    assert _header_fields(header, [b"SUBJECT"], True) == b"From: a\r\nTo: b\r\n\r\n"


def test_search_args_decoded_for_header_keys_only() -> None:
    query = [b"SUBJECT", b"hi", b"BODY", b"x", [b"HEADER", b"To", b"bob"], b"LARGER", b"5"]
    assert _text_search_args(query) == [b"SUBJECT", "hi", b"BODY",
                                        b"x", [b"HEADER", "To", "bob"], b"LARGER", b"5"]


# -- SMTP DATA framing, without sockets


class _Transport:
    disconnecting = False

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def writeSequence(self, seq) -> None:
        for data in seq:
            self.write(data)

    def loseConnection(self) -> None:
        self.disconnecting = True

    def getPeer(self):
        class Peer:
            host = "127.0.0.1"
        return Peer()


def _smtp_session(store: MailStore):
    from proxy.demo.knobs import Knobs
    from proxy.demo.mail.smtp import SMTPFactory

    factory = SMTPFactory(store=store, validator=_Validator(True), knobs=Knobs(), tls=None,
                          implicit_tls=True)
    proto = factory.buildProtocol(None)
    transport = _Transport()
    proto.makeConnection(transport)
    proto.setTimeout(None)
    return proto, transport


def _run_smtp(chunks: list[bytes]) -> tuple[MailStore, bytes]:
    store = MailStore()
    proto, transport = _smtp_session(store)
    for chunk in chunks:
        proto.dataReceived(chunk)
    proto.connectionLost(None)
    return store, bytes(transport.out)


def _script(body_stuffed: bytes) -> bytes:
    auth = xoauth2_b64("a@x", "T")
    return (b"EHLO me\r\nAUTH XOAUTH2 " + auth + b"\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n"
            b"DATA\r\n" + body_stuffed + b".\r\nQUIT\r\n")


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_smtp_data_framing(split: str) -> None:
    stuffed = b"..leading dot\r\nmid\r\n..\r\n...x\r\nend\r\n"
    script = _script(stuffed)
    chunks = [script] if split == "whole" else [script[i:i + 1] for i in range(len(script))]
    store, out = _run_smtp(chunks)
    assert store.messages("b@x") == [b".leading dot\r\nmid\r\n.\r\n..x\r\nend\r\n"]
    assert b"250 2.0.0 OK <" in out and out.endswith(b"221 2.0.0 Service closing "
                                                     b"transmission channel\r\n")


def test_smtp_empty_message_and_trailing_input() -> None:
    store, out = _run_smtp([_script(b"") + b"NOOP\r\n"])
    assert store.messages("b@x") == [b""]
    assert out.count(b"\r\n250 2.0.0 OK <") == 1


@given(st.lists(st.sampled_from([b".", b"..", b"\r\n", b"a", b"\r", b"\n", b".\r\n"]),
                max_size=30),
       st.integers(min_value=1, max_value=7))
def test_smtp_data_roundtrip_any_split(parts: list[bytes], step: int) -> None:
    message = b"".join(parts) + b"\r\n"
    stuffed = (b"." if message.startswith(b".") else b"") + message.replace(b"\r\n.",
                                                                         b"\r\n..")
    script = _script(stuffed)
    store, _ = _run_smtp([script[i:i + step] for i in range(0, len(script), step)])
    assert store.messages("b@x") == [message]
