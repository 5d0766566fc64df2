"""Names and helpers shared by the tests of the fake Microsoft 365 (mail servers and Entra ID)."""

from __future__ import annotations

import msal

from proxy.demo.process import DemoUpstream, http_session

OUTLOOK = "https://outlook.office.com/"
IMAP, POP, SMTP = (OUTLOOK + s for s in ("IMAP.AccessAsUser.All", "POP.AccessAsUser.All",
                                         "SMTP.Send"))
USER = "alice@example.com"
CLIENT_ID = "0f0e0d0c-0b0a-4909-8807-060504030201"


def public_app(
    upstream: DemoUpstream, timeout: float = 10, **kwargs
) -> msal.PublicClientApplication:
    return msal.PublicClientApplication(
        CLIENT_ID,
        authority=upstream.authority,
        instance_discovery=False,
        http_client=http_session(upstream.ca_file, timeout=timeout),
        **kwargs,
    )


def refresh_grant(refresh_token: str, scope: str = IMAP) -> dict[str, str]:
    """Form fields of a refresh_token grant for ``CLIENT_ID``, to post to the token endpoint."""
    return {
        "client_id": CLIENT_ID,
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "scope": scope,
    }
