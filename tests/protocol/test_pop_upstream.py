"""PopUpstreamSide transcripts: replies whole, byte by byte, and several per chunk."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol.events import (
    ProtocolMisuse,
    ReplyKind,
    SendToServer,
    StartServerTLS,
    UpstreamBroken,
    UpstreamLoggedIn,
    UpstreamRejected,
)
from proxy.protocol.pop_upstream import PopUpstreamSide, UpstreamState
from proxy.protocol.sasl import SaslError
from proxy.secret import Secret

USER = "alice@contoso.example"
SHORT = "Zq9tok"  # AUTH line fits in 255 octets: the initial response may be sent
LONG = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + "x" * 1500  # a realistic bearer token


def b64(user: str, token: str) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


ERROR_CHALLENGE = base64.b64encode(json.dumps({"status": "401", "scope": "x"}).encode())

Step = bytes | Callable[[PopUpstreamSide], list]


def make(token: str = LONG, **kwargs: object) -> PopUpstreamSide:
    options: dict = {"user": USER, "token": Secret(token), "starttls": False}
    options.update(kwargs)
    return PopUpstreamSide(**options)


TRAILING = b"+O"  # the start of a next reply, not yet complete


def run(steps: list[Step], mode: str, token: str = LONG, **kwargs: object) -> list:
    """Play ``steps``: bytes fed "whole", "bytewise", "together" (all bytes steps as one
    chunk), or whole with ``TRAILING`` appended to the last bytes step ("trailing")."""
    machine = make(token, **kwargs)
    if mode == "together":
        steps = [b"".join(s for s in steps if isinstance(s, bytes))]
    last = max((i for i, step in enumerate(steps) if isinstance(step, bytes)), default=-1)
    out: list = []
    for i, step in enumerate(steps):
        if isinstance(step, bytes):
            if mode == "trailing" and i == last and step:
                step += TRAILING
            chunks = [step]
            if mode == "bytewise" and step:
                chunks = [step[k : k + 1] for k in range(len(step))]
            for chunk in chunks:
                out += machine.receive(chunk)
        else:
            out += step(machine)
    return out


def check(steps: list[Step], expected: list, token: str = LONG, **kwargs: object) -> None:
    """Fed whole, byte by byte, with every reply in one chunk, and with a trailing partial
    reply (which produces nothing, or becomes ``server_bytes`` after the login)."""
    assert run(steps, "whole", token, **kwargs) == expected
    assert run(steps, "bytewise", token, **kwargs) == expected
    if all(isinstance(s, bytes) and s for s in steps):
        assert run(steps, "together", token, **kwargs) == expected
    trailing = [
        UpstreamLoggedIn(c.capabilities, c.server_bytes + TRAILING)
        if isinstance(c, UpstreamLoggedIn)
        else c
        for c in expected
    ]
    assert run(steps, "trailing", token, **kwargs) == trailing


def send(data: bytes) -> SendToServer:
    return SendToServer(data)


GREETING = b"+OK The Microsoft Exchange POP3 service is ready.\r\n"
CAPA_OK = b"+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n.\r\n"


# --- the happy paths --------------------------------------------------------------------------


def test_long_token_uses_the_continuation_form() -> None:
    check(
        [GREETING, CAPA_OK, b"+ \r\n", b"+OK User successfully authenticated.\r\n"],
        [
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2\r\n"),
            send(b64(USER, LONG) + b"\r\n"),
            UpstreamLoggedIn(None, b""),
        ],
    )


def test_bare_plus_continuation() -> None:
    check(
        [GREETING, CAPA_OK, b"+\r\n", b"+OK\r\n"],
        [
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2\r\n"),
            send(b64(USER, LONG) + b"\r\n"),
            UpstreamLoggedIn(),
        ],
    )


def test_short_token_uses_the_initial_response() -> None:
    line = b"AUTH XOAUTH2 " + b64(USER, SHORT) + b"\r\n"
    assert len(line) <= 255
    check(
        [GREETING, CAPA_OK, b"+OK Logged in.\r\n"],
        [send(b"CAPA\r\n"), send(line), UpstreamLoggedIn()],
        token=SHORT,
    )


def test_initial_response_can_be_forced_for_long_tokens() -> None:
    check(
        [GREETING, CAPA_OK, b"+OK Logged in.\r\n"],
        [send(b"CAPA\r\n"), send(b"AUTH XOAUTH2 " + b64(USER, LONG) + b"\r\n"), UpstreamLoggedIn()],
        initial_response=True,
    )


def test_stls_then_capa_then_auth() -> None:
    check(
        [GREETING, b"+OK Begin TLS\r\n", lambda m: m.tls_started(), CAPA_OK, b"+ \r\n", b"+OK\r\n"],
        [
            send(b"STLS\r\n"),
            StartServerTLS(),
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2\r\n"),
            send(b64(USER, LONG) + b"\r\n"),
            UpstreamLoggedIn(),
        ],
        starttls=True,
    )


def test_capa_error_still_tries_xoauth2() -> None:
    check(
        [GREETING, b"-ERR unknown command\r\n", b"+ \r\n", b"+OK\r\n"],
        [
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2\r\n"),
            send(b64(USER, LONG) + b"\r\n"),
            UpstreamLoggedIn(),
        ],
    )


def test_capabilities_are_recorded_and_unstuffed() -> None:
    m = make()
    m.receive(GREETING + b"+OK list\r\nSASL PLAIN\r\n..odd\r\nUSER\r\n.\r\n")
    assert m.capabilities == ["SASL PLAIN", ".odd", "USER"]
    assert m.state is UpstreamState.AUTH_CONTINUE


def test_server_bytes_after_ok_are_handed_over() -> None:
    # Not byte by byte: after UpstreamLoggedIn the driver relays, it no longer feeds the machine.
    assert run([GREETING, CAPA_OK, b"+ \r\n+OK in\r\n+OK surprise\r\npartial"], "whole") == (
        [
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2\r\n"),
            send(b64(USER, LONG) + b"\r\n"),
            UpstreamLoggedIn(None, b"+OK surprise\r\npartial"),
        ]
    )


def test_lowercase_status_and_bare_lf_are_tolerated() -> None:
    check(
        [b"+ok hi\n", b"-err\n", b"+ \n", b"+ok\n"],
        [
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2\r\n"),
            send(b64(USER, LONG) + b"\r\n"),
            UpstreamLoggedIn(),
        ],
    )


# --- rejections -------------------------------------------------------------------------------


def test_err_after_the_token_is_rejected_verbatim() -> None:
    check(
        [
            GREETING,
            CAPA_OK,
            b"+ \r\n",
            b"-ERR [AUTH]  Authentication failure: unknown user name or bad password.\r\n",
        ],
        [
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2\r\n"),
            send(b64(USER, LONG) + b"\r\n"),
            UpstreamRejected(
                "[AUTH]  Authentication failure: unknown user name or bad password.",
                ReplyKind.AUTH_FAILED,
                "AUTH",
            ),
        ],
    )


def test_err_to_auth_line_is_rejected() -> None:
    check(
        [GREETING, CAPA_OK, b"-ERR Unsupported mechanism\r\n"],
        [send(b"CAPA\r\n"), send(b"AUTH XOAUTH2\r\n"), UpstreamRejected("Unsupported mechanism", ReplyKind.OTHER)],
    )


def test_error_challenge_is_acknowledged_with_an_empty_line() -> None:
    steps: list[Step] = [
        GREETING,
        CAPA_OK,
        b"+ \r\n",
        b"+ " + ERROR_CHALLENGE + b"\r\n",
        b"-ERR [AUTH] Authentication failed.\r\n",
    ]
    check(
        steps,
        [
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2\r\n"),
            send(b64(USER, LONG) + b"\r\n"),
            send(b"\r\n"),
            UpstreamRejected("[AUTH] Authentication failed.", ReplyKind.AUTH_FAILED, "AUTH"),
        ],
    )
    m = make()
    for step in steps:
        m.receive(step)  # type: ignore[arg-type]
    assert m.error_detail == "the server rejected the token (status 401, scope x)"


def test_error_challenge_with_initial_response() -> None:
    check(
        [GREETING, CAPA_OK, b"+ " + ERROR_CHALLENGE + b"\r\n", b"-ERR no\r\n"],
        [
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2 " + b64(USER, SHORT) + b"\r\n"),
            send(b"\r\n"),
            UpstreamRejected("no", ReplyKind.AUTH_FAILED),
        ],
        token=SHORT,
    )


def test_err_without_text() -> None:
    check(
        [GREETING, CAPA_OK, b"+ \r\n", b"-ERR\r\n"],
        [
            send(b"CAPA\r\n"),
            send(b"AUTH XOAUTH2\r\n"),
            send(b64(USER, LONG) + b"\r\n"),
            UpstreamRejected("", ReplyKind.AUTH_FAILED),
        ],
    )


# --- broken upstreams -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "greeting", [b"-ERR busy\r\n", b"* OK IMAP\r\n", b"220 smtp\r\n", b"+ \r\n"]
)
def test_bad_greeting_is_broken(greeting: bytes) -> None:
    [cmd] = run([greeting], "whole")
    assert isinstance(cmd, UpstreamBroken)
    assert "greeting" in cmd.text


def test_stls_refused_is_broken() -> None:
    out = run([GREETING, b"-ERR no TLS here\r\n"], "bytewise", starttls=True)
    assert out[0] == send(b"STLS\r\n")
    assert isinstance(out[1], UpstreamBroken) and "refused STLS" in out[1].text


def test_data_after_stls_ok_is_broken() -> None:
    m = make(starttls=True)
    m.receive(GREETING)
    [cmd] = m.receive(b"+OK go\r\n+OK injected\r\n")
    assert cmd == UpstreamBroken("the server sent data after accepting STLS")
    m = make(starttls=True)
    m.receive(GREETING)
    assert m.receive(b"+OK go\r\n") == [StartServerTLS()]
    assert m.receive(b"late") == [UpstreamBroken("the server sent data before the TLS handshake")]


@pytest.mark.parametrize(
    "steps",
    [
        [b""],
        [GREETING, b""],
        [GREETING, CAPA_OK[:10], b""],
        [GREETING, CAPA_OK, b""],
        [GREETING, CAPA_OK, b"+ \r\n", b""],
        [GREETING, CAPA_OK, b"+ \r\n", b"+ abc\r\n", b""],
    ],
)
def test_close_at_any_point_is_broken(steps: list[bytes]) -> None:
    out = run(steps, "whole")  # type: ignore[arg-type]
    assert isinstance(out[-1], UpstreamBroken)
    assert "closed" in out[-1].text


@pytest.mark.parametrize(
    "steps",
    [
        [GREETING, b"garbage\r\n"],
        [GREETING, CAPA_OK, b"* what\r\n"],
        [GREETING, CAPA_OK, b"+ \r\n", b"250 ok\r\n"],
        [GREETING, CAPA_OK, b"+ \r\n", b"+ abc\r\n", b"+ again\r\n"],
    ],
)
def test_garbage_is_broken(steps: list[bytes]) -> None:
    out = run(steps, "bytewise")  # type: ignore[arg-type]
    assert isinstance(out[-1], UpstreamBroken)
    assert "unexpected reply" in out[-1].text


def test_over_long_line_is_broken() -> None:
    m = make(max_line=64)
    assert m.receive(b"+OK " + b"x" * 61) == []
    [cmd] = m.receive(b"x")
    assert cmd == UpstreamBroken("the server sent a line over 64 octets")
    assert m.buffered_bytes == 0
    assert m.receive(b"+OK\r\n") == []


def test_too_many_capability_lines_is_broken() -> None:
    out = make().receive(GREETING + b"+OK\r\n" + b"X\r\n" * 300)
    assert out[-1] == UpstreamBroken("the server sent over 256 capability lines")


# --- misuse and secrets -----------------------------------------------------------------------


def test_receive_after_login_is_misuse_and_after_failure_is_ignored() -> None:
    m = make(SHORT)
    m.receive(GREETING + CAPA_OK + b"+OK\r\n")
    with pytest.raises(ProtocolMisuse):
        m.receive(b"+OK 1 2\r\n")
    m = make()
    m.receive(b"-ERR\r\n")
    assert m.receive(b"+OK\r\n") == []
    assert m.receive(b"") == []


def test_tls_started_out_of_turn_is_misuse() -> None:
    with pytest.raises(ProtocolMisuse):
        make().tls_started()


def test_user_with_control_characters_is_refused_at_construction() -> None:
    with pytest.raises(SaslError):
        make(user="a\r\nb")


def test_the_token_never_shows_in_a_repr() -> None:
    m = make(SHORT)
    out = m.receive(GREETING + CAPA_OK)
    assert SHORT not in repr(out) and b64(USER, SHORT).decode() not in repr(out)
    assert SHORT not in repr(m.__dict__)


# --- fuzzing ----------------------------------------------------------------------------------

VOCABULARY = [
    GREETING,
    b"+OK\r\n",
    b"-ERR no\r\n",
    b"+ \r\n",
    b"+ " + ERROR_CHALLENGE + b"\r\n",
    b"+ !!\r\n",
    b".\r\n",
    b"SASL XOAUTH2\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"x" * 70,
]


def assert_lines(data: bytes) -> None:
    assert data.endswith(b"\r\n")
    rest = data.replace(b"\r\n", b"")
    assert b"\r" not in rest and b"\n" not in rest


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(VOCABULARY)), max_size=30),
    starttls=st.booleans(),
    initial_response=st.booleans(),
    data=st.data(),
)
def test_fuzz_upstream(
    chunks: list[bytes], starttls: bool, initial_response: bool, data: st.DataObject
) -> None:
    m = make(LONG, starttls=starttls, initial_response=initial_response, max_line=64)
    stream = b"".join(chunks)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    pieces = [p for p in pieces if p] + [b""]
    for piece in pieces:
        pending = m.receive(piece)
        while pending:
            cmd = pending.pop(0)
            if isinstance(cmd, SendToServer):
                assert_lines(cmd.data)
            elif isinstance(cmd, StartServerTLS):
                pending += m.tls_started()
            elif isinstance(cmd, UpstreamLoggedIn):
                assert m.state is UpstreamState.DONE
                return
            else:
                assert isinstance(cmd, UpstreamRejected | UpstreamBroken)
                assert "\n" not in cmd.text and "\r" not in cmd.text
                assert m.state is UpstreamState.FAILED
            assert m.buffered_bytes <= 65
    assert m.state is UpstreamState.FAILED  # the close at the end always ends the machine


@settings(max_examples=200)
@given(data=st.data())
def test_any_split_gives_the_same_commands(data: st.DataObject) -> None:
    session = GREETING + CAPA_OK + b"+ \r\n" + b"+ " + ERROR_CHALLENGE + b"\r\n-ERR nope\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(session)), max_size=8)))
    pieces = [session[a:b] for a, b in zip([0, *cuts], [*cuts, len(session)], strict=True)]
    pieces = [p for p in pieces if p]
    assert run(pieces, "whole") == run([session], "whole")  # type: ignore[arg-type]


def test_garbage_reply_to_stls_is_broken() -> None:
    out = run([GREETING, b"* OK\r\n"], "whole", starttls=True)
    assert out == [send(b"STLS\r\n"), UpstreamBroken("unexpected reply to STLS: '* OK'")]


def test_tls_started_after_failure_is_ignored() -> None:
    m = make(starttls=True)
    m.receive(GREETING + b"+OK\r\n")
    assert m.receive(b"") == [UpstreamBroken("the server closed the connection (tls_pending)")]
    assert m.tls_started() == []
