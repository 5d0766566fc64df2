"""The admin web page (aiohttp, server-rendered Jinja2 with autoescaping, no JavaScript).

Off unless ``[admin]`` is configured. Loopback only, unless TLS and an ``allow_from`` list are
configured (``proxy.admin_web.config``); every request from an address outside them gets 403.
Sign-in with the admin password (``xoauth2-proxy admin-password``); every POST carries the
session's CSRF token; every response the strict headers of ``security.HEADERS``.

Pages: ``/`` accounts (flow, token state, in-band device code, device passwords with last use;
add one — shown once — or revoke one), ``/reauth/ACCOUNT`` (a device code, then the page
refreshes itself until the sign-in is done; or a sign-in in this browser, ``proxy.admin_web.browser``),
``/events`` (recent operator events).

Writing tokens or adding a slot needs the account's data key: the page uses a key the daemon
already holds (an in-band flow's, one unlocked here earlier, or the service-key slot), else it
asks for one of the account's device passwords.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web

from proxy import logs, store
from proxy.admin_web import browser, security
from proxy.admin_web.config import AdminSettings
from proxy.admin_web.keys import AccountKeys, Refused
from proxy.admin_web.views import account_view, when
from proxy.auth.errors import TokenError
from proxy.config import Account
from proxy.notify import events
from proxy.secret import Secret
from proxy.server.http import quiet_bad_requests
from proxy.server.listener import StartupError

if TYPE_CHECKING:
    from proxy.server.daemon import Daemon

log = logging.getLogger("proxy.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = ("/login", "/static/admin.css", "/favicon.ico", browser.CALLBACK)
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
SIGN_IN_FAILURES = 10  # per minute, all sources together: beyond, sign-in is refused


class AdminServer:
    def __init__(self, daemon: Daemon, settings: AdminSettings) -> None:
        self.daemon = daemon
        self.settings = settings
        self.sessions = security.Sessions(settings.session_minutes * 60)
        self.keys = AccountKeys(daemon.store, daemon.tokens.reauth)
        self.signins = browser.BrowserSignIns()
        self.failures: deque[float] = deque()
        self.checking = 0  # sign-in passwords being checked now
        self.one_check = asyncio.Lock()
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("proxy.admin_web", "templates"), autoescape=True)
        self.app = web.Application(middlewares=[self._guard, self._signed_in],
                                   client_max_size=64 * 1024)
        self._routes(self.app.router)
        quiet_bad_requests()
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        self.port = 0

    def _routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/login", self.login_form)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/", self.accounts)
        r.add_get("/events", self.events)
        r.add_get("/reauth/{account}", self.reauth_page)
        r.add_post("/reauth/{account}", self.reauth_start)
        r.add_post(browser.CALLBACK, self.signed_in)
        r.add_post("/passwords/{account}/add", self.add_password)
        r.add_post("/passwords/{account}/revoke", self.revoke_password)
        r.add_get("/static/admin.css", self.stylesheet)
        r.add_get("/favicon.ico", self.no_icon)

    async def start(self) -> None:
        context = None
        if self.settings.cert_file is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(self.settings.cert_file, self.settings.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"admin: cannot load cert_file/key_file: {exc}") from None
        await self.runner.setup()
        listen = self.settings.listen
        site = web.TCPSite(self.runner, listen.host, listen.port, ssl_context=context,
                           reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise StartupError(f"admin: cannot listen on {listen}: {exc.strerror or exc}") from None
        server = site._server  # noqa: SLF001 - aiohttp keeps the asyncio server here
        self.port = int(getattr(server, "sockets", [])[0].getsockname()[1])
        scheme = "https" if context else "http"
        logs.event(log, logging.INFO, "admin_listening", address=f"{listen.host}:{self.port}",
                   url=f"{scheme}://{listen.host}:{self.port}/")

    async def stop(self) -> None:
        await self.runner.cleanup()

    # --- middlewares ----------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.settings.admits(request.remote or ""):
            response: web.StreamResponse = web.Response(status=403, text="not allowed from here\n")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                self._harden(exc)
                raise
        self._harden(response)
        return response

    def _harden(self, response: web.StreamResponse) -> None:
        response.headers.update(security.HEADERS)
        if self.settings.tls:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"

    @web.middleware
    async def _signed_in(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC:
            return await handler(request)
        session = self.sessions.get(request.cookies.get(security.COOKIE))
        if session is None:
            if request.method == "GET":
                return _redirect("/login")
            raise web.HTTPForbidden(text="sign in first\n")
        if request.method == "POST":
            form = await request.post()
            if not security.same_token(form.get("csrf"), session.csrf):
                raise web.HTTPForbidden(text="missing or wrong CSRF token; reload the page\n")
        return await handler(request)

    def _session(self, request: web.Request) -> security.Session | None:
        return self.sessions.get(request.cookies.get(security.COOKIE))

    # --- rendering ------------------------------------------------------------------------

    def _page(self, request: web.Request, template: str, title: str, **values: Any
              ) -> web.Response:
        session = self._session(request)
        flash = session.shown.pop("flash", "") if session else ""
        html = self.templates.get_template(template).render(
            title=title, csrf=session.csrf if session else None,
            flash=[flash] if flash else [], **values)
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    async def stylesheet(self, request: web.Request) -> web.Response:
        css = resources.files("proxy.admin_web").joinpath("static/admin.css").read_text()
        return web.Response(text=css, content_type="text/css", charset="utf-8")

    async def no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    # --- sign-in --------------------------------------------------------------------------

    async def login_form(self, request: web.Request, error: str = "") -> web.Response:
        # The token already in the browser, if any: a second tab or a favicon request that
        # lands here must not invalidate the form shown first.
        token = request.cookies.get(security.PRE_COOKIE, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", token):
            token = secrets.token_urlsafe(32)
        response = self._page(request, "login.html", "Sign in", login_csrf=token, error=error)
        self._cookie(response, security.PRE_COOKIE, token, 600)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        pre = request.cookies.get(security.PRE_COOKIE, "")
        if not pre or not security.same_token(form.get("csrf"), pre):
            raise web.HTTPForbidden(text="missing or wrong CSRF token; reload the sign-in page\n")
        now = time.monotonic()
        while self.failures and now - self.failures[0] > 60:
            self.failures.popleft()
        if len(self.failures) + self.checking >= SIGN_IN_FAILURES:
            return await self.login_form(request, "Too many failed sign-ins; wait a minute.")
        password = str(form.get("password", ""))
        self.checking += 1  # counted before the check: parallel guesses meet the limit too
        try:
            async with self.one_check:  # one scrypt at a time, whatever arrives at once
                ok = await asyncio.to_thread(security.check_password,
                                             self.settings.password_file, password)
        finally:
            self.checking -= 1
        if not ok:
            self.failures.append(time.monotonic())
            logs.event(log, logging.WARNING, "admin_sign_in", result="bad_password",
                       peer=request.remote)
            await asyncio.sleep(1)
            return await self.login_form(request, "Wrong admin password.")
        logs.event(log, logging.INFO, "admin_sign_in", result="ok", peer=request.remote)
        sid, _ = self.sessions.create()
        response = _redirect("/")
        self._cookie(response, security.COOKIE, sid, int(self.sessions.lifetime))
        response.del_cookie(security.PRE_COOKIE)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.end(request.cookies.get(security.COOKIE))
        response = _redirect("/login")
        response.del_cookie(security.COOKIE)
        return response

    def _cookie(self, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                            samesite="Strict", secure=self.settings.tls)

    # --- pages ----------------------------------------------------------------------------

    async def accounts(self, request: web.Request) -> web.Response:
        session = self._session(request)
        assert session is not None
        views = []
        for account in self.daemon.config.accounts.values():
            view = await asyncio.to_thread(account_view, self.daemon.store, account,
                                           self.daemon.tokens.reauth.current(account.name))
            view["key_known"] = (await self.keys.known(account))[0] is not None
            shown = session.shown.pop(account.name, None)
            view["new_password"] = tuple(shown.split("\0", 1)) if shown else None
            views.append(view)
        return self._page(request, "accounts.html", "Accounts", accounts=views)

    async def events(self, request: web.Request) -> web.Response:
        recent = [e.as_dict() for e in reversed(events.HUB.recent)]
        return self._page(request, "events.html", "Recent events", events=recent)

    def _account(self, request: web.Request) -> Account:
        account = self.daemon.config.account(request.match_info["account"])
        if account is None:
            raise web.HTTPNotFound(text="no such account\n")
        return account

    async def reauth_page(self, request: web.Request, error: str = "") -> web.Response:
        account = self._account(request)
        flow = self.daemon.tokens.reauth.current(account.name)
        waiting = flow is not None and flow.outcome == "waiting"
        return self._page(
            request, "reauth.html", f"Re-authorise {account.name}", name=account.name,
            mailbox=account.mailbox, flow=flow, error=error, refresh=3 if waiting else None,
            expires=when(flow.expires_at) if flow else "", key_known=(await self.keys.known(account))[0] is not None)

    async def reauth_start(self, request: web.Request) -> web.StreamResponse:
        account = self._account(request)
        if account.flow == "client_credentials":
            return await self.reauth_page(request, "An app-only account has no user to sign in.")
        form = await request.post()
        in_browser = form.get("how") == "browser"
        try:
            redirect = browser.redirect_uri(request.host, self.settings.tls) if in_browser else ""
            unlocked = await self.keys.unlocked(account, str(form.get("password", "")))
            if in_browser:
                address = await self.signins.begin(self.daemon.config, account, unlocked,
                                                   redirect)
                return self._page(request, "signin.html", f"Sign in as {account.mailbox}",
                                  mailbox=account.mailbox, address=address,
                                  minutes=int(browser.LIFETIME // 60))
            await self.daemon.tokens.reauth.start(account, unlocked, via="admin")
        except (Refused, browser.SignInProblem) as exc:
            return await self.reauth_page(request, str(exc))
        except TokenError as exc:
            return await self.reauth_page(request, exc.user_text)
        return _redirect(f"/reauth/{account.name}")

    async def signed_in(self, request: web.Request) -> web.Response:
        """The identity platform's way back from a browser sign-in (no session cookie comes
        with it; the flow's ``state`` identifies it)."""
        try:
            form = await request.post()
            answer = {key: str(value) for key, value in form.items()}
            account = await self.signins.finish(self.daemon.config, self.daemon.store, answer)
        except browser.SignInProblem as exc:  # anyone may post here: not worth a warning
            logs.event(log, logging.DEBUG, "browser_sign_in_refused", reason=str(exc))
            return self._page(request, "signed_in.html", "Sign-in failed", error=str(exc))
        except TokenError as exc:  # the holder of the flow's state: the whole reason
            error = f"Not signed in: {exc.detail}"
        except (store.StoreError, OSError) as exc:
            error = f"The new tokens could not be written: {exc}"
        except Exception as exc:  # noqa: BLE001 - MSAL's own (an ID token check, say)
            error = ("The identity platform's answer could not be used; start the sign-in "
                     "again from the account's page.")
            logs.event(log, logging.ERROR, "browser_sign_in_error", error=type(exc).__name__)
        else:
            self.daemon.tokens.reauth.finished(account.name, "admin_browser")
            return self._page(request, "signed_in.html", "Signed in", name=account.name)
        logs.event(log, logging.WARNING, "browser_sign_in_ended", result="failed", reason=error)
        return self._page(request, "signed_in.html", "Sign-in failed", error=error)

    async def add_password(self, request: web.Request) -> web.StreamResponse:
        account, session = self._account(request), self._session(request)
        assert session is not None
        form = await request.post()
        label = str(form.get("label", "")).strip()
        try:
            if not _LABEL.fullmatch(label):
                raise Refused("A device name is letters, digits and . _ @ - (at most 64).")
            unlocked = await self.keys.unlocked(account, str(form.get("password", "")))
            new = secrets.token_urlsafe(18)
            await asyncio.to_thread(self.daemon.store.add_password_slot, unlocked, label,
                                    Secret(new))
        except Refused as exc:
            session.shown["flash"] = str(exc)
        except store.StoreError as exc:
            session.shown["flash"] = f"Not added: {exc}"
        else:
            session.shown[account.name] = f"{label}\0{new}"
            logs.event(log, logging.INFO, "admin_password_added", account=account.name,
                       slot=label, peer=request.remote)
        return _redirect("/")

    async def revoke_password(self, request: web.Request) -> web.StreamResponse:
        account, session = self._account(request), self._session(request)
        assert session is not None
        label = str((await request.post()).get("label", ""))
        try:
            await asyncio.to_thread(self.daemon.store.remove_slot, account.name, label)
        except store.StoreError as exc:
            session.shown["flash"] = f"Not revoked: {exc}"
        else:
            session.shown["flash"] = f"Revoked the password of {label} for {account.name}."
            logs.event(log, logging.INFO, "admin_password_revoked", account=account.name,
                       slot=label, peer=request.remote)
        return _redirect("/")


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})
