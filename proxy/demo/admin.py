"""Test administration of the demo upstream, served under ``/_test/`` by the fake Entra.

Bodies and answers are JSON; mistakes answer 400 ``{"error": "..."}``::

    GET  /_test/config                 the knobs
    POST /_test/config                 {knob: value, ...} -> the knobs (400 on unknown knob)
    POST /_test/approve                {"user_code", "username"} (404 on unknown code)
    POST /_test/expire_device_code     {"user_code"}
    POST /_test/revoke                 {"username", "access_tokens": false, "refresh_tokens": true} -> {"revoked": n}
    POST /_test/token                  {"username", "scopes": [...], "lifetime"?, "client_id"?}
                                       -> {"access_token", "expires_in", "scope"}
                                       (username null: an app-only token)
    GET  /_test/stats                  token endpoint requests, total and per grant type
    POST /_test/stats/reset
    GET  /_test/mailbox?user=U         ["<base64 message>", ...]
    POST /_test/deliver                {"user", "message_b64"}, or the raw message as the body
                                       with ?user=U (any non-JSON content type)
"""

from __future__ import annotations

import base64
import binascii
import json
import typing
from typing import Any

from twisted.web import server

from proxy.demo.entra import Entra, arg, send_json
from proxy.demo.knobs import IntrospectionMode, Knobs, TokenEndpointMode

TEST_CLIENT_ID = "00000000-0000-0000-0000-00000000feed"
_MODES: dict[str, Any] = {"token_endpoint_mode": TokenEndpointMode,
                          "introspection_mode": IntrospectionMode}


def read_body(request: server.Request) -> bytes:
    return request.content.read() if request.content is not None else b""


class BadRequest(Exception):
    pass


class Admin:
    """Renders ``/_test/...`` requests; plugged into :class:`Entra` as its ``admin``."""

    def __init__(self, entra: Entra, store: Any) -> None:
        self.entra = entra
        self.knobs: Knobs = entra.knobs
        self.store = store

    def render(self, request: server.Request) -> bytes:
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        handler = getattr(
            self, f"{method.lower()}_{path[len('/_test/') :].replace('/', '_')}", None
        )
        if handler is None:
            return send_json(request, {"error": f"no admin endpoint {method} {path}"}, 404)
        try:
            return send_json(request, handler(request))
        except BadRequest as exc:
            return send_json(request, {"error": str(exc)}, 400)
        except LookupError as exc:
            return send_json(request, {"error": f"not found: {exc}"}, 404)

    @staticmethod
    def _body(request: server.Request) -> dict:
        try:
            body = json.loads(read_body(request) or b"{}")
        except ValueError as exc:
            raise BadRequest(f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    @staticmethod
    def _text(body: dict, name: str) -> str:
        value = body.get(name)
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{name!r} (a non-empty string) is required")
        return value

    def get_config(self, request: server.Request) -> dict:
        return self.knobs.as_dict()

    def post_config(self, request: server.Request) -> dict:
        values = self._body(request)
        for name, modes in _MODES.items():
            mode = values.get(name, "ok")
            if mode not in typing.get_args(modes):
                raise BadRequest(f"{name}: {mode!r} is not one of {typing.get_args(modes)}")
        candidate = Knobs(**self.knobs.as_dict())
        try:
            candidate.update(values)  # all or nothing: check on a copy first
        except KeyError as exc:
            raise BadRequest(f"unknown knob {exc.args[0]!r}") from None
        except TypeError as exc:
            raise BadRequest(str(exc)) from None
        self.knobs.update(values)
        return self.knobs.as_dict()

    def post_approve(self, request: server.Request) -> dict:
        body = self._body(request)
        self.entra.authority.approve(self._text(body, "user_code"), self._text(body, "username"))
        return {"approved": True}

    def post_expire_device_code(self, request: server.Request) -> dict:
        self.entra.authority.expire_device_code(self._text(self._body(request), "user_code"))
        return {"expired": True}

    def post_revoke(self, request: server.Request) -> dict:
        body = self._body(request)
        count = self.entra.authority.revoke(
            self._text(body, "username"), bool(body.get("access_tokens", False)),
            bool(body.get("refresh_tokens", True)),
        )
        return {"revoked": count}

    def post_token(self, request: server.Request) -> dict:
        body = self._body(request)
        username = body.get("username")
        scopes = body.get("scopes")
        lifetime = body.get("lifetime")
        if username is not None and (not isinstance(username, str) or not username):
            raise BadRequest("'username' must be a non-empty string or null (app-only)")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise BadRequest("'scopes' (a list of strings) is required")
        if lifetime is not None and not isinstance(lifetime, int):
            raise BadRequest("'lifetime' must be an integer number of seconds")
        client_id = body.get("client_id") or TEST_CLIENT_ID
        at = self.entra.authority.mint_access(username, str(client_id), tuple(scopes), lifetime)
        return {
            "access_token": at.token,
            "expires_in": int(at.expires_at - at.issued_at),
            "scope": " ".join(at.scopes),
        }

    def get_stats(self, request: server.Request) -> dict:
        return self.entra.stats.as_dict()

    def post_stats_reset(self, request: server.Request) -> dict:
        self.entra.stats.reset()
        return self.entra.stats.as_dict()

    def get_mailbox(self, request: server.Request) -> list:
        user = arg(request, "user")
        if not user:
            raise BadRequest("?user= is required")
        return [base64.b64encode(m).decode("ascii") for m in self.store.messages(user)]

    def post_deliver(self, request: server.Request) -> dict:
        content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        if content_type == "application/json":
            body = self._body(request)
            user = self._text(body, "user")
            try:
                message = base64.b64decode(self._text(body, "message_b64"), validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest("'message_b64' is not base64") from None
        else:
            user = arg(request, "user")
            if not user:
                raise BadRequest("?user= is required with a raw message body")
            message = read_body(request)
        self.store.deliver(user, message)
        return {"delivered": len(message)}
