"""Introspection, the token validator, the ``/_test/`` admin endpoints and the process API."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path

import pytest

from proxy.demo.knobs import Knobs
from proxy.demo.process import DemoUpstream, DemoUpstreamError, http_session
from proxy.demo.tokens import (
    SCOPE_APP_ONLY,
    SCOPE_IMAP,
    SCOPE_POP,
    SCOPE_SMTP,
    TENANT_ID,
    TokenAuthority,
    Validator,
)

ALICE = "alice@contoso.example"


def introspect_url(upstream: DemoUpstream) -> str:
    return f"{upstream.entra_url}/{TENANT_ID}/oauth2/v2.0/introspect"


# -- introspection -----------------------------------------------------------------------


def test_introspection_post_get_and_bearer(demo_upstream: DemoUpstream) -> None:
    token = demo_upstream.issue_token(ALICE, [SCOPE_IMAP, SCOPE_SMTP])
    url = introspect_url(demo_upstream)
    with http_session(demo_upstream.ca_file) as session:
        posted = session.post(url, data={"token": token})  # Dovecot's "post" mode
        bearer = session.get(url, headers={"Authorization": f"Bearer {token}"})  # "auth" mode
        query = session.get(url, params={"token": token})  # "get" mode
        unknown = session.post(url, data={"token": "not-a-token"})
        empty = session.post(url, data={})
    answer = posted.json()
    assert answer["active"] is True
    assert answer["username"] == ALICE
    assert answer["scope"] == f"{SCOPE_IMAP} {SCOPE_SMTP}"
    assert answer["token_type"] == "Bearer"
    assert answer["exp"] > time.time() + 3000
    assert bearer.json() == answer and query.json() == answer
    assert unknown.status_code == 200 and unknown.json() == {"active": False}
    assert empty.status_code == 400
    assert demo_upstream.stats()["introspect_requests"] == 5


def test_introspection_of_an_expiring_token(demo_upstream: DemoUpstream) -> None:
    token = demo_upstream.issue_token(ALICE, [SCOPE_IMAP], lifetime=1)
    url = introspect_url(demo_upstream)
    deadline = time.monotonic() + 10
    with http_session(demo_upstream.ca_file) as session:
        assert session.post(url, data={"token": token}).json()["active"] is True
        while (answer := session.post(url, data={"token": token}).json())["active"]:
            assert time.monotonic() < deadline, "token never expired"
            time.sleep(0.1)
    assert answer == {"active": False}


# -- validator (in process) --------------------------------------------------------------


def test_validator_checks_user_scope_expiry_and_revocation() -> None:
    knobs = Knobs()
    authority = TokenAuthority(knobs)
    validator = Validator(authority)
    imap = authority.mint_access(ALICE, "client", (SCOPE_IMAP,)).token
    assert validator.validate(imap, ALICE, "imap")
    assert validator.validate(imap, ALICE.upper(), "imap")
    assert not validator.validate(imap, "bob@contoso.example", "imap")
    assert not validator.validate(imap, ALICE, "pop")
    assert not validator.validate(imap, ALICE, "smtp")
    assert not validator.validate(imap, ALICE, "ftp")
    assert not validator.validate("unknown", ALICE, "imap")

    both = authority.mint_access(ALICE, "client", (SCOPE_POP, SCOPE_SMTP)).token
    assert validator.validate(both, ALICE, "pop") and validator.validate(both, ALICE, "smtp")
    office365 = authority.mint_access(
        ALICE, "client", ("https://outlook.office365.com/IMAP.AccessAsUser.All",)
    ).token
    assert validator.validate(office365, ALICE, "imap")
    graph = authority.mint_access(ALICE, "client", ("IMAP.AccessAsUser.All",)).token
    assert not validator.validate(graph, ALICE, "imap")  # a Graph scope is not Outlook's

    expired = authority.mint_access(ALICE, "client", (SCOPE_IMAP,), lifetime=0).token
    assert not validator.validate(expired, ALICE, "imap")

    authority.revoke(ALICE)  # refresh tokens only
    assert validator.validate(imap, ALICE, "imap")
    authority.revoke(ALICE, access_tokens=True)
    assert not validator.validate(imap, ALICE, "imap")


def test_validator_app_only_tokens_serve_any_user() -> None:
    authority = TokenAuthority(Knobs())
    app = authority.client_credentials("client", Knobs().client_secret, SCOPE_APP_ONLY).access.token
    for user in (ALICE, "bob@contoso.example"):
        for protocol in ("imap", "pop", "smtp"):
            assert authority.validate(app, user, protocol)
    graph = authority.client_credentials(
        "client", Knobs().client_secret, "https://graph.microsoft.com/.default"
    ).access.token
    assert not authority.validate(graph, ALICE, "imap")


def test_minted_token_is_accepted_by_validator_semantics(demo_upstream: DemoUpstream) -> None:
    app_only = demo_upstream.issue_token(None, [SCOPE_APP_ONLY])
    with http_session(demo_upstream.ca_file) as session:
        answer = session.post(introspect_url(demo_upstream), data={"token": app_only}).json()
    assert answer["active"] is True and "username" not in answer


# -- admin -------------------------------------------------------------------------------


def test_config_round_trip_and_refusals(demo_upstream: DemoUpstream) -> None:
    assert demo_upstream.config()["access_token_lifetime"] == 3600
    changed = demo_upstream.configure(access_token_lifetime=60, strict_rotation=True)
    assert changed["access_token_lifetime"] == 60 and changed["strict_rotation"] is True
    with pytest.raises(DemoUpstreamError, match="400.*unknown knob 'nope'"):
        demo_upstream.configure(access_token_lifetime=5, nope=1)
    with pytest.raises(DemoUpstreamError, match="400"):
        demo_upstream.configure(token_endpoint_mode="sometimes")
    with pytest.raises(DemoUpstreamError, match="400"):
        demo_upstream.configure(access_token_lifetime="long")
    assert demo_upstream.config()["access_token_lifetime"] == 60  # all or nothing


def test_stats_count_token_requests_by_grant_type(demo_upstream: DemoUpstream) -> None:
    endpoint = f"{demo_upstream.authority}/oauth2/v2.0/token"
    with http_session(demo_upstream.ca_file) as session:
        for _ in range(2):
            session.post(
                endpoint,
                data={
                    "grant_type": "refresh_token",
                    "client_id": "c",
                    "refresh_token": "x",
                    "scope": SCOPE_IMAP,
                },
            )
        session.post(
            endpoint,
            data={
                "grant_type": "client_credentials",
                "client_id": "c",
                "client_secret": "demo-client-secret",
                "scope": SCOPE_APP_ONLY,
            },
        )
    stats = demo_upstream.stats()
    assert stats["token_requests"] == 3
    assert stats["token_errors"] == 2
    assert stats["grant_types"] == {"refresh_token": 2, "client_credentials": 1}
    demo_upstream.reset_stats()
    assert demo_upstream.stats()["token_requests"] == 0
    assert demo_upstream.stats()["grant_types"] == {}


def test_issue_token_and_revoke_through_admin(demo_upstream: DemoUpstream) -> None:
    token = demo_upstream.issue_token(ALICE, [SCOPE_IMAP], lifetime=120)
    url = introspect_url(demo_upstream)
    with http_session(demo_upstream.ca_file) as session:
        answer = session.post(url, data={"token": token}).json()
        assert answer["exp"] - time.time() == pytest.approx(120, abs=5)
        assert demo_upstream.revoke(ALICE, access_tokens=True) == 1
        assert session.post(url, data={"token": token}).json() == {"active": False}


def test_deliver_and_mailbox(demo_upstream: DemoUpstream) -> None:
    message = b"From: a@example\r\nSubject: hi\r\n\r\nbody\r\n"
    demo_upstream.deliver(ALICE, message)
    with http_session(demo_upstream.ca_file) as session:
        reply = session.post(
            f"{demo_upstream.entra_url}/_test/deliver",
            json={"user": ALICE, "message_b64": base64.b64encode(b"second").decode()},
        )
        assert reply.status_code == 200
        bad = session.post(
            f"{demo_upstream.entra_url}/_test/deliver", json={"user": ALICE, "message_b64": "***"}
        )
        assert bad.status_code == 400
    assert demo_upstream.mailbox(ALICE)[:2] == [message, b"second"]


def test_seeding_a_large_mailbox_is_fast(demo_upstream: DemoUpstream) -> None:
    message = b"Subject: big\r\n\r\n" + b"x" * (1 << 20)
    started = time.monotonic()
    for _ in range(50):
        demo_upstream.deliver("bulk@contoso.example", message)
    assert time.monotonic() - started < 10
    assert len(demo_upstream.mailbox("bulk@contoso.example")) == 50


# -- process -----------------------------------------------------------------------------


def test_ready_record_is_written(demo_upstream: DemoUpstream) -> None:
    record = json.loads((demo_upstream.workdir / "upstream.json").read_text())
    assert record == demo_upstream.record
    assert record["pid"] == demo_upstream.pid == demo_upstream.proc.pid
    assert record["authority"] == f"{record['entra_url']}/demo-tenant"
    assert record["ports"]["entra"] == int(record["entra_url"].rsplit(":", 1)[1])
    assert Path(record["ca_file"]).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert (os.stat(record["key_file"]).st_mode & 0o777) == 0o600


def test_stop_is_clean_and_kill_is_an_outage(demo_upstream_factory) -> None:
    upstream = demo_upstream_factory()
    assert upstream.stop() == 0
    other = demo_upstream_factory()
    other.kill()
    assert not other.running and other.proc.returncode == -signal.SIGKILL
    with pytest.raises(DemoUpstreamError):
        other.stats()


def test_upstream_exits_when_its_parent_goes_away(demo_upstream: DemoUpstream) -> None:
    assert demo_upstream.proc.stdin is not None
    demo_upstream.proc.stdin.close()  # what the parent's death does
    assert demo_upstream.proc.wait(timeout=10) == 0


def test_start_failure_reports_stderr(tmp_path: Path) -> None:
    with pytest.raises(DemoUpstreamError, match="bad --knobs"):
        DemoUpstream.start(tmp_path, knobs={"no_such_knob": 1})
