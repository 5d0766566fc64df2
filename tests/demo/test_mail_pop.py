"""The fake Microsoft 365 POP3 server, driven by ``poplib`` over TLS verified with the demo
CA (``AUTH`` through ``poplib``'s raw ``_shortcmd``, as poplib has no SASL)."""

from __future__ import annotations

import base64
import json
import poplib

import pytest

from proxy.protocol.sasl import xoauth2_b64
from tests.demo.demotools import IMAP, POP, USER

FAILURE = "-ERR Authentication failure: unknown user name or bad password."
MSG1 = b"Subject: one\r\n\r\nbody one\r\n.dot line\r\n..two dots\r\n"
MSG2 = b"Subject: two\r\nX-A: b\r\n\r\nl1\r\nl2\r\nl3\r\n"


@pytest.fixture
def token(demo_upstream) -> str:  # POP only, unlike the conftest's token
    return demo_upstream.issue_token(USER, [POP])


def pop3s(up, ctx) -> poplib.POP3_SSL:
    return poplib.POP3_SSL("127.0.0.1", up.ports["pop3s"], context=ctx, timeout=10)


def login(up, ctx, token: str) -> poplib.POP3_SSL:
    p = pop3s(up, ctx)
    assert p._shortcmd("AUTH XOAUTH2 " + xoauth2_b64(USER, token).decode()) == (
        b"+OK User successfully authenticated.")
    return p


def test_capa_and_user_pass_refused(demo_upstream, ctx) -> None:
    p = pop3s(demo_upstream, ctx)
    assert p.getwelcome().startswith(b"+OK The Microsoft Exchange POP3 service is ready")
    assert p.capa() == {"TOP": [], "UIDL": [], "SASL": ["XOAUTH2"]}
    p.user(USER)
    with pytest.raises(poplib.error_proto) as err:
        p.pass_("password")
    assert err.value.args[0] == FAILURE.encode()
    with pytest.raises(poplib.error_proto, match="not valid in this state"):
        p.stat()
    p.quit()


def test_plain_port_stls(demo_upstream, ctx, token) -> None:
    p = poplib.POP3("127.0.0.1", demo_upstream.ports["pop3"], timeout=10)
    assert p.capa() == {"TOP": [], "UIDL": [], "STLS": []}
    with pytest.raises(poplib.error_proto, match="not valid in this state"):
        p._shortcmd("AUTH XOAUTH2 " + xoauth2_b64(USER, token).decode())
    p.stls(context=ctx)
    assert "SASL" in p.capa()
    assert p._shortcmd("AUTH XOAUTH2 " + xoauth2_b64(USER, token).decode()).startswith(b"+OK")
    assert p.stat() == (0, 0)
    p.quit()


def test_auth_with_continuation(demo_upstream, ctx, token) -> None:
    p = pop3s(demo_upstream, ctx)
    assert p._shortcmd("AUTH XOAUTH2") == b"+ "
    assert p._shortcmd(xoauth2_b64(USER, token).decode()).startswith(b"+OK")
    p.quit()


def test_bad_token_and_wrong_scope(demo_upstream, ctx) -> None:
    imap_only = demo_upstream.issue_token(USER, [IMAP])
    for tok in ("garbage", imap_only):
        p = pop3s(demo_upstream, ctx)
        with pytest.raises(poplib.error_proto) as err:
            p._shortcmd("AUTH XOAUTH2 " + xoauth2_b64(USER, tok).decode())
        assert err.value.args[0] == FAILURE.encode()
        p.quit()


def test_error_challenge(demo_upstream, ctx) -> None:
    demo_upstream.configure(xoauth2_error_challenge=True)
    p = pop3s(demo_upstream, ctx)
    challenge = p._shortcmd("AUTH XOAUTH2 " + xoauth2_b64(USER, "bad").decode())
    assert challenge.startswith(b"+ ")
    assert json.loads(base64.b64decode(challenge[2:])) == {
        "status": "401", "schemes": "bearer", "scope": POP}
    with pytest.raises(poplib.error_proto) as err:
        p._shortcmd("")
    assert err.value.args[0] == FAILURE.encode()
    p.quit()


def test_transaction_commands(demo_upstream, ctx, token) -> None:
    demo_upstream.deliver(USER, MSG1)
    demo_upstream.deliver(USER, MSG2)
    p = login(demo_upstream, ctx, token)
    assert p.stat() == (2, len(MSG1) + len(MSG2))
    assert p.list()[1] == [b"1 %d" % len(MSG1), b"2 %d" % len(MSG2)]
    uidl = p.uidl()[1]
    assert len(uidl) == 2 and len({u.split()[1] for u in uidl}) == 2
    _, lines, _ = p.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == MSG1
    _, lines, _ = p.top(2, 1)
    assert lines == [b"Subject: two", b"X-A: b", b"", b"l1"]
    assert p.noop().startswith(b"+OK")
    p.dele(1)
    with pytest.raises(poplib.error_proto):
        p.retr(1)
    assert p.stat() == (1, len(MSG2))
    p.rset()
    assert p.stat()[0] == 2
    p.dele(2)
    p.quit()
    assert demo_upstream.mailbox(USER) == [MSG1]


def test_deletions_need_quit(demo_upstream, ctx, token) -> None:
    demo_upstream.deliver(USER, MSG1)
    p = login(demo_upstream, ctx, token)
    p.dele(1)
    p.close()  # dropped without QUIT: nothing is deleted
    p = login(demo_upstream, ctx, token)
    assert p.stat() == (1, len(MSG1))
    p.quit()
    assert demo_upstream.mailbox(USER) == [MSG1]
