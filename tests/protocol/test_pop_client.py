"""PopClientSide as transcripts: every input whole, one byte at a time, and with trailing data."""

from __future__ import annotations

import base64
from collections.abc import Callable

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
from proxy.protocol.pop import PopClientSide
from proxy.secret import Secret

CAPA_TLS = (
    b"+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
    b"PIPELINING\r\nSTLS\r\nIMPLEMENTATION xoauth2-proxy\r\n.\r\n"
)
LOG_IN_FIRST = b"-ERR Log in first (USER/PASS or AUTH PLAIN)\r\n"
PLAINTEXT_REFUSED = (
    b"-ERR [AUTH] Plaintext login is not allowed on this connection; use STLS first\r\n"
)

Step = bytes | Callable[[PopClientSide], list]


def plain(authzid: str, user: str, password: str) -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def auth(user: str, password: str, mechanism: str) -> Authenticate:
    return Authenticate(username=user, password=Secret(password), mechanism=mechanism)


def make(**kwargs: object) -> PopClientSide:
    options: dict = {"starttls": True, "tls_active": False, "login_disabled": False}
    options.update(kwargs)
    machine = PopClientSide(**options)
    assert machine.greeting() == [SendToClient(b"+OK xoauth2-proxy ready\r\n")]
    return machine


def normalise(commands: list) -> list:
    """Merge adjacent SendToClient data so that differently split inputs compare equal."""
    out: list = []
    for c in commands:
        if isinstance(c, SendToClient):
            if out and isinstance(out[-1], bytes):
                out[-1] += c.data
            else:
                out.append(c.data)
        else:
            out.append(c)
    return out


TRAILING = b"NOO"  # the start of a next command, not yet complete


def run(steps: list[Step], mode: str, **kwargs: object) -> list:
    """Play ``steps``: bytes fed "whole", "bytewise", or whole with ``TRAILING`` appended
    to the last bytes step ("trailing")."""
    machine = make(**kwargs)
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
    return normalise(out)


def with_trailing(expected: list) -> list:
    """What "trailing" mode gives: the held partial line reaches the upstream on relay."""
    return [
        StartRelay(c.client_bytes + TRAILING) if isinstance(c, StartRelay) else c for c in expected
    ]


def check(steps: list[Step], expected: list, **kwargs: object) -> None:
    """The transcript gives ``expected`` fed whole, one byte at a time, and with a trailing
    partial line (which must produce nothing, and is relayed if a relay starts)."""
    assert run(steps, "whole", **kwargs) == expected
    assert run(steps, "bytewise", **kwargs) == expected
    assert run(steps, "trailing", **kwargs) == with_trailing(expected)


def succeed(m: PopClientSide) -> list:
    return m.login_succeeded()


def fail(m: PopClientSide) -> list:
    return m.login_failed(Failure.BAD_CREDENTIALS, "Wrong password")


# --- CAPA -------------------------------------------------------------------------------------


def test_capa_plaintext_offers_stls() -> None:
    check([b"CAPA\r\n"], [CAPA_TLS])


def test_capa_under_tls_does_not_offer_stls() -> None:
    expected = CAPA_TLS.replace(b"STLS\r\n", b"")
    check([b"capa\r\n"], [expected], tls_active=True)
    check([b"CAPA\r\n"], [expected], starttls=False)


def test_capa_when_login_disabled_hides_user_and_sasl() -> None:
    expected = CAPA_TLS.replace(b"USER\r\nSASL PLAIN\r\n", b"")
    check([b"CAPA\r\n"], [expected], login_disabled=True)


def test_capa_with_arguments_is_an_error() -> None:
    check([b"CAPA now\r\n"], [b"-ERR CAPA takes no arguments\r\n"])


# --- USER / PASS ------------------------------------------------------------------------------


def test_user_pass_then_success_starts_relay() -> None:
    check(
        [b"USER alice@example.com\r\nPASS s3cret\r\n", succeed],
        [
            b"+OK Now send the password with PASS\r\n",
            auth("alice@example.com", "s3cret", "USER/PASS"),
            b"+OK Logged in.\r\n",
            StartRelay(client_bytes=b""),
        ],
    )


def test_password_is_the_rest_of_the_line_with_spaces() -> None:
    check(
        [b"USER bob\r\nPASS  two words \r\n"],
        [b"+OK Now send the password with PASS\r\n", auth("bob", " two words ", "USER/PASS")],
    )


def test_commands_are_case_insensitive() -> None:
    check(
        [b"uSeR bob\r\npass pw\r\n"],
        [b"+OK Now send the password with PASS\r\n", auth("bob", "pw", "USER/PASS")],
    )


def test_utf8_user_and_password_survive() -> None:
    check(
        ["USER jörg@bücher.example\r\nPASS pässwörd €\r\n".encode()],
        [
            b"+OK Now send the password with PASS\r\n",
            auth("jörg@bücher.example", "pässwörd €", "USER/PASS"),
        ],
    )


def test_pass_without_user_is_refused() -> None:
    check([b"PASS pw\r\n"], [b"-ERR Send USER first\r\n"])


def test_pass_consumes_the_user() -> None:
    check(
        [b"USER bob\r\nPASS pw\r\n", fail, b"PASS again\r\n"],
        [
            b"+OK Now send the password with PASS\r\n",
            auth("bob", "pw", "USER/PASS"),
            b"-ERR [AUTH] Wrong password\r\n-ERR Send USER first\r\n",
        ],
    )


def test_empty_user_and_password_are_refused() -> None:
    check(
        [b"USER\r\nUSER  \r\nUSER bob\r\nPASS\r\n"],
        [
            b"-ERR USER needs a user name (UTF-8)\r\n-ERR USER needs a user name (UTF-8)\r\n"
            b"+OK Now send the password with PASS\r\n-ERR PASS needs a password (UTF-8)\r\n"
        ],
    )


def test_invalid_utf8_and_control_characters_are_refused() -> None:
    check(
        [b"USER b\xffb\r\nUSER a\x01b\r\nUSER bob\r\nPASS \xc3\x28\r\n"],
        [
            b"-ERR USER needs a user name (UTF-8)\r\n-ERR the user name has control characters\r\n"
            b"+OK Now send the password with PASS\r\n-ERR PASS needs a password (UTF-8)\r\n"
        ],
    )


def test_bare_lf_ends_a_line() -> None:
    check(
        [b"USER bob\nPASS pw\n"],
        [b"+OK Now send the password with PASS\r\n", auth("bob", "pw", "USER/PASS")],
    )


# --- AUTH PLAIN -------------------------------------------------------------------------------


def test_auth_plain_with_initial_response() -> None:
    check(
        [b"AUTH PLAIN " + plain("", "alice", "pw 1") + b"\r\n", succeed],
        [auth("alice", "pw 1", "PLAIN"), b"+OK Logged in.\r\n", StartRelay()],
    )


def test_auth_plain_with_continuation() -> None:
    check(
        [b"auth plain\r\n", plain("bob", "bob", "pw") + b"\r\n"],
        [b"+ \r\n", auth("bob", "pw", "PLAIN")],
    )


def test_auth_plain_utf8() -> None:
    check(
        [b"AUTH PLAIN " + plain("", "jörg", "€uro") + b"\r\n"],
        [auth("jörg", "€uro", "PLAIN")],
    )


def test_auth_plain_star_cancels() -> None:
    check(
        [b"AUTH PLAIN\r\n*\r\nSTAT\r\n"],
        [b"+ \r\n-ERR Authentication cancelled\r\n" + LOG_IN_FIRST],
    )


def test_auth_plain_invalid_base64() -> None:
    check([b"AUTH PLAIN !!!!\r\n"], [b"-ERR invalid base64\r\n"])
    check([b"AUTH PLAIN\r\n", b"a\r\n"], [b"+ \r\n-ERR invalid base64\r\n"])


def test_auth_plain_empty_initial_response() -> None:
    check(
        [b"AUTH PLAIN =\r\n"],
        [b"-ERR PLAIN response must be authzid NUL authcid NUL password\r\n"],
    )


def test_auth_plain_other_authzid_is_refused() -> None:
    check(
        [b"AUTH PLAIN " + plain("admin", "bob", "pw") + b"\r\n"],
        [b"-ERR acting for another user (authzid) is not supported\r\n"],
    )


def test_auth_other_mechanisms_name_plain() -> None:
    check(
        [b"AUTH XOAUTH2 abc\r\nAUTH CRAM-MD5\r\nAUTH PLAIN a b\r\n"],
        [
            b"-ERR Unsupported SASL mechanism; use AUTH PLAIN\r\n"
            b"-ERR Unsupported SASL mechanism; use AUTH PLAIN\r\n"
            b"-ERR Syntax: AUTH PLAIN [initial-response]\r\n"
        ],
    )


def test_auth_without_argument_lists_mechanisms() -> None:
    check([b"AUTH\r\n"], [b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"])


# --- STLS -------------------------------------------------------------------------------------


def test_stls_then_tls_started_discards_pipelined_bytes() -> None:
    check(
        [
            b"USER bob\r\nSTLS\r\nPASS injected\r\n",
            b"PASS injected\r\n",
            lambda m: m.tls_started(),
            b"CAPA\r\nPASS pw\r\n",
        ],
        [
            b"+OK Now send the password with PASS\r\n+OK Begin TLS negotiation\r\n",
            StartClientTLS(),
            CAPA_TLS.replace(b"STLS\r\n", b"") + b"-ERR Send USER first\r\n",
        ],
    )


def test_stls_not_offered_or_already_active() -> None:
    check([b"STLS\r\n"], [b"-ERR STLS is not offered here\r\n"], starttls=False)
    check([b"STLS\r\n"], [b"-ERR TLS is already active\r\n"], tls_active=True)
    check([b"STLS now\r\n"], [b"-ERR STLS takes no arguments\r\n"])


def test_tls_started_out_of_turn_is_misuse() -> None:
    with pytest.raises(ProtocolMisuse):
        make().tls_started()


# --- QUIT, NOOP, others -----------------------------------------------------------------------


def test_quit_closes_and_ignores_trailing_data() -> None:
    check(
        [b"QUIT\r\nUSER bob\r\n", b"PASS pw\r\n"],
        [b"+OK Bye\r\n", CloseConnection("client sent QUIT")],
    )


def test_noop_and_transaction_commands_need_a_login() -> None:
    check(
        [b"NOOP\r\nSTAT\r\nretr 1\r\n\r\n"],
        [b"-ERR NOOP is not allowed before login; log in\r\n" + LOG_IN_FIRST * 3],
    )


# --- login disabled (plaintext, non-loopback) -------------------------------------------------


def test_login_disabled_refuses_user_pass_and_auth_plain() -> None:
    check(
        [
            b"USER bob\r\nPASS pw\r\nAUTH PLAIN "
            + plain("", "bob", "pw")
            + b"\r\nAUTH PLAIN\r\nAUTH\r\nSTAT\r\n"
        ],
        [
            PLAINTEXT_REFUSED * 4
            + b"+OK SASL mechanisms follow\r\n.\r\n"
            + b"-ERR Log in first (STLS, then USER/PASS or AUTH PLAIN)\r\n"
        ],
        login_disabled=True,
    )


def test_login_disabled_without_stls_says_connect_with_tls() -> None:
    check(
        [b"USER bob\r\n"],
        [b"-ERR [AUTH] Plaintext login is not allowed on this connection; connect with TLS\r\n"],
        login_disabled=True,
        starttls=False,
    )


def test_login_disabled_is_lifted_by_tls() -> None:
    check(
        [b"STLS\r\n", lambda m: m.tls_started(), b"USER bob\r\nPASS pw\r\n"],
        [
            b"+OK Begin TLS negotiation\r\n",
            StartClientTLS(),
            b"+OK Now send the password with PASS\r\n",
            auth("bob", "pw", "USER/PASS"),
        ],
        login_disabled=True,
    )


# --- one login in flight, verdicts -----------------------------------------------------------


def test_bytes_after_login_are_held_and_relayed() -> None:
    check(
        [b"USER bob\r\nPASS pw\r\nSTAT\r\nLIST", b"\r\nRETR 1\r\n", succeed],
        [
            b"+OK Now send the password with PASS\r\n",
            auth("bob", "pw", "USER/PASS"),
            b"+OK Logged in.\r\n",
            StartRelay(client_bytes=b"STAT\r\nLIST\r\nRETR 1\r\n"),
        ],
    )


def test_commands_pipelined_after_a_failed_login_are_answered() -> None:
    check(
        [b"USER bob\r\nPASS bad\r\nSTAT\r\nUSER bob\r\nPASS good\r\nLIST\r\n", fail, succeed],
        [
            b"+OK Now send the password with PASS\r\n",
            auth("bob", "bad", "USER/PASS"),
            b"-ERR [AUTH] Wrong password\r\n"
            + LOG_IN_FIRST
            + b"+OK Now send the password with PASS\r\n",
            auth("bob", "good", "USER/PASS"),
            b"+OK Logged in.\r\n",
            StartRelay(client_bytes=b"LIST\r\n"),
        ],
    )


def test_upstream_leftover_follows_our_ok() -> None:
    check(
        [b"USER bob\r\nPASS pw\r\n", lambda m: m.login_succeeded(None, b"+OK extra\r\n")],
        [
            b"+OK Now send the password with PASS\r\n",
            auth("bob", "pw", "USER/PASS"),
            b"+OK Logged in.\r\n+OK extra\r\n",
            StartRelay(),
        ],
    )


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (Failure.BAD_CREDENTIALS, b"[AUTH]"),
        (Failure.AUTHORISATION_NEEDED, b"[AUTH]"),
        (Failure.UPSTREAM_REJECTED, b"[AUTH]"),
        (Failure.UNAVAILABLE, b"[SYS/TEMP]"),
        (Failure.THROTTLED, b"[SYS/TEMP]"),
        (Failure.CONTACT_ADMIN, b"[SYS/PERM]"),
    ],
)
def test_login_failed_response_codes(failure: Failure, code: bytes) -> None:
    m = make()
    m.receive(b"AUTH PLAIN " + plain("", "bob", "pw") + b"\r\n")
    out = m.login_failed(failure, "Try\r\nagain\tlater.\u2028")
    assert out == [SendToClient(b"-ERR " + code + b" Try again later.\r\n")]
    assert m.receive(b"USER bob\r\n") == [SendToClient(b"+OK Now send the password with PASS\r\n")]


def test_login_failed_text_fits_one_reply_line() -> None:
    m = make()
    m.receive(b"USER bob\r\nPASS pw\r\n")
    [reply] = m.login_failed(Failure.UNAVAILABLE, "é" * 1000)
    assert isinstance(reply, SendToClient)
    assert len(reply.data) <= 512
    assert reply.data.endswith(b"\r\n")
    reply.data.decode("utf-8")  # cut at a character boundary


def test_verdicts_out_of_turn_are_misuse() -> None:
    m = make()
    with pytest.raises(ProtocolMisuse):
        m.login_succeeded()
    with pytest.raises(ProtocolMisuse):
        m.login_failed(Failure.BAD_CREDENTIALS, "x")
    m.receive(b"USER bob\r\nPASS pw\r\n")
    m.login_succeeded()
    with pytest.raises(ProtocolMisuse):
        m.receive(b"STAT\r\n")


def test_receive_before_greeting_and_second_greeting_are_misuse() -> None:
    m = PopClientSide(starttls=False, tls_active=True, login_disabled=False)
    with pytest.raises(ProtocolMisuse):
        m.receive(b"CAPA\r\n")
    m.greeting()
    with pytest.raises(ProtocolMisuse):
        m.greeting()


def test_custom_greeting_is_one_line() -> None:
    m = PopClientSide(starttls=False, tls_active=True, login_disabled=False, greeting="hi\r\nthere")
    assert m.greeting() == [SendToClient(b"+OK hi there\r\n")]


def test_authenticate_repr_hides_the_password() -> None:
    [cmd] = make().receive(b"AUTH PLAIN " + plain("", "bob", "hunter2") + b"\r\n")
    assert "hunter2" not in repr(cmd)


# --- closing and limits -----------------------------------------------------------------------


def test_client_close() -> None:
    check([b"USER b", b""], [CloseConnection("client closed the connection")])


def test_client_close_during_login_then_verdict_is_ignored() -> None:
    check(
        [b"USER bob\r\nPASS pw\r\n", b"", succeed, fail, b"more"],
        [
            b"+OK Now send the password with PASS\r\n",
            auth("bob", "pw", "USER/PASS"),
            CloseConnection("client closed the connection"),
        ],
    )


def test_line_at_the_cap_is_fine_and_over_it_is_refused() -> None:
    ok = b"USER " + b"u" * 59 + b"\r\n"  # 64 octets before CRLF
    check([ok], [b"+OK Now send the password with PASS\r\n"], max_line=64)
    check(
        [b"USER " + b"u" * 60 + b"\r\nCAPA\r\n"],
        [b"-ERR line too long\r\n", CloseConnection("client line too long")],
        max_line=64,
    )


def test_unterminated_long_line_is_refused_without_waiting() -> None:
    m = make(max_line=64)
    assert m.receive(b"x" * 65) == []  # could still be 64 octets plus CR
    assert normalise(m.receive(b"x")) == [
        b"-ERR line too long\r\n",
        CloseConnection("client line too long"),
    ]
    assert m.buffered_bytes == 0
    assert m.receive(b"CAPA\r\n") == []


def test_too_much_data_during_login_closes() -> None:
    m = make(max_line=64, max_pending=100)
    m.receive(b"USER bob\r\nPASS pw\r\n")
    assert m.receive(b"x" * 100) == []
    out = normalise(m.receive(b"x"))
    assert out == [
        b"-ERR [SYS/TEMP] too much data sent during login\r\n",
        CloseConnection("client sent too much data during login"),
    ]
    assert m.login_succeeded() == []


def test_trailing_partial_line_is_kept_for_later() -> None:
    m = make()
    assert m.receive(b"CAPA\r\nUSER bo") == [SendToClient(CAPA_TLS)]
    assert m.receive(b"b\r\n") == [SendToClient(b"+OK Now send the password with PASS\r\n")]


# --- fuzzing ----------------------------------------------------------------------------------

VOCABULARY = [
    b"USER bob\r\n",
    b"PASS p w\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN " + plain("", "bob", "pw") + b"\r\n",
    plain("", "bob", "pw") + b"\r\n",
    b"AUTH\r\n",
    b"STLS\r\n",
    b"CAPA\r\n",
    b"QUIT\r\n",
    b"*\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"x" * 70,
]

chunk = st.one_of(st.binary(max_size=40), st.sampled_from(VOCABULARY))


def assert_lines(data: bytes) -> None:
    assert data.endswith(b"\r\n")
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(chunk, max_size=30),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    data=st.data(),
)
def test_fuzz_client(
    chunks: list[bytes], flags: tuple[bool, bool, bool], data: st.DataObject
) -> None:
    starttls, tls_active, login_disabled = flags
    m = PopClientSide(
        starttls=starttls,
        tls_active=tls_active,
        login_disabled=login_disabled,
        max_line=64,
        max_pending=128,
    )
    stream = b"".join(chunks)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    pieces = [p for p in pieces if p] + [b""]  # the client closes at the end
    pending = m.greeting()
    for piece in pieces:
        pending += m.receive(piece)
        while pending:
            cmd = pending.pop(0)
            if isinstance(cmd, SendToClient):
                assert_lines(cmd.data)
            elif isinstance(cmd, Authenticate):
                if data.draw(st.booleans()):
                    pending += m.login_failed(data.draw(st.sampled_from(list(Failure))), "no\r\n")
                else:
                    pending += m.login_succeeded()
            elif isinstance(cmd, StartClientTLS):
                pending += m.tls_started()
            elif isinstance(cmd, StartRelay):
                assert len(cmd.client_bytes) <= 128
                return
            else:
                assert isinstance(cmd, CloseConnection)
                return
            assert m.buffered_bytes <= 128


@settings(max_examples=200)
@given(data=st.data())
def test_any_split_gives_the_same_transcript(data: st.DataObject) -> None:
    session = b"capa\r\nAUTH\r\nNOOP\r\nAUTH PLAIN\r\n" + plain("", "bob", "pw") + b"\r\nSTAT\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(session)), max_size=8)))
    pieces = [session[a:b] for a, b in zip([0, *cuts], [*cuts, len(session)], strict=True)]
    pieces = [p for p in pieces if p]  # b"" would mean the client closed
    assert run([*pieces, succeed], "whole") == run([session, succeed], "whole")


def test_over_long_line_ended_by_bare_lf_is_refused() -> None:
    check(
        [b"USER " + b"u" * 60 + b"\n"],
        [b"-ERR line too long\r\n", CloseConnection("client line too long")],
        max_line=64,
    )


def test_plain_user_with_control_characters_is_refused() -> None:
    check(
        [b"AUTH PLAIN " + plain("", "a\tb", "pw") + b"\r\n"],
        [b"-ERR the user name has control characters\r\n"],
    )


def test_close_while_tls_pending_then_tls_started_is_ignored() -> None:
    m = make()
    m.receive(b"STLS\r\n")
    assert m.receive(b"") == [CloseConnection("client closed the connection")]
    assert m.tls_started() == []


def test_tiny_max_line_is_refused() -> None:
    with pytest.raises(ValueError):
        PopClientSide(starttls=False, tls_active=False, login_disabled=False, max_line=8)


def test_too_much_data_in_the_login_chunk_closes() -> None:
    check(
        [b"USER bob\r\nPASS pw\r\n" + b"x" * 101],
        [
            b"+OK Now send the password with PASS\r\n",
            auth("bob", "pw", "USER/PASS"),
            b"-ERR [SYS/TEMP] too much data sent during login\r\n",
            CloseConnection("client sent too much data during login"),
        ],
        max_line=64,
        max_pending=100,
    )
