"""What the fake Entra ID keeps and how it answers: the records of its grants (codes and
tokens), its refusals in Entra's shape (``EntraError``) and its token endpoint's JSON.
Pure Python, no I/O; ``proxy.demo.tokens`` holds the authority that issues them.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

TENANT_ID = "5f3c2a8e-7b1d-4e96-a0c4-d2e81b6f9a37"


def now() -> float:
    return time.time()


def entra_timestamp(when: float | None = None) -> str:
    moment = datetime.fromtimestamp(now() if when is None else when, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def object_id(username: str) -> str:
    """The stable object id of a user (the same name always signs in as the same user)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "xoauth2-proxy-demo:" + username.casefold()))


def display_name(username: str) -> str:
    local = username.split("@", 1)[0]
    return " ".join(part.capitalize() for part in local.replace("_", ".").split(".") if part)


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


@dataclass
class AccessToken:
    token: str
    username: str | None  # None: app-only (client credentials)
    client_id: str
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float
    revoked: bool = False


@dataclass
class RefreshToken:
    token: str
    username: str
    client_id: str
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float
    revoked_at: float | None = None
    used: bool = False


@dataclass
class AuthCode:
    code: str
    username: str
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    code_challenge: str
    nonce: str | None
    expires_at: float
    redeemed: bool = False


@dataclass
class DeviceCode:
    device_code: str
    user_code: str
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float
    username: str | None = None  # set when approved
    redeemed: bool = False


@dataclass
class Issued:
    """What a grant produced, before it is rendered as a token response."""

    access: AccessToken
    refresh: RefreshToken | None = None
    id_claims: dict | None = None


def client_info(username: str) -> str:
    payload = {"uid": object_id(username), "utid": TENANT_ID}
    return b64url(json.dumps(payload, separators=(",", ":")).encode())


def id_token(claims: dict, issuer: str) -> str:
    """An unsigned (``alg: none``) JWT: MSAL decodes the id_token but never verifies it."""
    header = b64url(json.dumps({"typ": "JWT", "alg": "none"}).encode())
    body = b64url(json.dumps(dict(claims, iss=issuer), separators=(",", ":")).encode())
    return f"{header}.{body}."


def token_response(issued: Issued, issuer: str, want_client_info: bool) -> dict:
    """Render a grant's result as Entra's token endpoint JSON."""
    at = issued.access
    lifetime = int(at.expires_at - at.issued_at)
    body: dict = {
        "token_type": "Bearer",
        "scope": " ".join(at.scopes),
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": at.token,
    }
    if issued.refresh is not None:
        body["refresh_token"] = issued.refresh.token
    if issued.id_claims is not None:
        body["id_token"] = id_token(issued.id_claims, issuer)
    if want_client_info and at.username is not None:
        body["client_info"] = client_info(at.username)
    return body
