"""Test knobs of the fake Microsoft 365, shared by the fake Entra ID and the mail servers.

One mutable instance lives in the upstream process; the Entra admin endpoints
(``/_test/config``) change it, and every server reads it on each request, so a change
takes effect at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

TokenEndpointMode = Literal["ok", "503", "hang", "garbage"]
IntrospectionMode = Literal["ok", "503", "hang"]


@dataclass
class Knobs:
    # Fake Entra ID
    access_token_lifetime: int = 3600  # seconds, "expires_in" of issued access tokens
    refresh_token_lifetime: int = 90 * 86400  # seconds
    strict_rotation: bool = False  # a used refresh token stops working (Entra keeps it valid)
    token_endpoint_mode: TokenEndpointMode = "ok"  # "503", "hang" (never answers), "garbage"
    # Seconds a token request waits before it is read (a slow network on the way in); one whose
    # client went away meanwhile is dropped unread, as a request lost in transit would be.
    token_endpoint_delay: float = 0.0
    device_code_interval: int = 1  # seconds between device-code polls asked of the client
    auto_approve_user: str | None = None  # device codes are approved at once as this user
    client_secret: str = "demo-client-secret"  # the confidential client's secret
    # Token introspection (what a real Dovecot checks tokens with): "503", or "hang" (never
    # answers); Dovecot then refuses XOAUTH2 logins as temporary failures.
    introspection_mode: IntrospectionMode = "ok"
    # Mail servers
    xoauth2_error_challenge: bool = False  # Dovecot style "+ <error json>" instead of NO/535
    # Every XOAUTH2 login answered with a temporary failure, as Dovecot does when it cannot check
    # tokens: NO [UNAVAILABLE] / -ERR [SYS/TEMP] / 454 4.7.0 (common.TEMPORARY_FAILURE).
    xoauth2_temporary_failure: bool = False
    max_message_size: int = 64 * 1024 * 1024
    # SMTP: a second reply after the one to the end of a message, as an upstream out of step
    # with the proxy would send (for example one that read a smuggled command in the message).
    smtp_extra_reply_after_data: bool = False
    preauth_timeout: int = 60  # IMAP/POP3: seconds a connection may wait without logging in

    def update(self, values: dict[str, Any]) -> None:
        """Apply a partial update; unknown names raise ``KeyError``, wrong types ``TypeError``."""
        known = {f.name: f for f in fields(self)}
        for name, value in values.items():
            if name not in known:
                raise KeyError(name)
            current = getattr(self, name)
            if current is not None and value is not None and type(value) is not type(current):
                raise TypeError(f"{name}: expected {type(current).__name__}")
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
