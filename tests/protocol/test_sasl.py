"""proxy.protocol.sasl: PLAIN decoding, XOAUTH2 encoding, RFC 7628 error challenges."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.sasl import (
    SaslError,
    b64decode_strict,
    b64encode,
    decode_plain,
    xoauth2_b64,
    xoauth2_error,
    xoauth2_response,
)
from proxy.secret import Secret


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", b""),
        (b"YWJj", b"abc"),
        ("YWJj", b"abc"),
        (b" YWI= \t", b"ab"),
        (b"YQ==", b"a"),
    ],
)
def test_b64decode_strict(data: bytes | str, expected: bytes) -> None:
    assert b64decode_strict(data) == expected


@pytest.mark.parametrize(
    "data",
    [b"YWJ", b"YW Jj", b"YWJj\r\n", b"Y*Jj", b"YQ==YQ==", "YWJ\u00e9", b"\xffYWJj", b"="],
)
def test_b64decode_strict_rejects(data: bytes | str) -> None:
    with pytest.raises(SaslError):
        b64decode_strict(data)


def test_b64encode() -> None:
    assert b64encode("ö") == b"w7Y="
    assert b64encode(b"\0") == b"AA=="


@pytest.mark.parametrize(
    "raw, user, password",
    [
        (b"\0alice\0pw", "alice", "pw"),
        (b"alice\0alice\0pw", "alice", "pw"),
        ('\0jörg\0p ä"\\ss'.encode(), "jörg", 'p ä"\\ss'),
    ],
)
def test_decode_plain(raw: bytes, user: str, password: str) -> None:
    got_user, got_password = decode_plain(b64(raw))
    assert got_user == user
    assert isinstance(got_password, Secret) and got_password.reveal() == password


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "PLAIN response must be authzid NUL authcid NUL password"),
        (b"alice\0pw", "PLAIN response must be authzid NUL authcid NUL password"),
        (b"\0alice\0p\0w", "PLAIN response must be authzid NUL authcid NUL password"),
        (b"\0\0pw", "PLAIN response has an empty user name"),
        (b"\0alice\0", "PLAIN response has an empty password"),
        (b"\0\xffalice\0pw", "the user name is not valid UTF-8"),
        (b"\0alice\0\xff", "the password is not valid UTF-8"),
        (b"\xff\0alice\0pw", "the authorisation identity is not valid UTF-8"),
        (b"bob\0alice\0pw", "acting for another user (authzid) is not supported"),
    ],
)
def test_decode_plain_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(SaslError) as info:
        decode_plain(b64(raw))
    assert str(info.value) == message


def test_decode_plain_error_does_not_echo_secret() -> None:
    with pytest.raises(SaslError) as info:
        decode_plain(b64(b"bob\0alice\0hunter2"))
    assert "hunter2" not in str(info.value)


def test_xoauth2_response() -> None:
    raw = xoauth2_response("alice@example.com", "tok")
    assert raw == b"user=alice@example.com\x01auth=Bearer tok\x01\x01"
    assert xoauth2_b64("alice@example.com", "tok") == base64.b64encode(raw)


@pytest.mark.parametrize(
    "user, token", [("a\x01b", "t"), ("a\r\nb", "t"), ("a", "t\x01"), ("a", "t\r\n")]
)
def test_xoauth2_response_rejects_control_characters(user: str, token: str) -> None:
    with pytest.raises(SaslError):
        xoauth2_response(user, token)


def _challenge(doc: object) -> bytes:
    return b64(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "challenge, text",
    [
        (
            _challenge({"status": "invalid_token", "scope": "mail", "schemes": "bearer"}),
            "the server rejected the token (status invalid_token, scope mail)",
        ),
        (_challenge({"status": "401"}), "the server rejected the token (status 401)"),
        (_challenge({}), "the server rejected the token (status ?)"),
        (_challenge({"status": 400}), "the server rejected the token (status 400)"),
        (_challenge([1, 2]), "the server rejected the token"),
        (b"not base64", "the server rejected the token"),
        (b64(b"not json"), "the server rejected the token"),
        (b64(b"\xff\xfe"), "the server rejected the token"),
        # found by review: deep nesting raised RecursionError, and CR/LF reached reply text
        (b64(b"[" * 100_000), "the server rejected the token"),
        (
            _challenge({"status": "401\r\n* OK [ALERT] injected", "scope": "a\nb"}),
            "the server rejected the token (status 401 * OK [ALERT] injected, scope a b)",
        ),
    ],
)
def test_xoauth2_error(challenge: bytes, text: str) -> None:
    assert xoauth2_error(challenge) == text


@given(st.binary(max_size=200))
def test_fuzz_decode_plain_raises_only_sasl_error(data: bytes) -> None:
    for candidate in (data, b64(data)):
        try:
            decode_plain(candidate)
        except SaslError:
            pass


@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
            lambda inner: st.one_of(
                st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
            ),
            max_leaves=10,
        ).map(lambda doc: _challenge({"status": doc, "scope": doc})),
    )
)
def test_fuzz_xoauth2_error_is_one_printable_line(challenge: bytes) -> None:
    text = xoauth2_error(challenge)
    assert text.startswith("the server rejected the token")
    assert text.isprintable()
