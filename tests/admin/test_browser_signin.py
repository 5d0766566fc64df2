"""Re-authorising from the admin page in the admin's own browser (auth code with PKCE), with an
HTTP client as the browser: the page links to the fake Entra's sign-in page, which sends the
browser back to ``/auth/callback`` without the session cookie (a cross-site redirect does not
carry a ``SameSite=Strict`` cookie); the new tokens keep every device password."""

from __future__ import annotations

import asyncio
import re
import ssl
from html import unescape
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest

from proxy.admin_web import browser
from proxy.demo.process import DemoUpstream
from tests.admin.adminenv import (
    BOB,
    PASSWORD,
    PHONE_PASSWORD,
    AdminEnv,
    csrf_of,
)
from tests.admin.test_admin_http import client, sign_in
from tests.proxyenv import USER, authorise, fresh_login_reply


async def start_sign_in(http: aiohttp.ClientSession, env: AdminEnv,
                        headers: dict[str, str] | None = None) -> str:
    """The reauth page's "Sign in in this browser": the page it answers with."""
    async with http.get(f"{env.url}/reauth/{USER}") as r:
        token = csrf_of(await r.text())
    async with http.post(f"{env.url}/reauth/{USER}", headers=headers, data={
            "csrf": token, "how": "browser", "password": PASSWORD}) as r:
        assert r.status == 200
        return await r.text()


async def start_device_code(http: aiohttp.ClientSession, env: AdminEnv) -> str:
    """The reauth page's "Get a sign-in code": the page it leads to."""
    async with http.get(f"{env.url}/reauth/{USER}") as r:
        token = csrf_of(await r.text())
    async with http.post(f"{env.url}/reauth/{USER}", data={
            "csrf": token, "how": "code", "password": PASSWORD}) as r:
        return await r.text()


def sign_in_link(page: str) -> str:
    match = re.search(r'id="sign-in" href="([^"]+)"', page)
    assert match, page
    return unescape(match.group(1))


async def at_entra(link: str, upstream: DemoUpstream) -> tuple[str, dict[str, str]]:
    """Follow the link to the fake Entra, which signs the user in and answers with the form
    that posts the code back (``form_post``): its action and fields."""
    context = ssl.create_default_context(cafile=str(upstream.ca_file))
    async with aiohttp.ClientSession() as entra, entra.get(link, ssl=context) as r:
        page = await r.text()
    action = re.search(r'<form method="POST" name="hiddenform" action="([^"]+)"', page)
    assert action, page
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"/>', page))
    return unescape(action.group(1)), {k: unescape(v) for k, v in fields.items()}


async def back_here(answer: tuple[str, dict[str, str]]) -> str:
    """The browser posts the answer back to the admin page, without its session cookie."""
    action, fields = answer
    async with aiohttp.ClientSession() as bare, bare.post(action, data=fields) as r:
        assert r.status == 200
        return await r.text()


async def login_reply(port: int, password: str) -> str:
    return await asyncio.to_thread(fresh_login_reply, port, USER, password)


async def test_sign_in_in_the_browser_keeps_every_device_password(
        env: AdminEnv, demo_upstream: DemoUpstream) -> None:
    imap = env.proxy.ports["imap"]
    demo_upstream.revoke(USER, access_tokens=True, refresh_tokens=True)
    assert "Authorisation needed" in await login_reply(imap, PASSWORD)
    async with client() as http:
        await sign_in(http, env.url)
        link = sign_in_link(await start_sign_in(http, env))
        assert dict(parse_qsl(urlsplit(link).query))["login_hint"] == USER
        answer = await at_entra(link, demo_upstream)
        # Back to localhost (what the app registration names), the port the browser used.
        assert answer[0] == f"http://localhost:{urlsplit(env.url).port}/auth/callback"
        assert "code" in answer[1]
        page = await back_here(answer)
        assert f'id="done">{USER} is authorised again' in page
        assert await login_reply(imap, PASSWORD) == "OK"
        assert await login_reply(imap, PHONE_PASSWORD) == "OK"
        # The way back works once.
        assert "unknown or expired" in await back_here(answer)


async def test_another_user_signing_in_saves_nothing(
        env: AdminEnv, demo_upstream: DemoUpstream) -> None:
    before = env.proxy.store.read_raw(USER)
    async with client() as http:
        await sign_in(http, env.url)
        link = urlsplit(sign_in_link(await start_sign_in(http, env)))
        query = dict(parse_qsl(link.query)) | {"login_hint": BOB}  # bob signs in instead
        answer = await at_entra(urlunsplit(link._replace(query=urlencode(query))),
                                demo_upstream)
        page = await back_here(answer)
    assert 'id="failed"' in page and f"signed in as {BOB}" in page
    assert env.proxy.store.read_raw(USER) == before


async def test_a_non_loopback_address_without_tls_is_refused(env: AdminEnv) -> None:
    async with client() as http:
        await sign_in(http, env.url)
        page = await start_sign_in(http, env, headers={"Host": "admin.example:9465"})
        assert "Open this page at http://localhost:PORT" in page
        assert 'id="sign-in"' not in page
        page = await start_sign_in(http, env, headers={"Host": "localhost:1@evil.example"})
        assert "not a plain host[:port]" in page and 'id="sign-in"' not in page


@pytest.mark.parametrize(("host", "tls", "expected"), [
    ("127.0.0.1:9465", False, "http://localhost:9465/auth/callback"),
    ("[::1]:8000", False, "http://localhost:8000/auth/callback"),
    ("localhost", False, "http://localhost/auth/callback"),
    ("admin.contoso.com:9465", True, "https://admin.contoso.com:9465/auth/callback"),
    ("[2001:db8::1]:443", True, "https://[2001:db8::1]:443/auth/callback"),
    ("admin.contoso.com:9465", False, None),
    ("evil.example/x:1", True, None),
    ("admin.contoso.com:99999", True, None),
    ("", True, None),
])
def test_the_way_back_is_built_from_a_plain_host(host: str, tls: bool,
                                                 expected: str | None) -> None:
    if expected is None:
        with pytest.raises(browser.SignInProblem):
            browser.redirect_uri(host, tls)
    else:
        assert browser.redirect_uri(host, tls) == expected


async def test_a_forged_or_refused_answer_writes_nothing(
        env: AdminEnv, demo_upstream: DemoUpstream) -> None:
    before = env.proxy.store.read_raw(USER)
    async with client() as http:
        await sign_in(http, env.url)
        action, fields = await at_entra(sign_in_link(await start_sign_in(http, env)),
                                        demo_upstream)
    forged = await back_here((action, {**fields, "state": "not-the-state"}))
    assert "unknown or expired" in forged
    refused = await back_here((action, {"state": fields["state"], "error": "access_denied",
                                        "error_description": "AADSTS65004: User declined."}))
    assert 'id="failed"' in refused and "Not signed in" in refused
    assert "unknown or expired" in await back_here((action, fields))  # the state was used up
    assert env.proxy.store.read_raw(USER) == before


async def test_a_sign_in_here_ends_a_device_code_that_was_waiting(
        env: AdminEnv, demo_upstream: DemoUpstream) -> None:
    async with client() as http:
        await sign_in(http, env.url)
        waiting = await start_device_code(http, env)
        assert 'id="user-code"' in waiting and 'value="browser"' in waiting
        await back_here(await at_entra(sign_in_link(await start_sign_in(http, env)),
                                       demo_upstream))
        async with http.get(f"{env.url}/reauth/{USER}") as r:
            after = await r.text()
    assert 'id="user-code"' not in after and 'id="done"' in after


async def test_a_key_held_from_before_a_new_sign_in_is_not_offered(
        env: AdminEnv, demo_upstream: DemoUpstream) -> None:
    async with client() as http:
        await sign_in(http, env.url)
        assert 'id="user-code"' in await start_device_code(http, env)  # it holds the key now
        async with http.get(f"{env.url}/reauth/{USER}") as r:
            assert 'name="password"' not in await r.text()
        # A new sign-in with a password the file does not know: a new file, a new key.
        await asyncio.to_thread(authorise, env.proxy.config, demo_upstream, USER, "fresh start")
        async with http.get(f"{env.url}/reauth/{USER}") as r:
            page = await r.text()
        assert 'name="password"' in page  # asked for again, not refused without a field
        async with http.get(f"{env.url}/") as r:
            assert 'id="unlock-1"' in await r.text()
