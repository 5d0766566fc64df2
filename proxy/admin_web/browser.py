"""Re-authorising an account in the admin's own browser: MSAL's auth-code flow with PKCE.

``begin`` asks MSAL for the sign-in address (``initiate_auth_code_flow``: a fresh ``state``,
a PKCE verifier kept here, the account's mailbox as ``login_hint``) with a redirect back to
``/auth/callback`` on the address the admin page was opened at; the page links to it. The
identity platform sends the browser back with a code in a form it posts there (``form_post``:
the code is not in any URL, history or log); ``finish`` redeems it
(``acquire_token_by_auth_code_flow``), checks that the user who signed in is the account's
mailbox, and writes the tokens with the data key the page had unlocked, so every device slot
stays.

The way back is a cross-site redirect, so the page's session cookie (``SameSite=Strict``) does
not come with it: the ``state`` is what ties the answer to the admin who started it (random,
one use, ``LIFETIME`` seconds, at most ``MAX_PENDING`` at a time) and PKCE ties the code to
this flow. The identity platform must know the redirect address: register
``http://localhost/auth/callback`` (Entra accepts any port with it) for a loopback admin page,
or the page's own ``https://HOST:PORT/auth/callback``. Whoever holds a flow's ``state`` can
finish it; PKCE, MSAL's nonce check and the mailbox check keep anyone else's code or user out.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msal

from proxy import logs, store
from proxy.auth import flows, msal_client
from proxy.config import Account, Config

log = logging.getLogger("proxy.admin")

CALLBACK = "/auth/callback"
LIFETIME = 600.0
MAX_PENDING = 32
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class SignInProblem(Exception):
    """A browser sign-in that cannot go on; the text is for the page (no secret in it)."""


@dataclass
class Pending:
    account: Account
    unlocked: store.Unlocked
    app: msal.ClientApplication
    cache: msal.SerializableTokenCache
    flow: dict[str, Any]
    expires_at: float


_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                   r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def redirect_uri(host: str, tls: bool) -> str:
    """Where the identity platform sends the browser back, from the address the page was
    opened at (``Host``, strictly ``name[:port]``). Plain HTTP is a loopback page: the way
    back is ``http://localhost:PORT/auth/callback`` whatever loopback name was used (Entra
    matches ``http://localhost`` on any port, and tells ``127.0.0.1`` from it), the port the
    browser used (an SSH tunnel's local port, say)."""
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name:
        name, port = host, ""
    if not _HOST.fullmatch(name) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise SignInProblem("This page's address (its Host) is not a plain host[:port].")
    if tls:
        return f"https://{host}{CALLBACK}"
    if name.lower() not in LOOPBACK_HOSTS:
        raise SignInProblem("Open this page at http://localhost:PORT to sign in in this "
                            "browser: the identity platform sends it back only to a loopback "
                            "address or to HTTPS.")
    return f"http://localhost{':' + port if port else ''}{CALLBACK}"


class BrowserSignIns:
    """The auth-code flows started from the admin page and not yet back."""

    def __init__(self) -> None:
        self.pending: OrderedDict[str, Pending] = OrderedDict()

    async def begin(self, config: Config, account: Account, unlocked: store.Unlocked,
                    redirect: str) -> str:
        """The sign-in address for ``account``."""
        cache = msal.SerializableTokenCache()
        app, flow = await asyncio.to_thread(_initiate, config, account, cache, redirect)
        self._expire()
        while len(self.pending) >= MAX_PENDING:
            self.pending.popitem(last=False)
        self.pending[str(flow["state"])] = Pending(account, unlocked, app, cache, flow,
                                                   time.time() + LIFETIME)
        logs.event(log, logging.INFO, "browser_sign_in_started", account=account.name)
        return str(flow["auth_uri"])

    async def finish(self, config: Config, token_store: store.TokenStore,
                     answer: dict[str, str]) -> Account:
        """Redeem the identity platform's answer and write the tokens; the account."""
        self._expire()
        pending = self.pending.pop(answer.get("state", ""), None)
        if pending is None:
            raise SignInProblem("This sign-in is unknown or expired (each works once, for "
                                f"{int(LIFETIME // 60)} minutes): start it again from the "
                                "account's page.")
        if not answer.get("code") and not answer.get("error"):
            raise SignInProblem("The identity platform's answer has neither a code nor an "
                                "error: start the sign-in again from the account's page.")
        name = pending.account.name
        result = await asyncio.to_thread(msal_client.call, name, lambda: (
            pending.app.acquire_token_by_auth_code_flow(pending.flow, answer)))
        await asyncio.to_thread(flows.save_signed_in, config, pending.account, token_store,
                                pending.unlocked, dict(result), pending.cache)
        logs.event(log, logging.INFO, "browser_sign_in_ended", account=name, result="ok")
        return pending.account

    def _expire(self) -> None:
        now = time.time()
        for state in [s for s, p in self.pending.items() if p.expires_at <= now]:
            del self.pending[state]


def _initiate(config: Config, account: Account, cache: msal.SerializableTokenCache,
              redirect: str) -> tuple[msal.ClientApplication, dict[str, Any]]:
    """MSAL's auth-code flow for ``account`` (blocking: MSAL reads the authority's metadata)."""
    app = msal_client.build_app(config, account, cache)
    scopes = list(config.login_scopes(account))
    flow = msal_client.call(account.name, lambda: app.initiate_auth_code_flow(
        scopes, redirect_uri=redirect, login_hint=account.mailbox, prompt="select_account",
        response_mode="form_post"))
    if "auth_uri" not in flow:
        msal_client.check_result(account.name, flow if "error" in flow
                                 else {"error": "no sign-in address"})
    return app, dict(flow)
