"""The fake Entra ID: Microsoft identity platform v2.0 endpoints on ``twisted.web`` over HTTPS.

Routes (any tenant path segment is accepted; tokens always carry :data:`TENANT_ID`)::

    GET  /{tenant}/v2.0/.well-known/openid-configuration
    GET  /{tenant}/oauth2/v2.0/authorize        auth code + PKCE S256, form_post or query
    POST /{tenant}/oauth2/v2.0/devicecode
    POST /{tenant}/oauth2/v2.0/token            device_code, authorization_code,
                                                refresh_token, client_credentials
    POST /{tenant}/oauth2/v2.0/introspect       RFC 7662 (also GET with a Bearer header)
    GET  /{tenant}/discovery/v2.0/keys          an empty JWKS (id tokens are unsigned)
    GET|POST /devicelogin                       a page where a person enters a user code
    /_test/...                                  test administration, see :mod:`proxy.demo.admin`

Grant logic lives in :mod:`proxy.demo.tokens`; this module only speaks HTTP, counts
requests and applies ``knobs.token_endpoint_mode`` ("503", "hang", "garbage"),
``knobs.token_endpoint_delay`` and ``knobs.introspection_mode`` ("503", "hang").
"""

from __future__ import annotations

import html
import json
import uuid
from collections import Counter
from typing import Any, cast
from urllib.parse import urlencode

from twisted.web import resource, server

from proxy.demo import tokens
from proxy.demo.knobs import Knobs
from proxy.demo.tokens import DEVICE_GRANT, TENANT_ID, EntraError, TokenAuthority

GRANT_NAMES = {DEVICE_GRANT: "device_code"}
WELL_KNOWN_TENANTS = frozenset({"common", "organizations", "consumers"})


def arg(request: server.Request, name: str) -> str:
    """A query or form parameter as text ("" when absent)."""
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else ""


def base_url(request: server.Request) -> str:
    host = request.getHeader("host")
    if not host:
        address = request.getHost()
        host = f"{address.host}:{address.port}"
    return f"https://{host}"


def send_json(request: server.Request, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader("content-type", "application/json; charset=utf-8")
    request.setHeader("cache-control", "no-store, no-cache")
    request.setHeader("pragma", "no-cache")
    return json.dumps(body).encode()


def send_html(request: server.Request, title: str, body: str, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader("content-type", "text/html; charset=utf-8")
    page = (
        f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return page.encode()


class Stats:
    """Requests seen by the fake Entra since start-up or the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.token_requests = 0
        self.token_errors = 0
        self.grant_types: Counter[str] = Counter()
        self.other: Counter[str] = Counter()

    def as_dict(self) -> dict:
        return {
            "token_requests": self.token_requests,
            "token_errors": self.token_errors,
            "grant_types": dict(self.grant_types),
            "devicecode_requests": self.other["devicecode"],
            "authorize_requests": self.other["authorize"],
            "introspect_requests": self.other["introspect"],
            "delayed_token_requests": self.other["delayed token"],
        }


class Entra(resource.Resource):
    """The whole site as one leaf resource that routes on the path itself."""

    isLeaf = True

    def __init__(
        self, knobs: Knobs, authority: TokenAuthority, admin: resource.Resource | None = None
    ):
        super().__init__()
        self.knobs = knobs
        self.authority = authority
        self.stats = Stats()
        self.admin = admin
        self.hanging: set[server.Request] = set()

    def render(self, request: server.Request) -> bytes | int:
        request.setHeader("x-ms-request-id", str(uuid.uuid4()))
        correlation = (request.getHeader("client-request-id") or "").strip()
        if correlation:
            request.setHeader("client-request-id", correlation)
        segments = [s.decode("utf-8", "replace") for s in request.path.split(b"/")[1:]]
        method = request.method.decode("ascii", "replace")
        try:
            return self._route(request, method, segments)
        except EntraError as exc:
            if segments and segments[-1] == "token":
                self.stats.token_errors += 1
            return send_json(
                request, exc.body(self._correlation(request), base_url(request)), exc.status
            )

    def _route(self, request: server.Request, method: str, seg: list[str]) -> bytes | int:
        if seg and seg[0] == "_test" and self.admin is not None:
            return self.admin.render(request)
        if seg == ["devicelogin"]:
            return self._device_login(request, method)
        if seg == ["error"]:
            return send_html(request, f"Error AADSTS{arg(request, 'code')}", "", 200)
        if len(seg) == 4 and seg[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return send_json(request, self.openid_configuration(base_url(request), seg[0]))
        if len(seg) == 4 and seg[1:] == ["discovery", "v2.0", "keys"]:
            return send_json(request, {"keys": []})
        if len(seg) == 4 and seg[1:3] == ["oauth2", "v2.0"]:
            endpoint = seg[3]
            if endpoint == "authorize" and method in ("GET", "POST"):
                return self._authorize(request)
            if endpoint == "devicecode" and method == "POST":
                return self._devicecode(request)
            if endpoint == "token" and method == "POST":
                return self._token(request)
            if endpoint == "introspect" and method in ("GET", "POST"):
                return self._introspect(request)
            if endpoint in ("authorize", "devicecode", "token", "introspect"):
                request.setHeader(
                    "allow", "GET, POST" if endpoint in ("authorize", "introspect") else "POST"
                )
                return send_json(request, {"error": "method_not_allowed"}, 405)
        return send_json(
            request, {"error": "not_found", "path": request.path.decode("latin-1")}, 404
        )

    @staticmethod
    def _correlation(request: server.Request) -> str:
        return (request.getHeader("client-request-id") or "").strip() or str(uuid.uuid4())

    # -- discovery -------------------------------------------------------------------------

    @staticmethod
    def openid_configuration(base: str, tenant: str) -> dict:
        segment = tenant if tenant.lower() in WELL_KNOWN_TENANTS else TENANT_ID
        issuer_tenant = "{tenantid}" if tenant.lower() in WELL_KNOWN_TENANTS else TENANT_ID
        oauth = f"{base}/{segment}/oauth2/v2.0"
        return {
            "token_endpoint": f"{oauth}/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "jwks_uri": f"{base}/{segment}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["none"],
            "response_types_supported": ["code"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/{issuer_tenant}/v2.0",
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{oauth}/authorize",
            "device_authorization_endpoint": f"{oauth}/devicecode",
            "introspection_endpoint": f"{oauth}/introspect",
            "end_session_endpoint": f"{oauth}/logout",
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": [
                "authorization_code",
                "refresh_token",
                "client_credentials",
                DEVICE_GRANT,
            ],
            "claims_supported": [
                "sub",
                "iss",
                "aud",
                "exp",
                "iat",
                "nonce",
                "preferred_username",
                "name",
                "tid",
                "oid",
                "ver",
            ],
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "msgraph_host": "graph.microsoft.com",
        }

    def issuer(self, request: server.Request) -> str:
        return f"{base_url(request)}/{TENANT_ID}/v2.0"

    # -- authorize -------------------------------------------------------------------------

    def _authorize(self, request: server.Request) -> bytes:
        self.stats.other["authorize"] += 1
        client_id = arg(request, "client_id")
        redirect_uri = arg(request, "redirect_uri")
        username = arg(request, "login_hint") or self.knobs.auto_approve_user or ""
        refusal = self._authorize_refusal(client_id, redirect_uri, username)
        if refusal is not None:
            return send_html(request, *refusal, 400)
        params = self._authorize_result(request, client_id, redirect_uri, username)
        if arg(request, "state"):
            params["state"] = arg(request, "state")
        if arg(request, "response_mode") == "form_post":
            return self._form_post(request, redirect_uri, params)
        sep = "&" if "?" in redirect_uri else "?"
        request.redirect((redirect_uri + sep + urlencode(params)).encode())
        request.setHeader("cache-control", "no-store, no-cache")
        return b""

    @staticmethod
    def _authorize_refusal(client_id: str, redirect_uri: str, username: str) -> tuple[str, str] | None:
        """A request that cannot be redirected back: the page's title and body, or None."""
        if not client_id:
            return ("Sign in: bad request",
                    "<p>AADSTS900144: The request body "
                    "must contain the following parameter: 'client_id'.</p>")
        if not tokens.is_loopback_redirect(redirect_uri):
            return ("Sign in: bad request",
                    "<p>AADSTS50011: The redirect URI specified in the request does not match the "
                    "redirect URIs configured for the application. This demo accepts http loopback "
                    f"URIs only; got {html.escape(redirect_uri)!s}.</p>")
        if not username:
            return ("Sign in: nobody to sign in",
                    "<p>The demo tenant signs in the user named by <code>login_hint</code> or by "
                    "the <code>auto_approve_user</code> knob; neither was given.</p>")
        return None

    def _authorize_result(self, request: server.Request, client_id: str, redirect_uri: str,
                          username: str) -> dict[str, str]:
        """The redirect's parameters: an authorization code, or Entra's error."""
        try:
            if arg(request, "response_type") != "code":
                raise EntraError(
                    "unsupported_response_type",
                    700054,
                    "response_type 'code' is the only one enabled for the application.",
                )
            params = {"code": self.authority.authorize(
                client_id=client_id,
                redirect_uri=redirect_uri,
                scope=arg(request, "scope"),
                code_challenge=arg(request, "code_challenge"),
                code_challenge_method=arg(request, "code_challenge_method") or "plain",
                username=username,
                nonce=arg(request, "nonce") or None,
            )}
            if arg(request, "client_info") == "1":
                params["client_info"] = tokens.client_info(username)
            return params
        except EntraError as exc:
            body = exc.body(self._correlation(request), base_url(request))
            return {
                "error": exc.error,
                "error_description": body["error_description"],
                "error_uri": body["error_uri"],
            }

    @staticmethod
    def _form_post(request: server.Request, action: str, params: dict[str, str]) -> bytes:
        fields = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}"/>'
            for k, v in params.items()
        )
        request.setHeader("content-type", "text/html; charset=utf-8")
        request.setHeader("cache-control", "no-store, no-cache")
        page = (
            "<!DOCTYPE html><html><head><title>Working...</title></head><body>"
            f'<form method="POST" name="hiddenform" action="{html.escape(action)}">{fields}'
            "<noscript><p>Script is disabled. Click Submit to continue.</p>"
            '<input type="submit" value="Submit"/></noscript></form>'
            "<script>document.forms[0].submit();</script></body></html>"
        )
        return page.encode()

    # -- device code -----------------------------------------------------------------------

    def _devicecode(self, request: server.Request) -> bytes:
        self.stats.other["devicecode"] += 1
        flow = self.authority.start_device_flow(arg(request, "client_id"), arg(request, "scope"))
        uri = f"{base_url(request)}/devicelogin"
        return send_json(
            request,
            {
                "user_code": flow.user_code,
                "device_code": flow.device_code,
                "verification_uri": uri,
                "expires_in": tokens.DEVICE_CODE_LIFETIME,
                "interval": self.knobs.device_code_interval,
                "message": f"To sign in, use a web browser to open the page {uri} and enter the "
                f"code {flow.user_code} to authenticate.",
            },
        )

    def _device_login(self, request: server.Request, method: str) -> bytes:
        form = (
            '<form method="POST" action="/devicelogin">'
            '<p>Code: <input name="user_code"/></p><p>Sign in as: <input name="username"/></p>'
            '<p><input type="submit" value="Sign in"/></p></form>'
        )
        if method != "POST":
            return send_html(request, "Enter code", form)
        user_code, username = arg(request, "user_code"), arg(request, "username").strip()
        try:
            if not username:
                raise KeyError(user_code)
            self.authority.approve(user_code, username)
        except KeyError:
            return send_html(request, "Enter code", "<p>That code is not valid.</p>" + form, 400)
        return send_html(
            request,
            "You have signed in",
            f"<p>Signed in as {html.escape(username)}. You can close this window.</p>",
        )

    # -- token -----------------------------------------------------------------------------

    def _delayed(self, request: server.Request) -> bool:
        """Hold a token request for ``knobs.token_endpoint_delay`` seconds, then serve it,
        unless its client went away meanwhile (then it was never read)."""
        delay = self.knobs.token_endpoint_delay
        if delay <= 0 or getattr(request, "_xoauth2_delayed", False):
            return False
        from twisted.internet import reactor

        request._xoauth2_delayed = True  # type: ignore[attr-defined]
        self.stats.other["delayed token"] += 1  # counted on arrival, before it is served
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def serve() -> None:
            if gone:
                return
            body = self.render(request)
            if isinstance(body, bytes):
                request.write(body)
                request.finish()

        cast(Any, reactor).callLater(delay, serve)
        return True

    def _token(self, request: server.Request) -> bytes | int:
        if self._delayed(request):
            return server.NOT_DONE_YET
        grant_type = arg(request, "grant_type")
        self.stats.token_requests += 1
        self.stats.grant_types[GRANT_NAMES.get(grant_type, grant_type or "(none)")] += 1
        mode = self.knobs.token_endpoint_mode
        if mode == "hang":
            self.hanging.add(request)
            request.notifyFinish().addBoth(lambda _: self.hanging.discard(request))
            return server.NOT_DONE_YET
        if mode == "503":
            raise EntraError(
                "temporarily_unavailable",
                90033,
                "A transient error has occurred. Please try again.",
                status=503,
            )
        if mode == "garbage":
            request.setHeader("content-type", "text/html; charset=utf-8")
            return b"<html><body><h1>Service Unavailable</h1>upstream connect error</body></html>"

        client_id = arg(request, "client_id") or (request.getUser() or b"").decode(
            "utf-8", "replace"
        )
        if not grant_type:
            raise tokens.missing("grant_type")
        if not client_id:
            raise tokens.missing("client_id")
        authority = self.authority
        if grant_type == DEVICE_GRANT:
            issued = authority.redeem_device_code(client_id, arg(request, "device_code"))
        elif grant_type == "authorization_code":
            issued = authority.redeem_auth_code(
                client_id,
                arg(request, "code"),
                arg(request, "redirect_uri"),
                arg(request, "code_verifier"),
            )
        elif grant_type == "refresh_token":
            issued = authority.redeem_refresh_token(
                client_id, arg(request, "refresh_token"), arg(request, "scope")
            )
        elif grant_type == "client_credentials":
            secret = arg(request, "client_secret") or (request.getPassword() or b"").decode(
                "utf-8", "replace"
            )
            issued = authority.client_credentials(client_id, secret, arg(request, "scope"))
        else:
            raise EntraError(
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        body = tokens.token_response(
            issued, self.issuer(request), arg(request, "client_info") == "1"
        )
        return send_json(request, body)

    # -- introspection ---------------------------------------------------------------------

    def _introspect(self, request: server.Request) -> bytes | int:
        self.stats.other["introspect"] += 1
        mode = self.knobs.introspection_mode
        if mode == "hang":
            self.hanging.add(request)
            request.notifyFinish().addBoth(lambda _: self.hanging.discard(request))
            return server.NOT_DONE_YET
        if mode == "503":
            body = {"error": "temporarily_unavailable", "error_description": "try again later"}
            return send_json(request, body, 503)
        token = arg(request, "token")
        if not token:
            header = (request.getHeader("authorization") or "").strip()
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer":
                token = value.strip()
        if not token:
            return send_json(
                request, {"error": "invalid_request", "error_description": "no token given"}, 400
            )
        return send_json(request, self.authority.introspect(token, self.issuer(request)))
