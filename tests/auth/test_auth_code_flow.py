"""`login` with the browser auth-code flow (PKCE, loopback redirect) through real MSAL.

The "browser" is a function that does what a person's browser would: open the authorise URL
at the fake Entra ID (which signs in the login_hint user) and submit the auto-posting form to
MSAL's loopback redirect listener.
"""

from __future__ import annotations

import html
import io
import re
import threading
import webbrowser
from pathlib import Path

import pytest
import requests

from proxy.auth import flows
from proxy.auth.service import TokenService
from proxy.demo.process import DemoUpstream, http_session
from proxy.secret import Secret
from tests.proxyenv import PASSWORD, USER, make_config, open_store


def fake_browser(ca_file: str, seen: list[str]) -> object:
    def open_(url: str, *args: object, **kwargs: object) -> bool:
        seen.append(url)

        def visit() -> None:
            page = http_session(ca_file).get(url, timeout=30)
            page.raise_for_status()
            form = re.search(r'action="([^"]+)"', page.text)
            if form is None:  # response_mode=query (older MSAL): the 302 to MSAL's loopback
                return        # server was followed already, carrying the code
            action = html.unescape(form.group(1))
            fields = {html.unescape(n): html.unescape(v) for n, v in
                      re.findall(r'name="([^"]+)"\s+value="([^"]*)"', page.text)}
            plain = requests.Session()
            plain.trust_env = False
            plain.post(action, data=fields, timeout=30)  # MSAL's http://localhost redirect

        threading.Thread(target=visit, daemon=True).start()
        return True
    return open_


async def test_auth_code_login(tmp_path: Path, demo_upstream: DemoUpstream,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(tmp_path, demo_upstream,
                      accounts={USER: {"provider": "demo", "flow": "auth_code"}})
    account = cfg.account(USER)
    assert account is not None
    seen: list[str] = []
    monkeypatch.setattr(webbrowser, "open", fake_browser(demo_upstream.ca_file, seen))
    token_store = open_store(cfg)
    out = io.StringIO()
    result = flows.login(cfg, account, token_store, Secret(PASSWORD), out=out)
    assert result.identity == USER and result.refresh_token_present
    (url,) = seen
    assert "code_challenge_method=S256" in url and "login_hint=" in url
    assert "redirect_uri=http%3A%2F%2Flocalhost" in url
    token = await TokenService(cfg, token_store).access_token(USER, Secret(PASSWORD), "imap")
    assert token


def test_auth_code_login_as_someone_else_is_refused(tmp_path: Path, demo_upstream: DemoUpstream,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    other = "bob@contoso.example"
    cfg = make_config(tmp_path, demo_upstream,
                      accounts={USER: {"provider": "demo", "flow": "auth_code",
                                       "upstream_user": other}})
    account = cfg.account(USER)
    assert account is not None
    seen: list[str] = []

    def as_mallory(url: str, *args: object, **kwargs: object) -> bool:  # signs in as mallory
        return fake_browser(demo_upstream.ca_file, seen)(  # type: ignore[operator, no-any-return]
            url.replace("login_hint=bob%40contoso.example", "login_hint=mallory%40contoso.example"))

    monkeypatch.setattr(webbrowser, "open", as_mallory)
    token_store = open_store(cfg)
    with pytest.raises(flows.IdentityMismatch, match="mallory@contoso.example"):
        flows.login(cfg, account, token_store, Secret(PASSWORD), out=io.StringIO())
    assert not token_store.exists(USER)
