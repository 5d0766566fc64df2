"""In-band re-authorisation: a refused refresh token answered with a device code.

When a client's local password opened the account's token file but the identity platform
refused the refresh token, the token service asks ``ReauthFlows.needed``: it starts one MSAL
device-code flow for the account (or reuses the one in progress; an expired one is replaced
only now, on such a login) and returns ``DeviceCodeNeeded``, a ``TokenError`` whose user text
tells the person where to go and which code to enter. Every protocol words it as it words any
"authorisation needed": IMAP ``NO [AUTHENTICATIONFAILED]``, POP3 ``-ERR [AUTH]``, SMTP
``535 5.7.8``.

A background task polls the flow: one MSAL request at a time in a worker thread, the wait
between polls on the event loop, so a waiting flow holds no thread. When the person completes it and
the signed-in user is the account's mailbox, the new tokens are written with the data key the
login already unlocked: the file keeps every device slot, and the next login just works.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msal

from proxy import logs, metrics, store
from proxy.auth import flows, msal_client
from proxy.auth.errors import AuthorisationNeeded, TokenError
from proxy.config import Account, Config
from proxy.notify.events import publish

log = logging.getLogger("proxy.auth")
_PENDING = ("authorization_pending", "slow_down")  # keep polling


class DeviceCodeNeeded(AuthorisationNeeded):
    """The refresh token was refused and a device-code flow waits for the person."""

    def __init__(self, account: str, detail: str, *, url: str, user_code: str,
                 expires_at: float) -> None:
        super().__init__(account, detail)
        self.url, self.user_code, self.expires_at = url, user_code, expires_at

    @property
    def minutes(self) -> int:
        return max(1, math.ceil((self.expires_at - time.time()) / 60))

    @property
    def user_text(self) -> str:
        return (f"Authorisation needed for {self.account}: open {self.url} and enter "
                f"{self.user_code} within {self.minutes} minutes, then log in again")


@dataclass
class Flow:
    account: Account
    flow: dict[str, Any]
    unlocked: store.Unlocked
    task: asyncio.Task[None] | None = None
    outcome: str = "waiting"  # waiting, done, expired, failed
    via: str = "in_band"  # who started it: "in_band" (a client's login) or "admin"

    @property
    def expires_at(self) -> float:
        return float(self.flow.get("expires_at", 0))

    @property
    def url(self) -> str:
        return str(self.flow.get("verification_uri") or "https://microsoft.com/devicelogin")

    @property
    def user_code(self) -> str:
        return str(self.flow["user_code"])

    @property
    def live(self) -> bool:
        return self.outcome == "waiting" and self.expires_at > time.time()

    def error(self, detail: str) -> DeviceCodeNeeded:
        return DeviceCodeNeeded(self.account.name, detail, url=self.url,
                                user_code=self.user_code, expires_at=self.expires_at)


class ReauthFlows:
    """One device-code flow per account at a time, polled in the background."""

    def __init__(self, config: Config, token_store: store.TokenStore,
                 on_done: Callable[[str], object]) -> None:
        self.config = config
        self.store = token_store
        self.on_done = on_done  # told the account's name when its new tokens are written
        self.flows: dict[str, Flow] = {}
        self._starting: dict[str, asyncio.Task[Flow]] = {}

    def enabled(self, account: Account) -> bool:
        return account.reauthorise_in_band and account.flow != "client_credentials"

    def current(self, name: str) -> Flow | None:
        return self.flows.get(name)

    async def needed(self, account: Account, unlocked: store.Unlocked,
                     refused: AuthorisationNeeded) -> TokenError:
        """The error for a login whose refresh token was refused: a device code if a flow
        runs or could be started, else ``refused`` itself (or why no flow could start)."""
        if not self.enabled(account):
            publish("authorisation_needed", account.name, reason=refused.public or refused.detail)
            return refused
        try:
            flow = await self.start(account, unlocked)
        except TokenError as exc:
            logs.event(log, logging.WARNING, "device_flow_start_failed", account=account.name,
                       result=exc.result, reason=exc.detail)
            return refused if exc.failure is refused.failure else exc
        return flow.error(refused.detail)

    async def start(self, account: Account, unlocked: store.Unlocked, *,
                    via: str = "in_band") -> Flow:
        """The account's live flow, or a new one (concurrent callers share its start)."""
        flow = self.flows.get(account.name)
        if flow is not None and flow.live:
            flow.unlocked = unlocked  # the newest key: the file may have been rewritten
            return flow
        task = self._starting.get(account.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._initiate(account, unlocked, via), name=f"device flow {account.name}")
            self._starting[account.name] = task
            task.add_done_callback(lambda t: self._starting.pop(account.name, None))
        return await asyncio.shield(task)

    async def _initiate(self, account: Account, unlocked: store.Unlocked, via: str) -> Flow:
        old = self.flows.pop(account.name, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        cache = msal.SerializableTokenCache()
        app, started = await asyncio.to_thread(self._begin, account, cache)
        flow = Flow(account, started, unlocked, via=via)
        self.flows[account.name] = flow
        flow.task = asyncio.get_running_loop().create_task(
            self._follow(flow, app, cache), name=f"device flow poll {account.name}")
        logs.event(log, logging.WARNING, "device_flow_started", account=account.name,
                   url=flow.url, expires_in=round(flow.expires_at - time.time()),
                   action="the user enters the code shown to their mail client")
        publish("authorisation_needed", account.name, url=flow.url, user_code=flow.user_code,
                expires_at=int(flow.expires_at), via=via)
        return flow

    def _begin(self, account: Account, cache: msal.SerializableTokenCache
               ) -> tuple[msal.PublicClientApplication, dict[str, Any]]:
        app = msal_client.build_app(self.config, account, cache)
        assert isinstance(app, msal.PublicClientApplication)
        scopes = list(self.config.login_scopes(account))
        started = msal_client.call(account.name, lambda: app.initiate_device_flow(scopes=scopes))
        if "user_code" not in started:
            msal_client.check_result(account.name, started if "error" in started
                                     else {"error": "no user code"})
        return app, started

    async def _follow(self, flow: Flow, app: msal.PublicClientApplication,
                      cache: msal.SerializableTokenCache) -> None:
        name = flow.account.name
        try:
            result = await self._poll(flow, app)
            await asyncio.to_thread(flows.save_signed_in, self.config, flow.account,
                                    self.store, flow.unlocked, result, cache)
        except TokenError as exc:
            flow.outcome = "expired" if flow.expires_at <= time.time() else "failed"
            logs.event(log, logging.WARNING, "device_flow_ended", account=name,
                       result=flow.outcome, reason=exc.detail)
            return
        except (store.StoreError, OSError) as exc:
            flow.outcome = "failed"
            metrics.TOKEN_FILE_WRITE_ERRORS.inc()
            logs.event(log, logging.ERROR, "token_file_write_failed", account=name,
                       reason=str(exc), action="fix the state directory; log in again for a "
                                               "new code")
            return
        flow.outcome = "done"
        logs.event(log, logging.INFO, "device_flow_ended", account=name, result="ok")
        self.finished(name, flow.via)

    def finished(self, name: str, via: str) -> None:
        """New tokens were written for ``name`` by a sign-in (``via`` says whose); a device
        code still waiting for the account is not needed any more."""
        flow = self.flows.get(name)
        if flow is not None and flow.outcome == "waiting":
            flow.outcome = "done"
            if flow.task is not None:
                flow.task.cancel()
        metrics.ACCOUNTS.set_needs_reauth(name, False)
        publish("reauthorised", name, via=via)
        self.on_done(name)

    async def _poll(self, flow: Flow, app: msal.PublicClientApplication) -> dict[str, Any]:
        """MSAL's answer once the person signed in, refused, or the code expired."""
        name = flow.account.name
        while True:
            result = await asyncio.to_thread(msal_client.call, name, lambda: (
                app.acquire_token_by_device_flow(flow.flow, exit_condition=lambda _: True)))
            if (result.get("error") not in _PENDING or flow.expires_at <= time.time()):
                return dict(result)
            await asyncio.sleep(max(1.0, float(flow.flow.get("interval") or 5)))

    async def aclose(self) -> None:
        tasks: list[asyncio.Task[Any]] = [f.task for f in self.flows.values() if f.task]
        tasks.extend(self._starting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
