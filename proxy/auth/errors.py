"""Typed token errors: every MSAL, HTTP and store failure becomes one of these, once.

Each error knows the protocol-neutral ``Failure`` it maps to, a metrics ``result`` label, and
``user_text``: a sentence a mail client may show its user, which names what to do and never
holds a secret.
"""

from __future__ import annotations

import re

from proxy.protocol.events import Failure

_AADSTS = re.compile(r"AADSTS\d+")
_BAD_CREDENTIALS = "Invalid user name or local password."


class TokenError(Exception):
    failure: Failure = Failure.UNAVAILABLE
    result: str = "provider_unavailable"
    client_text: str = "Login failed."  # the sentence of a class whose user_text is fixed

    def __init__(self, account: str, detail: str = "") -> None:
        super().__init__(f"{account}: {detail}" if detail else account)
        self.account = account
        self.detail = detail

    @property
    def user_text(self) -> str:
        return self.client_text


class WrongPassword(TokenError):
    failure, result = Failure.BAD_CREDENTIALS, "bad_password"
    client_text = _BAD_CREDENTIALS


class UnknownAccount(TokenError):
    failure, result = Failure.BAD_CREDENTIALS, "unknown_account"
    client_text = _BAD_CREDENTIALS  # same text as a wrong password: no account enumeration


class NoUsableTokenFile(TokenError):
    """The account has no token file, or one that cannot be read, found before the password
    was tried: the client hears exactly what a wrong password hears (no account enumeration);
    the log keeps the detail and the command that fixes it."""

    failure, result = Failure.BAD_CREDENTIALS, "authorisation_needed"
    client_text = _BAD_CREDENTIALS


class Throttled(TokenError):
    """Another key derivation for this account or source is in flight: refused, not queued."""

    failure, result = Failure.THROTTLED, "throttled"
    client_text = "Too many login attempts at once for this account; try again in a few seconds."


class AuthorisationNeeded(TokenError):
    """No usable refresh token: an operator must run ``xoauth2-proxy login ACCOUNT``."""

    failure, result = Failure.AUTHORISATION_NEEDED, "authorisation_needed"

    def __init__(self, account: str, detail: str = "", *, code: str | None = None,
                 public: str | None = None) -> None:
        super().__init__(account, detail)
        self.code = code
        self.public = detail if public is None else public  # what the client may see of it

    @classmethod
    def from_response(cls, account: str, response: dict[str, object]) -> AuthorisationNeeded:
        description = str(response.get("error_description") or response.get("error") or "")
        first_line = description.splitlines()[0].strip() if description else ""
        match = _AADSTS.search(description)
        return cls(account, first_line or "the identity platform refused the refresh token",
                   code=match.group(0) if match else None)

    @property
    def user_text(self) -> str:
        reason = f" ({self.public})" if self.public else ""
        return (f"Authorisation needed for {self.account}: ask the administrator to run "
                f"`xoauth2-proxy login {self.account}`{reason}.")


class ProviderUnavailable(TokenError):
    failure, result = Failure.UNAVAILABLE, "provider_unavailable"
    client_text = "The Microsoft identity platform cannot be reached right now; try again later."


class StoreUnavailable(TokenError):
    """The shared token store (database) cannot be reached, or another process's refresh of
    this account did not finish in time: temporary, nothing was lost."""

    failure, result = Failure.UNAVAILABLE, "store_unavailable"

    @property
    def user_text(self) -> str:
        return "The proxy's token store is unavailable right now; try again in a minute."


class KeyReplaced(StoreUnavailable):
    """Found under the refresh lock: the token file's data key changed since this login opened
    it (``passwd --rotate`` or a new login). The login opens the file again and goes on; a
    second change in a row is answered as temporary."""


class AuthConfigError(TokenError):
    failure, result = Failure.CONTACT_ADMIN, "config_error"
    client_text = "The proxy is not configured correctly for this account; contact the administrator."


class IdentityMismatch(TokenError):
    """Someone consented with another user than the configured account (login CLI only)."""

    failure, result = Failure.AUTHORISATION_NEEDED, "authorisation_needed"
