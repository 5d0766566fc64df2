"""The token service's boundary with the token store: store errors become token errors once,
and the question "would MSAL answer from its cache?" is answered without asking MSAL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msal

from proxy import store
from proxy.auth.errors import (
    AuthConfigError,
    AuthorisationNeeded,
    KeyReplaced,
    NoUsableTokenFile,
    StoreUnavailable,
    WrongPassword,
)
from proxy.config import Account

Scopes = tuple[str, ...]
MSAL_REFRESH_MARGIN = 300  # MSAL refreshes an access token with less life left than this


class NeedsDerivation(Exception):
    """Internal: the password cannot be checked without a key derivation."""


def checked(unlock: Callable[[bool], store.Unlocked | None], derive: bool) -> store.Unlocked:
    unlocked = unlock(derive)
    if unlocked is None:
        raise NeedsDerivation
    return unlocked


def cached_token(cache: msal.SerializableTokenCache, scopes: Scopes) -> bool:
    """Does ``cache`` hold an access token for ``scopes`` that MSAL hands out without asking
    the platform (more than ``MSAL_REFRESH_MARGIN`` seconds of life left)?"""
    now = time.time()
    for at in cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN, target=list(scopes)):
        expires_on = str(at.get("expires_on", ""))
        refresh_on = str(at.get("refresh_on", ""))
        if refresh_on.isdigit() and int(refresh_on) <= now:
            continue
        if expires_on.isdigit() and int(expires_on) - now > MSAL_REFRESH_MARGIN:
            return True
    return False


class store_errors:
    """Map the token store's errors for an account to token errors (context manager)."""

    def __init__(self, account: Account) -> None:
        self.account = account

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is None:
            return
        name = self.account.name
        if isinstance(exc, store.StoreUnavailable | store.LockTimeout):
            raise StoreUnavailable(name, str(exc)) from None
        if isinstance(exc, store.FileReplaced):  # rotated or signed in anew since it was opened
            raise KeyReplaced(name, "the token file's data key changed during this login") \
                from None
        if isinstance(exc, store.DerivationNeeded):
            raise NeedsDerivation from None
        if isinstance(exc, store.WrongPassword):
            raise WrongPassword(name, "wrong local password") from None
        if isinstance(exc, store.TokenFileMissing):
            raise NoUsableTokenFile(name, "no token file: the account was never authorised; "
                                          f"run: xoauth2-proxy login {name}") from None
        if isinstance(exc, store.CorruptTokenFile) and not exc.opened:
            raise NoUsableTokenFile(name, f"the token file is damaged ({exc}); "
                                          f"run: xoauth2-proxy login {name}") from None
        if isinstance(exc, store.CorruptTokenFile):
            raise AuthorisationNeeded(name, f"the token file is damaged ({exc})",  # path: log only
                                      public="the token file is damaged") from None
        if isinstance(exc, store.StoreError | OSError):
            raise AuthConfigError(name, f"token file unusable: {exc}") from None


