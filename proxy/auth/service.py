"""The token service: a local password in, a fresh access token out.

``access_token(account, password, protocol)`` unlocks the account's token file (the password
is checked by the file's AES-GCM, nothing else): from the derived-key cache on the default
executor if it can, else with one key derivation on the service's own small executor, claimed
through the login's gate (``proxy.auth.gate``: one derivation in flight per account and source,
the others refused). An unconfigured account or one without a usable file costs the same
derivation and fails like a wrong password. It keeps the account's MSAL cache in memory, and
returns an access token — from memory when it is still good, else from one MSAL call in a
worker thread. Per account and scope set there is at most one request to the identity platform
in flight (single flight): a thousand concurrent logins with an expired token make one request.
A token close to expiry is refreshed in the background before it runs out.

The MSAL cache is written back to the token file only when MSAL changed it (a rotated refresh
token). A network error or 5xx never drops a refresh token; only a refused grant
(``invalid_grant`` and friends) marks the account as needing ``xoauth2-proxy login``. If the
file cannot be written the service keeps serving from memory and says so in the log and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import msal

from proxy import logs, metrics, store
from proxy.auth import msal_client
from proxy.auth.errors import (
    AuthConfigError,
    AuthorisationNeeded,
    KeyReplaced,
    NoUsableTokenFile,
    ProviderUnavailable,
    StoreUnavailable,
    Throttled,
    TokenError,
    UnknownAccount,
    WrongPassword,
)
from proxy.auth.gate import GATE, UnlockGate
from proxy.auth.reauth import ReauthFlows
from proxy.auth.storemap import NeedsDerivation, cached_token, checked, store_errors
from proxy.config import Account, Config, Protocol
from proxy.graph.settings import GraphResource
from proxy.notify.events import WATCH
from proxy.secret import Secret

log = logging.getLogger("proxy.auth")
NO_CONSENT = "AADSTS65001"

Scopes = tuple[str, ...]
KDF_WORKERS = 2  # concurrent key derivations per daemon (each scrypt takes 128 MiB)


@dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float
    lifetime: float

    def remaining(self, now: float) -> float:
        return self.expires_at - now

    @property
    def margin(self) -> float:  # below this much life left, never hand the token out
        return min(60.0, self.lifetime / 4)

    @property
    def refresh_ahead(self) -> float:  # below this much life left, refresh in the background
        return min(300.0, self.lifetime / 2)


@dataclass
class _AccountState:
    account: Account
    unlocked: store.Unlocked | None = None
    cache: msal.SerializableTokenCache | None = None
    app: msal.ClientApplication | None = None
    tokens: dict[Scopes, _Token] = field(default_factory=dict)
    flights: dict[Scopes, asyncio.Task[_Token]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # MSAL cache + file writes
    unsaved: bool = False  # the cache holds a refresh the store has not got (a failed save)


class TokenService:
    def __init__(self, config: Config, token_store: store.TokenStore) -> None:
        self.config = config
        self.store = token_store
        self._states: dict[str, _AccountState] = {}
        self._background: set[asyncio.Task[object]] = set()
        self._unlocks: dict[bytes, asyncio.Task[store.Unlocked]] = {}
        self._pepper = secrets.token_bytes(32)
        # Key derivations (scrypt, 128 MiB each) run here, never on the default executor: a
        # burst of guesses queues behind this pool, not behind other accounts' warm logins.
        self._kdf = ThreadPoolExecutor(KDF_WORKERS, thread_name_prefix="kdf")
        self.reauth = ReauthFlows(config, token_store, lambda name: self._states.pop(name, None))

    # --- public -----------------------------------------------------------------------------

    def account(self, name: str) -> Account:
        account = self.config.account(name)
        if account is None:
            raise UnknownAccount(name.strip().lower()[:200], "no such account in the config")
        return account

    async def access_token(self, name: str, password: Secret, protocol: Protocol | GraphResource, *,
                           rejected: str | None = None) -> str:
        """A valid access token for ``name``'s mailbox on ``protocol``.

        ``rejected``: a token the upstream just refused; a different one is returned (a newer
        one if another login already refreshed, else a forced refresh).
        """
        gate = GATE.get()
        try:
            account = self.account(name)
        except UnknownAccount as exc:
            unknown = exc.account
            await self._unlocked_by(unknown, password, gate,
                                    lambda derive: self._absent(unknown, password, derive))
            raise
        def unlock() -> Awaitable[store.Unlocked]:
            return self._unlocked_by(account.name, password, gate,
                                     lambda derive: self._unlock(account, password, derive))
        unlocked = await unlock()
        try:
            try:
                return await self._token(account, unlocked, protocol, rejected)
            except KeyReplaced:  # rotated or signed in anew meanwhile: open it again
                unlocked = await unlock()
                return await self._token(account, unlocked, protocol, rejected)
        except AuthorisationNeeded as exc:  # refused: a device code if the account allows it
            raise await self.reauth.needed(account, unlocked, exc) from None

    async def _unlocked_by(self, name: str, password: Secret, gate: UnlockGate | None,
                           unlock: Callable[[bool], store.Unlocked | None]) -> store.Unlocked:
        """Run ``unlock``: first without a key derivation, on the default executor (a warm login
        or a known wrong password); else once, on the key-derivation executor, behind the gate.
        Concurrent logins with the same password share that one derivation."""
        key = hmac.new(self._pepper, f"{name}\0{password.reveal()}".encode(),
                       hashlib.sha256).digest()
        task = self._unlocks.get(key)
        try:
            if task is None:
                try:
                    return await asyncio.to_thread(checked, unlock, False)
                except NeedsDerivation:
                    pass
                task = self._unlocks.get(key)
            if task is None:
                release = gate.begin_derivation() if gate is not None else None
                if gate is not None and release is None:
                    raise Throttled(name, "another password for this account or source is being "
                                          "checked")
                loop = asyncio.get_running_loop()
                task = loop.create_task(self._derive(unlock), name=f"unlock {name}")
                self._unlocks[key] = task

                def done(t: asyncio.Task[store.Unlocked]) -> None:
                    self._unlocks.pop(key, None)
                    if release is not None:
                        release()
                    if not t.cancelled():
                        # Retrieved here: when every waiter was cancelled (a client that left),
                        # shield() no longer looks at the task, and a wrong password would be
                        # logged as "Task exception was never retrieved".
                        t.exception()
                task.add_done_callback(done)
            return await asyncio.shield(task)
        except (WrongPassword, UnknownAccount, NoUsableTokenFile):
            if gate is not None:
                gate.wrong_password(password)
            raise

    async def _derive(self, unlock: Callable[[bool], store.Unlocked | None]) -> store.Unlocked:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kdf, checked, unlock, True)

    async def service_token(self, name: str, protocol: Protocol | GraphResource, *,
                            rejected: str | None = None) -> str:
        """A token with no client password: the token file's service-key slot unlocks it."""
        account = self.account(name)
        if account.service_key_file is None:
            raise AuthConfigError(account.name, "no service_key_file configured")
        unlocked = await asyncio.to_thread(self._unlock_service, account)
        try:
            return await self._token(account, unlocked, protocol, rejected)
        except KeyReplaced:  # rotated or signed in anew meanwhile: open it again
            unlocked = await asyncio.to_thread(self._unlock_service, account)
            return await self._token(account, unlocked, protocol, rejected)

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config from the next login on: every account starts afresh (its
        token file is read again, its MSAL application rebuilt with the new provider settings).
        Token requests already in flight finish with the old settings; ``aclose`` still waits
        for them."""
        self.config = self.reauth.config = config
        for state in self._states.values():
            for task in state.flights.values():
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        self._states.clear()

    async def aclose(self) -> None:
        tasks = list(self._background)
        for state in self._states.values():
            tasks.extend(state.flights.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.reauth.aclose()
        self._kdf.shutdown(wait=False, cancel_futures=True)

    # --- unlocking (worker thread) --------------------------------------------------------------

    def _unlock(self, account: Account, password: Secret, derive: bool) -> store.Unlocked | None:
        """None: a key derivation is needed (``derive`` False)."""
        try:
            with store_errors(account):
                unlocked = self.store.unlock(account.name, password, derive=derive)
        except NeedsDerivation:
            return None
        if unlocked.stale_slot and derive:
            self._upgrade(unlocked, password)
        self._touch(unlocked)
        return unlocked

    def _absent(self, name: str, password: Secret, derive: bool) -> None:
        """An unconfigured account costs what a configured one costs (see ``store``)."""
        try:
            self.store.pay_for_absent(name, password, derive=derive)
        except store.DerivationNeeded:
            return None
        raise UnknownAccount(name, "no such account in the config")

    def _upgrade(self, unlocked: store.Unlocked, password: Secret) -> None:
        """Move a slot written at an older cost or with its own salt to the file's shared salt
        and the current cost, best effort: the login goes on whatever happens."""
        try:
            if self.store.upgrade_slot(unlocked, password):
                logs.event(log, logging.INFO, "slot_upgraded", account=unlocked.account,
                           slot=unlocked.slot_label)
        except Exception as exc:  # noqa: BLE001 - the old slot still works; retried next time
            logs.event(log, logging.WARNING, "slot_upgrade_failed", account=unlocked.account,
                       slot=unlocked.slot_label, reason=str(exc) or type(exc).__name__)

    def _unlock_service(self, account: Account) -> store.Unlocked:
        assert account.service_key_file is not None
        with store_errors(account):
            key = store.read_key_file(account.service_key_file)
            unlocked = self.store.unlock_with_service_key(account.name, key)
        self._touch(unlocked)
        return unlocked

    def _touch(self, unlocked: store.Unlocked) -> None:
        """Record the slot's last use (``passwd --list``), best effort: the store writes at
        most once an hour per slot, and a failure to write never fails the login."""
        try:
            self.store.touch_slot(unlocked)
        except Exception as exc:  # noqa: BLE001 - display data only; the login goes on
            logs.event(log, logging.DEBUG, "slot_touch_failed", account=unlocked.account,
                       slot=unlocked.slot_label, reason=str(exc) or type(exc).__name__)

    # --- tokens -------------------------------------------------------------------------------

    async def _token(self, account: Account, unlocked: store.Unlocked,
                     protocol: Protocol | GraphResource, rejected: str | None) -> str:
        state = self._adopt(account, unlocked)
        meta = state.unlocked.meta if state.unlocked is not None else unlocked.meta  # ours if unsaved
        metrics.ACCOUNTS.set_needs_reauth(account.name, bool(meta.needs_reauth))
        if meta.needs_reauth:
            raise AuthorisationNeeded(account.name, meta.needs_reauth)
        scopes = _scopes(self.config, account, protocol)
        now = time.time()
        token = state.tokens.get(scopes)
        if token is not None and token.value != rejected and token.remaining(now) > token.margin:
            if token.remaining(now) < token.refresh_ahead and scopes not in state.flights:
                self._spawn(self._flight(state, scopes, force=True), f"refresh-ahead {account.name}")
            return token.value
        force = rejected is not None and (token is None or token.value == rejected)
        return (await self._flight(state, scopes, force=force)).value

    def _adopt(self, account: Account, unlocked: store.Unlocked) -> _AccountState:
        """The account's in-memory state, reloaded if the file holds a cache we have not seen."""
        state = self._states.get(account.name)
        if state is None or state.account != account:
            state = self._states[account.name] = _AccountState(account)
        current = state.unlocked
        if (current is not None and current.key_id == unlocked.key_id
                and unlocked.meta.updated_at < current.meta.updated_at):
            return state  # read before our own latest save finished: nothing newer to learn
        if state.unsaved and current is not None and current.key_id == unlocked.key_id:
            return state  # ours is newer than the store's until it is saved
        if current is None or current.key_id != unlocked.key_id or current.payload != unlocked.payload:
            self._use(state, unlocked)
        state.unlocked = unlocked
        return state

    @staticmethod
    def _use(state: _AccountState, unlocked: store.Unlocked) -> None:
        """Load ``unlocked``'s MSAL cache into ``state`` (tokens handed out so far are dropped)."""
        cache = msal.SerializableTokenCache()
        if unlocked.payload:
            cache.deserialize(unlocked.payload.decode("utf-8"))
        state.cache, state.app, state.tokens = cache, None, {}

    def _flight(self, state: _AccountState, scopes: Scopes, *, force: bool) -> asyncio.Future[_Token]:
        task = state.flights.get(scopes)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._refresh(state, scopes, force), name=f"token {state.account.name}")
            state.flights[scopes] = task

            def done(t: asyncio.Task[_Token]) -> None:
                if state.flights.get(scopes) is t:
                    del state.flights[scopes]
                if not t.cancelled():
                    t.exception()  # retrieved here so that a refresh nobody awaits is not noisy
            task.add_done_callback(done)
        return asyncio.shield(task)  # a client that goes away must not cancel the shared refresh

    async def _refresh(self, state: _AccountState, scopes: Scopes, force: bool) -> _Token:
        started = time.monotonic()
        try:
            token, fetched = await asyncio.to_thread(self._acquire, state, scopes, force)
        except KeyReplaced:  # no refresh was tried; the login opens the file again
            logs.event(log, logging.INFO, "token_file_replaced", account=state.account.name,
                       action="opening it again")
            raise
        except TokenError as exc:
            metrics.TOKEN_REFRESHES.labels(exc.result).inc()
            metrics.TOKEN_REFRESH_SECONDS.observe(time.monotonic() - started)
            logs.event(log, logging.WARNING, "token_refresh", account=state.account.name,
                       result=exc.result, reason=exc.detail)
            if not isinstance(exc, AuthorisationNeeded):
                WATCH.failed(state.account.name, exc.detail)
            raise
        WATCH.succeeded(state.account.name)
        if fetched:
            metrics.TOKEN_REFRESHES.labels("ok").inc()
            metrics.TOKEN_REFRESH_SECONDS.observe(time.monotonic() - started)
            logs.event(log, logging.INFO, "token_refresh", account=state.account.name,
                       result="ok", expires_in=round(token.remaining(time.time())),
                       latency=time.monotonic() - started)
        state.tokens[scopes] = token
        metrics.ACCOUNTS.set_expiry(
            state.account.name, access=max(t.expires_at for t in state.tokens.values()),
            refresh=msal_client.refresh_token_expiry(state.cache) if state.cache else None)
        return token

    def _acquire(self, state: _AccountState, scopes: Scopes, force: bool) -> tuple[_Token, bool]:
        """One MSAL call (worker thread). Returns the token and whether the platform was asked.

        A token still in the cache is taken without the store's lock (a login during a database
        outage goes on); anything that may ask the platform runs under the account's refresh
        lock, after re-reading the store: another process or machine may have refreshed (then
        its token is used and its rotated refresh token is the one we hold)."""
        with state.lock:
            assert state.cache is not None
            if not force and cached_token(state.cache, scopes):
                return self._call(state, scopes, force=False)
            with contextlib.ExitStack() as held:
                try:
                    held.enter_context(self.store.refresh_lock(state.account.name))
                except (store.LockTimeout, store.StoreUnavailable) as exc:
                    raise StoreUnavailable(state.account.name, str(exc)) from None
                except store.StoreWriteError as exc:  # no lock file (a read-only state_dir):
                    logs.event(log, logging.WARNING, "refresh_lock_unavailable",  # as before
                               account=state.account.name, reason=str(exc))
                else:
                    if self._reread(state):
                        force = False  # another process refreshed: its token is a new one
                return self._call(state, scopes, force)

    def _reread(self, state: _AccountState) -> bool:
        """Under the refresh lock: adopt the store's record if another process changed it; True
        if its payload differs from ours. An unsaved refresh of ours is saved instead."""
        assert state.unlocked is not None
        if state.unsaved:  # ours is the newest: save it first (if the store still refuses,
            self._persist(state)  # go on from memory, as with one process and a full disk)
            return False
        with store_errors(state.account):  # a new data key: KeyReplaced, the login opens the
            fresh = self.store.reload(state.unlocked)  # file again (ours would spend its token)
        changed = fresh.payload != state.unlocked.payload
        if changed:
            self._use(state, fresh)
        state.unlocked = fresh
        return changed

    def _call(self, state: _AccountState, scopes: Scopes, force: bool) -> tuple[_Token, bool]:
        account = state.account
        assert state.cache is not None
        if state.app is None:
            state.app = msal_client.build_app(self.config, account, state.cache)
        app = state.app
        users = None
        if account.flow != "client_credentials":
            users = app.get_accounts(username=account.mailbox) or app.get_accounts()
            if not users:  # nothing the identity platform refused: the file stays as it is
                raise AuthorisationNeeded(account.name, "no signed-in user in the token file")
        try:
            if users is None:
                if force:
                    for at in state.cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN,
                                                 target=list(scopes)):
                        state.cache.remove_at(at)
                result = msal_client.call(account.name, lambda: app.acquire_token_for_client(
                    list(scopes)))
            else:
                user = users[0]
                result = msal_client.call(
                    account.name, lambda: app.acquire_token_silent_with_error(
                        list(scopes), account=user, force_refresh=force))
            checked = msal_client.check_result(account.name, result)
        except AuthorisationNeeded as exc:
            # AADSTS65001: no consent for these scopes (Graph, configured after the account
            # signed in). The refresh token still serves what was consented, so the account
            # is not marked: its IMAP, POP and SMTP go on.
            if exc.code != NO_CONSENT:
                self._mark_needs_reauth(state, exc)
            raise
        if state.cache.has_state_changed:
            self._persist(state)
        lifetime = max(1.0, checked.expires_at - time.time())
        return _Token(checked.access_token, checked.expires_at, lifetime), not checked.from_cache

    def _meta(self, state: _AccountState, needs_reauth: str | None = None) -> store.Meta:
        assert state.cache is not None and state.unlocked is not None
        expiry, has_rt = msal_client.cache_summary(state.cache)
        resources = msal_client.cache_resources(state.cache, state.unlocked.meta.resources)
        return replace(state.unlocked.meta, access_token_expires_at=expiry,
                       refresh_token_present=has_rt, needs_reauth=needs_reauth,
                       updated_at=time.time(), resources=resources)

    def _persist(self, state: _AccountState) -> None:
        assert state.cache is not None and state.unlocked is not None
        payload = state.cache.serialize().encode("utf-8")
        try:
            state.unlocked = self.store.save(state.unlocked, payload, self._meta(state))
            state.unsaved = False
            state.cache.has_state_changed = False
        except store.FileReplaced:
            logs.event(log, logging.WARNING, "token_file_replaced", account=state.account.name,
                       action="keeping the new file; this refresh stays in memory")
        except (store.StoreError, OSError) as exc:
            state.unsaved = True  # saved under the refresh lock before the next refresh
            metrics.TOKEN_FILE_WRITE_ERRORS.inc()
            logs.event(log, logging.ERROR, "token_file_write_failed", account=state.account.name,
                       reason=str(exc), action="serving from memory; saved again before the "
                                               "next refresh")

    def _mark_needs_reauth(self, state: _AccountState, exc: AuthorisationNeeded) -> None:
        if state.unlocked is None or state.cache is None:
            return
        reason = " ".join(filter(None, [exc.code, exc.detail]))[:300] or "re-authorisation needed"
        try:
            state.unlocked = self.store.set_meta(state.unlocked, self._meta(state, reason))
        except (store.StoreError, OSError) as err:
            logs.event(log, logging.ERROR, "token_file_write_failed", account=state.account.name,
                       reason=str(err))
        metrics.ACCOUNTS.set_needs_reauth(state.account.name, True)
        logs.event(log, logging.ERROR, "authorisation_needed", account=state.account.name,
                   reason=reason, action=f"run: xoauth2-proxy login {state.account.name}")

    def _spawn(self, coro: asyncio.Future[_Token], name: str) -> None:
        async def run() -> None:
            try:
                await coro
            except TokenError:
                pass  # logged by _refresh; the next login will see the error itself
        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _scopes(config: Config, account: Account, protocol: Protocol | GraphResource) -> Scopes:
    """The scopes of a token for ``protocol``; "graph": Microsoft Graph, from the same cache
    and refresh token (``proxy.graph.settings``)."""
    if protocol != "graph":
        return config.scopes(account, protocol)
    scopes = config.graph.scopes(account.flow)
    if not scopes:
        raise AuthConfigError(account.name, "no Graph upstream is configured")
    return scopes


__all__ = ["TokenService", "TokenError", "WrongPassword", "UnknownAccount", "AuthorisationNeeded",
           "ProviderUnavailable", "AuthConfigError", "NoUsableTokenFile", "Throttled",
           "StoreUnavailable"]
