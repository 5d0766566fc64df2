"""First authorisation of an account (``xoauth2-proxy login``): run its OAuth flow with MSAL,
check who signed in, and write the encrypted token file.

Blocking code for the CLI: device code (prints a URL and a code, polls with a visible
countdown; Ctrl-C aborts and writes nothing), browser auth code with PKCE on a loopback
redirect (MSAL's ``acquire_token_interactive``), and client credentials (app-only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import msal

from proxy import store
from proxy.auth import msal_client
from proxy.auth.errors import IdentityMismatch
from proxy.config import Account, Config
from proxy.secret import Secret


@dataclass(frozen=True)
class LoginResult:
    account: str
    identity: str | None
    access_token_expires_at: float | None
    refresh_token_present: bool
    replaced_slots: bool  # the old file could not be unlocked with this password: slots reset


def acquire(config: Config, account: Account, cache: msal.SerializableTokenCache, *,
            out: TextIO, open_browser: bool = True) -> dict[str, Any]:
    """Run the account's flow; return MSAL's successful result (raises TokenError otherwise)."""
    app = msal_client.build_app(config, account, cache)
    scopes = list(config.login_scopes(account))
    name = account.name
    if account.flow == "client_credentials":
        result = msal_client.call(name, lambda: app.acquire_token_for_client(scopes))
    elif account.flow == "auth_code":
        assert isinstance(app, msal.PublicClientApplication)
        out.write(f"Opening a browser to sign in as {account.mailbox} …\n")
        out.flush()
        result = msal_client.call(name, lambda: app.acquire_token_interactive(
            scopes, login_hint=account.mailbox, prompt="select_account", timeout=600,
            success_template="Signed in. You can close this window and return to xoauth2-proxy."))
    else:
        assert isinstance(app, msal.PublicClientApplication)
        flow = msal_client.call(name, lambda: app.initiate_device_flow(scopes=scopes))
        if "user_code" not in flow:
            msal_client.check_result(name, flow if "error" in flow else {"error": "no user code"})
        out.write(f"To authorise {account.mailbox}: {flow['message']}\n")
        out.flush()
        result = msal_client.call(name, lambda: app.acquire_token_by_device_flow(
            flow, exit_condition=_countdown(flow, out)))
        out.write("\n")
    msal_client.check_result(name, result)
    return dict(result)


def _countdown(flow: dict[str, Any], out: TextIO) -> Callable[[dict[str, Any]], bool]:
    def exit_condition(current: dict[str, Any]) -> bool:
        left = int(float(current.get("expires_at", 0)) - time.time())
        if left <= 0:
            return True
        if out.isatty():
            out.write(f"\rWaiting for sign-in: {left // 60}:{left % 60:02d} left (Ctrl-C aborts) ")
            out.flush()
        return False
    return exit_condition


def signed_in_meta(config: Config, account: Account, cache: msal.SerializableTokenCache,
                   identity: str | None) -> store.Meta:
    """The clear metadata of a token file just written by a sign-in."""
    expiry, has_rt = msal_client.cache_summary(cache)
    return store.Meta(identity=identity, flow=account.flow, access_token_expires_at=expiry,
                      refresh_token_present=has_rt, needs_reauth=None, updated_at=time.time(),
                      resources=msal_client.cache_resources(cache, config.login_scopes(account)))


def save_signed_in(config: Config, account: Account, token_store: store.TokenStore,
                   unlocked: store.Unlocked, result: dict[str, Any],
                   cache: msal.SerializableTokenCache) -> None:
    """A re-authorisation's outcome: check MSAL's result and who signed in, then write the
    tokens under a data key already unlocked, so that every device slot stays (blocking)."""
    msal_client.check_result(account.name, result)
    identity = check_identity(account, result)
    with token_store.refresh_lock(account.name, store.WRITER_LOCK_WAIT):  # not mid-refresh
        token_store.save(unlocked, cache.serialize().encode("utf-8"),
                         signed_in_meta(config, account, cache, identity))


def check_identity(account: Account, result: dict[str, Any]) -> str | None:
    """The signed-in user; refuse when it is not the configured mailbox (delegated flows)."""
    if account.flow == "client_credentials":
        return None
    identity = msal_client.identity_of(result)
    if identity != account.mailbox.lower():
        raise IdentityMismatch(
            account.name, f"signed in as {identity or 'an unknown user'}, but the account is "
                          f"{account.mailbox}; sign in again with the right user (nothing was saved)")
    return identity


def login(config: Config, account: Account, token_store: store.TokenStore, password: Secret, *,
          out: TextIO, service_key: bytes | None = None) -> LoginResult:
    """Authorise ``account`` and save its token file, keeping other device slots if the
    password unlocks the existing file."""
    cache = msal.SerializableTokenCache()
    result = acquire(config, account, cache, out=out)
    identity = check_identity(account, result)
    meta = signed_in_meta(config, account, cache, identity)
    expiry, has_rt = meta.access_token_expires_at, meta.refresh_token_present
    payload = cache.serialize().encode("utf-8")
    # Under the refresh lock: a daemon's refresh in flight saves first and then finds this
    # grant, instead of writing its refresh of the old one over it.
    with token_store.refresh_lock(account.name, store.WRITER_LOCK_WAIT):
        replaced = False
        existing = None
        if token_store.exists(account.name):
            try:
                existing = token_store.unlock(account.name, password)
            except (store.WrongPassword, store.CorruptTokenFile):
                replaced = True
        if existing is None:  # one write: both slots, or none
            token_store.create(account.name, payload, meta, password=password,
                               service_key=service_key, replace=replaced)
            return LoginResult(account.name, identity, expiry, has_rt, replaced)
        unlocked = token_store.save(existing, payload, meta)
        if service_key is not None:
            if not any(s.kind == "keyfile" for s in token_store.info(account.name).slots):
                token_store.add_service_key_slot(unlocked, service_key)
    return LoginResult(account.name, identity, expiry, has_rt, replaced)
