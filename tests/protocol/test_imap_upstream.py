"""ImapUpstreamSide as transcripts: replies whole, one byte at a time, and with trailing data."""

from __future__ import annotations

import base64
import json

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
from proxy.protocol.imap import ImapUpstreamSide
from proxy.protocol.sasl import SaslError
from proxy.secret import Secret
from tests.protocol.util import run_transcript

S = SendToServer
USER = "alice@example.com"
TOKEN = "eyJ0eXAi.token"
B64 = base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
AUTH_IR = S(b"x1 AUTHENTICATE XOAUTH2 " + B64 + b"\r\n")
GREETING_IR = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=XOAUTH2] ready\r\n"


def make(starttls: bool = False, max_line: int = 64 * 1024, ask_capabilities: bool = False):
    return lambda: ImapUpstreamSide(
        user=USER, token=Secret(TOKEN), starttls=starttls, max_line=max_line,
        ask_capabilities=ask_capabilities,
    )


def error_challenge(status: str = "401", scope: str | None = None) -> bytes:
    doc: dict = {"status": status, "schemes": "bearer"}
    if scope:
        doc["scope"] = scope
    return base64.b64encode(json.dumps(doc).encode())


def test_greeting_capabilities_with_sasl_ir() -> None:
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (
                b"* CAPABILITY IMAP4rev1 IDLE\r\n"
                b"x1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n",
                [UpstreamLoggedIn("IMAP4rev1 IDLE MOVE", b"")],
            ),
        ],
    )


def test_untagged_capability_after_authenticate_is_reported() -> None:
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (
                b"* CAPABILITY IMAP4rev1 IDLE\r\nx1 OK Logged in\r\n",
                [UpstreamLoggedIn("IMAP4rev1 IDLE", b"")],
            ),
        ],
    )


def test_login_ok_without_capabilities_and_server_bytes() -> None:
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (
                b"x1 OK AUTHENTICATE completed.\r\n* 3 EXISTS\r\n* partial",
                [UpstreamLoggedIn(None, b"* 3 EXISTS\r\n* partial")],
            ),
        ],
    )


def test_no_greeting_capabilities_and_no_sasl_ir() -> None:
    run_transcript(
        make(),
        [
            (b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n", [S(b"x1 CAPABILITY\r\n")]),
            (
                b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 ID\r\n"
                b"x1 OK CAPABILITY completed.\r\n",
                [S(b"x2 AUTHENTICATE XOAUTH2\r\n")],
            ),
            (b"+ \r\n", [S(B64 + b"\r\n")]),
            (b"x2 OK AUTHENTICATE completed.\r\n", [UpstreamLoggedIn(None, b"")]),
        ],
    )


# --- the capabilities after login (announced to later clients before their login) ------------

M365_GREETING = b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n"
M365_CAPS = ("IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN "
             "IDLE NAMESPACE LITERAL+")


def test_capability_asked_after_a_login_ok_without_it() -> None:
    """Microsoft 365: no capabilities in the OK; the machine asks and consumes the answer."""
    run_transcript(
        make(ask_capabilities=True),
        [
            (M365_GREETING, [S(b"x1 CAPABILITY\r\n")]),
            (
                f"* CAPABILITY {M365_CAPS}\r\nx1 OK CAPABILITY completed.\r\n".encode(),
                [S(b"x2 AUTHENTICATE XOAUTH2 " + B64 + b"\r\n")],
            ),
            (b"x2 OK AUTHENTICATE completed.\r\n", [S(b"x3 CAPABILITY\r\n")]),
            (
                f"* CAPABILITY {M365_CAPS}\r\nx3 OK CAPABILITY completed.\r\n".encode(),
                [UpstreamLoggedIn(M365_CAPS, b"")],
            ),
        ],
    )


def test_capability_after_login_keeps_other_server_bytes_in_order() -> None:
    """Untagged responses around our CAPABILITY (with a literal) and whatever follows its OK
    reach the client, in order; only the CAPABILITY response and our tagged reply are taken."""
    run_transcript(
        make(ask_capabilities=True),
        [
            (GREETING_IR, [AUTH_IR]),
            (
                b"x1 OK AUTHENTICATE completed.\r\n* OK [ALERT] maintenance at 22:00\r\n",
                [S(b"x2 CAPABILITY\r\n")],
            ),
            (
                b"* 1 FETCH (BODY[] {12}\r\nx2 OK fake\r\n)\r\n"
                b"* capability IMAP4rev1 IDLE\r\n"
                b"* NO [ALERT] {5}\n\r\nab)\r\n"
                b"x2 OK done\r\n* 2 EXISTS\r\n* par",
                [
                    UpstreamLoggedIn(
                        "IMAP4rev1 IDLE",
                        b"* OK [ALERT] maintenance at 22:00\r\n"
                        b"* 1 FETCH (BODY[] {12}\r\nx2 OK fake\r\n)\r\n"
                        b"* NO [ALERT] {5}\r\n\r\nab)\r\n"
                        b"* 2 EXISTS\r\n* par",
                    )
                ],
            ),
        ],
    )


@pytest.mark.parametrize(
    "reply, caps",
    [
        (b"x2 OK [CAPABILITY IMAP4rev1 MOVE] done\r\n", "IMAP4rev1 MOVE"),
        (b"x2 NO not now\r\n", None),
        (b"x2 BAD what\r\n", None),
        (b"* CAPABILITY IMAP4rev1 IDLE\r\nx2 BAD what\r\n", "IMAP4rev1 IDLE"),
    ],
)
def test_capability_after_login_other_replies(reply: bytes, caps: str | None) -> None:
    run_transcript(
        make(ask_capabilities=True),
        [
            (GREETING_IR, [AUTH_IR]),
            (b"x1 OK Logged in\r\n", [S(b"x2 CAPABILITY\r\n")]),
            (reply, [UpstreamLoggedIn(caps, b"")]),
        ],
    )


@pytest.mark.parametrize(
    "ok",
    [
        b"x1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",  # Dovecot
        b"* CAPABILITY IMAP4rev1 IDLE\r\nx1 OK Logged in\r\n",
    ],
)
def test_capability_not_asked_when_the_login_reported_it(ok: bytes) -> None:
    run_transcript(
        make(ask_capabilities=True),
        [(GREETING_IR, [AUTH_IR]), (ok, [UpstreamLoggedIn("IMAP4rev1 IDLE", b"")])],
    )


@pytest.mark.parametrize(
    "reply, text",
    [
        (b"x9 OK CAPABILITY completed.\r\n", "unexpected reply from the server: x9 OK"),
        (b"+ more\r\n", "unexpected reply from the server: + more"),
        (b"* BYE shutting down\r\n", "the server closed the connection during login"),
        (b"* 1 FETCH (BODY[] {200}\r\n" + b"a" * 200, "the server sent too much after the login"),
    ],
)
def test_capability_after_login_broken(reply: bytes, text: str) -> None:
    m = make(ask_capabilities=True, max_line=128)()
    assert m.receive(GREETING_IR) == [AUTH_IR]
    assert m.receive(b"x1 OK Logged in\r\n") == [S(b"x2 CAPABILITY\r\n")]
    out = m.receive(reply) or m.receive(b"")
    assert len(out) == 1 and isinstance(out[0], UpstreamBroken)
    assert out[0].text.startswith(text)
    assert m.buffered_bytes == 0


def test_short_greeting_list_is_checked_with_capability() -> None:
    run_transcript(
        make(),
        [
            (b"* OK [CAPABILITY IMAP4rev1] hi\r\n", [S(b"x1 CAPABILITY\r\n")]),
            (
                b"x1 OK [CAPABILITY IMAP4rev1 auth=xoauth2 sasl-ir] done\r\n",
                [S(b"x2 AUTHENTICATE XOAUTH2 " + B64 + b"\r\n")],
            ),
        ],
    )


def test_starttls_flow_discards_plaintext_and_forgets_capabilities() -> None:
    run_transcript(
        make(starttls=True),
        [
            (GREETING_IR, [S(b"x1 STARTTLS\r\n")]),
            (
                b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR] injected\r\n"
                b"x1 OK Begin TLS\r\n* OK injected after\r\n",
                [StartServerTLS()],
            ),
            (b"x9 OK more injected plaintext\r\n", []),
            (lambda m: m.tls_started(), [S(b"x2 CAPABILITY\r\n")]),
            (
                b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\nx2 OK done\r\n",
                [S(b"x3 AUTHENTICATE XOAUTH2\r\n")],
            ),
            (b"+\r\n", [S(B64 + b"\r\n")]),
            (b"x3 OK [CAPABILITY IMAP4rev1] ok\r\n", [UpstreamLoggedIn("IMAP4rev1", b"")]),
        ],
    )


def test_starttls_refused() -> None:
    run_transcript(
        make(starttls=True),
        [
            (b"* OK hi\r\n", [S(b"x1 STARTTLS\r\n")]),
            (b"x1 BAD not now\r\n", [UpstreamBroken("the server refused STARTTLS: not now")]),
        ],
    )


def test_no_xoauth2() -> None:
    text = "the server does not offer AUTH=XOAUTH2 (it offers IMAP4rev1 AUTH=PLAIN)"
    run_transcript(
        make(),
        [
            (b"* OK hi\r\n", [S(b"x1 CAPABILITY\r\n")]),
            (b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nx1 OK done\r\n", [UpstreamBroken(text)]),
        ],
    )


def test_capability_refused_or_missing() -> None:
    run_transcript(
        make(),
        [
            (b"* OK hi\r\n", [S(b"x1 CAPABILITY\r\n")]),
            (b"x1 NO nope\r\n", [UpstreamBroken("the server refused CAPABILITY: nope")]),
        ],
    )
    run_transcript(
        make(),
        [
            (b"* OK hi\r\n", [S(b"x1 CAPABILITY\r\n")]),
            (b"x1 OK done\r\n", [UpstreamBroken("the server sent no capabilities")]),
        ],
    )


def test_rejected_verbatim() -> None:
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (b"x1 NO AUTHENTICATE failed.\r\n", [UpstreamRejected("AUTHENTICATE failed.", ReplyKind.AUTH_FAILED)]),
        ],
    )
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (b"x1 BAD\r\n", [UpstreamRejected("the server rejected the login", ReplyKind.OTHER)]),
        ],
    )


def test_dovecot_error_challenge() -> None:
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (b"+ " + error_challenge("invalid_token", "mail") + b"\r\n", [S(b"\r\n")]),
            (
                b"x1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
                [
                    UpstreamRejected(
                        "[AUTHENTICATIONFAILED] Authentication failed.; "
                        "the server rejected the token (status invalid_token, scope mail)",
                        ReplyKind.AUTH_FAILED,
                        "AUTHENTICATIONFAILED",
                    )
                ],
            ),
        ],
    )


def test_second_challenge_is_broken() -> None:
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (b"+ " + error_challenge() + b"\r\n", [S(b"\r\n")]),
            (b"+ again\r\n", [UpstreamBroken("unexpected continuation request from the server")]),
        ],
    )


@pytest.mark.parametrize(
    "greeting, text",
    [
        (b"* BYE too busy\r\n", "the server refused the connection: too busy"),
        (b"* PREAUTH hi\r\n", "the server sent PREAUTH: it cannot log in as the user"),
        (b"HTTP/1.1 400 Bad\r\n", "unexpected greeting from the server: HTTP/1.1 400 Bad"),
        (b"+ hi\r\n", "unexpected greeting from the server: + hi"),
        (b"\r\n", "unexpected greeting from the server: (no text)"),
    ],
)
def test_bad_greeting(greeting: bytes, text: str) -> None:
    run_transcript(make(), [(greeting, [UpstreamBroken(text)])])


def test_server_closes() -> None:
    closed = UpstreamBroken("the server closed the connection during login")
    run_transcript(make(), [(b"", [closed])], trail=None)
    run_transcript(make(), [(GREETING_IR, [AUTH_IR]), (b"", [closed])], trail=None)
    m = make()()
    assert m.receive(b"") == [closed]
    assert m.receive(b"* OK late\r\n") == []


def test_bye_during_login() -> None:
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (
                b"* BYE Connection closed\r\n",
                [UpstreamBroken("the server closed the session: Connection closed")],
            ),
        ],
    )


def test_untagged_responses_with_literals_are_skipped() -> None:
    run_transcript(
        make(),
        [
            (b"* OK hi\r\n", [S(b"x1 CAPABILITY\r\n")]),
            (
                b'* ID ("name" {10}\r\nx1 OK \r\n\r\n "x" {3}\r\nabc)\r\n'
                b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\n* OK [ALERT] note\r\nx1 OK done\r\n",
                [S(b"x2 AUTHENTICATE XOAUTH2\r\n")],
            ),
        ],
    )


def test_unknown_tag_is_broken() -> None:
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (b"a1 OK sure\r\n", [UpstreamBroken("unexpected reply from the server: a1 OK sure")]),
        ],
    )
    run_transcript(
        make(),
        [
            (GREETING_IR, [AUTH_IR]),
            (b"x1 MAYBE\r\n", [UpstreamBroken("unexpected reply from the server: x1 MAYBE")]),
        ],
    )


def test_ok_before_continuation_is_broken() -> None:
    run_transcript(
        make(),
        [
            (
                b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n",
                [S(b"x1 AUTHENTICATE XOAUTH2\r\n")],
            ),
            (
                b"x1 OK what\r\n",
                [UpstreamBroken("the server accepted AUTHENTICATE without a response")],
            ),
        ],
    )


def test_line_too_long() -> None:
    run_transcript(
        make(max_line=32),
        [(b"* OK " + b"x" * 40, [UpstreamBroken("the server sent a line over 32 bytes")])],
    )


def test_misuse() -> None:
    m = make()()
    with pytest.raises(ProtocolMisuse):
        m.tls_started()
    m.receive(GREETING_IR)
    m.receive(b"x1 OK yes\r\n")
    with pytest.raises(ProtocolMisuse):
        m.receive(b"* 1 EXISTS\r\n")


def test_bad_user_is_refused_at_construction() -> None:
    with pytest.raises(SaslError):
        ImapUpstreamSide(user="a\r\nb", token=Secret("t"), starttls=False)


def test_token_not_in_reprs() -> None:
    m = make()()
    out = m.receive(GREETING_IR)
    assert TOKEN not in repr(out) and B64.decode() not in repr(out)


# --- fuzzing ------------------------------------------------------------------------------

# Mostly plausible server lines (so the fuzzer gets past the greeting), some noise.
_line = st.builds(
    lambda who, what, text, end: who + what + text + end,
    st.sampled_from([b"*", b"*", b"x1", b"x2", b"x3", b"x9", b"+"]),
    st.sampled_from([b" OK", b" OK", b" NO", b" BAD", b" BYE", b" PREAUTH", b" CAPABILITY", b""]),
    st.sampled_from(
        [
            b"",
            b" [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR]",
            b" [CAPABILITY IMAP4rev1 AUTH=XOAUTH2]",
            b" IMAP4rev1 AUTH=XOAUTH2",
            b" AUTH=XOAUTH2 SASL-IR",
            b" {5}\r\nab\r\nc",
            b" {99999}",
            b" text",
            b" " + error_challenge(),
        ]
    ),
    st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]),
)
_greeting = st.sampled_from([b"", b"* OK hi\r\n", GREETING_IR])
_noise = st.binary(max_size=30)
_stream = st.builds(
    lambda first, rest: first + b"".join(rest),
    _greeting,
    st.lists(st.one_of(_line, _line, _line, _noise), max_size=12),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    data=_stream,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
    starttls=st.booleans(),
    ask=st.booleans(),
)
def test_fuzz_upstream_side(data: bytes, cuts: list[int], starttls: bool, ask: bool) -> None:
    max_line = 128
    m = ImapUpstreamSide(user=USER, token=Secret(TOKEN), starttls=starttls, max_line=max_line,
                         ask_capabilities=ask)
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:], strict=False)] + [b""]
    for chunk in chunks:
        out = m.receive(chunk)
        finished = False
        while out:
            follow: list = []
            for command in out:
                if isinstance(command, SendToServer):
                    assert command.data.endswith(b"\r\n")
                    assert b"\n" not in command.data[:-2] and b"\r" not in command.data[:-2]
                elif isinstance(command, StartServerTLS):
                    follow += m.tls_started()
                elif isinstance(command, UpstreamRejected | UpstreamBroken):
                    assert "\r" not in command.text and "\n" not in command.text
                    finished = True
                elif isinstance(command, UpstreamLoggedIn):
                    finished = True
            assert m.buffered_bytes <= 2 * max_line
            out = follow
        if finished:
            break
