"""MSAL applications and the one place where MSAL's results and exceptions become ours.

Everything here is blocking (MSAL and requests are): call it in a worker thread. The HTTP
session is built explicitly — ``trust_env=False`` so that REQUESTS_CA_BUNDLE and proxy variables
in the environment cannot silently change which CA is trusted — with the provider's CA file if
one is configured, else the system's default trust store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msal
import msal.exceptions
import requests

from proxy.auth import requests_session
from proxy.auth.errors import AuthConfigError, AuthorisationNeeded, ProviderUnavailable, TokenError
from proxy.config import Account, Config, ConfigError, Provider

T = TypeVar("T")

# OAuth errors that mean the refresh token (or consent) is gone for good: a person must sign in.
_NEEDS_LOGIN = {"invalid_grant", "interaction_required", "consent_required", "login_required",
                "expired_token", "access_denied", "authorization_declined"}
_CONFIG_ERRORS = {"invalid_client", "unauthorized_client", "invalid_scope", "invalid_request",
                  "unsupported_grant_type", "invalid_resource"}


def http_session(provider: Provider) -> requests.Session:
    return requests_session.session(str(provider.ca_file) if provider.ca_file else True,
                                    provider.timeout)


def _is_microsoft(authority: str) -> bool:
    host = urlsplit(authority).hostname or ""
    return host.endswith((".microsoftonline.com", ".microsoftonline.us", ".chinacloudapi.cn",
                          ".microsoftonline.de"))


def build_app(config: Config, account: Account, cache: msal.SerializableTokenCache
              ) -> msal.ClientApplication:
    """The MSAL application for an account (discovers the tenant: network I/O, may raise)."""
    provider = config.providers[account.provider]
    common: dict[str, Any] = dict(
        authority=provider.authority_url,
        token_cache=cache,
        http_client=http_session(provider),
        timeout=provider.timeout,
        # Instance discovery asks login.microsoftonline.com about the authority host: right for
        # Microsoft clouds, impossible for any other (e.g. the embedded fake Entra ID).
        instance_discovery=_is_microsoft(provider.authority),
    )
    if account.flow == "client_credentials":
        try:
            secret = provider.client_secret()
        except ConfigError as exc:
            raise AuthConfigError(account.name, str(exc)) from None
        if not secret:
            raise AuthConfigError(account.name, f"provider {provider.name} has no client secret")
        return call(account.name, lambda: msal.ConfidentialClientApplication(
            provider.client_id, client_credential=secret, **common))
    return call(account.name, lambda: msal.PublicClientApplication(provider.client_id, **common))


def call(account: str, func: Callable[[], T]) -> T:
    """Run an MSAL call, turning transport failures into ``ProviderUnavailable``."""
    try:
        return func()
    except requests.Timeout:
        raise ProviderUnavailable(account, "timed out talking to the identity platform") from None
    except requests.RequestException as exc:
        raise ProviderUnavailable(account, f"identity platform unreachable: "
                                           f"{type(exc).__name__}") from None
    except msal.exceptions.MsalServiceError as exc:  # 5xx and other HTTP errors
        raise ProviderUnavailable(account, f"identity platform error: {exc}"[:200]) from None
    except ValueError as exc:  # MSAL: discovery failed, or a reply that is not JSON
        text = str(exc)
        if "HTTP status: 4" in text:
            raise AuthConfigError(account, f"tenant discovery refused: {text[:200]}") from None
        raise ProviderUnavailable(account, f"bad reply from the identity platform: "
                                           f"{text[:200]}") from None


@dataclass(frozen=True)
class TokenResult:
    access_token: str
    expires_at: float
    from_cache: bool


def check_result(account: str, result: dict[str, Any] | None) -> TokenResult:
    """Turn MSAL's result dict into a token or one of our errors."""
    if not result:
        raise AuthorisationNeeded(account, "no refresh token is stored for this account")
    if "access_token" in result:
        expires_in = float(result.get("expires_in") or 0)
        return TokenResult(result["access_token"], time.time() + expires_in,
                           result.get("token_source") == "cache")
    error = str(result.get("error", ""))
    if error in _NEEDS_LOGIN:
        raise AuthorisationNeeded.from_response(account, result)
    description = str(result.get("error_description", "")).splitlines()
    detail = f"{error}: {description[0]}" if description else error or "unknown error"
    if error in _CONFIG_ERRORS:
        raise AuthConfigError(account, detail)
    raise ProviderUnavailable(account, detail)


def identity_of(result: dict[str, Any]) -> str | None:
    """The signed-in user name from a token response's id_token claims, lower-cased."""
    claims = result.get("id_token_claims") or {}
    for key in ("preferred_username", "upn", "email"):
        value = claims.get(key)
        if isinstance(value, str) and value:
            return value.lower()
    return None


def cache_summary(cache: msal.SerializableTokenCache) -> tuple[float | None, bool]:
    """(latest access-token expiry, whether a refresh token is present) of a cache."""
    expiries = [float(at.get("expires_on", 0))
                for at in cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)]
    has_rt = any(True for _ in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN))
    return (max(expiries) if expiries else None), has_rt


def resource_names(scopes: Iterable[str]) -> set[str]:
    """Short names of the resources scopes are for: "outlook", "graph", else the host."""
    names = set()
    for scope in scopes:
        host = (urlsplit(scope).hostname or "").lower()
        if host:
            names.add("outlook" if host.startswith("outlook.") else
                      "graph" if host.startswith("graph.") else host)
    return names


def cache_resources(cache: msal.SerializableTokenCache, consented: tuple[str, ...] = ()
                    ) -> tuple[str, ...]:
    """The resources a cache holds access tokens for, with those of ``consented`` scopes."""
    names = resource_names(consented)
    for at in cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN):
        names |= resource_names(str(at.get("target", "")).split())
    return tuple(sorted(names))


def refresh_token_expiry(cache: msal.SerializableTokenCache) -> float | None:
    """When the cached refresh token expires, if the cache says (Entra usually does not)."""
    expiries = [float(rt["expires_on"])
                for rt in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)
                if str(rt.get("expires_on", "")).isdigit()]
    return max(expiries) if expiries else None


__all__ = ["TokenError", "build_app", "call", "check_result", "identity_of", "cache_summary",
           "http_session", "TokenResult", "refresh_token_expiry", "cache_resources"]
