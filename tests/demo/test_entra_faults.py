"""Fake Entra failure modes as MSAL sees them: 503, a hanging token endpoint, garbage,
expired refresh tokens."""

from __future__ import annotations

import json
import time

import msal
import pytest
import requests

from proxy.demo.process import DemoUpstream, http_session
from tests.demo.demotools import IMAP, public_app, refresh_grant

ALICE = "alice@contoso.example"


def signed_in_app(
    upstream: DemoUpstream, timeout: float = 10
) -> tuple[msal.PublicClientApplication, dict]:
    app = public_app(upstream, timeout)
    result = app.acquire_token_by_device_flow(app.initiate_device_flow(scopes=[IMAP]))
    assert "access_token" in result, result
    return app, app.get_accounts()[0]


@pytest.fixture
def upstream(demo_upstream_factory) -> DemoUpstream:
    # A 2 s access token makes every acquire_token_silent go to the token endpoint.
    return demo_upstream_factory(auto_approve_user=ALICE, access_token_lifetime=2)


def test_503_raises_msal_service_error(upstream: DemoUpstream) -> None:
    app, account = signed_in_app(upstream)
    upstream.configure(token_endpoint_mode="503")
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        app.acquire_token_silent_with_error([IMAP], account)
    with http_session(upstream.ca_file) as session:
        reply = session.post(app.authority.token_endpoint, data={"grant_type": "refresh_token"})
    assert reply.status_code == 503
    assert reply.json()["error"] == "temporarily_unavailable"
    assert reply.json()["error_description"].startswith("AADSTS90033: ")

    # MSAL's public client remembers a 5xx for 60 s (no Retry-After): the same app keeps
    # failing without asking, while a fresh app reaches the endpoint again.
    upstream.configure(token_endpoint_mode="ok")
    upstream.reset_stats()
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        app.acquire_token_silent_with_error([IMAP], account)
    assert upstream.stats()["token_requests"] == 0


def test_hang_ends_within_the_session_timeout(upstream: DemoUpstream) -> None:
    app, account = signed_in_app(upstream, timeout=1)
    upstream.configure(token_endpoint_mode="hang")
    started = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout):
        app.acquire_token_silent_with_error([IMAP], account)
    assert time.monotonic() - started < 5
    # The hanging request does not block the server.
    assert upstream.stats()["grant_types"]["refresh_token"] == 1
    upstream.configure(token_endpoint_mode="ok")
    assert "access_token" in app.acquire_token_silent_with_error([IMAP], account)


def test_garbage_body_is_a_json_error(upstream: DemoUpstream) -> None:
    app, account = signed_in_app(upstream)
    upstream.configure(token_endpoint_mode="garbage")
    with pytest.raises(json.JSONDecodeError):
        app.acquire_token_silent_with_error([IMAP], account)


def test_expired_refresh_token_gives_700082(demo_upstream_factory) -> None:
    upstream = demo_upstream_factory(auto_approve_user=ALICE, refresh_token_lifetime=1)
    app, _ = signed_in_app(upstream)
    [refresh_token] = [
        e["secret"] for e in app.token_cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)
    ]
    body = refresh_grant(refresh_token)
    deadline = time.monotonic() + 10
    with http_session(upstream.ca_file) as session:
        while True:
            reply = session.post(app.authority.token_endpoint, data=body)
            if reply.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_grant"
    assert reply.json()["error_codes"] == [700082]
    assert "has expired due to inactivity" in reply.json()["error_description"]


def test_unknown_refresh_token(upstream: DemoUpstream) -> None:
    app = public_app(upstream)
    with http_session(upstream.ca_file) as session:
        reply = session.post(app.authority.token_endpoint, data=refresh_grant("nope"))
    assert reply.status_code == 400 and reply.json()["error"] == "invalid_grant"
