"""Real MSAL against the fake Entra ID over HTTPS: device code, auth code + PKCE, refresh,
client credentials and revocation."""

from __future__ import annotations

import hashlib
import warnings
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import msal
import pytest
import requests

from proxy.demo.process import DemoUpstream, http_session
from proxy.demo.tokens import TENANT_ID
from tests.demo.demotools import CLIENT_ID, IMAP, SMTP, public_app, refresh_grant

APP_ONLY = "https://outlook.office365.com/.default"
ALICE = "Alice.Smith@contoso.example"
REDIRECT = "http://localhost:8765/callback"


def introspect(upstream: DemoUpstream, token: str) -> dict:
    with http_session(upstream.ca_file) as session:
        url = f"{upstream.entra_url}/{TENANT_ID}/oauth2/v2.0/introspect"
        response = session.post(url, data={"token": token})
        response.raise_for_status()
        return response.json()


def cached_refresh_tokens(app: msal.ClientApplication) -> set[str]:
    found = app.token_cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)
    return {entry["secret"] for entry in found}


class FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.method: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.action, self.method = values.get("action"), values.get("method")
        elif tag == "input" and values.get("type") == "hidden":
            self.fields[values["name"] or ""] = values.get("value") or ""


def sign_in_with_device_code(
    upstream: DemoUpstream,
    app: msal.PublicClientApplication,
    username: str = ALICE,
    scopes: list[str] | None = None,
) -> dict:
    flow = app.initiate_device_flow(scopes=scopes or [IMAP, SMTP])
    upstream.approve(flow["user_code"], username)
    result = app.acquire_token_by_device_flow(flow)
    assert "access_token" in result, result
    return result


# -- discovery ---------------------------------------------------------------------------


def test_discovery_document_points_at_this_server(demo_upstream: DemoUpstream) -> None:
    with http_session(demo_upstream.ca_file) as session:
        url = f"{demo_upstream.authority}/v2.0/.well-known/openid-configuration"
        config = session.get(url).json()
    oauth = f"{demo_upstream.entra_url}/{TENANT_ID}/oauth2/v2.0"
    assert config["token_endpoint"] == f"{oauth}/token"
    assert config["authorization_endpoint"] == f"{oauth}/authorize"
    assert config["device_authorization_endpoint"] == f"{oauth}/devicecode"
    assert config["introspection_endpoint"] == f"{oauth}/introspect"
    assert config["issuer"] == f"{demo_upstream.entra_url}/{TENANT_ID}/v2.0"
    app = public_app(demo_upstream)
    assert app.authority.token_endpoint == f"{oauth}/token"
    assert app.authority.tenant == TENANT_ID


# -- device code -------------------------------------------------------------------------


def test_device_flow_pending_until_approved(demo_upstream: DemoUpstream) -> None:
    app = public_app(demo_upstream)
    flow = app.initiate_device_flow(scopes=[IMAP, SMTP])
    assert flow["user_code"] in flow["message"]
    assert flow["verification_uri"] == f"{demo_upstream.entra_url}/devicelogin"
    assert flow["interval"] == 1

    pending = app.acquire_token_by_device_flow(flow, exit_condition=lambda flow: True)
    assert pending["error"] == "authorization_pending"
    assert "AADSTS70016" in pending["error_description"]

    demo_upstream.approve(flow["user_code"], ALICE)
    result = app.acquire_token_by_device_flow(flow)
    assert result["token_type"] == "Bearer"
    assert set(result["scope"].split()) == {IMAP, SMTP}
    assert result["id_token_claims"]["preferred_username"] == ALICE
    assert result["id_token_claims"]["tid"] == TENANT_ID
    assert result["id_token_claims"]["aud"] == CLIENT_ID
    assert "." not in result["access_token"]  # opaque, not a JWT
    [account] = app.get_accounts()
    assert account["username"] == ALICE
    assert account["home_account_id"] == f"{result['id_token_claims']['oid']}.{TENANT_ID}"
    assert cached_refresh_tokens(app) == {result["refresh_token"]}
    answer = introspect(demo_upstream, result["access_token"])
    assert answer["active"] is True and answer["username"] == ALICE


def test_device_flow_auto_approve(demo_upstream_factory) -> None:
    upstream = demo_upstream_factory(auto_approve_user="bob@contoso.example")
    app = public_app(upstream)
    result = app.acquire_token_by_device_flow(app.initiate_device_flow(scopes=[IMAP]))
    assert result["id_token_claims"]["preferred_username"] == "bob@contoso.example"
    assert result["scope"] == IMAP
    assert upstream.stats()["grant_types"] == {"device_code": 1}


def test_device_flow_expired_code(demo_upstream: DemoUpstream) -> None:
    app = public_app(demo_upstream)
    flow = app.initiate_device_flow(scopes=[IMAP])
    demo_upstream.expire_device_code(flow["user_code"])
    result = app.acquire_token_by_device_flow(flow)
    assert result["error"] == "expired_token"
    assert result["error_codes"] == [70020]


def test_approve_unknown_code_is_an_error(demo_upstream: DemoUpstream) -> None:
    with pytest.raises(Exception, match="404"):
        demo_upstream.approve("NOSUCHCODE", ALICE)


# -- auth code + PKCE --------------------------------------------------------------------


def test_auth_code_flow_with_pkce_and_form_post(demo_upstream: DemoUpstream) -> None:
    app = public_app(demo_upstream)
    flow = app.initiate_auth_code_flow(
        [IMAP], redirect_uri=REDIRECT, login_hint=ALICE, response_mode="form_post"
    )
    with http_session(demo_upstream.ca_file) as browser:
        page = browser.get(flow["auth_uri"], allow_redirects=False)
    assert page.status_code == 200
    form = FormParser()
    form.feed(page.text)
    assert form.action == REDIRECT and form.method == "POST"
    assert form.fields["state"] == flow["state"]
    assert set(form.fields) >= {"code", "state", "client_info"}

    result = app.acquire_token_by_auth_code_flow(flow, form.fields)
    assert "access_token" in result, result
    expected_nonce = hashlib.sha256(flow["nonce"].encode()).hexdigest()
    assert result["id_token_claims"]["nonce"] == expected_nonce
    assert result["id_token_claims"]["preferred_username"] == ALICE
    assert result["scope"] == IMAP
    assert app.get_accounts()[0]["username"] == ALICE

    again = app.acquire_token_by_auth_code_flow(flow, form.fields)
    assert again["error"] == "invalid_grant" and again["error_codes"] == [54005]


def test_auth_code_flow_rejects_a_wrong_verifier(demo_upstream: DemoUpstream) -> None:
    app = public_app(demo_upstream)
    flow = app.initiate_auth_code_flow(
        [IMAP], redirect_uri=REDIRECT, login_hint=ALICE, response_mode="form_post"
    )
    with http_session(demo_upstream.ca_file) as browser:
        form = FormParser()
        form.feed(browser.get(flow["auth_uri"]).text)
    flow["code_verifier"] = "x" * 43
    result = app.acquire_token_by_auth_code_flow(flow, form.fields)
    assert result["error"] == "invalid_grant"
    assert "AADSTS501481" in result["error_description"]


def test_authorize_query_mode_and_refusals(demo_upstream_factory) -> None:
    upstream = demo_upstream_factory(auto_approve_user="carol@contoso.example")
    app = public_app(upstream)
    with warnings.catch_warnings():  # newer MSAL warns that query mode is not form_post
        warnings.simplefilter("ignore", UserWarning)
        flow = app.initiate_auth_code_flow([IMAP], redirect_uri=REDIRECT)
    with http_session(upstream.ca_file) as browser:
        reply = browser.get(flow["auth_uri"], allow_redirects=False)
        assert reply.status_code == 302
        location = urlsplit(reply.headers["location"])
        assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
        params = {k: v[0] for k, v in parse_qs(location.query).items()}
        assert params["state"] == flow["state"]
        result = app.acquire_token_by_auth_code_flow(flow, params)
        assert result["id_token_claims"]["preferred_username"] == "carol@contoso.example"

        authorize = f"{upstream.entra_url}/{TENANT_ID}/oauth2/v2.0/authorize"
        base = {
            "client_id": CLIENT_ID,
            "response_type": "code",
            "scope": IMAP,
            "redirect_uri": REDIRECT,
            "state": "s1",
        }
        no_pkce = browser.get(authorize, params=base, allow_redirects=False)
        error = parse_qs(urlsplit(no_pkce.headers["location"]).query)
        assert error["error"] == ["invalid_request"] and error["state"] == ["s1"]
        assert "AADSTS9002325" in error["error_description"][0]

        pkce = dict(base, code_challenge="a" * 43, code_challenge_method="S256")
        remote = browser.get(authorize, params=dict(pkce, redirect_uri="https://evil.example/cb"))
        assert remote.status_code == 400 and "AADSTS50011" in remote.text
    upstream.configure(auto_approve_user=None)
    with http_session(upstream.ca_file) as browser:
        nobody = browser.get(authorize, params=pkce)
    assert nobody.status_code == 400 and "login_hint" in nobody.text


# -- refresh -----------------------------------------------------------------------------


def test_silent_refresh_rotates_refresh_token(demo_upstream_factory) -> None:
    upstream = demo_upstream_factory(access_token_lifetime=2)
    app = public_app(upstream)
    first = sign_in_with_device_code(upstream, app)
    assert first["expires_in"] == 2
    upstream.reset_stats()
    [account] = app.get_accounts()

    # MSAL refreshes any access token with under 5 minutes left, so no waiting is needed.
    second = app.acquire_token_silent_with_error([IMAP], account)
    assert second["token_source"] == "identity_provider"
    assert second["access_token"] != first["access_token"]
    assert cached_refresh_tokens(app) == {second["refresh_token"]}
    assert second["refresh_token"] != first["refresh_token"]
    assert upstream.stats()["grant_types"] == {"refresh_token": 1}
    assert introspect(upstream, second["access_token"])["scope"] == IMAP

    # Entra keeps a used refresh token valid: the old one still works.
    with http_session(upstream.ca_file) as session:
        reply = session.post(
            app.authority.token_endpoint,
            data=refresh_grant(first["refresh_token"], f"{IMAP} offline_access"),
        )
    assert reply.status_code == 200 and "refresh_token" in reply.json()


def test_strict_rotation_refuses_a_used_refresh_token(demo_upstream_factory) -> None:
    upstream = demo_upstream_factory(strict_rotation=True)
    app = public_app(upstream)
    first = sign_in_with_device_code(upstream, app)
    endpoint = app.authority.token_endpoint
    body = refresh_grant(first["refresh_token"])
    with http_session(upstream.ca_file) as session:
        assert session.post(endpoint, data=body).status_code == 200
        reused = session.post(endpoint, data=body)
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"


def test_revoked_grant_gives_invalid_grant_50173(demo_upstream_factory) -> None:
    upstream = demo_upstream_factory(access_token_lifetime=2)
    app = public_app(upstream)
    first = sign_in_with_device_code(upstream, app)
    assert upstream.revoke(ALICE.upper()) == 1  # user names match case-insensitively
    assert introspect(upstream, first["access_token"])["active"] is True  # refresh tokens only

    result = app.acquire_token_silent_with_error([IMAP], app.get_accounts()[0])
    assert result["error"] == "invalid_grant"
    assert result["error_codes"] == [50173]
    description = result["error_description"]
    assert description.startswith(
        "AADSTS50173: The provided grant has expired due to it being revoked"
    )
    assert "\r\nTrace ID: " in description and "\r\nCorrelation ID: " in description

    upstream.revoke(ALICE, access_tokens=True)
    assert introspect(upstream, first["access_token"]) == {"active": False}


# -- client credentials ------------------------------------------------------------------


def confidential_app(upstream: DemoUpstream, secret: str) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        CLIENT_ID,
        client_credential=secret,
        authority=upstream.authority,
        instance_discovery=False,
        http_client=http_session(upstream.ca_file),
    )


def test_client_credentials(demo_upstream: DemoUpstream) -> None:
    result = confidential_app(demo_upstream, "demo-client-secret").acquire_token_for_client(
        [APP_ONLY]
    )
    assert result["token_type"] == "Bearer" and result["scope"] == APP_ONLY
    assert "refresh_token" not in result and "id_token" not in result
    answer = introspect(demo_upstream, result["access_token"])
    assert answer["active"] is True and "username" not in answer
    assert answer["client_id"] == CLIENT_ID

    wrong = confidential_app(demo_upstream, "not-the-secret").acquire_token_for_client([APP_ONLY])
    assert wrong["error"] == "invalid_client"
    assert "AADSTS7000215" in wrong["error_description"]

    not_default = confidential_app(demo_upstream, "demo-client-secret").acquire_token_for_client(
        [IMAP]
    )
    assert not_default["error"] == "invalid_scope"
    assert demo_upstream.stats()["grant_types"] == {"client_credentials": 3}


def test_client_secret_knob_takes_effect_at_once(demo_upstream: DemoUpstream) -> None:
    demo_upstream.configure(client_secret="rotated")
    assert "access_token" in confidential_app(demo_upstream, "rotated").acquire_token_for_client(
        [APP_ONLY]
    )
    old = confidential_app(demo_upstream, "demo-client-secret").acquire_token_for_client([APP_ONLY])
    assert old["error"] == "invalid_client"


def test_reserved_scopes_are_refused_by_msal_itself(demo_upstream: DemoUpstream) -> None:
    with pytest.raises(ValueError, match="reserved"):
        public_app(demo_upstream).initiate_device_flow(scopes=[IMAP, "offline_access"])


def test_token_endpoint_speaks_plain_http_errors(demo_upstream: DemoUpstream) -> None:
    endpoint = f"{demo_upstream.authority}/oauth2/v2.0/token"
    with http_session(demo_upstream.ca_file) as session:
        reply = session.post(
            endpoint,
            data={"grant_type": "password", "client_id": CLIENT_ID},
            headers={"client-request-id": "c0ffee00-0000-4000-8000-000000000001"},
        )
        assert isinstance(session, requests.Session)
    body = reply.json()
    assert reply.status_code == 400
    assert body["error"] == "unsupported_grant_type" and body["error_codes"] == [70003]
    assert body["correlation_id"] == "c0ffee00-0000-4000-8000-000000000001"
    assert (
        "\r\nCorrelation ID: c0ffee00-0000-4000-8000-000000000001\r\n" in body["error_description"]
    )
    assert {"timestamp", "trace_id", "error_uri"} <= set(body)
