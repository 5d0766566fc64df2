"""The fake Entra ID's token authority: grants and tokens issued, refreshed, revoked, validated.

Pure Python, no Twisted and no I/O: ``proxy.demo.entra`` turns HTTP requests into calls on
:class:`TokenAuthority`, which raises :class:`EntraError` for anything Entra would refuse.
The same authority validates access tokens for the fake mail servers (:meth:`validate`)
and answers RFC 7662 introspection for real Dovecot.

Access and refresh tokens are opaque random strings. Users need no registration: any
username signs in, with an object id derived from it, in one fixed tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from proxy.demo.entra_records import (
    TENANT_ID,
    AccessToken,
    AuthCode,
    DeviceCode,
    EntraError,
    Issued,
    RefreshToken,
    b64url,
    display_name,
    entra_timestamp,
    missing,
    now,
    object_id,
)
from proxy.demo.entra_records import client_info as client_info  # re-exported: entra.py uses them
from proxy.demo.entra_records import token_response as token_response
from proxy.demo.knobs import Knobs

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

AUTH_CODE_LIFETIME = 600
DEVICE_CODE_LIFETIME = 900
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

# Entra's access tokens are JWTs of 1.5-3 KB; tokens as long make long-line handling count.
ACCESS_TOKEN_BYTES = 1200


def split_scopes(scope: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys((scope or "").split()))


def resource_of(scope: str) -> str:
    if "://" not in scope:
        return GRAPH  # a bare permission name means Microsoft Graph, as at Entra
    resource = scope.rsplit("/", 1)[0].lower().rstrip("/")
    return OUTLOOK if resource in OUTLOOK_RESOURCES else resource


def resource_scopes(scopes: tuple[str, ...], *, many: bool = False) -> tuple[str, ...]:
    """Drop the OIDC scopes; expand a delegated Outlook ``/.default`` to the mail permissions.
    A token request names one resource (AADSTS28000); an authorize or device-code request
    (``many``) may name several, to consent to all at once."""
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


def check_consent(requested: tuple[str, ...], consented: tuple[str, ...], client_id: str) -> None:
    """A refresh for Graph permissions the user never consented to fails as at Entra."""
    absent = [s for s in resource_scopes(requested) if resource_of(s) == GRAPH
              and s.lower() not in {c.lower() for c in consented}]
    if absent:
        raise EntraError("invalid_grant", 65001, "The user or administrator has not consented "
                         f"to use the application with ID '{client_id}'. Send an interactive "
                         f"authorization request for this user and resource ({' '.join(absent)}).")


def is_loopback_redirect(uri: str) -> bool:
    try:
        parts = urlsplit(uri)
        return parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1")
    except ValueError:
        return False


class TokenAuthority:
    """All grants and tokens of one fake Entra tenant, in memory."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.auth_codes: dict[str, AuthCode] = {}
        self.device_codes: dict[str, DeviceCode] = {}  # by device_code
        self.user_codes: dict[str, DeviceCode] = {}  # by user_code

    # -- minting -------------------------------------------------------------------------

    def mint_access(
        self,
        username: str | None,
        client_id: str,
        scopes: tuple[str, ...],
        lifetime: int | None = None,
    ) -> AccessToken:
        issued = now()
        life = self.knobs.access_token_lifetime if lifetime is None else lifetime
        token = AccessToken(
            secrets.token_urlsafe(ACCESS_TOKEN_BYTES), username, client_id, scopes, issued, issued + life
        )
        self.access_tokens[token.token] = token
        return token

    def _mint_refresh(self, username: str, client_id: str, scopes: tuple[str, ...]) -> RefreshToken:
        issued = now()
        token = RefreshToken(
            secrets.token_urlsafe(64),
            username,
            client_id,
            scopes,
            issued,
            issued + self.knobs.refresh_token_lifetime,
        )
        self.refresh_tokens[token.token] = token
        return token

    def _issue_user(
        self, username: str, client_id: str, requested: tuple[str, ...], nonce: str | None = None,
        consented: tuple[str, ...] = (),
    ) -> Issued:
        # A code for several resources gives a token for the first; the refresh token keeps all.
        scopes = resource_scopes(requested, many=True)
        scopes = tuple(s for s in scopes if resource_of(s) == resource_of(scopes[0])) if scopes else ()
        lowered = {s.lower() for s in requested}
        access = self.mint_access(
            username,
            client_id,
            scopes or tuple(s for s in requested if s.lower() != "offline_access"),
        )
        issued = Issued(access)
        if "offline_access" in lowered:
            issued.refresh = self._mint_refresh(username, client_id,
                                                tuple(dict.fromkeys(consented + requested)))
        if "openid" in lowered:
            claims = {
                "aud": client_id,
                "iat": int(access.issued_at),
                "nbf": int(access.issued_at),
                "exp": int(access.issued_at) + 3600,
                "name": display_name(username),
                "oid": object_id(username),
                "preferred_username": username,
                "sub": b64url(hashlib.sha256((client_id + username.casefold()).encode()).digest()),
                "tid": TENANT_ID,
                "ver": "2.0",
            }
            if nonce:
                claims["nonce"] = nonce
            issued.id_claims = claims
        return issued

    # -- grants ----------------------------------------------------------------------------

    def start_device_flow(self, client_id: str, scope: str | None) -> DeviceCode:
        if not client_id:
            raise missing("client_id")
        scopes = split_scopes(scope)
        if not scopes:
            raise missing("scope")
        resource_scopes(scopes, many=True)
        alphabet = "BCDFGHJKLMNPQRSTVWXZ23456789"
        user_code = "".join(secrets.choice(alphabet) for _ in range(9))
        flow = DeviceCode(
            secrets.token_urlsafe(48), user_code, client_id, scopes, now() + DEVICE_CODE_LIFETIME
        )
        self.device_codes[flow.device_code] = flow
        self.user_codes[user_code] = flow
        return flow

    def approve(self, user_code: str, username: str) -> None:
        flow = self.user_codes.get(user_code.strip().upper())
        if flow is None or flow.expires_at <= now():
            raise KeyError(user_code)
        flow.username = username

    def expire_device_code(self, user_code: str) -> None:
        self.user_codes[user_code.strip().upper()].expires_at = now() - 1

    def redeem_device_code(self, client_id: str, device_code: str) -> Issued:
        if not device_code:
            raise missing("device_code")
        flow = self.device_codes.get(device_code)
        if flow is None or flow.client_id != client_id or flow.redeemed:
            raise EntraError(
                "invalid_grant",
                70000,
                "The provided value for the input parameter 'device_code' is not valid.",
            )
        if flow.expires_at <= now():
            raise EntraError(
                "expired_token",
                70020,
                "The provided value for the input parameter 'device_code' is not valid. "
                "This device code has expired.",
            )
        if flow.username is None and self.knobs.auto_approve_user:
            flow.username = self.knobs.auto_approve_user
        if flow.username is None:
            raise EntraError(
                "authorization_pending",
                70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
            )
        flow.redeemed = True
        return self._issue_user(flow.username, client_id, flow.scopes)

    def authorize(
        self,
        *,
        client_id: str,
        redirect_uri: str,
        scope: str | None,
        code_challenge: str,
        code_challenge_method: str,
        username: str,
        nonce: str | None,
    ) -> str:
        """Record a consented authorization request; return the authorization code."""
        if not code_challenge:
            raise EntraError(
                "invalid_request",
                9002325,
                "Proof Key for Code Exchange is required for cross-origin authorization code "
                "redemption.",
            )
        if code_challenge_method != "S256":
            raise EntraError(
                "invalid_request",
                501491,
                "Invalid code_challenge_method: only 'S256' is accepted by this tenant.",
            )
        scopes = split_scopes(scope)
        if not scopes:
            raise missing("scope")
        resource_scopes(scopes, many=True)
        code = AuthCode(
            secrets.token_urlsafe(64),
            username,
            client_id,
            redirect_uri,
            scopes,
            code_challenge,
            nonce,
            now() + AUTH_CODE_LIFETIME,
        )
        self.auth_codes[code.code] = code
        return code.code

    def redeem_auth_code(
        self, client_id: str, code: str, redirect_uri: str, code_verifier: str
    ) -> Issued:
        if not code:
            raise missing("code")
        grant = self.auth_codes.get(code)
        if grant is None or grant.client_id != client_id:
            raise EntraError(
                "invalid_grant", 70000, "The provided value for the 'code' parameter is not valid."
            )
        if grant.redeemed:
            raise EntraError(
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid "
                "code or use an existing refresh token.",
            )
        if grant.expires_at <= now():
            raise EntraError(
                "invalid_grant",
                70008,
                "The provided authorization code or refresh token has expired due to "
                "inactivity. Send a new interactive authorization request for this user and "
                "resource.",
            )
        if redirect_uri != grant.redirect_uri:
            raise EntraError(
                "invalid_grant",
                70000,
                "The provided value for the 'redirect_uri' is not valid. The value must exactly "
                "match the redirect URI used to obtain the authorization code.",
            )
        if not code_verifier:
            raise missing("code_verifier")
        challenge = b64url(hashlib.sha256(code_verifier.encode("ascii", "replace")).digest())
        if not hmac.compare_digest(challenge, grant.code_challenge):
            raise EntraError(
                "invalid_grant",
                501481,
                "The Code_Verifier does not match the code_challenge supplied in the "
                "authorization request.",
            )
        grant.redeemed = True
        return self._issue_user(grant.username, client_id, grant.scopes, grant.nonce)

    def redeem_refresh_token(self, client_id: str, token: str, scope: str | None) -> Issued:
        if not token:
            raise missing("refresh_token")
        grant = self.refresh_tokens.get(token)
        if grant is None:
            raise EntraError(
                "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid."
            )
        if grant.client_id != client_id:
            raise EntraError(
                "invalid_grant",
                700005,
                "Provided Authorization Code is intended to use against other tenant/client.",
            )
        if grant.revoked_at is not None:
            raise EntraError(
                "invalid_grant",
                50173,
                "The provided grant has expired due to it being revoked, a fresh auth token is "
                "needed. The user might have changed or reset their password. The grant was "
                f"issued on '{entra_timestamp(grant.issued_at)}' and the TokensValidFrom date "
                f"(before which tokens are not valid) for this user is "
                f"'{entra_timestamp(grant.revoked_at)}'.",
            )
        if grant.expires_at <= now():
            inactive = max(0, int(grant.expires_at - grant.issued_at))
            days, rest = divmod(inactive, 86400)
            hours, rest = divmod(rest, 3600)
            minutes, seconds = divmod(rest, 60)
            raise EntraError(
                "invalid_grant",
                700082,
                "The refresh token has expired due to inactivity. The token was issued on "
                f"{entra_timestamp(grant.issued_at)} and was inactive for "
                f"{days}.{hours:02d}:{minutes:02d}:{seconds:02d}.",
            )
        if grant.used and self.knobs.strict_rotation:
            raise EntraError(
                "invalid_grant",
                70000,
                "The provided value for the input parameter 'refresh_token' or 'assertion' is "
                "not valid: this refresh token has already been redeemed.",
            )
        requested = split_scopes(scope) or grant.scopes
        if scope:
            resource_scopes(requested)
            check_consent(requested, grant.scopes, client_id)
        grant.used = True
        return self._issue_user(grant.username, client_id, requested, consented=grant.scopes)

    def client_credentials(self, client_id: str, client_secret: str, scope: str | None) -> Issued:
        if not client_secret:
            raise EntraError(
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
                status=401,
            )
        if not hmac.compare_digest(client_secret.encode(), self.knobs.client_secret.encode()):
            raise EntraError(
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is "
                "the client secret value, not the client secret ID, for a secret added to app "
                f"'{client_id}'.",
                status=401,
            )
        scopes = split_scopes(scope)
        if not scopes:
            raise missing("scope")
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            raise EntraError(
                "invalid_scope",
                1002012,
                f"The provided value for scope {' '.join(scopes)} is not valid. Client credential "
                "flows must have a scope value with /.default suffixed to the resource "
                "identifier (application ID URI).",
            )
        return Issued(self.mint_access(None, client_id, scopes))

    # -- administration ------------------------------------------------------------------

    def revoke(self, username: str, access_tokens: bool = False, refresh_tokens: bool = True) -> int:
        """Revoke the user's refresh tokens and/or access tokens; return how many were hit.

        Access tokens alone model a resource that stops honouring a token early (Continuous
        Access Evaluation): the refresh token still works, so a client can recover by itself."""
        user = username.casefold()
        count = 0
        moment = now()
        for rt in self.refresh_tokens.values():
            if refresh_tokens and rt.username.casefold() == user and rt.revoked_at is None:
                rt.revoked_at = moment
                count += 1
        if access_tokens:
            for at in self.access_tokens.values():
                if at.username is not None and at.username.casefold() == user and not at.revoked:
                    at.revoked = True
                    count += 1
        return count

    # -- resource side ---------------------------------------------------------------------

    def lookup(self, token: str) -> AccessToken | None:
        at = self.access_tokens.get(token)
        if at is None or at.revoked or at.expires_at <= now():
            return None
        return at

    def validate(self, token: str, user: str, protocol: str) -> bool:
        """True iff ``token`` lets ``user`` use ``protocol`` ("imap", "pop" or "smtp")."""
        permission = PROTOCOL_PERMISSIONS.get(protocol)
        at = self.lookup(token)
        if at is None or permission is None:
            return False
        if at.username is None:
            return any(
                s.lower().endswith("/.default") and resource_of(s) == OUTLOOK for s in at.scopes
            )
        if at.username.casefold() != user.casefold():
            return False
        return any(
            resource_of(s) == OUTLOOK and s.rsplit("/", 1)[-1].lower() == permission
            for s in at.scopes
            if "://" in s
        )

    def introspect(self, token: str, issuer: str) -> dict:
        at = self.lookup(token)
        if at is None:
            return {"active": False}
        answer = {
            "active": True,
            "scope": " ".join(at.scopes),
            "client_id": at.client_id,
            "token_type": "Bearer",
            "exp": int(at.expires_at),
            "iat": int(at.issued_at),
            "iss": issuer,
            "aud": OUTLOOK,
            "tid": TENANT_ID,
        }
        if at.username is not None:
            answer.update(
                username=at.username, sub=object_id(at.username), oid=object_id(at.username)
            )
        return answer


class Validator:
    """The object handed to the mail servers: ``validate(token, user, protocol) -> bool``."""

    def __init__(self, authority: TokenAuthority) -> None:
        self._authority = authority

    def validate(self, token: str, user: str, protocol: str) -> bool:
        return self._authority.validate(token, user, protocol)

    def app_only(self, token: str) -> bool:
        """True for a valid client-credentials token (it may send as any mailbox)."""
        at = self._authority.lookup(token)
        return at is not None and at.username is None
