"""The classification of an upstream's answer to the XOAUTH2 login, per reply form, and the
machines that carry it (``UpstreamRejected.kind``): no sockets."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.events import ReplyKind, SendToServer, UpstreamRejected
from proxy.protocol.imap import ImapUpstreamSide
from proxy.protocol.login_reply import LoginReply, imap_reply, pop_reply, smtp_reply
from proxy.protocol.pop import PopUpstreamSide
from proxy.secret import Secret
from tests.protocol.util import run_transcript

OK, AUTH, TEMP, OTHER = (
    ReplyKind.OK, ReplyKind.AUTH_FAILED, ReplyKind.TEMPORARY, ReplyKind.OTHER)


# --- IMAP (RFC 5530 response codes) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "text", "expected"),
    [
        ("OK", "AUTHENTICATE completed.", LoginReply(OK)),
        ("ok", "[CAPABILITY IMAP4rev1] done", LoginReply(OK)),
        # Microsoft 365 refuses a token without a code.
        ("NO", "AUTHENTICATE failed.", LoginReply(AUTH)),
        ("NO", "", LoginReply(AUTH)),
        ("NO", "[ALERT] Your token is invalid", LoginReply(AUTH)),  # ALERT names no cause
        ("NO", "[AUTHENTICATIONFAILED] Authentication failed.",
         LoginReply(AUTH, "AUTHENTICATIONFAILED")),
        ("NO", "[authenticationfailed] lower case", LoginReply(AUTH, "AUTHENTICATIONFAILED")),
        ("NO", "[EXPIRED] Token expired", LoginReply(AUTH, "EXPIRED")),
        # Dovecot when its passdb (the token check) fails internally.
        ("NO", "[UNAVAILABLE] Temporary authentication failure. [host:2024-01-01 10:00:00]",
         LoginReply(TEMP, "UNAVAILABLE")),
        ("NO", "[SERVERBUG] Internal error occurred.", LoginReply(TEMP, "SERVERBUG")),
        ("NO", "[INUSE] Mailbox in use", LoginReply(TEMP, "INUSE")),
        ("NO", "[LIMIT] Too many connections", LoginReply(TEMP, "LIMIT")),
        ("NO", "[CONTACTADMIN] Account disabled", LoginReply(OTHER, "CONTACTADMIN")),
        ("NO", "[AUTHORIZATIONFAILED] Not allowed", LoginReply(OTHER, "AUTHORIZATIONFAILED")),
        ("NO", "[PRIVACYREQUIRED] Use TLS", LoginReply(OTHER, "PRIVACYREQUIRED")),
        ("NO", "[NOPERM] No", LoginReply(OTHER, "NOPERM")),
        # The code decides before the text.
        ("NO", "[AUTHENTICATIONFAILED] try again later", LoginReply(AUTH, "AUTHENTICATIONFAILED")),
        ("NO", "[CONTACTADMIN] temporarily disabled", LoginReply(OTHER, "CONTACTADMIN")),
        # No (known) code: the text decides between temporary and authentication failure.
        ("NO", "Temporary authentication failure.", LoginReply(TEMP)),
        ("NO", "Server busy, try again later", LoginReply(TEMP)),
        ("NO", "[XUNKNOWN] Server busy, try later", LoginReply(TEMP)),
        ("NO", "[XUNKNOWN] no", LoginReply(AUTH)),
        # BAD: the server did not take the command; a new token cannot help.
        ("BAD", "Invalid SASL response", LoginReply(OTHER)),
        ("BAD", "[UNAVAILABLE] busy", LoginReply(TEMP, "UNAVAILABLE")),
    ],
)
def test_imap_reply(status: str, text: str, expected: LoginReply) -> None:
    assert imap_reply(status, text) == expected


def test_imap_refusal_before_the_token_is_not_about_the_token() -> None:
    assert imap_reply("NO", "AUTHENTICATE failed.", token_sent=False) == LoginReply(OTHER)
    assert imap_reply("NO", "[UNAVAILABLE] later", token_sent=False) == LoginReply(
        TEMP, "UNAVAILABLE")


# --- POP3 (RFC 2449 and RFC 3206 extended response codes) ---------------------------------------


@pytest.mark.parametrize(
    ("status", "text", "expected"),
    [
        ("+OK", "User successfully authenticated.", LoginReply(OK)),
        ("-ERR", "Authentication failure: unknown user name or bad password.", LoginReply(AUTH)),
        ("-ERR", "", LoginReply(AUTH)),
        ("-ERR", "[AUTH] Authentication failed.", LoginReply(AUTH, "AUTH")),
        ("-ERR", "[auth] lower case", LoginReply(AUTH, "AUTH")),
        ("-ERR", "[SYS/TEMP] Temporary authentication failure.", LoginReply(TEMP, "SYS/TEMP")),
        ("-ERR", "[SYS/TEMP/BACKEND] hierarchical", LoginReply(TEMP, "SYS/TEMP")),
        ("-ERR", "[SYS/PERM] Your account is disabled", LoginReply(OTHER, "SYS/PERM")),
        ("-ERR", "[IN-USE] Mailbox locked", LoginReply(TEMP, "IN-USE")),
        ("-ERR", "[LOGIN-DELAY] Wait 15 minutes", LoginReply(TEMP, "LOGIN-DELAY")),
        ("-ERR", "[AUTH] try again later", LoginReply(AUTH, "AUTH")),  # the code decides
        ("-ERR", "Temporary authentication failure.", LoginReply(TEMP)),
        ("-ERR", "[SYSTEM] not a code we know", LoginReply(AUTH)),
        ("-ERR", "[SYS] bare SYS", LoginReply(AUTH)),
    ],
)
def test_pop_reply(status: str, text: str, expected: LoginReply) -> None:
    assert pop_reply(status, text) == expected


def test_pop_refusal_before_the_token_is_not_about_the_token() -> None:
    assert pop_reply("-ERR", "Unsupported mechanism", token_sent=False) == LoginReply(OTHER)
    assert pop_reply("-ERR", "[AUTH] no", token_sent=False) == LoginReply(OTHER, "AUTH")
    assert pop_reply("-ERR", "[SYS/TEMP] later", token_sent=False) == LoginReply(
        TEMP, "SYS/TEMP")


# --- SMTP (RFC 4954 replies, RFC 3463 enhanced status codes) -------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (235, "2.7.0 Authentication successful", LoginReply(OK)),
        # Microsoft 365's refusal of a token, and RFC 4954's.
        (535, "5.7.3 Authentication unsuccessful [SN4PR0201CA0000]", LoginReply(AUTH, "5.7.3")),
        (535, "5.7.8 Authentication credentials invalid", LoginReply(AUTH, "5.7.8")),
        (535, "Authentication failed", LoginReply(AUTH, "535")),
        (554, "5.7.8 Error: authentication failed", LoginReply(AUTH, "5.7.8")),
        # Exchange Online: SMTP AUTH disabled for the tenant or mailbox. No token fixes that.
        (535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
              "the Tenant.", LoginReply(OTHER, "5.7.139")),
        (535, "5.7.139\nAuthentication unsuccessful, the user credentials were incorrect.",
         LoginReply(OTHER, "5.7.139")),
        # Temporary: RFC 4954's 454 4.7.0 (Postfix with Dovecot SASL when the check fails), any 4xx.
        (454, "4.7.0 Temporary authentication failure: Temporary authentication failure",
         LoginReply(TEMP, "4.7.0")),
        (454, "Temporary authentication failure", LoginReply(TEMP, "454")),
        (432, "4.7.12 A password transition is needed", LoginReply(TEMP, "4.7.12")),
        (421, "4.3.2 Service not available, closing transmission channel",
         LoginReply(TEMP, "4.3.2")),
        (451, "4.7.0 whatever the text says", LoginReply(TEMP, "4.7.0")),
        # Permanent and not about the token.
        (534, "5.7.9 Authentication mechanism is too weak", LoginReply(OTHER, "5.7.9")),
        (538, "5.7.11 Encryption required for requested authentication mechanism",
         LoginReply(OTHER, "5.7.11")),
        (530, "5.7.0 Authentication required", LoginReply(OTHER, "5.7.0")),
        (504, "5.5.4 Unrecognized authentication type", LoginReply(OTHER, "5.5.4")),
        (500, "Syntax error", LoginReply(OTHER, "500")),
        (554, "5.7.0 temporarily refused? no: a 5xx is permanent", LoginReply(OTHER, "5.7.0")),
        (334, "", LoginReply(OTHER, "334")),  # a second challenge is not a verdict
        (535, "5.7.1390 not the Exchange code", LoginReply(AUTH, "535")),
    ],
)
def test_smtp_reply(code: int, text: str, expected: LoginReply) -> None:
    assert smtp_reply(code, text) == expected


def test_smtp_refusal_before_the_token_is_not_about_the_token() -> None:
    assert smtp_reply(535, "5.7.8 no", token_sent=False) == LoginReply(OTHER, "5.7.8")
    assert smtp_reply(454, "4.7.0 later", token_sent=False) == LoginReply(TEMP, "4.7.0")


@given(st.text(max_size=80), st.sampled_from(["OK", "NO", "BAD", "no", "+OK", "-ERR"]))
def test_every_reply_gets_a_kind(text: str, status: str) -> None:
    """Any text classifies without raising; only OK/+OK are success."""
    assert (imap_reply(status, text).kind is OK) == (status.upper() == "OK")
    assert (pop_reply(status, text).kind is OK) == (status.upper() == "+OK")


@given(st.integers(100, 599), st.text(max_size=80))
def test_every_smtp_reply_gets_a_kind(code: int, text: str) -> None:
    kind = smtp_reply(code, text).kind
    assert (kind is OK) == (200 <= code < 300)
    assert (kind is TEMP) == (400 <= code < 500)


# --- the machines carry the kind (whole, byte by byte, with trailing bytes) ----------------------

USER = "alice@contoso.example"
TOKEN = "tok"
IMAP_GREETING = b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR] ready\r\n"
IMAP_AUTH = SendToServer(
    b"x1 AUTHENTICATE XOAUTH2 "
    + base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
    + b"\r\n"
)


def imap() -> ImapUpstreamSide:
    return ImapUpstreamSide(user=USER, token=Secret(TOKEN), starttls=False)


def pop() -> PopUpstreamSide:
    return PopUpstreamSide(user=USER, token=Secret(TOKEN), starttls=False, initial_response=True)


def challenge(status: str) -> bytes:
    return base64.b64encode(json.dumps({"status": status, "schemes": "bearer"}).encode())


def test_imap_machine_unavailable_is_temporary() -> None:
    run_transcript(imap, [
        (IMAP_GREETING, [IMAP_AUTH]),
        (b"x1 NO [UNAVAILABLE] Temporary authentication failure.\r\n",
         [UpstreamRejected("[UNAVAILABLE] Temporary authentication failure.", TEMP,
                           "UNAVAILABLE")]),
    ])


def test_imap_machine_dovecot_error_challenge_then_final_reply_decides() -> None:
    """Dovecot sends an RFC 7628 error challenge, waits for the empty response, then its final
    NO: the challenge only adds detail, the final reply's code classifies."""
    detail = "the server rejected the token (status 500)"
    for final, kind, code in [
        (b"NO [UNAVAILABLE] Temporary authentication failure.", TEMP, "UNAVAILABLE"),
        (b"NO [AUTHENTICATIONFAILED] Authentication failed.", AUTH, "AUTHENTICATIONFAILED"),
    ]:
        text = final[3:].decode()
        run_transcript(imap, [
            (IMAP_GREETING, [IMAP_AUTH]),
            (b"+ " + challenge("500") + b"\r\n", [SendToServer(b"\r\n")]),
            (b"x1 " + final + b"\r\n", [UpstreamRejected(f"{text}; {detail}", kind, code)]),
        ])


def test_imap_machine_refused_before_the_token() -> None:
    """No SASL-IR: AUTHENTICATE refused before the token went out is not about the token."""
    greeting = b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready\r\n"
    run_transcript(imap, [
        (greeting, [SendToServer(b"x1 AUTHENTICATE XOAUTH2\r\n")]),
        (b"x1 NO [PRIVACYREQUIRED] TLS first\r\n",
         [UpstreamRejected("[PRIVACYREQUIRED] TLS first", OTHER, "PRIVACYREQUIRED")]),
    ])


POP_STEPS_TO_AUTH = [
    (b"+OK ready\r\n", [SendToServer(b"CAPA\r\n")]),
    (b"-ERR no CAPA\r\n",
     [SendToServer(b"AUTH XOAUTH2 "
                   + base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
                   + b"\r\n")]),
]


@pytest.mark.parametrize(
    ("final", "kind", "code"),
    [
        (b"-ERR [SYS/TEMP] Temporary authentication failure.", TEMP, "SYS/TEMP"),
        (b"-ERR [IN-USE] Mailbox locked", TEMP, "IN-USE"),
        (b"-ERR [SYS/PERM] Disabled", OTHER, "SYS/PERM"),
        (b"-ERR [AUTH] Authentication failed.", AUTH, "AUTH"),
    ],
)
def test_pop_machine_classifies(final: bytes, kind: ReplyKind, code: str) -> None:
    text = final[5:].decode()
    run_transcript(pop, [*POP_STEPS_TO_AUTH, (final + b"\r\n", [UpstreamRejected(text, kind, code)])],
                   trail=b"+OK")
    # the same after Dovecot's error challenge
    run_transcript(pop, [
        *POP_STEPS_TO_AUTH,
        (b"+ " + challenge("500") + b"\r\n", [SendToServer(b"\r\n")]),
        (final + b"\r\n", [UpstreamRejected(text, kind, code)]),
    ], trail=b"+OK")


def test_rejected_event_is_never_ok() -> None:
    with pytest.raises(ValueError):
        UpstreamRejected("x", ReplyKind.OK)
