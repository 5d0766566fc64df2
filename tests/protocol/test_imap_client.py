"""ImapClientSide as transcripts: every input whole, one byte at a time, and with trailing data."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol.events import (
    Authenticate,
    CloseConnection,
    Failure,
    ProtocolMisuse,
    SendToClient,
    StartClientTLS,
    StartRelay,
)
from proxy.protocol.imap import ImapClientSide
from proxy.secret import Secret
from tests.protocol.util import run_transcript, well_formed_lines

C = SendToClient
CAPS = "IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR LITERAL+ ID"
CAPS_TLS = "IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID"
CAPS_DISABLED = "IMAP4rev1 STARTTLS LOGINDISABLED SASL-IR LITERAL+ ID"
READY = C(b"+ Ready for literal data\r\n")
NOT_LOGGED_IN = b"BAD Command unknown or not allowed before login; log in first\r\n"
PRIVACY = b"NO [PRIVACYREQUIRED] Plaintext login is disabled: use STARTTLS first\r\n"


def machine(**kw: object) -> ImapClientSide:
    args: dict = {"starttls": True, "tls_active": False, "login_disabled": False} | kw
    m = ImapClientSide(**args)
    m.greeting()
    return m


def make(**kw: object):
    return lambda: machine(**kw)


def login(user: str, password: str, mechanism: str = "LOGIN") -> Authenticate:
    return Authenticate(user, Secret(password), mechanism)


def plain(authzid: str, user: str, password: str) -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def failed(failure: Failure = Failure.BAD_CREDENTIALS, text: str = "Wrong password"):
    return lambda m: m.login_failed(failure, text)


def succeeded(caps: str | None = None, server_bytes: bytes = b""):
    return lambda m: m.login_succeeded(caps, server_bytes)


# --- greeting and capabilities ----------------------------------------------------------


@pytest.mark.parametrize(
    "kw, caps",
    [
        ({}, CAPS),
        ({"tls_active": True}, CAPS_TLS),
        ({"starttls": False}, "IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID"),
        ({"login_disabled": True}, CAPS_DISABLED),
        ({"login_disabled": True, "tls_active": True}, CAPS_TLS),
    ],
)
def test_greeting_and_capability(kw: dict, caps: str) -> None:
    args: dict = {"starttls": True, "tls_active": False, "login_disabled": False} | kw
    m = ImapClientSide(**args, greeting="hello\r\n* OK forged")
    assert m.greeting() == [C(f"* OK [CAPABILITY {caps}] hello * OK forged\r\n".encode())]
    run_transcript(
        make(**kw),
        [
            (
                b"a1 CAPABILITY\r\n",
                [C(f"* CAPABILITY {caps}\r\n".encode()), C(b"a1 OK CAPABILITY completed\r\n")],
            )
        ],
    )


# What Microsoft 365 and Dovecot 2.3 announce after login (Dovecot's abridged).
M365 = ("IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE "
        "NAMESPACE LITERAL+")
M365_EXTRAS = "IMAP4 UIDPLUS MOVE UNSELECT CHILDREN IDLE NAMESPACE"
DOVECOT = ("IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
           "MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED "
           "I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS "
           "BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ "
           "NOTIFY SPECIAL-USE")
DOVECOT_EXTRAS = ("LOGIN-REFERRALS ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES MULTIAPPEND "
                  "URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED "
                  "I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH SEARCHRES WITHIN CONTEXT=SEARCH "
                  "LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE "
                  "SAVEDATE NOTIFY SPECIAL-USE")


@pytest.mark.parametrize(
    "kw, own",
    [
        ({}, "IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR LITERAL+ ID"),
        ({"starttls": False}, "IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID"),
        ({"tls_active": True}, "IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID"),
        ({"login_disabled": True}, "IMAP4rev1 STARTTLS LOGINDISABLED SASL-IR LITERAL+ ID"),
        ({"login_disabled": True, "tls_active": True}, "IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID"),
    ],
)
def test_upstream_post_login_capabilities_are_announced_before_login(kw: dict, own: str) -> None:
    """The proxy's own list first (STARTTLS/LOGINDISABLED per listener), then the upstream's
    post-login list without its AUTH=, SASL-IR, ID, IMAP4rev1; the OK after login still carries
    the upstream's list as the driver reports it."""
    caps = f"{own} {M365_EXTRAS}"
    args: dict = {"starttls": True, "tls_active": False, "login_disabled": False} | kw
    m = ImapClientSide(**args, greeting="hi", upstream_capabilities=M365)
    assert m.greeting() == [C(f"* OK [CAPABILITY {caps}] hi\r\n".encode())]
    steps: list = [
        (
            b"a1 CAPABILITY\r\n",
            [C(f"* CAPABILITY {caps}\r\n".encode()), C(b"a1 OK CAPABILITY completed\r\n")],
        ),
    ]
    if "LOGINDISABLED" not in own:
        steps += [
            (b"a2 LOGIN u p\r\n", [login("u", "p")]),
            (
                succeeded(M365),
                [C(f"a2 OK [CAPABILITY {M365}] Logged in\r\n".encode()), StartRelay(b"")],
            ),
        ]
    run_transcript(make(**kw, upstream_capabilities=M365), steps)


def test_upstream_capabilities_after_starttls() -> None:
    """RFC 3501 §6.2.1: the list is asked again after STARTTLS; it keeps the upstream's part and
    loses STARTTLS and LOGINDISABLED."""
    run_transcript(
        make(login_disabled=True, upstream_capabilities=DOVECOT),
        [
            (
                b"a1 CAPABILITY\r\n",
                [
                    C(f"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED SASL-IR LITERAL+ ID "
                      f"{DOVECOT_EXTRAS}\r\n".encode()),
                    C(b"a1 OK CAPABILITY completed\r\n"),
                ],
            ),
            (b"a2 STARTTLS\r\n", [C(b"a2 OK Begin TLS negotiation now\r\n"), StartClientTLS()]),
            (lambda m: m.tls_started(), []),
            (
                b"a3 CAPABILITY\r\n",
                [
                    C(f"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID {DOVECOT_EXTRAS}"
                      "\r\n".encode()),
                    C(b"a3 OK CAPABILITY completed\r\n"),
                ],
            ),
        ],
    )


@pytest.mark.parametrize(
    "upstream, literal",
    [
        (None, "LITERAL+ "),  # unknown: as before; that login's OK will carry the real list
        ("IMAP4rev1 IDLE LITERAL+", "LITERAL+ "),
        ("IMAP4rev1 IDLE literal+ LITERAL-", "LITERAL+ "),
        ("IMAP4rev1 IDLE LITERAL-", "LITERAL- "),
        ("IMAP4rev1 IDLE", ""),  # after login the upstream would not take {n+}
    ],
)
def test_literal_plus_only_if_the_upstream_keeps_it(upstream: str | None, literal: str) -> None:
    m = machine(starttls=False, upstream_capabilities=upstream)
    extras = "" if upstream is None else " IDLE"
    assert m.capabilities == f"IMAP4rev1 AUTH=PLAIN SASL-IR {literal}ID{extras}"
    # Whatever is announced, the proxy's own parser still takes a LITERAL+ literal.
    assert m.receive(b"a1 LOGIN {1+}\r\nu {1+}\r\np\r\n") == [login("u", "p")]


def test_upstream_login_capabilities_and_junk_are_not_announced() -> None:
    upstream = ("imap4rev1 STARTTLS LOGINDISABLED AUTH=XOAUTH2 auth=plain sasl-ir id IDLE idle "
                "X]Y [X (Z) Q%R \x01BAD \u00e9T\u00e9 " + "LONG" * 700 + " MOVE\tUIDPLUS")
    m = machine(starttls=False, upstream_capabilities=upstream)
    assert m.capabilities == "IMAP4rev1 AUTH=PLAIN SASL-IR ID IDLE MOVE UIDPLUS"
    assert machine(upstream_capabilities="").capabilities == (
        "IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR ID")


@settings(max_examples=300, deadline=None)
@given(upstream=st.text(max_size=300) | st.lists(
    st.sampled_from(["AUTH=PLAIN", "STARTTLS", "IDLE", "idle", "LITERAL+", "LITERAL-", "]", "X",
                     "LOGINDISABLED", "ID", "\r\n", "MOVE"]), max_size=12).map(" ".join),
       login_disabled=st.booleans(), tls_active=st.booleans())
def test_announced_capabilities_are_well_formed(upstream: str, login_disabled: bool,
                                                tls_active: bool) -> None:
    m = ImapClientSide(starttls=True, tls_active=tls_active, login_disabled=login_disabled,
                       upstream_capabilities=upstream)
    (greeting,) = m.greeting()
    assert isinstance(greeting, SendToClient)
    line = greeting.data.decode("ascii")
    assert line.startswith("* OK [CAPABILITY IMAP4rev1 ") and line.endswith("] xoauth2-proxy ready\r\n")
    caps = m.capabilities.split(" ")
    assert line.count("]") == 1 and "\r" not in m.capabilities and "" not in caps
    assert len({c.upper() for c in caps}) == len(caps)
    refused = login_disabled and not tls_active
    assert [c for c in caps if c.upper().startswith("AUTH=")] == ([] if refused else ["AUTH=PLAIN"])
    assert ("STARTTLS" in caps) is not tls_active
    assert ("LOGINDISABLED" in caps) is refused
    assert len(m.capabilities) < 2200


def test_noop_and_case_insensitive_commands() -> None:
    run_transcript(
        make(),
        [
            (b"a1 noop\r\n", [C(b"a1 OK NOOP completed\r\n")]),
            (b"a2 NOOP   \r\n", [C(b"a2 OK NOOP completed\r\n")]),
            (b"a3 NOOP x\r\n", [C(b"a3 BAD NOOP: unexpected extra arguments\r\n")]),
        ],
    )


def test_bare_lf_ends_a_line() -> None:
    run_transcript(make(), [(b"a1 NOOP\n", [C(b"a1 OK NOOP completed\r\n")])])


def test_logout() -> None:
    run_transcript(
        make(),
        [
            (
                b"a1 LOGOUT\r\n",
                [
                    C(b"* BYE Logging out\r\n"),
                    C(b"a1 OK LOGOUT completed\r\n"),
                    CloseConnection("client logged out"),
                ],
            ),
            (b"a2 NOOP\r\n", []),
        ],
    )


@pytest.mark.parametrize(
    "args",
    [
        b"NIL",
        b"nil",
        b"()",
        b'("name" "Thunderbird" "version" "115.0")',
        b'("name" NIL "os" "Linux")',
        b'("name" {11}\r\nThunderbird "version" {3+}\r\n1.0)',
    ],
)
def test_id(args: bytes) -> None:
    steps: list = []
    if b"{11}" in args:
        first, rest = args.split(b"\r\n", 1)
        steps.append((b"a1 ID " + first + b"\r\n", [READY]))
        args = rest
    else:
        args = b"a1 ID " + args
    steps.append(
        (args + b"\r\n", [C(b'* ID ("name" "xoauth2-proxy")\r\n'), C(b"a1 OK ID completed\r\n")])
    )
    run_transcript(make(), steps)


@pytest.mark.parametrize("args", [b"", b" x", b' ("name")', b' ("name" "x"', b" (name x)"])
def test_id_bad(args: bytes) -> None:
    m = machine()
    out = m.receive(b"a1 ID" + args + b"\r\n")
    assert len(out) == 1 and out[0].data.startswith(b"a1 BAD ID: ")


# --- commands that need a login, bad tags -------------------------------------------------


def test_commands_before_login_are_refused() -> None:
    run_transcript(
        make(),
        [
            (b"a1 SELECT INBOX\r\n", [C(b"a1 " + NOT_LOGGED_IN)]),
            (b"a2 FETCH 1:* (FLAGS)\r\n", [C(b"a2 " + NOT_LOGGED_IN)]),
            (b"a3 XYZZY\r\n", [C(b"a3 " + NOT_LOGGED_IN)]),
            # a synchronising literal for such a command is refused before "+"
            (b"a4 SELECT {5}\r\n", [C(b"a4 " + NOT_LOGGED_IN)]),
            (b"a5 CAPABILITY {5}\r\n", [C(b"a5 BAD CAPABILITY takes no literal\r\n")]),
            (b"a6 NOOP\r\n", [C(b"a6 OK NOOP completed\r\n")]),
        ],
    )


@pytest.mark.parametrize(
    "line", [b"", b" NOOP", b"a+b NOOP", b"a{b NOOP", b'"a" NOOP', b"\xff NOOP"]
)
def test_line_without_valid_tag_gets_untagged_bad(line: bytes) -> None:
    run_transcript(make(), [(line + b"\r\n", [C(b"* BAD Missing or invalid tag\r\n")])])


def test_tag_without_command() -> None:
    run_transcript(make(), [(b"a1\r\n", [C(b"a1 BAD Missing or invalid command name\r\n")])])


# --- LOGIN --------------------------------------------------------------------------------


def test_login_atoms_success_and_relay() -> None:
    run_transcript(
        make(),
        [
            (b"a1 LOGIN alice@example.com s3cret\r\n", [login("alice@example.com", "s3cret")]),
            (
                succeeded("IMAP4rev1 IDLE MOVE", b"* OK still here\r\n"),
                [
                    C(b"a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"),
                    C(b"* OK still here\r\n"),
                    StartRelay(b""),
                ],
            ),
        ],
    )


def test_login_success_without_capabilities() -> None:
    run_transcript(
        make(),
        [
            (b"a1 LOGIN u p\r\n", [login("u", "p")]),
            (succeeded(None), [C(b"a1 OK Logged in\r\n"), StartRelay(b"")]),
        ],
    )


def test_login_pipelined_commands_become_client_bytes() -> None:
    run_transcript(
        make(),
        [
            (b"a1 LOGIN u p\r\na2 SELECT INBOX\r\n", [login("u", "p")]),
            (b"a3 FETCH 1 BODY[]\r\n", []),
            (
                succeeded(),
                [
                    C(b"a1 OK Logged in\r\n"),
                    StartRelay(b"a2 SELECT INBOX\r\na3 FETCH 1 BODY[]\r\n"),
                ],
            ),
        ],
    )


@pytest.mark.parametrize(
    "args, user, password",
    [
        (b'"alice" "p\\"w\\\\d"', "alice", 'p"w\\d'),
        (b'"al ice" "with spaces and \'quotes\'"', "al ice", "with spaces and 'quotes'"),
        (b'"j\xc3\xb6rg@example.com" "p\xc3\xa4ss w\xc3\xb6rd"', "jörg@example.com", "päss wörd"),
        (b"alice pa]ss", "alice", "pa]ss"),
        (b'alice ""x', None, None),
    ],
)
def test_login_quoted(args: bytes, user: str | None, password: str | None) -> None:
    if user is None:
        m = machine()
        assert m.receive(b"a1 LOGIN " + args + b"\r\n")[0].data.startswith(b"a1 BAD LOGIN: ")
        return
    assert password is not None
    run_transcript(make(), [(b"a1 LOGIN " + args + b"\r\n", [login(user, password)])])


@pytest.mark.parametrize(
    "args, reason",
    [
        (b'"alice" "p\\nw"', b"invalid escape in quoted string"),
        (b'"alice" "pw', b"unterminated quoted string"),
        (b'"alice"', b"missing argument"),
        (b"alice pw extra", b"unexpected extra arguments"),
        (b'"" pw', b"empty user name or password"),
        (b'alice "p\xffw"', b"the password is not valid UTF-8"),
    ],
)
def test_login_bad_syntax(args: bytes, reason: bytes) -> None:
    run_transcript(
        make(),
        [(b"a1 LOGIN " + args + b"\r\n", [C(b"a1 BAD LOGIN: " + reason + b"\r\n")])],
    )


def test_login_synchronising_literals_utf8() -> None:
    password = 'p "a\\ss" w\xf6rd'
    raw = password.encode()
    run_transcript(
        make(),
        [
            (b"a1 LOGIN {5}\r\n", [READY]),
            (b"j\xc3\xb6rg {%d}\r\n" % len(raw), [READY]),
            (raw + b"\r\n", [login("jörg", password)]),
        ],
    )


def test_login_non_synchronising_literals() -> None:
    run_transcript(
        make(),
        [(b'a1 LOGIN {5+}\r\nalice {7+}\r\npa ss"\\\r\n', [login("alice", 'pa ss"\\')])],
    )


def test_login_mixed_forms() -> None:
    run_transcript(
        make(),
        [
            (b'a1 LOGIN "alice" {3}\r\n', [READY]),
            (b"p w\r\n", [login("alice", "p w")]),
            (failed(), [C(b"a1 NO [AUTHENTICATIONFAILED] Wrong password\r\n")]),
            (b"a2 LOGIN {5}\r\n", [READY]),
            (b'alice "pw"\r\n', [login("alice", "pw")]),
            (failed(), [C(b"a2 NO [AUTHENTICATIONFAILED] Wrong password\r\n")]),
            (b"a3 LOGIN {5+}\r\nalice pw\r\n", [login("alice", "pw")]),
        ],
    )


def test_literal_marker_inside_quotes_is_not_a_literal() -> None:
    run_transcript(make(), [(b'a1 LOGIN alice "pw {5}"\r\n', [login("alice", "pw {5}")])])


def test_empty_literal() -> None:
    run_transcript(
        make(),
        [(b"a1 LOGIN alice {0+}\r\n\r\n", [C(b"a1 BAD LOGIN: empty user name or password\r\n")])],
    )


def test_user_name_with_control_characters_is_refused() -> None:
    reason = b"the user name has control characters"
    run_transcript(
        make(),
        [
            (b"a1 LOGIN {3+}\r\na\r\n pw\r\n", [C(b"a1 BAD LOGIN: " + reason + b"\r\n")]),
            (b"a2 AUTHENTICATE PLAIN\r\n", [C(b"+ \r\n")]),
            (plain("", "a\tb", "pw") + b"\r\n", [C(b"a2 BAD AUTHENTICATE: " + reason + b"\r\n")]),
            (b"a3 NOOP\r\n", [C(b"a3 OK NOOP completed\r\n")]),
        ],
    )


def test_literal_containing_nul_is_refused() -> None:
    run_transcript(
        make(),
        [(b"a1 LOGIN alice {3+}\r\np\0w\r\n", [C(b"a1 BAD LOGIN: the password contains NUL\r\n")])],
    )


# --- AUTHENTICATE PLAIN -------------------------------------------------------------------


def test_authenticate_plain_sasl_ir() -> None:
    run_transcript(
        make(),
        [
            (
                b"a1 AUTHENTICATE PLAIN " + plain("", "j\xf6rg", "p w") + b"\r\n",
                [login("jörg", "p w", "PLAIN")],
            ),
            (succeeded(), [C(b"a1 OK Logged in\r\n"), StartRelay(b"")]),
        ],
    )


def test_authenticate_plain_with_matching_authzid() -> None:
    run_transcript(
        make(),
        [
            (
                b"a1 authenticate plain " + plain("u", "u", "pw") + b"\r\n",
                [login("u", "pw", "PLAIN")],
            )
        ],
    )


def test_authenticate_plain_empty_initial_response() -> None:
    reply = b"a1 BAD AUTHENTICATE: PLAIN response must be authzid NUL authcid NUL password\r\n"
    run_transcript(make(), [(b"a1 AUTHENTICATE PLAIN =\r\n", [C(reply)])])


def test_authenticate_plain_with_continuation() -> None:
    run_transcript(
        make(),
        [
            (b"a1 AUTHENTICATE PLAIN\r\n", [C(b"+ \r\n")]),
            (plain("", "alice", "pw") + b"\r\n", [login("alice", "pw", "PLAIN")]),
        ],
    )


def test_authenticate_cancelled() -> None:
    run_transcript(
        make(),
        [
            (b"a1 AUTHENTICATE PLAIN\r\n", [C(b"+ \r\n")]),
            (b"*\r\n", [C(b"a1 BAD Authentication cancelled\r\n")]),
            (b"a2 NOOP\r\n", [C(b"a2 OK NOOP completed\r\n")]),
        ],
    )


@pytest.mark.parametrize(
    "response, reason",
    [
        (b"not-base64!", b"invalid base64"),
        (b"YWJj", b"PLAIN response must be authzid NUL authcid NUL password"),
        (plain("bob", "alice", "pw"), b"acting for another user (authzid) is not supported"),
        (plain("", "alice", ""), b"PLAIN response has an empty password"),
    ],
)
def test_authenticate_bad_response(response: bytes, reason: bytes) -> None:
    reply = C(b"a1 BAD AUTHENTICATE: " + reason + b"\r\n")
    run_transcript(make(), [(b"a1 AUTHENTICATE PLAIN " + response + b"\r\n", [reply])])
    run_transcript(
        make(),
        [
            (b"a1 AUTHENTICATE PLAIN\r\n", [C(b"+ \r\n")]),
            (response + b"\r\n", [reply]),
            (b"a2 NOOP\r\n", [C(b"a2 OK NOOP completed\r\n")]),
        ],
    )


@pytest.mark.parametrize("mechanism", [b"LOGIN", b"XOAUTH2", b"CRAM-MD5 abc"])
def test_authenticate_other_mechanism(mechanism: bytes) -> None:
    reply = b"a1 NO [CANNOT] Unsupported mechanism; use AUTH=PLAIN\r\n"
    run_transcript(make(), [(b"a1 AUTHENTICATE " + mechanism + b"\r\n", [C(reply)])])


# --- plaintext login disabled -------------------------------------------------------------


def test_login_disabled_refuses_login_and_plain() -> None:
    run_transcript(
        make(login_disabled=True),
        [
            (b"a1 LOGIN alice pw\r\n", [C(b"a1 " + PRIVACY)]),
            # the synchronising literal is refused before "+": the password is never sent
            (b"a2 LOGIN {5}\r\n", [C(b"a2 " + PRIVACY)]),
            (b"a3 AUTHENTICATE PLAIN\r\n", [C(b"a3 " + PRIVACY)]),
            (b"a4 AUTHENTICATE PLAIN " + plain("", "a", "b") + b"\r\n", [C(b"a4 " + PRIVACY)]),
            (b"a5 LOGIN {5+}\r\nalice pw\r\n", [C(b"a5 " + PRIVACY)]),
        ],
    )


def test_login_disabled_without_starttls_says_use_tls() -> None:
    reply = b"a1 NO [PRIVACYREQUIRED] Plaintext login is disabled: connect with TLS\r\n"
    run_transcript(
        make(login_disabled=True, starttls=False),
        [(b"a1 LOGIN alice pw\r\n", [C(reply)])],
    )


def test_login_disabled_lifted_by_starttls() -> None:
    run_transcript(
        make(login_disabled=True),
        [
            (b"a1 STARTTLS\r\n", [C(b"a1 OK Begin TLS negotiation now\r\n"), StartClientTLS()]),
            (lambda m: m.tls_started(), []),
            (
                b"a2 CAPABILITY\r\n",
                [C(f"* CAPABILITY {CAPS_TLS}\r\n".encode()), C(b"a2 OK CAPABILITY completed\r\n")],
            ),
            (b"a3 LOGIN alice pw\r\n", [login("alice", "pw")]),
        ],
    )


# --- STARTTLS -----------------------------------------------------------------------------


def test_starttls_discards_pipelined_bytes() -> None:
    run_transcript(
        make(),
        [
            (
                b"a1 STARTTLS\r\na2 LOGIN evil injected\r\n",
                [C(b"a1 OK Begin TLS negotiation now\r\n"), StartClientTLS()],
            ),
            (b"a3 LOGIN more plaintext\r\n", []),
            (lambda m: m.tls_started(), []),
            (
                b"a4 CAPABILITY\r\n",
                [C(f"* CAPABILITY {CAPS_TLS}\r\n".encode()), C(b"a4 OK CAPABILITY completed\r\n")],
            ),
            (b"a5 STARTTLS\r\n", [C(b"a5 BAD TLS is already active\r\n")]),
        ],
    )


def test_starttls_not_offered() -> None:
    run_transcript(
        make(starttls=False),
        [(b"a1 STARTTLS\r\n", [C(b"a1 BAD STARTTLS is not available\r\n")])],
    )


def test_starttls_on_implicit_tls() -> None:
    run_transcript(
        make(tls_active=True),
        [(b"a1 STARTTLS\r\n", [C(b"a1 BAD TLS is already active\r\n")])],
    )


def test_eof_while_tls_pending() -> None:
    m = machine()
    m.receive(b"a1 STARTTLS\r\n")
    assert m.receive(b"") == [CloseConnection("client closed the connection")]


# --- verdicts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure, code",
    [
        (Failure.BAD_CREDENTIALS, b"AUTHENTICATIONFAILED"),
        (Failure.AUTHORISATION_NEEDED, b"AUTHENTICATIONFAILED"),
        (Failure.UPSTREAM_REJECTED, b"AUTHENTICATIONFAILED"),
        (Failure.UNAVAILABLE, b"UNAVAILABLE"),
        (Failure.THROTTLED, b"UNAVAILABLE"),
        (Failure.CONTACT_ADMIN, b"CONTACTADMIN"),
    ],
)
def test_failure_codes(failure: Failure, code: bytes) -> None:
    run_transcript(
        make(),
        [
            (b"a1 LOGIN u p\r\n", [login("u", "p")]),
            (failed(failure, "Try\r\nlater\x00"), [C(b"a1 NO [" + code + b"] Try later\r\n")]),
        ],
    )


def test_failure_text_drops_upstream_code_and_may_be_empty() -> None:
    m = machine()
    m.receive(b"a1 LOGIN u p\r\n")
    out = m.login_failed(Failure.UPSTREAM_REJECTED, "[AUTHENTICATIONFAILED] AUTHENTICATE failed.")
    assert out == [C(b"a1 NO [AUTHENTICATIONFAILED] AUTHENTICATE failed.\r\n")]
    m.receive(b"a2 LOGIN u p\r\n")
    out = m.login_failed(Failure.UNAVAILABLE, "\r\n")
    assert out == [C(b"a2 NO [UNAVAILABLE] Login failed\r\n")]


def test_retry_after_failure_and_pipelined_second_login() -> None:
    run_transcript(
        make(),
        [
            (b"a1 LOGIN u wrong\r\na2 LOGIN u right\r\n", [login("u", "wrong")]),
            (
                failed(),
                [C(b"a1 NO [AUTHENTICATIONFAILED] Wrong password\r\n"), login("u", "right")],
            ),
            (b"a3 NOOP\r\n", []),
            (succeeded(), [C(b"a2 OK Logged in\r\n"), StartRelay(b"a3 NOOP\r\n")]),
        ],
    )


def test_eof_while_login_in_flight_then_verdict_is_ignored() -> None:
    m = machine()
    assert m.receive(b"a1 LOGIN u p\r\n") == [login("u", "p")]
    assert m.receive(b"") == [CloseConnection("client closed the connection")]
    assert m.login_succeeded(None) == []
    assert m.login_failed(Failure.UNAVAILABLE, "x") == []


def test_eof() -> None:
    run_transcript(make(), [(b"", [CloseConnection("client closed the connection")])], trail=None)


def test_capabilities_with_bracket_are_not_put_in_a_code() -> None:
    m = machine()
    m.receive(b"a1 LOGIN u p\r\n")
    assert m.login_succeeded("IMAP4rev1 X]Y")[0] == C(b"a1 OK Logged in\r\n")


# --- caps ---------------------------------------------------------------------------------


def test_line_too_long() -> None:
    bye = b"* BYE [TOOBIG] Command line too long (limit 64 bytes)\r\n"
    close = CloseConnection("command line too long (limit 64 bytes)")
    run_transcript(make(max_line=64), [(b"a1 NOOP " + b"x" * 80, [C(bye), close])])
    # a line of exactly the cap is fine
    line = b"a1 LOGIN u " + b"p" * (64 - 13) + b"\r\n"
    assert len(line) == 64
    run_transcript(make(max_line=64), [(line, [login("u", "p" * 51)])])


def test_sasl_response_too_long() -> None:
    bye = b"* BYE [TOOBIG] SASL response too long (limit 64 bytes)\r\n"
    close = CloseConnection("SASL response too long (limit 64 bytes)")
    run_transcript(
        make(max_line=64),
        [(b"a1 AUTHENTICATE PLAIN\r\n", [C(b"+ \r\n")]), (b"A" * 70, [C(bye), close])],
    )


def test_synchronising_literal_too_big_is_refused_before_continuation() -> None:
    run_transcript(
        make(max_literal=16),
        [
            (b"a1 LOGIN {17}\r\n", [C(b"a1 NO [TOOBIG] Literal too large\r\n")]),
            (
                b"a2 LOGIN {99999999999999999999999999999}\r\n",
                [C(b"a2 NO [TOOBIG] Literal too large\r\n")],
            ),
            (b"a3 NOOP\r\n", [C(b"a3 OK NOOP completed\r\n")]),
            # the cap is on the sum of a command's literals
            (b"a4 LOGIN {10}\r\n", [READY]),
            (b"0123456789 {7}\r\n", [C(b"a4 NO [TOOBIG] Literal too large\r\n")]),
            (b"a5 LOGIN {16}\r\n", [READY]),
            (b"0123456789abcdef pw\r\n", [login("0123456789abcdef", "pw")]),
        ],
    )


def test_non_synchronising_literal_too_big_closes() -> None:
    run_transcript(
        make(max_literal=16),
        [
            (
                b"a1 LOGIN {17+}\r\n" + b"x" * 17 + b" pw\r\n",
                [
                    C(b"a1 BAD [TOOBIG] Literal too large\r\n"),
                    C(b"* BYE Literal too large\r\n"),
                    CloseConnection("literal too large"),
                ],
            )
        ],
    )


def test_pipelined_bytes_during_login_are_capped() -> None:
    m = machine(max_line=64, max_literal=16)
    assert m.receive(b"a1 LOGIN u p\r\n") == [login("u", "p")]
    assert m.receive(b"x" * 80) == []
    bye = b"* BYE [TOOBIG] Too much data sent while the login is checked\r\n"
    assert m.receive(b"x") == [
        C(bye),
        CloseConnection("too much data sent while the login is checked"),
    ]
    assert m.buffered_bytes == 0
    assert m.login_succeeded(None) == []
    # pipelined in the same chunk as the login: refused before Authenticate is emitted
    m = machine(max_line=64, max_literal=16)
    assert m.receive(b"a1 LOGIN u p\r\n" + b"x" * 81) == [
        C(bye),
        CloseConnection("too much data sent while the login is checked"),
    ]


# --- driver misuse ------------------------------------------------------------------------


def test_misuse_is_reported() -> None:
    fresh = ImapClientSide(starttls=True, tls_active=False, login_disabled=False)
    with pytest.raises(ProtocolMisuse):
        fresh.receive(b"a1 NOOP\r\n")
    m = machine()
    with pytest.raises(ProtocolMisuse):
        m.greeting()
    with pytest.raises(ProtocolMisuse):
        m.tls_started()
    with pytest.raises(ProtocolMisuse):
        m.login_succeeded(None)
    with pytest.raises(ProtocolMisuse):
        m.login_failed(Failure.BAD_CREDENTIALS, "x")
    m.receive(b"a1 LOGIN u p\r\n")
    m.login_succeeded(None)
    with pytest.raises(ProtocolMisuse):
        m.receive(b"a2 NOOP\r\n")


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        ImapClientSide(starttls=False, tls_active=False, login_disabled=False, max_line=10)


# --- fuzzing ------------------------------------------------------------------------------

# Mostly plausible commands (so the fuzzer reaches literals, SASL and verdicts), some noise.
_ARGS = [
    b"alice",
    b'"p\\"w"',
    b'"j\xc3\xb6rg"',
    b"{5}\r\nhello",
    b"{3+}\r\nabc",
    b"{40}\r\n" + b"x" * 40,
    b"{99}",
    b"{0}\r\n",
    b"NIL",
    b"(",
    b")",
    b'"x',
    b"\\",
    b"=",
    b"AGFsaWNlAHB3",
    b"\xc3\xb6",
    b"\0",
]
_NAMES = [
    b"LOGIN",
    b"AUTHENTICATE PLAIN",
    b"AUTHENTICATE XOAUTH2",
    b"STARTTLS",
    b"CAPABILITY",
    b"NOOP",
    b"ID",
    b"SELECT",
    b"LOGOUT",
]
_command = st.builds(
    lambda tag, name, args, end: tag + b" " + name + b"".join(b" " + a for a in args) + end,
    st.sampled_from([b"a1", b"b.2", b"+", b""]),
    st.sampled_from(_NAMES),
    st.lists(st.sampled_from(_ARGS), max_size=4),
    st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]),
)
_noise = st.one_of(
    st.binary(max_size=30),
    st.sampled_from(
        [
            b"*\r\n",
            b"AGFsaWNlAHB3\r\n",
            b"l1 LOGIN alice pw\r\n",
            b"l2 AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n",
            b"l3 LOGIN {5+}\r\nalice {2}\r\npw\r\n",
        ]
    ),
)
_stream = st.lists(st.one_of(_command, _command, _command, _noise), max_size=12).map(b"".join)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    data=_stream,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
    verdicts=st.lists(st.booleans(), max_size=10),
    login_disabled=st.booleans(),
    tls_active=st.booleans(),
)
def test_fuzz_client_side(
    data: bytes, cuts: list[int], verdicts: list[bool], login_disabled: bool, tls_active: bool
) -> None:
    max_line, max_literal = 64, 32
    m = ImapClientSide(
        starttls=True,
        tls_active=tls_active,
        login_disabled=login_disabled,
        max_line=max_line,
        max_literal=max_literal,
    )
    m.greeting()
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:], strict=False)] + [b""]
    outcome = iter(verdicts)
    pending = list(chunks)
    while pending:
        out = m.receive(pending.pop(0))
        done = False
        while out:
            follow: list = []
            for command in out:
                if isinstance(command, SendToClient):
                    assert well_formed_lines(command.data), command
                elif isinstance(command, StartClientTLS):
                    follow += m.tls_started()
                elif isinstance(command, Authenticate):
                    assert isinstance(command.password, Secret)
                    if next(outcome, False):
                        follow += m.login_succeeded("IMAP4rev1")
                    else:
                        follow += m.login_failed(Failure.BAD_CREDENTIALS, "no")
                elif isinstance(command, StartRelay | CloseConnection):
                    done = True
            assert m.buffered_bytes <= max_line + max_literal
            out = follow
        if done:
            break
