"""The admin page's locks, with an HTTP client: sign-in, session cookie, CSRF tokens, headers,
the password stored only as a hash, and the loopback rule."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aiohttp
import pytest
import yarl

from proxy import config as config_mod
from proxy.admin_web.app import SIGN_IN_FAILURES
from proxy.demo.process import DemoUpstream
from proxy.notify import events
from tests.admin.adminenv import (
    ADMIN_PASSWORD,
    PASSWORD,
    PHONE,
    AdminEnv,
    csrf_of,
)
from tests.proxyenv import USER, authorise


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(http: aiohttp.ClientSession, url: str, password: str = ADMIN_PASSWORD) -> str:
    """Sign in; the page's HTML after the redirect."""
    async with http.get(f"{url}/login") as response:
        token = csrf_of(await response.text())
    async with http.post(f"{url}/login", data={"csrf": token, "password": password}) as response:
        return await response.text()


def slots(env: AdminEnv) -> set[str]:
    return {s.label for s in env.proxy.store.info(USER).slots}


async def test_password_stored_as_hash_only(env: AdminEnv) -> None:
    settings = env.proxy.config.admin
    assert settings is not None
    stored = settings.password_file.read_text()
    assert stored.startswith("scrypt$") and ADMIN_PASSWORD not in stored
    assert os.stat(settings.password_file).st_mode & 0o777 == 0o600


async def test_sign_in_sets_a_strict_session_cookie(env: AdminEnv) -> None:
    async with client() as http:
        async with http.get(f"{env.url}/", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/login"
        assert "Wrong admin password" in await sign_in(http, env.url, "not it at all")
        async with http.get(f"{env.url}/login") as response:
            token = csrf_of(await response.text())
        async with http.post(f"{env.url}/login", allow_redirects=False,
                             data={"csrf": token, "password": ADMIN_PASSWORD}) as response:
            assert response.status == 303
            cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        async with http.get(f"{env.url}/") as response:
            html = await response.text()
            csp = response.headers["Content-Security-Policy"]
        assert USER in html and PHONE in html
        assert "default-src 'none'" in csp and "script-src" not in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "<script" not in html and "http://" not in html.replace(env.url, "")


async def test_requests_without_session_or_csrf_refused(env: AdminEnv) -> None:
    async with client() as http:  # no session at all
        async with http.post(f"{env.url}/passwords/{USER}/revoke", data={"label": PHONE}) as r:
            assert r.status == 403
        async with http.post(f"{env.url}/login", data={"password": ADMIN_PASSWORD}) as r:
            assert r.status == 403  # the sign-in form's own CSRF token is missing
    async with client() as http:
        page = await sign_in(http, env.url)
        for data in ({"label": PHONE}, {"label": PHONE, "csrf": "forged"}):
            async with http.post(f"{env.url}/passwords/{USER}/revoke", data=data) as r:
                assert r.status == 403 and "CSRF" in await r.text()
        assert PHONE in slots(env)
        async with http.post(f"{env.url}/passwords/{USER}/revoke",
                             data={"label": PHONE, "csrf": csrf_of(page)}) as r:
            assert r.status == 200 and "Revoked the password of phone" in await r.text()
        assert PHONE not in slots(env)
        events.publish("source_locked_out", source="192.0.2.44", user=USER)
        async with http.get(f"{env.url}/events") as r:
            html = await r.text()
        assert "Client address 192.0.2.44 was locked out after failed logins" in html
        assert "source_locked_out" in html


async def test_signed_out_session_is_refused(env: AdminEnv) -> None:
    async with client() as http:
        page = await sign_in(http, env.url)
        cookies = http.cookie_jar.filter_cookies(yarl.URL(env.url))
        async with http.post(f"{env.url}/logout", data={"csrf": csrf_of(page)}) as r:
            assert r.status == 200
    async with aiohttp.ClientSession(cookies=cookies) as stale:
        async with stale.get(f"{env.url}/", allow_redirects=False) as r:
            assert r.status == 303


@pytest.mark.parametrize("extra", [{}, {"allow_from": ["192.0.2.0/24"]}])
def test_non_loopback_needs_tls_and_allow_list(tmp_path: Path, extra: dict[str, object]) -> None:
    data = {"state_dir": str(tmp_path), "providers": {"p": {"tenant": "t", "client_id": "c"}},
            "accounts": {"a@example.com": {}}, "admin": {"listen": "0.0.0.0:9465", **extra}}
    with pytest.raises(config_mod.ConfigError, match=r"admin\.listen: .*needs TLS"):
        config_mod.parse(data, tmp_path / "config.toml")
    data["admin"] = {"listen": "127.0.0.1:9465"}
    cfg = config_mod.parse(data, tmp_path / "config.toml")
    assert cfg.admin is not None and cfg.admin.password_file == tmp_path / "admin-password"


async def test_malformed_request_is_refused_quietly(env: AdminEnv,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    admin = env.proxy.daemon.operator.admin
    assert admin is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write(b"garbage\r\n\r\n")
    status = (await reader.read()).split(b"\r\n")[0]
    writer.close()
    assert status.endswith(b" 400 Bad Request")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_parallel_sign_in_guesses_meet_the_limit(env: AdminEnv) -> None:
    """Guesses sent at once are counted before their passwords are checked: no more than the
    per-minute limit are tried, the rest are refused without a password check, and the right
    password is refused too while the limit holds."""
    async with client() as http:
        async with http.get(f"{env.url}/login") as response:
            token = csrf_of(await response.text())

        async def guess(i: int) -> str:
            async with http.post(f"{env.url}/login",
                                 data={"csrf": token, "password": f"guess {i}"}) as response:
                return await response.text()
        pages = await asyncio.gather(*(guess(i) for i in range(25)))
        wrong = sum("Wrong admin password" in page for page in pages)
        limited = sum("Too many failed sign-ins" in page for page in pages)
        assert wrong == SIGN_IN_FAILURES and limited == 25 - SIGN_IN_FAILURES
        assert "Too many failed sign-ins" in await sign_in(http, env.url)


async def test_a_key_unlocked_here_is_not_used_after_the_file_got_a_new_one(
        env: AdminEnv, demo_upstream: DemoUpstream) -> None:
    async with client() as http:
        page = await sign_in(http, env.url)

        async def add(label: str, password: str) -> str:
            async with http.post(f"{env.url}/passwords/{USER}/add", data={
                    "label": label, "password": password, "csrf": csrf_of(page)}) as r:
                assert r.status == 200
                return await r.text()

        assert "laptop" in await add("laptop", PASSWORD)  # unlocks, and keeps the key
        assert "tablet" in await add("tablet", "")  # the kept key, no password asked
        # A new sign-in with a password the file does not know: a new file, a new data key.
        await asyncio.to_thread(authorise, env.proxy.config, demo_upstream, USER, "fresh start")
        html = await add("desk", "")
        assert "has a new key since it was unlocked here" in html
        assert "desk" not in slots(env)
        assert "desk" in await add("desk", "fresh start")
        assert "desk" in slots(env)
