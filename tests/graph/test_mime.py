"""The spooled message's structure found by offsets, checked against the standard ``email``
package, with blocks small enough that boundaries and base64 quads fall across them; and the
recipient rewrite of the copy's header."""

from __future__ import annotations

import binascii
import email
import email.policy
import io
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.graph import mime


def sample(texts: list[bytes], qp: bool) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.com", "s"
    msg.set_content("body")
    for i, data in enumerate(texts):
        if qp:
            msg.add_attachment(data.decode("latin-1"), subtype="plain", cte="quoted-printable",
                               filename=f"f{i}.txt", charset="latin-1")
        else:
            msg.add_attachment(data, maintype="application", subtype="octet-stream",
                               filename=f"f{i}.bin")
    return msg.as_bytes()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.booleans(),
       st.integers(min_value=40, max_value=200))
def test_leaves_and_decoding_match_the_email_package(texts: list[bytes], qp: bool, block: int
                                                     ) -> None:
    raw = sample(texts, qp)
    f = io.BytesIO(raw)
    header, body = mime.read_header(f)
    old = mime.BLOCK
    mime.BLOCK = block
    try:
        leaves = list(mime.leaves(f, mime.parse_header(header), body, len(raw)))
        got = [b"".join(mime.decoded(f, leaf, block=block)) for leaf in leaves]
    finally:
        mime.BLOCK = old
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    expected = [p.get_payload(decode=True) for p in parsed.walk() if not p.is_multipart()]
    assert [leaf.headers.get_filename() for leaf in leaves] == [
        p.get_filename() for p in parsed.walk() if not p.is_multipart()]
    assert got == expected


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=400), st.integers(min_value=1, max_value=40))
def test_a_quoted_printable_line_of_any_length_decodes_in_blocks(data: bytes, block: int
                                                                  ) -> None:
    """One long line (an appliance's base64-less "attachment"): decoded a block at a time,
    escapes and soft line breaks falling across blocks, with what waits for the next block
    never more than a few bytes."""
    line = binascii.b2a_qp(data, istext=False).replace(b"=\n", b"")  # soft breaks joined
    leaf = mime.Leaf(EmailMessage(), 0, len(line))
    leaf.headers["Content-Transfer-Encoding"] = "quoted-printable"
    pieces = list(mime.decoded(io.BytesIO(line), leaf, block=block))
    assert b"".join(pieces) == binascii.a2b_qp(line)
    assert max(len(piece) for piece in pieces) <= block + 4


def test_recipients_header() -> None:
    header = (b"From: a@example.com\r\nTo: Bob <bob@example.com>,\r\n carol@example.com\r\n"
              b"Cc: dave@example.com\r\nBcc: old@example.com\r\nSubject: x\r\n\r\n")
    copy, to, cc, bcc = mime.recipients_header(header, ["BOB@example.com", "erin@example.com"])
    assert copy == (b"From: a@example.com\r\nTo: Bob <bob@example.com>\r\nSubject: x\r\n"
                    b"Bcc: erin@example.com\r\n\r\n")
    assert (to, cc, bcc) == (["bob@example.com"], [], ["erin@example.com"])
    same, *_ = mime.recipients_header(header.replace(b"Bcc: old@example.com\r\n", b""),
                                      ["bob@example.com", "carol@example.com", "dave@example.com"])
    assert same == header.replace(b"Bcc: old@example.com\r\n", b"")


def test_header_without_end_is_refused() -> None:
    with pytest.raises(mime.MessageProblem):
        mime.read_header(io.BytesIO(b"X: " + b"y" * 100), limit=50)


def test_an_address_list_the_parser_gives_up_on_is_rebuilt_not_kept() -> None:
    """A malformed To that a parser returns nothing for (Python's CVE-2023-27043 fix) must not
    go to Graph as written: Graph's MIME sendMail reads its recipients from the header."""
    header = (b"From: a@example.com\r\nTo: alice@example.com, bob@evil.example (unterminated\r\n"
              b"Subject: s\r\n\r\n")
    copy, to, _, bcc = mime.recipients_header(header, ["alice@example.com", "carol@example.com"])
    assert b"bob@evil.example" not in copy
    assert set(to + bcc) == {"alice@example.com", "carol@example.com"}


def test_an_8bit_display_name_does_not_fail_the_message() -> None:
    header = (b"From: a@example.com\r\nTo: J\xf6rg <alice@example.com>, bob@example.com\r\n"
              b"Subject: s\r\n\r\n")
    copy, to, _, bcc = mime.recipients_header(header, ["alice@example.com"])
    assert to == ["alice@example.com"] and bcc == []
    assert b"bob@example.com" not in copy and b"alice@example.com" in copy


def test_a_strict_parser_that_returns_nothing_drops_the_field(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What Pythons with the CVE-2023-27043 fix return for a list they cannot parse: one empty
    pair. The field then carries more addresses than were understood, so it is not kept."""
    monkeypatch.setattr(mime.email.utils, "getaddresses", lambda values: [("", "")])
    header = b"From: a@example.com\r\nTo: alice@example.com, bob@evil.example\r\n\r\n"
    copy, to, _, bcc = mime.recipients_header(header, ["alice@example.com"])
    assert b"bob@evil.example" not in copy and to == [] and bcc == ["alice@example.com"]
