"""The data keys the admin page writes an account's token file with.

Writing new tokens or adding a device password needs the file's data key. The page uses one
the daemon already holds — unlocked on the page before, or held by the account's in-band
device-code flow — but only while the file still has that key (its ``key_id``): a new sign-in
with another password or ``passwd --rotate`` gives the file a new one, and a key held from
before is then dropped, never used. Else the account's service key, else one of its device
passwords, which the page asks for.
"""

from __future__ import annotations

import asyncio

from proxy import store
from proxy.auth.reauth import ReauthFlows
from proxy.config import Account
from proxy.secret import Secret
from proxy.store.core import same_key_id


class Refused(Exception):
    """A user mistake shown on the page (no secret in it)."""


class AccountKeys:
    def __init__(self, token_store: store.TokenStore, flows: ReauthFlows) -> None:
        self.store = token_store
        self.flows = flows
        self.held: dict[str, store.Unlocked] = {}  # unlocked through this page

    async def known(self, account: Account) -> tuple[store.Unlocked | None, bool]:
        """A held key the file still has, and whether a held one was dropped as outdated."""
        flow = self.flows.current(account.name)
        candidates = [key for key in (self.held.get(account.name),
                                      flow.unlocked if flow else None) if key is not None]
        if not candidates:
            return None, False
        try:
            info = await asyncio.to_thread(self.store.info, account.name)
        except (store.StoreError, OSError):
            return None, False
        for key in candidates:
            if same_key_id(info.key_id, key.key_id):
                return key, False
        self.held.pop(account.name, None)
        return None, True

    async def unlocked(self, account: Account, password: str) -> store.Unlocked:
        """The account's data key: from the password given, a key held, or the service key."""
        name = account.name
        try:
            if password:
                unlocked = await asyncio.to_thread(self.store.unlock, name, Secret(password))
            else:
                known, outdated = await self.known(account)
                if known is not None:
                    return known
                if account.service_key_file is not None:
                    key = await asyncio.to_thread(store.read_key_file, account.service_key_file)
                    unlocked = await asyncio.to_thread(self.store.unlock_with_service_key,
                                                       name, key)
                elif outdated:
                    raise Refused("The token file has a new key since it was unlocked here (a "
                                  "new sign-in or `passwd --rotate`): enter one of the "
                                  "account's device passwords.")
                else:
                    raise Refused("Enter one of the account's device passwords.")
        except store.WrongPassword:
            raise Refused("That is not one of the account's device passwords.") from None
        except store.TokenFileMissing:
            raise Refused("The account has no token file yet: authorise it once with "
                          f"`xoauth2-proxy login {name}`.") from None
        except store.StoreError as exc:
            raise Refused(f"The token file cannot be used: {exc}") from None
        self.held[name] = unlocked
        return unlocked
