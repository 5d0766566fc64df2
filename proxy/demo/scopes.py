"""Scopes and resources as the fake Entra ID sees them, and its refusals in Entra's shape.

Pure Python, no I/O: :mod:`proxy.demo.tokens` (grants) and :mod:`proxy.demo.entra` (HTTP) use
it. A token request names one resource (a second one is ``invalid_scope``, AADSTS28000); an
authorize or device-code request may name several, to consent to all at once.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit

TENANT_ID = "5f3c2a8e-7b1d-4e96-a0c4-d2e81b6f9a37"
OUTLOOK = "https://outlook.office.com"
SCOPE_IMAP = f"{OUTLOOK}/IMAP.AccessAsUser.All"
SCOPE_POP = f"{OUTLOOK}/POP.AccessAsUser.All"
SCOPE_SMTP = f"{OUTLOOK}/SMTP.Send"
SCOPE_APP_ONLY = "https://outlook.office365.com/.default"
PROTOCOL_PERMISSIONS = {
    "imap": "imap.accessasuser.all",
    "pop": "pop.accessasuser.all",
    "smtp": "smtp.send",
}
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
# Exchange Online answers to both identifier URIs; treat them as one resource.
OUTLOOK_RESOURCES = frozenset({"https://outlook.office.com", "https://outlook.office365.com"})
GRAPH = "https://graph.microsoft.com"


def now() -> float:
    return time.time()


def entra_timestamp(when: float | None = None) -> str:
    moment = datetime.fromtimestamp(now() if when is None else when, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


class EntraError(Exception):
    """A refusal in Entra's shape: ``error``, ``AADSTSnnnn: text`` and an HTTP status."""

    def __init__(self, error: str, code: int, text: str, status: int = 400) -> None:
        super().__init__(f"{error}: AADSTS{code}: {text}")
        self.error = error
        self.code = code
        self.text = text
        self.status = status

    def body(
        self, correlation_id: str, base_url: str = "https://login.microsoftonline.com"
    ) -> dict:
        trace_id = str(uuid.uuid4())
        stamp = entra_timestamp()
        description = (
            f"AADSTS{self.code}: {self.text}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}"
        )
        return {
            "error": self.error,
            "error_description": description,
            "error_codes": [self.code],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{base_url}/error?code={self.code}",
        }


def missing(name: str) -> EntraError:
    return EntraError(
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


def split_scopes(scope: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys((scope or "").split()))


def resource_of(scope: str) -> str:
    if "://" not in scope:
        return GRAPH  # a bare permission name means Microsoft Graph, as at Entra
    resource = scope.rsplit("/", 1)[0].lower().rstrip("/")
    return OUTLOOK if resource in OUTLOOK_RESOURCES else resource


def resource_scopes(scopes: tuple[str, ...], *, many: bool = False) -> tuple[str, ...]:
    """Drop the OIDC scopes; expand a delegated Outlook ``/.default`` to the mail permissions.

    A token request may name one resource only (Entra: ``invalid_scope``, AADSTS28000); an
    authorize or device-code request (``many``) may name several, to consent to all at once."""
    out: list[str] = []
    for scope in scopes:
        if scope.lower() in RESERVED_SCOPES:
            continue
        if scope.lower().endswith("/.default") and resource_of(scope) == OUTLOOK:
            out.extend((SCOPE_IMAP, SCOPE_POP, SCOPE_SMTP))
        else:
            out.append(scope)
    resources = {resource_of(s) for s in out}
    if len(resources) > 1 and not many:
        raise EntraError(
            "invalid_scope",
            28000,
            "Provided value for the input parameter scope is not valid because it contains "
            f"more than one resource. Scope {' '.join(scopes)} is not valid.",
        )
    return tuple(dict.fromkeys(out))


def first_resource(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """The scopes of the first resource named: what a code redeemed for several is good for."""
    return tuple(s for s in scopes if resource_of(s) == resource_of(scopes[0])) if scopes else ()


def check_consent(requested: tuple[str, ...], consented: tuple[str, ...], client_id: str) -> None:
    """A refresh for Graph permissions the user never consented to fails as at Entra."""
    granted = {s.lower() for s in consented}
    absent = [s for s in resource_scopes(requested)
               if resource_of(s) == GRAPH and s.lower() not in granted]
    if absent:
        raise EntraError(
            "invalid_grant",
            65001,
            f"The user or administrator has not consented to use the application with ID "
            f"'{client_id}'. Send an interactive authorization request for this user and "
            f"resource (missing: {' '.join(absent)}).",
        )


def is_loopback_redirect(uri: str) -> bool:
    try:
        parts = urlsplit(uri)
        return parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1")
    except ValueError:
        return False
